"""The fine-tuning comparison: every method of configs/finetune/<pair>/ from one robust source per pair.

    .venv/bin/python scripts/finetune_results.py [--pairs fashion_to_animal,mnist_to_fashion]
        [--methods standard,at,...] [--seeds 0,1] [--nproc 2] [--aa-limit 100] [--remeasure-aa]

For each pair: the robust and the clean source (seed 0), then each method for each seed under torchrun
(clean + PGD-20 on the full test split, written by training), then standard AutoAttack on the first
``--aa-limit`` test points. Finished runs and evaluations are skipped, so the command resumes.
Writes results/finetune.json after every run (commit it: a later session, even on a fresh machine,
runs only what it lacks) and results/finetune.md, a markdown table (mean +- sample std over seeds).

``--remeasure-aa``: rows whose AutoAttack came from the earlier backend (torchattacks' ports) get it
again from fra31's code; the old figure is kept as ``aa_torchattacks``. A run whose folder is gone is
retrained first (clean evaluation only); ``same_model`` records whether its clean accuracy on the full
test split equals the recorded one. As the retrained model may differ, PGD-20 on the same first points
is measured on it too (``aa_pgd20_now``), the figure AutoAttack is compared with.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_robust.report import train_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["standard", "at", "trades", "mart", "aft", "twins_at", "twins_trades", "scratch_at", "aft_clean_source"]
TITLES = {"fashion_to_animal": "Fashion-MNIST -> Animal-MNIST", "mnist_to_fashion": "MNIST -> Fashion-MNIST"}


def torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dist_robust", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_dir(recipe: Path, name: str) -> Path:
    return ROOT / yaml.safe_load(recipe.read_text())["run"]["out_dir"] / name


def ensure_source(pair: str, source: str, nproc: int) -> Path:
    """A pair's source run (configs/finetune/<pair>/<source>.yaml), trained once."""
    recipe = ROOT / "configs" / "finetune" / pair / f"{source}.yaml"
    out = run_dir(recipe, source)
    if not (out / "results.json").is_file():
        torchrun(nproc, "train", str(recipe))
    return out


def one_run(recipe: Path, seed: int, nproc: int, aa_limit: int) -> dict:
    name = f"{recipe.stem}-s{seed}"
    out = run_dir(recipe, name)
    if not (out / "results.json").is_file():
        torchrun(nproc, "train", str(recipe), f"train.seed={seed}", f"run.name={name}")
    res = json.loads((out / "results.json").read_text())
    aa_file = out / f"aa{aa_limit}.json"
    if aa_limit and not aa_file.is_file():
        # Blocks of 50: both ranks attack (one block of the default 500 would leave rank 1 idle).
        torchrun(nproc, "eval", "--checkpoint", str(out), "--dataset", res["dataset"], "--attacks", "clean,aa",
                 "--limit", str(aa_limit), "--aa-block-size", "50", "--out", str(aa_file))
    # PGD-20 on AutoAttack's points too, so the two columns can be compared point for point.
    pgd_file = out / f"pgd{aa_limit}.json"
    if aa_limit and not pgd_file.is_file():
        torchrun(nproc, "eval", "--checkpoint", str(out), "--dataset", res["dataset"], "--attacks", "clean,pgd-20",
                 "--limit", str(aa_limit), "--out", str(pgd_file))
    row = {"clean": res["clean"]["acc"], "pgd20": res["attacks"]["pgd-20"]["acc"], "n": res["n"],
           "train_s": train_seconds(out), "eval_s": res["seconds"]}
    if aa_limit:
        aa = json.loads(aa_file.read_text())
        row.update(aa=aa["attacks"]["aa"]["acc"], aa_clean=aa["clean"]["acc"], aa_n=aa["n"], aa_s=aa["seconds"],
                   aa_backend=aa["attacks"]["aa"].get("backend", "torchattacks 3.5.1"),
                   aa_pgd20=json.loads(pgd_file.read_text())["attacks"]["pgd-20"]["acc"])
    return row


def fra31(row: dict) -> tuple[float, float] | None:
    """(AutoAttack accuracy from fra31's code, from torchattacks' ports on the same run) of a row,
    the second None when it was never measured so; None when the row has no fra31 figure."""
    if not row.get("aa_backend", "").startswith("pyautoattack"):
        return None
    return row["aa"], row.get("aa_torchattacks")


def remeasure_aa(recipe: Path, seed: int, row: dict, nproc: int, aa_limit: int) -> dict:
    name = f"{recipe.stem}-s{seed}"
    out = run_dir(recipe, name)
    if not (out / "results.json").is_file():
        torchrun(nproc, "train", str(recipe), f"train.seed={seed}", f"run.name={name}", "eval.attacks=[clean]")
    res = json.loads((out / "results.json").read_text())
    if "clean_now" in row and abs(res["clean"]["acc"] - row["clean_now"]) > 1e-9:
        print(f"! {name}: retrained model differs from the one AutoAttack ran on; row left as it was")
        return row
    if fra31(row) is None:
        aa_file = out / f"aa{aa_limit}-fra31.json"
        if not aa_file.is_file():
            torchrun(nproc, "eval", "--checkpoint", str(out), "--dataset", res["dataset"], "--attacks", "clean,aa",
                     "--limit", str(aa_limit), "--aa-block-size", str(-(-aa_limit // nproc)), "--out", str(aa_file))
        aa = json.loads(aa_file.read_text())
        row = dict(row, aa_torchattacks=row["aa"], aa=aa["attacks"]["aa"]["acc"], aa_s=aa["seconds"],
                   aa_backend=aa["attacks"]["aa"]["backend"], clean_now=res["clean"]["acc"],
                   same_model=abs(res["clean"]["acc"] - row["clean"]) < 1e-9)
    # PGD-20 on the same points of the model AutoAttack ran on: the retrained model may not be the
    # recorded one, and AutoAttack is only comparable with PGD-20 on the same model.
    pgd_file = out / f"pgd{aa_limit}-now.json"
    if not pgd_file.is_file():
        torchrun(nproc, "eval", "--checkpoint", str(out), "--dataset", res["dataset"], "--attacks", "clean,pgd-20",
                 "--limit", str(aa_limit), "--out", str(pgd_file))
    return dict(row, aa_pgd20_now=json.loads(pgd_file.read_text())["attacks"]["pgd-20"]["acc"])


def remeasure_due(row: dict) -> bool:
    """A row whose AutoAttack is torchattacks' port, or fra31's on a retrained model without PGD-20 beside it."""
    return fra31(row) is None or ("aa_torchattacks" in row and "aa_pgd20_now" not in row)


def summary(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def write(table: dict, args, out: Path) -> str:
    """results/finetune.json (every finished run, so a later session resumes from the committed file)
    and results/finetune.md (the table over the runs present)."""
    out.mkdir(exist_ok=True)
    (out / "finetune.json").write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "aa_limit": args.aa_limit,
                                                   "runs": table}, indent=1))
    lines = []
    for pair, rows in table.items():
        runs = [r for seeds in rows.values() for r in seeds.values()]
        if not runs:
            continue
        lines += [f"\n**{TITLES.get(pair, pair)}** (L-inf eps 0.1; clean and PGD-20 on the {runs[0]['n']:,} test "
                  f"images, AutoAttack on the first {args.aa_limit}; mean ± std over seeds)\n",
                  f"| method | seeds | clean % | PGD-20 % | PGD-20 % (first {args.aa_limit}) | AutoAttack % (fra31) "
                  f"| its seeds | PGD-20 % on its models (first {args.aa_limit}) "
                  f"| torchattacks' port, the seeds' earlier models |", "|---|---|---|---|---|---|---|---|---|"]
        for method in [m for m in METHODS if m in rows] + [m for m in rows if m not in METHODS]:
            runs = list(rows[method].values())
            pgd = summary([r["aa_pgd20"] for r in runs]) if all("aa_pgd20" in r for r in runs) else "-"
            fra = {seed: fra31(r) for seed, r in rows[method].items() if fra31(r)}
            old = [v[1] for v in fra.values() if v[1] is not None]
            # PGD-20 on the very models AutoAttack ran on (a re-measured row's model was retrained)
            same = [rows[method][seed].get("aa_pgd20_now" if v[1] is not None else "aa_pgd20") for seed, v in fra.items()]
            lines.append(f"| {method} | {','.join(rows[method])} | {summary([r['clean'] for r in runs])} | "
                         f"{summary([r['pgd20'] for r in runs])} | {pgd} | "
                         f"{summary([v[0] for v in fra.values()]) if fra else '-'} | {','.join(fra) or '-'} | "
                         f"{summary(same) if fra and None not in same else '-'} | "
                         f"{summary(old) if old and len(old) == len(fra) else '-'} |")
    text = "\n".join(lines)
    (out / "finetune.md").write_text(text.lstrip() + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", default=",".join(TITLES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--aa-limit", type=int, default=100)
    p.add_argument("--remeasure-aa", action="store_true", help="AutoAttack again with fra31's code (see above)")
    args = p.parse_args()
    out = ROOT / "results"
    table: dict = {}
    if (out / "finetune.json").is_file():  # runs recorded earlier (maybe on another machine) are kept
        saved = json.loads((out / "finetune.json").read_text())
        table = saved["runs"] if saved.get("aa_limit") == args.aa_limit else {}
    for pair in args.pairs.split(","):
        folder = ROOT / "configs" / "finetune" / pair
        rows = table.setdefault(pair, {})
        todo = [(m, s) for m in args.methods.split(",") for s in args.seeds.split(",") if s not in rows.get(m, {})]
        for source in ("source_at", "source_clean") if todo else ():
            ensure_source(pair, source, args.nproc)
        for method, seed in todo:
            rows.setdefault(method, {})[seed] = one_run(folder / f"{method}.yaml", int(seed), args.nproc, args.aa_limit)
            write(table, args, out)
        stale = [(m, s) for m in args.methods.split(",") for s in args.seeds.split(",")
                 if args.remeasure_aa and s in rows.get(m, {}) and remeasure_due(rows[m][s])]
        retrain = [m for m, s in stale if not (run_dir(folder / f"{m}.yaml", f"{m}-s{s}") / "results.json").is_file()]
        for source in ("source_at", "source_clean") if retrain else ():
            ensure_source(pair, source, args.nproc)
        for method, seed in stale:
            rows[method][seed] = remeasure_aa(folder / f"{method}.yaml", int(seed), rows[method][seed], args.nproc,
                                              args.aa_limit)
            write(table, args, out)
    print(write(table, args, out))


if __name__ == "__main__":
    main()

"""AFT's own claim in its own setting (Jeddi et al., arXiv 2012.13628): does adversarial fine-tuning of
a naturally trained model, on the same task, with the slow-start, fast-decay schedule, reach the
robustness of PGD adversarial training from scratch at a fraction of the compute?

    .venv/bin/python scripts/aft_claim.py [--datasets mnist,fashion_mnist] [--seeds 0,1] [--nproc 2]
        [--aa-limit 500] [--aa-rows key|all]

For each dataset and seed, under torchrun (configs/aft_claim/): a natural source (clean training, 4
epochs), AFT from it for 1 and 2 epochs, and PGD-5 AT from scratch for 1, 3, 6 and 10 epochs; every
run on the same 10,000 training images, cnn3, L-inf eps 0.1. Each run is evaluated with clean and
PGD-20 accuracy on the full test split (by training) and fra31's standard AutoAttack on the first
``--aa-limit`` test points (``dist-robust eval``). Cost is counted in clean-epoch equivalents by the
cost model of shared/design/performance.md: a PGD-k AT step costs (2k+3)/3 clean steps, and AFT's rows
include the source's clean epochs. Finished runs are skipped, so the command resumes; results go to
results/aft_claim.json after every run and results/aft_claim.md (table and verdict).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_results import ROOT, torchrun  # noqa: E402

sys.path.insert(0, str(ROOT))
from dist_robust.report import train_seconds  # noqa: E402

CONFIGS = ROOT / "configs" / "aft_claim"
SOURCE_EPOCHS, PGD_STEPS = 4, 5  # as in configs/aft_claim/*.yaml
AT_STEP = (2 * PGD_STEPS + 3) / 3  # clean-step equivalents of one PGD-k AT step
AFT_EPOCHS, AT_EPOCHS = (1, 2), (1, 3, 6, 10)
TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def summary(values: list[float]) -> str:
    """A percentage: the value of one seed, or mean ± sample std over several."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def rows_of() -> list[tuple[str, str, int, float]]:
    """(row name, recipe, epochs, cost in clean epochs) in table order."""
    rows = [("natural source", "source_clean", SOURCE_EPOCHS, float(SOURCE_EPOCHS))]
    rows += [(f"AFT {e} ep", "aft", e, SOURCE_EPOCHS + e * AT_STEP) for e in AFT_EPOCHS]
    rows += [(f"AT scratch {e} ep", "scratch_at", e, e * AT_STEP) for e in AT_EPOCHS]
    return rows


def run_dir(dataset: str, recipe: str, epochs: int, seed: int) -> Path:
    return ROOT / "runs" / "aft_claim" / dataset / f"{recipe}-e{epochs}-s{seed}"


def one_run(dataset: str, recipe: str, epochs: int, seed: int, nproc: int) -> dict:
    """Train (unless done) and read clean and PGD-20 on the full test split."""
    out = run_dir(dataset, recipe, epochs, seed)
    name = out.name
    if not (out / "results.json").is_file():
        overrides = [f"data.name={dataset}", f"train.epochs={epochs}", f"train.seed={seed}",
                     f"run.out_dir={out.parent}", f"run.name={name}"]
        if recipe == "aft":
            source = out.parent / f"source_clean-e{SOURCE_EPOCHS}-s{seed}"
            if not (source / "results.json").is_file():
                one_run(dataset, "source_clean", SOURCE_EPOCHS, seed, nproc)
            overrides.append(f"model.init_from={source}")
        torchrun(nproc, "train", str(CONFIGS / f"{recipe}.yaml"), *overrides)
    res = json.loads((out / "results.json").read_text())
    return {"clean": res["clean"]["acc"], "pgd20": res["attacks"]["pgd-20"]["acc"], "n": res["n"],
            "train_s": train_seconds(out)}


def autoattack(dataset: str, recipe: str, epochs: int, seed: int, nproc: int, aa_limit: int) -> dict:
    """fra31's standard AutoAttack on the first aa_limit test points of a trained run."""
    out = run_dir(dataset, recipe, epochs, seed)
    aa_file = out / f"aa{aa_limit}.json"
    if not (out / "results.json").is_file():  # recorded in results/aft_claim.json on another machine
        one_run(dataset, recipe, epochs, seed, nproc)  # training is deterministic: the same model again
    if not aa_file.is_file():
        # one block per rank: every rank attacks, and each attack runs once per rank on one chunk (Square's
        # 5,000 sequential queries cost per chunk, so small blocks multiply its time)
        torchrun(nproc, "eval", "--checkpoint", str(out), "--dataset", dataset, "--attacks", "clean,aa",
                 "--limit", str(aa_limit), "--aa-block-size", str(-(-aa_limit // nproc)), "--out", str(aa_file))
    aa = json.loads(aa_file.read_text())
    return {"aa": aa["attacks"]["aa"]["acc"], "aa_n": aa["n"], "aa_s": aa["seconds"]}


def verdict(rows: dict) -> list[str]:
    """AFT's best row against AT from scratch: at the longest budget, and at about the same cost."""
    def mean(name, key):
        vals = [r[key] for r in rows.get(name, {}).values() if key in r]
        return 100 * statistics.mean(vals) if vals else None

    names = {name: cost for name, _, _, cost in rows_of()}
    aft = max((n for n in names if n.startswith("AFT") and mean(n, "pgd20") is not None),
              key=lambda n: mean(n, "pgd20"), default=None)
    if aft is None:
        return []
    lines = []
    for at in (f"AT scratch {AT_EPOCHS[-1]} ep",
               min((n for n in names if n.startswith("AT")), key=lambda n: abs(names[n] - names[aft]))):
        if mean(at, "pgd20") is None:
            continue
        d = {k: mean(aft, k) - mean(at, k) for k in ("clean", "pgd20", "aa") if mean(aft, k) is not None
             and mean(at, k) is not None}
        lines.append(f"- {aft} (cost {names[aft]:.1f}) vs {at} (cost {names[at]:.1f}, x{names[at] / names[aft]:.2f}): "
                     + ", ".join(f"{k} {v:+.1f}" for k, v in d.items()) + " points")
    longest = f"AT scratch {AT_EPOCHS[-1]} ep"
    if mean(longest, "pgd20") is not None:  # the claim: AT from scratch's robustness at a fraction of its cost
        m = mean(aft, "pgd20") - mean(longest, "pgd20")
        word = "holds" if m > 1 else "ties" if m >= -1 else "fails"
        lines.append(f"- Verdict: the claim {word} here: {aft} is {m:+.1f} PGD-20 points from {longest} at "
                     f"{names[aft] / names[longest]:.2f}x its cost (holds above +1, ties within 1, fails below -1)")
    return lines


def write(table: dict, args) -> str:
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / "aft_claim.json").write_text(json.dumps({"command": " ".join(["python"] + sys.argv),
                                                    "aa_limit": args.aa_limit, "runs": table}, indent=1))
    lines = [f"AFT in its own setting: `{' '.join(['python'] + sys.argv)}` (cnn3, 10,000 training images, "
             f"batch 128, PGD-5 at L-inf eps 0.1 in training; clean and PGD-20 on the full test split; fra31's "
             f"standard AutoAttack on the first {args.aa_limit} test points; mean ± std where several seeds; cost in "
             f"clean-epoch equivalents, a PGD-5 AT epoch = {AT_STEP:.2f}, AFT's include the source's "
             f"{SOURCE_EPOCHS} clean epochs; train s is wall time on a shared 2-core machine, not comparable "
             f"across rows)"]
    for dataset, rows in table.items():
        lines += [f"\n**{TITLES.get(dataset, dataset)}**\n",
                  "| run | seeds | cost (clean epochs) | train s | clean % | PGD-20 % | AutoAttack % |",
                  "|---|---|---|---|---|---|---|"]
        for name, _, _, cost in rows_of():
            runs = list(rows.get(name, {}).values())
            if not runs:
                continue
            aa = summary([r["aa"] for r in runs]) if all("aa" in r for r in runs) else "-"
            secs = [r["train_s"] for r in runs if r.get("train_s")]
            lines.append(f"| {name} | {','.join(rows[name])} | {cost:.1f} | "
                         f"{f'{statistics.mean(secs):.0f}' if secs else '-'} | {summary([r['clean'] for r in runs])} | "
                         f"{summary([r['pgd20'] for r in runs])} | {aa} |")
        lines += [""] + verdict(rows)
    text = "\n".join(lines)
    (out / "aft_claim.md").write_text(text + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--datasets", default=",".join(TITLES))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--aa-limit", type=int, default=500)
    p.add_argument("--aa-rows", choices=["key", "all"], default="all",
                   help="key: AutoAttack only the rows the verdict compares")
    args = p.parse_args()
    table: dict = {}
    saved = ROOT / "results" / "aft_claim.json"
    if saved.is_file() and json.loads(saved.read_text()).get("aa_limit") == args.aa_limit:
        table = json.loads(saved.read_text())["runs"]
    # The order buys the verdict first (a row's AutoAttack costs several minutes on 2 cores): every row
    # of the first seed, AutoAttack of the rows the verdict compares, the other seeds' rows (the
    # compared ones first), then the rest of AutoAttack.
    datasets, seeds = args.datasets.split(","), args.seeds.split(",")
    recipes = {name: (recipe, epochs) for name, recipe, epochs, _ in rows_of()}
    key = [f"AFT {AFT_EPOCHS[-1]} ep", f"AT scratch {AT_EPOCHS[-1]} ep"]
    later = ["natural source", *key, "AT scratch 3 ep", "AFT 1 ep", "AT scratch 6 ep", "AT scratch 1 ep"]
    todo = [("train", d, n, seeds[0]) for d in datasets for n in recipes]
    todo += [("aa", d, n, seeds[0]) for n in key for d in datasets]
    todo += [("train", d, n, s) for s in seeds[1:] for n in later for d in datasets]
    todo += [("aa", d, n, s) for s in seeds[1:] for n in key for d in datasets]
    if args.aa_rows == "all":
        todo += [("aa", d, n, s) for n in later[3:] for s in seeds for d in datasets]  # no AA for the source
    for kind, dataset, name, seed in todo:
        row = table.setdefault(dataset, {}).setdefault(name, {}).get(seed)
        if kind == "train" and row is None:
            table[dataset][name][seed] = one_run(dataset, *recipes[name], int(seed), args.nproc)
        elif kind == "aa" and args.aa_limit and row is not None and "aa" not in row:
            row.update(autoattack(dataset, *recipes[name], int(seed), args.nproc, args.aa_limit))
        else:
            continue
        write(table, args)
    print(write(table, args))


if __name__ == "__main__":
    main()

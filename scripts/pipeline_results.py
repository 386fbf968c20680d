"""The multi-stage methods (RiFT, CARTL, Adv-SS) on the transfer pairs, next to their papers' baselines.

    .venv/bin/python scripts/pipeline_results.py [--pairs fashion_to_animal,mnist_to_fashion]
        [--methods rift,cartl,adv_ss] [--seeds 0,1] [--nproc 2]

For each pair and seed, configs/<method>/<pair>.yaml runs as one pipeline under torchrun
(``train.seed=S run.name=<pair>-s<S>``); the robust source of configs/finetune/<pair>/source_at.yaml is
trained first, since RiFT's AT model and CARTL's baselines start from it. Each row of the table is one
stage's results.json (clean and PGD-20 on the target's full test split). Adv-SS's baseline, adversarial
training from scratch at the same budget and settings, is the ``scratch_at`` row of results/finetune.json
(scripts/finetune_results.py). Every finished pipeline is recorded in results/pipelines.json (commit it:
the command runs only what that file lacks) and the table is written to results/pipelines.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finetune_results import ROOT, TITLES, ensure_source, run_dir, summary, torchrun

# recipe folder -> the stages that are rows of the table, with their labels (baseline first)
ROWS = {
    "rift": [("at", "AT fine-tuning (RiFT's start)"), ("interpolate", "RiFT")],
    "cartl": [("at_plain", "AT source, plain transfer"), ("at_neft", "AT source, non-expansive transfer"),
              ("transfer", "CARTL (FDM source, non-expansive transfer)")],
    "adv_ss": [("finetune", "Adv-SS (rotation pretext, then AT)")],
}
EXTERNAL = {"adv_ss": ("scratch_at", "AT from scratch (results/finetune.json)")}
FROM_AT_SOURCE = ("rift", "cartl")  # pipelines with stages that start from configs/finetune/<pair>/source_at


def one_pipeline(method: str, pair: str, seed: int, nproc: int) -> dict:
    recipe = ROOT / "configs" / method / f"{pair}.yaml"
    folder = run_dir(recipe, f"{pair}-s{seed}")
    if not all((folder / stage / "stage.json").is_file() for stage, _ in ROWS[method]):
        torchrun(nproc, "train", str(recipe), f"train.seed={seed}", f"run.name={folder.name}")
    row = {}
    for stage, _ in ROWS[method]:
        res = json.loads((folder / stage / "results.json").read_text())
        row[stage] = {"clean": res["clean"]["acc"], "pgd20": res["attacks"]["pgd-20"]["acc"], "n": res["n"],
                      "seconds": json.loads((folder / stage / "stage.json").read_text())["seconds"]}
    if method == "rift":
        row["interpolate"]["alpha"] = json.loads((folder / "interpolate" / "alpha_curve.json").read_text())["chosen"]
        row["mrc_lowest"] = json.loads((folder / "mrc" / "mrc.json").read_text())["modules"][0]["module"]
    return row


def write(table: dict, out: Path) -> str:
    (out / "pipelines.json").write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "runs": table},
                                                   indent=1))
    finetune = json.loads((out / "finetune.json").read_text())["runs"] if (out / "finetune.json").is_file() else {}
    lines = []
    for pair, methods in table.items():
        if not any(methods.values()):
            continue
        lines += [f"\n**{TITLES.get(pair, pair)}** (L-inf eps 0.1; clean and PGD-20 on the full target test split; "
                  "mean ± std over seeds)\n", "| method | row | seeds | clean % | PGD-20 % |", "|---|---|---|---|---|"]
        for method, seeds in methods.items():
            rows = [(label, {s: r[stage] for s, r in seeds.items()}) for stage, label in ROWS[method]]
            if method in EXTERNAL and EXTERNAL[method][0] in finetune.get(pair, {}):
                name, label = EXTERNAL[method]
                rows.insert(0, (label, finetune[pair][name]))
            for label, runs in rows:
                if method == "rift" and label == "RiFT":  # what each seed chose: the tuned module, alpha
                    label += " (" + "; ".join(f"{seeds[s]['mrc_lowest']}, alpha {r['alpha']:g}"
                                              for s, r in runs.items()) + ")"
                lines.append(f"| {method} | {label} | {','.join(runs)} | {summary([r['clean'] for r in runs.values()])}"
                             f" | {summary([r['pgd20'] for r in runs.values()])} |")
    text = "\n".join(lines)
    (out / "pipelines.md").write_text(text.lstrip() + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", default=",".join(TITLES))
    p.add_argument("--methods", default=",".join(ROWS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    table = json.loads((out / "pipelines.json").read_text())["runs"] if (out / "pipelines.json").is_file() else {}
    for pair in args.pairs.split(","):
        for method in args.methods.split(","):
            seeds = table.setdefault(pair, {}).setdefault(method, {})
            todo = [s for s in args.seeds.split(",") if s not in seeds]
            if todo and method in FROM_AT_SOURCE:
                ensure_source(pair, "source_at", args.nproc)
            for seed in todo:
                seeds[seed] = one_pipeline(method, pair, int(seed), args.nproc)
                write(table, out)
    print(write(table, out))


if __name__ == "__main__":
    main()

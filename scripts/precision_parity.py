"""Does bf16 training cost accuracy? The demo (configs/demo/: a robust Fashion-MNIST source, fine-tuned on
Animal-MNIST two ways, against AT from scratch) with train.precision=bf16 attack.precision=bf16, against
fp32, on the same seeds; every evaluation (clean, PGD-20) in fp32.

    .venv/bin/python scripts/precision_parity.py [--seeds 0,1] [--nproc 2]

Runs go to runs/parity/<precision>-s<seed>/ (finished ones are skipped, so the command resumes); the
table (per run: clean and PGD-20 accuracy of each precision, the difference, and the training time)
goes to results/precision_parity.{md,json}.
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

RUNS = ("source_at", "finetune_standard", "finetune_aft", "scratch_at")  # the demo's order: sources first
PRECISIONS = {"fp32": [], "bf16": ["train.precision=bf16", "attack.precision=bf16"]}


def one_run(recipe: str, precision: str, seed: int, nproc: int) -> dict:
    out_dir = ROOT / "runs" / "parity" / f"{precision}-s{seed}"
    run = out_dir / recipe
    if not (run / "results.json").is_file():
        extra = [f"model.init_from={out_dir / 'source_at'}"] if recipe.startswith("finetune") else []
        torchrun(nproc, "train", str(ROOT / "configs" / "demo" / f"{recipe}.yaml"), *PRECISIONS[precision],
                 f"train.seed={seed}", f"run.out_dir={out_dir}", *extra)
    res = json.loads((run / "results.json").read_text())
    return {"clean": res["clean"]["acc"], "pgd20": res["attacks"]["pgd-20"]["acc"],
            "eval_precision": res["attacks"]["pgd-20"].get("precision", "fp32"), "train_s": train_seconds(run)}


def table(rows: list[dict]) -> str:
    lines = ["| run | seed | clean fp32 / bf16 | PGD-20 fp32 / bf16 | clean diff | PGD-20 diff | train s fp32 / bf16 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["fp32"], r["bf16"]
        lines.append(f"| {r['run']} | {r['seed']} | {100 * a['clean']:.2f} / {100 * b['clean']:.2f} | "
                     f"{100 * a['pgd20']:.2f} / {100 * b['pgd20']:.2f} | {100 * (b['clean'] - a['clean']):+.2f} | "
                     f"{100 * (b['pgd20'] - a['pgd20']):+.2f} | {a['train_s']:.0f} / {b['train_s']:.0f} |")
    diffs = [abs(r["bf16"][k] - r["fp32"][k]) for r in rows for k in ("clean", "pgd20")]
    time_ratio = statistics.median(r["bf16"]["train_s"] / r["fp32"]["train_s"] for r in rows)
    lines += ["", f"Largest difference: {100 * max(diffs):.2f} points; bf16 training time / fp32 (median over "
              f"runs): {time_ratio:.2f}."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for recipe in RUNS:
            rows.append({"run": recipe, "seed": seed, **{p: one_run(recipe, p, seed, args.nproc) for p in PRECISIONS}})
            out = ROOT / "results" / "precision_parity"
            out.with_suffix(".json").write_text(json.dumps({"command": " ".join(["python", *sys.argv]),
                                                            "rows": rows}, indent=1) + "\n")
            out.with_suffix(".md").write_text(table(rows) + "\n")
            print(table(rows), flush=True)


if __name__ == "__main__":
    main()

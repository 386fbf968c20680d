"""Our sharded AutoAttack against fra31's own AutoAttack on the same model and points (1 rank).

    .venv/bin/python bench/autoattack.py [--points 200] [--eps 0.05] [--repeats 2] [--threads 1]

The model is cnn3 (width 32) trained for one pass over 10k MNIST images, a plain (non-robust) model:
at eps 0.05 about a third of the points survive APGD-CE, so APGD-T, FAB-T and Square all attack real
points. The two runs alternate (ours, reference, ours, ...) so that drift in the machine's speed hits
both; each pair gives a time ratio, and the median ratio is reported with its spread. Both use the
same seed and batch size, ours in one block (so its robust flags should equal the reference's; the
number of points that differ is reported). Writes bench/results/autoattack.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from pyautoattack import AutoAttack
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks import trained_cnn3  # noqa: E402

from dist_robust.attacks.autoattack import autoattack  # noqa: E402
from dist_robust.data import load_dataset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--points", type=int, default=200)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    test = load_dataset("mnist", "test")
    model = trained_cnn3(32, load_dataset("mnist", "train"))
    n = args.points
    x, y = test.images[:n].float() / 255, test.labels[:n]
    pairs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as state:
            t0 = time.perf_counter()
            ours = autoattack(model, test, args.eps, limit=n, block_size=n, batch_size=n, state_dir=state)
            ours_s = time.perf_counter() - t0
            flags = load_file(os.path.join(state, "rank0.safetensors"))["after.square"].bool()
        t0 = time.perf_counter()
        _, y_adv = AutoAttack(model, norm="Linf", eps=args.eps, version="standard", seed=0).run_standard_evaluation(
            x, y, batch_size=n)
        ref_s = time.perf_counter() - t0
        ref_flags = y_adv == y
        pairs.append({"ours_s": ours_s, "reference_s": ref_s, "ratio": ours_s / ref_s,
                      "ours_robust": ours["correct"], "reference_robust": int(ref_flags.sum()),
                      "points_differing": int((flags != ref_flags).sum()),
                      "per_attack": {a: {k: r[k] for k in ("attacked", "robust", "time_s")}
                                     for a, r in ours["per_attack"].items()}})
    ratios = [q["ratio"] for q in pairs]
    summary = {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)}
    print(f"AutoAttack standard, L-inf eps {args.eps}, cnn3-w32, {n} MNIST test points, 1 rank, "
          f"{args.threads} thread(s), clean {ours['clean']['correct']}/{n}")
    print("| pair | ours s | pyautoattack s | ours / pyautoattack | robust ours / ref | points differing |")
    print("|---|---|---|---|---|---|")
    for i, q in enumerate(pairs):
        print(f"| {i} | {q['ours_s']:.1f} | {q['reference_s']:.1f} | {q['ratio']:.2f} | "
              f"{q['ours_robust']} / {q['reference_robust']} | {q['points_differing']} |")
    print(f"median ratio {summary['median_ratio']:.2f} "
          f"(min {summary['min_ratio']:.2f}, max {summary['max_ratio']:.2f})")
    out = Path(__file__).parent / "results" / "autoattack.json"
    out.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "machine": platform.node(),
                               "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "threads": args.threads, "torch": torch.__version__, "eps": args.eps, "n": n,
                               "pairs": pairs, **summary}, indent=1))


if __name__ == "__main__":
    main()

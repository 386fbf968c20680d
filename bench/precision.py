"""bf16 against fp32 on this CPU, each pair timed interleaved (A B A B ..., same batch, same process,
warm-up excluded): the median of the per-round ratios and their spread.

    .venv/bin/python bench/precision.py [--repeats 15] [--batch 128] [--threads 2]

Rows, for cnn3, resnet_small and preact_resnet18 on 3x32x32 inputs (timing only, so random images):
  PGD-10 attack       our pgd(precision="bf16") / pgd(precision="fp32"), eager steps
  clean training step a forward + backward + SGD step under torch.autocast("cpu", bfloat16) / fp32
                      (a probe: the engine's train.precision does not exist yet)
Writes bench/results/precision.json with the command, machine, threads and torch version.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved  # noqa: E402
from dist_robust.attacks import pgd  # noqa: E402
from dist_robust.models import build_model  # noqa: E402

MODELS = ("cnn3", "resnet_small", "preact_resnet18")
EPS = 8 / 255


def training_step(model, opt, x, y, bf16: bool):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, 3, 10, [0.5] * 3, [0.25] * 3)
        x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        model.eval()
        attack = interleaved({p: (lambda p=p: pgd(model, x, y, EPS, 10, precision=p)) for p in ("fp32", "bf16")},
                             args.repeats)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
        train = interleaved({p: training_step(model, opt, x, y, p == "bf16") for p in ("fp32", "bf16")},
                            args.repeats)
        for row, res in (("PGD-10 attack", attack), ("clean training step", train)):
            rows.append({"model": name, "row": row, "fp32_s": res["fp32"]["median_s"],
                         "bf16_s": res["bf16"]["median_s"], "bf16/fp32": res["bf16"]["ratio"],
                         "min": res["bf16"]["ratio_min"], "max": res["bf16"]["ratio_max"]})
            r = rows[-1]
            print(f"{name:16s} {row:20s} fp32 {r['fp32_s'] * 1e3:8.1f} ms  bf16/fp32 {r['bf16/fp32']:.2f} "
                  f"[{r['min']:.2f}, {r['max']:.2f}]", flush=True)
    out = Path(__file__).resolve().parent / "results" / "precision.json"
    out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "machine": platform.processor()
                               or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
                               "batch": args.batch, "repeats": args.repeats, "torch": torch.__version__,
                               "rows": rows}, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

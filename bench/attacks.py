"""Attack engine figures, each against a reference timed in the same process.

    .venv/bin/python bench/attacks.py [--batches 64,256] [--widths 32,64] [--repeats 10]

For each model size (cnn3 at two widths) and batch size, on real MNIST with a model trained here:
  PGD step / clean training step      (target <= 0.75; bound ~0.67)
  our PGD-10 / torchattacks PGD-10    (eager and fused; target <= 0.7 at equal accuracy)
  fused / eager PGD step              (compile pays where < 1)
(AutoAttack against fra31's reference: bench/autoattack.py.)
Medians over repeats after warm-up (compilation excluded and reported apart), with min and max.
Writes bench/results/attacks.json with the command, machine, threads and torch version.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchattacks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed  # noqa: E402
from dist_robust.attacks import pgd  # noqa: E402
from dist_robust.data import load_dataset  # noqa: E402
from dist_robust.models import build_model  # noqa: E402

EPS, ALPHA = 0.1, 0.025




def trained_cnn3(width: int, train, seconds_budget_images: int = 10000):
    """cnn3 trained for one pass over 10k MNIST images: a realistic, non-robust model."""
    torch.manual_seed(0)
    model = build_model("cnn3", 1, 10, train.info.mean, train.info.std, width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(0, seconds_budget_images, 128):
        x, y = train.images[i:i + 128].float() / 255, train.labels[i:i + 128]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def bench_pgd(model, x, y, repeats: int) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def clean_step():
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.eval()

    t0 = time.perf_counter()
    pgd(model, x, y, EPS, 1, step_size=ALPHA, compile="on")  # compiles (cached per model and settings)
    compile_s = time.perf_counter() - t0
    ref = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=10, random_start=True)
    r = {"clean_step": timed(clean_step, repeats),
         "pgd_step_eager": timed(lambda: pgd(model, x, y, EPS, 1, step_size=ALPHA, compile="off"), repeats),
         "pgd_step_fused": timed(lambda: pgd(model, x, y, EPS, 1, step_size=ALPHA, compile="on"), repeats),
         "pgd10_eager": timed(lambda: pgd(model, x, y, EPS, 10, step_size=ALPHA, compile="off"), repeats),
         "pgd10_fused": timed(lambda: pgd(model, x, y, EPS, 10, step_size=ALPHA, compile="on"), repeats),
         "pgd10_torchattacks": timed(lambda: ref(x, y), repeats), "compile_s": compile_s}
    torch.manual_seed(1)
    r["acc_pgd10_ours"] = accuracy(model, pgd(model, x, y, EPS, 10, step_size=ALPHA, compile="on"), y)
    torch.manual_seed(1)
    r["acc_pgd10_torchattacks"] = accuracy(model, ref(x, y), y)
    m = lambda k: r[k]["median_s"]
    r["ratios"] = {"pgd_step/clean_step": m("pgd_step_eager") / m("clean_step"),
                   "fused_pgd_step/clean_step": m("pgd_step_fused") / m("clean_step"),
                   "pgd10_eager/torchattacks": m("pgd10_eager") / m("pgd10_torchattacks"),
                   "pgd10_fused/torchattacks": m("pgd10_fused") / m("pgd10_torchattacks"),
                   "fused/eager_step": m("pgd_step_fused") / m("pgd_step_eager")}
    return r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="64,256")
    p.add_argument("--widths", default="32,64")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    rows = []
    for width in map(int, args.widths.split(",")):
        model = trained_cnn3(width, train)
        for batch in map(int, args.batches.split(",")):
            x, y = test.images[:batch].float() / 255, test.labels[:batch]
            rows.append({"model": f"cnn3-w{width}", "params": sum(p.numel() for p in model.parameters()),
                         "batch": batch, **bench_pgd(model, x, y, args.repeats)})

    print("| model | params | batch | clean step ms | PGD step / clean | fused step / clean | fused / eager "
          "| PGD-10 eager / ta | PGD-10 fused / ta | acc ours / ta (%) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["ratios"]
        print(f"| {r['model']} | {r['params']:,} | {r['batch']} | {1e3 * r['clean_step']['median_s']:.1f} | "
              f"{q['pgd_step/clean_step']:.2f} | {q['fused_pgd_step/clean_step']:.2f} | {q['fused/eager_step']:.2f} | "
              f"{q['pgd10_eager/torchattacks']:.2f} | {q['pgd10_fused/torchattacks']:.2f} | "
              f"{100 * r['acc_pgd10_ours']:.1f} / {100 * r['acc_pgd10_torchattacks']:.1f} | {r['compile_s']:.0f} |")
    out = Path(__file__).parent / "results" / "attacks.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "machine": platform.node(),
                               "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "threads": args.threads, "torch": torch.__version__, "eps": EPS, "alpha": ALPHA,
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

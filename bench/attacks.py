"""Attack engine figures, each against a reference timed in the same process.

    .venv/bin/python bench/attacks.py [--batches 64,256] [--widths 32,64] [--repeats 10]

For each model size (cnn3 at two widths) and batch size, on real MNIST with a model trained here:
  PGD step / clean training step      (eager with and without the folded eval-mode BN, fused; bound ~0.67)
  folded / unfolded                   the eager fp32 PGD step and PGD-10 with pgd()'s fold_bn (the
                                       default) against fold_bn=False (attacks/folded_bn.py; bitwise the
                                       same x_adv, checked here; bf16 is not folded)
  our PGD-10 / torchattacks PGD-10    (fp32 eager folded and unfolded, bf16 eager, fp32 fused; target <= 0.7
                                       at equal accuracy), with every variant's robust accuracy on the same
                                       points
(AutoAttack against fra31's reference: bench/autoattack.py.)
Each comparison is timed interleaved (reference, A, B, reference, A, B ..., same batch and process,
warm-up and compilation excluded): the median of the per-round ratios with their min and max.
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
from timing import interleaved, pair_ratio  # noqa: E402

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
    ours = {"eager": dict(compile="off"), "eager_unfolded": dict(compile="off", fold_bn=False),
            "bf16": dict(compile="off", precision="bf16"), "fused": dict(compile="on")}
    # Two interleaved measurements, each against its reference: the steps against a clean training step,
    # our PGD-10 variants against torchattacks'. Folded against unfolded: the pairs' per-round ratios.
    steps = interleaved({"clean_step": clean_step,
                         "pgd_step_eager": lambda: pgd(model, x, y, EPS, 1, step_size=ALPHA, compile="off"),
                         "pgd_step_unfolded": lambda: pgd(model, x, y, EPS, 1, step_size=ALPHA, compile="off",
                                                          fold_bn=False),
                         "pgd_step_fused": lambda: pgd(model, x, y, EPS, 1, step_size=ALPHA, compile="on")}, repeats)
    pgd10 = interleaved({"torchattacks": lambda: ref(x, y),
                         **{k: (lambda kw=kw: pgd(model, x, y, EPS, 10, step_size=ALPHA, **kw)) for k, kw in ours.items()}},
                        repeats)
    r = {"clean_step_s": steps["clean_step"]["median_s"], "compile_s": compile_s, "ratios": {}}
    for k in ("pgd_step_eager", "pgd_step_unfolded", "pgd_step_fused"):
        r["ratios"][f"{k}/clean_step"] = _ratio(steps[k])
    for k in ours:
        r["ratios"][f"pgd10_{k}/torchattacks"] = _ratio(pgd10[k])
    r["ratios"]["pgd_step_folded/unfolded"] = pair_ratio(steps, "pgd_step_unfolded", "pgd_step_eager")
    r["ratios"]["pgd10_folded/unfolded"] = pair_ratio(pgd10, "eager_unfolded", "eager")
    torch.manual_seed(1)
    r["acc_pgd10_torchattacks"] = accuracy(model, ref(x, y), y)
    adv = {}
    for k, kw in ours.items():
        torch.manual_seed(1)
        adv[k] = pgd(model, x, y, EPS, 10, step_size=ALPHA, **kw)
        r[f"acc_pgd10_{k}"] = accuracy(model, adv[k], y)
    r["folded_bitwise_equal"] = torch.equal(adv["eager"], adv["eager_unfolded"])
    return r


def _ratio(res: dict) -> dict:
    return {"median": res["ratio"], "min": res["ratio_min"], "max": res["ratio_max"]}


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

    fmt = lambda q: f"{q['median']:.2f} [{q['min']:.2f}, {q['max']:.2f}]"
    print("| model | params | batch | clean step ms | PGD step / clean | unfolded step / clean | fused step / clean "
          "| step folded / unfolded | PGD-10 folded / unfolded | PGD-10 eager / ta | unfolded / ta "
          "| bf16 / ta | fused / ta | robust %: ta / eager / bf16 / fused | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["ratios"]
        accs = " / ".join(f"{100 * r[f'acc_pgd10_{k}']:.1f}" for k in ("torchattacks", "eager", "bf16", "fused"))
        print(f"| {r['model']} | {r['params']:,} | {r['batch']} | {1e3 * r['clean_step_s']:.1f} | "
              f"{fmt(q['pgd_step_eager/clean_step'])} | {fmt(q['pgd_step_unfolded/clean_step'])} | "
              f"{fmt(q['pgd_step_fused/clean_step'])} | {fmt(q['pgd_step_folded/unfolded'])} | "
              f"{fmt(q['pgd10_folded/unfolded'])} | "
              f"{fmt(q['pgd10_eager/torchattacks'])} | {fmt(q['pgd10_eager_unfolded/torchattacks'])} | "
              f"{fmt(q['pgd10_bf16/torchattacks'])} | {fmt(q['pgd10_fused/torchattacks'])} | {accs} | "
              f"{r['compile_s']:.0f} |")
    out = Path(__file__).parent / "results" / "attacks.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "machine": platform.node(),
                               "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "threads": args.threads, "torch": torch.__version__, "eps": EPS, "alpha": ALPHA,
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

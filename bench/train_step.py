"""Cost of an adversarial training step against the bound, in one run on one machine.

    .venv/bin/python bench/train_step.py [--models cnn3,resnet_small] [--batch 128] [--steps 5] [--repeats 15]

For each model: a clean training step (fwd + bwd + SGD), one PGD step (fwd + input-gradient bwd), and a
PGD-k adversarial training step (k PGD steps + a training step), all on the same batch. Reported:
  attack step cost = PGD step / clean step           (bound ~0.67: input-only gradients skip weight grads)
  AT step overhead = AT step / ((2k+3)/3 x clean)   (target <= 1.1)
  TWINS-AT step / PGD-AT step at the same k          (target <= 1.1): both through the method classes,
                                                      on the same batch, model and optimiser settings
Medians over repeats after warm-up, with min and max. Writes bench/results/train_step.json.
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
from timing import timed  # noqa: E402
from dist_robust.attacks import pgd  # noqa: E402
from dist_robust.config import load_config  # noqa: E402
from dist_robust.methods import build_method  # noqa: E402
from dist_robust.models import build_model  # noqa: E402
from dist_robust.models.partial import configure_finetuning  # noqa: E402




def bench_model(name: str, batch: int, k: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(name, 1, 10, [0.5], [0.25])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def clean_step(inputs=x):
        model.train()
        loss = F.cross_entropy(model(inputs), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def pgd_step():
        pgd(model, x, y, 0.1, 1, compile="off")

    def at_step():
        clean_step(pgd(model, x, y, 0.1, k, compile="off"))

    clean, one_pgd, at = (timed(f, repeats) for f in (clean_step, pgd_step, at_step))
    return {"model": name, "batch": batch, "k": k, "clean_step": clean, "pgd_step": one_pgd, "at_step": at,
            "attack_step_cost": one_pgd["median_s"] / clean["median_s"],
            "at_step_overhead": at["median_s"] / ((2 * k + 3) / 3 * clean["median_s"])}


def bench_twins(name: str, batch: int, k: int, repeats: int) -> dict:
    """One training step of each method (attack + forward + backward + SGD) on the same batch."""
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    steps = {}
    for method in ("pgd_at", "twins_at"):
        cfg = load_config(None, [f"model.name={name}", "attack.eps=0.1", f"attack.steps={k}", "attack.compile=off"])
        cfg.method.name = method  # set after validation: a TWINS run needs a source (model.init_from), a step does not
        torch.manual_seed(0)
        m = build_method(cfg)
        model = m.prepare(configure_finetuning(build_model(name, 1, 10, [0.5], [0.25]),
                                               tuned_bn="dual" if m.uses_dual_bn else "train"))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, m=m, opt=opt):
            model.train()
            loss, _ = m.loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps[method] = timed(step, repeats)
    return {"model": name, "batch": batch, "k": k, **steps,
            "twins_at/pgd_at": steps["twins_at"]["median_s"] / steps["pgd_at"]["median_s"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="cnn3,resnet_small")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench_model(m, args.batch, args.steps, args.repeats) for m in args.models.split(",")]
    print(f"| model | batch | clean step ms | PGD step ms | PGD-{args.steps} AT step ms | attack step cost | AT overhead |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {1e3 * r['clean_step']['median_s']:.1f} | "
              f"{1e3 * r['pgd_step']['median_s']:.1f} | {1e3 * r['at_step']['median_s']:.1f} | "
              f"{r['attack_step_cost']:.2f} | {r['at_step_overhead']:.2f} |")
    twins = [bench_twins(m, args.batch, args.steps, args.repeats) for m in args.models.split(",")]
    print(f"\n| model | batch | PGD-{args.steps} AT step ms | TWINS-AT step ms | TWINS-AT / PGD-AT |")
    print("|---|---|---|---|---|")
    for r in twins:
        print(f"| {r['model']} | {r['batch']} | {1e3 * r['pgd_at']['median_s']:.1f} | "
              f"{1e3 * r['twins_at']['median_s']:.1f} | {r['twins_at/pgd_at']:.2f} |")
    out = Path(__file__).parent / "results" / "train_step.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "machine": platform.node(),
                               "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                               "rows": rows, "twins": twins}, indent=1))


if __name__ == "__main__":
    main()

"""Host syncs of the training loop and of evaluation's seeded random starts: the code as it was against
the code as it is, timed interleaved (A B C A B C ..., one process, the same inputs, warm-up excluded):
the median of the per-round ratios to the old code, with their min and max.

    .venv/bin/python bench/host_syncs.py [--repeats 30] [--threads 2] [--device cpu|cuda] [--log-every 20]

Rows:
  training window    ``--log-every`` training steps of cnn3 (width 16, batch 64, 1x28x28 random images; the
                     engine's method and DDP engine, one rank in a 1-rank gloo group so that step_flags'
                     all_reduce runs), then the log step's read of the running sums. ``old``: each step's
                     metrics summed on the host (``.double().cpu()``, a device-to-host copy per metric per
                     step); ``new``: summed on the device and read once per window (engine/train.py now);
                     ``no_flags``: ``new`` without step_flags, i.e. what the one sync per step that stays
                     (the non-finite-loss and stop flags, read before the optimizer step) costs. Methods:
                     standard and pgd_at (attack.steps=1).
  step_flags alone   its time per call in the 1-rank gloo group (median; more ranks add the collective's
                     latency and the wait for the slowest rank, which DDP's gradient all_reduce waits anyway).
  seeded starts      evaluate._seeded_starts for one batch: ``old`` one generator reseeded and one copy to
                     the batch's device per point (the construction it replaced, below), ``new`` the same
                     draws on the CPU and one copy per batch. Bitwise equal (checked here and in
                     tests/test_seeded_starts.py).
On the CPU a "device-to-host copy" is a no-op: the rows measure what is left of these costs there; the
gain they were made for is on CUDA, where each one waits for the device (``--device cuda`` when lent one).
Writes bench/results/host_syncs.json with the command, machine, threads and torch version.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved, timed  # noqa: E402

from dist_robust.attacks import random_start  # noqa: E402
from dist_robust.config import load_config  # noqa: E402
from dist_robust.engine.train import DDPTrainer, host_totals, step_flags, training_form  # noqa: E402
from dist_robust.evaluate import _seeded_starts  # noqa: E402
from dist_robust.methods import build_method  # noqa: E402
from dist_robust.models import build_model  # noqa: E402


def old_seeded_starts(x, first_index, seed, restart, eps, norm):
    """evaluate._seeded_starts as it was: a generator reseeded and a copy to x's device per point."""
    g = torch.Generator()
    starts = []
    for i in range(len(x)):
        g.manual_seed((seed * 1_000_003 + restart) * 1_000_000_007 + first_index + i)
        starts.append(random_start(x[i:i + 1], eps, norm, generator=g))
    return torch.cat(starts)


def training_window(method: str, device: torch.device, log_every: int):
    """(old, new, no_flags): each runs ``log_every`` training steps and the log step's read of the sums."""
    cfg = load_config(None, ["model.name=cnn3", f"method.name={method}", "attack.eps=0.1", "attack.steps=1",
                             "attack.compile=off"], training=False)
    torch.manual_seed(0)
    m = build_method(cfg)
    model = training_form(cfg, build_model("cnn3", 1, 10, [0.5], [0.25], width=16), m, device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    trainer = DDPTrainer(model, opt, device, cfg.train)
    x, y = torch.rand(64, 1, 28, 28, device=device), torch.randint(0, 10, (64,), device=device)

    def window(on_host: bool, flags: bool):
        def run():
            model.train()
            totals = {}
            for _ in range(log_every):
                loss, metrics = m.loss(trainer.model, x, y)
                if flags:
                    bad, _ = step_flags(loss, None)
                    assert not bad
                trainer.step(loss)
                for name, value in metrics.items():
                    value = value.detach().double()
                    totals[name] = totals.get(name, 0.0) + (value.cpu() if on_host else value)
            sums = host_totals(totals)  # the log step's read (the old loop: one float() per metric)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return sums
        return run
    return {"old": window(True, True), "new": window(False, True), "no_flags": window(False, False)}


def ratio(res: dict, name: str) -> dict:
    return {"median": res[name]["ratio"], "min": res[name]["ratio_min"], "max": res[name]["ratio_max"]}


def fmt(q: dict) -> str:
    return f"{q['median']:.3f} [{q['min']:.3f}, {q['max']:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log-every", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:  # a 1-rank group: step_flags' all_reduce is a real collective
        tdist.init_process_group("gloo" if device.type == "cpu" else "cpu:gloo,cuda:nccl",
                                 init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            rows = []
            for method in ("standard", "pgd_at"):
                res = interleaved(training_window(method, device, args.log_every), args.repeats)
                row = {"row": f"training window ({args.log_every} steps)", "method": method,
                       "old_s": res["old"]["median_s"], "new/old": ratio(res, "new"),
                       "no_flags/old": ratio(res, "no_flags")}
                rows.append(row)
                print(f"{row['row']} {method:8s} old {1e3 * row['old_s']:7.1f} ms  new/old {fmt(row['new/old'])}  "
                      f"no_flags/old {fmt(row['no_flags/old'])}", flush=True)
            loss = torch.tensor(1.5, device=device, requires_grad=True) * 2
            alone = timed(lambda: step_flags(loss, None), 20 * args.repeats, warmup=20)
            rows.append({"row": "step_flags alone (1-rank gloo group)", "median_us": 1e6 * alone["median_s"],
                         "min_us": 1e6 * alone["min_s"], "max_us": 1e6 * alone["max_s"]})
            print(f"step_flags alone: {1e6 * alone['median_s']:.1f} us per step (median of {20 * args.repeats})")
        finally:
            tdist.destroy_process_group()
    for shape in [(256, 1, 28, 28), (128, 3, 32, 32)]:
        for norm, eps in (("Linf", 0.1), ("L2", 0.5)):
            x = torch.rand(shape, device=device)
            assert torch.equal(old_seeded_starts(x, 7, 0, 1, eps, norm), _seeded_starts(x, 7, 0, 1, eps, norm))
            res = interleaved({"old": lambda x=x, eps=eps, norm=norm: old_seeded_starts(x, 7, 0, 1, eps, norm),
                               "new": lambda x=x, eps=eps, norm=norm: _seeded_starts(x, 7, 0, 1, eps, norm)},
                              args.repeats)
            row = {"row": "seeded starts", "batch": list(shape), "norm": norm, "old_s": res["old"]["median_s"],
                   "new/old": ratio(res, "new"), "bitwise_equal": True}
            rows.append(row)
            print(f"seeded starts {str(shape):17s} {norm:4s} old {1e3 * row['old_s']:6.2f} ms  "
                  f"new/old {fmt(row['new/old'])}", flush=True)
    out = Path(__file__).resolve().parent / "results" / "host_syncs.json"
    out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "machine": platform.node(),
                               "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "threads": args.threads, "device": str(device), "torch": torch.__version__,
                               "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

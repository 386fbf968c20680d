"""The engine's training steps in fp32, bf16 and compiled, each row's variants timed interleaved (A B C A B
C ..., same batch, same process, warm-up and compilation excluded): the median of the per-round ratios to
fp32 eager, and their spread.

    .venv/bin/python bench/precision.py [--repeats 10] [--batch 128] [--threads 2] [--models cnn3,...]
        [--rows 'clean step,PGD-5 AT / bound,...']

Rows, for cnn3, resnet_small and preact_resnet18 on 3x32x32 inputs (timing only, so random images),
each step built as the engine builds it (the method's loss under train.precision's autocast, the
DDP engine's step on one rank):
  clean step      method standard
  PGD step        one step of pgd() (forward + input-gradient backward), the attack alone
  PGD-5 AT step   method pgd_at, attack.steps=5
  TWINS-AT step   method twins_at, attack.steps=5 (two BN wings)
Variants: fp32 (eager, the reference), bf16 (train.precision and attack.precision bf16), compiled
(train.compile, the training forward; the PGD step row compiles the fused attack step instead) and
channels_last (train.channels_last and attack.channels_last).
Also the PGD-5 AT step against the (2k+3)/3 bound: AT step / (13/3 x clean step), fp32 eager, from the
ratios of one interleaved measurement of the two; and PGD-10 in fp32 and bf16 against torchattacks'
fp32 PGD-10. ``--rows`` picks rows; bench/results/precision.json keeps the rows of earlier calls.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved  # noqa: E402

from dist_robust.attacks import pgd  # noqa: E402
from dist_robust.config import load_config  # noqa: E402
from dist_robust.engine.train import DDPTrainer, training_form  # noqa: E402
from dist_robust.methods import build_method  # noqa: E402
from dist_robust.models import build_model  # noqa: E402
from dist_robust.utils import autocast  # noqa: E402

MODELS = ("cnn3", "resnet_small", "preact_resnet18")
EPS, K = 8 / 255, 5
METHOD_ROWS = {"clean step": "standard", "PGD-5 AT step": "pgd_at", "TWINS-AT step": "twins_at"}
VARIANTS = {"fp32": [], "bf16": ["train.precision=bf16", "attack.precision=bf16"], "compiled": ["train.compile=true"],
            "channels_last": ["train.channels_last=true", "attack.channels_last=true"]}


def engine_step(model_name: str, method: str, overrides: list, x, y, device: str = "cpu"):
    """One training step of ``method`` as train_one_epoch takes it (on one rank: no DDP wrapper)."""
    cfg = load_config(None, [f"model.name={model_name}", f"method.name={method}", f"attack.eps={EPS}",
                             f"attack.steps={K}", "attack.compile=off", *overrides], training=False)
    torch.manual_seed(0)
    m = build_method(cfg)
    c = x.shape[1]
    model = training_form(cfg, build_model(model_name, c, 10, [0.5] * c, [0.25] * c), m, torch.device(device))
    if cfg.train.channels_last:  # as engine.setup and train_one_epoch do
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    trainer = DDPTrainer(model, opt, torch.device(device), cfg.train)
    if cfg.train.compile:
        trainer.model = torch.compile(trainer.model)

    def step():
        model.train()
        with autocast(cfg.train.precision, x.device.type):
            loss, _ = m.loss(trainer.model, x, y)
        trainer.step(loss)
        if x.is_cuda:  # the time of the work, not of its launch
            torch.cuda.synchronize()
    return step


def attack_step(model_name: str, variant: str, x, y):
    torch.manual_seed(0)
    model = build_model(model_name, 3, 10, [0.5] * 3, [0.25] * 3).eval()
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return lambda: pgd(model, x, y, EPS, 1, precision="bf16" if variant == "bf16" else "fp32",
                       compile="on" if variant == "compiled" else "off", channels_last=variant == "channels_last")


def first_calls(variants: dict) -> dict:
    """Call each variant once (compilation happens here) and return how long that took."""
    out = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - t0
    return out


def variant_rows(name: str, row: str, x, y, repeats: int) -> dict:
    """One row of the table: its fp32 eager step against each other variant."""
    variants = {v: (attack_step(name, v, x, y) if row == "PGD step" else
                    engine_step(name, METHOD_ROWS[row], extra, x, y)) for v, extra in VARIANTS.items()}
    first = first_calls(variants)
    res = interleaved(variants, repeats, warmup=1)  # after first_calls: compiled, warm
    r = {"fp32_s": res["fp32"]["median_s"], "first_call_s": first}
    for v in list(VARIANTS)[1:]:
        r[v] = {k: res[v][k] for k in ("ratio", "ratio_min", "ratio_max")}
    print(f"{name:16s} {row:14s} fp32 {r['fp32_s'] * 1e3:8.1f} ms  " + "  ".join(
        f"{v}/fp32 {r[v]['ratio']:.2f} [{r[v]['ratio_min']:.2f}, {r[v]['ratio_max']:.2f}]"
        for v in list(VARIANTS)[1:]), flush=True)
    return r


def bound_row(name: str, x, y, repeats: int) -> dict:
    """The PGD-5 AT step against (2k+3)/3 clean steps, fp32 eager, from one interleaved measurement."""
    pair = interleaved({"clean": engine_step(name, "standard", [], x, y),
                        "at": engine_step(name, "pgd_at", [], x, y)}, repeats)
    bound = (2 * K + 3) / 3
    r = {"k": K, "at/clean": pair["at"]["ratio"], "bound": bound, "at/bound": pair["at"]["ratio"] / bound,
         "min": pair["at"]["ratio_min"] / bound, "max": pair["at"]["ratio_max"] / bound}
    print(f"{name:16s} PGD-5 AT / ((2k+3)/3 x clean) {r['at/bound']:.2f} [{r['min']:.2f}, {r['max']:.2f}]",
          flush=True)
    return r


def torchattacks_row(name: str, x, y, repeats: int) -> dict:
    """PGD-10 (eps 8/255, step 2/255, random start): our eager fp32 and bf16 against torchattacks' fp32,
    with the points each leaves robust (a random model: the counts compare the attacks, nothing more)."""
    import torchattacks
    torch.manual_seed(0)
    model = build_model(name, 3, 10, [0.5] * 3, [0.25] * 3).eval()
    ref = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=10, random_start=True)
    ours = {p: (lambda p=p: pgd(model, x, y, EPS, 10, step_size=2 / 255, precision=p)) for p in ("fp32", "bf16")}
    res = interleaved({"torchattacks": lambda: ref(x, y), **ours}, repeats, warmup=1)
    r = {"torchattacks_s": res["torchattacks"]["median_s"]}
    for p, fn in [("torchattacks", lambda: ref(x, y)), *ours.items()]:
        torch.manual_seed(1)
        adv = fn()
        with torch.no_grad():
            r[f"robust_{p}"] = int((model(adv).argmax(1) == y).sum())
        if p != "torchattacks":
            r[p] = {k: res[p][k] for k in ("ratio", "ratio_min", "ratio_max")}
    print(f"{name:16s} PGD-10 / torchattacks: fp32 {r['fp32']['ratio']:.2f}, bf16 {r['bf16']['ratio']:.2f}; robust "
          f"{r['robust_torchattacks']} / {r['robust_fp32']} / {r['robust_bf16']} of {len(y)}", flush=True)
    return r


ROWS = ("clean step", "PGD step", "PGD-5 AT step", "TWINS-AT step", "PGD-5 AT / bound", "PGD-10 / torchattacks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated, of: " + ", ".join(ROWS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    here = {"command": " ".join(["python", *sys.argv]), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": args.threads, "batch": args.batch, "repeats": args.repeats,
            "torch": torch.__version__}
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        for row in args.rows.split(","):
            if row == "PGD-5 AT / bound":
                r = bound_row(name, x, y, args.repeats)
            elif row == "PGD-10 / torchattacks":
                r = torchattacks_row(name, x, y, args.repeats)
            else:
                r = variant_rows(name, row, x, y, args.repeats)
            rows.append({"model": name, "row": row, **r, **here})
    # rows measured by an earlier call (other --models or --rows) are kept, each with its own command
    out = Path(__file__).resolve().parent / "results" / "precision.json"
    done = {(r["model"], r["row"]) for r in rows}
    old = json.loads(out.read_text())["rows"] if out.is_file() else []
    out.write_text(json.dumps({"rows": [r for r in old if (r["model"], r["row"]) not in done] + rows}, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

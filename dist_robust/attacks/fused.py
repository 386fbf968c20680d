"""One PGD step (forward, input-gradient backward, ascent, projection, clamp), eager or fused.

The fused step is the same function captured whole by ``torch.compile`` (inductor: C++ on the CPU,
Triton on CUDA). The gradient is taken with ``torch.func.grad`` rather than ``torch.autograd.grad``
so that the backward is traced into the same graph as the forward and the update. Shapes are kept
fixed: in eval-mode BN a smaller batch (the last one of an evaluation) is padded to the compiled
size, so it never triggers a new compilation; in train-mode BN the batch statistics would change,
so a new shape compiles anew instead.

``compile``: ``on``, ``off`` or ``auto`` (on where it was measured to pay, see ``COMPILE_AUTO``).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from ..utils import autocast
from .folded_bn import FoldedBatchNorm
from .steps import ascend, attack_loss

# compile=auto: measured by bench/attacks.py (see docs/evaluation.md). On the 2-core CPU here the fused step ran
# at 0.71-0.87x the eager time (cnn3, widths 32/64, batches 64/256), but its first compilation costs
# 20-25 s per process, repaid after ~200 (large model and batch) to ~3,500 (the demo's) steps; auto
# therefore compiles on CUDA and stays eager on the CPU, where compile=on is for long runs.
COMPILE_AUTO = {"cuda": True, "cpu": False}

_compiled: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _raw_step(net, loss, norm, targeted, kappa, precision):
    def step(x, delta, y, clean_lp, eps: float, alpha: float):
        def total(d):
            with autocast(precision, x.device.type):
                value = attack_loss(loss, net, x + d, y, targeted, clean_lp, kappa)
            return value.float().sum()
        grad = torch.func.grad(total)(delta)
        return ascend(x, delta, grad, eps, alpha, norm)
    return step


def eager_step(net, loss, norm, targeted, kappa, precision, fold_bn: bool = False):
    """The step in eager mode; ``fold_bn``: eval-mode BN layers take the folded backward (folded_bn.py),
    bitwise the same gradient."""
    folding = FoldedBatchNorm() if fold_bn else contextlib.nullcontext()

    def step(x, delta, y, clean_lp, eps: float, alpha: float):
        delta = delta.detach().requires_grad_(True)
        with autocast(precision, x.device.type), folding:
            value = attack_loss(loss, net, x + delta, y, targeted, clean_lp, kappa)
        (grad,) = torch.autograd.grad(value.float().sum(), delta)
        with torch.no_grad():
            return ascend(x, delta.detach(), grad, eps, alpha, norm)
    return step


def _padded(fn, pad_ok: bool):
    """Run ``fn`` at the largest batch size seen so far, padding smaller batches with copies of
    their first row (eval-mode BN: rows do not interact) and slicing the result."""
    size = {"n": 0}

    def step(x, delta, y, clean_lp, eps, alpha):
        n = len(x)
        size["n"] = max(size["n"], n)
        if not pad_ok or n == size["n"]:
            return fn(x, delta, y, clean_lp, eps, alpha)
        idx = torch.cat([torch.arange(n), torch.zeros(size["n"] - n, dtype=torch.long)]).to(x.device)
        lp = None if clean_lp is None else clean_lp[idx]
        yy = y[idx] if isinstance(y, torch.Tensor) and len(y) == n else y
        return fn(x[idx], delta[idx], yy, lp, eps, alpha)[:n]
    return step


COMPILE_MODES = ("on", "off", "auto")


def use_compile(mode: str, device_type: str) -> bool:
    if mode not in COMPILE_MODES:
        raise ValueError(f"attack.compile must be on, off or auto, got {mode!r}")
    return mode == "on" or (mode == "auto" and COMPILE_AUTO.get(device_type, False))


def make_step(net: nn.Module, loss, norm: str, targeted: bool, kappa: float, precision: str, mode: str,
              x: torch.Tensor, fold_bn: bool = False):
    """The step function for these settings; compiled ones are cached per model and settings.
    Custom (callable) losses always run eagerly: they may do anything. ``fold_bn`` applies to the eager
    step only (inductor compiles BN its own way)."""
    if callable(loss) or not use_compile(mode, x.device.type):
        return eager_step(net, loss, norm, targeted, kappa, precision, fold_bn)
    key = (loss, norm, targeted, kappa, precision, net.training)
    cache = _compiled.setdefault(net, {})
    if key not in cache:
        compiled = torch.compile(_raw_step(net, loss, norm, targeted, kappa, precision), dynamic=False)
        cache[key] = _padded(compiled, pad_ok=not net.training)
    return cache[key]

"""The PGD family: L-inf and L2, CE / CW / KL / custom losses, targeted or not, random starts and
restarts. FGSM with a random start (fast AT) is the one-step case. This is the one place attacks live.

The attack runs on the *unwrapped* model (never through DDP: a wrapped forward arms the reducer for a
backward that never comes) inside ``attack_mode``, which puts BN in eval mode (batch statistics must
not see adversarial batches), turns parameter gradients off, selects a BN branch where a model has
several, and restores all of it by construction, even when the attack raises. Gradients are taken
with respect to the perturbation only, so no weight-gradient work is done and no ``.grad`` is touched.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..dist import unwrap
from ..utils import PRECISIONS, autocast
from .folded_bn import has_batch_norm
from .fused import make_step
from .registry import EvalAttack, register
from .steps import LOSSES, LossFn, ascend, attack_loss, cw_margin, random_start  # noqa: F401 (re-exported)

NORMS = ("Linf", "L2")


# ---------------------------------------------------------------- attack mode

def _branch_modules(net: nn.Module) -> list[nn.Module]:
    """Modules with several BN branches expose ``bn_branches`` (allowed names) and ``bn_branch``."""
    return [m for m in net.modules() if hasattr(m, "bn_branches")]


@contextmanager
def attack_mode(model: nn.Module, bn_mode: str = "eval", bn_branch: Optional[str] = None) -> Iterator[nn.Module]:
    """Yield the unwrapped model ready to be attacked; restore every module's mode, every
    parameter's requires_grad flag and every BN branch on exit."""
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be eval or train, got {bn_mode!r}")
    net = unwrap(model)
    branched = _branch_modules(net) if bn_branch is not None else []
    if bn_branch is not None:
        if not branched:
            raise ValueError(f"bn_branch={bn_branch!r} but the model has no module with several BN branches")
        bad = [m for m in branched if bn_branch not in m.bn_branches]
        if bad:
            raise ValueError(f"bn_branch={bn_branch!r} is not one of {tuple(bad[0].bn_branches)}")
    modes = [(m, m.training) for m in net.modules()]
    flags = [(p, p.requires_grad) for p in net.parameters()]
    branches = [(m, m.bn_branch) for m in branched]
    try:
        net.train(bn_mode == "train")
        for p, _ in flags:
            p.requires_grad_(False)
        for m in branched:
            m.bn_branch = bn_branch
        yield net
    finally:
        for m, was_training in modes:
            m.training = was_training
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, branch in branches:
            m.bn_branch = branch


# ---------------------------------------------------------------- PGD

def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, *, norm: str = "Linf",
        loss: Union[str, LossFn] = "ce", step_size: Optional[float] = None, random_init: bool = True,
        restarts: int = 1, targeted: bool = False, bn_mode: str = "eval", bn_branch: Optional[str] = None,
        kappa: float = 0.0, delta0: Optional[torch.Tensor] = None, compile: str = "off",
        precision: str = "fp32", channels_last: bool = False, fold_bn: bool = True) -> torch.Tensor:
    """Projected gradient ascent of ``loss`` in the ``norm`` ball of radius ``eps`` around x, inside
    [0, 1]. Returns x + delta, detached. ``y``: true labels, or targets when ``targeted``.

    step_size: default eps / 4. restarts: with several, each point keeps its worst case (the
    restart that fools the model, else the one with the highest loss). delta0: the first restart's
    start (the evaluator seeds one per point); later restarts draw from torch's RNG.
    compile: off | on | auto (see fused.py). precision: fp32, or bf16 autocast (CPU, CUDA) / fp16 (CUDA).
    fold_bn: the eager step's eval-mode BN layers on the CPU take their input gradient as a per-channel
    scale, without the reductions torch's backward does for the weights (folded_bn.py): bitwise the same
    x_adv, cheaper steps; False runs torch's own BN backward.
    """
    _check_args(eps, steps, norm, restarts, precision, x)
    alpha = eps / 4 if step_size is None else step_size
    x = x.detach()
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    # autocast off around the whole attack (a bf16 training forward must not turn an fp32 attack into a
    # bf16 one); the steps switch it back on for their own forward when ``precision`` asks for it
    with attack_mode(model, bn_mode, bn_branch) as net, autocast("fp32", x.device.type):
        clean_lp = None
        if loss == "kl":
            with torch.no_grad():
                clean_lp = F.log_softmax(net(x), 1)
        step = make_step(net, loss, norm, targeted, kappa, precision, compile, x, fold_bn and has_batch_norm(net))
        best, best_loss, best_fooled = None, None, None
        for r in range(restarts):
            if r == 0 and delta0 is not None:
                delta = (x + delta0.to(x)).clamp(0, 1) - x
            elif random_init:
                delta = (x + random_start(x, eps, norm)).clamp(0, 1) - x
            elif loss == "kl":
                # TRADES' start: at x the KL to the clean prediction and its gradient are zero up to
                # rounding, so every restart starts a small Gaussian away, as the reference's one does
                delta = (x + 0.001 * torch.randn_like(x)).clamp(0, 1) - x
            else:
                delta = torch.zeros_like(x)
            for _ in range(steps):
                delta = step(x, delta, y, clean_lp, eps, alpha)
            if restarts == 1:
                return (x + delta).detach()
            best, best_loss, best_fooled = _keep_worst(net, x, delta, y, loss, targeted, clean_lp, kappa,
                                                       best, best_loss, best_fooled)
    return (x + best).detach()


def _keep_worst(net, x, delta, y, loss, targeted, clean_lp, kappa, best, best_loss, best_fooled):
    """Per-sample worst case over restarts: fooling beats not fooling, then the higher loss wins."""
    with torch.no_grad():
        value = attack_loss(loss, net, x + delta, y, targeted, clean_lp, kappa)
        if loss in ("ce", "cw"):
            pred = net(x + delta).argmax(1)
            fooled = pred == y if targeted else pred != y
        else:
            fooled = torch.zeros_like(value, dtype=torch.bool)
    if best is None:
        return delta, value, fooled
    take = (fooled & ~best_fooled) | ((fooled == best_fooled) & (value > best_loss))
    mask = take.view(-1, *[1] * (x.dim() - 1))
    return torch.where(mask, delta, best), torch.where(take, value, best_loss), best_fooled | fooled


def _check_args(eps, steps, norm, restarts, precision, x):
    if not (eps >= 0 and math.isfinite(eps)) or steps < 1 or restarts < 1:
        raise ValueError(f"PGD needs eps >= 0, steps >= 1 and restarts >= 1 "
                         f"(got eps={eps}, steps={steps}, restarts={restarts})")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r} (known: {', '.join(NORMS)})")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown attack precision {precision!r} (fp32, bf16 or fp16)")
    if precision == "fp16" and x.device.type != "cuda":  # CPU autocast is bf16 (fast with avx512_bf16 / AMX)
        raise ValueError("attack precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")


# ---------------------------------------------------------------- the evaluation attack (registry.py)

class PGDAttack(EvalAttack):
    """``pgd-K``: K steps of PGD on the CE loss, step eps / 4, from each point's seeded random start."""
    name, loss, about = "pgd", "ce", "CE PGD, K > 0 steps"

    @property
    def grammar(self):
        return f"{self.name}-K ({self.about})"

    def parse(self, name):
        head, _, steps = name.rpartition("-")
        return {"steps": int(steps)} if head == self.name and steps.isdecimal() and int(steps) > 0 else None

    def attack(self, model, x, y, settings, eps, norm, start, opts):
        return pgd(model, x, y, eps, settings["steps"], norm=norm, loss=self.loss, delta0=start, **opts)

    def record(self, settings, eps, norm, restarts, seed, opts):
        return {"eps": eps, "norm": norm, "steps": settings["steps"], "loss": self.loss, "step_size": eps / 4,
                "random_start": True, "restarts": restarts, "precision": opts.get("precision", "fp32"), "seed": seed}


register(PGDAttack())

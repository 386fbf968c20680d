"""L-inf PGD: the one place attacks live.

The attack runs on the *unwrapped* model (never through DDP: a wrapped forward arms the reducer for a
backward that never comes) inside ``attack_mode``, which puts BN in eval mode (batch statistics must
not see adversarial batches), turns parameter gradients off, and restores both by construction, even
when the attack raises. Gradients are taken with ``torch.autograd.grad`` with respect to the
perturbation only, so no weight-gradient work is done and no parameter ``.grad`` is touched.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..dist import unwrap


@contextmanager
def attack_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[nn.Module]:
    """Yield the unwrapped model ready to be attacked; restore every module's mode and every
    parameter's requires_grad flag on exit."""
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be eval or train, got {bn_mode!r}")
    net = unwrap(model)
    modes = [(m, m.training) for m in net.modules()]
    flags = [(p, p.requires_grad) for p in net.parameters()]
    try:
        net.train(bn_mode == "train")
        for p, _ in flags:
            p.requires_grad_(False)
        yield net
    finally:
        for m, was_training in modes:
            m.training = was_training
        for p, flag in flags:
            p.requires_grad_(flag)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
             step_size: Optional[float] = None, random_start: bool = True, bn_mode: str = "eval",
             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Untargeted L-inf PGD on cross-entropy. Returns x + delta with ||delta||_inf <= eps and
    x + delta in [0, 1], detached.

    noise: optional start in [-1, 1]^shape(x) (scaled by eps); the evaluator passes one seeded per
    point so results do not depend on how points are split over ranks. Default: torch's RNG.
    """
    if eps < 0 or steps < 1:
        raise ValueError(f"PGD needs eps >= 0 and steps >= 1 (got eps={eps}, steps={steps})")
    alpha = eps / 4 if step_size is None else step_size
    x = x.detach()
    if random_start:
        start = noise if noise is not None else torch.empty_like(x).uniform_(-1, 1)
        delta = (start * eps + x).clamp_(0, 1) - x
    else:
        delta = torch.zeros_like(x)
    with attack_mode(model, bn_mode) as net:
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(net(x + delta), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                # step, project onto the eps ball, then back into the [0, 1] box (in that order,
                # so the result is in both: the box clamp can only shrink |delta|).
                delta = (delta + alpha * grad.sign()).clamp_(-eps, eps)
                delta = (x + delta).clamp_(0, 1) - x
    return (x + delta).detach()

"""What one PGD step is made of: the per-sample losses an attack ascends, the random start, and the
projected ascent step. Both the eager loop (pgd.py) and the fused step (fused.py) build on these,
so neither imports the other's module for them."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("ce", "cw", "kl")
# A custom loss: loss_fn(net, x_adv, y) -> per-sample losses [B] to maximise (pretext tasks use it).
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- losses (per sample, to maximise)

def cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """max_{j != y} z_j - z_y (Carlini-Wagner margin), capped at kappa: positive once the point is
    fooled, and the attack stops pushing a point fooled with confidence kappa."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (other - true).clamp(max=kappa)


def attack_loss(kind: Union[str, LossFn], net: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
                targeted: bool = False, clean_log_probs: Optional[torch.Tensor] = None,
                kappa: float = 0.0) -> torch.Tensor:
    """Per-sample loss the attack ascends. Targeted attacks take y as the target and descend
    towards it (CE of the target, negated; CW margin of the target)."""
    if callable(kind):
        return kind(net, x_adv, y)
    logits = net(x_adv)
    if kind == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if targeted else ce
    if kind == "cw":
        margin = cw_margin(logits, y, kappa)
        return -margin if targeted else margin
    if kind == "kl":  # the TRADES adversary: KL(f(x) || f(x')), summed over classes
        return F.kl_div(F.log_softmax(logits, 1), clean_log_probs, reduction="none", log_target=True).sum(1)
    raise ValueError(f"unknown attack loss {kind!r} (known: {', '.join(LOSSES)} or a callable)")


# ---------------------------------------------------------------- geometry

def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


def random_start(x: torch.Tensor, eps: float, norm: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random initial perturbation: uniform in the L-inf ball; for L2 a uniformly random direction
    at a radius uniform in [0, eps] (torchattacks' and most papers' L2 start). Drawn on the CPU when a
    generator is given (the same numbers on every device)."""
    device = "cpu" if generator is not None else x.device
    if norm == "Linf":
        delta = torch.rand(x.shape, generator=generator, device=device) * 2 - 1
        delta = delta * eps
    else:
        delta = torch.randn(x.shape, generator=generator, device=device)
        radius = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator, device=device)
        delta = delta / _norms(delta).clamp_min(1e-12) * radius * eps
    return delta.to(x.device, x.dtype)


def ascend(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float,
           norm: str) -> torch.Tensor:
    """One projected ascent step: move along the sign (L-inf) or the normalised gradient (L2),
    project onto the eps ball, then into the [0, 1] box. The box clamp moves every coordinate
    towards x, so it can only shrink the perturbation: the result is in both sets."""
    if norm == "Linf":
        delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
    else:
        delta = delta + alpha * grad / _norms(grad).clamp_min(1e-12)
        delta = delta * (eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x

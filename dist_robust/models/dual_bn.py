"""TWINS' two-wing BatchNorm (Liu et al., CVPR 2023).

Each BN position holds two complete BN layers that share everything around them (convolutions, the
head) but nothing with each other:

- the **frozen wing** normalises with the pre-training running mean and variance, always, and never
  updates them (TWINS' ``FixBatchNorm2d``); its affine weight and bias are its own and trainable;
- the **adaptive wing** is an ordinary BN layer (batch statistics in training, running statistics
  updated; a ``SyncBatchNorm2d`` under ``model.sync_bn``).

``bn_branch`` selects the path for the whole model at once: ``frozen``, ``adaptive`` or ``split``
(first half of the local batch through the frozen wing, second half through the adaptive wing, the
outputs concatenated in that order). The split is per rank, so under DDP each rank halves its own
batch; only the adaptive wing synchronises, and it does so on every rank in the same order.
Converting a plain model duplicates each BN layer into both wings; ``export_plain`` gives the plain
model of the adaptive wing back (what TWINS evaluates), with the original state_dict keys.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .sync_bn import revert_sync_bn

BRANCHES = ("frozen", "adaptive", "split")


class FrozenStatsBatchNorm2d(nn.Module):
    """BN with fixed statistics (buffers, never updated, in any mode) and a trainable affine map."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        if bn.running_mean is None or not bn.affine:
            raise ValueError("TWINS needs BN layers with running statistics and affine parameters")
        self.eps = bn.eps
        self.weight = nn.Parameter(bn.weight.detach().clone(), requires_grad=bn.weight.requires_grad)
        self.bias = nn.Parameter(bn.bias.detach().clone(), requires_grad=bn.bias.requires_grad)
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            momentum=0.0, eps=self.eps)


class DualBatchNorm2d(nn.Module):
    """The two wings of one BN position; ``bn_branch`` in ``bn_branches`` picks the path."""

    bn_branches = BRANCHES

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.frozen = FrozenStatsBatchNorm2d(bn)
        self.adaptive = copy.deepcopy(bn)
        self.bn_branch = "adaptive"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn_branch == "frozen":
            return self.frozen(x)
        if self.bn_branch == "adaptive":
            return self.adaptive(x)
        if len(x) % 2:
            raise ValueError(f"TWINS split mode needs an even local batch (half per wing), got {len(x)}")
        half = len(x) // 2
        return torch.cat([self.frozen(x[:half]), self.adaptive(x[half:])])

    def extra_repr(self) -> str:
        return f"bn_branch={self.bn_branch}"


def to_dual_bn(module: nn.Module, select: set[int] | None = None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (synchronised ones included; only those whose
    ``id`` is in ``select`` when given) by a DualBatchNorm2d whose two wings both start from its
    parameters and statistics. Returns ``module`` (or its replacement if it is such a layer)."""
    if isinstance(module, nn.BatchNorm2d):
        return DualBatchNorm2d(module) if select is None or id(module) in select else module
    for name, child in module.named_children():
        if not isinstance(child, DualBatchNorm2d):
            setattr(module, name, to_dual_bn(child, select))
    return module


def dual_layers(model: nn.Module) -> list[DualBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]


def set_bn_branch(model: nn.Module, branch: str) -> None:
    if branch not in BRANCHES:
        raise ValueError(f"bn_branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
    for m in dual_layers(model):
        m.bn_branch = branch


@contextmanager
def bn_branch(model: nn.Module, branch: str) -> Iterator[nn.Module]:
    """Run the block with every dual layer of ``model`` on ``branch``; the previous branches come back."""
    before = [(m, m.bn_branch) for m in dual_layers(model)]
    set_bn_branch(model, branch)
    try:
        yield model
    finally:
        for m, b in before:
            m.bn_branch = b


def _adaptive_only(module: nn.Module) -> nn.Module:
    if isinstance(module, DualBatchNorm2d):
        return module.adaptive
    for name, child in module.named_children():
        setattr(module, name, _adaptive_only(child))
    return module


def export_plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with plain ``nn.BatchNorm2d`` layers: each dual layer becomes its adaptive
    wing and each synchronised layer a plain one. Its state_dict has the keys of a freshly built
    model, and its outputs equal the dual model's in ``adaptive`` mode."""
    return revert_sync_bn(_adaptive_only(copy.deepcopy(model)))

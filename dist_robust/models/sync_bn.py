"""Synchronised BatchNorm that runs on gloo (CPU) and nccl (CUDA).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so this layer does the synchronisation itself: in
training mode each rank computes per-channel [sum, sum of squares, count] of its local batch and one
autograd-aware ``all_reduce`` (``torch.distributed.all_reduce`` in an autograd function whose backward
all-reduces the incoming gradient, as ``torch.distributed.nn.functional``'s deprecated one did) turns them
into global sums, so the backward pass carries the cross-rank terms of the batch-statistics gradient
exactly. The sums are taken around the running mean (a constant shared by all ranks) to keep
``E[x^2] - E[x]^2`` from cancelling. Running statistics take the unbiased global variance, as
single-process BN does.

Every rank calls the collective once per forward in training mode, whatever its local batch (an
empty one contributes zeros), so the collectives line up by construction. Outside training, or
without a process group of more than one rank, it is plain ``BatchNorm2d``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of every rank's input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, dist.ReduceOp.SUM, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The autograd-aware sum of ``tensor`` over ``group`` (default: every rank), a new tensor."""
    return _AllReduceSum.apply(tensor, group if group is not None else dist.group.WORLD)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """Drop-in for ``nn.BatchNorm2d`` (same parameters, buffers and state_dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d expects [B, C, H, W] input, got shape {tuple(x.shape)}")
        c = x.shape[1]
        shift = self.running_mean.detach().view(1, c, 1, 1) if self.track_running_stats \
            else x.new_zeros(1, c, 1, 1)
        xs = (x - shift).float()  # statistics in fp32 even under autocast
        count = x.new_full((1,), x.numel() // c if x.numel() else 0, dtype=torch.float32)
        local = torch.cat([xs.sum((0, 2, 3)), (xs * xs).sum((0, 2, 3)), count])
        total = all_reduce(local)  # its backward all-reduces the gradients
        n = total[-1]
        if x.device.type == "cpu" and n.item() < 2:  # (on CUDA this check would cost a sync per layer)
            raise ValueError("SyncBatchNorm2d needs more than one value per channel across all ranks")
        mean_shifted, sq = total[:c] / n, total[c:2 * c] / n
        var = (sq - mean_shifted * mean_shifted).clamp_min(0)
        mean = mean_shifted + shift.view(c).float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = (x.float() - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def _copy_bn(src: nn.BatchNorm2d, dst: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        dst.load_state_dict(src.state_dict())
    dst.train(src.training)
    for name, p in dst.named_parameters():
        p.requires_grad_(getattr(src, name).requires_grad)
    return dst.to(src.running_mean.device if src.running_mean is not None else "cpu")


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every plain ``nn.BatchNorm2d`` (exact type) by ``SyncBatchNorm2d`` with the same state.

    Exact type on purpose: subclasses and other norm layers (TWINS' frozen wing, which never uses
    batch statistics) are left alone, unlike ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    if type(module) is nn.BatchNorm2d:
        new = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        return _copy_bn(module, new)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_bn(child))
    return module


def revert_sync_bn(module: nn.Module) -> nn.Module:
    """The inverse of ``convert_sync_bn``: plain ``nn.BatchNorm2d`` layers (for export)."""
    if isinstance(module, SyncBatchNorm2d):
        new = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        return _copy_bn(module, new)
    for name, child in module.named_children():
        setattr(module, name, revert_sync_bn(child))
    return module

"""Eval-mode BatchNorm folded to its per-channel scale in the attack's backward, bitwise as torch's own.

In an attack BN is in eval mode (``attack_mode``): y = (x - mean) / sqrt(var + eps) * w + b, an affine map
per channel, whose input gradient is the per-channel scale dx = dy * invstd * w. torch's CPU backward of it
(``native_batch_norm_backward``, torch 2.14) still reduces the gradient and the input per channel (the sum
and dot product only the weight and bias gradients use) before writing dx; folded, the backward is the
scale alone (on 2 cores: 0.4-0.9 of torch's backward time per layer, measured on cnn3/ResNet shapes).

Only the backward is folded. The forward stays torch's own call: its CPU kernel computes x * alpha + beta
with fused multiply-adds, which no composition of torch ops reproduces bitwise (measured). The backward
is computed as torch's kernel computes it (read from its source, checked bitwise by tests/test_folded_bn.py):
invstd = 1 / sqrt(var + eps) in float64, rounded to float32, then (dy * invstd) * w with a rounding after
each product, into a gradient of the memory format the kernel gives. So the input gradient, and every
attack built on it, is bitwise torch's.

``FoldedBatchNorm()`` is a torch function mode entered around the attack's forward: it routes every
eval-mode ``F.batch_norm`` call it sees (any module's: plain BN, synchronised BN in eval, TWINS' frozen
wing, timm's BatchNormAct) through ``_EvalBatchNorm``. Nothing of the model is touched (no module,
parameter, buffer, mode or flag changes, no hook), and every call reads the current weights and statistics.

Folded only where it was verified bitwise and measured to pay: CPU tensors, float32 input, parameters and
statistics, a dense input (contiguous or channels_last), no gradient wanted for the BN parameters. Anything
else runs torch's BN unchanged: CUDA (cuDNN's and the native CUDA kernels' rounding is not verified here),
bf16 autocast (bitwise too, but slower: see ``_DTYPES``), train-mode BN, float64. A gradient whose layout
differs from its input's goes to torch's own backward at that call, as torch's kernel then takes its
strided path. The folded backward is once differentiable (an attack's input gradient needs no more).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
# bf16 inputs (autocast): folded bitwise too (its backward: the products in float32, one rounding to bf16),
# but slower than torch's fused bf16 kernel (PGD-10 1.07-1.15x on cnn3, bench/attacks.py): not folded.
_DTYPES = (torch.float32,)


def _layout(t: torch.Tensor):
    """The memory format torch's dense BN kernels treat ``t`` in, or None if they would not take it."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


class _EvalBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm whose backward is only the input's per-channel scale."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps, invstd):
        ctx.save_for_backward(x, running_mean, running_var, weight, invstd)
        ctx.eps = eps
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, running_mean, running_var, weight, invstd = ctx.saved_tensors
        layout = _layout(x)
        if _layout(dy) != layout:  # torch's kernel takes its strided path here: leave it to it
            dx = torch.ops.aten.native_batch_norm_backward(dy, x, weight, running_mean, running_var, None, None,
                                                           False, ctx.eps, [True, False, False])[0]
            return dx, None, None, None, None, None, None
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dx = torch.empty_like(x, memory_format=layout)
        torch.mul(dy, invstd.view(shape), out=dx)  # (dy * invstd) * w: two roundings, in this order
        if weight is not None:
            dx.mul_(weight.view(shape))
        return dx, None, None, None, None, None, None


class FoldedBatchNorm(TorchFunctionMode):
    """A torch function mode: inside it, the eval-mode ``F.batch_norm`` calls it can fold bitwise go through
    ``_EvalBatchNorm``; every other call runs as it would. One instance serves one attack (entered at each
    step): it keeps each layer's 1 / sqrt(var + eps) while the statistics keep their version."""

    def __init__(self):
        super().__init__()
        self._invstd: dict = {}  # (id, version, eps) of a statistics tensor -> (the tensor, its invstd)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = dict(zip(_BATCH_NORM_ARGS, args), **kwargs)
            if self._foldable(call):
                eps = call.get("eps", 1e-5)
                return _EvalBatchNorm.apply(call["input"], call["running_mean"], call["running_var"],
                                            call.get("weight"), call.get("bias"), eps,
                                            self._inverse_std(call["running_var"], eps))
        return func(*args, **kwargs)

    @staticmethod
    def _foldable(call: dict) -> bool:
        x, mean, var = call.get("input"), call.get("running_mean"), call.get("running_var")
        if call.get("training", False) or not isinstance(x, torch.Tensor) or mean is None or var is None:
            return False
        if x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() < 2 or _layout(x) is None:
            return False
        params = [t for t in (mean, var, call.get("weight"), call.get("bias")) if t is not None]
        return all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
                   and not t.requires_grad for t in params)

    def _inverse_std(self, var: torch.Tensor, eps: float) -> torch.Tensor:
        key = (id(var), var._version, eps)  # the version moves with any in-place update of the statistics
        if key not in self._invstd:
            # torch's backward: 1 / std::sqrt(var + eps) in double (eps is a double), stored as float
            self._invstd[key] = (var, torch.sqrt(var.double() + eps).reciprocal().float())
        return self._invstd[key][1]


def has_batch_norm(net: nn.Module) -> bool:
    """Whether ``net`` holds a layer with running statistics (what folding could touch)."""
    return any(isinstance(getattr(m, "running_var", None), torch.Tensor) for m in net.modules())

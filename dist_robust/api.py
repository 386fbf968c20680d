"""The Python API: ``evaluate_model``, the exact sharded evaluation of any ``torch.nn.Module``;
``load_dataset``, a registered dataset's tensors; ``load_model``, a trained run's model.

The model takes images in [0, 1] (its own normalisation inside, as every model here) and returns
logits. The same call works in a plain process and in every rank of ``torchrun``: under torchrun the
process group is joined if the script has not done so, each rank evaluates its contiguous shard, and
every rank returns the totals (counts summed exactly; random starts seeded per point, so the counts do
not depend on the number of ranks).
"""
from __future__ import annotations

import atexit
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from . import dist
from .attacks.pgd import NORMS
from .attacks.registry import parse_attack
from .utils import PRECISIONS


@dataclass
class _Tensors:
    """A user's (images, labels) in the shape the evaluator reads: float pixels in [0, 1] or uint8."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _tensors(images, labels) -> _Tensors:
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels) or not len(labels):
        raise ValueError(f"dataset=(images, labels): expected images [N, C, H, W] and labels [N], N > 0 "
                         f"(got {tuple(images.shape)} and {tuple(labels.shape)})")
    if images.is_floating_point():
        lo, hi = images.min().item(), images.max().item()
        if lo < 0 or hi > 1:
            raise ValueError(f"dataset=(images, labels): float images must be pixels in [0, 1] (got [{lo:.3g}, "
                             f"{hi:.3g}]); normalise inside the model, as attacks measure eps in pixel space")
    elif images.dtype != torch.uint8:
        raise ValueError(f"dataset=(images, labels): images must be float in [0, 1] or uint8, got {images.dtype}")
    return _Tensors(images.contiguous(), labels.long().contiguous())


def _join_group(device: torch.device) -> None:
    """Under torchrun (or srun), join the process group once and leave it at exit."""
    env = dist.read_env()
    if env.world_size > 1 and not torch.distributed.is_initialized():
        dist.init(env, device)
        atexit.register(dist.cleanup)


def evaluate_model(model: torch.nn.Module, dataset="mnist", attacks: Sequence[str] = ("clean", "pgd-20"),
                   eps: float | str = 8 / 255, norm: str = "Linf", limit: int | None = None, batch_size: int = 500,
                   *, split: str = "test", root: str | None = None, seed: int = 0, restarts: int = 1,
                   precision: str = "fp32", device: str | torch.device | None = None,
                   aa_block_size: int | None = None, progress: bool = True) -> dict:
    """Clean and robust accuracy of ``model`` (images in [0, 1] -> logits) on ``dataset``: a registered
    name ("mnist", "cifar10" with ``root``, ...) or an (images, labels) pair of tensors. ``attacks``:
    clean, pgd-K, cw-K, fgsm, aa (standard AutoAttack), aa-plus, aa-rand, or any attack registered in
    dist_robust/attacks (docs/evaluation.md); ``eps`` a float or "8/255".
    Returns {"n", "world_size", "clean": {"correct", "acc"}, "attacks": {name: {"correct", "acc", ...}}}
    with the totals over all ranks. The model's mode and gradients are left as they were. ``aa_block_size``:
    AutoAttack's points per block (None: n / 8, at most 500, whatever the number of ranks). ``progress``:
    rank 0 prints progress lines to stderr (AutoAttack's plan and results, and one line at most every
    30 s of a long attack)."""
    from .config import parse_fraction
    from .evaluate import evaluate

    try:
        radius = float(parse_fraction(eps))
    except (TypeError, ValueError):
        radius = float("nan")  # refused below, named as given
    if not radius >= 0 or (norm == "Linf" and radius > 1):
        raise ValueError(f"eps={eps!r}: a radius >= 0, in [0, 1] pixel units for Linf (8/255 or '8/255')")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: must be one of {', '.join(NORMS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {', '.join(PRECISIONS)}")
    bad_block = aa_block_size is not None and aa_block_size <= 0
    if (limit is not None and limit <= 0) or batch_size <= 0 or restarts <= 0 or bad_block:
        raise ValueError(f"limit, batch_size, restarts and aa_block_size must be > 0 "
                         f"(got {limit}, {batch_size}, {restarts}, {aa_block_size})")
    attacks = [attacks] if isinstance(attacks, str) else list(attacks)
    for name in attacks:
        try:
            parse_attack(name)
        except ValueError as e:
            raise ValueError(f"attacks: {name!r}: {e}") from None
    if device is None:  # where the model is
        device = next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    _join_group(device)
    if isinstance(dataset, str):
        from .data import load_dataset
        data = load_dataset(dataset, split, root=root)
    elif isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        data = _tensors(*dataset)
    else:
        raise ValueError("dataset: a registered dataset name or an (images, labels) pair of tensors")
    opts = dict(compile="auto", precision=precision, channels_last=False)
    return evaluate(model, data, [a for a in attacks if a != "clean"], radius, batch_size, device, limit=limit,
                    seed=seed, norm=norm, restarts=restarts, attack_opts=opts, aa_block_size=aa_block_size,
                    say=(lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None)


def load_dataset(name: str, split: str = "train", *, root: str | None = None,
                 image_size: int | None = None, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a registered dataset's split ("train" or "test"), as training reads them:
    images uint8 [N, C, H, W], labels int64 [N]; ``root`` for the datasets read from user files
    (cifar10, imagefolder, ...), imagefolder's ``image_size`` and ``channels`` (1 or 3) to resize or
    convert (None: as its training images are). Fresh tensors, the caller's to change;
    ``dataset=(images.float() / 255, labels)`` evaluates them with ``evaluate_model``."""
    from .data import load_dataset as cached
    data = cached(name, split, root=root, image_size=image_size, channels=channels)
    return data.images.clone(), data.labels.clone()


def load_model(path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained model a run holds, in eval mode: ``path`` a run folder (its ``model.json``, else its
    last good checkpoint), a ``model.json`` or an epoch or step checkpoint's sidecar. It takes images in
    [0, 1] (its normalisation inside) and returns logits, as ``evaluate_model`` expects."""
    from .checkpoint import resolve
    from .engine.train import exported_model
    return exported_model(resolve(path), torch.device(device)).eval()

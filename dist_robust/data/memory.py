"""Tensor-resident loaders: the dataset is one uint8 tensor, batches are gathered by index.

No worker processes and no per-image Python: a batch is one indexing operation, and the crop and flip
are done on the whole batch, on the device. The order of the data depends only on (seed, epoch), so
every rank computes the same permutation and takes its own slice of each global batch.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import generator, shard_indices
from .sources import Dataset, stratified_take


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1]: uint8 images divided by 255; float images (a user's own tensors, evaluate_model)
    as they are."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)  # never the caller's own


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of zero-padded images, as one gather: [B,C,H,W] -> [B,C,H,W]."""
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=gen).to(x.device)
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, :, None]  # [B,H,1]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, :]  # [B,1,W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    padded = F.pad(x, (padding,) * 4).permute(0, 2, 3, 1)  # channels last: index B, H, W together
    # clone, not contiguous(): with one channel the permuted view already counts as contiguous but
    # keeps channels-last strides, which makes conv weight grads channels-last (and DDP warn).
    return padded[batch, rows, cols].permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def epoch_batches(num_points: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> torch.Tensor:
    """Rank's indices into range(num_points) for an epoch, [steps, batch_size]: one permutation from
    (seed, epoch) that every rank computes, cut into global batches, each rank its own slice of each;
    the incomplete tail is dropped. Every loader (memory, ffcv, torch) trains in this order."""
    global_batch = batch_size * world_size
    steps = num_points // global_batch
    perm = torch.randperm(num_points, generator=generator(seed, epoch))
    return perm[:steps * global_batch].view(steps, world_size, batch_size)[:, rank]


def augment(x: torch.Tensor, crop_padding: int, flip: bool, seed: int, epoch: int, rank: int,
            batch: int) -> torch.Tensor:
    """The training augmentation of a uint8 batch, on its device, seeded by (seed, epoch, rank, batch) so
    that a resumed epoch and every loader reproduce it."""
    if crop_padding or flip:
        gen = generator(seed, epoch, rank, batch)
        if crop_padding:
            x = random_crop(x, crop_padding, gen)
        if flip:
            x = random_flip(x, gen)
    return x


class TrainLoader:
    """Shuffled, augmented training batches of `batch_size` per rank; the incomplete tail is dropped."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, crop_padding: int = 0, flip: bool = False, device="cpu",
                 subset: Optional[int] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if batch_size <= 0 or crop_padding < 0:
            raise ValueError(f"need batch_size > 0 and crop_padding >= 0, got {batch_size}, {crop_padding}")
        self.info, self.device = dataset.info, torch.device(device)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.crop_padding, self.flip, self.epoch = crop_padding, flip, 0
        images, labels = dataset.images, dataset.labels
        self.indices = None  # positions in `dataset` of the images used (None: all)
        # a subset larger than the data is a mistake (it would silently train on less than asked)
        if subset is not None and not 0 < subset <= len(dataset):
            raise ValueError(f"data.subset={subset}: must be in [1, {len(dataset):,}], the training images of "
                             f"{dataset.info.name} here (after data.holdout)")
        if subset is not None and subset < len(dataset):
            self.indices = torch.from_numpy(self.subset_indices(dataset.labels, subset, seed))
            images, labels = images[self.indices], labels[self.indices]
        self.images, self.labels = images.to(self.device), labels.to(self.device)  # stays resident
        self.global_batch = batch_size * world_size
        if len(self) == 0:
            raise ValueError(f"{len(self.labels)} training images do not fill one global batch of "
                             f"{self.global_batch}")

    @staticmethod
    def subset_indices(labels: torch.Tensor, k: int, seed: int) -> np.ndarray:
        """Sorted dataset positions of a seeded subset of k images, classes in proportion."""
        priority = torch.randperm(len(labels), generator=generator(seed, "subset")).numpy()
        return stratified_take(labels.numpy(), k, priority)

    @property
    def num_points(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_points // self.global_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(self.epoch, 0)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's indices for the epoch, [len(self), batch_size] (into the subset, if any)."""
        return epoch_batches(self.num_points, self.batch_size, self.rank, self.world_size, self.seed, epoch)

    def iter_from(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` from `start_batch` on, exactly as an uninterrupted epoch has them."""
        order = self.epoch_order(epoch).to(self.device)
        for i in range(start_batch, len(self)):
            idx = order[i]
            x = augment(self.images[idx], self.crop_padding, self.flip, self.seed, epoch, self.rank, i)
            yield _to_float(x), self.labels[idx]


class EvalLoader:
    """This rank's exact shard of the first `limit` points (None or 0: all), in order, the last partial
    batch included."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 device="cpu", limit: Optional[int] = None):
        if batch_size <= 0:
            raise ValueError(f"eval batch size must be positive, got {batch_size}")
        n = min(limit, len(dataset)) if limit else len(dataset)  # None or 0: everything
        self.total, self.shard = n, shard_indices(n, rank, world_size)
        self.batch_size, self.num_points = batch_size, len(self.shard)
        device = torch.device(device)
        # a contiguous slice: a view on CPU, one copy on an accelerator
        self.images = dataset.images[self.shard.start:self.shard.stop].to(device)
        self.labels = dataset.labels[self.shard.start:self.shard.stop].to(device)

    def __len__(self) -> int:
        return -(-self.num_points // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_points, self.batch_size):
            stop = start + self.batch_size
            yield _to_float(self.images[start:stop]), self.labels[start:stop]


def holdout_split(train: Dataset, holdout: int) -> tuple[Dataset, Dataset]:
    """(training part, validation part) of a train split: ``holdout`` images, classes in proportion,
    held out for model selection (RiFT's alpha, early stopping) so that nothing is selected on the
    test split. The held-out set depends on the data only, not on the run's seed: every seed of a
    comparison selects on the same points and trains on the same rest."""
    if not 0 < holdout < len(train):
        raise ValueError(f"data.holdout={holdout}: must be in (0, {len(train)}) for {train.info.name}")
    keep, val = holdout_indices(train.labels, holdout)
    return (Dataset(train.images[keep], train.labels[keep], train.info),
            Dataset(train.images[val], train.labels[val], train.info))


def holdout_indices(labels: torch.Tensor, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) sorted positions of ``holdout_split``'s two parts in the train split."""
    priority = torch.randperm(len(labels), generator=generator("holdout", len(labels))).numpy()
    val = torch.from_numpy(stratified_take(labels.numpy(), holdout, priority))
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().squeeze(1), val

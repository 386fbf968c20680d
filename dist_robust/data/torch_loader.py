"""``data.loader=torch``: a torch DataLoader (per-image indexing and collation, optional worker processes)
over the in-memory dataset, in the memory loader's order and with its augmentation. It is the
reference the other loaders are measured against (bench/loaders.py), and a fallback."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from .memory import TrainLoader, _to_float, augment


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class TorchTrainLoader(TrainLoader):
    """TrainLoader's batches (same subset, order and augmentation), gathered image by image by a
    DataLoader with ``workers`` processes, then moved to ``device``."""

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 crop_padding: int = 0, flip: bool = False, device="cpu", subset=None, workers: int = 0):
        super().__init__(dataset, batch_size, rank, world_size, seed, crop_padding, flip, "cpu", subset)
        self.device, self.workers = torch.device(device), workers

    def iter_from(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_order(epoch)[start_batch:].tolist()
        batches = DataLoader(_Pairs(self.images, self.labels), batch_sampler=order, num_workers=self.workers,
                             pin_memory=self.device.type == "cuda")
        for i, (x, y) in enumerate(batches, start_batch):
            x = augment(x.to(self.device, non_blocking=True), self.crop_padding, self.flip, self.seed, epoch,
                        self.rank, i)
            yield _to_float(x), y.to(self.device, non_blocking=True)

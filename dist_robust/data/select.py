"""Which loader a run reads its data with (``data.loader``), and building it.

- ``memory`` (data/memory.py): the split as one uint8 tensor on the device; a batch is one gather.
- ``ffcv`` (data/ffcv.py): a prepared .beton, read and decoded by FFCV's threads.
- ``torch`` (data/torch_loader.py): a torch DataLoader over the in-memory split.

All three give the same batches (same order, same augmentation; bitwise for memory, torch and
FFCV raw), so a result does not depend on the loader. ``auto`` picks ffcv where a prepared .beton
of the run's training split exists and either its images are at least ``FFCV_MIN_SIZE`` pixels wide
or its decoded split would take more than ``FFCV_MIN_BYTES`` of memory on every rank; memory
otherwise (the reasons are bench/loaders.py's figures, in docs/data.md).
"""
from __future__ import annotations

import importlib.util
import logging
import math

import torch

from .. import dist
from .ffcv import FFCVDataError, beton_path, checked_manifest, prepare, read_manifest

log = logging.getLogger("dist_robust")
LOADERS = ("auto", "memory", "ffcv", "torch")
FFCV_MIN_SIZE = 64
FFCV_MIN_BYTES = 4 << 30  # the memory loader holds the whole decoded split on each rank


def resolve_loader(data) -> str:
    if data.loader != "auto":
        return data.loader
    manifest = read_manifest(beton_path(data.ffcv_dir, data.name, "train", data.ffcv_format))
    if manifest and importlib.util.find_spec("ffcv") and (
            manifest["shape"][-1] >= FFCV_MIN_SIZE or manifest["n"] * math.prod(manifest["shape"]) > FFCV_MIN_BYTES):
        return "ffcv"
    return "memory"


def ensure_beton(data, split: str) -> None:
    """Rank 0 writes the split's .beton when it is missing or was made from other data (a stale one);
    a corrupt one is refused (FFCVDataError), not silently replaced. Every rank waits for it."""
    # Every rank imports FFCV (about 5 s on 2 cores) now, alongside rank 0, not after its preparation.
    import ffcv.loader  # noqa: F401
    import ffcv.writer  # noqa: F401
    error = None
    if dist.is_main():
        path = beton_path(data.ffcv_dir, data.name, split, data.ffcv_format)
        try:
            checked_manifest(path, data.name, split, data.root, data.image_size, data.ffcv_format, data.channels)
        except FFCVDataError as e:
            if e.kind == "corrupt":
                error = str(e)
            else:
                log.info("preparing %s (%s)", path, e.kind)
                try:  # a failure (a full disk, say) must reach the other ranks, not leave them waiting
                    prepare(data.name, split, data.ffcv_dir, data.ffcv_format, root=data.root,
                            image_size=data.image_size, workers=max(1, torch.get_num_threads()),
                            channels=data.channels)
                except (OSError, ValueError) as e:
                    error = f"preparing {path} failed: {e}"
    error = dist.broadcast_object(error)
    if error:
        raise FFCVDataError(error)


def train_loader(data, batch_size: int, rank: int, world_size: int, seed: int, device, dataset=None):
    """The run's training loader; ``dataset``: the in-memory train split (memory and torch loaders)."""
    kind = resolve_loader(data)
    if kind == "ffcv":
        from .ffcv import FFCVTrainLoader
        ensure_beton(data, "train")
        return FFCVTrainLoader(data, batch_size, rank, world_size, seed, device,
                               workers=data.workers or torch.get_num_threads())
    common = dict(seed=seed, crop_padding=data.crop_padding, flip=data.flip, device=device, subset=data.subset)
    if kind == "torch":
        from .torch_loader import TorchTrainLoader
        return TorchTrainLoader(dataset, batch_size, rank, world_size, workers=data.workers, **common)
    from .memory import TrainLoader
    return TrainLoader(dataset, batch_size, rank, world_size, **common)


def ffcv_eval_loader(data, split: str, batch_size: int, device, limit=None):
    """This rank's exact evaluation shard of the split's .beton (prepared if missing)."""
    from .ffcv import FFCVEvalLoader
    from .sources import dataset_info
    ensure_beton(data, split)
    path = beton_path(data.ffcv_dir, data.name, split, data.ffcv_format)
    manifest = checked_manifest(path, data.name, split, data.root, data.image_size, data.ffcv_format, data.channels)
    channels = dataset_info(data.name, data.root, data.image_size, data.channels).channels
    return FFCVEvalLoader(path, manifest, channels, batch_size,
                          dist.rank(), dist.world_size(), device, limit, workers=data.workers or torch.get_num_threads())

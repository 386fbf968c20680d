"""FFCV ``.beton`` files: written by ``dist-robust prepare``, read by the ``data.loader=ffcv`` loaders.

A prepared split is two files in ``data.ffcv_dir``: ``NAME-SPLIT-FORMAT.beton`` and its manifest
``.json`` (dataset, split, format and JPEG quality, image shape, counts per class, the labels, a sha256
of the source images and labels, a sha256 of the .beton, and its stamp: size, modification time and a
sha256 of its first and last MiB). ``prepare`` rebuilds a file whose manifest does not match the source
data or the requested format, and leaves a matching one alone after hashing it in full, as
``prepare --verify`` does; the loaders check the stamp only (an ImageNet-sized file is not read
through at every start) and refuse a changed, corrupt or foreign file.

Formats: ``raw`` stores each image's uint8 [C, H, W] array (bit-exact); ``jpeg`` stores RGB JPEGs at
``--quality`` (grayscale images are replicated to 3 channels and read back from the first).

The loaders use FFCV to read and decode, in its compiled, multi-threaded pipeline, and take the data
order from ``memory.epoch_batches`` (the memory loader's permutation of (seed, epoch), each rank its
slice of each global batch) and the augmentation from ``memory.augment`` (on the batch, on the
device): a run gives the same batches whichever loader reads them (bitwise for ``raw``). FFCV's own
``distributed=True`` is not used: its RANDOM order pads each epoch with duplicates when the data does
not split evenly (a DistributedSampler with drop_last=False), its QUASI_RANDOM order refuses
distributed mode, and neither can start an epoch at a given batch, which exact mid-epoch resume
needs. FFCV reuses its output buffers between batches, so every batch handed out is a fresh tensor.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..utils import atomic_write, sha256_file, shard_indices
from .memory import _to_float, augment, epoch_batches, holdout_indices, TrainLoader
from .sources import Dataset, dataset_info, image_shape, load_dataset

log = logging.getLogger("dist_robust")
FORMATS = ("raw", "jpeg")
MANIFEST_VERSION = 1


class FFCVDataError(ValueError):
    """A .beton that is missing, stale (made from other data or settings) or corrupt: ``kind``."""

    def __init__(self, message: str, kind: str = "usage"):
        super().__init__(message)
        self.kind = kind


def beton_path(out_dir: str | Path, name: str, split: str, fmt: str) -> Path:
    return Path(out_dir).expanduser() / f"{name}-{split}-{fmt}.beton"


def content_sha256(ds: Dataset) -> str:
    h = hashlib.sha256()
    h.update(ds.images.numpy().tobytes())
    h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()


def _source_key(name: str, split: str, root: Optional[str], image_size: Optional[int], fmt: str,
                quality: int, channels: Optional[int] = None) -> dict:
    """What a .beton was made from and how: a manifest whose key differs is stale. imagefolder's size and
    channels as its images load (found in them when not configured); the other datasets' keys as before."""
    image_size, channels = image_shape(name, root, image_size, channels)
    key = {"dataset": name, "split": split, "root": str(Path(root).expanduser().resolve()) if root else None,
           "image_size": image_size, "format": fmt, "quality": quality if fmt == "jpeg" else None}
    return key if channels is None else {**key, "channels": channels}


ENDS = 1 << 20  # bytes hashed at each end of a .beton for its stamp


def stamp(beton: Path) -> dict:
    """What a load checks of a .beton without reading it through: size, modification time, and a sha256
    of its first and last MiB."""
    st = beton.stat()
    h = hashlib.sha256()
    with open(beton, "rb") as f:
        h.update(f.read(ENDS))
        if st.st_size > ENDS:
            f.seek(max(ENDS, st.st_size - ENDS))
            h.update(f.read())
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ends_sha256": h.hexdigest()}


def read_manifest(beton: Path) -> Optional[dict]:
    try:
        return json.loads(beton.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None


class _Indexed:
    """(image, label) pairs in the layout each FFCV field writes."""

    def __init__(self, ds: Dataset, fmt: str):
        self.images, self.labels, self.fmt = ds.images.numpy(), ds.labels.numpy(), fmt

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        if self.fmt == "jpeg":  # RGBImageField takes H x W x 3
            img = np.ascontiguousarray(np.broadcast_to(img, (3, *img.shape[1:])).transpose(1, 2, 0))
        return img, int(self.labels[i])


def prepare(name: str, split: str, out_dir: str | Path, fmt: str = "raw", quality: int = 90,
            root: Optional[str] = None, image_size: Optional[int] = None, workers: int = 1,
            channels: Optional[int] = None) -> tuple[Path, bool]:
    """Write NAME-SPLIT-FORMAT.beton and its manifest unless an up-to-date one is there.
    Returns (path, whether it was written)."""
    if fmt not in FORMATS:
        raise FFCVDataError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    if not 1 <= quality <= 100:
        raise FFCVDataError(f"--quality {quality}: must be in [1, 100]")
    ds = load_dataset(name, split, root=root, image_size=image_size, channels=channels)
    beton = beton_path(out_dir, name, split, fmt)
    key = _source_key(name, split, root, image_size, fmt, quality, channels)
    content = content_sha256(ds)
    try:
        old = verify(beton)  # hashed in full; its stamp brought up to date
        if old["source"] == key and old["content_sha256"] == content:
            return beton, False
    except FFCVDataError:  # missing, from another version, or corrupt: written anew
        pass
    write_beton(ds, beton, fmt, quality, key, workers, content)
    return beton, True


def write_beton(ds: Dataset, beton: Path, fmt: str, quality: int, source: dict, workers: int = 1,
                content: Optional[str] = None) -> dict:
    """Write ``ds`` to ``beton`` (through a temporary file) and then its manifest; returns the manifest."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    beton.parent.mkdir(parents=True, exist_ok=True)
    image_field = (NDArrayField(np.dtype("uint8"), tuple(ds.images.shape[1:])) if fmt == "raw"
                   else RGBImageField(write_mode="jpg", jpeg_quality=quality))
    tmp = beton.with_name(f".{beton.name}.tmp{os.getpid()}")
    try:
        DatasetWriter(str(tmp), {"image": image_field, "label": IntField()}, num_workers=workers).from_indexed_dataset(
            _Indexed(ds, fmt))
        manifest = {"version": MANIFEST_VERSION, "source": source, "format": fmt, "n": len(ds),
                    "shape": list(ds.images.shape[1:]),
                    "counts": np.bincount(ds.labels.numpy(), minlength=ds.info.num_classes).tolist(),
                    "content_sha256": content or content_sha256(ds), "beton_sha256": sha256_file(tmp),
                    "labels": ds.labels.tolist()}
        os.replace(tmp, beton)
        manifest["stamp"] = stamp(beton)  # a rename keeps the modification time
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write(beton.with_suffix(".json"), json.dumps(manifest).encode())
    return manifest


def verify(beton: Path) -> dict:
    """``prepare --verify``: hash ``beton`` in full against its manifest and, when it passes, record its
    current stamp (a copied or touched file has a new modification time); FFCVDataError otherwise."""
    manifest = verified_manifest(beton, "prepare it again (delete it first)", full=True)
    now = stamp(beton)
    if manifest.get("stamp") != now:
        manifest["stamp"] = now
        atomic_write(beton.with_suffix(".json"), json.dumps(manifest).encode())
    return manifest


def checked_manifest(beton: Path, name: str, split: str, root, image_size, fmt: str, channels=None) -> dict:
    """The manifest of a .beton that matches the run and its hash; FFCVDataError otherwise."""
    hint = f"run `dist-robust prepare {name} --split {split} --format {fmt}` to rebuild it"
    manifest = verified_manifest(beton, hint)
    src = dict(manifest.get("source", {}))
    src.pop("quality", None)  # any JPEG quality serves
    want = _source_key(name, split, root, image_size, fmt, 0, channels)
    want.pop("quality")
    if src != want:
        raise FFCVDataError(f"{beton} was made from {src}, not from this run's data ({want}): {hint}", "stale")
    return manifest


def verified_manifest(beton: Path, hint: str = "prepare it again", full: bool = False) -> dict:
    """The manifest of ``beton`` after checking the file against its stamp (``full``, or a manifest
    without one: its sha256); FFCVDataError otherwise."""
    manifest = read_manifest(beton)
    if manifest is None or not beton.is_file():
        raise FFCVDataError(f"{beton} or its manifest is missing: {hint}", "missing")
    if manifest.get("version") != MANIFEST_VERSION:
        raise FFCVDataError(f"{beton} was written by another version of dist_robust: {hint}", "stale")
    if not full and "stamp" in manifest:
        now, then = stamp(beton), manifest["stamp"]
        if (now["size"], now["ends_sha256"]) != (then["size"], then["ends_sha256"]):
            raise FFCVDataError(f"{beton} differs from its manifest in size or content (truncated or corrupted): "
                                f"{hint}", "corrupt")
        if now["mtime_ns"] != then["mtime_ns"]:
            raise FFCVDataError(f"{beton} was modified after it was prepared (copied or written to): run "
                                f"`dist-robust prepare ... --verify` to check it in full", "corrupt")
        return manifest
    if sha256_file(beton) != manifest["beton_sha256"]:
        raise FFCVDataError(f"{beton} fails its sha256 check (truncated or corrupted): {hint}", "corrupt")
    return manifest


def _loader(beton: Path, manifest: dict, batch_size: int, device: torch.device, workers: int):
    """An FFCV Loader over ``beton`` whose order we set per epoch (``_set_order``)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.decoders import NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    raw = manifest["format"] == "raw"
    to_device = ToDevice(device, non_blocking=True)
    image = ([NDArrayDecoder(), ToTensor(), to_device] if raw else
             [SimpleRGBImageDecoder(), ToTensor(), to_device, ToTorchImage(channels_last=True)])
    return Loader(str(beton), batch_size=batch_size, num_workers=workers, order=OrderOption.SEQUENTIAL,
                  indices=np.arange(manifest["n"]), drop_last=False, os_cache=True,
                  pipelines={"image": image, "label": [IntDecoder(), ToTensor(), to_device]})


def _set_order(loader, indices: np.ndarray) -> None:
    """The positions the next pass of ``loader`` reads, in this order. FFCV 1.0.2 cannot take a custom
    TraversalOrder (its Loader tests ``isinstance`` on the class it then calls), so the SEQUENTIAL
    order's index list is swapped: it returns ``indices`` as given when not distributed."""
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    loader.indices = indices
    loader.traversal_order.indices = indices


def _batches(loader, channels: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in loader:
        if x.shape[1] != channels:  # grayscale stored as RGB JPEG
            x = x[:, :channels]
        # labels come as [B, 1]: FFCV's Squeeze would make a batch of one 0-d, which its ToDevice then
        # fails on, in a thread whose death leaves the loop waiting forever
        yield x, y.view(-1).long()  # the images are copied by the caller's float conversion


class FFCVTrainLoader:
    """``TrainLoader``'s interface and batches, read from a .beton: the same order, subset and holdout,
    the same augmentation; ``raw`` gives bitwise the memory loader's batches."""

    def __init__(self, data, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device="cpu", workers: int = 1, beton: Optional[Path] = None, info=None):
        """``beton`` and ``info``: a .beton of other data than ``data`` names (bench/loaders.py)."""
        if beton is None:
            self.info = dataset_info(data.name, data.root, data.image_size, data.channels)
            self.beton = beton_path(data.ffcv_dir, data.name, "train", data.ffcv_format)
            manifest = checked_manifest(self.beton, data.name, "train", data.root, data.image_size, data.ffcv_format,
                                        data.channels)
        else:
            self.info, self.beton, manifest = info, beton, verified_manifest(beton)
        labels = torch.tensor(manifest["labels"])
        positions = torch.arange(len(labels))  # positions in the .beton of the images used
        if data.holdout:
            positions = holdout_indices(labels, data.holdout)[0]
        if data.subset is not None and data.subset > len(positions):
            raise ValueError(f"data.subset={data.subset}: more than the {len(positions):,} training images of "
                             f"{data.name} here (after data.holdout)")
        if data.subset is not None and data.subset < len(positions):
            positions = positions[torch.from_numpy(TrainLoader.subset_indices(labels[positions], data.subset, seed))]
        self.positions, self.num_points = positions.numpy(), len(positions)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.crop_padding, self.flip, self.epoch = data.crop_padding, data.flip, 0
        self.device = torch.device(device)
        self.global_batch = batch_size * world_size
        if len(self) == 0:
            raise ValueError(f"{self.num_points} training images do not fill one global batch of {self.global_batch}")
        self._ffcv = _loader(self.beton, manifest, batch_size, self.device, workers)

    def __len__(self) -> int:
        return self.num_points // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return self.iter_from(self.epoch, 0)

    def iter_from(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_batches(self.num_points, self.batch_size, self.rank, self.world_size, self.seed, epoch)
        if start_batch >= len(order):  # FFCV cannot iterate an empty index list
            return
        _set_order(self._ffcv, self.positions[order[start_batch:].reshape(-1).numpy()])
        for i, (x, y) in enumerate(_batches(self._ffcv, self.info.channels), start_batch):
            x = augment(x, self.crop_padding, self.flip, self.seed, epoch, self.rank, i)
            yield _to_float(x), y.clone()


class FFCVEvalLoader:
    """This rank's exact shard (``shard_indices``: no padding, no duplicates) of the first ``limit``
    points of a prepared split, in order, the last partial batch included."""

    def __init__(self, beton: Path, manifest: dict, channels: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, device="cpu", limit: Optional[int] = None, workers: int = 1):
        n = min(limit, manifest["n"]) if limit else manifest["n"]
        self.total, self.shard = n, shard_indices(n, rank, world_size)
        self.batch_size, self.num_points, self.channels = batch_size, len(self.shard), channels
        self._ffcv = _loader(beton, manifest, batch_size, torch.device(device), workers)
        _set_order(self._ffcv, np.arange(self.shard.start, self.shard.stop))

    def set_indices(self, indices: np.ndarray) -> None:
        """Read these positions, in this order, from now on (the evaluation's blocks of this rank)."""
        self.num_points = len(indices)
        _set_order(self._ffcv, indices)

    def __len__(self) -> int:
        return -(-self.num_points // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_points:  # FFCV cannot iterate an empty index list
            for x, y in _batches(self._ffcv, self.channels):
                yield _to_float(x), y.clone()

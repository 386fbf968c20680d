"""Offline real datasets (``sources``) and tensor-resident loaders (``memory``)."""
from .memory import EvalLoader, TrainLoader, holdout_split
from .sources import (DATASETS, Dataset, DatasetInfo, RestrictedUnpickler, clear_cache, dataset_info,
                      dataset_stats, load_dataset, safe_unpickle)

__all__ = ["DATASETS", "Dataset", "DatasetInfo", "EvalLoader", "RestrictedUnpickler", "TrainLoader",
           "clear_cache", "data_info", "data_stats", "dataset_info", "dataset_stats", "holdout_split",
           "load_dataset", "load_split", "safe_unpickle"]

SPLITS = ("train", "val", "test")


def load_split(data, split: str) -> Dataset:
    """A run's split from its ``data`` config section: ``train`` (without the ``data.holdout``
    images), ``val`` (those images) or ``test``."""
    if split == "test":
        return load_dataset(data.name, "test", data.root, data.image_size, data.channels)
    train = load_dataset(data.name, "train", data.root, data.image_size, data.channels)
    if split == "train" and not data.holdout:
        return train
    if split not in SPLITS or not data.holdout:
        raise ValueError(f"split {split!r}: use train, test, or val with data.holdout > 0")
    return holdout_split(train, data.holdout)[split == "val"]


def data_info(data) -> DatasetInfo:
    """The DatasetInfo of a ``data`` config section (imagefolder's channels and size as it loads)."""
    return dataset_info(data.name, data.root, data.image_size, data.channels)


def data_stats(data) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a ``data`` section's training images: what ``model.normalize: dataset`` means."""
    return dataset_stats(data.name, data.root, data.image_size, data.channels)

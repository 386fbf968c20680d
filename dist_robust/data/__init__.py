"""Offline real datasets (``sources``) and tensor-resident loaders (``memory``)."""
from .memory import EvalLoader, TrainLoader, holdout_split
from .sources import (DATASETS, Dataset, DatasetInfo, RestrictedUnpickler, clear_cache, dataset_info,
                      load_dataset, safe_unpickle)

__all__ = ["DATASETS", "Dataset", "DatasetInfo", "EvalLoader", "RestrictedUnpickler", "TrainLoader",
           "clear_cache", "dataset_info", "holdout_split", "load_dataset", "load_split", "safe_unpickle"]

SPLITS = ("train", "val", "test")


def load_split(data, split: str) -> Dataset:
    """A run's split from its ``data`` config section: ``train`` (without the ``data.holdout``
    images), ``val`` (those images) or ``test``."""
    if split == "test":
        return load_dataset(data.name, "test", root=data.root, image_size=data.image_size)
    train = load_dataset(data.name, "train", root=data.root, image_size=data.image_size)
    if split == "train" and not data.holdout:
        return train
    if split not in SPLITS or not data.holdout:
        raise ValueError(f"split {split!r}: use train, test, or val with data.holdout > 0")
    return holdout_split(train, data.holdout)[split == "val"]

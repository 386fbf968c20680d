"""Offline real datasets (``sources``) and tensor-resident loaders (``memory``)."""
from .memory import EvalLoader, TrainLoader, shard_indices
from .sources import (DATASETS, Dataset, DatasetInfo, RestrictedUnpickler, clear_cache, dataset_info,
                      load_dataset, safe_unpickle)

__all__ = ["DATASETS", "Dataset", "DatasetInfo", "EvalLoader", "RestrictedUnpickler", "TrainLoader",
           "clear_cache", "dataset_info", "load_dataset", "safe_unpickle", "shard_indices"]

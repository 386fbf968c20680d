"""The bottom floor: helpers every layer may use (files, seeding, sharding, precision). Nothing here
imports the rest of the project; tests/test_layers.py holds the floors' order."""
from .checks import ConfigError, check
from .files import atomic_write, sha256, sha256_file, unwritable
from .precision import PRECISIONS, autocast
from .seeding import generator, stream_seed
from .sharding import shard_indices

__all__ = ["ConfigError", "PRECISIONS", "atomic_write", "autocast", "check", "generator", "sha256", "sha256_file",
           "shard_indices", "stream_seed", "unwritable"]

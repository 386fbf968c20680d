"""Named random streams: a stream depends only on the values that name it, never on the process,
the rank count or the device, so every rank can draw the same numbers without communicating."""
from __future__ import annotations

import hashlib

import torch


def stream_seed(*parts) -> int:
    """A 63-bit generator seed from a few values; distinct tuples give unrelated streams."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded by ``stream_seed(*parts)`` (CPU: the same numbers on every device)."""
    return torch.Generator().manual_seed(stream_seed(*parts))

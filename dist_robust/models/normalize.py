"""Per-channel input normalisation as the model's first layer.

Data stays in [0, 1] pixel space up to the model, so attacks clip and measure eps there; the
normalisation the backbone was trained under is part of the model. ``mean`` and ``std`` are
persistent buffers: they travel with every checkpoint and with ``.to(device)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for inputs shaped [B, C, H, W]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise ValueError(f"mean and std need the same, non-zero length (got {mean_t.numel()} and {std_t.numel()})")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        # Shaped [1, C, 1, 1] so they broadcast over batch and space.
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=True)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=True)

    @property
    def num_channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"

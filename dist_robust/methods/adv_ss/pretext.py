"""Pretext transforms of Adv-SS (Chen et al., CVPR 2020; design/methods.md section 5.3).

Each turns a batch of images (labels ignored) into the input of a self-supervised task and that task's
labels. They are pure functions of the batch and a random generator (torch's global one by default,
which the engine seeds per rank), and they keep the images' device and dtype.

- rotation: each image turned by 0, 90, 180 or 270 degrees (``torch.rot90`` on H, W), 4 classes drawn
  as a nearly balanced random assignment within the batch (the authors' permutation of [0, 1, 2, 3] * ...).
- jigsaw: the image cut into grid x grid tiles, reassembled in the order of one row of a fixed
  permutation table (row 0 the identity); the class is the row. Position j of the shuffled image holds
  tile ``table[class, j]`` of the original, as in the authors' ``[batches[perm[j]] for j ...]``.
- selfie: grid x grid patches; a random set of grid^2 // 4 target positions, the rest the context.

Tiles and patches are numbered row-major: tile ``r * grid + c`` is row r, column c.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["JIGSAW_FORCE_IDENTITY", "from_tiles", "jigsaw", "jigsaw_permutations", "rotate", "selfie_positions",
           "shuffle_tiles", "to_tiles"]

# The authors draw a class uniformly, then force the identity when rand() > bias = 0.9: the unshuffled
# image is seen 0.1 + 0.9 / classes of the time, which keeps the network looking at natural images.
JIGSAW_FORCE_IDENTITY = 0.1


# ---------------------------------------------------------------- rotation

def rotate(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated images, labels in 0..3): image i turned by labels[i] * 90 degrees counter-clockwise.

    The labels are nearly balanced within the batch: [0, 1, 2, 3] repeated B // 4 + 1 times, shuffled
    and cut to the batch size, as the authors do (each class appears about B / 4 times, not exactly)."""
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs a batch of square images [B, C, H, H], got shape {tuple(x.shape)}")
    b = len(x)
    reps = b // 4 + 1
    labels = torch.arange(4).repeat(reps)[torch.randperm(4 * reps, generator=generator)][:b]
    out = torch.empty_like(x)
    for k in range(4):
        idx = (labels == k).nonzero().squeeze(1).to(x.device)
        if len(idx):
            out[idx] = torch.rot90(x[idx], k, dims=(2, 3))
    return out, labels.to(x.device)


# ---------------------------------------------------------------- tiles (jigsaw and selfie)

def to_tiles(x: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, grid^2, C, H/grid, W/grid], tiles row-major."""
    b, c, h, w = x.shape
    if grid < 1 or h % grid or w % grid:
        raise ValueError(f"a {grid}x{grid} grid must divide the image size {h}x{w}")
    p, q = h // grid, w // grid
    return x.reshape(b, c, grid, p, grid, q).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, p, q)


def from_tiles(tiles: torch.Tensor, grid: int) -> torch.Tensor:
    """Inverse of ``to_tiles``: [B, grid^2, C, p, q] -> [B, C, grid*p, grid*q]."""
    b, n, c, p, q = tiles.shape
    if n != grid * grid:
        raise ValueError(f"{n} tiles do not make a {grid}x{grid} grid")
    return tiles.reshape(b, grid, grid, c, p, q).permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid * p, grid * q)


# ---------------------------------------------------------------- jigsaw

def jigsaw_permutations(grid: int, n: int, seed: int = 0) -> torch.Tensor:
    """The permutation table [n + 1, grid^2] (int64): row 0 the identity, then n distinct random
    permutations of the tiles, drawn from a generator seeded with ``seed`` (the same table on every
    rank and every machine that runs this torch version; the table is saved with the model anyway).

    Unlike the authors' ``np.random.permutation(16)`` x 30, duplicates and the identity are redrawn: a
    repeated row would make two classes indistinguishable."""
    tiles = grid * grid
    if grid < 2 or not 1 <= n < math.factorial(tiles):
        raise ValueError(f"jigsaw needs grid >= 2 and 1 <= permutations < {tiles}! (got grid={grid}, n={n})")
    g = torch.Generator().manual_seed(seed)
    rows = [tuple(range(tiles))]
    seen = set(rows)
    while len(rows) < n + 1:
        p = tuple(torch.randperm(tiles, generator=g).tolist())
        if p not in seen:
            seen.add(p)
            rows.append(p)
    return torch.tensor(rows, dtype=torch.long)


def shuffle_tiles(x: torch.Tensor, table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Image i reassembled so that position j holds its tile ``table[labels[i], j]``."""
    grid = math.isqrt(table.shape[1])
    tiles = to_tiles(x, grid)
    order = table.to(x.device)[labels.to(x.device)]  # [B, grid^2]
    return from_tiles(tiles[torch.arange(len(x), device=x.device)[:, None], order], grid)


def jigsaw(x: torch.Tensor, table: torch.Tensor, generator: Optional[torch.Generator] = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(shuffled images, labels in 0..len(table)-1): a class uniform over the table's rows per image,
    forced to 0 (the identity) with probability ``JIGSAW_FORCE_IDENTITY``."""
    b = len(x)
    labels = torch.randint(0, len(table), (b,), generator=generator)
    labels[torch.rand(b, generator=generator) < JIGSAW_FORCE_IDENTITY] = 0
    return shuffle_tiles(x, table, labels), labels.to(x.device)


# ---------------------------------------------------------------- selfie

def selfie_positions(grid: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random order of the grid^2 patch positions: the first grid^2 // 4 are the targets, the rest
    the context. One order per batch, as the authors' ``seq``; the attack must reuse it."""
    if grid < 3:
        raise ValueError(f"selfie needs a grid of at least 3x3 (2 targets or more), got {grid}")
    return torch.randperm(grid * grid, generator=generator)

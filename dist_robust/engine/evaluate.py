"""Exact sharded evaluation: clean and PGD accuracy summed over ranks.

Every rank evaluates its own contiguous shard of the test set (no padding, no duplicates), the
per-attack counts are summed with one all_reduce, and ``n`` is the exact number of points whatever
the world size. PGD random starts are drawn per point from (seed, global index), so the counts do not
depend on how the points are split over ranks. A point counts as robust only if it is classified
correctly both clean and under the attack (the per-sample worst case, as AutoAttack reports it), so
robust accuracy never exceeds clean accuracy.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from .. import dist
from ..attacks import pgd_linf
from ..data import EvalLoader, shard_indices
from .checkpoint import atomic_write

_PGD = re.compile(r"pgd-(\d+)$")


def parse_attack(name: str) -> dict:
    """'clean' or 'pgd-K' (L-inf PGD, K steps, step eps/4, random start) -> its settings."""
    if name == "clean":
        return {"kind": "clean"}
    m = _PGD.match(name)
    if m and int(m.group(1)) > 0:
        return {"kind": "pgd", "norm": "Linf", "steps": int(m.group(1))}
    raise ValueError("unknown attack (known: clean, pgd-K with K > 0 steps, e.g. pgd-20)")


def _start_noise(x: torch.Tensor, first_index: int, seed: int) -> torch.Tensor:
    """Uniform [-1, 1] noise for each point, seeded by its global index."""
    noise = torch.empty_like(x, device="cpu")
    g = torch.Generator()
    for i in range(len(x)):
        g.manual_seed(seed * 1_000_003 + first_index + i)
        noise[i].uniform_(-1, 1, generator=g)
    return noise.to(x.device)


@torch.no_grad()
def _predict(model, x):
    return model(x).argmax(1)


def evaluate(model: torch.nn.Module, dataset, attacks: list[str], eps: float, batch_size: int,
             device: torch.device, limit: int | None = None, seed: int = 0, progress=None) -> dict:
    """Evaluate the unwrapped ``model`` on this rank's shard; returns the summed results dict."""
    specs = {name: parse_attack(name) for name in attacks if name != "clean"}
    n_total = min(len(dataset), limit) if limit else len(dataset)
    shard = shard_indices(n_total, dist.rank(), dist.world_size())
    loader = EvalLoader(dataset, batch_size, dist.rank(), dist.world_size(), device=device, limit=limit)
    counts = torch.zeros(2 + len(specs), dtype=torch.float64)  # n, clean, one per attack
    seconds = torch.zeros(1 + len(specs), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        offset = shard.start
        for x, y in (progress(loader) if progress else loader):
            t0 = time.perf_counter()
            clean_ok = _predict(model, x) == y
            seconds[0] += time.perf_counter() - t0
            counts[0] += len(y)
            counts[1] += clean_ok.sum().item()
            for j, spec in enumerate(specs.values()):
                t0 = time.perf_counter()
                x_adv = pgd_linf(model, x, y, eps, spec["steps"], noise=_start_noise(x, offset, seed))
                counts[2 + j] += (clean_ok & (_predict(model, x_adv) == y)).sum().item()
                seconds[1 + j] += time.perf_counter() - t0
            offset += len(y)
    finally:
        model.train(was_training)
    dist.all_reduce_sum(counts)
    n = int(counts[0])
    assert n == n_total, f"evaluated {n} points, expected {n_total}"
    result = {"n": n, "world_size": dist.world_size(),
              "clean": {"correct": int(counts[1]), "acc": counts[1].item() / n, "time_s": seconds[0].item()},
              "attacks": {}}
    for j, (name, spec) in enumerate(specs.items()):
        result["attacks"][name] = {"correct": int(counts[2 + j]), "acc": counts[2 + j].item() / n,
                                   "eps": eps, "norm": spec["norm"], "steps": spec["steps"],
                                   "step_size": eps / 4, "random_start": True, "seed": seed,
                                   "time_s": seconds[1 + j].item()}
    return result


def write_results(path: Path, results: dict) -> None:
    """Rank 0 writes results atomically."""
    atomic_write(Path(path), (json.dumps(results, indent=1) + "\n").encode())

"""How n points are split over ranks, everywhere the project splits them (evaluation, AutoAttack's
blocks, RiFT's MRC points, FFCV's evaluation loader)."""


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Rank's contiguous block of range(n): sizes differ by at most 1, no padding, no overlap."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))

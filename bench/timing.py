"""Shared by the bench scripts: medians over repeats after warm-up, with min and max."""
import statistics
import time


def timed(fn, repeats: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def interleaved(variants: dict, repeats: int, warmup: int = 2) -> dict:
    """Time the variants (name -> callable) alternately, A B A B ..., in one process on the same inputs,
    so a machine that slows down or speeds up touches every variant alike. Returns per variant its
    median time and its per-round times (``times``), and per variant after the first its ratio to the first:
    the median of the per-round ratios, with their min and max (the spread). ``pair_ratio`` gives the same
    for any two variants."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    first, *rest = variants
    out = {name: {"median_s": statistics.median(t), "times": t} for name, t in times.items()}
    for name in rest:
        ratios = [b / a for a, b in zip(times[first], times[name])]
        out[name].update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    return out


def pair_ratio(res: dict, base: str, other: str) -> dict:
    """From one ``interleaved`` result: the per-round ratios other / base, their median, min and max."""
    ratios = [b / a for a, b in zip(res[base]["times"], res[other]["times"])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}

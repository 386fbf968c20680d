"""Exact sharded evaluation: clean accuracy and any mix of PGD, CW and AutoAttack, summed over ranks.

Every rank evaluates its own contiguous shard of the test set (no padding, no duplicates), the
per-attack counts are summed with one all_reduce, and ``n`` is the exact number of points whatever
the world size. PGD and CW random starts are drawn per point from (seed, restart, global index), so
the counts do not depend on how the points are split over ranks. A point counts as robust only if it
is classified correctly clean and under every restart of the attack (the per-sample worst case, as
AutoAttack reports it), so robust accuracy never exceeds clean accuracy. AutoAttack (``aa``, ``aa-plus``,
``aa-rand``: fra31's standard, plus and rand versions) runs its own cascade (attacks/autoattack.py),
sharded in fixed blocks and resumable.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from . import dist
from .attacks import pgd, random_start
from .attacks.names import parse_attack
from .checkpoint import read_sidecar, resolve
from .data import EvalLoader, load_split
from .data.select import ffcv_eval_loader, resolve_loader
from .report import progress
from .utils import atomic_write, sha256_file
log = logging.getLogger("dist_robust")


def eval_attack_opts(cfg) -> dict:
    """pgd() keywords of every evaluation: the speed knobs come from ``attack.*``, the precision from
    ``eval.precision`` alone (a bf16 training attack must not quietly weaken the reported robustness)."""
    return dict(compile=cfg.attack.compile, precision=cfg.eval.precision, channels_last=cfg.attack.channels_last)


def _seeded_starts(x: torch.Tensor, first_index: int, seed: int, restart: int, eps: float, norm: str):
    """Each point's random start, seeded by its global index (independent of batch and rank)."""
    g = torch.Generator()
    starts = []
    for i in range(len(x)):
        g.manual_seed((seed * 1_000_003 + restart) * 1_000_000_007 + first_index + i)
        starts.append(random_start(x[i:i + 1], eps, norm, generator=g))
    return torch.cat(starts)


@torch.no_grad()
def _correct(model, x, y):
    return model(x).argmax(1) == y


def evaluate(model: torch.nn.Module, dataset, attacks: list[str], eps: float, batch_size: int,
             device: torch.device, limit: int | None = None, seed: int = 0, norm: str = "Linf",
             restarts: int = 1, attack_opts: dict | None = None, aa_state_dir: Path | None = None,
             fingerprint: str = "", progress=None, aa_block_size: int = 500, loader=None) -> dict:
    """Evaluate the unwrapped ``model`` on this rank's shard; returns the summed results dict.
    attack_opts: extra pgd() keywords (compile, precision, channels_last). ``loader``: this rank's
    shard as an FFCVEvalLoader (then ``dataset`` may be None, unless AutoAttack runs: it reads the
    in-memory split); by default an EvalLoader of ``dataset``."""
    specs = {name: parse_attack(name) for name in attacks if name != "clean"}
    iterative = {k: s for k, s in specs.items() if s["kind"] == "pgd"}
    if loader is None:
        loader = EvalLoader(dataset, batch_size, dist.rank(), dist.world_size(), device=device, limit=limit)
    n_total, shard = loader.total, loader.shard
    counts = torch.zeros(2 + len(iterative), dtype=torch.float64)  # n, clean, one per iterative attack
    seconds = torch.zeros(1 + len(iterative), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        offset = shard.start
        for x, y in (progress(loader) if progress else loader):
            t0 = time.perf_counter()
            clean_ok = _correct(model, x, y)
            seconds[0] += time.perf_counter() - t0
            counts[0] += len(y)
            counts[1] += clean_ok.sum().item()
            for j, spec in enumerate(iterative.values()):
                t0 = time.perf_counter()
                robust = clean_ok.clone()
                for r in range(restarts):
                    start = _seeded_starts(x, offset, seed, r, eps, norm)
                    x_adv = pgd(model, x, y, eps, spec["steps"], norm=norm, loss=spec["loss"], delta0=start,
                                **(attack_opts or {}))
                    robust &= _correct(model, x_adv, y)
                counts[2 + j] += robust.sum().item()
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
    for name, spec in specs.items():
        if spec["kind"] == "pgd":
            j = list(iterative).index(name)
            result["attacks"][name] = {"correct": int(counts[2 + j]), "acc": counts[2 + j].item() / n,
                                       "eps": eps, "norm": norm, "steps": spec["steps"], "loss": spec["loss"],
                                       "step_size": eps / 4, "random_start": True, "restarts": restarts,
                                       "precision": (attack_opts or {}).get("precision", "fp32"),
                                       "seed": seed, "time_s": seconds[1 + j].item()}
        else:
            state_dir = aa_state_dir if aa_state_dir is None or name == "aa" else Path(aa_state_dir) / name
            result["attacks"][name] = _autoattack(model, dataset, eps, norm, batch_size, device, limit, seed,
                                                  state_dir, fingerprint, aa_block_size, spec["version"])
    return result


def _autoattack(model, dataset, eps, norm, batch_size, device, limit, seed, state_dir, fingerprint,
                block_size, version) -> dict:
    from .attacks.autoattack import autoattack
    t0 = time.perf_counter()
    res = autoattack(model, dataset, eps, norm=norm, batch_size=batch_size, device=device, limit=limit,
                     seed=seed, state_dir=state_dir, fingerprint=fingerprint, block_size=block_size, version=version)
    return {"correct": res["correct"], "acc": res["acc"], "eps": eps, "norm": norm, "steps": res["settings"],
            "backend": "pyautoattack " + _pyautoattack_version(), "version": res["version"],
            "block_size": res["block_size"], "seed": seed,
            "per_attack": res["per_attack"], "time_s": time.perf_counter() - t0}


def _pyautoattack_version() -> str:
    from importlib.metadata import version
    return version("pyautoattack")


def write_results(path: Path, results: dict) -> None:
    """Rank 0 writes results atomically."""
    atomic_write(Path(path), (json.dumps(results, indent=1) + "\n").encode())


def eval_radius(cfg) -> tuple[float, str]:
    """The evaluation's eps and norm: eval.eps / eval.norm, else the training attack's."""
    return (cfg.attack.eps if cfg.eval.eps is None else cfg.eval.eps,
            cfg.attack.norm if cfg.eval.norm is None else cfg.eval.norm)


def _fingerprint(checkpoint: str) -> str:
    """What AutoAttack's saved state is tied to: a checkpoint's recorded hash, or a weights file's own."""
    path = Path(checkpoint)
    return read_sidecar(resolve(path))["sha256"]["model"] if path.suffix == ".json" else sha256_file(path)


def evaluate_run(cfg, model, device, checkpoint: str, out: Path, journal=None, extra: dict | None = None,
                 radii: list[float] | None = None) -> dict:
    """Evaluate ``model`` (saved at ``checkpoint``) on cfg's dataset and eval settings; rank 0 writes
    ``out`` (with ``extra``'s keys). AutoAttack keeps its resumable state next to ``out``. ``radii``:
    several eps, one results file with a ``radii`` list (one entry of attacks per radius) in place of
    ``attacks``."""
    e = cfg.eval
    test_set, loader = None, None
    if resolve_loader(cfg.data) == "ffcv" and e.split == "test" and not any(n.startswith("aa") for n in e.attacks):
        loader = ffcv_eval_loader(cfg.data, e.split, cfg.data.eval_batch_size, device, e.limit)
    else:  # AutoAttack and the held-out val split read the in-memory split
        test_set = load_split(cfg.data, e.split)
    eps, norm = eval_radius(cfg)
    radii = radii or [eps]
    fingerprint = _fingerprint(checkpoint)
    t0 = time.perf_counter()
    each = []
    for r in radii:
        state = out.stem + (".aa-state" if len(radii) == 1 else f".eps{r:.6g}.aa-state")
        each.append(evaluate(model, test_set, e.attacks, r, cfg.data.eval_batch_size, device, limit=e.limit,
                             seed=e.seed, norm=norm, restarts=e.restarts, attack_opts=eval_attack_opts(cfg),
                             aa_state_dir=out.with_name(state), fingerprint=fingerprint,
                             progress=lambda it: progress(it, None, "eval"), aa_block_size=e.aa_block_size,
                             loader=loader))
    counts = each[0] if len(radii) == 1 else dict(
        {k: v for k, v in each[0].items() if k != "attacks"}, norm=norm,
        radii=[{"eps": r, "attacks": c["attacks"]} for r, c in zip(radii, each)])
    results = {"dataset": cfg.data.name, "split": e.split, **counts, "checkpoint": checkpoint,
               "seconds": time.perf_counter() - t0, **(extra or {}), "config": cfg.to_dict()}
    if dist.is_main():
        write_results(out, results)
        if journal is not None:
            journal.write(kind="eval", **{k: results[k] for k in ("n", "clean", "attacks")})
        for r, c in zip(radii, each):
            line = "  ".join([f"clean {c['clean']['acc']:.4f}"] + [f"{k} {v['acc']:.4f}" for k, v in c["attacks"].items()])
            log.info("eval on %s/%s (n=%d, %s eps=%.4g): %s", cfg.data.name, e.split, c["n"], norm, r, line)
        log.info("results -> %s", out)
    return results

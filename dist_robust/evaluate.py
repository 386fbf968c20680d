"""Exact sharded evaluation: clean accuracy and any mix of the registered attacks (attacks/registry.py:
PGD, CW, FGSM, AutoAttack, and any file added there), summed over ranks.

The first n points are cut into blocks of consecutive indices and every rank evaluates its own contiguous
run of blocks (no padding, no duplicates); the per-attack counts are summed with one all_reduce per round
of blocks, and ``n`` is the exact number of points whatever the world size. This is how the batch
attacks run (PGD, CW, FGSM): their random starts are drawn per point from (seed, restart, global index),
so the counts do not depend on how the points are split over ranks. A point counts as robust only if it
is classified correctly clean and under every restart of the attack (the per-sample worst case, as
AutoAttack reports it), so robust accuracy never exceeds clean accuracy. ``evaluate_run`` saves the
finished blocks' counts beside the results file after each round: a SIGTERM stops every rank at one
round, and the same command continues on any world size. The whole-split attacks (AutoAttack's
versions, attacks/autoattack.py) run their own blocks and resumable state.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import dist
from .attacks import random_start
from .attacks.registry import parse_attack
from .checkpoint import read_sidecar, resolve
from .data import load_split
from .data.memory import _to_float
from .data.select import ffcv_eval_loader, resolve_loader
from .utils import atomic_write, sha256_file, shard_indices
from .utils.lines import Every
from .utils.signals import Stopped, StopSignals

log = logging.getLogger("dist_robust")


def eval_attack_opts(cfg) -> dict:
    """pgd() keywords of every evaluation: the speed knobs come from ``attack.*``, the precision from
    ``eval.precision`` alone (a bf16 training attack must not quietly weaken the reported robustness)."""
    return dict(compile=cfg.attack.compile, precision=cfg.eval.precision, channels_last=cfg.attack.channels_last)


def _seeded_starts(x: torch.Tensor, first_index: int, seed: int, restart: int, eps: float, norm: str):
    """Each point's random start, seeded by its global index (independent of batch and rank). Each is drawn
    and shaped on the CPU (random_start with a generator computes there), then the batch goes to x's
    device in one copy, not one per point."""
    g = torch.Generator()
    point = torch.empty((1, *x.shape[1:]), dtype=x.dtype)  # a CPU stand-in for one point: its shape and dtype
    starts = []
    for i in range(len(x)):
        g.manual_seed((seed * 1_000_003 + restart) * 1_000_000_007 + first_index + i)
        starts.append(random_start(point, eps, norm, generator=g))
    return torch.cat(starts).to(x.device)


@torch.no_grad()
def _correct(model, x, y):
    return model(x).argmax(1) == y


STATE_FORMAT = "dist_robust.eval-state/1"


def agreed_signal(received: int | None) -> int | None:
    """The stop signal any rank received (None: none), known to every rank from one all_reduce: every
    rank then stops at the same boundary (a rank that stopped alone would leave the others waiting)."""
    flags = torch.zeros(dist.world_size(), dtype=torch.float64)
    flags[dist.rank()] = received or 0
    return int(dist.all_reduce_sum(flags).max()) or None


def block_size_for(n: int, world: int, batch_size: int) -> int:
    """Points per block of a fresh evaluation: at most ``batch_size``, and as many blocks per rank as the
    batch size asks for, so that every rank gets the same number of blocks give or take one."""
    rounds = max(1, -(-n // (world * batch_size)))
    return max(1, -(-n // (world * rounds)))


def _read_state(path: Path, args: dict, n: int) -> tuple[int | None, dict, list | None]:
    """(block size, {block: its counts}, rank 0's seconds so far) of a saved evaluation with these
    ``args``; (None, {}, None) when there is none, or it is stale or unreadable (said so)."""
    if not path.is_file():
        return None, {}, None
    try:
        state = json.loads(path.read_text())
        size, width = int(state["block_size"]), 2 + len(args["attacks"])
        done = {int(b): [float(c) for c in counts] for b, counts in state["blocks"].items()}
        spent = [float(s) for s in state["time_s"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("eval: ignoring unreadable state %s (%s)", path, e)
        return None, {}, None
    if state.get("format") != STATE_FORMAT or state.get("args") != args:
        log.warning("eval: ignoring stale state %s (written with %s, now %s)", path, state.get("args"), args)
        return None, {}, None
    if size < 1 or len(spent) != width - 1 or any(
            not 0 <= b * size < n or len(c) != width or c[0] != min(size, n - b * size) for b, c in done.items()):
        log.warning("eval: ignoring inconsistent state %s", path)
        return None, {}, None
    return size, done, spent


def _write_state(path: Path, args: dict, size: int, done: dict, spent: list) -> None:
    state = {"format": STATE_FORMAT, "args": args, "block_size": size, "time_s": spent,
             "blocks": {str(b): done[b] for b in sorted(done)}}
    atomic_write(path, json.dumps(state).encode())


def _recut(batches, sizes):
    """The stream of (x, y) batches cut again into consecutive pieces of ``sizes`` points."""
    it, xs, ys, held = iter(batches), [], [], 0
    for size in sizes:
        while held < size:
            x, y = next(it)
            xs, ys, held = xs + [x], ys + [y], held + len(y)
        x, y = torch.cat(xs), torch.cat(ys)
        yield x[:size], y[:size]
        xs, ys, held = [x[size:]], [y[size:]], held - size


def evaluate(model: torch.nn.Module, dataset, attacks: list[str], eps: float, batch_size: int,
             device: torch.device, limit: int | None = None, seed: int = 0, norm: str = "Linf",
             restarts: int = 1, attack_opts: dict | None = None, aa_state_dir: Path | None = None,
             fingerprint: str = "", say=None, aa_block_size: int | None = None, loader=None,
             state: Path | None = None, state_key: dict | None = None) -> dict:
    """Evaluate the unwrapped ``model`` on this rank's blocks; returns the summed results dict.
    attack_opts: extra pgd() keywords (compile, precision, channels_last). ``loader``: an FFCVEvalLoader
    of the split (then ``dataset`` may be None, unless a whole-split attack runs: AutoAttack reads the
    in-memory split); by default the points come from ``dataset``.

    The first n points are cut into blocks of consecutive global indices (``block_size_for``), and the
    blocks are shared out over the ranks, a contiguous run each; after each round of blocks one
    all_reduce gives every rank every block's counts and any rank's stop signal. With ``state`` (a
    file) rank 0 saves the finished blocks' counts there after each round (tied to ``fingerprint``, the
    settings and ``state_key``), and SIGTERM / SIGINT stop every rank at one round: ``Stopped`` is
    raised once the state is saved. A later call with the same settings continues from the saved
    blocks on any world size, with the counts an unbroken evaluation gives (each point's random
    starts come from its global index). The whole-split attacks (AutoAttack) keep their own state (under
    ``aa_state_dir``) and blocks (``aa_block_size``, None: a function of n alone). ``say``: rank 0's
    progress lines, at most one per 30 s of the batch attacks (None: none) and AutoAttack's plan,
    results and blocks (None: the log's info)."""
    specs = {name: parse_attack(name) for name in attacks if name != "clean"}
    iterative = {k: s for k, s in specs.items() if s.shape == "batch"}
    rank, world = dist.rank(), dist.world_size()
    n_total = loader.total if loader is not None else (min(limit, len(dataset)) if limit else len(dataset))
    args = json.loads(json.dumps({"n": n_total, "eps": float(eps), "norm": norm, "attacks": list(iterative),
                                  "restarts": restarts, "seed": seed, "attack_opts": attack_opts or {},
                                  "fingerprint": fingerprint, **(state_key or {})}))
    size, done, spent = _read_state(Path(state), args, n_total) if state is not None else (None, {}, None)
    resumed = len(done)
    if resumed:
        log.info("eval: continuing from %s: %d of %d blocks done", state, resumed, -(-n_total // size))
    size = size or block_size_for(n_total, world, batch_size)
    blocks = [range(s, min(s + size, n_total)) for s in range(0, n_total, size)]
    todo = [b for b in range(len(blocks)) if b not in done]
    mine = [todo[i] for i in shard_indices(len(todo), rank, world)]
    rounds = len(shard_indices(len(todo), 0, world))  # rank 0 has the most: every rank joins every round
    width = 2 + len(iterative)  # n, clean, one per iterative attack
    counts = torch.zeros(width, dtype=torch.float64)
    for c in done.values():
        counts += torch.tensor(c, dtype=torch.float64)
    seconds = torch.tensor(spent or [0.0] * (width - 1), dtype=torch.float64)
    if loader is None:
        pieces = ((_to_float(dataset.images[blocks[b].start:blocks[b].stop].to(device)),
                   dataset.labels[blocks[b].start:blocks[b].stop].to(device)) for b in mine)
    else:
        loader.set_indices(np.concatenate([np.arange(blocks[b].start, blocks[b].stop) for b in mine] or [[]]))
        pieces = _recut(loader, [len(blocks[b]) for b in mine])
    was_training = model.training
    model.eval()
    t0, every = time.perf_counter(), Every()
    try:
        with StopSignals() if state is not None else contextlib.nullcontext() as signals:
            for r in range(rounds):
                row = torch.zeros(world, 2 + width, dtype=torch.float64)  # block + 1, signal, counts
                if r < len(mine):
                    x_all, y_all = next(pieces)
                    row[rank, 0] = mine[r] + 1
                    row[rank, 2:] = _block_counts(model, x_all, y_all, blocks[mine[r]].start, iterative, batch_size,
                                                  eps, norm, seed, restarts, attack_opts, seconds)
                row[rank, 1] = (signals.received or 0) if signals is not None else 0
                dist.all_reduce_sum(row)
                for b, _, *c in row.tolist():
                    if b:
                        done[int(b) - 1] = c
                        counts += torch.tensor(c, dtype=torch.float64)
                if state is not None and dist.is_main():
                    _write_state(Path(state), args, size, done, seconds.tolist())
                if say and iterative and every() and dist.is_main():  # global counts: after the all_reduce
                    robust = ", ".join(f"{k} {int(counts[2 + j])}" for j, k in enumerate(iterative))
                    say(f"eval: blocks {len(done)}/{len(blocks)} ({int(counts[0])}/{n_total} points): clean "
                        f"{int(counts[1])}, {robust} correct so far, {time.perf_counter() - t0:.0f} s")
                signum = int(row[:, 1].max())
                if signum:
                    dist.barrier()  # rank 0's state is on disk before any rank leaves
                    raise Stopped(signum, f"after {len(done)} of {len(blocks)} blocks of the evaluation",
                                  f"the finished blocks are saved in {state}: the same command continues it")
    finally:
        model.train(was_training)
    n = int(counts[0])
    assert n == n_total, f"evaluated {n} points, expected {n_total}"
    result = {"n": n, "world_size": world,
              "clean": {"correct": int(counts[1]), "acc": counts[1].item() / n, "time_s": seconds[0].item()},
              "attacks": {}}
    if resumed:
        result["resumed"] = {"blocks": resumed, "of": len(blocks), "state": str(state)}
    for name, spec in specs.items():
        if spec.shape == "batch":
            j = list(iterative).index(name)
            record = spec.family.record(spec.settings, eps, norm, restarts, seed, attack_opts or {})
            result["attacks"][name] = {"correct": int(counts[2 + j]), "acc": counts[2 + j].item() / n, **record,
                                       "time_s": seconds[1 + j].item()}
        else:
            result["attacks"][name] = spec.family.run(
                model, dataset, name, spec.settings, eps, norm, batch_size=batch_size, device=device, limit=limit,
                seed=seed, state_dir=aa_state_dir, fingerprint=fingerprint, block_size=aa_block_size, say=say)
    return result


def _block_counts(model, x_all, y_all, first: int, iterative: dict, batch_size: int, eps, norm, seed, restarts,
                  attack_opts, seconds) -> torch.Tensor:
    """[points, clean correct, robust under each batch attack] of one block whose first point has the
    global index ``first``, in chunks of ``batch_size``; this rank's time is added to ``seconds``. An
    attack with random starts takes each point's seeded one, ``restarts`` times; one without runs once."""
    counts = torch.zeros(2 + len(iterative), dtype=torch.float64)
    for i in range(0, len(y_all), batch_size):
        x, y = x_all[i:i + batch_size], y_all[i:i + batch_size]
        t0 = time.perf_counter()
        clean_ok = _correct(model, x, y)
        seconds[0] += time.perf_counter() - t0
        counts[0] += len(y)
        counts[1] += clean_ok.sum().item()
        for j, spec in enumerate(iterative.values()):
            t0 = time.perf_counter()
            robust = clean_ok.clone()
            family = spec.family
            for r in range(restarts if family.random_start else 1):
                start = _seeded_starts(x, first + i, seed, r, eps, norm) if family.random_start else None
                x_adv = family.attack(model, x, y, spec.settings, eps, norm, start, attack_opts or {})
                robust &= _correct(model, x_adv, y)
            counts[2 + j] += robust.sum().item()
            seconds[1 + j] += time.perf_counter() - t0
    return counts


def write_results(path: Path, results: dict) -> None:
    """Rank 0 writes results atomically."""
    atomic_write(Path(path), (json.dumps(results, indent=1) + "\n").encode())


def eval_radius(cfg) -> tuple[float, str]:
    """The evaluation's eps and norm: eval.eps / eval.norm, else the training attack's."""
    return (cfg.attack.eps if cfg.eval.eps is None else cfg.eval.eps,
            cfg.attack.norm if cfg.eval.norm is None else cfg.eval.norm)


def _provenance(checkpoint: str) -> dict:
    """What the evaluated model is: its weights' sha256 (a checkpoint's recorded hash, or a weights file's
    own; the evaluation state is tied to it) and, for a checkpoint of this project, the sha256 of the config
    that trained it (canonical JSON of its sidecar's ``config``)."""
    path = Path(checkpoint)
    if path.suffix != ".json":
        return {"model_sha256": sha256_file(path)}
    meta = read_sidecar(resolve(path))
    config = json.dumps(meta.get("config"), sort_keys=True, separators=(",", ":")).encode()
    return {"model_sha256": meta["sha256"]["model"], "config_sha256": hashlib.sha256(config).hexdigest()}


def evaluate_run(cfg, model, device, checkpoint: str, out: Path, journal=None, extra: dict | None = None,
                 radii: list[float] | None = None) -> dict:
    """Evaluate ``model`` (saved at ``checkpoint``) on cfg's dataset and eval settings; rank 0 writes
    ``out`` (with ``extra``'s keys). The PGD / CW blocks (``<out stem>.eval-state.json``, until ``out`` is
    written) and AutoAttack (``<out stem>.aa-state/``) keep their resumable state next to ``out``. ``radii``:
    several eps, one results file with a ``radii`` list (one entry of attacks per radius) in place of
    ``attacks``."""
    e = cfg.eval
    test_set, loader = None, None
    whole = any(parse_attack(n).shape == "whole" for n in e.attacks)
    if resolve_loader(cfg.data) == "ffcv" and e.split == "test" and not whole:
        loader = ffcv_eval_loader(cfg.data, e.split, cfg.data.eval_batch_size, device, e.limit)
    else:  # the whole-split attacks (AutoAttack) and the held-out val split read the in-memory split
        test_set = load_split(cfg.data, e.split)
    eps, norm = eval_radius(cfg)
    radii = radii or [eps]
    provenance = _provenance(checkpoint)
    fingerprint = provenance["model_sha256"]
    t0 = time.perf_counter()
    each = []
    states = []  # the PGD / CW blocks' state files, removed once the results are written
    for r in radii:
        stem = out.stem + ("" if len(radii) == 1 else f".eps{r:.6g}")
        states.append(out.with_name(stem + ".eval-state.json"))
        each.append(evaluate(model, test_set, e.attacks, r, cfg.data.eval_batch_size, device, limit=e.limit,
                             seed=e.seed, norm=norm, restarts=e.restarts, attack_opts=eval_attack_opts(cfg),
                             aa_state_dir=out.with_name(stem + ".aa-state"), fingerprint=fingerprint,
                             say=log.info, aa_block_size=e.aa_block_size,
                             loader=loader, state=states[-1], state_key={"dataset": cfg.data.name, "split": e.split}))
    counts = each[0] if len(radii) == 1 else dict(
        {k: v for k, v in each[0].items() if k != "attacks"}, norm=norm,
        radii=[{"eps": r, "attacks": c["attacks"]} for r, c in zip(radii, each)])
    results = {"dataset": cfg.data.name, "split": e.split, **counts, "checkpoint": checkpoint, **provenance,
               "seconds": time.perf_counter() - t0, **(extra or {}), "config": cfg.to_dict()}
    if dist.is_main():
        write_results(out, results)
        for state in states:
            state.unlink(missing_ok=True)
        if journal is not None:
            journal.write(kind="eval", **{k: results[k] for k in ("n", "clean", "attacks")})
        for r, c in zip(radii, each):
            line = "  ".join([f"clean {c['clean']['acc']:.4f}"] + [f"{k} {v['acc']:.4f}" for k, v in c["attacks"].items()])
            log.info("eval on %s/%s (n=%d, %s eps=%.4g): %s", cfg.data.name, e.split, c["n"], norm, r, line)
        log.info("results -> %s", out)
    return results

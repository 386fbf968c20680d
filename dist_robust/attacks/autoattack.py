"""AutoAttack (Croce & Hein 2020) on fra31's own code, sharded exactly over ranks and resumable.

The attacks are the classes of ``pyautoattack`` (fra31/auto-attack, the code RobustBench runs), taken
from an ``AutoAttack(version=...)`` object so that every setting is the reference's own: for
``standard``, APGD-CE (100 iterations, 1 restart, rho 0.75), APGD-T (9 target classes, 100 iterations),
FAB-T (9 targets, 100 iterations) and Square (p_init 0.8, 5,000 queries, resc_schedule False); for L2
the reference's L2 standard; ``plus`` and ``rand`` are its other two versions. Each attack is called as
the reference's ``run_standard_evaluation`` calls it (the same attributes set before ``perturb``). One
deviation, where the reference would fail: a model with fewer than 10 classes gets n_classes - 1
targets instead of 9. The cascade, the sharding and the bookkeeping around them are ours:

* A point starts robust iff it is classified correctly; each attack runs only on the points still
  robust, and a point stays robust only if the attack's output is classified correctly. We check
  every output ourselves: one outside the eps ball or the [0, 1] box counts as a failed attack (and
  is logged), never as a success. So the result is the per-sample worst case over the cascade.
* Sharding: the first n points are cut into blocks of ``block_size`` consecutive global indices
  (independent of the world size; by default ``auto_block_size(n)``) and every rank takes a
  contiguous run of whole blocks (sizes differ by at most one block; a rank may get none, said in
  one warning, and still joins every collective). No padding.
* Randomness: every attack call is seeded with ``seed``, as the reference seeds every batch with its
  ``seed``, and a call attacks the still-robust points of one block in chunks of ``batch_size``. So
  the flags do not depend on the world size (a block is attacked the same way on any rank), and with
  one block holding all n points they are the reference's own, point by point, at the same seed and
  batch size. The caller's RNG state is restored afterwards.
* Resume: after each attack every rank saves, atomically, one safetensors file holding its shard's
  robust flags after each finished attack, with a JSON header (arguments, finished attacks, their
  summed counts and times). A restart with the same arguments rolls every rank back to the attacks
  that all ranks finished and continues; a state written with other arguments is ignored (and said
  so). Nothing is unpickled.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import torch
from pyautoattack import AutoAttack
from safetensors import safe_open
from safetensors.torch import save as st_save

from .. import dist
from ..utils import atomic_write, shard_indices
from ..utils.lines import Every
from .pgd import NORMS, attack_mode
from .registry import EvalAttack, register

VERSIONS = ("standard", "plus", "rand")
STATE_FORMAT = "dist_robust.aa-state/2"
TOL = {"Linf": 1e-6, "L2": 1e-5}  # float slack of the eps-ball check
AUTO_BLOCKS, MAX_BLOCK = 8, 500  # the default block: n / 8 points, at most 500


def auto_block_size(n: int) -> int:
    """The default points per block: ceil(n / 8), at most 500. A function of n alone, never of the
    world size: each attack call draws its randomness for one chunk of one block, so the block size
    decides which points fall, and a size that followed the ranks would make the counts depend on
    them. 8 blocks (from 57 points on) give up to 8 ranks work; from 4,000 points on the blocks hold
    500 (the former default), as many as n asks for. On one rank, fewer, larger blocks run faster
    (fewer sequential chunks) and one block of all n points gives fra31's own flags."""
    return max(1, min(MAX_BLOCK, -(-n // AUTO_BLOCKS)))


def rank_blocks(n: int, block_size: int, rank: int, world: int) -> range:
    """The indices of this rank's blocks: a contiguous run of the ceil(n / block_size) blocks."""
    return shard_indices(-(-n // block_size), rank, world)


def idle_note(n: int, block_size: int, world: int) -> str | None:
    """One line when some ranks get no block (None when every rank has one)."""
    count = -(-n // block_size)
    if count >= world:
        return None
    return (f"autoattack: {count} block(s) of {block_size} points for {world} ranks leave {world - count} "
            f"idle; aa_block_size <= {max(1, n // world)} gives every rank a block (the counts depend on the "
            f"block size, never on the ranks)")


def reference(net, eps: float, norm: str, version: str = "standard", seed: int = 0, device="cpu",
              n_classes: int = 10) -> AutoAttack:
    """fra31's AutoAttack object for ``version``: its sub-attacks hold the reference's settings."""
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r} (known: {', '.join(VERSIONS)})")
    adversary = AutoAttack(net, norm=norm, eps=eps, version=version, seed=seed, device=device)
    if n_classes < 4 and any(a in ("apgd-t", "fab-t") for a in adversary.attacks_to_run):
        raise ValueError(f"the targeted attacks need at least 4 classes, the model has {n_classes}")
    targets = min(adversary.apgd_targeted.n_target_classes, n_classes - 1)  # < 9 only below 10 classes
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = targets
    return adversary


def attacks_of(version: str) -> tuple[str, ...]:
    """The reference's attack list for a version, in its order."""
    return tuple(reference(None, 0.1, "Linf", version).attacks_to_run)


def settings(version: str, norm: str, n_classes: int = 10) -> dict:
    """Each attack's budget as the reference configures it (recorded in results files)."""
    r = reference(None, 0.1, norm, version, n_classes=n_classes)
    apgd = {"n_iter": r.apgd.n_iter, "n_restarts": r.apgd.n_restarts, "eot_iter": r.apgd.eot_iter,
            "rho": r.apgd.thr_decr}
    out = {"apgd-ce": apgd, "apgd-dlr": apgd,
           "apgd-t": {"n_iter": r.apgd_targeted.n_iter, "n_restarts": r.apgd_targeted.n_restarts,
                      "n_target_classes": r.apgd_targeted.n_target_classes, "rho": r.apgd_targeted.thr_decr},
           "fab": {"n_iter": r.fab.n_iter, "n_restarts": r.fab.n_restarts},
           "fab-t": {"n_iter": r.fab.n_iter, "n_restarts": 1, "n_target_classes": r.fab.n_target_classes},
           "square": {"n_queries": r.square.n_queries, "p_init": r.square.p_init,
                      "resc_schedule": r.square.rescale_schedule}}
    return {a: out[a] for a in r.attacks_to_run}


class Fra31Attack:
    """One attack of the reference cascade, called exactly as its ``run_standard_evaluation`` calls
    it. ``seed`` is set by the cascade before each call (the library reseeds torch with it)."""

    def __init__(self, adversary: AutoAttack, name: str):
        if name not in adversary.attacks_to_run:
            raise ValueError(f"{name!r} is not an attack of AutoAttack {adversary.version!r} "
                             f"(its attacks: {', '.join(adversary.attacks_to_run)})")
        self.adversary, self.name, self.seed = adversary, name, 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, name = self.adversary, self.name
        if name in ("apgd-ce", "apgd-dlr"):
            atk = a.apgd
            atk.loss = name.removeprefix("apgd-")
        elif name in ("fab", "fab-t"):
            atk = a.fab
            atk.targeted = name == "fab-t"
            if atk.targeted:
                atk.n_restarts = 1
        else:
            atk = {"apgd-t": a.apgd_targeted, "square": a.square}[name]
        atk.seed = self.seed
        return atk.perturb(x, y)


def build_attack(name: str, net, eps: float, norm: str, n_classes: int, version: str = "standard", device="cpu"):
    """The callable for one attack of ``version`` (tests replace this function)."""
    return Fra31Attack(reference(net, eps, norm, version, device=device, n_classes=n_classes), name)


def within_bounds(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Per point: is x_adv in the eps ball around x and in the [0, 1] box? (NaN fails both.)"""
    d = (x_adv - x).flatten(1)
    dist_ = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    flat = x_adv.flatten(1)
    return (dist_ <= eps + TOL[norm]) & (flat >= 0).all(1) & (flat <= 1).all(1)


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to [0, 1]; float images (evaluate_model's own tensors) are pixels already."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.to(torch.float32, copy=True)


def _gathered_max(value: float) -> float:
    """Max over ranks of a per-rank value, with the sum collective only (one slot per rank)."""
    v = torch.zeros(dist.world_size(), dtype=torch.float64)
    v[dist.rank()] = value
    return dist.all_reduce_sum(v).max().item()


def _load_state(path: Path, args: dict, size: int, log) -> tuple[int, dict, dict]:
    """(number of attacks finished, their flags, their per_attack records); (0, {}, {}) if stale.
    ``args`` holds the attack list (as ``version``), so the finished ones are a prefix of it."""
    if not path.exists():
        return 0, {}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads(f.metadata()["header"])
            flags = {k.removeprefix("after."): f.get_tensor(k).bool() for k in f.keys()}
    except Exception as e:  # unreadable or foreign file: start over rather than fail the evaluation
        log.warning("autoattack: ignoring unreadable state %s (%s)", path, e)
        return 0, {}, {}
    if header.get("format") != STATE_FORMAT or header.get("args") != args:
        log.warning("autoattack: ignoring stale state %s (written with %s, now %s)", path, header.get("args"), args)
        return 0, {}, {}
    done = header["finished"]
    if any(a not in flags or len(flags[a]) != size or a not in header["per_attack"] for a in done):
        log.warning("autoattack: ignoring inconsistent state %s", path)
        return 0, {}, {}
    return len(done), flags, header["per_attack"]


@dataclass
class _Plan:
    """What one autoattack() call does on this rank: its arguments, checked, and this rank's points."""
    eps: float
    norm: str
    n: int
    block_size: int
    batch_size: int
    seed: int
    version: str          # the reference's version, with ":attack+attack" for a subset of its attacks
    attacks: tuple
    stop_after: str | None
    device: torch.device
    blocks: range         # this rank's blocks
    lo: int               # this rank's points: global indices lo..hi-1
    hi: int
    args: dict            # what a saved state must have been written with
    path: Path | None     # this rank's state file


def _plan(dataset, eps, norm, batch_size, device, limit, seed, block_size, state_dir, fingerprint, version,
          attacks, stop_after) -> _Plan:
    """The call's arguments checked and this rank's share of the blocks (ValueError for bad arguments)."""
    full = attacks_of(version)
    attacks = full if attacks is None else tuple(attacks)
    if not set(attacks) <= set(full):
        raise ValueError(f"autoattack {version!r} runs {', '.join(full)}; got {', '.join(attacks)}")
    eps, seed = float(eps), int(seed)  # plain types: they go into the JSON header
    n = min(len(dataset), limit) if limit else len(dataset)
    block_size = auto_block_size(n) if block_size is None else block_size
    if norm not in NORMS or not eps >= 0 or batch_size < 1 or block_size < 1:
        raise ValueError(f"autoattack needs norm in {NORMS}, eps >= 0, batch_size >= 1 and block_size >= 1 "
                         f"(got {norm!r}, {eps}, {batch_size}, {block_size})")
    if stop_after is not None and stop_after not in attacks:
        raise ValueError(f"stop_after={stop_after!r} is not one of {attacks}")
    device = torch.device(device)
    if n == 0:
        raise ValueError("autoattack: no points to evaluate")
    rank, world = dist.rank(), dist.world_size()
    blocks = rank_blocks(n, block_size, rank, world)
    lo, hi = min(blocks.start * block_size, n), min(blocks.stop * block_size, n)
    version = version if attacks == full else f"{version}:{'+'.join(attacks)}"
    args = {"eps": eps, "norm": norm, "n": n, "block_size": block_size, "batch_size": batch_size, "seed": seed,
            "version": version, "world_size": world, "rank": rank, "fingerprint": fingerprint}
    path = Path(state_dir) / f"rank{rank}.safetensors" if state_dir is not None else None
    return _Plan(eps, norm, n, block_size, batch_size, seed, version, attacks, stop_after, device,
                 blocks, lo, hi, args, path)


def autoattack(model, dataset, eps: float, norm: str = "Linf", batch_size: int = 500, device="cpu",
               limit: int | None = None, seed: int = 0, block_size: int | None = None, state_dir=None,
               fingerprint: str = "", version: str = "standard", attacks=None, stop_after: str | None = None,
               log=None, say=None) -> dict:
    """Robust accuracy of the unwrapped ``model`` under the AutoAttack cascade of ``version`` (or the
    prefix-ordered subset ``attacks`` of it) on the first ``limit`` points of ``dataset``, summed over
    ranks (see the module docstring). ``block_size`` None: ``auto_block_size(n)``. Rank 0 tells
    ``say`` (default: the log's info) the plan, each attack's result and, at most every 30 s, the
    block it finished. The phases: the clean pass, the state load, one attack at a time over this
    rank's blocks, each followed by the state save."""
    log = log or logging.getLogger("dist_robust")
    tell = (say or log.info) if dist.is_main() else (lambda msg: None)
    p = _plan(dataset, eps, norm, batch_size, device, limit, seed, block_size, state_dir, fingerprint, version,
              attacks, stop_after)
    images = dataset.images[p.lo:p.hi].to(p.device)  # uint8 (4x smaller); chunks go to float as they are used
    y_all = dataset.labels[p.lo:p.hi].to(p.device)
    _announce(p, log, tell)
    result = {"n": p.n, "world_size": dist.world_size(), "eps": p.eps, "norm": p.norm, "version": p.version,
              "block_size": p.block_size, "seed": p.seed, "per_attack": {}, "resumed": []}
    dev = p.device
    devices = [torch.cuda.current_device() if dev.index is None else dev.index] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), attack_mode(model) as net, torch.no_grad():
        n_classes, robust = _clean_pass(net, dataset, images, y_all, p, result)
        k, robust, history = _resume(p, robust, result, log)
        for name in p.attacks[k:]:
            t0 = time.perf_counter()
            atk = build_attack(name, net, p.eps, p.norm, n_classes, p.version.split(":")[0], p.device)
            attacked = int(robust.sum())
            rejected = _attack_blocks(net, atk, name, images, y_all, robust, p, tell, t0)
            history[name] = robust.clone()
            _record(name, robust, attacked, rejected, time.perf_counter() - t0, p, result, log, tell)
            _save_state(p, history, result)
            if name == p.stop_after:
                result["stopped_after"] = name
                break
    final = dist.all_reduce_sum(torch.tensor([robust.sum().item()], dtype=torch.float64))
    result.update(correct=int(final[0]), acc=final[0].item() / p.n)
    return result


def _announce(p: _Plan, log, tell) -> None:
    """The idle-rank warning (rank 0, once) and the plan."""
    world = dist.world_size()
    note = idle_note(p.n, p.block_size, world)
    if note and dist.is_main():
        log.warning(note)
    tell(f"autoattack {p.version} on {p.n} points: {-(-p.n // p.block_size)} block(s) of {p.block_size} over "
         f"{world} rank(s); {', '.join(p.attacks)}")


def _clean_pass(net, dataset, images, y_all, p: _Plan, result: dict) -> tuple[int, torch.Tensor]:
    """(classes, this rank's points classified correctly): cheap and deterministic, so it is recomputed
    rather than stored; the clean counts and the attacks' settings go into ``result``."""
    n_classes = net(_pixels(dataset.images[:1].to(p.device))).shape[1]  # every rank, even an idle one
    result["settings"] = {a: v for a, v in settings(p.version.split(":")[0], p.norm, n_classes).items()
                          if a in p.attacks}
    b = p.batch_size
    robust = torch.cat([net(_pixels(images[i:i + b])).argmax(1) == y_all[i:i + b]
                        for i in range(0, p.hi - p.lo, b)] or [torch.zeros(0, dtype=torch.bool)])
    robust = robust.to(p.device)
    clean = dist.all_reduce_sum(torch.tensor([robust.sum().item()], dtype=torch.float64))
    result["clean"] = {"correct": int(clean[0]), "acc": clean[0].item() / p.n}
    return n_classes, robust


def _resume(p: _Plan, robust: torch.Tensor, result: dict, log) -> tuple[int, torch.Tensor, dict]:
    """(attacks finished by every rank, the robust flags after them, {attack: flags after it}) from the
    saved state; their records go into ``result``."""
    k, saved, records = _load_state(p.path, p.args, p.hi - p.lo, log) if p.path else (0, {}, {})
    k = -int(_gathered_max(-k))  # the min over ranks: roll back to what every rank finished
    history = {}
    for name in p.attacks[:k]:
        history[name] = saved[name].to(p.device) & robust
        result["per_attack"][name] = dict(records[name], resumed=True)
        result["resumed"].append(name)
    if k:
        robust = history[p.attacks[k - 1]].clone()
        log.info("autoattack: resuming after %s (%s)", p.attacks[k - 1], p.path)
    return k, robust, history


def _attack_blocks(net, atk, name, images, y_all, robust, p: _Plan, tell, t0) -> int:
    """One attack on the still-robust points of this rank's blocks, a seeded call per chunk; ``robust``
    is updated in place. Returns the number of outputs outside the eps ball or the [0, 1] box."""
    rejected, every, size = 0, Every(), p.block_size
    for b in p.blocks:
        start = b * size - p.lo
        idx = robust[start:start + size].nonzero().squeeze(1) + start
        for chunk in idx.split(p.batch_size):
            torch.manual_seed(p.seed)  # for draws made before the library reseeds
            atk.seed = p.seed  # the library reseeds torch with it inside perturb, as the reference does
            x, y = _pixels(images[chunk]), y_all[chunk]
            with torch.enable_grad():
                x_adv = atk(x, y).detach()
            ok = within_bounds(x, x_adv, p.eps, p.norm)
            rejected += int((~ok).sum())
            fooled = ok & (net(x_adv).argmax(1) != y)
            robust[chunk[fooled]] = False
        if dist.is_main() and every():  # rank 0's own blocks: the others' need a collective, and rank 0 has the most
            end = min(start + size, p.hi - p.lo)
            where = f"block {b + 1}/{p.blocks.stop}" if dist.world_size() == 1 else f"rank 0 block {b + 1}/{len(p.blocks)}"
            tell(f"autoattack {name}: {where} (points {b * size}-{p.lo + end - 1}): "
                 f"{int(robust[:end].sum())}/{end} robust so far, {time.perf_counter() - t0:.0f} s")
    return rejected


def _record(name, robust, attacked, rejected, elapsed, p: _Plan, result: dict, log, tell) -> None:
    """One finished attack's counts summed over ranks, into ``result["per_attack"]``, and said."""
    counts = dist.all_reduce_sum(torch.tensor([robust.sum().item(), attacked, rejected], dtype=torch.float64))
    rec = {"attacked": int(counts[1]), "robust": int(counts[0]), "acc": counts[0].item() / p.n,
           "rejected": int(counts[2]), "time_s": _gathered_max(elapsed), "resumed": False}
    result["per_attack"][name] = rec
    if rec["rejected"]:
        log.warning("autoattack: %s returned %d points outside the eps ball or the [0, 1] box; "
                    "counted as failed attacks", name, rec["rejected"])
    tell(f"autoattack {name}: {rec['robust']} of {rec['attacked']} attacked points still robust, "
         f"acc {rec['acc']:.4f} ({rec['time_s']:.1f} s)")


def _save_state(p: _Plan, history: dict, result: dict) -> None:
    """This rank's flags after each finished attack and their records, atomically (no state_dir: nothing)."""
    if p.path is None:
        return
    header = {"format": STATE_FORMAT, "args": p.args, "finished": list(history),
              "per_attack": {a: {key: v for key, v in result["per_attack"][a].items() if key != "resumed"}
                             for a in history}}
    tensors = {f"after.{a}": f.to(torch.uint8).cpu() for a, f in history.items()}
    atomic_write(p.path, st_save(tensors, metadata={"header": json.dumps(header)}))


# ---------------------------------------------------------------- the evaluation attacks (registry.py)

class AutoAttackFamily(EvalAttack):
    """``aa``, ``aa-plus``, ``aa-rand``: fra31's standard, plus and rand versions, on the whole split
    (its own blocks and state: ``aa``'s under the state folder, the others' in a folder of their name)."""
    name, shape = "aa", "whole"
    grammar = "aa, aa-plus, aa-rand (AutoAttack's standard, plus and rand versions)"
    VERSIONS = {"": "standard", "-plus": "plus", "-rand": "rand"}  # name suffix -> fra31's version

    def parse(self, name):
        version = self.VERSIONS.get(name.removeprefix(self.name)) if name.startswith(self.name) else None
        return {"version": version} if version else None

    def run(self, model, dataset, name, settings, eps, norm, *, batch_size, device, limit, seed, state_dir,
            fingerprint, block_size, say):
        state_dir = state_dir if state_dir is None or name == "aa" else Path(state_dir) / name
        t0 = time.perf_counter()
        res = autoattack(model, dataset, eps, norm=norm, batch_size=batch_size, device=device, limit=limit,
                         seed=seed, state_dir=state_dir, fingerprint=fingerprint, block_size=block_size,
                         version=settings["version"], say=say)
        return {"correct": res["correct"], "acc": res["acc"], "eps": eps, "norm": norm, "steps": res["settings"],
                "backend": "pyautoattack " + package_version("pyautoattack"), "version": res["version"],
                "block_size": res["block_size"], "seed": seed,
                "per_attack": res["per_attack"], "time_s": time.perf_counter() - t0}


register(AutoAttackFamily())

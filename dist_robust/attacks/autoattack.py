"""Standard AutoAttack (Croce & Hein 2020), sharded exactly over ranks and resumable.

The four attacks are torchattacks' implementations at the paper's standard budgets: APGD-CE (100
iterations), APGD-T (100 iterations for each of the 9 most likely wrong classes, n_classes - 1 when
fewer), FAB-T (100 iterations, the same 9 targets) and Square (5,000 queries), one restart each.
(torchattacks' own ``AutoAttack`` leaves APGD and FAB at their default 10 iterations; we do not.)
The cascade, the sharding and the bookkeeping are ours:

* A point starts robust iff it is classified correctly; each attack runs only on the points still
  robust, and a point stays robust only if the attack's output is classified correctly. We check
  every output ourselves: one outside the eps ball or the [0, 1] box counts as a failed attack (and
  is logged), never as a success. So the result is the per-sample worst case over the cascade.
* Sharding: the first n points are cut into blocks of ``block_size`` consecutive global indices
  (independent of the world size) and every rank takes a contiguous run of whole blocks (sizes
  differ by at most one block; a rank may get none and still joins every collective). No padding.
* Randomness: the library attacks draw their random starts per call (per batch), not per point, so
  we seed torch and the attack's ``seed`` from (seed, attack, first global index of the block, chunk
  number in the block) before every call. Reproducibility is therefore per block of fixed global
  indices, not literally per sample: the counts do not depend on the world size, but they do depend
  on ``block_size`` and on ``batch_size`` (the chunk size inside a block). The caller's RNG state is
  restored afterwards.
* Resume: after each attack every rank saves, atomically, one safetensors file holding its shard's
  robust flags after each finished attack, with a JSON header (arguments, finished attacks, their
  summed counts and times). A restart with the same arguments rolls every rank back to the attacks
  that all ranks finished and continues; a state written with other arguments is ignored (and said
  so). Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torchattacks
from safetensors import safe_open
from safetensors.torch import save as st_save

from .. import dist
from ..data import shard_indices
from ..engine.checkpoint import atomic_write
from .pgd import NORMS, attack_mode

AA_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
STEPS, QUERIES, MAX_TARGETS = 100, 5000, 9  # the paper's standard budgets
STATE_FORMAT = "dist_robust.aa-state/1"
TOL = {"Linf": 1e-6, "L2": 1e-5}  # float slack of the eps-ball check


def build_attack(name: str, net, eps: float, norm: str, n_classes: int):
    """One torchattacks attack as standard AutoAttack configures it. torchattacks targets the
    n_target_classes = n_classes - 1 most likely wrong classes: passing min(n_classes, 10) caps
    them at 9, as the reference implementation does."""
    n_cls = min(n_classes, MAX_TARGETS + 1)
    if name == "apgd-ce":
        return torchattacks.APGD(net, norm=norm, eps=eps, steps=STEPS, n_restarts=1, loss="ce")
    if name == "apgd-t":
        if n_classes < 4:  # its targeted DLR loss reads the 4th largest logit
            raise ValueError(f"apgd-t needs at least 4 classes, the model has {n_classes}")
        return torchattacks.APGDT(net, norm=norm, eps=eps, steps=STEPS, n_restarts=1, n_classes=n_cls)
    if name == "fab-t":
        return torchattacks.FAB(net, norm=norm, eps=eps, steps=STEPS, n_restarts=1, multi_targeted=True,
                                n_classes=n_cls)
    if name == "square":
        return torchattacks.Square(net, norm=norm, eps=eps, n_queries=QUERIES, n_restarts=1)
    raise ValueError(f"unknown AutoAttack attack {name!r} (known: {', '.join(AA_STANDARD)})")


def within_bounds(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Per point: is x_adv in the eps ball around x and in the [0, 1] box? (NaN fails both.)"""
    d = (x_adv - x).flatten(1)
    dist_ = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    flat = x_adv.flatten(1)
    return (dist_ <= eps + TOL[norm]) & (flat >= 0).all(1) & (flat <= 1).all(1)


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


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


def autoattack(model, dataset, eps: float, norm: str = "Linf", batch_size: int = 500, device="cpu",
               limit: int | None = None, seed: int = 0, block_size: int = 500, state_dir=None,
               fingerprint: str = "", attacks=AA_STANDARD, stop_after: str | None = None, log=None) -> dict:
    """Robust accuracy of the unwrapped ``model`` under the AutoAttack cascade on the first ``limit``
    points of ``dataset``, summed over ranks (see the module docstring)."""
    log = log or logging.getLogger("dist_robust")
    attacks, eps, seed = tuple(attacks), float(eps), int(seed)  # plain types: they go into the JSON header
    if norm not in NORMS or not eps >= 0 or batch_size < 1 or block_size < 1:
        raise ValueError(f"autoattack needs norm in {NORMS}, eps >= 0, batch_size >= 1 and block_size >= 1 "
                         f"(got {norm!r}, {eps}, {batch_size}, {block_size})")
    if stop_after is not None and stop_after not in attacks:
        raise ValueError(f"stop_after={stop_after!r} is not one of {attacks}")
    device = torch.device(device)
    n = min(len(dataset), limit) if limit else len(dataset)
    if n == 0:
        raise ValueError("autoattack: no points to evaluate")
    rank, world = dist.rank(), dist.world_size()
    blocks = shard_indices(-(-n // block_size), rank, world)
    lo, hi = min(blocks.start * block_size, n), min(blocks.stop * block_size, n)
    images = dataset.images[lo:hi].to(device)  # uint8 (4x smaller); chunks go to float as they are used
    y_all = dataset.labels[lo:hi].to(device)
    version = "standard" if attacks == AA_STANDARD else "+".join(attacks)
    args = {"eps": eps, "norm": norm, "n": n, "block_size": block_size, "batch_size": batch_size, "seed": seed,
            "version": version, "world_size": world, "rank": rank, "fingerprint": fingerprint}
    path = Path(state_dir) / f"rank{rank}.safetensors" if state_dir is not None else None

    result = {"n": n, "world_size": world, "eps": eps, "norm": norm, "version": version,
              "block_size": block_size, "seed": seed, "per_attack": {}, "resumed": []}
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), attack_mode(model) as net, torch.no_grad():
        # the clean pass: cheap and deterministic, so it is recomputed rather than stored
        n_classes = net(_pixels(dataset.images[:1].to(device))).shape[1]  # every rank, even an idle one
        robust = torch.cat([net(_pixels(images[i:i + batch_size])).argmax(1) == y_all[i:i + batch_size]
                            for i in range(0, hi - lo, batch_size)] or [torch.zeros(0, dtype=torch.bool)])
        robust = robust.to(device)
        clean = dist.all_reduce_sum(torch.tensor([robust.sum().item()], dtype=torch.float64))
        result["clean"] = {"correct": int(clean[0]), "acc": clean[0].item() / n}

        k, saved, records = _load_state(path, args, hi - lo, log) if path else (0, {}, {})
        k = -int(_gathered_max(-k))  # the min over ranks: roll back to what every rank finished
        history = {}
        for name in attacks[:k]:
            history[name] = saved[name].to(device) & robust
            result["per_attack"][name] = dict(records[name], resumed=True)
            result["resumed"].append(name)
        if k:
            robust = history[attacks[k - 1]].clone()
            log.info("autoattack: resuming after %s (%s)", attacks[k - 1], path)

        for name in attacks[k:]:
            t0 = time.perf_counter()
            atk = build_attack(name, net, eps, norm, n_classes)
            attacked = int(robust.sum())
            rejected = 0
            for b in range(blocks.start, blocks.stop):
                start = b * block_size - lo
                idx = robust[start:start + block_size].nonzero().squeeze(1) + start
                for c, chunk in enumerate(idx.split(batch_size)):
                    s = _seed(seed, name, b * block_size, c)
                    torch.manual_seed(s)  # for draws made before the library reseeds
                    atk.seed = s  # the library reseeds torch with it inside perturb
                    x, y = _pixels(images[chunk]), y_all[chunk]
                    with torch.enable_grad():
                        x_adv = atk(x, y).detach()
                    ok = within_bounds(x, x_adv, eps, norm)
                    rejected += int((~ok).sum())
                    fooled = ok & (net(x_adv).argmax(1) != y)
                    robust[chunk[fooled]] = False
            history[name] = robust.clone()
            elapsed = time.perf_counter() - t0
            counts = dist.all_reduce_sum(torch.tensor([robust.sum().item(), attacked, rejected], dtype=torch.float64))
            rec = {"attacked": int(counts[1]), "robust": int(counts[0]), "acc": counts[0].item() / n,
                   "rejected": int(counts[2]), "time_s": _gathered_max(elapsed), "resumed": False}
            result["per_attack"][name] = rec
            if rec["rejected"]:
                log.warning("autoattack: %s returned %d points outside the eps ball or the [0, 1] box; "
                            "counted as failed attacks", name, rec["rejected"])
            log.info("autoattack %s: %d of %d attacked points still robust, acc %.4f (%.1f s)",
                     name, rec["robust"], rec["attacked"], rec["acc"], rec["time_s"])
            if path is not None:
                header = {"format": STATE_FORMAT, "args": args, "finished": list(history),
                          "per_attack": {a: {key: v for key, v in result["per_attack"][a].items() if key != "resumed"}
                                         for a in history}}
                tensors = {f"after.{a}": f.to(torch.uint8).cpu() for a, f in history.items()}
                atomic_write(path, st_save(tensors, metadata={"header": json.dumps(header)}))
            if name == stop_after:
                result["stopped_after"] = name
                break

    final = dist.all_reduce_sum(torch.tensor([robust.sum().item()], dtype=torch.float64))
    result.update(correct=int(final[0]), acc=final[0].item() / n)
    return result

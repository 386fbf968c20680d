"""RiFT as stages of a recipe (configs/rift/): ``rift_mrc`` -> a ``train`` stage that fine-tunes only the
lowest-MRC module (``model.trainable: modules``, ``model.modules: [lowest_mrc]``) -> ``rift_interpolate``.

- ``rift_mrc``: the robust model (``model.init_from``) attacked once with PGD (``attack.*``, each point's
  random start seeded by its index, points sharded over ranks and gathered), then every module's MRC
  (core.module_robust_criticality, modules sharded over ranks). Writes mrc.json/.md/.png and the robust
  model unchanged as the stage's model, so the next stage starts from it. SIGTERM / SIGINT stop every rank
  after a round of modules (one per rank), their entries saved in mrc-state.json; the same command
  measures the others only.
- ``rift_interpolate``: theta(alpha) between the robust model (``stage.robust_from``) and the tuned one
  (``model.init_from``) for each of ``stage.alphas``, clean and robust accuracy on ``stage.select_split``
  (exact, sharded over ranks), the alpha chosen by core.select_alpha; writes alpha_curve.json/.md/.png,
  exports the chosen model and evaluates it like any run (``eval.*`` -> results.json). Each alpha's
  evaluation keeps its blocks' counts (alpha<A>.eval-state.json, until the stage's model is written), so a
  SIGTERM stops every rank at a block and the same command continues from there.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from ... import dist
from ...attacks import attack_kwargs, pgd
from ...attacks.registry import parse_attack
from ...checkpoint import load_checkpoint, read_sidecar, resolve, save_checkpoint
from ...evaluate import _seeded_starts, agreed_signal, eval_attack_opts, evaluate, evaluate_run
from ...models import model_from_state
from ...utils import atomic_write, check, shard_indices
from ...utils.signals import Stopped, StopSignals
from ..base import MODULE_SELECTORS, StageConfig, register_stage
from .core import (
    critical_modules,
    interpolate_state,
    module_robust_criticality,
    rank_modules,
    select_alpha,
    write_alpha_curve,
    write_mrc_table,
)

log = logging.getLogger("dist_robust")


def _check_split(cfg, key: str, split: str) -> None:
    check(split in ("train", "test") or (split == "val" and cfg.data.holdout > 0), key, split,
          "must be train, test, or val with data.holdout > 0")


@dataclass
class MRCConfig(StageConfig):
    eps_w: float = 0.1                  # relative Frobenius radius of one module's weight perturbation
    mrc_epochs: int = 10                # projected gradient-ascent epochs over the adversarial set
    mrc_lr: float = 1.0                 # ascent step (SGD lr on the batch-mean CE)
    mrc_batch_size: int = 512           # ascent batch (part of the method, as in the authors' code)
    mrc_split: str = "train"            # images of the fixed PGD set (attack.*): train | val | test
    mrc_points: int = 1000              # the first N images of that split

    def check(self, cfg, training):
        check(self.eps_w >= 0, "stage.eps_w", self.eps_w, "must be >= 0")
        check(self.mrc_epochs >= 1, "stage.mrc_epochs", self.mrc_epochs, "must be >= 1")
        check(self.mrc_lr > 0, "stage.mrc_lr", self.mrc_lr, "must be > 0")
        check(self.mrc_batch_size >= 1, "stage.mrc_batch_size", self.mrc_batch_size, "must be >= 1")
        check(self.mrc_points >= 1, "stage.mrc_points", self.mrc_points, "must be >= 1")
        _check_split(cfg, "stage.mrc_split", self.mrc_split)
        check(not training or cfg.model.init_from, "model.init_from", cfg.model.init_from,
              "rift_mrc measures a trained model: model.init_from names it")


@dataclass
class InterpolateConfig(StageConfig):
    robust_from: Optional[str] = None   # the robust model (a path, previous or stage:NAME)
    alphas: List[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    select_split: str = "val"           # where the alpha curve is measured (data.holdout)
    select_attack: str = "pgd-10"       # robust accuracy of the curve (eval.eps, eval.norm)
    tau: float = 0.0                    # allowed robust-accuracy drop from alpha = 0

    def check(self, cfg, training):
        check(bool(self.alphas) and 0.0 in self.alphas and all(0 <= x <= 1 for x in self.alphas), "stage.alphas",
              self.alphas, "alphas in [0, 1], 0 (the robust model) included")
        check(self.tau >= 0, "stage.tau", self.tau, "must be >= 0")
        _check_split(cfg, "stage.select_split", self.select_split)
        try:
            iterative = parse_attack(self.select_attack).shape == "batch"
        except ValueError:
            iterative = False
        check(iterative, "stage.select_attack", self.select_attack, "must be a batch attack: pgd-K, cw-K or fgsm")
        check(not training or (self.robust_from and cfg.model.init_from), "stage.robust_from", self.robust_from,
              "rift_interpolate needs the robust model (stage.robust_from) and the tuned one (model.init_from)")


def _model_hash(path: str) -> str:
    """The sha256 its sidecar records for the model a checkpoint path stands for: what saved states are tied to."""
    return read_sidecar(resolve(path))["sha256"]["model"]


def _load(cfg, path: str, device) -> tuple[torch.nn.Module, dict]:
    state, _ = load_checkpoint(path)
    return model_from_state(cfg.model.name, state, **cfg.model.network_kwargs()).to(device).eval(), state


def adversarial_set(model, cfg, data, device) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD examples of the first ``stage.mrc_points`` images of ``data`` (the split ``stage.mrc_split``),
    the same on every rank and for any world size: each rank attacks its shard with per-point seeded
    starts, then all shards are gathered in order."""
    a = cfg.attack
    shard = shard_indices(min(cfg.stage.mrc_points, len(data)), dist.rank(), dist.world_size())
    x = data.images[shard.start:shard.stop].float().div(255).to(device)
    y = data.labels[shard.start:shard.stop].to(device)
    kwargs = {**attack_kwargs(a), "random_init": False, "restarts": 1}
    start = _seeded_starts(x, shard.start, cfg.eval.seed, 0, a.eps, a.norm).to(device) if a.random_start else None
    x_adv = pgd(model, x, y, a.eps, a.steps, delta0=start, **kwargs) if len(x) else x
    parts = dist.all_gather_objects((x_adv.cpu(), y.cpu()))
    return torch.cat([p[0] for p in parts]).to(device), torch.cat([p[1] for p in parts]).to(device)


MRC_STATE = "mrc-state.json"  # the modules measured so far, until mrc.json is written
STATE_FORMAT = "dist_robust.mrc-state/1"


def _finished_modules(path: Path, args: dict) -> dict:
    """The MRC entries a stopped rift_mrc stage saved with these ``args`` ({} if none, or stale)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("args") != args:
        log.warning("rift_mrc: ignoring the state %s of other settings", path)
        return {}
    return state.get("modules", {})


def _save_and_maybe_stop(path: Path, args: dict, total: int, signals: StopSignals):
    """after_round of module_robust_criticality: rank 0 saves the entries so far; a stop signal of any
    rank (one all_reduce) stops every rank here."""
    def after_round(table: dict) -> None:
        signum = agreed_signal(signals.received)
        if dist.is_main():
            atomic_write(path, json.dumps({"format": STATE_FORMAT, "args": args, "modules": table}).encode())
        if signum:
            dist.barrier()
            raise Stopped(signum, f"after the MRC of {len(table)} of {total} modules",
                          f"they are saved in {path}: the same command continues the stage")
    return after_round


@register_stage("rift_mrc", MRCConfig, splits=("mrc_split",))
def rift_mrc(cfg, device, splits: dict) -> dict:
    """The MRC table; SIGTERM / SIGINT stop every rank after a round of modules, whose entries are saved
    (mrc-state.json): the same command measures only the others. ``splits``: the engine's
    {``stage.mrc_split``: its Dataset}."""
    r, folder = cfg.stage, Path(cfg.run.out_dir) / cfg.run.name
    path = folder / MRC_STATE
    args = json.loads(json.dumps({"config": cfg.to_dict(), "model": _model_hash(cfg.model.init_from)}))
    with StopSignals() as signals:  # noted until a round's end (module_robust_criticality)
        model, state = _load(cfg, cfg.model.init_from, device)
        x_adv, y = adversarial_set(model, cfg, splits[r.mrc_split], device)
        names = critical_modules(model)
        done = _finished_modules(path, args)
        log.info("rift_mrc: %d PGD-%d examples of %s/%s, MRC of %d modules on %d ranks%s", len(y), cfg.attack.steps,
                 cfg.data.name, r.mrc_split, len(names), dist.world_size(),
                 f" ({len(done)} measured earlier: {path})" if done else "")
        table = module_robust_criticality(model, x_adv, y, eps_w=r.eps_w, epochs=r.mrc_epochs, lr=r.mrc_lr,
                                          batch_size=r.mrc_batch_size, done=done,
                                          after_round=_save_and_maybe_stop(path, args, len(names), signals))
    if dist.is_main():
        write_mrc_table(table, folder)
        save_checkpoint(folder, "model", state, dict(config=cfg.to_dict(), epoch=0, step=0))
        path.unlink(missing_ok=True)
        order = rank_modules(table)
        log.info("rift_mrc: lowest MRC %s (%.4f), highest %s (%.4f) -> %s", order[0], table[order[0]]["mrc"],
                 order[-1], table[order[-1]]["mrc"], folder / "mrc.md")
    dist.barrier()
    return table


def lowest_mrc_module(init_from: str) -> str:
    """The module a rift_mrc stage ranked least robustness-critical; ``init_from`` is that stage's model."""
    path = resolve(init_from).parent / "mrc.json"
    if not path.is_file():
        raise FileNotFoundError(f"model.modules=[lowest_mrc] needs {path} (model.init_from must be a rift_mrc stage)")
    return json.loads(path.read_text())["modules"][0]["module"]


MODULE_SELECTORS["lowest_mrc"] = lowest_mrc_module


@register_stage("rift_interpolate", InterpolateConfig, sources=("robust_from",), splits=("select_split",))
def rift_interpolate(cfg, device, splits: dict) -> dict:
    """The alpha curve on ``splits[stage.select_split]`` (the engine loads it), the chosen model, its results."""
    r, e, folder = cfg.stage, cfg.eval, Path(cfg.run.out_dir) / cfg.run.name
    model, tuned = _load(cfg, cfg.model.init_from, device)
    robust, _ = load_checkpoint(r.robust_from)
    val = splits[r.select_split]
    eps, norm = cfg.attack.eps if e.eps is None else e.eps, cfg.attack.norm if e.norm is None else e.norm
    pair = f"{_model_hash(r.robust_from)}+{_model_hash(cfg.model.init_from)}"
    states = [folder / f"alpha{alpha:g}.eval-state.json" for alpha in sorted(r.alphas)]
    curve = []
    for alpha, state in zip(sorted(r.alphas), states):  # each alpha resumable per block (evaluate's state)
        model.load_state_dict(interpolate_state(robust, tuned, alpha))
        res = evaluate(model, val, ["clean", r.select_attack], eps, cfg.data.eval_batch_size, device, seed=e.seed,
                       norm=norm, restarts=e.restarts, attack_opts=eval_attack_opts(cfg), state=state,
                       fingerprint=f"{pair}@{alpha!r}", state_key={"dataset": cfg.data.name, "split": r.select_split})
        curve.append({"alpha": alpha, "clean": res["clean"]["acc"], "robust": res["attacks"][r.select_attack]["acc"],
                      "n": res["n"]})
        log.info("rift_interpolate: alpha %.2f  clean %.4f  %s %.4f  (%s, n=%d)", alpha, curve[-1]["clean"],
                 r.select_attack, curve[-1]["robust"], r.select_split, res["n"])
    chosen = select_alpha(curve, r.tau)
    model.load_state_dict(interpolate_state(robust, tuned, chosen))
    if dist.is_main():
        write_alpha_curve(curve, chosen, folder)
        save_checkpoint(folder, "model", model.state_dict(), dict(config=cfg.to_dict(), epoch=0, step=0, alpha=chosen))
        for state in states:
            state.unlink(missing_ok=True)
        log.info("rift_interpolate: chosen alpha %.2f (tau %.4g) -> %s", chosen, r.tau, folder / "alpha_curve.md")
    dist.barrier()
    if e.at_end:
        evaluate_run(cfg, model, device, checkpoint=str(folder / "model.json"), out=folder / "results.json")
    return {"alpha": chosen, "curve": curve}

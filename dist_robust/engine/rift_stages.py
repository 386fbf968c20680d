"""RiFT as stages of a recipe (configs/rift/): ``rift_mrc`` -> a ``train`` stage that fine-tunes only the
lowest-MRC module (``model.trainable: modules``, ``model.modules: [lowest_mrc]``) -> ``rift_interpolate``.

- ``rift_mrc``: the robust model (``model.init_from``) attacked once with PGD (``attack.*``, each point's
  random start seeded by its index, points sharded over ranks and gathered), then every module's MRC
  (rift.module_robust_criticality, modules sharded over ranks). Writes mrc.json/.md/.png and the robust
  model unchanged as the stage's model, so the next stage starts from it.
- ``rift_interpolate``: theta(alpha) between the robust model (``rift.robust_from``) and the tuned one
  (``model.init_from``) for each of ``rift.alphas``, clean and robust accuracy on ``rift.select_split``
  (exact, sharded over ranks), the alpha chosen by rift.select_alpha; writes alpha_curve.json/.md/.png,
  exports the chosen model and evaluates it like any run (``eval.*`` -> results.json).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .. import dist
from ..attacks import attack_kwargs, pgd
from ..config import Config, to_dict
from ..data import load_split
from ..utils import shard_indices
from ..models import model_from_state
from ..rift import (critical_modules, interpolate_state, module_robust_criticality, rank_modules, select_alpha,
                    write_alpha_curve, write_mrc_table)
from ..checkpoint import load_checkpoint, resolve, save_checkpoint
from .evaluate import _seeded_starts, eval_attack_opts, evaluate
from .train import evaluate_run

log = logging.getLogger("dist_robust")


def _load(cfg: Config, path: str, device) -> tuple[torch.nn.Module, dict]:
    state, _ = load_checkpoint(path)
    return model_from_state(cfg.model.name, state).to(device).eval(), state


def adversarial_set(model, cfg: Config, device) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD examples of the first ``rift.mrc_points`` images of ``rift.mrc_split``, the same on every
    rank and for any world size: each rank attacks its shard with per-point seeded starts, then all
    shards are gathered in order."""
    data, a = load_split(cfg.data, cfg.rift.mrc_split), cfg.attack
    shard = shard_indices(min(cfg.rift.mrc_points, len(data)), dist.rank(), dist.world_size())
    x = data.images[shard.start:shard.stop].float().div(255).to(device)
    y = data.labels[shard.start:shard.stop].to(device)
    kwargs = {**attack_kwargs(a), "random_init": False, "restarts": 1}
    start = _seeded_starts(x, shard.start, cfg.eval.seed, 0, a.eps, a.norm).to(device) if a.random_start else None
    x_adv = pgd(model, x, y, a.eps, a.steps, delta0=start, **kwargs) if len(x) else x
    parts = dist.all_gather_objects((x_adv.cpu(), y.cpu()))
    return torch.cat([p[0] for p in parts]).to(device), torch.cat([p[1] for p in parts]).to(device)


def rift_mrc(cfg: Config, device) -> dict:
    r, folder = cfg.rift, Path(cfg.run.out_dir) / cfg.run.name
    model, state = _load(cfg, cfg.model.init_from, device)
    x_adv, y = adversarial_set(model, cfg, device)
    log.info("rift_mrc: %d PGD-%d examples of %s/%s, MRC of %d modules on %d ranks", len(y), cfg.attack.steps,
             cfg.data.name, r.mrc_split, len(critical_modules(model)), dist.world_size())
    table = module_robust_criticality(model, x_adv, y, eps_w=r.eps_w, epochs=r.mrc_epochs, lr=r.mrc_lr,
                                      batch_size=r.mrc_batch_size)
    if dist.is_main():
        write_mrc_table(table, folder)
        save_checkpoint(folder, "model", state, dict(config=to_dict(cfg), epoch=0, step=0))
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


def rift_interpolate(cfg: Config, device) -> dict:
    r, e, folder = cfg.rift, cfg.eval, Path(cfg.run.out_dir) / cfg.run.name
    model, tuned = _load(cfg, cfg.model.init_from, device)
    robust, _ = load_checkpoint(r.robust_from)
    val = load_split(cfg.data, r.select_split)
    eps, norm = cfg.attack.eps if e.eps is None else e.eps, cfg.attack.norm if e.norm is None else e.norm
    curve = []
    for alpha in sorted(r.alphas):
        model.load_state_dict(interpolate_state(robust, tuned, alpha))
        res = evaluate(model, val, ["clean", r.select_attack], eps, cfg.data.eval_batch_size, device, seed=e.seed,
                       norm=norm, restarts=e.restarts, attack_opts=eval_attack_opts(cfg))
        curve.append({"alpha": alpha, "clean": res["clean"]["acc"], "robust": res["attacks"][r.select_attack]["acc"],
                      "n": res["n"]})
        log.info("rift_interpolate: alpha %.2f  clean %.4f  %s %.4f  (%s, n=%d)", alpha, curve[-1]["clean"],
                 r.select_attack, curve[-1]["robust"], r.select_split, res["n"])
    chosen = select_alpha(curve, r.tau)
    model.load_state_dict(interpolate_state(robust, tuned, chosen))
    if dist.is_main():
        write_alpha_curve(curve, chosen, folder)
        save_checkpoint(folder, "model", model.state_dict(), dict(config=to_dict(cfg), epoch=0, step=0, alpha=chosen))
        log.info("rift_interpolate: chosen alpha %.2f (tau %.4g) -> %s", chosen, r.tau, folder / "alpha_curve.md")
    dist.barrier()
    if e.at_end:
        evaluate_run(cfg, model, device, checkpoint=str(folder / "model.json"), out=folder / "results.json")
    return {"alpha": chosen, "curve": curve}

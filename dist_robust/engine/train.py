"""The training loop: one method, DDP, per-iteration LR, a checkpoint each epoch, evaluation at the end.

Read top to bottom: build data, model and method -> resume -> for each epoch: for each batch:
set lr, method loss, backward, step -> checkpoint -> export -> exact sharded evaluation.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import dist
from ..config import Config, to_dict, to_yaml
from ..data import TrainLoader, load_split
from ..methods import build_method
from ..models import build_model, load_backbone
from ..models.dual_bn import export_plain
from ..models.partial import configure_finetuning
from ..models.sync_bn import convert_sync_bn
from ..report import JsonlLog
from ..schedules import lr_at
from .checkpoint import (atomic_write, last_good, load_checkpoint, read_sidecar, resolve, rng_state,
                         save_checkpoint, set_rng_state)
from .evaluate import evaluate, write_results

log = logging.getLogger("dist_robust")


def build(cfg: Config, device: torch.device):
    """Dataset and model of a run (the model on ``device``, with its source backbone if any)."""
    train_set = load_split(cfg.data, "train")
    info = train_set.info
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.name, info.channels, info.num_classes, info.mean, info.std,
                        image_size=info.size)
    if cfg.model.init_from:
        state, meta = load_checkpoint(cfg.model.init_from)
        load_backbone(model, state, new_head=cfg.model.new_head)
        log.info("initialised from %s (trained on %s)", cfg.model.init_from,
                 meta.get("config", {}).get("data", {}).get("name", "?"))
    return train_set, model.to(device)


def _progress(iterable, total, desc):
    """A tqdm bar on rank 0 when stderr is a terminal; plain iteration otherwise."""
    if dist.is_main() and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return iterable


def train(cfg: Config, device: torch.device) -> dict | None:
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt_dir = run_dir / "checkpoints"
    rank, world = dist.rank(), dist.world_size()
    train_set, model = build(cfg, device)
    method = build_method(cfg)
    m = cfg.model
    if m.sync_bn:  # before the BN policies: frozen layers keep their hooks and stay local in eval mode
        model = convert_sync_bn(model)
    tuned_bn = m.tuned_bn if m.tuned_bn != "auto" else ("dual" if method.uses_dual_bn else "train")
    modules = m.modules
    if modules == ["lowest_mrc"]:
        from .rift_stages import lowest_mrc_module
        modules = [lowest_mrc_module(m.init_from)]
        log.info("fine-tuning only %s, the lowest-MRC module of %s", modules[0], m.init_from)
    model = method.prepare(configure_finetuning(model, m.trainable, m.last_k, m.frozen_bn, tuned_bn, modules).to(device))
    o = cfg.optim
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay, nesterov=o.nesterov)
    loader = TrainLoader(train_set, cfg.data.batch_size // world, rank, world, seed=cfg.train.seed,
                         crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, device=device,
                         subset=cfg.data.subset)
    steps_per_epoch, epochs = len(loader), cfg.train.epochs
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # each rank draws its own attack noise
    start_epoch, step = 0, 0
    sidecar = last_good(ckpt_dir) if cfg.train.resume == "auto" and ckpt_dir.is_dir() else None
    if sidecar is not None:
        state, meta = load_checkpoint(sidecar, optimizer=opt)
        model.load_state_dict(state)
        start_epoch, step = meta["epoch"], meta["step"]
        if len(meta["rng"]) == world:  # same layout: continue each rank's random stream exactly
            set_rng_state(meta["rng"][rank])
        log.info("resumed from %s: epoch %d, step %d, lr %.4g", sidecar, start_epoch, step,
                 lr_at(step, steps_per_epoch, o, epochs))
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", to_yaml(cfg).encode())
    journal = JsonlLog(run_dir / "log.jsonl" if dist.is_main() else None)
    # The training forward goes through DDP; attacks use the unwrapped `model`. Gradients as views of
    # DDP's buckets save a copy per step (and avoid its stride warning on 1-channel convs).
    train_model = model if world == 1 else DDP(
        model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    log.info("%s: %s on %s (%d images, %d ranks, %d steps/epoch), method %s, device %s", cfg.run.name,
             cfg.model.name, cfg.data.name, loader.num_points, world, steps_per_epoch, cfg.method.name, device)

    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        model.train()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, n
        t0 = time.perf_counter()
        for x, y in _progress(loader, steps_per_epoch, f"epoch {epoch + 1}/{epochs}"):
            lr = lr_at(step, steps_per_epoch, o, epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, metrics = method.loss(train_model, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} (epoch {epoch + 1}); "
                                         "no checkpoint written from this state")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            totals += torch.stack([metrics["loss_sum"].double().cpu(), metrics["correct"].double().cpu(),
                                   metrics["n"].double().cpu()])
            if step % cfg.train.log_every == 0:
                journal.write(kind="step", epoch=epoch + 1, step=step, lr=lr, loss=loss.item())
        dist.all_reduce_sum(totals)
        seconds = time.perf_counter() - t0
        summary = dict(epoch=epoch + 1, step=step, lr=lr, loss=totals[0].item() / totals[2].item(),
                       train_acc=totals[1].item() / totals[2].item(), seconds=seconds,
                       images_per_s=totals[2].item() / seconds)
        journal.write(kind="epoch", **summary)
        log.info("epoch %d/%d  loss %.4f  train acc %.4f  %.0f img/s  %.1fs", epoch + 1, epochs,
                 summary["loss"], summary["train_acc"], summary["images_per_s"], seconds)
        rngs = dist.all_gather_objects(rng_state())
        if dist.is_main():
            save_checkpoint(ckpt_dir, f"epoch_{epoch + 1:04d}", model.state_dict(),
                            dict(config=to_dict(cfg), epoch=epoch + 1, step=step, rng=rngs, metrics=summary),
                            optimizer=opt)
        dist.barrier()

    exported = export_plain(method.export(model))  # plain BN layers: dual -> adaptive wing, sync -> local
    final = run_dir / "model.json"
    if dist.is_main():
        save_checkpoint(run_dir, "model", exported.state_dict(), dict(config=to_dict(cfg), epoch=epochs, step=step))
    dist.barrier()
    if not cfg.eval.at_end:
        return None
    return evaluate_run(cfg, exported, device, checkpoint=str(final), out=run_dir / "results.json",
                        journal=journal)


def evaluate_run(cfg: Config, model, device, checkpoint: str, out: Path, journal=None) -> dict:
    """Evaluate ``model`` (saved at ``checkpoint``) on cfg's dataset and eval settings; rank 0 writes
    ``out``. AutoAttack keeps its resumable state next to ``out``."""
    e, a = cfg.eval, cfg.attack
    test_set = load_split(cfg.data, e.split)
    eps = a.eps if e.eps is None else e.eps
    norm = a.norm if e.norm is None else e.norm
    fingerprint = read_sidecar(resolve(checkpoint))["sha256"]["model"]
    t0 = time.perf_counter()
    counts = evaluate(model, test_set, e.attacks, eps, cfg.data.eval_batch_size, device, limit=e.limit,
                      seed=e.seed, norm=norm, restarts=e.restarts,
                      attack_opts=dict(compile=a.compile, precision=a.precision, channels_last=a.channels_last),
                      aa_state_dir=out.with_name(out.stem + ".aa-state"), fingerprint=fingerprint,
                      progress=lambda it: _progress(it, None, "eval"), aa_block_size=e.aa_block_size)
    results = {"dataset": cfg.data.name, "split": e.split, **counts, "checkpoint": checkpoint,
               "seconds": time.perf_counter() - t0, "config": to_dict(cfg)}
    if dist.is_main():
        write_results(out, results)
        if journal is not None:
            journal.write(kind="eval", **{k: results[k] for k in ("n", "clean", "attacks")})
        line = "  ".join([f"clean {results['clean']['acc']:.4f}"] +
                         [f"{k} {v['acc']:.4f}" for k, v in results["attacks"].items()])
        log.info("eval on %s/%s (n=%d, %s eps=%.4g): %s -> %s", cfg.data.name, e.split, results["n"], norm, eps,
                 line, out)
    return results

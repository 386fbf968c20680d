"""The training loop: one method, DDP or DeepSpeed, per-iteration LR, a checkpoint each epoch, evaluation
at the end.

Read top to bottom, as torchvision's reference scripts: ``setup`` (build data, model and method ->
resume the weights -> wrap (DDP or DeepSpeed) -> resume the optimizer), ``train_one_epoch`` (for each
batch: set lr, method loss, backward, step, a checkpoint every train.checkpoint_every steps), a
checkpoint per epoch, ``export_and_evaluate`` (model.json, then exact sharded evaluation).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import dist
from ..checkpoint import (
    CheckpointError,
    last_good,
    load_checkpoint,
    load_optimizer,
    load_rank_buffers,
    mid_epoch_layout,
    prune_epoch_checkpoints,
    read_sidecar,
    remove_step_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ..config import Config, from_dict
from ..data import data_info, data_stats, load_split
from ..data.select import resolve_loader, train_loader
from ..evaluate import eval_attack_opts, eval_radius, evaluate, evaluate_run
from ..methods import MODULE_SELECTORS, build_method
from ..models import build_model, head_classes, load_backbone, load_state_strict, model_from_state
from ..models.dual_bn import export_plain
from ..models.external import normalize_stats
from ..models.partial import configure_finetuning
from ..models.sync_bn import convert_sync_bn
from ..report import JsonlLog, progress
from ..schedules import lr_at
from ..tensorboard import RunLog, forget_after
from ..utils import atomic_write, autocast
from .preempt import Stopped, StopSignals

log = logging.getLogger("dist_robust")


def build(cfg: Config, device: torch.device):
    """Dataset and model of a run (the model on ``device``, with its source backbone if any). The
    dataset is None when the run reads a .beton (data.loader=ffcv): then nothing is loaded here."""
    if resolve_loader(cfg.data) == "ffcv":
        train_set, info = None, data_info(cfg.data)
    else:
        train_set = load_split(cfg.data, "train")
        info = train_set.info
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    dataset = cfg.model.normalize == "dataset"  # imagefolder's statistics: computed from its training images
    mean, std = normalize_stats(cfg.model.normalize, *(data_stats(cfg.data) if dataset else (info.mean, info.std)))
    if dataset and info.mean is None:  # the model's buffers keep them: its evaluation reads them from there
        log.info("model.normalize=dataset: mean %s, std %s of %s's training images", _rounded(mean),
                 _rounded(std), info.name)
    model = build_model(cfg.model.name, info.channels, info.num_classes, mean, std, image_size=info.size,
                        weights=cfg.model.weights, new_head=cfg.model.new_head, **cfg.model.network_kwargs())
    if cfg.model.weights:
        log.info("%s: weights from %s (%s head)", cfg.model.name, cfg.model.weights,
                 "a new" if cfg.model.new_head else "their")
    if cfg.model.init_from:
        state, meta = load_checkpoint(cfg.model.init_from)
        load_backbone(model, state, new_head=cfg.model.new_head)
        log.info("initialised from %s (trained on %s)", cfg.model.init_from,
                 meta.get("config", {}).get("data", {}).get("name", "?"))
    return train_set, model.to(device)


def _rounded(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _images(cfg: Config) -> str:
    """What the start line says of the images: imagefolder's size and channels may come from its files."""
    info, d = data_info(cfg.data), cfg.data
    found = [what for what, key in (("size", d.image_size), ("channels", d.channels)) if key is None]
    return (f"{info.channels}-channel {info.size}x{info.size} images" +
            (f" ({' and '.join(found)} from the training images)" if d.name == "imagefolder" and found else ""))


def training_form(cfg: Config, model, method, device: torch.device):
    """A built model in the form its run trains and checkpoints: synchronised BN, the fine-tuning part
    and its BN policies (TWINS' two wings), then the method's own changes (CARTL's spectral norm, Adv-SS'
    pretext network). ``export_plain(method.export(...))`` turns it back into a plain model."""
    m = cfg.model
    if m.sync_bn:  # before the BN policies: frozen layers keep their hooks and stay local in eval mode
        model = convert_sync_bn(model)
    tuned_bn = m.tuned_bn if m.tuned_bn != "auto" else ("dual" if method.uses_dual_bn else "train")
    modules = m.modules
    if modules and modules[0] in MODULE_SELECTORS:  # a method's selector (RiFT's lowest_mrc) names the module
        modules = [MODULE_SELECTORS[modules[0]](m.init_from)]
        log.info("fine-tuning only %s, model.modules=%s of %s", modules[0], m.modules[0], m.init_from)
    return method.prepare(configure_finetuning(model, m.trainable, m.last_k, m.frozen_bn, tuned_bn, modules).to(device))


def exported_model(sidecar: Path, device: torch.device) -> torch.nn.Module:
    """The plain model that a checkpoint stands for. An exported model (``model.json``) loads as it is.
    A training checkpoint (epoch or step) holds the training form, which may not be a plain model's
    (TWINS' two BN wings, CARTL's spectral-norm parametrisation): it is rebuilt from the run's config
    and exported exactly as the run's end exports, so the last epoch's checkpoint is the run's model."""
    state, meta = load_checkpoint(sidecar)
    cfg = from_dict(meta["config"])
    sizes = cfg.model.network_kwargs()  # a timm ViT's img_size and patch_size: its weights' shapes
    if "train_file" not in meta:
        return model_from_state(cfg.model.name, state, **sizes).to(device)
    channels = state["normalize.mean"].numel()
    classes = head_classes({k: v.shape for k, v in state.items()})
    model = build_model(cfg.model.name, channels, classes, [0.0] * channels, [1.0] * channels, **sizes)
    method = build_method(cfg)
    model = training_form(cfg, model, method, device)
    load_state_strict(model, state, cfg.model.name)
    return export_plain(method.export(model))


def step_flags(loss: torch.Tensor, signalled: int | None) -> tuple[list[int], int | None]:
    """(the ranks whose loss is NaN or infinite, the stop signal a rank received or None), known to every
    rank from one all_reduce of two flags per rank: a rank that stopped alone would leave the others
    waiting in DDP's all_reduce until the timeout.

    The training loop's one host sync per step, and one it cannot drop: the loss must be known finite
    before the update (a non-finite one stops the run before it), and every rank must stop at the same
    step, so the host reads the reduced flags before it calls the optimizer (bench/host_syncs.py: 33 us
    a call on 2 CPU cores in a 1-rank gloo group; the metrics' sums no longer add a sync per step)."""
    flags = torch.zeros(2, dist.world_size(), device=loss.device)
    flags[0, dist.rank()] = (~torch.isfinite(loss.detach())).float()
    flags[1, dist.rank()] = signalled or 0
    nonfinite, signals = dist.all_reduce_sum(flags).tolist()
    return [r for r, f in enumerate(nonfinite) if f], int(max(signals)) or None


class DDPTrainer:
    """The DDP engine: ``model`` (the training forward, which synchronises gradients), ``optimizer``,
    ``step(loss)`` and ``scaler`` (fp16's loss scaler, else None); engine/deepspeed.py has the same for
    DeepSpeed."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device, train_cfg):
        # Gradients as views of DDP's buckets save a copy per step (and avoid its stride warning on
        # 1-channel convs).
        self.model = model if dist.world_size() == 1 else DDP(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        self.optimizer = opt
        self.scaler = LossScaler(device, train_cfg.loss_scale) if train_cfg.precision == "fp16" else None

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.step(loss, self.optimizer)


class LossScaler:
    """fp16's dynamic loss scale (torch.amp.GradScaler) and the count of the steps it skipped. A step
    whose scaled gradients overflow is skipped and the scale halved; every rank skips the same steps,
    since DDP gives every rank the same gradients. ``state`` goes into each checkpoint's sidecar."""

    def __init__(self, device: torch.device, init_scale: float):
        self.grad_scaler = torch.amp.GradScaler(device.type, init_scale=init_scale)
        self.skipped = 0

    def step(self, loss: torch.Tensor, optimizer) -> None:
        self.grad_scaler.scale(loss).backward()
        scale = self.scale
        self.grad_scaler.step(optimizer)  # skips optimizer.step() when a gradient is inf or NaN
        self.grad_scaler.update()
        self.skipped += self.scale < scale  # the scale only falls on an overflow

    @property
    def scale(self) -> float:
        return self.grad_scaler.get_scale()

    def state(self) -> dict:
        return dict(self.grad_scaler.state_dict(), skipped=self.skipped)

    def load(self, state: dict) -> None:
        state = dict(state)
        self.skipped = state.pop("skipped")
        self.grad_scaler.load_state_dict(state)


def _resume(sidecar: Path, model, steps_per_epoch: int) -> tuple[int, int, int, list | None, dict]:
    """Load a training checkpoint's weights into ``model`` (the optimizer's state follows once the engine
    is built); returns (epoch, batch inside it, step, this rank's running epoch totals or None, this
    rank's own buffers) and restores this rank's RNG stream. Each rank's RNG and buffers continue
    exactly when the world size is the one that wrote it."""
    rank, world = dist.rank(), dist.world_size()
    state, meta = load_checkpoint(sidecar)
    model.load_state_dict(state)
    batch, totals, buffers = 0, None, {}
    if "batch" in meta:  # inside an epoch: only the same batch layout continues exactly
        if (meta["steps_per_epoch"], len(meta["rng"])) != (steps_per_epoch, world):
            raise CheckpointError(f"{sidecar} was written inside an epoch by {len(meta['rng'])} ranks with "
                                  f"{meta['steps_per_epoch']} steps/epoch; this run has {world} and "
                                  f"{steps_per_epoch}: resume with the same world size and batch, or "
                                  "train.resume=auto_epoch to continue from the last epoch checkpoint")
        batch, totals = meta["batch"], meta["totals"][rank]
    if len(meta["rng"]) == world:
        set_rng_state(meta["rng"][rank])
        buffers = load_rank_buffers(sidecar, rank)
    return meta["epoch"], batch, meta["step"], totals, buffers


def _continues(meta: dict, cfg: Config, steps_per_epoch: int) -> bool:
    """Whether this launch continues a checkpoint exactly: any epoch checkpoint; one written inside an
    epoch only with its world size, batch, subset and holdout (and so its steps per epoch)."""
    now = (dist.world_size(), cfg.data.batch_size, cfg.data.subset, cfg.data.holdout)
    return "batch" not in meta or (mid_epoch_layout(meta) == now and meta.get("steps_per_epoch") == steps_per_epoch)


def _epoch_instead(sidecar: Path, cfg: Config) -> Path | None:
    """train.resume=auto_epoch and a newest checkpoint written inside an epoch by another layout: the last
    good epoch checkpoint instead (None: the first epoch never ended, the run starts over). The step
    checkpoints of that layout are removed (rank 0, once every rank has chosen), so that a later resume
    never meets them again; one log line says what is trained again."""
    meta = read_sidecar(sidecar)
    epoch = last_good(sidecar.parent, epochs_only=True)
    step = read_sidecar(epoch)["step"] if epoch else 0
    ranks, batch, subset, holdout = mid_epoch_layout(meta)
    log.info("train.resume=auto_epoch: %s was written inside epoch %d by %d ranks (data.batch_size=%s, subset=%s, "
             "holdout=%s; this launch: %d, %s, %s, %s); continuing from %s, its %d later steps trained again",
             sidecar.name, meta["epoch"] + 1, ranks, batch, subset, holdout, dist.world_size(), cfg.data.batch_size,
             cfg.data.subset, cfg.data.holdout, epoch.name if epoch else "the start", meta["step"] - step)
    dist.barrier()
    if dist.is_main():
        remove_step_checkpoints(sidecar.parent)
        if epoch is None:  # trained again from the first step: logged once, by this run
            forget_after(sidecar.parent.parent / "log.jsonl", 0)
    return epoch


EPOCH_KEYS = ("epoch", "step", "lr", "loss", "train_acc", "seconds", "images_per_s")


def _totals(saved) -> dict:
    """A checkpoint's running sums of one rank (a list [loss_sum, correct, n] in checkpoints written
    before methods could return metrics of their own)."""
    if isinstance(saved, list):
        saved = dict(zip(("loss_sum", "correct", "n"), saved))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in saved.items()}


def host_totals(totals: dict) -> dict:
    """The running sums (float64 tensors, on the training device or the CPU) as Python floats, read with
    one device-to-host copy: the loop keeps them on the device and reads them only at its log steps,
    checkpoints and the epoch's end."""
    names = list(totals)
    values = [torch.as_tensor(totals[k], dtype=torch.float64).reshape(()) for k in names]
    device = next((v.device for v in values if v.device.type != "cpu"), torch.device("cpu"))
    return dict(zip(names, torch.stack([v.to(device) for v in values]).tolist())) if names else {}


def epoch_summary(totals: dict, seconds: float, trained=None, **where) -> dict:
    """Every metric the method returned (``totals``: this rank's sums, tensors or floats), summed over all
    ranks (one all_reduce) and divided by the images seen: loss_sum -> loss, correct -> train_acc, any
    other ``X_sum`` -> X, a count -> its rate.
    images_per_s: the images trained in ``seconds``, ``trained`` of this rank (default: its ``n``); after
    a mid-epoch resume ``n`` also counts the images an earlier process trained."""
    names = sorted(totals)
    host = host_totals(totals)
    own = host["n"] if trained is None else float(trained)
    sums = torch.tensor([host[k] for k in names] + [own], dtype=torch.float64)
    *sums, images = dist.all_reduce_sum(sums).tolist()
    summed = dict(zip(names, sums))
    n = summed["n"]
    out = dict(where, loss=summed["loss_sum"] / n, train_acc=summed["correct"] / n)
    out.update({k.removesuffix("_sum"): v / n for k, v in summed.items() if k not in ("loss_sum", "correct", "n")})
    return dict(out, seconds=seconds, images_per_s=images / seconds)


@dataclass
class Run:
    """A training run's state between its steps: what ``train_one_epoch`` and ``save`` work on."""
    cfg: Config
    model: torch.nn.Module          # the plain module (attacks, checkpoints)
    method: object
    trainer: object                 # DDPTrainer or DeepSpeedTrainer: the training forward, optimizer, step
    loader: object
    journal: JsonlLog
    step: int = 0                   # optimizer steps taken
    start_epoch: int = 0            # where this process starts (a resumed run: the checkpoint's place)
    start_batch: int = 0
    resumed_totals: dict | list | None = None
    selection: dict = field(default_factory=dict)  # validation: {"best": {epoch, acc, ...}, "last": {...}}
    signals: StopSignals = field(default_factory=StopSignals)  # SIGTERM / SIGINT noted during the loop
    stop: int | None = None         # a stop signal every rank honours: after this step (at an epoch end, its checkpoint)
    val_set: object = None          # the held-out split, loaded at the first validation

    @property
    def folder(self) -> Path:
        return Path(self.cfg.run.out_dir) / self.cfg.run.name

    def save(self, stem: str, **meta) -> None:
        """A training checkpoint; on every rank (the gathers are collectives), written by rank 0."""
        rngs = dist.all_gather_objects(rng_state())
        world = dist.world_size()
        buffers = dist.all_gather_objects({k: v.cpu() for k, v in self.model.named_buffers()}) if world > 1 else None
        opt_state = self.trainer.optimizer.state_dict()  # ZeRO: assembled from every rank's partition
        if self.trainer.scaler is not None:
            meta["scaler"] = self.trainer.scaler.state()
        if dist.is_main():
            save_checkpoint(self.folder / "checkpoints", stem, self.model.state_dict(),
                            dict(config=self.cfg.to_dict(), rng=rngs, **meta), optimizer_state=opt_state,
                            rank_buffers=buffers)
        dist.barrier()


def setup(cfg: Config, device: torch.device) -> Run:
    """Build the run (data, model in its training form, method, optimizer, engine) and continue it from
    its last good checkpoint if it has one (train.resume=auto; auto_epoch: a checkpoint written inside an
    epoch by another layout gives way to the last epoch checkpoint)."""
    rank, world = dist.rank(), dist.world_size()
    train_set, model = build(cfg, device)
    method = build_method(cfg)
    model = training_form(cfg, model, method, device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay, nesterov=o.nesterov)
    loader = train_loader(cfg.data, cfg.data.batch_size // world, rank, world, cfg.train.seed, device, train_set)
    steps_per_epoch = len(loader)
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # each rank draws its own attack noise
    folder = Path(cfg.run.out_dir) / cfg.run.name
    ckpt_dir = folder / "checkpoints"
    sidecar = last_good(ckpt_dir) if cfg.train.resume != "never" and ckpt_dir.is_dir() else None
    if sidecar and cfg.train.resume == "auto_epoch" and not _continues(read_sidecar(sidecar), cfg, steps_per_epoch):
        sidecar = _epoch_instead(sidecar, cfg)
    start_epoch, start_batch, step, resumed_totals, own_buffers = (
        _resume(sidecar, model, steps_per_epoch) if sidecar else (0, 0, 0, None, {}))
    if sidecar:
        where = f"epoch {start_epoch + 1}, batch {start_batch}" if start_batch else f"epoch {start_epoch}"
        log.info("resumed from %s: %s, step %d, lr %.4g", sidecar, where, step,
                 lr_at(step, steps_per_epoch, o, cfg.train.epochs))
    if dist.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "config.yaml", cfg.to_yaml().encode())
    if sidecar and dist.is_main():  # the steps after the checkpoint are trained again: logged once, by this run
        forget_after(folder / "log.jsonl", step)
    journal = RunLog(folder if dist.is_main() else None, step)  # log.jsonl and TensorBoard (tb/)
    if sidecar:
        journal.write(kind="resume", step=step, epoch=start_epoch + (1 if start_batch else 0), batch=start_batch,
                      checkpoint=str(sidecar))
    # The training forward goes through the engine's wrapper; attacks use the unwrapped `model`.
    if cfg.dist.engine == "deepspeed":
        from .deepspeed import DeepSpeedTrainer
        trainer = DeepSpeedTrainer(model, opt, cfg, cfg.data.batch_size // world)
    else:
        trainer = DDPTrainer(model, opt, device, cfg.train)
        if cfg.train.compile:  # the wrapper compiled, as torch's DDP notes advise; attacks stay on `model`
            trainer.model = torch.compile(trainer.model)
    if sidecar:  # the engine holds the optimizer's state now (ZeRO: partitioned over the ranks)
        load_optimizer(sidecar, trainer.optimizer)
        scaler_state = read_sidecar(sidecar).get("scaler")
        if trainer.scaler is not None and scaler_state is not None:  # else a fresh scale (an fp32/bf16 checkpoint)
            trainer.scaler.load(scaler_state)
    with torch.no_grad():  # after the wrapper's construction, which copies rank 0's buffers to every rank
        for name, buf in model.named_buffers():
            if name in own_buffers:
                buf.copy_(own_buffers[name])
    engine = "ddp" if cfg.dist.engine == "ddp" else f"deepspeed ZeRO-{cfg.dist.zero_stage}"
    log.info("%s: %s on %s (%d images, %s loader, %d rank%s, %d steps/epoch), method %s, %s, device %s, %s",
             cfg.run.name, cfg.model.name, cfg.data.name, loader.num_points, resolve_loader(cfg.data), world,
             "s" if world > 1 else "", steps_per_epoch, cfg.method.name, engine, device, _images(cfg))
    selection = read_sidecar(sidecar).get("selection", {}) if sidecar else {}
    return Run(cfg, model, method, trainer, loader, journal, step, start_epoch, start_batch, resumed_totals, selection)


def train_one_epoch(run: Run, epoch: int) -> dict:
    """One epoch (from the resumed batch if it is the resumed one): per-iteration lr, the method's loss,
    the engine's step, the step checkpoints; returns the epoch's summary, every metric summed over ranks."""
    cfg, opt, steps_per_epoch, epochs = run.cfg, run.trainer.optimizer, len(run.loader), run.cfg.train.epochs
    run.loader.set_epoch(epoch)
    first = run.start_batch if epoch == run.start_epoch else 0
    run.model.train()
    # metric -> this rank's float64 sum over the epoch's batches, kept on the device (no host sync per step)
    totals = _totals(run.resumed_totals if first else {})
    resumed_n = float(totals.get("n", 0.0))  # images trained by an earlier process: not in this one's rate
    t0 = t_logged = time.perf_counter()
    at_logged = host_totals(totals)  # the totals at the last logged step: the step records' rates are since then
    batches = enumerate(run.loader.iter_from(epoch, first), first + 1)
    for batch, (x, y) in progress(batches, steps_per_epoch - first, f"epoch {epoch + 1}/{epochs}"):
        lr = lr_at(run.step, steps_per_epoch, cfg.optim, epochs)
        for group in opt.param_groups:
            group["lr"] = lr
        if cfg.train.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(cfg.train.precision, x.device.type):  # fp32: off (attacks set their own precision)
            loss, metrics = run.method.loss(run.trainer.model, x, y)
        bad, run.stop = step_flags(loss, run.signals.received)
        if bad:
            raise FloatingPointError(f"non-finite loss at step {run.step + 1} (epoch {epoch + 1}) on rank(s) "
                                     f"{', '.join(map(str, bad))}: stopped before the update, no checkpoint "
                                     "written from this state")
        run.trainer.step(loss)
        run.step += 1
        if batch == first + 1 and epoch == run.start_epoch:  # this process's first step: start-up is over
            dist.set_timeout(cfg.dist.step_timeout_s)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value.detach().double()
        if run.step % cfg.train.log_every == 0:
            now, host = time.perf_counter(), host_totals(totals)
            since = {k: v - at_logged.get(k, 0.0) for k, v in host.items()}
            rates = {"images_per_s": since["n"] * dist.world_size() / (now - t_logged)}  # equal rank batches
            if "attack_success" in since:  # rank 0's batches since the last logged step
                rates["attack_success"] = since["attack_success"] / since["n"]
            run.journal.write(kind="step", epoch=epoch + 1, step=run.step, lr=lr, loss=loss.item(), **rates)
            t_logged, at_logged = now, host
        every = cfg.train.checkpoint_every
        if ((every and run.step % every == 0) or run.stop) and batch < steps_per_epoch:
            run.save(f"step_{run.step:08d}", epoch=epoch, batch=batch, step=run.step, steps_per_epoch=steps_per_epoch,
                     totals=dist.all_gather_objects(host_totals(totals)))
            if run.stop:  # at the epoch's last batch the epoch's own checkpoint comes first (train())
                raise Stopped(run.stop, f"at step {run.step} (epoch {epoch + 1}, batch {batch})")
    seconds = time.perf_counter() - t0
    host = host_totals(totals)
    summary = epoch_summary(host, seconds, host["n"] - resumed_n, epoch=epoch + 1, step=run.step, lr=lr)
    if run.trainer.scaler is not None:  # the same on every rank: not reduced
        summary.update(skipped_steps=run.trainer.scaler.skipped, loss_scale=run.trainer.scaler.scale)
    run.journal.write(kind="epoch", **summary)
    extra = "".join(f"  {k} {summary[k]:.4g}" for k in summary if k not in EPOCH_KEYS)
    log.info("epoch %d/%d  loss %.4f  train acc %.4f%s  %.0f img/s  %.1fs", epoch + 1, epochs,
             summary["loss"], summary["train_acc"], extra, summary["images_per_s"], seconds)
    return summary


def _exported(model: torch.nn.Module, method) -> torch.nn.Module:
    """The plain model the run's current weights stand for (plain BN layers: dual -> adaptive wing,
    sync -> local), with rank 0's buffers on every rank. Ranks' BN running statistics differ after
    their last step (DDP broadcasts rank 0's before each forward, then every rank updates its own);
    model.json holds rank 0's, and every rank evaluates its shard of it."""
    dist.broadcast_buffers(model)
    return export_plain(method.export(model))


def validate(run: Run, epoch: int, device: torch.device) -> None:
    """The robust-overfitting guard (Rice et al. 2020): clean and eval.select_attack accuracy on the
    held-out val split, logged; the best epoch so far is remembered (and, with train.keep_best, saved as
    checkpoints/model_best). It looks at a copy of the model, exported as model.json would be: training
    continues bitwise as without it (the attack's random starts come from their own seeded generator)."""
    cfg, e = run.cfg, run.cfg.eval
    if run.val_set is None:
        run.val_set = load_split(cfg.data, "val")
    model = _exported(copy.deepcopy(run.model), run.method)
    eps, norm = eval_radius(cfg)
    attacks = [e.select_attack] if e.select_attack != "clean" else []
    res = evaluate(model, run.val_set, attacks, eps, cfg.data.eval_batch_size, device, seed=e.seed, norm=norm,
                   restarts=e.restarts, attack_opts=eval_attack_opts(cfg))
    acc = res["attacks"][e.select_attack]["acc"] if attacks else res["clean"]["acc"]
    run.journal.write(kind="val", epoch=epoch + 1, step=run.step, n=res["n"], clean=res["clean"],
                      attacks=res["attacks"])
    val = {"epoch": epoch + 1, "step": run.step, "acc": acc, "clean_acc": res["clean"]["acc"]}
    best = run.selection.get("best")
    is_best = best is None or acc > best["acc"]  # a tie keeps the earlier epoch
    run.selection = {"best": val if is_best else best, "last": val}
    log.info("val epoch %d (n=%d): clean %.4f  %s %.4f%s", epoch + 1, res["n"], res["clean"]["acc"],
             e.select_attack, acc, "  (best so far)" if is_best else f"  (best: epoch {best['epoch']}, {best['acc']:.4f})")
    if is_best and cfg.train.keep_best and dist.is_main():
        save_checkpoint(run.folder / "checkpoints", "model_best", model.state_dict(),
                        dict(config=cfg.to_dict(), epoch=epoch + 1, step=run.step, val=val))
    dist.barrier()


def _selection_record(run: Run) -> dict:
    """results.json's account of which epoch's model was evaluated and why."""
    cfg, sel = run.cfg, run.selection
    if not sel:
        return {}
    best, last = sel["best"], sel["last"]
    chosen = best if cfg.eval.final == "best" else last
    why = (f"the best {cfg.eval.select_attack} accuracy on the {cfg.data.holdout} held-out val images"
           if cfg.eval.final == "best" else "eval.final=last: the last epoch")
    return {"selection": {"final": cfg.eval.final, "epoch": chosen["epoch"], "why": why,
                          "attack": cfg.eval.select_attack, "split": "val", "best": best, "last": last}}


def export_and_evaluate(run: Run, device: torch.device) -> dict | None:
    """The run's model: exported (model.json) and, with eval.at_end, evaluated (results.json). With
    eval.final=best the model is the best validated epoch's (checkpoints/model_best)."""
    cfg = run.cfg
    exported = _exported(run.model, run.method)
    epoch, step = cfg.train.epochs, run.step
    best = run.selection.get("best")
    if cfg.eval.final == "best" and best and best["epoch"] != epoch:
        state, _ = load_checkpoint(run.folder / "checkpoints" / "model_best.json")
        exported.load_state_dict(state)
        epoch, step = best["epoch"], best["step"]
        if dist.is_main():
            log.info("eval.final=best: the model of epoch %d (val %s %.4f; last epoch %.4f)", epoch,
                     cfg.eval.select_attack, best["acc"], run.selection["last"]["acc"])
    if dist.is_main():
        save_checkpoint(run.folder, "model", exported.state_dict(),
                        dict(config=cfg.to_dict(), epoch=epoch, step=step))
    dist.barrier()
    if not cfg.eval.at_end:
        return None
    results = evaluate_run(cfg, exported, device, checkpoint=str(run.folder / "model.json"),
                           out=run.folder / "results.json", journal=run.journal, extra=_selection_record(run))
    warning = chance_warning(results["clean"]["acc"], exported.head.out_features)
    if warning and dist.is_main():
        log.warning("%s: %s", cfg.run.name, warning)
    return results


def finished_results(cfg: Config) -> dict | None:
    """The results of a run that already finished with this very config (train.resume=auto or auto_epoch): running
    it again has nothing to do (and must not overwrite them); None otherwise."""
    folder = Path(cfg.run.out_dir) / cfg.run.name
    if cfg.train.resume == "never" or not cfg.eval.at_end or not (folder / "model.json").is_file():
        return None
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        return None
    now = cfg.to_dict()
    now["train"] = dict(now["train"], resume=results["config"].get("train", {}).get("resume"))  # how, not what
    return results if results["config"] == now else None


def train(cfg: Config, device: torch.device) -> dict | None:
    """Setup (and resume), the epochs (validation every eval.every epochs, a checkpoint after each, the
    last train.keep_checkpoints kept), then export and evaluation."""
    results = finished_results(cfg)
    if results is not None:
        log.info("%s: finished earlier with this config; its results.json stands", cfg.run.name)
        return results
    every = cfg.eval.every
    with StopSignals() as signals:  # SIGTERM / SIGINT: every rank stops at one step boundary (preempt.py)
        run = setup(cfg, device)
        run.signals = signals
        for epoch in range(run.start_epoch, cfg.train.epochs):
            summary = train_one_epoch(run, epoch)
            if every and ((epoch + 1) % every == 0 or epoch + 1 == cfg.train.epochs):  # and after the last
                dist.set_timeout(cfg.dist.timeout_s)  # its attacks may keep one rank busy while another waits
                validate(run, epoch, device)  # also when stopping: the resumed run would not validate this epoch
                dist.set_timeout(cfg.dist.step_timeout_s)
            run.save(f"epoch_{epoch + 1:04d}", epoch=epoch + 1, step=run.step, metrics=summary,
                     **({"selection": run.selection} if run.selection else {}))
            if dist.is_main():
                remove_step_checkpoints(run.folder / "checkpoints")  # superseded by the epoch's own
                prune_epoch_checkpoints(run.folder / "checkpoints", cfg.train.keep_checkpoints)
            if run.stop:
                raise Stopped(run.stop, f"at the end of epoch {epoch + 1} (step {run.step})")
    dist.set_timeout(cfg.dist.timeout_s)
    return export_and_evaluate(run, device)


def chance_warning(acc: float, classes: int) -> str | None:
    """One line when a trained model's clean accuracy is near chance (less than a tenth of the way from
    1/classes to 100%): a run too short or a learning rate too small otherwise ends without a sign."""
    chance = 1 / classes
    if acc >= chance + 0.1 * (1 - chance):
        return None
    return (f"clean accuracy {100 * acc:.1f}% is near chance (1/{classes} = {100 * chance:.1f}%): the model has "
            "barely learned; train longer (train.epochs, data.subset) or check optim.lr")

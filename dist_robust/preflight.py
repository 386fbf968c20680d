"""What a valid config needs of this machine and this launch, checked by the CLI before any rank starts:
the files it reads (data.root and its images' channels and size, model.init_from and a stage kind's
sources, with their checkpoint headers, model.weights), the image size a network is built for,
the optional packages it uses, the run folder it writes, and how its batch splits over the world size.
Every failure is a one-line ``ConfigError`` (exit status 2), as config.py's."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import yaml

from .checkpoint import CheckpointError, mid_epoch_layout, model_header, newest_sidecar, read_sidecar, resolve
from .config import Config, from_dict, training_changes
from .data import DATASETS, DatasetInfo, data_info
from .methods import METHODS, STAGE_KINDS
from .models.external import fixed_input, normalize_stats, read_weights
from .utils import ConfigError, check, unwritable


def preflight(stages: Sequence[Config], world_size: int = 1, training: bool = True) -> None:
    """Check each stage of a recipe (one for a plain recipe) on this machine. A stage may start from a
    model an earlier stage of the same recipe will write: those paths count as present."""
    pending: set[str] = set()
    for i, cfg in enumerate(stages):
        try:
            check_run(cfg, world_size, training, pending)
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({cfg.run.name}): {e}" if len(stages) > 1 else str(e)) from None
        pending.add(str(Path(cfg.run.out_dir) / cfg.run.name))


def check_run(cfg: Config, world_size: int = 1, training: bool = True, pending: set = frozenset()) -> None:
    d, source = cfg.data, DATASETS[cfg.data.name]
    if source.info.needs_root:
        check(d.root is not None and Path(d.root).expanduser().is_dir(), "data.root", d.root,
              f"dataset {d.name} reads user files: a folder that holds them is required")
        root = Path(d.root).expanduser()
        check(not source.markers or any((root / f).is_file() for f in source.markers), "data.root", d.root,
              f"holds no {d.name} files (looked for {', '.join(source.markers)})")
        check(d.name != "imagefolder" or (root / "train").is_dir(), "data.root", d.root,
              "imagefolder needs train/<class>/ (and test/<class>/) folders of images in it")
    info = _data_info(cfg)
    _check_size(cfg, info)
    check(d.loader != "ffcv" or importlib.util.find_spec("ffcv") is not None, "data.loader", d.loader,
          "FFCV is not installed (make install installs it)")
    check(cfg.dist.engine != "deepspeed" or importlib.util.find_spec("deepspeed") is not None, "dist.engine",
          cfg.dist.engine, "DeepSpeed is not installed (make install installs it)")
    if not training:  # evaluation reads the checkpoint alone: not the sources, the training batch or the folder
        return
    _check_batch(cfg, world_size)
    sources = [("model.init_from", cfg.model.init_from)]
    if cfg.stage.kind in STAGE_KINDS:
        sources += [(f"stage.{k}", getattr(cfg.stage, k)) for k in STAGE_KINDS[cfg.stage.kind].sources]
    for key, path in sources:
        if path is not None and not Path(path).exists() and path not in pending:
            raise ConfigError(f"{key}={path!r}: no such file or folder{_made_by(path)}")
        if path is not None and path not in pending:
            _check_source(cfg, key, path, info)
    _check_external(cfg, info)
    _check_run_folder(cfg)
    _check_resume(cfg, world_size)


def _made_by(path: str) -> str:
    """'; configs/X.yaml trains it: run that first' when a recipe in configs/ writes the missing run folder
    ``path`` (the fine-tuning recipes start from a source that another recipe makes)."""
    target = Path(path).resolve()
    for recipe in sorted(Path("configs").rglob("*.yaml")):
        try:
            run = (yaml.safe_load(recipe.read_text()) or {}).get("run") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(run, dict) and (Path(run.get("out_dir", "runs")) / str(run.get("name", "run"))).resolve() == target:
            return f"; {recipe} trains it: run `dist-robust train {recipe}` first"
    return ""


def _data_info(cfg: Config) -> DatasetInfo:
    """Channels, size and classes of the data; imagefolder's read from its folder (the images' headers
    where data.channels or data.image_size is null), so what its loader would fail on in the ranks
    (an unreadable image, images of several sizes) is found here."""
    try:
        return data_info(cfg.data)
    except (OSError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(why if why.startswith("data.") else f"data.root={cfg.data.root!r}: {why}") from None


def _check_size(cfg: Config, info: DatasetInfo) -> None:
    """A timm network built for one image size (a ViT: its patch grid and position embedding) is built
    for the data's (model.img_size), in whole patches (model.patch_size); otherwise its first forward
    fails inside every rank."""
    m, n = cfg.model, info.size
    try:
        size, patch = fixed_input(m.name, info.channels, **m.network_kwargs())
    except ValueError as e:
        key = next(iter(m.network_kwargs()))
        raise ConfigError(f"model.{key}={getattr(m, key)}: {e}") from None
    check(m.img_size in (None, n), "model.img_size", m.img_size, f"{info.name} images are {n}x{n}")
    if size is None:
        return
    check(size == n, "model.name", m.name, f"a network for {size}x{size} images; {info.name} images are {n}x{n}: set "
          f"model.img_size={n}" + (f" and model.patch_size to a divisor of {n} (its patches are {patch} px)"
                                   if patch and n % patch else ""))
    check(not patch or size % patch == 0, "model.patch_size" if m.patch_size else "model.img_size",
          m.patch_size or m.img_size, f"{size} px is not a whole number of {patch} px patches: set model.patch_size "
          f"to a divisor of {size}")


def _check_external(cfg: Config, info: DatasetInfo) -> None:
    """model.weights readable (a pickle that would run code is refused here, before any rank starts), the
    normalisation's channels those of the data, and torchvision networks on RGB data."""
    m = cfg.model
    if m.weights is not None:
        check(Path(m.weights).expanduser().is_file(), "model.weights", m.weights, "no such file")
        try:
            read_weights(m.weights)
        except ValueError as e:
            raise ConfigError(f"model.weights={m.weights!r}: {e}") from None
    check(not m.name.startswith("torchvision:") or info.channels == 3, "model.name", m.name,
          f"torchvision networks take 3-channel images; {info.name} has {info.channels} (timm:ARCH adapts its stem"
          + ("; data.channels=3 converts the images)" if info.name == "imagefolder" else ")"))
    mean, _ = normalize_stats(m.normalize, [0.0] * info.channels, [1.0] * info.channels)  # only the count matters
    check(len(mean) in (1, info.channels), "model.normalize", m.normalize, f"{len(mean)} values per statistic, "
          f"{info.name} has {info.channels}-channel images (one value, or one per channel)")


def _check_batch(cfg: Config, world_size: int) -> None:
    d, source = cfg.data, DATASETS[cfg.data.name]
    size = source.train_size if not d.root else None  # known for packaged data (not elsewhere)
    if size:
        check(d.subset is None or d.subset <= size - d.holdout, "data.subset", d.subset,
              f"more than the {size - d.holdout:,} training images of {d.name}" + (" after data.holdout" if d.holdout else ""))
        usable = min(d.subset or size, size - d.holdout)
        check(usable >= d.batch_size, "data.batch_size", d.batch_size,
              f"one global batch needs that many training images; {d.name} has {usable:,} here (data.subset, "
              "data.holdout)" + (f", fewer than the {world_size} ranks" if world_size > usable else ""))
    check(d.batch_size >= world_size, "data.batch_size", d.batch_size, f"smaller than the world size ({world_size})")
    check(d.batch_size % world_size == 0, "data.batch_size", d.batch_size,
          f"not divisible by the world size ({world_size})")
    local_batch = d.batch_size // world_size
    check(not METHODS[cfg.method.name].uses_dual_bn or local_batch % 2 == 0, "data.batch_size", d.batch_size,
          f"{cfg.method.name} splits each rank's batch in two halves (its BN wings): the per-rank batch "
          f"({local_batch}) must be even")


def _check_source(cfg: Config, key: str, path: str, info: DatasetInfo) -> None:
    """A checkpoint to start from: complete, of the configured architecture (a timm network of the same
    size arguments), for the data's channels and (where the head is kept) its classes, read from its
    sidecar and tensor header without loading it."""
    try:
        sidecar = resolve(path)
        model = read_sidecar(sidecar).get("config", {}).get("model", {})
        shapes = model_header(sidecar)
    except CheckpointError as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None
    m, trained = cfg.model, model.get("name")
    check(trained in (None, m.name), key, path, f"holds a {trained} model, but model.name={m.name}")
    theirs = {k: model.get(k) for k in ("img_size", "patch_size")}
    ours = {"img_size": m.img_size, "patch_size": m.patch_size}
    check(trained != m.name or theirs == ours, key, path, f"holds a {trained} built with "
          f"img_size={theirs['img_size']}, patch_size={theirs['patch_size']}; here model.img_size={m.img_size}, "
          f"model.patch_size={m.patch_size}: set them as the source's (its weights have their shapes)")
    channels = shapes.get("normalize.mean", [0, info.channels])[1]
    check(channels == info.channels, key, path, f"a model for {channels}-channel images; {info.name} has "
          f"{info.channels}" + (f" (data.channels={channels} converts them)" if info.name == "imagefolder" else ""))
    classes = shapes.get("head.weight", [info.num_classes])[0]
    check(cfg.model.new_head or key != "model.init_from" or classes == info.num_classes, key, path,
          f"its head has {classes} classes, {info.name} has {info.num_classes} (model.new_head=true gives a new one)")


def _check_resume(cfg: Config, world_size: int) -> None:
    """A run stopped inside an epoch continues (train.resume=auto) only with the batch layout it was
    written with (each rank's RNG, buffers and place in the epoch): another world size or batch is
    refused here, before any rank starts, rather than when the ranks resume. train.resume=auto_epoch
    continues such a run from its last epoch checkpoint instead (engine/train.py)."""
    folder = Path(cfg.run.out_dir) / cfg.run.name / "checkpoints"
    meta = newest_sidecar(folder) if cfg.train.resume == "auto" and folder.is_dir() else None
    if not meta or "batch" not in meta:
        return
    then = mid_epoch_layout(meta)
    now = (world_size, cfg.data.batch_size, cfg.data.subset, cfg.data.holdout)
    check(then == now, "train.resume", "auto", f"{folder} was written inside an epoch (step {meta.get('step')}) by "
          f"{then[0]} ranks with data.batch_size={then[1]}, subset={then[2]}, holdout={then[3]}; this launch has "
          f"{now[0]} ranks and {now[1]}, {now[2]}, {now[3]}: resume with the same layout, train.resume=auto_epoch "
          "to continue from the last epoch checkpoint (its later steps trained again), or train.resume=never")


def _check_run_folder(cfg: Config) -> None:
    """A run folder is bound to what trained it: a new config resumes it (or finds it finished) only when
    its training keys equal those of the run's newest checkpoint (config.RESUMABLE: the keys that may
    change). A folder that holds another run (or only its config.yaml, when no checkpoint was written) is
    refused, never resumed or overwritten by mistake: train.resume=never starts it over on purpose."""
    folder = Path(cfg.run.out_dir) / cfg.run.name
    for out in (folder, folder / "checkpoints", folder / "tb"):  # a resumed run's own folders too
        why = unwritable(out)
        if why:  # found now, not after the training, when the first file is written
            raise ConfigError(f"run.out_dir={cfg.run.out_dir!r}: {why}")
    if cfg.train.resume == "never":
        return
    trained = _trained_config(folder)
    if trained is not None:
        changes = training_changes(trained, cfg.to_dict())
        more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
        epochs = ("; to train on for more epochs, start a new run from its model (model.init_from="
                  f"{folder / 'model.json'})" if any(c.startswith("train.epochs ") for c in changes) else "")
        check(not changes, "run.name", cfg.run.name, f"{folder} holds a run trained with other settings "
              f"({', '.join(changes[:3])}{more}): choose another run.name, or train.resume=never to train "
              f"it again from the start{epochs}")
        return
    previous = folder / "config.yaml"
    try:
        old = yaml.safe_load(previous.read_text()) or {} if previous.is_file() else {}
    except (OSError, yaml.YAMLError):
        return
    for section, key in (("model", "name"), ("data", "name"), ("method", "name")):
        was, now = (old.get(section) or {}).get(key), getattr(getattr(cfg, section), key)
        check(was in (None, now), "run.name", cfg.run.name, f"{previous.parent} holds another run ({section}.{key} "
              f"{was}, here {now}): choose another run.name, or train.resume=never to start it over")


def _trained_config(folder: Path) -> dict | None:
    """The config of what ``folder`` holds: its newest training checkpoint's (where a resume continues),
    else its exported model's; in the current schema (keys added since it was written get their
    defaults). None when nothing was trained there."""
    meta = newest_sidecar(folder / "checkpoints") if (folder / "checkpoints").is_dir() else None
    if meta is None and (folder / "model.json").is_file():
        try:
            meta = read_sidecar(folder / "model.json")
        except CheckpointError:
            meta = None
    if not meta or "config" not in meta:
        return None
    try:
        return from_dict(meta["config"]).to_dict()
    except ConfigError:
        return meta["config"]


def run_folder_view(stages: Sequence[Config]) -> dict:
    """What this rank sees of a recipe's run folders (each stage's marker, checkpoints, model and results;
    the lock rank 0 took) and of its FFCV files: on a filesystem that every node shares, the same on
    every rank. Taken after rank 0 took the lock and before anything else is written."""
    from .data.ffcv import beton_path, read_manifest
    top = Path(os.path.commonpath([Path(s.run.out_dir) / s.run.name for s in stages]))
    view = {str(top / ".lock"): _text(top / ".lock")}
    for cfg in stages:
        folder = Path(cfg.run.out_dir) / cfg.run.name
        view[str(folder)] = sorted(str(p.relative_to(folder)) for pattern in ("*.json", "checkpoints/*.json")
                                   for p in folder.glob(pattern))
        d = cfg.data
        if d.loader != "memory":  # the .beton files a run may read, by their manifests' stamps
            for split in ("train", "test"):
                beton = beton_path(d.ffcv_dir, d.name, split, d.ffcv_format)
                view[str(beton)] = (read_manifest(beton) or {}).get("stamp")
    return view


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def check_same_view(stages: Sequence[Config], views: list[dict], hosts: list[str]) -> None:
    """Refuse (one line) a launch whose ranks see different run folders, such as a node-local
    run.out_dir: the nodes would resume from different points and wait for each other at the first
    collective until the timeout. ``views`` and ``hosts``: every rank's, gathered."""
    for rank, view in enumerate(views):
        differs = [k for k in views[0].keys() | view.keys() if views[0].get(k) != view.get(k)]
        if differs:
            what = sorted(differs)[0]
            raise ConfigError(
                f"run.out_dir={stages[0].run.out_dir!r}: rank {rank} on {hosts[rank]} does not see what rank 0 on "
                f"{hosts[0]} sees in {what} ({_brief(view.get(what))} against {_brief(views[0].get(what))}): the "
                "run folder (and data.ffcv_dir) must be on a filesystem that every node shares")


def _brief(value) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, list):
        return f"{len(value)} files" + (f", last {value[-1]}" if value else "")
    return "a lock" if isinstance(value, str) else "another file"

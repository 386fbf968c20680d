"""Typed run configuration: dataclass sections, YAML recipes, ``section.key=value`` overrides.

Defaults live here, in code: the shared sections, each with the checks of its own fields beneath them.
Two sections take their shape from a plug-in: ``method`` is the chosen method's ``Config`` (its name and
its own keys) and ``stage`` the chosen stage kind's (methods/base.py). A recipe in ``configs/``
overrides some defaults and the command line overrides the recipe. Every mistake (an unknown key, a
value of the wrong type, an impossible value) becomes a ``ConfigError`` whose message is one line naming
the key and the value; the CLI turns it into exit status 2 before any rank starts training. What
depends on the machine (files, checkpoints, packages, the run folder, the world size) is checked by
preflight.py, not here: a config is valid or not wherever it is read.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .attacks.fused import COMPILE_MODES
from .attacks.pgd import LOSSES, NORMS
from .attacks.registry import parse_attack
from .data import DATASETS
from .data.ffcv import FORMATS
from .data.select import LOADERS
from .methods import METHODS, MODULE_SELECTORS, STAGE_KINDS, MethodConfig, StageConfig
from .models import MODELS
from .models.external import WEIGHT_SUFFIXES, is_external, is_known, normalize_stats
from .models.partial import BN_POLICIES, TRAINABLE
from .schedules import DECAY_SHAPES, SCHEDULES
from .utils import PRECISIONS, ConfigError, check


class _YamlLoader(yaml.SafeLoader):
    """YAML with only true/false as booleans (as YAML 1.2): YAML 1.1 also reads on/off/yes/no as
    booleans, so ``attack.compile=off`` would arrive as False and fail as the string 'False'."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def _choice(key: str, value: Any, choices) -> None:
    check(value in choices, key, value, f"must be one of {', '.join(map(str, choices))}")


def _split(key: str, split: str, data: "DataConfig") -> None:
    check(split in ("train", "test") or (split == "val" and data.holdout > 0), key, split,
          "must be train, test, or val with data.holdout > 0")


@dataclass
class DataConfig:
    name: str = "mnist"                 # a name from dist_robust.data.DATASETS
    root: Optional[str] = None          # folder of user-provided data (cifar10, cifar100, svhn, imagefolder)
    image_size: Optional[int] = None    # imagefolder only: side of the square images (null: the training images'
                                        # own, when they all share one square size)
    channels: Optional[int] = None      # imagefolder only: 1 (grey) or 3 (RGB); null: 1 if every training image is grey
    subset: Optional[int] = None        # train on a fixed, seeded, stratified subset of this many images
    holdout: int = 0                    # hold this many training images out as the "val" split (selection)
    batch_size: int = 128               # GLOBAL batch, split evenly over the ranks
    eval_batch_size: int = 500          # per rank
    crop_padding: int = 0               # random crop with this zero padding (0: no crop)
    flip: bool = False                  # random horizontal flip (wrong for digits, right for photos)
    loader: str = "auto"                # auto | memory | ffcv | torch (data/select.py says what auto picks)
    ffcv_dir: str = "data/ffcv"         # ffcv: where `dist-robust prepare` writes NAME-SPLIT-FORMAT.beton
    ffcv_format: str = "raw"            # ffcv: raw (exact uint8) | jpeg
    workers: int = 0                    # ffcv: decoding threads, torch: worker processes (0 ffcv: this rank's threads)

    def check(self) -> None:
        check(self.name in DATASETS, "data.name", self.name, f"unknown dataset (known: {', '.join(sorted(DATASETS))})")
        check(self.batch_size > 0, "data.batch_size", self.batch_size, "must be positive")
        check(self.eval_batch_size > 0, "data.eval_batch_size", self.eval_batch_size, "must be positive")
        check(self.subset is None or self.subset > 0, "data.subset", self.subset, "must be positive")
        check(self.crop_padding >= 0, "data.crop_padding", self.crop_padding, "must be >= 0")
        check(self.holdout >= 0, "data.holdout", self.holdout, "must be >= 0")
        check(self.image_size is None or self.image_size > 0, "data.image_size", self.image_size, "must be positive")
        check(self.channels in (None, 1, 3), "data.channels", self.channels, "must be 1 or 3 (null: from the images)")
        size = DATASETS[self.name].train_size if not self.root else None  # known for packaged data
        check(not size or self.holdout < size, "data.holdout", self.holdout,
              f"must be smaller than the {size:,} training images of {self.name}" if size else "")
        _choice("data.loader", self.loader, LOADERS)
        _choice("data.ffcv_format", self.ffcv_format, FORMATS)
        check(self.workers >= 0, "data.workers", self.workers, "must be >= 0")

    def known_size(self) -> Optional[int]:
        """The side of the square images when known without reading them: a packaged dataset's own, or
        ``image_size`` for imagefolder (None: its images' own). What a method's checks read of the data
        (Adv-SS's grids), since methods never import the data layer."""
        return self.image_size if self.name == "imagefolder" else DATASETS[self.name].info.size


@dataclass
class ModelConfig:
    name: str = "cnn3"                  # a name from dist_robust.models.MODELS, or timm:ARCH / torchvision:ARCH
    weights: Optional[str] = None       # timm:/torchvision: only: a local file of the network's own state_dict
                                        # (.safetensors, or .pth/.pt read weights_only); never downloaded
    img_size: Optional[int] = None      # timm:ARCH only: its img_size and patch_size arguments (a ViT's grid and
    patch_size: Optional[int] = None    # position embedding); null: the network's default
    normalize: Any = "dataset"          # the model's input mean/std: dataset | imagenet | cifar10 | {mean: [..],
                                        # std: [..]} (external networks normalise outside: usually imagenet)
    init_from: Optional[str] = None     # source checkpoint (.safetensors) or run folder to fine-tune from
    new_head: bool = True               # fresh head for the target classes (keep the source's if False)
    sync_bn: bool = False               # synchronise BN batch statistics across ranks (gloo and nccl)
    trainable: str = "all"              # all | head (linear probing) | last_k (partial fine-tuning) | modules
    last_k: int = 1                     # last_k: how many blocks train, and the head (ResNet family: residual units,
                                        # final BN, head, as CARTL counts; models/__init__.py lists them)
    modules: List[str] = field(default_factory=list)  # modules: their names, or a selector a method registered
                                        # (RiFT's lowest_mrc: read from the run that model.init_from names)
    frozen_bn: str = "freeze_all"       # BN of the frozen part: freeze_all | freeze_stats | train
    tuned_bn: str = "auto"              # BN of the tuned part: train | freeze_stats | freeze_all | dual
                                        # (auto: dual for the methods with two BN wings (TWINS), train otherwise)

    def check(self, training: bool) -> None:
        check(self.name in MODELS or is_known(self.name), "model.name", self.name, f"unknown model (known: "
              f"{', '.join(sorted(MODELS))}, timm:ARCH, torchvision:ARCH for an arch timm.list_models() or "
              "torchvision.models.list_models() lists)")
        check(self.weights is None or is_external(self.name), "model.weights", self.weights, "a timm:/torchvision: "
              f"network's own state_dict; {self.name} starts from a checkpoint of ours with model.init_from")
        check(self.weights is None or Path(self.weights).suffix in WEIGHT_SUFFIXES, "model.weights", self.weights,
              f"must be {', '.join(WEIGHT_SUFFIXES)}")
        for key in ("img_size", "patch_size"):
            value = getattr(self, key)
            check(value is None or value > 0, f"model.{key}", value, "must be positive")
            check(value is None or self.name.startswith("timm:"), f"model.{key}", value,
                  f"an argument of timm networks (timm:ARCH); {self.name} takes none")
        try:
            normalize_stats(self.normalize, [0.0], [1.0])
        except ValueError as e:
            raise ConfigError(f"model.normalize={self.normalize!r}: {e}") from None
        _choice("model.trainable", self.trainable, TRAINABLE)
        check(self.last_k >= 1, "model.last_k", self.last_k, "must be >= 1")
        check((self.trainable == "modules") == bool(self.modules), "model.modules", self.modules,
              "names the tuned modules when model.trainable=modules, and only then")
        selectors = [m for m in self.modules if m in MODULE_SELECTORS]
        check(not selectors or (len(self.modules) == 1 and (self.init_from or not training)), "model.modules",
              self.modules, f"{', '.join(selectors)} stands alone and reads model.init_from (the run it was chosen in)")
        _choice("model.frozen_bn", self.frozen_bn, BN_POLICIES[:3])
        _choice("model.tuned_bn", self.tuned_bn, ("auto",) + BN_POLICIES)

    def network_kwargs(self) -> dict:
        """The size arguments given to the network's constructor: those set (null: its default)."""
        return {k: v for k, v in (("img_size", self.img_size), ("patch_size", self.patch_size)) if v is not None}


@dataclass
class AttackConfig:
    """The training-time adversary; evaluation attacks default to the same eps and norm."""
    eps: float = 8 / 255
    norm: str = "Linf"                  # Linf | L2
    loss: str = "ce"                    # ce | cw | kl (the TRADES adversary)
    step_size: Optional[float] = None   # None: eps / 4 (2/255 at 8/255, the usual choice)
    steps: int = 10                     # 1 with random_start: FGSM-RS (fast AT)
    random_start: bool = True           # uniform in the L-inf ball; random direction and radius for L2
    restarts: int = 1                   # > 1: each point keeps its worst case
    bn_mode: str = "eval"               # BN during the attack: eval (modern default) or train (Madry's TF code)
    compile: str = "auto"               # fused torch.compile step: on | off | auto (CUDA only, see attacks/fused.py)
    precision: str = "fp32"             # fp32 | bf16 | fp16 (autocast; fp16 on CUDA only)
    channels_last: bool = False         # attack inputs in channels_last memory format

    def check(self) -> None:
        check(self.eps >= 0, "attack.eps", self.eps, "must be >= 0")
        check(self.norm != "Linf" or self.eps <= 1, "attack.eps", self.eps, "an L-inf radius in [0, 1] pixel units "
              "(inputs are in [0, 1]: 8/255 is 0.0314)")
        check(self.steps > 0, "attack.steps", self.steps, "must be > 0")
        check(self.step_size is None or self.step_size > 0, "attack.step_size", self.step_size, "must be > 0")
        _choice("attack.bn_mode", self.bn_mode, ("eval", "train"))
        _choice("attack.norm", self.norm, NORMS)
        _choice("attack.loss", self.loss, LOSSES)
        check(self.restarts > 0, "attack.restarts", self.restarts, "must be > 0")
        _choice("attack.compile", self.compile, COMPILE_MODES)
        _choice("attack.precision", self.precision, PRECISIONS)


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"         # constant | multistep | cosine | ssfd, applied per iteration
    milestones: List[float] = field(default_factory=list)  # multistep: epochs (may be fractional)
    gamma: float = 0.1                  # multistep factor
    warmup_epochs: float = 0.0          # linear warm-up from 0, for any schedule
    final_lr: float = 0.0               # cosine, ssfd: the lr it ends at
    # ssfd, "slow start, fast decay" (Jeddi et al.), as fractions of the run; optim.lr is the peak
    warmup_frac: float = 0.3            # linear ramp 0 -> lr
    decay_frac: float = 0.3             # decay lr -> final_lr over the last part of the run
    decay_shape: str = "linear"         # linear | cosine | exp

    def check(self) -> None:
        check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "must be in [0, 1)")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        check(self.schedule in SCHEDULES, "optim.schedule", self.schedule, f"unknown (known: {', '.join(SCHEDULES)})")
        check(0 < self.gamma <= 1, "optim.gamma", self.gamma, "must be in (0, 1]")
        check(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, "must be >= 0")
        check(0 <= self.warmup_frac <= 1 and 0 <= self.decay_frac <= 1 and self.warmup_frac + self.decay_frac <= 1,
              "optim.warmup_frac", self.warmup_frac, f"warmup_frac and decay_frac ({self.decay_frac}) must be in "
              "[0, 1] and sum to at most 1")
        _choice("optim.decay_shape", self.decay_shape, DECAY_SHAPES)
        check(self.final_lr >= 0, "optim.final_lr", self.final_lr, "must be >= 0")
        check(all(m > 0 for m in self.milestones), "optim.milestones", self.milestones, "must be positive epochs")


RESUME = ("auto", "auto_epoch", "never")  # train.resume


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    resume: str = "auto"                # auto: continue from the last good checkpoint; auto_epoch: the same, but a
                                        # checkpoint written inside an epoch by another world size or batch gives
                                        # way to the last epoch checkpoint (auto refuses it); never: start over
    log_every: int = 20                 # iterations between log lines
    checkpoint_every: int = 0           # also checkpoint every N iterations inside an epoch (0: epoch ends only);
                                        # a killed run resumes from there, bitwise as if never stopped
    threads: Optional[int] = None       # torch threads per rank (None: cores / local ranks)
    precision: str = "fp32"             # training forward and loss: fp32 | bf16 | fp16 (autocast; weights,
                                        # optimizer state and BN statistics stay fp32; fp16 scales the loss)
    loss_scale: float = 65536.0         # fp16: the loss scaler's first scale (halved at each overflow)
    channels_last: bool = False         # the trained model and its batches in channels_last memory format
    compile: bool = False               # torch.compile the training forward (under DDP: the wrapped model)
    keep_checkpoints: int = 2           # epoch checkpoints kept: the last N (0: all); model_best is kept apart
    keep_best: bool = False             # keep checkpoints/model_best: the epoch with the best robust accuracy
                                        # on the held-out val split (eval.every, data.holdout)

    def check(self) -> None:
        check(self.epochs > 0, "train.epochs", self.epochs, "must be > 0")
        check(self.keep_checkpoints >= 0, "train.keep_checkpoints", self.keep_checkpoints, "must be >= 0 (0: keep all)")
        _choice("train.resume", self.resume, RESUME)
        check(self.log_every > 0, "train.log_every", self.log_every, "must be > 0")
        check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every,
              "must be >= 0 (0: epoch ends only)")
        check(self.threads is None or self.threads > 0, "train.threads", self.threads, "must be > 0")
        _choice("train.precision", self.precision, PRECISIONS)
        check(self.loss_scale > 0, "train.loss_scale", self.loss_scale, "must be > 0")


@dataclass
class EvalConfig:
    attacks: List[str] = field(default_factory=lambda: ["clean", "pgd-20"])
    eps: Optional[float] = None         # None: attack.eps
    norm: Optional[str] = None          # None: attack.norm (for pgd-K, cw-K and aa)
    restarts: int = 1                   # pgd-K / cw-K: worst case over this many random starts
    split: str = "test"
    limit: Optional[int] = None         # evaluate the first N points only
    seed: int = 0                       # random starts are seeded per point from (seed, global index)
    aa_block_size: Optional[int] = None  # AutoAttack: points per block, its unit of sharding and seeding (ranks
                                        # share whole blocks; None: n / 8, at most 500, the same on any ranks)
    at_end: bool = True                 # evaluate after training and write results.json
    precision: str = "fp32"             # fp32 | bf16 | fp16 (autocast; fp16 on CUDA only) of the eval attacks;
                                        # never attack.precision: a weaker training attack must not weaken the eval
    # The robust-overfitting guard (Rice et al. 2020): validation on the held-out split, never the test split.
    every: int = 0                      # every N epochs (and after the last): clean and eval.select_attack accuracy
                                        # on the val split (data.holdout images), logged (0: never)
    select_attack: str = "pgd-10"       # the attack whose val accuracy chooses model_best (train.keep_best)
    final: str = "last"                 # last | best: the model the final evaluation (and model.json) is

    def check(self, attack: AttackConfig) -> None:
        check(self.eps is None or self.eps >= 0, "eval.eps", self.eps, "must be >= 0")
        check((self.norm or attack.norm) != "Linf" or (self.eps or 0) <= 1, "eval.eps", self.eps,
              "an L-inf radius in [0, 1] pixel units (inputs are in [0, 1]: 8/255 is 0.0314)")
        check(self.norm is None or self.norm in NORMS, "eval.norm", self.norm, f"must be one of {', '.join(NORMS)}")
        check(self.restarts > 0, "eval.restarts", self.restarts, "must be > 0")
        check(self.aa_block_size is None or self.aa_block_size > 0, "eval.aa_block_size", self.aa_block_size,
              "must be > 0 (null: n / 8 points, at most 500)")
        check(self.limit is None or self.limit > 0, "eval.limit", self.limit, "must be > 0")
        _choice("eval.precision", self.precision, PRECISIONS)
        check(self.every >= 0, "eval.every", self.every, "must be >= 0 (0: no validation during training)")
        _choice("eval.final", self.final, ("last", "best"))
        for key, names in (("eval.attacks", self.attacks), ("eval.select_attack", [self.select_attack])):
            for name in names:
                try:
                    parse_attack(name)
                except ValueError as e:
                    raise ConfigError(f"{key}={name!r}: {e}") from None
        check(parse_attack(self.select_attack).shape in ("clean", "batch"), "eval.select_attack", self.select_attack,
              "must be clean or a batch attack: pgd-K, cw-K, fgsm (chosen every eval.every epochs)")


@dataclass
class DistConfig:
    backend: str = "auto"               # auto | nccl: gloo for CPU tensors, nccl for CUDA ones | gloo: for both
    timeout_s: int = 1800               # a collective's timeout until the first training step (start-up, compilation)
    step_timeout_s: int = 600           # ... from then on in the training loop: a dead or stuck rank stops the others sooner
    engine: str = "ddp"                 # ddp | deepspeed (engine/deepspeed.py)
    zero_stage: int = 0                 # deepspeed: ZeRO stage 0, 1 or 2

    def check(self) -> None:
        _choice("dist.backend", self.backend, ("auto", "gloo", "nccl"))
        _choice("dist.engine", self.engine, ("ddp", "deepspeed"))
        for key in ("timeout_s", "step_timeout_s"):
            check(getattr(self, key) > 0, f"dist.{key}", getattr(self, key), "must be > 0 (seconds)")
        check(self.engine != "deepspeed" or self.zero_stage in (0, 1, 2), "dist.zero_stage", self.zero_stage,
              "must be 0, 1 or 2 (ZeRO-3's partitioned weights are not checkpointed: engine/deepspeed.py)")


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    device: str = "auto"                # auto | cpu | cuda

    def check(self) -> None:
        _choice("run.device", self.device, ("auto", "cpu", "cuda"))
        check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "run.name", self.name,
              "must be a plain folder name")


@dataclass
class Config:
    stage: StageConfig = field(default_factory=StageConfig)      # the stage kind's own Config
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)   # the method's own Config
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        """Plain data: what config.yaml, results.json and every checkpoint sidecar record (the shared
        sections, the active method's keys and the stage kind's)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _one_line(err: OmegaConfBaseException, schema=None) -> str:
    """OmegaConf's messages span several lines with a 'full_key:' trailer; keep key, value and cause. A
    list key given something else gets a line of ours (OmegaConf's names its own classes and changed in
    2.4)."""
    key = getattr(err, "full_key", None)
    value = getattr(err, "value", None)
    if (key and value is not None and schema is not None and typing.get_origin(_declared(schema, key)) is list
            and not isinstance(value, (list, tuple)) and not OmegaConf.is_list(value)):
        return f"{key}={value!r}: must be a list, written [a, b] (one item: [a])"
    cause = str(err).splitlines()[0].strip() if str(err) else type(err).__name__
    if key and value is not None:
        return f"{key}={value!r}: {cause}"
    return f"{key}: {cause}" if key else cause


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:  # YAML scalars and lists: 0.1, true, null, [10, 15]
        value = yaml.load(raw, Loader=_YamlLoader) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _read_recipe(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} not found")
    try:
        recipe = yaml.load(p.read_text(), Loader=_YamlLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections")
    return recipe


# Keys of the earlier layout (one method section holding every method's keys, a top-level rift section):
# a recipe that still uses them gets one line naming the new place.
MOVED_SECTIONS = {"rift": "stage"}


def _owners(key: str) -> list[str]:
    return sorted(n for n, m in METHODS.items() if key in {f.name for f in dataclasses.fields(m.Config)})


def _selected(layers: List[dict], overrides: List[tuple[str, Any]], section: str, key: str, default: str) -> Any:
    """The value a section's selector key ends with (method.name, stage.kind): plug-ins shape the schema."""
    value = default
    for layer in layers:
        value = (layer.get(section) or {}).get(key, value) if isinstance(layer.get(section), dict) else value
    for k, v in overrides:
        value = v if k == f"{section}.{key}" else value
    return value


def _schema(method: Any, kind: Any):
    check(isinstance(method, str) and method in METHODS, "method.name", method,
          f"unknown method (known: {', '.join(sorted(METHODS))})")
    check(kind == "train" or (isinstance(kind, str) and kind in STAGE_KINDS), "stage.kind", kind,
          f"unknown stage kind (known: {', '.join(['train', *STAGE_KINDS])})")
    schema = OmegaConf.structured(Config)
    schema.method = OmegaConf.structured(METHODS[method].Config(name=method))
    schema.stage = OmegaConf.structured((STAGE_KINDS[kind].Config if kind != "train" else StageConfig)(kind=kind))
    return schema


def _unknown_key(key: str, method: str, kind: str, schema) -> str:
    """Why ``key`` is not in the schema, naming its new place when it moved."""
    section, _, name = key.partition(".")
    if section in MOVED_SECTIONS:
        return (f"the {section} section is gone: its keys belong to the stage kinds that use them "
                f"({MOVED_SECTIONS[section]}.{name or 'KEY'} in a stage of kind rift_mrc or rift_interpolate)")
    if section == "method" and name and "." not in name:
        owners = _owners(name)
        return (f"not a key of method {method}" + (f" (a key of {', '.join(owners)}: a method's section "
                "holds its own keys only)" if owners else _did_you_mean(key, schema)))
    if section == "stage" and name and "." not in name:
        return f"not a key of stage kind {kind}" + _did_you_mean(key, schema)
    return "unknown key" + _did_you_mean(key, schema)


_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def parse_fraction(text: Any) -> Any:
    """'8/255' -> 8/255 as a float (radii are written so in papers); anything else is returned as it is."""
    m = _FRACTION.match(text) if isinstance(text, str) else None
    if not m or float(m.group(2)) == 0:
        return text
    return float(m.group(1)) / float(m.group(2))


def _with_fractions(schema, layer: Any, prefix: str = "") -> Any:
    """``layer`` with every 'A/B' string read as a number where the schema holds a float."""
    if not isinstance(layer, dict):
        return layer
    out = {}
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = _with_fractions(schema, value, path + ".")
        elif isinstance(value, str) and _is_float(schema, path):
            out[key] = parse_fraction(value)
        else:
            out[key] = value
    return out


def _declared(schema, path: str) -> Any:
    """The type the schema declares for ``path`` (``Optional[T]`` read as ``T``), None for a path that is no
    field: the field's annotation in its section's dataclass, read with dataclasses and typing (OmegaConf's
    public API finds the section), so nothing depends on OmegaConf's node classes."""
    section, _, key = path.rpartition(".")
    try:
        parent = OmegaConf.select(schema, section, default=None) if section else schema
    except OmegaConfBaseException:  # not a key path at all ('a..b', 'a[')
        return None
    return _field_types(OmegaConf.get_type(parent)).get(key) if OmegaConf.is_dict(parent) else None


@functools.lru_cache(maxsize=None)
def _field_types(cls: Any) -> dict[str, Any]:
    """field name -> annotation (``Optional[T]`` as ``T``) of a dataclass; empty for anything else."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return {}
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = args[0] if len(args) == 1 else hint
        out[f.name] = hint
    return out


def _is_float(schema, path: str) -> bool:
    return _declared(schema, path) is float


def _all_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every leaf key of a plain nested dict (the schema as OmegaConf.to_container gives it)."""
    keys = []
    for key, value in tree.items():
        keys += _all_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


# Other libraries' names of our keys (a name -> our name, or our whole key where the name alone is too
# common), tried before the spelling: difflib finds typos, not synonyms (optim.learning_rate is spelt
# closer to optim.decay_frac than to optim.lr). Only keys of the schema are ever suggested.
SYNONYMS = {"learning_rate": "lr", "wd": "weight_decay", "bs": "batch_size", "num_workers": "workers",
            "n_workers": "workers", "num_epochs": "epochs", "n_epochs": "epochs", "max_epochs": "epochs",
            "random_seed": "seed", "epsilon": "eps", "alpha": "step_size", "num_steps": "steps",
            "iterations": "steps", "scheduler": "schedule", "lr_schedule": "schedule", "arch": "model.name",
            "architecture": "model.name", "pretrained": "weights", "output_dir": "out_dir",
            "log_interval": "log_every", "amp": "precision", "mixed_precision": "precision"}


def _did_you_mean(key: str, schema) -> str:
    """' (did you mean optim.lr?)': a key of the same name (or a synonym's) in another section, else the
    closest spelling."""
    keys = _all_keys(OmegaConf.to_container(schema, resolve=False))
    section, _, leaf = key.rpartition(".")
    leaf = SYNONYMS.get(leaf, leaf)
    same_leaf = [k for k in keys if leaf in (k, k.rpartition(".")[2])]
    same_leaf = [k for k in same_leaf if k.rpartition(".")[0] == section] or same_leaf  # optim.learning_rate
    close = same_leaf or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f" (did you mean {' or '.join(close[:2])}?)" if close else ""


def _merge(layers: List[dict], overrides: List[str]) -> Config:
    """Defaults <- each layer <- overrides, checked against the schema only."""
    parsed = [_parse_override(text) for text in overrides]
    for text, (key, _) in zip(overrides, parsed):
        if "." not in key:
            raise ConfigError(f"override {text!r}: expected section.key=value")
    method = _selected(layers, parsed, "method", "name", "standard")
    kind = _selected(layers, parsed, "stage", "kind", "train")
    schema = merged = _schema(method, kind)
    layers = [_with_fractions(schema, x) for x in layers]
    try:
        merged = OmegaConf.merge(merged, *(OmegaConf.create(x) for x in layers))
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or ""
        moved = [x[key] for x in layers if key in MOVED_SECTIONS and isinstance(x.get(key), dict) and x[key]]
        key = f"{key}.{next(iter(moved[0]))}" if moved else key  # name the first moved key
        raise ConfigError(f"{key}: {_unknown_key(key, method, kind, schema)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e, schema)) from None
    for key, value in parsed:
        if OmegaConf.select(merged, key, default="__missing__") == "__missing__":
            raise ConfigError(f"{key}={value!r}: {_unknown_key(key, method, kind, schema)}")
        if _is_float(schema, key):
            value = parse_fraction(value)
        try:
            OmegaConf.update(merged, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(_one_line(e, schema)) from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e, schema)) from None


def load_config(path: str | None = None, overrides: List[str] = (), training: bool = True) -> Config:
    """Defaults <- recipe file <- overrides, then validation. Raises ConfigError (one line)."""
    recipe = _read_recipe(path) if path is not None else {}
    if "stages" in recipe:
        raise ConfigError(f"config file {path!r} is a multi-stage recipe: load it with load_stages")
    cfg = _merge([recipe], overrides)
    validate(cfg, training)
    return cfg


PREVIOUS = "previous"  # a stage's model.init_from (or a source key of its kind): the stage before it; "stage:NAME": that one


def load_stages(path: str, overrides: List[str] = ()) -> List[Config]:
    """A recipe as a list of stage configs, all validated before anything runs.

    A plain recipe is one ``train`` stage. A recipe with ``stages:`` is a pipeline: its other sections
    are shared; each entry of the list adds its own sections plus ``name`` (its folder) and ``kind``.
    Overrides apply to every stage, except ``run.name`` / ``run.out_dir``, which name the pipeline's
    folder: stage S of pipeline P writes to ``run.out_dir/P/S``. ``model.init_from: previous`` (or
    ``stage:NAME``) starts a stage from an earlier stage's exported model; a stage kind's own source keys
    (rift_interpolate's ``stage.robust_from``) take the same references.
    """
    recipe = _read_recipe(path)
    stages = recipe.pop("stages", None)
    if stages is None:
        return [load_config(path, overrides)]
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ConfigError(f"stages in {path!r}: expected a non-empty list of mappings")
    pipeline = _merge([recipe], overrides)
    folder = Path(pipeline.run.out_dir) / pipeline.run.name
    out, done = [], {}
    for i, entry in enumerate(stages):
        entry = dict(entry)
        name, kind = entry.pop("name", None), entry.pop("kind", None)
        if not name or not isinstance(name, str) or "/" in name or name in (".", "..") or name in done:
            raise ConfigError(f"stages[{i}].name={name!r}: each stage needs a unique plain folder name")
        if kind is not None:
            entry["stage"] = {**(entry.get("stage") or {}), "kind": kind}
        kind = (entry.get("stage") or {}).get("kind", "train")
        references = [("model", "init_from")] + [("stage", k) for k in
                                                 (STAGE_KINDS[kind].sources if kind in STAGE_KINDS else ())]
        for section, key in references:  # previous / stage:NAME -> that stage's folder
            ref = (entry.get(section) or {}).get(key)
            if ref == PREVIOUS or (isinstance(ref, str) and ref.startswith("stage:")):
                source = list(done)[-1] if ref == PREVIOUS and done else ref.removeprefix("stage:")
                if source not in done:
                    raise ConfigError(f"stages[{i}] ({name}) {section}.{key}={ref!r}: "
                                      + ("the first stage has no previous one" if ref == PREVIOUS else
                                         f"no earlier stage named {source!r}"))
                entry[section] = {**entry[section], key: str(done[source])}
        try:
            cfg = _merge([recipe, entry], overrides)
            cfg.run.out_dir, cfg.run.name = str(folder), name
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({name}): {e}") from None
        done[name] = folder / name
        out.append(cfg)
    return out


def validate(cfg: Config, training: bool = True) -> None:
    """Every section's own checks, then the method's and the stage kind's, then what ties sections
    together. ``training``: the run trains (an evaluation of a checkpoint skips what only training
    needs, such as a source to start from)."""
    _representable(cfg)
    cfg.data.check()
    cfg.model.check(training)
    cfg.attack.check()
    cfg.optim.check()
    cfg.train.check()
    cfg.eval.check(cfg.attack)
    cfg.dist.check()
    cfg.run.check()
    method = METHODS[cfg.method.name]
    m = cfg.model
    check(m.tuned_bn != "dual" or method.uses_dual_bn, "model.tuned_bn", m.tuned_bn,
          f"dual (two BN wings) goes with the methods that train them "
          f"({', '.join(n for n, c in METHODS.items() if c.uses_dual_bn)}), and only with them")
    check(cfg.train.precision != "fp16" or cfg.dist.engine != "deepspeed", "train.precision", "fp16",
          "with dist.engine=deepspeed only fp32 or bf16 (its fp16 loss scale would not be checkpointed); "
          "fp16 runs with dist.engine=ddp")
    check(cfg.dist.backend != "nccl" or cfg.run.device != "cpu", "dist.backend", "nccl",
          "carries CUDA tensors: with run.device=cpu use dist.backend=auto or gloo")
    check(not cfg.train.compile or cfg.dist.engine == "ddp", "train.compile", True,
          "compiles the DDP engine's forward; with dist.engine=deepspeed leave it false")
    _split("eval.split", cfg.eval.split, cfg.data)
    if training:
        _selection(cfg)
    cfg.method.check(cfg, training)
    cfg.stage.check(cfg, training)


def _representable(cfg: Config) -> None:
    """Every number is one the run can use: floats finite (inf and NaN pass comparisons such as lr > 0
    or fail them silently) and integers within 64 bits (torch's seeds, counts and tensor sizes)."""
    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float):
                    check(math.isfinite(v), key, value, "must be a finite number")
                elif isinstance(v, int) and not isinstance(v, bool):
                    check(-2 ** 63 <= v < 2 ** 63, key, value, "out of range (a 64-bit integer)")
    walk(cfg, "")


def _selection(cfg: Config) -> None:
    """Model selection reads the held-out val split only: a recipe that would choose on the test split
    (no holdout), or report the chosen model on the split it was chosen on, is refused."""
    e, t = cfg.eval, cfg.train
    check(not e.every or cfg.data.holdout > 0, "eval.every", e.every,
          "validates on the held-out val split: set data.holdout (never select on the test split)")
    check(not e.every or cfg.stage.kind == "train", "eval.every", e.every,
          f"validates the epochs of the training loop: a {cfg.stage.kind} stage has none")
    check(not e.every or not METHODS[cfg.method.name].pretext, "eval.every", e.every,
          f"validates a classifier: {cfg.method.name}'s head predicts its pretext task")
    check(not t.keep_best or e.every, "train.keep_best", True, "chooses by validation: set eval.every > 0")
    check(e.final == "last" or t.keep_best, "eval.final", e.final, "best needs train.keep_best=true")
    check(e.final == "last" or e.split != "val", "eval.final", e.final,
          "best with eval.split=val would report the model on the split it was chosen on: evaluate on test")


def from_dict(d: dict) -> Config:
    """Rebuild a Config from a checkpoint's stored dict (same schema checks as a recipe). A dict stored in
    the earlier layout (every method's keys under ``method``, a ``rift`` section) is read too: the
    active method's and stage kind's keys are kept, the others were never used by that run."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    method, kind = (d.get("method") or {}).get("name", "standard"), (d.get("stage") or {}).get("kind", "train")
    schema = _schema(method, kind)
    for section, source in (("method", d.get("method") or {}), ("stage", {**(d.pop("rift", None) or {}),
                                                                          **(d.get("stage") or {})})):
        known = {f.name for f in dataclasses.fields(OmegaConf.get_type(schema[section]))}
        d[section] = {k: v for k, v in source.items() if k in known}
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.create(d)))
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e, schema)) from None


# Keys a run may change when it resumes from its checkpoints: they decide how the run is executed, checked,
# logged or evaluated, not what it trains. Every other key is the training's: a run folder is bound to it.
RESUMABLE = {
    "run": ("name", "out_dir", "device"),
    "dist": ("backend", "timeout_s", "step_timeout_s", "engine", "zero_stage"),  # the engines train alike (tested)
    "data": ("root", "eval_batch_size", "loader", "ffcv_dir", "workers"),
    "train": ("resume", "log_every", "checkpoint_every", "threads", "keep_checkpoints", "keep_best", "compile",
              "channels_last"),
    "attack": ("compile", "channels_last"),
    "eval": ("attacks", "eps", "norm", "restarts", "split", "limit", "seed", "aa_block_size", "at_end", "precision"),
}


def training_changes(old: dict, new: dict) -> list[str]:
    """The keys of a stored config (``old``, a checkpoint's) whose value a new config (``new``) changes,
    leaving out RESUMABLE's: 'optim.lr 0.1 -> 0.05'. Both as Config.to_dict() gives them."""
    changes = []
    for section in sorted(old.keys() | new.keys()):
        was, now = old.get(section) or {}, new.get(section) or {}
        for key in sorted(was.keys() | now.keys()):
            if key not in RESUMABLE.get(section, ()) and was.get(key) != now.get(key):
                changes.append(f"{section}.{key} {was.get(key)} -> {now.get(key)}")
    return changes

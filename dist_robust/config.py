"""Typed run configuration: dataclass sections, YAML recipes, ``section.key=value`` overrides.

Defaults live here, in code. A recipe in ``configs/`` overrides some of them and the command line
overrides the recipe. Every mistake (an unknown key, a value of the wrong type, an impossible value)
becomes a ``ConfigError`` whose message is one line naming the key and the value; the CLI turns it
into exit status 2 before any rank starts training.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user mistake in a recipe or an override; the message is one line."""


class _YamlLoader(yaml.SafeLoader):
    """YAML with only true/false as booleans (as YAML 1.2): YAML 1.1 also reads on/off/yes/no as
    booleans, so ``attack.compile=off`` would arrive as False and fail as the string 'False'."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


@dataclass
class DataConfig:
    name: str = "mnist"                 # a name from dist_robust.data.DATASETS
    root: Optional[str] = None          # folder of user-provided data (cifar10, cifar100, svhn, imagefolder)
    image_size: Optional[int] = None    # imagefolder only: side of the square images
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


@dataclass
class ModelConfig:
    name: str = "cnn3"                  # a name from dist_robust.models.MODELS
    init_from: Optional[str] = None     # source checkpoint (.safetensors) or run folder to fine-tune from
    new_head: bool = True               # fresh head for the target classes (keep the source's if False)
    sync_bn: bool = False               # synchronise BN batch statistics across ranks (gloo and nccl)
    trainable: str = "all"              # all | head (linear probing) | last_k (partial fine-tuning) | modules
    last_k: int = 1                     # last_k: how many blocks train, and the head (ResNet family: residual units,
                                        # final BN, head, as CARTL counts; models/__init__.py lists them)
    modules: List[str] = field(default_factory=list)  # modules: their names; "lowest_mrc": RiFT's choice,
                                        # read from the mrc.json of the run that model.init_from names
    frozen_bn: str = "freeze_all"       # BN of the frozen part: freeze_all | freeze_stats | train
    tuned_bn: str = "auto"              # BN of the tuned part: train | freeze_stats | freeze_all | dual
                                        # (auto: dual for TWINS methods, train otherwise)


@dataclass
class MethodConfig:
    name: str = "standard"              # a name from dist_robust.methods.METHODS
    beta: float = 6.0                   # TRADES / TWINS-TRADES weight of the KL term
    kl_reduction: str = "batchmean"     # TRADES KL: batchmean (sum / local batch, the reference) | sum | mean
    twins_lambda: float = 1.0           # TWINS weight of the frozen wing's loss (1.0 CIFAR, 0.4 high-res)
    cartl_lambda: float = 0.01          # CARTL stage 1: weight of the feature distance (summed over the global batch)
    sn_beta: float = 1.0                # CARTL stage 2: spectral-norm bound of the tuned layers (0.4 for GTSRB)
    sn_power_iters: int = 1             # CARTL stage 2: power iterations per training forward
    # Adv-SS pretext pre-training (adv_rotation, adv_jigsaw, adv_selfie, adv_ss_ensemble; methods/adv_ss.py)
    ensemble_tasks: List[str] = field(default_factory=lambda: ["rotation", "jigsaw", "selfie"])
                                        # adv_ss_ensemble: the pretext tasks trained together (2 or 3)
    ensemble_export: str = "rotation"   # adv_ss_ensemble: the branch exported with the trunk (rotation | jigsaw)
    ensemble_branch_blocks: int = 1     # adv_ss_ensemble: the backbone's last stages each task owns a copy of
                                        # (1: ResNet-50's layer4, as the authors; preact_resnet18: 2 = layer4 + bn)
    adv_ss_lambda: float = 0.1          # adv_ss_ensemble: weight of the log-det diversity penalty (attack and loss)
    jigsaw_grid: int = 4                # tiles per side, must divide the image (32: 8x8 tiles, 28: 7x7)
    jigsaw_perms: int = 30              # random tile permutations; classes = jigsaw_perms + 1 (0: unshuffled)
    jigsaw_seed: int = 0                # seed of the permutation table (saved in the model: head.permutations)
    selfie_grid: int = 4                # patches per side; grid^2 // 4 of them are the targets
    selfie_layers: int = 2              # selfie attention-pooling layers (the authors: 13 at width 1024)
    selfie_heads: int = 4               # selfie attention heads; must divide the patch feature size
    selfie_faithful: bool = False       # selfie as the authors: raw dot-product scores, CE on their softmax
                                        # (a double softmax); false: scores / sqrt(width), plain CE


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
    precision: str = "fp32"             # fp32 | bf16 | fp16 (autocast, CUDA only)
    channels_last: bool = False         # attack inputs in channels_last memory format


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


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    resume: str = "auto"                # auto: continue from the last good checkpoint; never: start over
    log_every: int = 20                 # iterations between log lines
    checkpoint_every: int = 0           # also checkpoint every N iterations inside an epoch (0: epoch ends only);
                                        # a killed run resumes from there, bitwise as if never stopped
    threads: Optional[int] = None       # torch threads per rank (None: cores / local ranks)


@dataclass
class EvalConfig:
    attacks: List[str] = field(default_factory=lambda: ["clean", "pgd-20"])
    eps: Optional[float] = None         # None: attack.eps
    norm: Optional[str] = None          # None: attack.norm (for pgd-K, cw-K and aa)
    restarts: int = 1                   # pgd-K / cw-K: worst case over this many random starts
    split: str = "test"
    limit: Optional[int] = None         # evaluate the first N points only
    seed: int = 0                       # random starts are seeded per point from (seed, global index)
    aa_block_size: int = 500            # AutoAttack: points per block, its unit of sharding and seeding (ranks
                                        # share whole blocks: fewer points than ranks x this leaves ranks idle)
    at_end: bool = True                 # evaluate after training and write results.json
    precision: str = "fp32"             # fp32 | bf16 | fp16 (autocast, CUDA only) of the evaluation attacks;
                                        # never attack.precision: a weaker training attack must not weaken the eval


@dataclass
class RiftConfig:
    """RiFT's two stage kinds (engine/rift_stages.py; design/methods.md section 3)."""
    eps_w: float = 0.1                  # rift_mrc: relative Frobenius radius of one module's weight perturbation
    mrc_epochs: int = 10                # rift_mrc: projected gradient-ascent epochs over the adversarial set
    mrc_lr: float = 1.0                 # rift_mrc: ascent step (SGD lr on the batch-mean CE)
    mrc_batch_size: int = 512           # rift_mrc: ascent batch (part of the method, as in the authors' code)
    mrc_split: str = "train"            # rift_mrc: images of the fixed PGD set (attack.*): train | val | test
    mrc_points: int = 1000              # rift_mrc: the first N images of that split
    robust_from: Optional[str] = None   # rift_interpolate: the robust model (a path, previous or stage:NAME)
    alphas: List[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    select_split: str = "val"           # rift_interpolate: where the alpha curve is measured (data.holdout)
    select_attack: str = "pgd-10"       # rift_interpolate: robust accuracy of the curve (eval.eps, eval.norm)
    tau: float = 0.0                    # rift_interpolate: allowed robust-accuracy drop from alpha = 0


@dataclass
class DistConfig:
    backend: str = "auto"               # auto: nccl on CUDA, gloo on CPU
    timeout_s: int = 1800
    engine: str = "ddp"                 # ddp | deepspeed (engine/deepspeed.py)
    zero_stage: int = 0                 # deepspeed: ZeRO stage 0, 1 or 2


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    device: str = "auto"                # auto | cpu | cuda


@dataclass
class StageConfig:
    """What a run does: ``train`` (the default), or another kind of a multi-stage recipe's stage
    (engine/stages.py). In a recipe's ``stages`` list, ``kind: K`` is short for ``stage: {kind: K}``."""
    kind: str = "train"


@dataclass
class Config:
    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rift: RiftConfig = field(default_factory=RiftConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _one_line(err: OmegaConfBaseException) -> str:
    """OmegaConf's messages span several lines with a 'full_key:' trailer; keep key, value and cause."""
    key = getattr(err, "full_key", None)
    value = getattr(err, "value", None)
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


def _merge(layers: List[dict], overrides: List[str]) -> Config:
    """Defaults <- each layer <- overrides, without validation."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), *(OmegaConf.create(x) for x in layers))
        for text in overrides:
            key, value = _parse_override(text)
            if "." not in key:
                raise ConfigError(f"override {text!r}: expected section.key=value")
            if OmegaConf.select(merged, key, default="__missing__") == "__missing__":
                raise ConfigError(f"{key}={value!r}: unknown key")
            OmegaConf.update(merged, key, value, merge=False)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None


def load_config(path: str | None = None, overrides: List[str] = (), world_size: int = 1) -> Config:
    """Defaults <- recipe file <- overrides, then validation. Raises ConfigError (one line)."""
    recipe = _read_recipe(path) if path is not None else {}
    if "stages" in recipe:
        raise ConfigError(f"config file {path!r} is a multi-stage recipe: load it with load_stages")
    cfg = _merge([recipe], overrides)
    validate(cfg, world_size)
    return cfg


PREVIOUS = "previous"  # a stage's model.init_from or rift.robust_from: the stage before it; "stage:NAME": that one
STAGE_REFERENCES = (("model", "init_from"), ("rift", "robust_from"))


def load_stages(path: str, overrides: List[str] = (), world_size: int = 1) -> List[Config]:
    """A recipe as a list of stage configs, all validated before anything runs.

    A plain recipe is one ``train`` stage. A recipe with ``stages:`` is a pipeline: its other sections
    are shared; each entry of the list adds its own sections plus ``name`` (its folder) and ``kind``.
    Overrides apply to every stage, except ``run.name`` / ``run.out_dir``, which name the pipeline's
    folder: stage S of pipeline P writes to ``run.out_dir/P/S``. ``model.init_from: previous`` (or
    ``stage:NAME``) starts a stage from an earlier stage's exported model.
    """
    recipe = _read_recipe(path)
    stages = recipe.pop("stages", None)
    if stages is None:
        return [load_config(path, overrides, world_size)]
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
            entry.setdefault("stage", {})["kind"] = kind
        for section, key in STAGE_REFERENCES:  # previous / stage:NAME -> that stage's folder
            ref = (entry.get(section) or {}).get(key)
            if ref == PREVIOUS or (isinstance(ref, str) and ref.startswith("stage:")):
                source = list(done)[-1] if ref == PREVIOUS and done else ref.removeprefix("stage:")
                if source not in done:
                    raise ConfigError(f"stages[{i}] ({name}) {section}.{key}={ref!r}: "
                                      + ("the first stage has no previous one" if ref == PREVIOUS else
                                         f"no earlier stage named {source!r}"))
                entry[section] = {**entry[section], key: str(done[source])}
        cfg = _merge([recipe, entry], overrides)
        cfg.run.out_dir, cfg.run.name = str(folder), name
        try:
            validate(cfg, world_size, pending=set(map(str, done.values())))
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({name}): {e}") from None
        done[name] = folder / name
        out.append(cfg)
    return out


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _check_source(cfg: Config, key: str, path: str, info) -> None:
    """A checkpoint to start from: complete, of the configured architecture, and (where the head is
    kept) with the dataset's classes, read from its sidecar and tensor header without loading it."""
    from .checkpoint import CheckpointError, model_header, read_sidecar, resolve
    try:
        sidecar = resolve(path)
        trained = read_sidecar(sidecar).get("config", {}).get("model", {}).get("name")
        shapes = model_header(sidecar)
    except CheckpointError as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None
    _check(trained in (None, cfg.model.name), key, path, f"holds a {trained} model, but model.name={cfg.model.name}")
    if info is None:
        return
    channels = shapes.get("normalize.mean", [0, info.channels])[1]
    _check(channels == info.channels, key, path, f"a model for {channels}-channel images; {info.name} has "
           f"{info.channels}")
    classes = shapes.get("head.weight", [info.num_classes])[0]
    _check(cfg.model.new_head or key != "model.init_from" or classes == info.num_classes, key, path,
           f"its head has {classes} classes, {info.name} has {info.num_classes} (model.new_head=true gives a new one)")


def _check_run_folder(cfg: Config) -> None:
    """A run folder that already holds another run (model, data or method differ) is not resumed or
    overwritten by mistake: train.resume=never starts it over on purpose."""
    previous = Path(cfg.run.out_dir) / cfg.run.name / "config.yaml"
    if cfg.train.resume != "auto" or not previous.is_file():
        return
    try:
        old = yaml.safe_load(previous.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    for section, key in (("model", "name"), ("data", "name"), ("method", "name")):
        was, now = (old.get(section) or {}).get(key), getattr(getattr(cfg, section), key)
        _check(was in (None, now), "run.name", cfg.run.name, f"{previous.parent} holds another run ({section}.{key} "
               f"{was}, here {now}): choose another run.name, or train.resume=never to start it over")


def validate(cfg: Config, world_size: int = 1, pending: set = frozenset(), training: bool = True) -> None:
    """Impossible values, caught before any rank starts. Imports are local: config stays light.
    ``pending``: paths that an earlier stage of the same recipe will create. ``training``: the run
    writes its folder and reads its sources (evaluation only reads a checkpoint: the checks of what
    training needs, such as model.init_from, are skipped)."""
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS
    from .schedules import DECAY_SHAPES, SCHEDULES
    from .models.partial import BN_POLICIES, TRAINABLE
    from .attacks.pgd import LOSSES, NORMS
    from .attacks.names import parse_attack
    from .engine.stages import STAGE_KINDS

    d, a, o, t = cfg.data, cfg.attack, cfg.optim, cfg.train
    _check(cfg.stage.kind in STAGE_KINDS, "stage.kind", cfg.stage.kind,
           f"unknown stage kind (known: {', '.join(STAGE_KINDS)})")
    _check(d.name in DATASETS, "data.name", d.name, f"unknown dataset (known: {', '.join(sorted(DATASETS))})")
    _check(cfg.model.name in MODELS, "model.name", cfg.model.name,
           f"unknown model (known: {', '.join(sorted(MODELS))})")
    _check(cfg.method.name in METHODS, "method.name", cfg.method.name,
           f"unknown method (known: {', '.join(sorted(METHODS))})")
    source = DATASETS[d.name]
    if source.info.needs_root:
        _check(d.root is not None and Path(d.root).expanduser().is_dir(), "data.root", d.root,
               f"dataset {d.name} reads user files: a folder that holds them is required")
        root = Path(d.root).expanduser()
        _check(not source.markers or any((root / f).is_file() for f in source.markers), "data.root", d.root,
               f"holds no {d.name} files (looked for {', '.join(source.markers)})")
        _check(d.name != "imagefolder" or (root / "train").is_dir(), "data.root", d.root,
               "imagefolder needs train/<class>/ (and test/<class>/) folders of images in it")
    _check(not a.norm == "Linf" or a.eps <= 1, "attack.eps", a.eps, "an L-inf radius in [0, 1] pixel units "
           "(inputs are in [0, 1]: 8/255 is 0.0314)")
    _check(not (cfg.eval.norm or a.norm) == "Linf" or (cfg.eval.eps or 0) <= 1, "eval.eps", cfg.eval.eps,
           "an L-inf radius in [0, 1] pixel units (inputs are in [0, 1]: 8/255 is 0.0314)")
    size = source.train_size if not d.root else None  # known for packaged data (not elsewhere)
    if size:
        _check(d.holdout < size, "data.holdout", d.holdout, f"must be smaller than the {size:,} training "
               f"images of {d.name}")
        usable = min(d.subset or size, size - d.holdout)
        _check(usable >= d.batch_size, "data.batch_size", d.batch_size,
               f"one global batch needs that many training images; {d.name} has {usable:,} here (data.subset, "
               "data.holdout)" + (f", fewer than the {world_size} ranks" if world_size > usable else ""))
    _check(d.batch_size >= world_size, "data.batch_size", d.batch_size,
           f"smaller than the world size ({world_size})")
    _check(d.batch_size % world_size == 0, "data.batch_size", d.batch_size,
           f"not divisible by the world size ({world_size})")
    _check(d.eval_batch_size > 0, "data.eval_batch_size", d.eval_batch_size, "must be positive")
    _check(d.subset is None or d.subset > 0, "data.subset", d.subset, "must be positive")
    _check(d.crop_padding >= 0, "data.crop_padding", d.crop_padding, "must be >= 0")
    _check(d.holdout >= 0, "data.holdout", d.holdout, "must be >= 0")
    m, meth = cfg.model, cfg.method
    _check(m.trainable in TRAINABLE, "model.trainable", m.trainable, f"must be one of {', '.join(TRAINABLE)}")
    _check(m.last_k >= 1, "model.last_k", m.last_k, "must be >= 1")
    _check((m.trainable == "modules") == bool(m.modules), "model.modules", m.modules,
           "names the tuned modules when model.trainable=modules, and only then")
    _check("lowest_mrc" not in m.modules or (m.modules == ["lowest_mrc"] and (m.init_from or not training)),
           "model.modules", m.modules, "lowest_mrc stands alone and needs model.init_from (a rift_mrc stage)")
    _check(m.frozen_bn in BN_POLICIES[:3], "model.frozen_bn", m.frozen_bn,
           f"must be one of {', '.join(BN_POLICIES[:3])}")
    _check(m.tuned_bn in ("auto",) + BN_POLICIES, "model.tuned_bn", m.tuned_bn,
           f"must be auto or one of {', '.join(BN_POLICIES)}")
    twins = METHODS[meth.name].uses_dual_bn
    _check(m.tuned_bn in ("auto", "dual") if twins else m.tuned_bn != "dual", "model.tuned_bn", m.tuned_bn,
           "dual (TWINS' two BN wings) goes with the methods twins_at and twins_trades, and only with them")
    _check(not twins or m.trainable != "head", "model.trainable", m.trainable,
           "TWINS needs BN layers in the tuned part (linear probing has none)")
    local_batch = d.batch_size // max(world_size, 1)
    _check(not twins or local_batch % 2 == 0, "data.batch_size", d.batch_size,
           f"TWINS splits each rank's batch in two halves: the per-rank batch ({local_batch}) must be even")
    # training only: an evaluation rebuilds a trained TWINS model from its checkpoint, with no source
    _check(not (twins and training) or m.init_from is not None, "model.init_from", m.init_from,
           f"method.name={meth.name} fine-tunes a source model: without one its frozen BN wing would hold "
           "freshly initialised statistics (model.init_from names the source)")
    _check(meth.beta >= 0, "method.beta", meth.beta, "must be >= 0")
    _check(meth.kl_reduction in ("batchmean", "sum", "mean"), "method.kl_reduction", meth.kl_reduction,
           "must be batchmean, sum or mean")
    _check(not METHODS[meth.name].trades_loss or a.loss in ("kl", "ce"), "attack.loss", a.loss,
           f"{meth.name} takes the KL adversary (TRADES' reference) or the CE adversary (TWINS' and Adv-SS' code)")
    _check(meth.twins_lambda >= 0, "method.twins_lambda", meth.twins_lambda, "must be >= 0")
    _check(meth.cartl_lambda >= 0, "method.cartl_lambda", meth.cartl_lambda, "must be >= 0")
    _check(meth.sn_beta > 0, "method.sn_beta", meth.sn_beta, "must be > 0")
    _check(meth.sn_power_iters >= 1, "method.sn_power_iters", meth.sn_power_iters, "must be >= 1")
    _check_adv_ss(cfg, METHODS, DATASETS)
    _check(a.eps >= 0, "attack.eps", a.eps, "must be >= 0")
    _check(a.steps > 0, "attack.steps", a.steps, "must be > 0")
    _check(a.step_size is None or a.step_size > 0, "attack.step_size", a.step_size, "must be > 0")
    _check(a.bn_mode in ("eval", "train"), "attack.bn_mode", a.bn_mode, "must be eval or train")
    _check(a.norm in NORMS, "attack.norm", a.norm, f"must be one of {', '.join(NORMS)}")
    _check(a.loss in LOSSES, "attack.loss", a.loss, f"must be one of {', '.join(LOSSES)}")
    _check(a.restarts > 0, "attack.restarts", a.restarts, "must be > 0")
    _check(a.compile in ("on", "off", "auto"), "attack.compile", a.compile, "must be on, off or auto")
    _check(a.precision in ("fp32", "bf16", "fp16"), "attack.precision", a.precision, "must be fp32, bf16 or fp16")
    _check(cfg.eval.precision in ("fp32", "bf16", "fp16"), "eval.precision", cfg.eval.precision,
           "must be fp32, bf16 or fp16")
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"unknown (known: {', '.join(SCHEDULES)})")
    _check(0 < o.gamma <= 1, "optim.gamma", o.gamma, "must be in (0, 1]")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
    _check(0 <= o.warmup_frac <= 1 and 0 <= o.decay_frac <= 1 and o.warmup_frac + o.decay_frac <= 1,
           "optim.warmup_frac", o.warmup_frac, f"warmup_frac and decay_frac ({o.decay_frac}) must be in [0, 1] "
           "and sum to at most 1")
    _check(o.decay_shape in DECAY_SHAPES, "optim.decay_shape", o.decay_shape,
           f"must be one of {', '.join(DECAY_SHAPES)}")
    _check(o.final_lr >= 0, "optim.final_lr", o.final_lr, "must be >= 0")
    _check(all(m > 0 for m in o.milestones), "optim.milestones", o.milestones, "must be positive epochs")
    _check(t.epochs > 0, "train.epochs", t.epochs, "must be > 0")
    _check(t.resume in ("auto", "never"), "train.resume", t.resume, "must be auto or never")
    _check(t.log_every > 0, "train.log_every", t.log_every, "must be > 0")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, "must be >= 0 (0: epoch ends only)")
    _check(t.threads is None or t.threads > 0, "train.threads", t.threads, "must be > 0")
    _check(cfg.eval.eps is None or cfg.eval.eps >= 0, "eval.eps", cfg.eval.eps, "must be >= 0")
    _check(cfg.eval.norm is None or cfg.eval.norm in NORMS, "eval.norm", cfg.eval.norm,
           f"must be one of {', '.join(NORMS)}")
    _check(cfg.eval.restarts > 0, "eval.restarts", cfg.eval.restarts, "must be > 0")
    _check(cfg.eval.aa_block_size > 0, "eval.aa_block_size", cfg.eval.aa_block_size, "must be > 0")
    _check(cfg.eval.limit is None or cfg.eval.limit > 0, "eval.limit", cfg.eval.limit, "must be > 0")
    _check(cfg.eval.split in ("train", "test") or (cfg.eval.split == "val" and d.holdout > 0), "eval.split",
           cfg.eval.split, "must be train, test, or val with data.holdout > 0")
    for name in cfg.eval.attacks:
        try:
            parse_attack(name)
        except ValueError as e:
            raise ConfigError(f"eval.attacks={name!r}: {e}") from None
    _check(cfg.dist.backend in ("auto", "gloo", "nccl"), "dist.backend", cfg.dist.backend,
           "must be auto, gloo or nccl")
    _check(d.loader in ("auto", "memory", "ffcv", "torch"), "data.loader", d.loader,
           "must be auto, memory, ffcv or torch")
    _check(d.ffcv_format in ("raw", "jpeg"), "data.ffcv_format", d.ffcv_format, "must be raw or jpeg")
    _check(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
    _check(d.loader != "ffcv" or importlib.util.find_spec("ffcv") is not None, "data.loader", d.loader,
           "FFCV is not installed (make install installs it)")
    _check(cfg.dist.engine in ("ddp", "deepspeed"), "dist.engine", cfg.dist.engine, "must be ddp or deepspeed")
    if cfg.dist.engine == "deepspeed":
        _check(cfg.dist.zero_stage in (0, 1, 2), "dist.zero_stage", cfg.dist.zero_stage,
               "must be 0, 1 or 2 (ZeRO-3's partitioned weights are not checkpointed: engine/deepspeed.py)")
        _check(importlib.util.find_spec("deepspeed") is not None, "dist.engine", cfg.dist.engine,
               "DeepSpeed is not installed (make install installs it)")
    _check(cfg.run.device in ("auto", "cpu", "cuda"), "run.device", cfg.run.device, "must be auto, cpu or cuda")
    _check(bool(cfg.run.name) and "/" not in cfg.run.name and cfg.run.name not in (".", ".."),
           "run.name", cfg.run.name, "must be a plain folder name")
    if training:  # evaluation reads the checkpoint alone, not the sources it was trained from
        for key, path in (("model.init_from", cfg.model.init_from), ("rift.robust_from", cfg.rift.robust_from)):
            _check(path is None or Path(path).exists() or path in pending, key, path, "no such file or folder")
            if path is not None and path not in pending:
                _check_source(cfg, key, path, source.info if not source.info.needs_root else None)
        _check_run_folder(cfg)
    r = cfg.rift
    _check(r.eps_w >= 0, "rift.eps_w", r.eps_w, "must be >= 0")
    _check(r.mrc_epochs >= 1, "rift.mrc_epochs", r.mrc_epochs, "must be >= 1")
    _check(r.mrc_lr > 0, "rift.mrc_lr", r.mrc_lr, "must be > 0")
    _check(r.mrc_batch_size >= 1, "rift.mrc_batch_size", r.mrc_batch_size, "must be >= 1")
    _check(r.mrc_points >= 1, "rift.mrc_points", r.mrc_points, "must be >= 1")
    for key, split, kind in (("rift.mrc_split", r.mrc_split, "rift_mrc"),
                             ("rift.select_split", r.select_split, "rift_interpolate")):
        _check(cfg.stage.kind != kind or split in ("train", "test") or (split == "val" and d.holdout > 0), key,
               split, "must be train, test, or val with data.holdout > 0")
    _check(bool(r.alphas) and 0.0 in r.alphas and all(0 <= x <= 1 for x in r.alphas), "rift.alphas", r.alphas,
           "alphas in [0, 1], 0 (the robust model) included")
    _check(r.tau >= 0, "rift.tau", r.tau, "must be >= 0")
    try:
        iterative = parse_attack(r.select_attack)["kind"] == "pgd"
    except ValueError:
        iterative = False
    _check(iterative, "rift.select_attack", r.select_attack, "must be pgd-K or cw-K")
    if training:  # a RiFT stage's model evaluates like any other
        _check(cfg.stage.kind != "rift_interpolate" or (r.robust_from and cfg.model.init_from), "rift.robust_from",
               r.robust_from, "rift_interpolate needs the robust model (rift.robust_from) and the tuned one "
               "(model.init_from)")
        _check(cfg.stage.kind != "rift_mrc" or cfg.model.init_from, "model.init_from", cfg.model.init_from,
               "rift_mrc measures a trained model: model.init_from names it")


def _check_adv_ss(cfg: Config, methods: dict, datasets: dict) -> None:
    """Adv-SS keys (methods/adv_ss.py); the image-size checks only for the tasks the method trains."""
    from .methods.adv_ss import TASKS
    meth, a, d = cfg.method, cfg.attack, cfg.data
    tasks = meth.ensemble_tasks
    _check(len(set(tasks)) == len(tasks) >= 2 and set(tasks) <= set(TASKS), "method.ensemble_tasks", tasks,
           f"two or three distinct tasks from {', '.join(TASKS)}")
    _check(meth.ensemble_export in tasks and meth.ensemble_export != "selfie", "method.ensemble_export",
           meth.ensemble_export, "must be rotation or jigsaw, and one of method.ensemble_tasks")
    _check(meth.ensemble_branch_blocks >= 1, "method.ensemble_branch_blocks", meth.ensemble_branch_blocks,
           "must be >= 1")
    _check(meth.adv_ss_lambda >= 0, "method.adv_ss_lambda", meth.adv_ss_lambda, "must be >= 0")
    _check(meth.jigsaw_grid >= 2, "method.jigsaw_grid", meth.jigsaw_grid, "must be >= 2")
    _check(1 <= meth.jigsaw_perms < math.factorial(meth.jigsaw_grid ** 2), "method.jigsaw_perms",
           meth.jigsaw_perms, f"must be in [1, {meth.jigsaw_grid ** 2}! - 1]")
    _check(meth.selfie_grid >= 3, "method.selfie_grid", meth.selfie_grid, "must be >= 3 (two targets or more)")
    _check(meth.selfie_layers >= 1, "method.selfie_layers", meth.selfie_layers, "must be >= 1")
    _check(meth.selfie_heads >= 1, "method.selfie_heads", meth.selfie_heads, "must be >= 1")
    name = meth.name
    if not methods[name].pretext:
        return
    used = set(tasks) if name == "adv_ss_ensemble" else {name.removeprefix("adv_")}
    size = (d.image_size or 224) if d.name == "imagefolder" else datasets[d.name].info.size
    for task, key, grid in (("jigsaw", "method.jigsaw_grid", meth.jigsaw_grid),
                            ("selfie", "method.selfie_grid", meth.selfie_grid)):
        _check(task not in used or size % grid == 0, key, grid, f"must divide {d.name}'s image size {size}")
    _check(not cfg.eval.at_end, "eval.at_end", cfg.eval.at_end,
           f"{name} trains a pretext head, not a {d.name} classifier: set eval.at_end=false")
    _check(a.loss == "ce", "attack.loss", a.loss, f"{name} attacks the pretext task's cross-entropy: use ce")
    if name == "adv_ss_ensemble":  # the joint attack and the penalty differentiate through input gradients
        _check(a.restarts == 1, "attack.restarts", a.restarts, "the ensemble's joint attack takes one start")
        _check(a.precision == "fp32", "attack.precision", a.precision, "the ensemble's log-det runs in fp32")
        _check(not cfg.model.sync_bn, "model.sync_bn", cfg.model.sync_bn,
               "the ensemble's double backward is not supported through synchronised BN")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(d: dict) -> Config:
    """Rebuild a Config from a checkpoint's stored dict (same schema checks as a recipe)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(d)))
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None

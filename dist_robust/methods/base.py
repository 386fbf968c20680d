"""What a method plug-in declares, and the two registries it declares itself into.

A method is one file (or one package) under ``dist_robust/methods/``: a ``Method`` subclass with its
``name``, its ``Config`` (a ``MethodConfig`` dataclass holding its own keys, which a recipe writes under
``method:``, with the checks of those keys), the capabilities the engine asks about, and
``prepare`` / ``loss`` / ``export``; ``@register`` enters it. A method with stages of its own (RiFT)
registers their kinds with ``@register_stage``. ``methods/__init__.py`` imports every module of the
package, so adding a method edits no other file.

Methods never import the data layer (``tests/test_layers.py``): a method's ``loss`` gets its batches
from the engine's loop, its config checks read what they need of the data through the ``data`` section
(``DataConfig.known_size``), and a stage kind declares the splits it reads (``splits``: its keys that
name one), which the engine loads and hands to its ``run``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, ClassVar

import torch
from torch import nn


@dataclass
class MethodConfig:
    """The ``method`` section: ``name`` picks the method; a method's own keys extend this class."""
    name: str = "standard"              # a registered method (dist_robust.methods.METHODS)

    def check(self, cfg, training: bool) -> None:
        """The method's own checks: its keys, and what it needs of the other sections (``cfg``, resolved).
        ``training``: the run trains (not an evaluation of a checkpoint). Raise utils.ConfigError."""


class Method:
    """prepare(model) -> model; loss(model, batch) -> (loss, metrics); export(model) -> model.

    ``loss`` receives the training model (possibly DDP-wrapped: its forward is the one that
    synchronises gradients) and must run attacks on the unwrapped module (``attacks.attack_mode``
    does this for it). Metrics are detached scalars summed over the batch: {"loss_sum", "correct",
    "n"} and any others (``*_sum`` or counts), which the engine sums over ranks and logs per image.
    A method that attacks returns ``attack_success`` too (``attack_success(adv_logits, y)``).
    """

    name: ClassVar[str]
    Config: ClassVar[type] = MethodConfig
    uses_dual_bn = False  # TWINS: the tuned part's BN layers become two wings (models/dual_bn.py)
    pretext = False       # Adv-SS: labels come from a pretext task, the head is not the dataset's classifier

    def __init__(self, cfg):
        self.cfg = cfg

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def export(self, model: nn.Module) -> nn.Module:
        return model


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: enter a method under its ``name``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice ({METHODS[cls.name].__module__}, {cls.__module__})")
    METHODS[cls.name] = cls
    return cls


@dataclass
class StageConfig:
    """The ``stage`` section: ``kind`` says what a run does, ``train`` (the engine's loop, the default)
    or a kind a method registered; that kind's own keys extend this class. In a recipe's ``stages``
    list, ``kind: K`` is short for ``stage: {kind: K}``."""
    kind: str = "train"

    def check(self, cfg, training: bool) -> None:
        """The kind's own checks, as MethodConfig.check."""


@dataclass(frozen=True)
class StageKind:
    run: Callable       # run(cfg, device, splits): one stage on every rank, writing into cfg's run folder
    Config: type        # its StageConfig subclass
    sources: tuple = ()  # its keys that name an earlier stage's model (``previous`` / ``stage:NAME``)
    splits: tuple = ()   # its keys that name a split it reads (train | val | test): the engine loads each
                         # (data.load_split of the run's ``data`` section) into ``splits``, {split: Dataset}


STAGE_KINDS: dict[str, StageKind] = {}


def register_stage(kind: str, config: type, sources: tuple = (), splits: tuple = ()) -> Callable:
    """Function decorator: enter ``run(cfg, device, splits)`` as the stage kind ``kind``. ``sources`` and
    ``splits`` name keys of ``config``; ``splits[cfg.stage.<key>]`` is the loaded split (a
    ``data.Dataset``: uint8 ``images``, ``labels``, ``info``) for each key of ``splits``."""
    def enter(run: Callable) -> Callable:
        if kind in STAGE_KINDS or kind == "train":
            raise ValueError(f"stage kind {kind!r} is registered twice")
        unknown = (set(sources) | set(splits)) - {f.name for f in fields(config)}
        if unknown:
            raise ValueError(f"stage kind {kind!r}: {sorted(unknown)} are not keys of {config.__name__}")
        STAGE_KINDS[kind] = StageKind(run, config, tuple(sources), tuple(splits))
        return run
    return enter


# Selectors of model.modules (RiFT's lowest_mrc): name -> resolve(init_from) -> a module name, used in
# place of the selector when the run is built.
MODULE_SELECTORS: dict[str, Callable[[str], str]] = {}


def attack_success(adv_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How many of the batch's adversarial examples the training forward misclassifies: the metric
    ``attack_success``, logged per image as the training attack's success rate. Read off logits the
    loss computes anyway, so it costs no forward and moves no training number."""
    return (adv_logits.detach().argmax(1) != y).sum()


def ce_with_metrics(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = nn.functional.cross_entropy(logits, y)
    with torch.no_grad():
        metrics = {"loss_sum": loss.detach() * len(y), "correct": (logits.argmax(1) == y).sum(),
                   "n": torch.tensor(len(y))}
    return loss, metrics

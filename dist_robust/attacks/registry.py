"""Evaluation attacks as plug-ins (``eval.attacks``, ``dist-robust eval --attacks``): every module of
this package is imported, and each that defines an attack family registers it (``register``). Adding an
attack is adding a file: a subclass of ``EvalAttack`` with its name's grammar (``parse``) and one of the
two ways an evaluation runs it (``shape``):

* ``"batch"``: one batch at a time (``attack(model, x, y, settings, eps, norm, start, opts) -> x_adv``).
  The evaluator cuts the points into blocks, shares them over the ranks, sums exact counts and saves
  finished blocks for a resume; with ``random_start`` it draws each point's start from its global index
  (so the counts do not depend on the ranks) and takes the worst case over ``eval.restarts`` starts.
  ``record(settings, eps, norm, restarts, seed, opts)`` is what the results file says of the attack.
* ``"whole"``: the whole split at once, with its own blocks and state (``run(model, dataset, name,
  settings, eps, norm, **how) -> {"correct", "acc", ...}``, summed over ranks), as AutoAttack does.

Families are found when a name is looked up, so a file dropped into the package is seen by the next
lookup without any other edit.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

EVAL_ATTACKS: dict[str, "EvalAttack"] = {}  # family name -> family, filled by the modules themselves
SHAPES = ("batch", "whole")


class EvalAttack:
    """One family of evaluation attacks. ``name``: the family (and, by convention, its names' prefix);
    ``grammar``: how its names are written, for the list of known attacks; ``shape``: batch | whole."""
    name: str = ""
    grammar: str = ""
    shape: str = "batch"
    random_start: bool = True  # batch: the evaluator gives ``attack`` each point's seeded start

    def parse(self, name: str) -> dict | None:
        """The settings ``name`` stands for, or None when it is not one of this family's names."""
        raise NotImplementedError

    def attack(self, model, x, y, settings: dict, eps: float, norm: str, start, opts: dict):
        """batch: x's adversarial examples (detached, in the eps ball and the [0, 1] box). ``start``: the
        points' seeded starts (None without ``random_start``); ``opts``: pgd()'s speed and precision knobs."""
        raise NotImplementedError

    def record(self, settings: dict, eps: float, norm: str, restarts: int, seed: int, opts: dict) -> dict:
        """batch: the attack's settings as the results file records them."""
        raise NotImplementedError

    def run(self, model, dataset, name: str, settings: dict, eps: float, norm: str, **how) -> dict:
        """whole: the summed result on the first ``how["limit"]`` points (``how``: batch_size, device,
        limit, seed, state_dir, fingerprint, block_size, say)."""
        raise NotImplementedError


def register(family: EvalAttack) -> EvalAttack:
    """Add a family (an instance); two modules may not register one name."""
    if family.shape not in SHAPES or not family.name or not family.grammar:
        raise ValueError(f"attack family {type(family).__name__}: needs a name, a grammar and a shape in {SHAPES}")
    held = EVAL_ATTACKS.get(family.name)
    if held is not None and type(held).__module__ != type(family).__module__:
        raise ValueError(f"attack family {family.name!r} is registered by {type(held).__module__} and "
                         f"{type(family).__module__}: rename one")
    EVAL_ATTACKS[family.name] = family
    return family


def families() -> dict[str, EvalAttack]:
    """Every registered family, after importing every module of the package (new files included)."""
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{module.name}")
    return EVAL_ATTACKS


def known() -> str:
    """The names every family accepts, for messages."""
    return ", ".join(["clean"] + [f.grammar for f in families().values()])


@dataclass(frozen=True)
class Attack:
    """A parsed evaluation attack name: its family (None for ``clean``) and settings."""
    name: str
    family: EvalAttack | None = None
    settings: dict = field(default_factory=dict)

    @property
    def shape(self) -> str:
        return "clean" if self.family is None else self.family.shape


def parse_attack(name: str) -> Attack:
    """An evaluation attack's name -> its family and settings (ValueError naming every known one)."""
    if name == "clean":
        return Attack(name)
    found = [(f, s) for f in families().values() if (s := f.parse(name)) is not None]
    if len(found) > 1:
        raise ValueError(f"ambiguous attack: the families {', '.join(f.name for f, _ in found)} all read it")
    if not found:
        raise ValueError(f"unknown attack (known: {known()})")
    return Attack(name, *found[0])

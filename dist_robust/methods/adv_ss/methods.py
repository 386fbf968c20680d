"""The Adv-SS methods: one pretext task (rotation, jigsaw, selfie) or their ensemble, with their keys."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

from ...attacks import attack_kwargs, pgd
from ...dist import unwrap
from ...utils import check
from ..base import Method, MethodConfig, register
from .attack import _correct, joint_attack, logdet_penalty, task_gradients, task_loss
from .networks import TASKS, PretextNet
from .pretext import jigsaw_permutations


@dataclass
class AdvSSConfig(MethodConfig):
    jigsaw_grid: int = 4                # tiles per side, must divide the image (32: 8x8 tiles, 28: 7x7)
    jigsaw_perms: int = 30              # random tile permutations; classes = jigsaw_perms + 1 (0: unshuffled)
    jigsaw_seed: int = 0                # seed of the permutation table (saved in the model: head.permutations)
    selfie_grid: int = 4                # patches per side; grid^2 // 4 of them are the targets
    selfie_layers: int = 2              # selfie attention-pooling layers (the authors: 13 at width 1024)
    selfie_heads: int = 4               # selfie attention heads; must divide the patch feature size
    selfie_faithful: bool = False       # selfie as the authors: raw dot-product scores, CE on their softmax
                                        # (a double softmax); false: scores / sqrt(width), plain CE

    def tasks(self) -> set:
        return {self.name.removeprefix("adv_")}

    def check(self, cfg, training):
        d, a = cfg.data, cfg.attack
        check(self.jigsaw_grid >= 2, "method.jigsaw_grid", self.jigsaw_grid, "must be >= 2")
        check(1 <= self.jigsaw_perms < math.factorial(self.jigsaw_grid ** 2), "method.jigsaw_perms",
              self.jigsaw_perms, f"must be in [1, {self.jigsaw_grid ** 2}! - 1]")
        check(self.selfie_grid >= 3, "method.selfie_grid", self.selfie_grid, "must be >= 3 (two targets or more)")
        check(self.selfie_layers >= 1, "method.selfie_layers", self.selfie_layers, "must be >= 1")
        check(self.selfie_heads >= 1, "method.selfie_heads", self.selfie_heads, "must be >= 1")
        size = d.known_size()  # None for imagefolder's own size (data.image_size=null): not known unread
        for task, key, grid in (("jigsaw", "method.jigsaw_grid", self.jigsaw_grid),
                                ("selfie", "method.selfie_grid", self.selfie_grid)):
            check(task not in self.tasks() or not size or size % grid == 0, key, grid,
                  f"must divide {d.name}'s image size {size}")
        check(not cfg.eval.at_end, "eval.at_end", cfg.eval.at_end,
              f"{self.name} trains a pretext head, not a {d.name} classifier: set eval.at_end=false")
        check(a.loss == "ce", "attack.loss", a.loss, f"{self.name} attacks the pretext task's cross-entropy: use ce")


@dataclass
class AdvSSEnsembleConfig(AdvSSConfig):
    ensemble_tasks: List[str] = field(default_factory=lambda: ["rotation", "jigsaw", "selfie"])
                                        # the pretext tasks trained together (2 or 3)
    ensemble_export: str = "rotation"   # the branch exported with the trunk (rotation | jigsaw)
    ensemble_branch_blocks: int = 1     # the backbone's last stages each task owns a copy of
                                        # (1: ResNet-50's layer4, as the authors; preact_resnet18: 2 = layer4 + bn)
    adv_ss_lambda: float = 0.1          # weight of the log-det diversity penalty (attack and loss)

    def tasks(self) -> set:
        return set(self.ensemble_tasks)

    def check(self, cfg, training):
        tasks, a = self.ensemble_tasks, cfg.attack
        check(len(set(tasks)) == len(tasks) >= 2 and set(tasks) <= set(TASKS), "method.ensemble_tasks", tasks,
              f"two or three distinct tasks from {', '.join(TASKS)}")
        check(self.ensemble_export in tasks and self.ensemble_export != "selfie", "method.ensemble_export",
              self.ensemble_export, "must be rotation or jigsaw, and one of method.ensemble_tasks")
        check(self.ensemble_branch_blocks >= 1, "method.ensemble_branch_blocks", self.ensemble_branch_blocks,
              "must be >= 1")
        check(self.adv_ss_lambda >= 0, "method.adv_ss_lambda", self.adv_ss_lambda, "must be >= 0")
        super().check(cfg, training)
        # the joint attack and the penalty differentiate through input gradients
        check(a.restarts == 1, "attack.restarts", a.restarts, "the ensemble's joint attack takes one start")
        check(a.precision == "fp32", "attack.precision", a.precision, "the ensemble's log-det runs in fp32")
        check(cfg.train.precision == "fp32", "train.precision", cfg.train.precision,
              "the ensemble's log-det penalty is in its training loss and runs in fp32")
        check(not cfg.model.sync_bn, "model.sync_bn", cfg.model.sync_bn,
              "the ensemble's double backward is not supported through synchronised BN")


# ---------------------------------------------------------------- the methods

class AdvSS(Method):
    """Adversarial pretext training of ``tasks`` (one for the single-task methods)."""

    Config = AdvSSConfig
    pretext = True
    tasks: tuple = ()

    def __init__(self, cfg, tasks: Optional[Sequence[str]] = None, lam: float = 0.0, branch_blocks: int = 0,
                 export: Optional[str] = None):
        super().__init__(cfg)
        self.tasks = tuple(tasks or type(self).tasks)
        self.lam, self.branch_blocks = lam, branch_blocks
        self.export_task = export or self.tasks[0]
        self.faithful = cfg.method.selfie_faithful

    def prepare(self, model: nn.Module) -> nn.Module:
        m = self.cfg.method
        table = jigsaw_permutations(m.jigsaw_grid, m.jigsaw_perms, m.jigsaw_seed) if "jigsaw" in self.tasks else None
        return PretextNet(unwrap(model), self.tasks, export=self.export_task, branch_blocks=self.branch_blocks,
                          jigsaw_table=table, selfie_grid=m.selfie_grid, selfie_layers=m.selfie_layers,
                          selfie_heads=m.selfie_heads, selfie_scaled=not self.faithful)

    def adversary(self, model, views: dict, labels: dict, positions) -> dict:
        a = self.cfg.attack
        if self.lam > 0 and len(views) > 1:
            return joint_attack(model, views, labels, positions, a.eps, a.steps, lam=self.lam, norm=a.norm,
                                step_size=a.step_size, random_init=a.random_start, bn_mode=a.bn_mode,
                                faithful=self.faithful)
        out = {}
        for t, x in views.items():  # independent PGD per view, through the custom-loss hook
            def view_loss(net, x_adv, y, t=t):
                return task_loss(t, net({t: x_adv}, positions)[t], y, self.faithful)
            y = labels[t] if labels[t] is not None else torch.zeros(len(x), dtype=torch.long, device=x.device)
            out[t] = pgd(model, x, y, a.eps, a.steps, **{**attack_kwargs(a), "loss": view_loss})
        return out

    def loss(self, model, x, y):
        net = unwrap(model)
        views, labels, positions = net.views(x)
        adv = self.adversary(model, views, labels, positions)
        # The clean views go through the (DDP) wrapper: its forward arms this step's gradient sync. The
        # adversarial forward runs on the plain module, where autograd.grad (the penalty) is safe.
        clean = model(views, positions)
        if self.lam > 0:
            adv = {t: v.requires_grad_(True) for t, v in adv.items()}
            adv_scores, adv_losses, grads = task_gradients(net, adv, labels, positions, self.faithful)
            h = logdet_penalty(list(grads.values()))
        else:
            adv_scores, h = net(adv, positions), None
            adv_losses = {t: task_loss(t, adv_scores[t], labels[t], self.faithful).mean() for t in adv}
        clean_losses = [task_loss(t, clean[t], labels[t], self.faithful).mean() for t in clean]
        loss = (sum(clean_losses) + sum(adv_losses.values())) / (2 * len(self.tasks))
        if h is not None:
            loss = loss + self.lam * h
        with torch.no_grad():  # accuracy on the adversarial views, averaged over the tasks
            correct = {t: _correct(t, adv_scores[t], labels[t]) for t in self.tasks}
            metrics = {"loss_sum": loss.detach() * len(x), "correct": sum(correct.values()) / len(correct),
                       "n": torch.tensor(len(x)), **{f"correct_{t}": c for t, c in correct.items()}}
            metrics["attack_success"] = len(x) - metrics["correct"]  # the adversarial views' error, task mean
            if h is not None:
                metrics["penalty_sum"] = h.detach() * len(x)
        return loss, metrics

    def export(self, model: nn.Module) -> nn.Module:
        return unwrap(model).export(self.export_task)


@register
class AdvRotation(AdvSS):
    name = "adv_rotation"
    tasks = ("rotation",)


@register
class AdvJigsaw(AdvSS):
    name = "adv_jigsaw"
    tasks = ("jigsaw",)


@register
class AdvSelfie(AdvSS):
    name = "adv_selfie"
    tasks = ("selfie",)


@register
class AdvSSEnsemble(AdvSS):
    """The ensemble: ``method.ensemble_tasks`` on a shared trunk, the joint attack and the log-det
    penalty weighted ``method.adv_ss_lambda``; exports ``method.ensemble_export``'s branch."""

    name = "adv_ss_ensemble"
    Config = AdvSSEnsembleConfig

    def __init__(self, cfg):
        m = cfg.method
        super().__init__(cfg, tasks=m.ensemble_tasks, lam=m.adv_ss_lambda, branch_blocks=m.ensemble_branch_blocks,
                         export=m.ensemble_export)

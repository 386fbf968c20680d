"""Adv-SS (Chen et al., CVPR 2020): adversarial self-supervised pre-training on the source's images.

The data's labels are ignored. Each batch becomes one view per pretext task (``dist_robust.pretext``)
with that task's labels, and the network learns the tasks on clean and adversarial views:

- ``adv_rotation``, ``adv_jigsaw``, ``adv_selfie``: one task, loss = (CE(clean view) + CE(adversarial
  view)) / 2. The adversary is ``pgd()`` from ``attack.*`` on the view (the rotated image, the shuffled
  image; for selfie the whole image, before patching) through its custom-loss hook.
- ``adv_ss_ensemble``: several tasks on a shared trunk, each with its own copy of the backbone's last
  ``method.ensemble_branch_blocks`` stages (``models.stage_names``) and its own head (selfie reads the
  trunk output, pooled). The views are attacked jointly (``joint_attack``): every step ascends each
  task's loss plus ``adv_ss_lambda`` * h, with h = mean_batch logdet(G^T G + 1e-5 I) and G the
  per-sample L2-normalised input gradients of the tasks. The model minimises (sum of clean and
  adversarial CEs) / (2 * tasks) + lambda * h, h recomputed on the final adversarial views (double
  backward).

Every method trains a ``PretextNet`` and exports a plain ``ImageClassifier`` (keys ``normalize.*``,
``features.*``, ``head.*``), so ``model.init_from`` + ``load_backbone`` fine-tune it with a new head.
The exported head is the pretext head: 4-way rotation; jigsaw with its permutation table as the buffer
``head.permutations`` (how the table travels with the weights: every checkpoint and the exported model
hold it, ``pretext_model_from_state`` rebuilds the jigsaw model from that state alone); for selfie alone
the source model's untouched head. Pretext runs set ``eval.at_end: false``: their head does not predict
the dataset's classes.

Faithful to the authors' code: the view transforms and labels (see pretext.py); the two losses above
with lambda = 0.1 in the attack and in the loss, h from the same adversarial forward as the CEs, 1e-10
added to the gradient norms; selfie's attention pooling (a learned u0 token before the context
features, post-norm layers with dropout 0.1, query = u + row embedding + column embedding, row
embeddings N(0, 1) and column embeddings 0 at init, dot products with the target patches, label i for
target position i, loss summed over the positions, the CE-on-softmax quirk when
``method.selfie_faithful``); the attack in train-mode BN when ``attack.bn_mode: train``.

Differences: selfie's encoder is ``method.selfie_layers`` layers of ``selfie_heads`` heads with a
feed-forward width of twice the feature size (theirs: 13 layers of 16 x 64 at 1024, d_ff 2048), and
outside the faithful mode its scores are divided by sqrt(d) (see ``SelfiePooling``). The
single-task selfie encodes patches with the whole backbone (theirs stops before ResNet-50's layer4,
which then starts fine-tuning at its random init). The jigsaw table redraws duplicates and the
identity. The per-task blocks start as copies of the model's block (theirs: independent inits). The
random start is clamped into [0, 1] before the first step (theirs after it). The default attack BN
mode is eval. Under DDP (theirs is single-GPU) the clean views go through the DDP wrapper, whose
forward arms this step's gradient all-reduce; the attack, the adversarial forward and the penalty run
on the plain module, so ``autograd.grad`` never meets DDP, and the one backward syncs all gradients.
Every term is a batch mean (h too), so nothing depends on the per-rank batch beyond BN statistics.
The ensemble refuses synchronised BN, attack restarts and half-precision attacks (config.py); the
joint attack lives here, not in attacks/, because it needs the views of one ``PretextNet``. Attacks
through pgd()'s custom-loss hook always run eagerly (``attack.compile`` does not apply).

Config keys read: ``method.ensemble_tasks``, ``ensemble_export``, ``ensemble_branch_blocks``,
``adv_ss_lambda``, ``jigsaw_grid``, ``jigsaw_perms``, ``jigsaw_seed``, ``selfie_grid``,
``selfie_layers``, ``selfie_heads``, ``selfie_faithful``; ``attack.*`` (the pretext adversary).
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import attack_kwargs, pgd
from ..attacks.pgd import ascend, attack_mode, random_start
from ..dist import unwrap
from ..models import ImageClassifier, build_model, stage_names
from ..pretext import jigsaw, jigsaw_permutations, rotate, selfie_positions, to_tiles
from .base import Method

__all__ = ["AdvJigsaw", "AdvRotation", "AdvSSEnsemble", "AdvSelfie", "JigsawHead", "PretextNet", "SelfiePooling",
           "TASKS", "joint_attack", "logdet_penalty", "pretext_model_from_state", "task_loss"]

TASKS = ("rotation", "jigsaw", "selfie")


# ---------------------------------------------------------------- heads

class JigsawHead(nn.Linear):
    """The jigsaw classifier. Its permutation table [classes, tiles] (row 0 the identity) is the buffer
    ``permutations``: saved with the weights, so a class keeps its meaning wherever the model goes."""

    def __init__(self, in_features: int, permutations: torch.Tensor):
        n = permutations.shape[1]
        if permutations.dim() != 2 or not torch.equal(permutations.sort(1).values,
                                                      torch.arange(n).expand_as(permutations)) \
                or not torch.equal(permutations[0], torch.arange(n)):
            raise ValueError("a jigsaw table holds permutations of the tiles, the identity first")
        super().__init__(in_features, len(permutations))
        self.register_buffer("permutations", permutations.clone().long())


class _EncoderLayer(nn.Module):
    """Post-norm transformer layer, as the authors' attention pooling (attention, then feed-forward,
    each with dropout, a residual and a LayerNorm). Attention is written out rather than taken from
    nn.MultiheadAttention, whose fused kernels have no double backward (the ensemble needs one)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = self.drop((q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1))
        x = self.norm1(x + self.drop(self.proj((att @ v).transpose(1, 2).reshape(b, n, d))))
        return self.norm2(x + self.drop(self.ff(x)))


class SelfiePooling(nn.Module):
    """Selfie's attention pooling: [u0; context patch features] through the encoder, u = the output at
    u0, one query per target position (u + row + column embedding), scored against every target patch.

    forward(features [B, N, d], positions [N]) -> scores [B, T, T], T = N // 4 (the first T positions
    are the targets): row i scores which target patch belongs at target position i; its label is i.
    Our small backbones take few layers (``method.selfie_layers``); the authors use 13 at d = 1024.

    ``scaled``: divide the scores by sqrt(d), as attention does. Raw dot products (the authors') reach
    tens, and CE on them swamps the other tasks' losses and jumps from step to step; the authors'
    double softmax hid that by bounding the loss, so only their faithful mode keeps the raw scores."""

    def __init__(self, dim: int, grid: int, layers: int = 2, heads: int = 4, dropout: float = 0.1,
                 scaled: bool = True):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"method.selfie_heads={heads} must divide the patch feature size {dim}")
        self.scale = dim ** -0.5 if scaled else 1.0
        self.u0 = nn.Parameter(torch.zeros(1, 1, dim))
        self.row_embed = nn.Parameter(torch.randn(grid, dim))  # the authors' inits: rows N(0, 1), columns 0
        self.col_embed = nn.Parameter(torch.zeros(grid, dim))
        self.layers = nn.ModuleList(_EncoderLayer(dim, heads, dropout) for _ in range(layers))

    @property
    def grid(self) -> int:
        return self.row_embed.shape[0]

    def forward(self, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, n, d = features.shape
        positions = positions.to(features.device)
        targets, context = positions[: n // 4], positions[n // 4:]
        u = torch.cat([self.u0.expand(b, 1, d), features[:, context]], 1)
        for layer in self.layers:
            u = layer(u)
        query = u[:, :1] + self.row_embed[targets // self.grid] + self.col_embed[targets % self.grid]
        return query @ features[:, targets].transpose(1, 2) * self.scale


# ---------------------------------------------------------------- the pre-training network

class TaskBlocks(nn.Module):
    """Stands in for one of the backbone's last blocks in the ensemble: each task with a branch owns a
    copy of the block; ``active`` names whose copy runs, None skips the block (selfie reads the trunk)."""

    def __init__(self, block: nn.Module, tasks: Sequence[str]):
        super().__init__()
        self.copies = nn.ModuleDict({t: copy.deepcopy(block) for t in tasks})
        self.active: Optional[str] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.active is None else self.copies[self.active](x)


class PretextNet(nn.Module):
    """normalize -> features -> one output per pretext task.

    ``forward(views, positions)`` maps {task: images} to {task: scores}: logits [B, 4] (rotation),
    [B, perms + 1] (jigsaw), selfie scores [B, T, T] (``positions`` from ``selfie_positions``). With
    ``branch_blocks`` = k > 0, each of the backbone's last k stages becomes a ``TaskBlocks`` holding one
    copy per rotation / jigsaw task; the features' own forward runs unchanged around it, so any model
    of the registry splits the same way. Selfie skips those blocks: it pools the trunk output, as the
    authors' ensemble does (with k = 0, as in the single task, the whole backbone). State keys:
    normalize.*, features.* (features.<block>.copies.<task>.* for split blocks), heads.<task>.*,
    selfie.*, and head.* (the source head, frozen, kept only to be exported by a selfie-only model).
    """

    def __init__(self, model: ImageClassifier, tasks: Sequence[str], *, export: str, branch_blocks: int = 0,
                 jigsaw_table: Optional[torch.Tensor] = None, selfie_grid: int = 4, selfie_layers: int = 2,
                 selfie_heads: int = 4, selfie_scaled: bool = True):
        super().__init__()
        tasks = tuple(tasks)
        if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(TASKS):
            raise ValueError(f"pretext tasks must be distinct names from {TASKS}, got {list(tasks)}")
        branched = [t for t in tasks if t != "selfie"]
        if export not in branched and tasks != ("selfie",):
            raise ValueError(f"the exported branch must be one of the trained {branched}, got {export!r}")
        self.tasks, self.feature_dim = tasks, model.feature_dim
        self.normalize, self.features = model.normalize, model.features
        if branch_blocks:
            blocks = stage_names(model)  # whole stages (ResNet-50's layer4 as the authors), not residual units
            if not 1 <= branch_blocks < len(blocks):
                raise ValueError(f"ensemble_branch_blocks={branch_blocks}: the trunk needs one of the model's "
                                 f"{len(blocks)} blocks ({', '.join(blocks)})")
            for name in blocks[-branch_blocks:]:
                child = name.removeprefix("features.")
                setattr(self.features, child, TaskBlocks(getattr(self.features, child), branched))
        device = self.normalize.mean.device
        self.heads = nn.ModuleDict()
        for t in branched:
            self.heads[t] = nn.Linear(self.feature_dim, 4) if t == "rotation" else JigsawHead(self.feature_dim,
                                                                                              jigsaw_table)
            nn.init.zeros_(self.heads[t].bias)  # as build_model's heads
        if "selfie" in tasks:
            self.selfie = SelfiePooling(self._trunk_dim(), selfie_grid, selfie_layers, selfie_heads,
                                        scaled=selfie_scaled)
        if tasks == ("selfie",):  # nothing else to export: keep the source head, out of training
            self.head = model.head.requires_grad_(False)
        self.to(device)

    def _route(self, task: Optional[str]) -> None:
        for m in self.features.children():
            if isinstance(m, TaskBlocks):
                m.active = task

    def _trunk_dim(self) -> int:
        """Width of the pooled trunk output, from one eval-mode forward (BN statistics untouched); every
        backbone ends in global pooling, so a 32x32 probe serves any image size."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                self._route(None)
                probe = torch.zeros(1, self.normalize.mean.numel(), 32, 32, device=self.normalize.mean.device)
                return self.features(self.normalize(probe)).shape[1]
        finally:
            for m, training in modes:
                m.training = training

    def views(self, x: torch.Tensor, generator: Optional[torch.Generator] = None):
        """(views, labels, positions) of a batch: one view per task with its labels (None for selfie,
        whose label is the target position), and selfie's positions (None without selfie)."""
        views, labels, positions = {}, {}, None
        for t in self.tasks:
            if t == "rotation":
                views[t], labels[t] = rotate(x, generator)
            elif t == "jigsaw":
                views[t], labels[t] = jigsaw(x, self.heads["jigsaw"].permutations, generator)
            else:
                views[t], labels[t] = x, None
                positions = selfie_positions(self.selfie.grid, generator).to(x.device)
        return views, labels, positions

    def forward(self, views: dict, positions: Optional[torch.Tensor] = None) -> dict:
        out = {}
        try:
            for task, x in views.items():
                if task == "selfie":
                    self._route(None)
                    patches = to_tiles(x, self.selfie.grid)  # [B, N, C, p, p]; the patches share BN statistics
                    feats = self.features(self.normalize(patches.flatten(0, 1))).view(len(x), patches.shape[1], -1)
                    out[task] = self.selfie(feats, positions)
                else:
                    self._route(task)
                    out[task] = self.heads[task](self.features(self.normalize(x)))
        finally:
            self._route(None)
        return out

    def export(self, task: str) -> ImageClassifier:
        """A plain ImageClassifier copy: the trunk, ``task``'s copies of the split blocks, its head."""
        net = copy.deepcopy(self)
        for name, m in list(net.features.named_children()):
            if isinstance(m, TaskBlocks):
                setattr(net.features, name, m.copies[task])
        head = net.heads[task] if task in net.heads else net.head.requires_grad_(True)
        out = ImageClassifier(net.normalize, net.features, self.feature_dim, head.out_features)
        out.head = head
        return out


def pretext_model_from_state(name: str, state: dict, **backbone_kwargs) -> ImageClassifier:
    """Rebuild an exported pretext model (a jigsaw head included: its table comes from the state)."""
    channels, classes = state["normalize.mean"].numel(), state["head.weight"].shape[0]
    model = build_model(name, channels, classes, [0.0] * channels, [1.0] * channels, **backbone_kwargs)
    if "head.permutations" in state:
        model.head = JigsawHead(model.feature_dim, state["head.permutations"])
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------- losses and the joint attack

def task_loss(task: str, scores: torch.Tensor, labels: Optional[torch.Tensor], faithful: bool = False) -> torch.Tensor:
    """Per-sample loss of a task. Selfie: CE over the T candidates summed over the T positions, with
    CE applied to softmax probabilities when ``faithful`` (the authors' double softmax)."""
    if task != "selfie":
        return F.cross_entropy(scores, labels, reduction="none")
    b, t, _ = scores.shape
    if faithful:
        scores = scores.softmax(-1)
    target = torch.arange(t, device=scores.device).repeat(b)
    return F.cross_entropy(scores.reshape(b * t, t), target, reduction="none").view(b, t).sum(1)


def _correct(task: str, scores: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    if task == "selfie":  # per image, the fraction of its target positions filled right
        return (scores.argmax(-1) == torch.arange(scores.shape[1], device=scores.device)).float().mean(1).sum()
    return (scores.argmax(1) == labels).sum().float()


def logdet_penalty(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean_b log det(G_b^T G_b + 1e-5 I), G_b = [g_1 / |g_1|, ..., g_T / |g_T|] the flattened input
    gradients of sample b, each L2-normalised (+1e-10 in the norm, as the authors). Large when the
    tasks' gradients point in different directions. In fp32 at least: logdet is unstable in half."""
    cols = []
    for g in grads:
        g = g.flatten(1)
        if g.dtype in (torch.float16, torch.bfloat16):
            g = g.float()
        cols.append(g / (g.norm(dim=1, keepdim=True) + 1e-10))
    G = torch.stack(cols, 2)  # [B, D, T]
    gram = G.transpose(1, 2) @ G + 1e-5 * torch.eye(len(cols), dtype=G.dtype, device=G.device)
    return torch.logdet(gram).mean()


def task_gradients(net: nn.Module, views: dict, labels: dict, positions, faithful: bool = False):
    """(scores, batch-mean losses, input gradients with create_graph=True) of every task; ``views``
    must be leaves that require grad. Each view feeds only its task's loss, so one autograd.grad of
    the sum gives every task's gradient."""
    scores = net(views, positions)
    losses = {t: task_loss(t, scores[t], labels[t], faithful).mean() for t in views}
    grads = torch.autograd.grad(sum(losses.values()), list(views.values()), create_graph=True)
    return scores, losses, dict(zip(views, grads))


def joint_attack(model: nn.Module, views: dict, labels: dict, positions: Optional[torch.Tensor], eps: float,
                 steps: int, *, lam: float, norm: str = "Linf", step_size: Optional[float] = None,
                 random_init: bool = True, bn_mode: str = "eval", faithful: bool = False) -> dict:
    """The ensemble's adversary (the authors' PGD_attack_3module): each step moves every view along
    sign(g_task + lam * dh/dx_task) (the normalised direction for L2), then projects it onto the eps
    ball and [0, 1]. Runs on the unwrapped model in ``attack_mode``; returns detached views."""
    alpha = eps / 4 if step_size is None else step_size
    with attack_mode(model, bn_mode) as net:
        x0 = {t: v.detach() for t, v in views.items()}
        delta = {t: ((x + random_start(x, eps, norm)).clamp(0, 1) - x) if random_init else torch.zeros_like(x)
                 for t, x in x0.items()}
        for _ in range(steps):
            xs = {t: (x0[t] + delta[t]).requires_grad_(True) for t in x0}
            _, _, grads = task_gradients(net, xs, labels, positions, faithful)
            h_grads = torch.autograd.grad(logdet_penalty(list(grads.values())), list(xs.values()))
            delta = {t: ascend(x0[t], delta[t], grads[t].detach() + lam * hg, eps, alpha, norm)
                     for t, hg in zip(xs, h_grads)}
    return {t: (x0[t] + delta[t]).detach() for t in x0}


# ---------------------------------------------------------------- the methods

class AdvSS(Method):
    """Adversarial pretext training of ``tasks`` (one for the single-task methods)."""

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
            if h is not None:
                metrics["penalty_sum"] = h.detach() * len(x)
        return loss, metrics

    def export(self, model: nn.Module) -> nn.Module:
        return unwrap(model).export(self.export_task)


class AdvRotation(AdvSS):
    tasks = ("rotation",)


class AdvJigsaw(AdvSS):
    tasks = ("jigsaw",)


class AdvSelfie(AdvSS):
    tasks = ("selfie",)


class AdvSSEnsemble(AdvSS):
    """The ensemble: ``method.ensemble_tasks`` on a shared trunk, the joint attack and the log-det
    penalty weighted ``method.adv_ss_lambda``; exports ``method.ensemble_export``'s branch."""

    def __init__(self, cfg):
        m = cfg.method
        super().__init__(cfg, tasks=m.ensemble_tasks, lam=m.adv_ss_lambda, branch_blocks=m.ensemble_branch_blocks,
                         export=m.ensemble_export)

"""Adv-SS networks: the pretext heads (jigsaw with its permutation table, selfie's attention pooling)
and ``PretextNet``, the pre-training network that turns a batch into its task views and exports a plain
``ImageClassifier``."""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
from torch import nn

from ...models import ImageClassifier, build_model, stage_names
from .pretext import jigsaw, rotate, selfie_positions, to_tiles

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

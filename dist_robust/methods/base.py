"""The method interface."""
from __future__ import annotations

import torch
from torch import nn


class Method:
    """prepare(model) -> model; loss(model, batch) -> (loss, metrics); export(model) -> model.

    ``loss`` receives the training model (possibly DDP-wrapped: its forward is the one that
    synchronises gradients) and must run attacks on the unwrapped module (``attacks.attack_mode``
    does this for it). Metrics are detached scalars summed over the batch so the engine can
    aggregate them exactly: {"loss_sum", "correct", "n"}.
    """

    uses_dual_bn = False  # TWINS: the tuned part's BN layers become two wings (models/dual_bn.py)
    trades_loss = False   # the adversary is TRADES' KL one or a CE one (attack.loss kl | ce)
    pretext = False       # Adv-SS: labels come from a pretext task, the head is not the dataset's classifier

    def __init__(self, cfg):
        self.cfg = cfg

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def export(self, model: nn.Module) -> nn.Module:
        return model


def ce_with_metrics(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = nn.functional.cross_entropy(logits, y)
    with torch.no_grad():
        metrics = {"loss_sum": loss.detach() * len(y), "correct": (logits.argmax(1) == y).sum(),
                   "n": torch.tensor(len(y))}
    return loss, metrics

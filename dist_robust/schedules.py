"""Learning-rate schedules as pure functions of the global iteration.

Stepping per iteration (not per epoch) and computing the lr from the step alone means a resumed run
gets the right lr with no scheduler state to save.
"""
from __future__ import annotations

import math


def constant(progress_epochs: float, total_epochs: float, lr: float, **_) -> float:
    return lr


def multistep(progress_epochs: float, total_epochs: float, lr: float, milestones=(), gamma: float = 0.1,
              **_) -> float:
    """lr * gamma^(number of milestones passed); milestones are epochs, possibly fractional."""
    return lr * gamma ** sum(progress_epochs >= m for m in milestones)


def cosine(progress_epochs: float, total_epochs: float, lr: float, final_lr: float = 0.0, **_) -> float:
    t = min(progress_epochs / total_epochs, 1.0)
    return final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * t))


SCHEDULES = {"constant": constant, "multistep": multistep, "cosine": cosine}


def lr_at(step: int, steps_per_epoch: int, optim_cfg, total_epochs: int) -> float:
    """The lr of iteration ``step`` (0-based) under ``optim_cfg`` (an OptimConfig)."""
    progress = step / steps_per_epoch
    lr = SCHEDULES[optim_cfg.schedule](progress, total_epochs, optim_cfg.lr,
                                       milestones=optim_cfg.milestones, gamma=optim_cfg.gamma,
                                       final_lr=optim_cfg.final_lr)
    if optim_cfg.warmup_epochs > 0 and progress < optim_cfg.warmup_epochs:
        lr *= (step + 1) / (optim_cfg.warmup_epochs * steps_per_epoch)
    return lr

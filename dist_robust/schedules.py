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


DECAY_SHAPES = ("linear", "cosine", "exp")


def slow_start_fast_decay(progress_epochs: float, total_epochs: float, lr: float, warmup_frac: float = 0.3,
                          decay_frac: float = 0.3, decay_shape: str = "linear", final_lr: float = 0.0,
                          **_) -> float:
    """Jeddi et al.'s AFT schedule as fractions of the run: a linear ramp 0 -> lr over the first
    ``warmup_frac`` (slow start), lr held, then over the last ``decay_frac`` a decay to ``final_lr``
    (fast decay) shaped ``linear``, ``cosine`` or ``exp`` (most of the drop early: e^-5u, rescaled to
    end exactly at final_lr)."""
    t = min(progress_epochs / total_epochs, 1.0)
    if t < warmup_frac:
        return lr * t / warmup_frac
    decay_start = 1.0 - decay_frac
    if t <= decay_start or decay_frac == 0:
        return lr
    u = (t - decay_start) / decay_frac
    if decay_shape == "linear":
        f = 1.0 - u
    elif decay_shape == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * u))
    else:
        f = (math.exp(-5 * u) - math.exp(-5)) / (1 - math.exp(-5))
    return final_lr + (lr - final_lr) * f


SCHEDULES = {"constant": constant, "multistep": multistep, "cosine": cosine, "ssfd": slow_start_fast_decay}


def lr_at(step: int, steps_per_epoch: int, optim_cfg, total_epochs: int) -> float:
    """The lr of iteration ``step`` (0-based) under ``optim_cfg`` (an OptimConfig)."""
    progress = step / steps_per_epoch
    lr = SCHEDULES[optim_cfg.schedule](progress, total_epochs, optim_cfg.lr,
                                       milestones=optim_cfg.milestones, gamma=optim_cfg.gamma,
                                       final_lr=optim_cfg.final_lr, warmup_frac=optim_cfg.warmup_frac,
                                       decay_frac=optim_cfg.decay_frac, decay_shape=optim_cfg.decay_shape)
    if optim_cfg.warmup_epochs > 0 and progress < optim_cfg.warmup_epochs:
        lr *= (step + 1) / (optim_cfg.warmup_epochs * steps_per_epoch)
    return lr

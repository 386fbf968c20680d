"""Adversarial attacks: the PGD family (pgd.py), the pieces of its step (steps.py), its fused step
(fused.py) and AutoAttack (autoattack.py). The evaluation attacks (``eval.attacks``) are plug-ins:
registry.py says how a file of this package adds one (pgd.py, cw.py, fgsm.py, autoattack.py do)."""
from .pgd import LOSSES, NORMS, attack_loss, attack_mode, cw_margin, pgd, random_start

__all__ = ["LOSSES", "NORMS", "attack_loss", "attack_mode", "attack_kwargs", "cw_margin", "pgd", "random_start"]


def attack_kwargs(attack_cfg) -> dict:
    """pgd() keyword arguments from an AttackConfig (everything but eps and steps)."""
    a = attack_cfg
    return dict(norm=a.norm, loss=a.loss, step_size=a.step_size, random_init=a.random_start, restarts=a.restarts,
                bn_mode=a.bn_mode, compile=a.compile, precision=a.precision, channels_last=a.channels_last)

"""Adversarial attacks (the attack engine issue deepens this package)."""
from .pgd import attack_mode, pgd_linf

__all__ = ["attack_mode", "pgd_linf"]

"""``cw-K``: the evaluation attack of K PGD steps on the CW margin (Carlini-Wagner's loss, Madry's
iterations), run as ``pgd-K`` is (attacks/pgd.py), with the margin in place of the CE loss."""
from .pgd import PGDAttack
from .registry import register


class CWAttack(PGDAttack):
    name, loss, about = "cw", "cw", "CW-margin PGD"


register(CWAttack())

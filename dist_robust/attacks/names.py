"""The evaluation attacks' names (``eval.attacks``, ``dist-robust eval --attacks``), parsed in one place:
config checks them, the evaluator runs them."""
from __future__ import annotations

import re

_ITERATIVE = re.compile(r"(pgd|cw)-(\d+)$")
AA_VERSIONS = {"aa": "standard", "aa-plus": "plus", "aa-rand": "rand"}  # fra31's AutoAttack versions
KNOWN = ("clean, pgd-K (CE PGD, K steps), cw-K (CW-margin PGD), aa (standard AutoAttack), aa-plus, aa-rand "
         "(AutoAttack's plus and rand versions)")


def parse_attack(name: str) -> dict:
    """An evaluation attack's name -> its kind and settings."""
    if name == "clean":
        return {"kind": name}
    if name in AA_VERSIONS:
        return {"kind": "aa", "version": AA_VERSIONS[name]}
    m = _ITERATIVE.match(name)
    if m and int(m.group(2)) > 0:
        return {"kind": "pgd", "loss": "ce" if m.group(1) == "pgd" else "cw", "steps": int(m.group(2))}
    raise ValueError(f"unknown attack (known: {KNOWN}; K > 0)")

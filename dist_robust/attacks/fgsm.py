"""``fgsm``: the fast gradient sign method (Goodfellow et al. 2015), the evaluation attack of one step
of size eps from the clean point: x + eps * sign(grad of the CE loss) for L-inf, x + eps * grad / ||grad||
for L2, clipped to [0, 1]. It is pgd() with one step of size eps and no random start, so it runs on the
model as every attack here does (eval-mode BN, input gradients only, ``eval.precision``). Deterministic:
it runs once whatever ``eval.restarts``."""
from .pgd import pgd
from .registry import EvalAttack, register


class FGSMAttack(EvalAttack):
    name = "fgsm"
    random_start = False

    @property
    def grammar(self):
        return f"{self.name} (one step of size eps)"

    def parse(self, name):
        return {} if name == self.name else None

    def attack(self, model, x, y, settings, eps, norm, start, opts):
        return pgd(model, x, y, eps, 1, norm=norm, loss="ce", step_size=eps, random_init=False, **opts)

    def record(self, settings, eps, norm, restarts, seed, opts):
        return {"eps": eps, "norm": norm, "steps": 1, "loss": "ce", "step_size": eps, "random_start": False,
                "restarts": 1, "precision": opts.get("precision", "fp32")}


register(FGSMAttack())

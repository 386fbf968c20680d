"""PGD adversarial training (Madry et al. 2018): cross-entropy on PGD examples only.

With a source checkpoint (model.init_from) this is adversarial fine-tuning (AFT); with
attack.steps=1 and a random start it is FGSM-RS "fast" AT.
"""
from ..attacks import attack_kwargs, pgd
from .base import Method, ce_with_metrics, register


@register
class PGDAdversarialTraining(Method):
    name = "pgd_at"

    def loss(self, model, x, y):
        a = self.cfg.attack
        x_adv = pgd(model, x, y, a.eps, a.steps, **attack_kwargs(a))
        # The training forward goes through the (DDP) wrapper in train mode: BN sees the adversarial batch.
        return ce_with_metrics(model(x_adv), y)

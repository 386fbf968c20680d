"""PGD adversarial training (Madry et al. 2018): cross-entropy on PGD examples only.

With a source checkpoint (model.init_from) this is adversarial fine-tuning (AFT); with
attack.steps=1 and a random start it is FGSM-RS "fast" AT.
"""
from ..attacks import attack_kwargs, pgd
from .base import Method, attack_success, ce_with_metrics, register


@register
class PGDAdversarialTraining(Method):
    name = "pgd_at"

    def loss(self, model, x, y):
        a = self.cfg.attack
        x_adv = pgd(model, x, y, a.eps, a.steps, **attack_kwargs(a))
        # The training forward goes through the (DDP) wrapper in train mode: BN sees the adversarial batch.
        logits = model(x_adv)
        loss, metrics = ce_with_metrics(logits, y)
        return loss, dict(metrics, attack_success=attack_success(logits, y))

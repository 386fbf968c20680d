"""PGD adversarial training (Madry et al. 2018): cross-entropy on L-inf PGD examples only.

With a source checkpoint (model.init_from) this is adversarial fine-tuning (AFT).
"""
from ..attacks import pgd_linf
from .base import Method, ce_with_metrics


class PGDAdversarialTraining(Method):
    def loss(self, model, x, y):
        a = self.cfg.attack
        x_adv = pgd_linf(model, x, y, eps=a.eps, steps=a.steps, step_size=a.step_size,
                         random_start=a.random_start, bn_mode=a.bn_mode)
        # The training forward goes through the (DDP) wrapper in train mode: BN sees the adversarial batch.
        return ce_with_metrics(model(x_adv), y)

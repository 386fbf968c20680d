"""TWINS (Liu et al., CVPR 2023): fine-tuning with two BN wings (models/dual_bn.py).

The adversary is PGD in eval mode through the adaptive wing (its running statistics), as in the
authors' code, for both variants. The training forward runs in ``split`` mode: the first half of each
rank's batch through the frozen wing, the second half through the adaptive wing.

- TWINS-AT:     lambda * CE(frozen, adv_1) + CE(adaptive, adv_2), each CE a mean over its half.
- TWINS-TRADES: lambda * CE(frozen, clean_1) + CE(adaptive, clean_2)
                + beta * (lambda * KL(clean_1 || adv_1) + KL(clean_2 || adv_2)), each KL summed over
                its half and reduced over the *full* local batch (``method.kl_reduction``; the code's
                sum / B).
Evaluation and export use the adaptive wing.

Forward order (TWINS-TRADES): we run the clean batch, then the adversarial one; the authors'
``train-TWINS-TRADES.py`` runs the adversarial batch first and the clean one last. The difference is
in BN running statistics only: each training forward normalises with its own batch's statistics
(adaptive wing) or the fixed source statistics (frozen wing), so the logits, the loss and the
gradients are the same in either order, but the adaptive wing's running statistics fold in the
adversarial batch last here (weight m, BN's momentum; the clean batch m(1 - m)) and the clean batch
last in the authors' code. Those statistics are what the eval-mode attack and the evaluation use.
"""
from dataclasses import dataclass

import torch.nn.functional as F

from ..dist import unwrap
from ..models.dual_bn import bn_branch, dual_layers
from ..utils import check
from .base import Method, MethodConfig, attack_success, ce_with_metrics, register
from .trades import TradesConfig, kl_term, trades_adversary


@dataclass
class TwinsConfig(MethodConfig):
    twins_lambda: float = 1.0           # weight of the frozen wing's loss (1.0 CIFAR, 0.4 high-res)

    def check(self, cfg, training):
        m = cfg.model
        check(self.twins_lambda >= 0, "method.twins_lambda", self.twins_lambda, "must be >= 0")
        check(m.tuned_bn in ("auto", "dual"), "model.tuned_bn", m.tuned_bn,
              f"{self.name} trains two BN wings in the tuned part: auto or dual")
        check(m.trainable != "head", "model.trainable", m.trainable,
              "TWINS needs BN layers in the tuned part (linear probing has none)")
        # training only: an evaluation rebuilds a trained TWINS model from its checkpoint, with no source
        check(not training or m.init_from is not None or m.weights is not None, "model.init_from", m.init_from,
              f"method.name={self.name} fine-tunes a source model: without one its frozen BN wing would hold "
              "freshly initialised statistics (model.init_from or, for timm:/torchvision: models, model.weights "
              "names the source)")


@dataclass
class TwinsTradesConfig(TradesConfig, TwinsConfig):
    def check(self, cfg, training):
        TradesConfig.check(self, cfg, training)
        TwinsConfig.check(self, cfg, training)


def _wing_ce(logits, y, lam):
    half = len(y) // 2
    return lam * F.cross_entropy(logits[:half], y[:half]) + F.cross_entropy(logits[half:], y[half:])


@register
class TwinsAT(Method):
    """TWINS' two BN wings need an even per-rank batch (its halves): preflight checks it."""
    name = "twins_at"
    Config = TwinsConfig
    uses_dual_bn = True

    def prepare(self, model):
        if not dual_layers(model):
            raise ValueError("TWINS needs a model with two-wing BN layers (model.tuned_bn=dual)")
        return model

    def adversary(self, model, x, y):
        return trades_adversary(model, x, y, self.cfg.attack, bn_branch="adaptive")

    def loss(self, model, x, y):
        x_adv = self.adversary(model, x, y)
        with bn_branch(unwrap(model), "split"):
            logits = model(x_adv)
        loss = _wing_ce(logits, y, self.cfg.method.twins_lambda)
        _, metrics = ce_with_metrics(logits.detach(), y)
        metrics.update(loss_sum=loss.detach() * len(y), attack_success=attack_success(logits, y))
        return loss, metrics


@register
class TwinsTRADES(TwinsAT):
    name = "twins_trades"
    Config = TwinsTradesConfig

    def loss(self, model, x, y):
        m = self.cfg.method
        x_adv = self.adversary(model, x, y)
        with bn_branch(unwrap(model), "split"):
            clean = model(x)
            adv = model(x_adv)
        half, lam = len(y) // 2, m.twins_lambda
        robust = (lam * kl_term(adv[:half], clean[:half], m.kl_reduction, len(y))
                  + kl_term(adv[half:], clean[half:], m.kl_reduction, len(y)))
        loss = _wing_ce(clean, y, lam) + m.beta * robust
        _, metrics = ce_with_metrics(clean.detach(), y)
        metrics.update(loss_sum=loss.detach() * len(y), attack_success=attack_success(adv, y))
        return loss, metrics

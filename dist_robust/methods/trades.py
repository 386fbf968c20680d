"""TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x')), x' the adversary's point.

The adversary is ``attack.loss``: ``kl`` is the reference (maximise the KL to the clean prediction,
started at x + 0.001 N(0, I) whatever ``attack.random_start`` says: at x itself the KL and its gradient
are zero up to rounding, and PGD's first sign step would follow rounding noise); ``ce`` is the CE-PGD adversary that the TWINS and
Adv-SS code use (its start follows ``attack.random_start``).
The KL term is ``nn.KLDivLoss`` on (log_softmax(f(x')), softmax(f(x))) with the clean branch not
detached, reduced by ``method.kl_reduction``: ``batchmean`` (sum / local batch, the reference's
``size_average=False`` then ``/ batch_size``), ``sum``, or ``mean`` (over batch x classes).

Forward order: one clean training forward, then the adversarial one; the clean logits serve both the
CE and the KL target. The reference ``trades_loss`` runs three: clean (the CE), adversarial, then
clean again (the KL target), so its clean forward comes last. The difference is in BN running
statistics only: a training forward normalises with its own batch's statistics, so the second clean
forward repeats the first and the loss and the gradients are the same; but the reference folds the
clean batch into the running statistics last (three updates a step), we the adversarial batch (two).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attacks import attack_kwargs, pgd
from ..utils import check
from .base import Method, MethodConfig, attack_success, ce_with_metrics, register

KL_REDUCTIONS = ("batchmean", "sum", "mean")


@dataclass
class TradesConfig(MethodConfig):
    beta: float = 6.0                   # weight of the KL term
    kl_reduction: str = "batchmean"     # KL: batchmean (sum / local batch, the reference) | sum | mean

    def check(self, cfg, training):
        check(self.beta >= 0, "method.beta", self.beta, "must be >= 0")
        check(self.kl_reduction in KL_REDUCTIONS, "method.kl_reduction", self.kl_reduction,
              f"must be one of {', '.join(KL_REDUCTIONS)}")
        check(cfg.attack.loss in ("kl", "ce"), "attack.loss", cfg.attack.loss,
              f"{self.name} takes the KL adversary (TRADES' reference) or the CE adversary (TWINS' and Adv-SS' code)")


def kl_term(adv_logits: torch.Tensor, clean_logits: torch.Tensor, reduction: str, batch: int) -> torch.Tensor:
    """KL(softmax(clean) || softmax(adv)) summed over the given rows, then divided as ``reduction``
    says for a batch of ``batch`` points (TWINS divides each wing's sum by the full batch)."""
    kl = F.kl_div(F.log_softmax(adv_logits, 1), F.log_softmax(clean_logits, 1), reduction="sum", log_target=True)
    if reduction == "sum":
        return kl
    if reduction == "batchmean":
        return kl / batch
    if reduction == "mean":
        return kl / (batch * adv_logits.shape[1])
    raise ValueError(f"kl_reduction must be batchmean, sum or mean, got {reduction!r}")


def trades_adversary(model, x, y, attack_cfg, bn_branch=None) -> torch.Tensor:
    a = attack_cfg
    kw = attack_kwargs(a)
    delta0 = None
    if a.loss == "kl":
        # The reference's start: a small Gaussian, not the uniform ball, and never x itself (even with
        # attack.random_start=false): the KL to the clean prediction is minimal there, its gradient zero
        # up to rounding, and a sign step would follow the rounding noise.
        delta0 = 0.001 * torch.randn_like(x)
    return pgd(model, x, y, a.eps, a.steps, delta0=delta0, bn_branch=bn_branch, **kw)


@register
class TRADES(Method):
    name = "trades"
    Config = TradesConfig

    def loss(self, model, x, y):
        x_adv = trades_adversary(model, x, y, self.cfg.attack)
        clean = model(x)
        natural, metrics = ce_with_metrics(clean, y)
        adv = model(x_adv)
        robust = kl_term(adv, clean, self.cfg.method.kl_reduction, len(x))
        loss = natural + self.cfg.method.beta * robust
        metrics.update(loss_sum=loss.detach() * len(y), attack_success=attack_success(adv, y))
        return loss, metrics

"""MART (Wang et al., ICLR 2020, "Improving adversarial robustness requires revisiting misclassified
examples"; official code YisenWang/MART, ``mart.py``: ``mart_loss``).

    loss = BCE(f(x'), y) + beta * mean_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i))

with p the softmax, x' the adversary's point, and the boosted cross-entropy
BCE(f(x'), y) = CE(f(x'), y) - log(1 - max_{k != y} p_k(x')), both terms batch means. The KL weight
1 - p_y(x) is large on the points the model misclassifies (or barely classifies) clean: MART's point.
The reference's constants are kept: log(1.0001 - p + 1e-12) in the boost, log(p' + 1e-12) in the KL,
1.0000001 - p_y in the weight, and the KL target p(x) not detached.

The adversary is CE PGD from ``attack.*`` on the unwrapped model in eval mode, started at
x + 0.001 N(0, I) as the reference starts it (``attack.random_start`` does not apply). Forward order:
the clean batch, then the adversarial one, both in train mode, as the reference. Every term is a mean
over the rank's batch, so DDP's gradient average is the global batch's mean.

Keys: ``method.beta`` (6.0, the authors' WRN-34-10 default; their CIFAR-10 recipe is eps 8/255,
PGD-10, step 0.007, lr 0.1, weight decay 2e-4).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attacks import attack_kwargs, pgd
from ..utils import check
from .base import Method, MethodConfig, attack_success, register


@dataclass
class MartConfig(MethodConfig):
    beta: float = 6.0                   # weight of the misclassification-aware KL term

    def check(self, cfg, training):
        check(self.beta >= 0, "method.beta", self.beta, "must be >= 0")
        check(cfg.attack.loss == "ce", "attack.loss", cfg.attack.loss, "MART's adversary maximises the CE: use ce")


def mart_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """The MART objective of a batch, given its clean and adversarial logits."""
    adv_probs = adv_logits.softmax(1)
    top2 = adv_probs.argsort(1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # the most likely wrong class
    boosted = F.cross_entropy(adv_logits, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), runner_up)
    clean_probs = clean_logits.softmax(1)
    true_probs = clean_probs.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), clean_probs, reduction="none").sum(1)
    return boosted + beta * (kl * (1.0000001 - true_probs)).mean()


@register
class MART(Method):
    name = "mart"
    Config = MartConfig

    def loss(self, model, x, y):
        a = self.cfg.attack
        x_adv = pgd(model, x, y, a.eps, a.steps, delta0=0.001 * torch.randn_like(x), **attack_kwargs(a))
        clean = model(x)
        adv = model(x_adv)
        loss = mart_loss(clean, adv, y, self.cfg.method.beta)
        with torch.no_grad():
            metrics = {"loss_sum": loss.detach() * len(y), "correct": (adv.argmax(1) == y).sum(),
                       "n": torch.tensor(len(y)), "clean_correct": (clean.argmax(1) == y).sum(),
                       "attack_success": attack_success(adv, y)}
        return loss, metrics

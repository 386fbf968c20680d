"""CARTL (Chen et al., ICML 2021): cooperative adversarially-robust transfer learning, two stages.

A robust source model is transferred by freezing its first blocks and fine-tuning the last k blocks
plus the head. Both stages cut the model at the input of block ``block_names(model)[-k]``, the first
tuned block (k = ``model.last_k``, the same k as ``configure_finetuning(trainable="last_k")``):

1. ``CARTLFeatureDistance`` (stage 1, on the source): PGD-AT plus Feature Distance Minimisation, so
   the features that will stay frozen move little under attack.
2. ``CARTLFineTune`` (stage 2, on the target): clean fine-tuning of the last k blocks and the head,
   every conv/linear layer there spectrally normalised (W_SN = beta * W / sigma(W)) so the tuned part
   does not amplify feature perturbations; the frozen part's BN keeps the source statistics.

Block counting (``dist_robust.models.block_names``): for the ResNet family k counts as CARTL's code
does, residual units, the final BN-ReLU of a pre-activation net and the FC (k = 4 on WRN-34-10 tunes
its last two units, the final BN-ReLU and the head; k = 1 the head alone, cut at its input). The small
CNNs count their stages, without the head, which trains with their last k anyway.

Config keys read (defaults in brackets):
- ``model.last_k`` (1): how many blocks are tuned; the cut is at the first one's input.
- ``method.cartl_lambda`` (0.01): weight of the feature-distance term, summed over the global batch (stage 1).
- ``method.sn_beta`` (1.0): the spectral-norm bound beta (stage 2; the GTSRB script uses 0.4).
- ``method.sn_power_iters`` (1): power iterations per training forward (stage 2).
- ``model.tuned_bn`` (auto = train): BN policy of the tuned part (stage 2; ``dual`` is refused).
- ``attack.*``: the stage-1 adversary, as PGD-AT reads it (``attack.loss`` ce is the paper's).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, spectral_norm

from ..attacks import attack_kwargs, pgd
from ..dist import unwrap, world_size
from ..models import block_names
from ..models.partial import configure_finetuning
from ..utils import check
from .base import Method, MethodConfig, attack_success, ce_with_metrics, register


@dataclass
class CARTLConfig(MethodConfig):
    cartl_lambda: float = 0.01          # weight of the feature distance (summed over the global batch)

    def check(self, cfg, training):
        check(self.cartl_lambda >= 0, "method.cartl_lambda", self.cartl_lambda, "must be >= 0")


@dataclass
class CARTLFineTuneConfig(MethodConfig):
    sn_beta: float = 1.0                # spectral-norm bound of the tuned layers (0.4 for GTSRB)
    sn_power_iters: int = 1             # power iterations per training forward

    def check(self, cfg, training):
        check(self.sn_beta > 0, "method.sn_beta", self.sn_beta, "must be > 0")
        check(self.sn_power_iters >= 1, "method.sn_power_iters", self.sn_power_iters, "must be >= 1")
        check(cfg.model.tuned_bn != "dual", "model.tuned_bn", cfg.model.tuned_bn,
              "CARTL fine-tuning has no two-wing BN")

__all__ = ["CARTLFeatureDistance", "CARTLFineTune", "CutFeatureHook", "apply_spectral_norm", "feature_distance",
           "remove_spectral_norm"]


# ---------------------------------------------------------------- the cut point

def cut_block_name(model: nn.Module, last_k: int) -> str:
    """Name of the first of the last ``last_k`` blocks: the frozen / tuned boundary."""
    blocks = block_names(unwrap(model))
    if not 1 <= last_k <= len(blocks):
        raise ValueError(f"last_k={last_k} but the model has {len(blocks)} blocks: {', '.join(blocks)}")
    return blocks[-last_k]


class CutFeatureHook:
    """Records the input of block ``block_names(model)[-last_k]`` on every *training-mode* forward.

    Attacks run in eval mode (``attack_mode``), so their many forwards are not recorded: after one
    adversarial and one clean training forward, ``features`` holds exactly [r_adv, r_clean]. The
    recorded tensors keep their autograd graph (the penalty trains the frozen-to-be part). Use as a
    context manager (removes the hook and drops the tensors on exit) or call ``remove()``; call
    ``clear()`` between steps if the hook is kept, or the graphs pile up.
    """

    def __init__(self, model: nn.Module, last_k: int):
        net = unwrap(model)  # hooks live on the plain module; a DDP forward still runs them
        self.block_name = cut_block_name(net, last_k)
        self.features: list[torch.Tensor] = []
        self._handle = net.get_submodule(self.block_name).register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple) -> None:
        if module.training:
            # A copy, as the authors' hook: a block that modified its input in place would otherwise
            # change the recorded feature after the fact, silently.
            self.features.append(args[0].clone())

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        self._handle.remove()
        self.clear()

    def __enter__(self) -> CutFeatureHook:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ---------------------------------------------------------------- stage 1: feature distance minimisation

def feature_distance(r_adv: torch.Tensor, r_clean: torch.Tensor) -> torch.Tensor:
    """Per-sample ||r_adv - r_clean||_2 / sqrt(d), d the flattened feature size; in fp32 (the norm of a
    large feature map loses digits in half precision)."""
    diff = (r_adv - r_clean).flatten(1).float()
    return diff.norm(dim=1) / math.sqrt(diff.shape[1])


@register
class CARTLFeatureDistance(Method):
    """Stage 1: loss = CE(f(x_adv), y) + lambda * sum_i ||r_adv,i - r_clean,i||_2 / sqrt(d), i over the global batch.

    x_adv is PGD from ``cfg.attack`` on the unwrapped model in eval mode (as PGD-AT); then the
    adversarial and the clean batch go through the training model in train mode, and the hook reads
    the features entering the first tuned block. The clean forward enters the loss only through the
    feature term (there is no clean CE; its logits are for monitoring), so BN's running statistics see
    both batches, the adversarial one first, as in the authors' code.

    DDP: the penalty is a sum over the *global* batch (``data.batch_size``), as the authors' sum over
    their single-GPU batch of 128. Each rank sums over its own part and DDP *averages* the ranks'
    gradients, so the rank's sum is multiplied by the world size; the CE is a mean over the rank's batch,
    which DDP's average already makes the global mean. The gradient is then the same for any number of
    ranks at the same global batch. The sum still makes the penalty's weight grow with the global batch:
    lambda = 0.01 is the paper's at a global batch of 128 (scale it by 128 / data.batch_size otherwise).

    Metrics: ``loss_sum``, ``correct`` (on the adversarial batch, the robust training accuracy CARTL
    selects on), ``n``, ``attack_success``, plus ``clean_correct`` and ``feature_dist_sum`` (sum of the
    per-sample distances) for monitoring.
    """

    name = "cartl"
    Config = CARTLConfig

    def __init__(self, cfg, lam: Optional[float] = None, last_k: Optional[int] = None):
        super().__init__(cfg)
        self.lam = cfg.method.cartl_lambda if lam is None else lam
        self.last_k = cfg.model.last_k if last_k is None else last_k

    def prepare(self, model: nn.Module) -> nn.Module:
        cut_block_name(model, self.last_k)  # a bad last_k fails here, not at the first step
        return model

    def adversary(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.cfg.attack
        return pgd(model, x, y, a.eps, a.steps, **attack_kwargs(a))

    def loss(self, model, x, y):
        x_adv = self.adversary(model, x, y)  # registered after the attack: its forwards are never seen
        with CutFeatureHook(model, self.last_k) as cut:
            adv_logits = model(x_adv)
            clean_logits = model(x)
            if len(cut.features) != 2:
                raise RuntimeError(f"CARTL's feature hook saw {len(cut.features)} training forwards, "
                                   "expected 2 (is the model in training mode?)")
            r_adv, r_clean = cut.features
        dist = feature_distance(r_adv, r_clean)
        # x world size: DDP averages the ranks' gradients, and the penalty is a sum over the global batch.
        loss = F.cross_entropy(adv_logits, y) + self.lam * world_size() * dist.sum()
        with torch.no_grad():
            metrics = {"loss_sum": loss.detach() * len(y), "correct": (adv_logits.argmax(1) == y).sum(),
                       "n": torch.tensor(len(y)), "clean_correct": (clean_logits.argmax(1) == y).sum(),
                       "feature_dist_sum": dist.detach().sum(), "attack_success": attack_success(adv_logits, y)}
        return loss, metrics


# ---------------------------------------------------------------- stage 2: non-expansive fine-tuning

class _Scale(nn.Module):
    """Multiplies the (spectrally normalised) weight by beta. No state: it adds no state_dict keys."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = float(beta)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.beta


def _has_spectral_norm(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, _SpectralNorm) for p in module.parametrizations.weight)


def apply_spectral_norm(model: nn.Module, last_k: int, beta: float = 1.0, head: bool = True,
                        n_power_iterations: int = 1) -> list[str]:
    """Reparametrise every ``nn.Conv2d`` / ``nn.Linear`` in the last ``last_k`` blocks (and the head,
    unless ``head=False``) as W_SN = beta * W / sigma(W); returns their names.

    sigma is torch's spectral-norm estimate on the weight reshaped to [out, -1] (15 power iterations at
    registration, then ``n_power_iterations`` per training forward; eval forwards reuse u and v). On a
    conv this bounds the reshaped matrix, not the conv operator: the usual approximation, as in the
    paper. The head is included by default (``head=False``: never), as CARTL's FC is one of its last k
    blocks. Under DDP u and v are buffers, re-broadcast from rank 0 at each forward
    (``broadcast_buffers=True``).
    """
    if beta <= 0:
        raise ValueError(f"spectral-norm beta must be > 0, got {beta}")
    net = unwrap(model)
    blocks = block_names(net)
    if not 1 <= last_k <= len(blocks):
        raise ValueError(f"last_k={last_k} but the model has {len(blocks)} blocks: {', '.join(blocks)}")
    roots = [b for b in blocks[-last_k:] if b != "head"] + (["head"] if head else [])  # the head: once
    wrapped = []
    for root in roots:
        # A list first: registering a parametrisation adds submodules to the tree being walked.
        for name, module in list(net.get_submodule(root).named_modules(prefix=root)):
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            if _has_spectral_norm(module):
                raise ValueError(f"{name} already has spectral norm (apply_spectral_norm called twice?)")
            spectral_norm(module, n_power_iterations=n_power_iterations)
            if beta != 1.0:
                # Runs after SN: parametrizations on one tensor compose in registration order.
                parametrize.register_parametrization(module, "weight", _Scale(beta))
            wrapped.append(name)
    return wrapped


def _private_class(module: nn.Module) -> None:
    """Give ``module`` its own copy of its ``Parametrized*`` class. torch's removal deletes the weight
    property from that class, and a deepcopy shares the class with its original: without this,
    exporting a copy would break the model it was copied from."""
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def remove_spectral_norm(model: nn.Module) -> nn.Module:
    """Bake every spectrally normalised weight into a plain ``weight`` parameter, in place; returns the
    model, whose state_dict then has a plain model's keys, in a plain model's order.

    The weight is read with the parametrisations in eval mode: a training-mode read would run one more
    power iteration, and the baked weights would not be the ones the model evaluated with. It is then
    copied into the original parameter (same object, same ``requires_grad``, whatever the grad mode).
    Safe on a deepcopy: see ``_private_class``.
    """
    for module in [m for m in unwrap(model).modules() if _has_spectral_norm(m)]:  # the walk edits the tree
        module.parametrizations.weight.eval()
        with torch.no_grad():
            baked = module.weight.clone()
        _private_class(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        with torch.no_grad():
            module.weight.copy_(baked)
        # The weight came back registered after the bias: restore a plain module's order.
        params = module._parameters
        rest = {k: v for k, v in params.items() if k != "weight"}
        weight = params["weight"]
        params.clear()
        params.update(weight=weight, **rest)
    return model


@register
class CARTLFineTune(Method):
    """Stage 2: clean CE fine-tuning of the last k blocks and the head under spectral norm.

    ``prepare`` freezes everything but the last k blocks and the head, puts the frozen part's BN in
    ``freeze_all`` (the source statistics: its pre-hook re-applies eval on every call, so
    ``model.train()`` cannot undo it), applies ``model.tuned_bn`` to the tuned part (auto = train; the
    paper's optional ``--freeze-bn`` is freeze_stats / freeze_all) and then spectral norm. Call it on
    the plain model, before any DDP wrapping (the engine does). ``export`` returns a copy without the
    parametrisation (plain W_SN weights, a plain model's state_dict keys); mid-run checkpoints keep the
    parametrised keys, which ``prepare`` recreates on resume.
    """

    name = "cartl_ft"
    Config = CARTLFineTuneConfig

    def __init__(self, cfg, beta: Optional[float] = None, last_k: Optional[int] = None,
                 power_iters: Optional[int] = None, tuned_bn: Optional[str] = None):
        super().__init__(cfg)
        m = cfg.method
        self.beta = m.sn_beta if beta is None else beta
        self.power_iters = m.sn_power_iters if power_iters is None else power_iters
        self.last_k = cfg.model.last_k if last_k is None else last_k
        tuned_bn = cfg.model.tuned_bn if tuned_bn is None else tuned_bn
        if tuned_bn == "dual":
            raise ValueError("CARTL fine-tuning has no two-wing BN (model.tuned_bn=dual)")
        self.tuned_bn = "train" if tuned_bn == "auto" else tuned_bn

    def prepare(self, model: nn.Module) -> nn.Module:
        model = configure_finetuning(model, trainable="last_k", last_k=self.last_k, frozen_bn="freeze_all",
                                     tuned_bn=self.tuned_bn)
        apply_spectral_norm(model, self.last_k, self.beta, n_power_iterations=self.power_iters)
        return model

    def loss(self, model, x, y):
        return ce_with_metrics(model(x), y)

    def export(self, model: nn.Module) -> nn.Module:
        # A copy: the training model keeps its parametrisation (and its optimizer's parameters).
        return remove_spectral_norm(copy.deepcopy(unwrap(model)))

"""Which part of a model fine-tuning trains, and what each part's BatchNorm does.

The **tuned part** is the whole model (``all``), the head only (``head``: linear probing), the last
k blocks plus the head (``last_k``: partial fine-tuning; blocks from ``block_names``, where the ResNet
family counts residual units and the head as CARTL does: k = 4 on WRN-34-10 is its last two units,
the final BN-ReLU and the head) or
named modules (``modules``: e.g. RiFT's one least robustness-critical convolution). The rest is the
**frozen part**: its parameters get ``requires_grad=False``.

BN policies, one per part:
- ``train``:        ordinary BN (batch statistics in training, running statistics updated);
- ``freeze_stats``: always normalise with the running statistics and never update them, also after
                    ``model.train()``; affine parameters train if their part does;
- ``freeze_all``:   ``freeze_stats`` and the affine parameters frozen too;
- ``dual``:         TWINS' two wings (models/dual_bn.py), tuned part only.

``requires_grad=False`` alone does not freeze running statistics, and ``model.train()`` undoes a
one-off ``.eval()``: a forward pre-hook re-applies eval mode to each stats-frozen BN layer on every
call, so the policy survives any number of ``train()`` calls, by construction.
"""
from __future__ import annotations

from torch import nn

from .dual_bn import to_dual_bn

TRAINABLE = ("all", "head", "last_k", "modules")
BN_POLICIES = ("train", "freeze_stats", "freeze_all", "dual")


def _keep_eval(module: nn.Module, args) -> None:
    module.training = False


def freeze_bn_stats(bn: nn.modules.batchnorm._BatchNorm) -> None:
    if not getattr(bn, "stats_frozen", False):
        bn.register_forward_pre_hook(_keep_eval)
        bn.stats_frozen = True
    bn.eval()


def tuned_module_names(model: nn.Module, trainable: str, last_k: int = 1, modules=()) -> list[str]:
    """Names of the modules that make up the tuned part of ``model`` (an ImageClassifier)."""
    from . import block_names
    if trainable == "all":
        return [""]
    if trainable == "head":
        return ["head"]
    if trainable == "last_k":
        blocks = block_names(model)
        if not 1 <= last_k <= len(blocks):
            raise ValueError(f"last_k={last_k} but the model has {len(blocks)} blocks: {', '.join(blocks)}")
        tuned = blocks[-last_k:]
        return tuned if "head" in tuned else tuned + ["head"]  # the head is a block of the ResNet family
    if trainable == "modules":
        known = dict(model.named_modules())
        unknown = [n for n in modules if n not in known or n == ""]
        if not modules or unknown:
            raise ValueError(f"trainable=modules needs names of the model's modules; unknown: {unknown or '(none given)'}")
        return list(modules)
    raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")


def _bn_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def _apply_policy(bn: nn.BatchNorm2d, policy: str) -> None:
    if policy in ("freeze_stats", "freeze_all"):
        freeze_bn_stats(bn)
    if policy == "freeze_all":
        for p in bn.parameters():
            p.requires_grad_(False)


def configure_finetuning(model: nn.Module, trainable: str = "all", last_k: int = 1, frozen_bn: str = "freeze_all",
                         tuned_bn: str = "train", modules=()) -> nn.Module:
    """Freeze the frozen part, apply each part's BN policy (``dual`` converts the tuned part's BN
    layers to TWINS wings). Returns the model (changed in place; dual conversion replaces modules)."""
    if tuned_bn not in BN_POLICIES:
        raise ValueError(f"tuned BN policy must be one of {', '.join(BN_POLICIES)}, got {tuned_bn!r}")
    if frozen_bn not in BN_POLICIES[:3]:
        raise ValueError(f"frozen BN policy must be one of {', '.join(BN_POLICIES[:3])}, got {frozen_bn!r}")
    tuned = [model.get_submodule(n) for n in tuned_module_names(model, trainable, last_k, modules)]
    tuned_params = {id(p) for m in tuned for p in m.parameters()}
    tuned_bns = {id(b) for m in tuned for b in _bn_layers(m)}
    for p in model.parameters():
        p.requires_grad_(id(p) in tuned_params)
    for bn in _bn_layers(model):
        if id(bn) not in tuned_bns:
            _apply_policy(bn, frozen_bn)
    if tuned_bn == "dual":
        if not tuned_bns:  # a network without BN (a ViT, a ConvNeXt): there would be no wings to train
            raise ValueError("model.tuned_bn=dual (TWINS) needs BN layers in the tuned part; this model has none")
        to_dual_bn(model, select=tuned_bns)
    else:
        for bn in _bn_layers(model):
            if id(bn) in tuned_bns:
                _apply_policy(bn, tuned_bn)
    return model

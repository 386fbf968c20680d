"""The attack's folded eval-mode BN (attacks/folded_bn.py): its input gradient is torch's own bitwise, for
every layer shape, layout and precision it folds; pgd() with and without it gives bitwise the same x_adv
on every model the project builds; the model comes back untouched and each attack sees its current
weights."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_robust.attacks import pgd, random_start
from dist_robust.attacks.folded_bn import FoldedBatchNorm, has_batch_norm
from dist_robust.methods.cartl import apply_spectral_norm
from dist_robust.models import build_model
from dist_robust.models.dual_bn import to_dual_bn
from dist_robust.models.partial import configure_finetuning
from dist_robust.models.sync_bn import convert_sync_bn


def _layer_grads(x, dy, mean, var, weight, bias, eps, fold):
    x = x.detach().requires_grad_(True)
    with FoldedBatchNorm() if fold else contextlib.nullcontext():
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.1, eps)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


@pytest.mark.parametrize("shape,affine", [((8, 32, 28, 28), True), ((7, 13, 5, 5), True), ((3, 64, 1, 1), True),
                                          ((5, 1, 9, 9), False), ((8, 10), True), ((2, 6, 3, 4, 5), False)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
def test_the_folded_layer_gives_torchs_output_and_input_gradient_bitwise(shape, affine, layout):
    """mixed: the gradient's layout differs from the input's (torch's strided path: not folded)."""
    if layout != "contiguous" and len(shape) != 4:
        pytest.skip("channels_last is 4-d")
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[1])
    c = shape[1]
    x = torch.randn(shape, generator=g) * 3 + 0.5
    dy = torch.randn(shape, generator=g) * 1e-2
    if layout in ("channels_last", "mixed"):
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g) * 2 + 1e-3
    weight, bias = (torch.randn(c, generator=g), torch.randn(c, generator=g)) if affine else (None, None)
    y0, dx0 = _layer_grads(x, dy, mean, var, weight, bias, 1e-5, fold=False)
    y1, dx1 = _layer_grads(x, dy, mean, var, weight, bias, 1e-5, fold=True)
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert dx0.stride() == dx1.stride() and dx0.dtype == dx1.dtype


def test_only_eval_mode_cpu_calls_without_parameter_gradients_are_folded(monkeypatch):
    from dist_robust.attacks import folded_bn
    calls = []
    real = folded_bn._EvalBatchNorm.apply
    monkeypatch.setattr(folded_bn._EvalBatchNorm, "apply", lambda *a: calls.append(1) or real(*a))
    bn = nn.BatchNorm2d(4).requires_grad_(False)
    x = torch.randn(6, 4, 3, 3)
    with FoldedBatchNorm():
        bn.train()(x)                         # batch statistics
        bn.eval()(x)                          # folded
        bn.double()(x.double())               # float64: not verified, not folded
        with torch.autocast("cpu", torch.bfloat16):
            bn.float()(nn.functional.conv2d(x, torch.randn(4, 4, 1, 1)))  # a bf16 input: slower folded
        bn.float().weight.requires_grad_(True)
        bn(x)                                 # a parameter wants its gradient
        nn.BatchNorm2d(4, track_running_stats=False).requires_grad_(False).eval()(x)  # batch statistics
    assert len(calls) == 1


# ---------------------------------------------------------------- every model the project builds

def _prepared(model, channels, size=16, seed=0):
    """Non-trivial BN statistics and affine parameters (a fresh model's are 0/1: too kind a test)."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, channels, size, size, generator=g))
        for m in model.modules():
            if isinstance(getattr(m, "running_var", None), torch.Tensor) and getattr(m, "weight", None) is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def _state(model):
    """Everything folding must leave as it was: the tree, every tensor bitwise, modes, flags, hooks."""
    return ([(n, type(m), m.training, len(m._forward_pre_hooks), len(m._forward_hooks), dict(vars(m)).get("forward"))
             for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _same_state(a, b):
    return a[0] == b[0] and a[2] == b[2] and a[1].keys() == b[1].keys() and all(
        torch.equal(a[1][k], b[1][k]) for k in a[1])


def _small(name, channels=1):
    return build_model(name, channels, 10, [0.5] * channels, [0.25] * channels)


def _twins(name):
    return to_dual_bn(_small(name))


def _frozen_stats():  # the frozen part's BN keeps eval mode by a pre-hook, also in a train-mode attack
    return configure_finetuning(_small("resnet_small"), "last_k", 1, "freeze_stats", "train")


def _cartl():
    model = _prepared(_small("resnet_small"), 1)  # statistics before SN, as CARTL's source has them
    apply_spectral_norm(model, last_k=2)
    return model


MODELS = {  # name -> (builder, input channels, pgd keywords); L2 by default: its step uses the gradient's values
    "cnn3 Linf": (lambda: _small("cnn3"), 1, dict(norm="Linf")),
    "cnn3 cw": (lambda: _small("cnn3"), 1, dict(loss="cw")),
    "cnn3 kl restarts": (lambda: _small("cnn3"), 1, dict(loss="kl", restarts=2)),
    "cnn3 bf16": (lambda: _small("cnn3"), 1, dict(precision="bf16")),
    "cnn3 channels_last": (lambda: _small("cnn3").to(memory_format=torch.channels_last), 1,
                           dict(channels_last=True)),
    "resnet_small": (lambda: _small("resnet_small"), 1, {}),
    "resnet_small bf16 channels_last": (lambda: _small("resnet_small"), 1, dict(precision="bf16", channels_last=True)),
    "preact_resnet18": (lambda: _small("preact_resnet18", 3), 3, {}),
    "wrn34_10": (lambda: _small("wrn34_10", 3), 3, {}),
    "resnet50": (lambda: _small("resnet50", 3), 3, {}),
    "twins adaptive": (lambda: _twins("resnet_small"), 1, dict(bn_branch="adaptive")),
    "twins frozen": (lambda: _twins("cnn3"), 1, dict(bn_branch="frozen")),
    "twins split": (lambda: _twins("cnn3"), 1, dict(bn_branch="split")),
    "sync bn": (lambda: convert_sync_bn(_small("resnet_small")), 1, {}),
    "cartl spectral norm": (_cartl, 1, {}),
    "frozen stats, train-mode attack": (_frozen_stats, 1, dict(bn_mode="train")),
    "timm:test_resnet": (lambda: _small("timm:test_resnet"), 1, {}),
    "timm:test_efficientnet (BatchNormAct2d)": (lambda: _small("timm:test_efficientnet"), 1, {}),
    "torchvision:resnet18": (lambda: _small("torchvision:resnet18", 3), 3, {}),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_pgd_with_folded_bn_is_bitwise_the_unfolded_attack_and_leaves_the_model_as_it_was(case):
    build, channels, kw = MODELS[case]
    kw = {"norm": "L2", **kw}
    torch.manual_seed(0)
    size = 8 if case in ("wrn34_10", "resnet50") else 16  # the big ones on small images
    model = _prepared(build(), channels, size)
    x, y = torch.rand(2, channels, size, size), torch.tensor([1, 2])
    if kw.get("bn_mode") == "train":  # a train-mode attack moves the tuned BN's statistics: both from one state
        twin = copy.deepcopy(model)
    else:
        twin = model
    delta0 = random_start(x, 0.1, kw["norm"], generator=torch.Generator().manual_seed(1))
    before = _state(model)
    torch.manual_seed(2)
    plain = pgd(twin, x, y, 0.1, 2, delta0=delta0, fold_bn=False, **kw)
    if twin is model:
        assert _same_state(before, _state(model))
    torch.manual_seed(2)
    folded = pgd(model, x, y, 0.1, 2, delta0=delta0, fold_bn=True, **kw)
    assert has_batch_norm(model)
    assert torch.equal(plain, folded)
    after = _state(model)
    if twin is model:
        assert _same_state(before, after)
    else:  # what the train-mode attack did to the statistics, the unfolded one did alike
        assert _same_state(_state(twin), after)
        assert before[0] == after[0] and before[2] == after[2]


def test_each_attack_sees_the_current_weights_and_statistics():
    """Training changes BN's weights and statistics between attacks (in place, as an optimizer and a
    train-mode forward do): the next folded attack must use the new ones."""
    torch.manual_seed(0)
    model = _prepared(_small("cnn3"), 1)
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([1, 2, 3, 4])
    delta0 = random_start(x, 0.1, "Linf", generator=torch.Generator().manual_seed(1))
    first = pgd(model, x, y, 0.1, 2, delta0=delta0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(1.5)
                m.running_var.mul_(3.0)
    again = pgd(model, x, y, 0.1, 2, delta0=delta0)
    assert not torch.equal(first, again)
    assert torch.equal(again, pgd(model, x, y, 0.1, 2, delta0=delta0, fold_bn=False))


def test_a_model_without_bn_runs_unfolded():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    assert not has_batch_norm(net)
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    delta0 = torch.zeros_like(x)
    assert torch.equal(pgd(net, x, y, 0.1, 2, delta0=delta0), pgd(net, x, y, 0.1, 2, delta0=delta0, fold_bn=False))

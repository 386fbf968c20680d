"""Model registry, architectures, normalisation and backbone transfer (CPU, a few seconds)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_robust.models import (
    MODELS,
    ImageClassifier,
    Normalize,
    block_names,
    build_model,
    head_parameter_names,
    load_backbone,
    stage_names,
)

SMALL = ["cnn3", "resnet_small"]


def make(name, channels=3, classes=10, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(name, channels, classes, mean=[0.5] * channels, std=[0.25] * channels, **kw)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_structure_and_output_shape(name, channels):
    model = make(name, channels, classes=7).eval()
    assert [n for n, _ in model.named_children()] == ["normalize", "features", "head"]
    assert isinstance(model.head, nn.Linear) and model.head.in_features == model.feature_dim
    assert all(k.startswith(("normalize.", "features.", "head.")) for k in model.state_dict())
    # Later work swaps BN for synchronised / dual BN: only plain BatchNorm2d may appear.
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)
    sizes = [28, 32] if name in SMALL else [32]
    with torch.no_grad():
        for size in sizes:
            x = torch.rand(2, channels, size, size)
            assert model(x).shape == (2, 7)
            assert model.features(model.normalize(x)).shape == (2, model.feature_dim)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stages_partition_backbone_parameters_and_blocks_are_disjoint_in_forward_order(name):
    model = make(name)
    stages = stage_names(model)
    assert stages and all(b.startswith("features.") for b in stages)
    owners = [[b for b in stages if n.startswith(b + ".")] for n, _ in model.features.named_parameters(prefix="features")]
    assert all(len(o) == 1 for o in owners)
    blocks = block_names(model)
    owners = [[b for b in blocks if n.startswith(b + ".")] for n, _ in model.named_parameters()]
    assert all(len(o) <= 1 for o in owners)  # no parameter in two blocks
    assert (blocks == stages) == (name in SMALL) and (blocks[-1] == "head") == (name not in SMALL)
    seen = []  # the blocks run in the listed order
    for b in blocks:
        model.get_submodule(b).register_forward_pre_hook(lambda m, args, b=b: seen.append(b))
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 16, 16))
    assert seen == blocks


@pytest.mark.parametrize("name, feature_dim, backbone_params", [
    ("preact_resnet18", 512, 11.17e6 - 5130),   # Rice et al.'s PreActResNet-18 (final BN): 11.17M incl. head
    ("wrn34_10", 640, 46.16e6 - 6410),          # TRADES' WRN-34-10: 46.16M incl. head
    ("resnet50", 2048, 23.51e6),                # torchvision ResNet-50 without fc (25.56M - 2.05M)
])
def test_published_parameter_counts(name, feature_dim, backbone_params):
    model = make(name, classes=10)
    assert model.feature_dim == feature_dim
    n_features = sum(p.numel() for p in model.features.parameters())
    n_head = sum(p.numel() for p in model.head.parameters())
    assert n_head == feature_dim * 10 + 10
    assert abs(n_features - backbone_params) / backbone_params < 0.01


def test_cnn3_layout_and_width():
    model = make("cnn3", channels=1)
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 32, (3, 3)), (32, 64, (3, 3)),
                                                                               (64, 128, (3, 3))]
    assert model.feature_dim == 128
    assert make("cnn3", channels=1, width=16).feature_dim == 64


def test_resnet50_stem_follows_channels():
    assert make("resnet50", channels=1).features.conv1.weight.shape == (64, 1, 7, 7)
    assert make("resnet50", channels=3).features.conv1.weight.shape == (64, 3, 7, 7)


def test_normalize_math_and_state():
    norm = Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
    x = torch.rand(4, 3, 5, 5)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), (x - mean) / std)
    assert set(norm.state_dict()) == {"mean", "std"}
    model = build_model("cnn3", 3, 10, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0])
    state = model.state_dict()
    torch.testing.assert_close(state["normalize.mean"].flatten(), mean.flatten())
    torch.testing.assert_close(state["normalize.std"].flatten(), std.flatten())


def test_mean_std_broadcast_and_checks():
    model = build_model("cnn3", 3, 10, mean=[0.5], std=[0.2])
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.5] * 3)
    assert model.normalize.std.flatten().tolist() == pytest.approx([0.2] * 3)
    with pytest.raises(ValueError, match="mean"):
        build_model("cnn3", 3, 10, mean=[0.5, 0.5], std=[0.2])
    with pytest.raises(ValueError, match="std"):
        build_model("cnn3", 1, 10, mean=[0.5], std=[0.0])


def test_unknown_model_lists_known():
    with pytest.raises(ValueError) as err:
        build_model("vgg99", 3, 10, mean=[0.5], std=[0.5])
    assert "vgg99" in str(err.value) and all(name in str(err.value) for name in MODELS)


@pytest.mark.parametrize("name", SMALL)
def test_load_backbone_into_new_task(name):
    source = build_model(name, 1, 10, mean=[0.3], std=[0.4])
    with torch.no_grad():  # make the source's BN statistics non-trivial
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    target = make(name, channels=1, classes=5, seed=1)
    fresh_head = {k: v.clone() for k, v in target.head.state_dict().items()}

    loaded = load_backbone(target, source.state_dict(), new_head=True)

    assert loaded == [k for k in target.state_dict() if not k.startswith("head.")]
    src, tgt = source.state_dict(), target.state_dict()
    for k in loaded:
        assert torch.equal(src[k], tgt[k]), k
    for k, v in fresh_head.items():
        assert torch.equal(tgt[f"head.{k}"], v)
    source.eval(), target.eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        feats = source.features(source.normalize(x))
        torch.testing.assert_close(target.features(target.normalize(x)), feats, rtol=0, atol=0)
        torch.testing.assert_close(target(x), target.head(feats))


def test_load_backbone_keeps_or_replaces_head():
    source, target = make("cnn3", classes=10, seed=0), make("cnn3", classes=10, seed=1)
    loaded = load_backbone(target, source.state_dict(), new_head=False)
    assert "head.weight" in loaded and torch.equal(target.head.weight, source.head.weight)
    with pytest.raises(ValueError, match="head.weight"):
        load_backbone(make("cnn3", classes=5), source.state_dict(), new_head=False)


def test_load_backbone_rejects_mismatches():
    source = make("cnn3", channels=3).state_dict()
    with pytest.raises(ValueError, match=r"features\.stem"):  # other architecture: its keys are missing
        load_backbone(make("resnet_small"), source)
    with pytest.raises(ValueError, match=r"normalize\.mean"):  # other channel count
        load_backbone(make("cnn3", channels=1), source)
    bad = dict(source)
    bad["features.stage3.0.weight"] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(ValueError, match=r"features\.stage3\.0\.weight"):
        load_backbone(make("cnn3"), bad)
    with pytest.raises(ValueError, match=r"features\.extra"):
        load_backbone(make("cnn3"), {**source, "features.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"module\."):  # a DDP-prefixed state
        load_backbone(make("cnn3"), {f"module.{k}": v for k, v in source.items()})


def test_head_parameter_names():
    model = make("cnn3")
    assert head_parameter_names(model) == ["head.weight", "head.bias"]
    assert isinstance(model, ImageClassifier)

"""Model registry: every model is ``ImageClassifier = head(features(normalize(x)))``.

Inputs are images in [0, 1] pixel space (attacks work there); ``normalize`` carries the per-channel
mean/std as buffers, ``features`` is the backbone ([B, C, H, W] -> [B, D]) and ``head`` is an
``nn.Linear(D, num_classes)``. The split is what fine-tuning needs: the backbone moves from a source
checkpoint to a target task (``load_backbone``) and the head is replaced.

Blocks (``block_names``) are the backbone's top-level children that own parameters, in forward order;
together they hold every backbone parameter exactly once. Per architecture:

- cnn3:            features.stage1, features.stage2, features.stage3 (the three conv-BN-ReLU stages)
- resnet_small:    features.stem, features.stage1, features.stage2, features.stage3
- preact_resnet18: features.conv1 (stem), features.layer1 .. features.layer4, features.bn (final BN)
- wrn34_10:        features.conv1 (stem), features.block1 .. features.block3, features.bn1 (final BN)
- resnet50:        features.conv1, features.bn1 (the stem), features.layer1 .. features.layer4
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .normalize import Normalize
from .resnet import PreActResNet18, resnet50, wrn34_10
from .small import CNN3, ResNetSmall

__all__ = ["MODELS", "ImageClassifier", "Normalize", "block_names", "build_model", "head_classes",
           "head_parameter_names", "load_backbone", "load_state_strict", "model_from_state"]

# name -> constructor(in_channels, **kwargs) of a backbone exposing ``out_features``. Every backbone
# ends in global average pooling, so none needs the image size.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn3": CNN3,
    "resnet_small": ResNetSmall,
    "preact_resnet18": PreActResNet18,
    "wrn34_10": wrn34_10,
    "resnet50": resnet50,
}

BACKBONE_PREFIXES = ("normalize.", "features.")


class ImageClassifier(nn.Module):
    """``head(features(normalize(x)))``; state_dict keys are ``normalize.*``, ``features.*``, ``head.*``."""

    def __init__(self, normalize: Normalize, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


def _per_channel(name: str, values: Sequence[float] | float, in_channels: int) -> list[float]:
    values = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) == 1:
        values = values * in_channels  # one value for every channel
    if len(values) != in_channels:
        raise ValueError(f"{name} has {len(values)} values but the model has {in_channels} input channels")
    return values


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, as torchvision and the WRN code) for convs, BN weight 1 / bias 0,
    zero bias for linear layers (their weights keep PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def build_model(name: str, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float],
                image_size: int = 32, **backbone_kwargs) -> ImageClassifier:
    """A freshly initialised model. ``image_size`` is checked only (every backbone ends in global
    average pooling); ``backbone_kwargs`` go to the backbone constructor (e.g. ``width`` for cnn3)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    if in_channels < 1 or num_classes < 1 or image_size < 1:
        raise ValueError(f"in_channels, num_classes and image_size must be >= 1 "
                         f"(got {in_channels}, {num_classes}, {image_size})")
    normalize = Normalize(_per_channel("mean", mean, in_channels), _per_channel("std", std, in_channels))
    features = MODELS[name](in_channels, **backbone_kwargs)
    model = ImageClassifier(normalize, features, features.out_features, num_classes)
    init_weights(model)
    return model


def load_backbone(model: ImageClassifier, state: dict[str, torch.Tensor], new_head: bool = True) -> list[str]:
    """Copy a source checkpoint's ``normalize.*`` and ``features.*`` entries into ``model`` (and
    ``head.*`` too unless ``new_head``); returns the keys loaded, in the model's order.

    Strict on what is loaded: a missing, unexpected or differently shaped key raises ValueError naming
    it (a source with another architecture or channel count). The source's mean/std come along on
    purpose: the backbone was trained under them. With ``new_head`` the source's head, whatever its
    number of classes, is ignored and the model keeps its fresh one.
    """
    prefixes = BACKBONE_PREFIXES if new_head else BACKBONE_PREFIXES + ("head.",)
    own = model.state_dict()
    wanted = [k for k in own if k.startswith(prefixes)]
    strays = [k for k in state if not k.startswith(BACKBONE_PREFIXES + ("head.",))]
    if strays:
        # Typically a "module." prefix from DDP, or a state that is not a model's.
        raise ValueError(f"source state has keys outside normalize./features./head.: {strays[:5]}")
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"source state lacks {len(missing)} key(s) the model needs, e.g. {missing[:5]}")
    unexpected = [k for k in state if k.startswith(prefixes) and k not in own]
    if unexpected:
        raise ValueError(f"source state has {len(unexpected)} key(s) the model lacks, e.g. {unexpected[:5]}")
    for k in wanted:
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise ValueError(f"shape mismatch for {k}: source {tuple(state[k].shape)}, model {tuple(own[k].shape)}")
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(state[k])  # state_dict tensors share storage with the model's
    return wanted


def head_parameter_names(model: ImageClassifier) -> list[str]:
    return [f"head.{n}" for n, _ in model.head.named_parameters()]


def block_names(model: ImageClassifier) -> list[str]:
    """The backbone's blocks as module names in ``model`` (e.g. ``features.stage1``), in forward order;
    see the module docstring for each architecture. A block's parameters are those whose names start
    with ``name + "."``; ``model.get_submodule(name)`` gives the block."""
    return [f"features.{n}" for n, m in model.features.named_children()
            if next(m.parameters(), None) is not None]


def head_classes(shapes: dict[str, Sequence[int]]) -> int | None:
    """The number of classes of a state's head ({name: shape}), or None if it has no ``head.*``. The
    head's one matrix is its weight, also where it is reparametrised (CARTL's spectral norm keeps it as
    ``head.parametrizations.weight.original``, beside the vectors ``_u`` and ``_v``)."""
    return next((shape[0] for k, shape in shapes.items() if k.startswith("head.") and len(shape) == 2), None)


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """``model.load_state_dict(state, strict=True)``; a state that does not fit raises ValueError in one line."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])  # line 0 is only a heading
        if len(detail) > 300:  # torch lists every key: a whole state's worth for another form of model
            detail = detail[:300] + " ..."
        raise ValueError(f"checkpoint does not fit model {name!r}: {detail}") from None


def model_from_state(name: str, state: dict[str, torch.Tensor]) -> ImageClassifier:
    """Rebuild a trained model from its checkpoint state alone: channels from the stored mean,
    classes from the head (strict load: a state of another architecture raises)."""
    for key in ("normalize.mean", "normalize.std", "head.weight"):
        if key not in state:
            raise ValueError(f"checkpoint state lacks {key}: not a dist_robust model")
    channels, classes = state["normalize.mean"].numel(), state["head.weight"].shape[0]
    model = build_model(name, channels, classes, [0.0] * channels, [1.0] * channels)
    load_state_strict(model, state, name)
    return model

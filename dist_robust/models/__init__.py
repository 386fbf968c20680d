"""Model registry: every model is ``ImageClassifier = head(features(normalize(x)))``.

Inputs are images in [0, 1] pixel space (attacks work there); ``normalize`` carries the per-channel
mean/std as buffers, ``features`` is the backbone ([B, C, H, W] -> [B, D]) and ``head`` is an
``nn.Linear(D, num_classes)``. The split is what fine-tuning needs: the backbone moves from a source
checkpoint to a target task (``load_backbone``) and the head is replaced.

Stages (``stage_names``) are the backbone's top-level children that own parameters, in forward order;
together they hold every backbone parameter exactly once (Adv-SS's ensemble branches the last ones).

Blocks (``block_names``) are what ``model.last_k`` and CARTL's k count. The ResNet family counts as
CARTL does (wutongshenqiu/TransferRobust, src/networks/utils.py: ``WRNBlocks`` and ``Resnet18Block``):
every residual unit is a block, then the final BN-ReLU of a pre-activation net, then the head (their
FC); the stem is never one. The small CNNs keep their stages as blocks, without the head (which still
trains with the last k). Per architecture:

- cnn3:            features.stage1 .. stage3 (3 conv-BN-ReLU stages; the head is not a block)
- resnet_small:    features.stem, features.stage1 .. stage3 (the head is not a block)
- preact_resnet18: features.layer1.0 .. layer4.1 (8 units), features.bn (final BN-ReLU), head: 10
- wrn34_10:        features.block1.layer.0 .. block3.layer.4 (15 units), features.bn1, head: 17, as
                   CARTL's WRN-34-10 (3n + 2)
- resnet50:        features.layer1.0 .. layer4.2 (16 bottlenecks), head: 17 (post-activation: no
                   final BN, as the official post-activation ResNet-18's 8 units + FC = 9)
- timm:ARCH, torchvision:ARCH (models/external.py): the network's stages (resnet18: features.conv1, bn1,
                   layer1 .. layer4; the head is not a block). Parameters held by the network itself rather
                   than by a child (a ViT's class token and position embedding) are in no stage.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .external import external_network, is_external
from .normalize import Normalize
from .resnet import PreActResNet18, resnet50, wrn34_10
from .small import CNN3, ResNetSmall

__all__ = ["MODELS", "ImageClassifier", "Normalize", "block_names", "build_model", "head_classes",
           "head_parameter_names", "load_backbone", "load_state_strict", "model_from_state", "stage_names"]

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


def build_model(name: str, in_channels: int, num_classes: int | None, mean: Sequence[float], std: Sequence[float],
                image_size: int = 32, *, weights: str | None = None, new_head: bool = True,
                **backbone_kwargs) -> ImageClassifier:
    """A freshly initialised model. ``image_size`` is checked only (every backbone ends in global
    average pooling); ``backbone_kwargs`` go to the backbone constructor (e.g. ``width`` for cnn3).

    ``timm:<arch>`` and ``torchvision:<arch>`` (models/external.py) keep their library's initialisation,
    or load ``weights`` (a file of the network's own state_dict); the head is then the weights' own
    (``num_classes`` None: their classes) or, with ``new_head``, a fresh one of ``num_classes``."""
    external = is_external(name)
    if not external and name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))}, timm:ARCH, torchvision:ARCH)")
    if weights is not None and not external:
        raise ValueError(f"weights load into timm:/torchvision: networks; {name} starts from a checkpoint instead")
    if num_classes is None and weights is None:
        raise ValueError(f"{name}: the number of classes is needed (None only with weights: theirs)")
    if in_channels < 1 or (num_classes is not None and num_classes < 1) or image_size < 1:
        raise ValueError(f"in_channels, num_classes and image_size must be >= 1 "
                         f"(got {in_channels}, {num_classes}, {image_size})")
    normalize = Normalize(_per_channel("mean", mean, in_channels), _per_channel("std", std, in_channels))
    if external:
        features, head = external_network(name, in_channels, num_classes, weights, new_head, **backbone_kwargs)
        model = ImageClassifier(normalize, features, head.in_features, head.out_features)
        model.head = head  # the network's own classifier (its weights', or its library's initialisation)
        return model
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


def stage_names(model: ImageClassifier) -> list[str]:
    """The backbone's top-level children with parameters as module names in ``model`` (e.g.
    ``features.stage1``), in forward order. A stage's parameters are those whose names start with
    ``name + "."``; ``model.get_submodule(name)`` gives the stage."""
    return [f"features.{n}" for n, m in model.features.named_children()
            if next(m.parameters(), None) is not None]


def block_names(model: ImageClassifier) -> list[str]:
    """The blocks ``model.last_k`` and CARTL's k count, as module names in ``model``, in forward order
    (see the module docstring). A backbone that lists its ``blocks`` (the ResNet family: residual units,
    then the final BN if any) ends with the head, as CARTL counts; the others' blocks are their stages."""
    units = getattr(model.features, "blocks", None)
    if not isinstance(units, (tuple, list)):  # also a timm network's own `blocks` module
        return stage_names(model)
    return [f"features.{u}" for u in units] + ["head"]


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


def model_from_state(name: str, state: dict[str, torch.Tensor], **backbone_kwargs) -> ImageClassifier:
    """Rebuild a trained model from its checkpoint state: channels from the stored mean, classes from
    the head (strict load: a state of another architecture raises); ``backbone_kwargs`` as it was built
    (a timm ViT's img_size and patch_size: its run's model.network_kwargs())."""
    for key in ("normalize.mean", "normalize.std", "head.weight"):
        if key not in state:
            raise ValueError(f"checkpoint state lacks {key}: not a dist_robust model")
    channels, classes = state["normalize.mean"].numel(), state["head.weight"].shape[0]
    model = build_model(name, channels, classes, [0.0] * channels, [1.0] * channels, **backbone_kwargs)
    load_state_strict(model, state, name)
    return model

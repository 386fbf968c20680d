"""Networks from the ecosystem as ImageClassifiers: ``timm:<arch>`` and ``torchvision:<arch>``.

The network is split at its final Linear classifier: the classifier becomes the model's ``head`` and
the rest its ``features`` (pooled [B, D] features), so fine-tuning, the methods and the checkpoints
treat it as one of ours. timm networks split with timm's own API (``get_classifier``,
``reset_classifier(0)``); a torchvision network at the module that owns its last parameter, which
must be a Linear (resnet ``fc``, vgg/mobilenet/efficientnet ``classifier[-1]``, vit ``heads.head``).
An arch without one (squeezenet's convolutional classifier, deit's two heads) is refused.

Weights come from a local file only, never downloaded: the network's own state_dict (timm or
torchvision key names, its classifier included) as safetensors, or as a torch ``.pth``/``.pt`` read
with ``weights_only=True``, whose unpickler refuses any global but tensors and plain containers, so a
file that would run code is refused before anything in it runs. The state loads strictly into the
network, then the head is split off. One exception, as timm's own loader does: an RGB stem loads into
a timm network built for 1-channel data through ``timm.models.adapt_input_conv`` (the filters summed).

These networks normalise outside themselves: ``model.normalize`` picks the mean/std of the model's
Normalize layer (usually those the weights were trained under: imagenet). Inputs stay in [0, 1].

BN: timm fuses some BN layers with their activation (``BatchNormAct2d``, a BatchNorm2d subclass whose
forward also applies ``drop`` and ``act``). TWINS' wings and sync BN replace a BN layer by a plain one,
which would drop the activation, so each such layer becomes ``Sequential(BatchNorm2d, drop, act)``
once the weights are in: its keys ``NAME.*`` become ``NAME.0.*`` in the model's state (as in every
model built under that name, so checkpoints reload).
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

KINDS = ("timm", "torchvision")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
# model.normalize's named statistics; cifar10's as data/sources.py's (this floor cannot import data)
NAMED_STATS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def split_name(name: str) -> tuple[str, str] | None:
    """('timm', 'resnet18') for 'timm:resnet18'; None for a name of ours."""
    kind, sep, arch = name.partition(":")
    return (kind, arch) if sep and kind in KINDS else None


def is_external(name: str) -> bool:
    return split_name(name) is not None


def is_known(name: str) -> bool:
    """Whether timm or torchvision has the arch (imports the library: only called for such names)."""
    kind, arch = split_name(name) or (None, "")
    if not arch:
        return False
    if kind == "timm":
        import timm
        return timm.is_model(arch)
    import torchvision
    return arch in torchvision.models.list_models(module=torchvision.models)  # classification models only


# ---------------------------------------------------------------------------------------------------
# Normalisation

def _floats(values: Any, what: str) -> list[float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return [float(values)]
    try:
        if isinstance(values, str):  # a string would iterate by characters
            raise TypeError
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number or a list of numbers, got {values!r}") from None
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def normalize_stats(spec: Any, dataset_mean: Optional[Sequence[float]] = None,
                    dataset_std: Optional[Sequence[float]] = None) -> tuple[list[float], list[float]]:
    """(mean, std) of a ``model.normalize`` spec: 'dataset' (the dataset's own), 'imagenet', 'cifar10',
    {mean: [...], std: [...]}, or the command line's 'M1,M2,M3/S1,S2,S3'. Raises ValueError (one line)."""
    if isinstance(spec, str) and spec in NAMED_STATS:
        mean, std = NAMED_STATS[spec]
    elif spec == "dataset":
        if dataset_mean is None or dataset_std is None:
            raise ValueError("'dataset' needs the dataset's mean/std: name a dataset, or use imagenet, cifar10 or "
                             "MEAN/STD")
        mean, std = dataset_mean, dataset_std
    elif isinstance(spec, str) and spec.count("/") == 1:
        mean, std = (part.split(",") for part in spec.split("/"))
    elif isinstance(spec, Mapping) and set(spec) == {"mean", "std"}:
        mean, std = spec["mean"], spec["std"]
    else:
        raise ValueError(f"expected dataset, {', '.join(NAMED_STATS)}, {{mean: [...], std: [...]}} or "
                         f"'M1,M2,M3/S1,S2,S3', got {spec!r}")
    mean, std = _floats(mean, "mean"), _floats(std, "std")
    if len(mean) != len(std):
        raise ValueError(f"mean has {len(mean)} values, std {len(std)}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


# ---------------------------------------------------------------------------------------------------
# Weights files

def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A network's state_dict from a local safetensors or torch (weights_only) file; ValueError (one
    line) for a missing file, another format, or a pickle that needs more than tensors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    if p.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: weights must be {', '.join(WEIGHT_SUFFIXES)}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(p)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a safetensors file ({_one_line(e)})") from None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)  # never the full unpickler: it runs code
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), _one_line(e))
        raise ValueError(f"{path}: refused, its pickle holds more than tensors and may run code ({why}); "
                         "save the state_dict alone, or as safetensors") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a torch weights file ({_one_line(e)})") from None
    # Training checkpoints often wrap the state (timm's train.py: state_dict; torchvision's: model).
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state_dict (a mapping of names to tensors)")
    return state


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], name: str, path: str) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = [f"{len(keys)} {what}, e.g. {', '.join(keys[:3])}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
    if problems:
        raise ValueError(f"{path} does not fit {name}: {'; '.join(problems)}")
    net.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------
# The network and its split

def _network(kind: str, arch: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    if kind == "timm":
        import timm
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    if in_channels != 3:
        raise ValueError(f"torchvision networks take 3-channel images, the data has {in_channels} "
                         "(timm networks adapt their stem to other channel counts)")
    import torchvision
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def _classifier_name(net: nn.Module, kind: str, name: str) -> str:
    """The module name of the final Linear classifier."""
    if kind == "timm":
        clf = net.get_classifier()
    else:  # the module that owns the last parameter: the classifier in every torchvision classification net
        last = list(net.named_parameters())[-1][0]
        clf = net.get_submodule(last.rpartition(".")[0])
    found = [n for n, m in net.named_modules() if m is clf]
    if not isinstance(clf, nn.Linear) or not found:
        raise ValueError(f"{name} has no single final Linear classifier (found {type(clf).__name__}): it cannot "
                         "be split into features and a head")
    return found[0]


def _set_classes(net: nn.Module, kind: str, clf_name: str, classes: int) -> None:
    """A fresh classifier with ``classes`` outputs (the library's own way for timm)."""
    if kind == "timm":
        net.reset_classifier(classes)
    else:
        old = net.get_submodule(clf_name)
        net.set_submodule(clf_name, nn.Linear(old.in_features, classes, bias=old.bias is not None))


def _adapt_stem(net: nn.Module, state: dict[str, torch.Tensor], in_channels: int) -> None:
    """An RGB stem for a timm network built with other ``in_chans``, as timm's load_pretrained does."""
    from timm.models import adapt_input_conv
    first = net.pretrained_cfg.get("first_conv") or ()
    for conv in [first] if isinstance(first, str) else first:
        w = state.get(f"{conv}.weight")
        if w is not None and w.dim() == 4 and w.shape[1] == 3 and in_channels != 3:
            state[f"{conv}.weight"] = adapt_input_conv(in_channels, w)


def _drop_aux(net: nn.Module) -> None:
    """torchvision's inception_v3 and googlenet: no auxiliary classifiers, so the training forward
    returns one tensor (after the weights loaded: theirs include them)."""
    if getattr(net, "aux_logits", False):
        net.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(net, aux):
                setattr(net, aux, None)


def split_norm_act(module: nn.Module, prefix: str = "") -> nn.Module:
    """Each BN layer fused with its activation (timm's BatchNormAct2d) -> Sequential(plain BN, drop, act),
    so that every BN layer is a plain ``nn.BatchNorm2d`` for the BN conversions; another BatchNorm2d
    subclass is refused (they could not convert it faithfully)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and type(child) is not nn.BatchNorm2d:
            if not (isinstance(getattr(child, "act", None), nn.Module) and isinstance(getattr(child, "drop", None), nn.Module)):
                raise ValueError(f"{prefix}{name} is a {type(child).__name__}, a BatchNorm2d subclass that TWINS' "
                                 "wings and sync BN cannot convert")
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            own = {k: v for k, v in child.state_dict().items() if "." not in k}  # not act's (PReLU has weights)
            bn.load_state_dict(own)
            setattr(module, name, nn.Sequential(bn, child.drop, child.act))
        else:
            split_norm_act(child, f"{prefix}{name}.")
    return module


def external_network(name: str, in_channels: int, num_classes: Optional[int], weights: Optional[str] = None,
                     new_head: bool = True, **kwargs) -> tuple[nn.Module, nn.Linear]:
    """(features, head) of ``timm:<arch>`` or ``torchvision:<arch>``: the network without its classifier
    (returning pooled features) and the classifier. With ``weights`` (a file of the network's own
    state_dict) the network loads them strictly; the head is then the weights' one (``num_classes``
    None: their classes; else they must match) or, with ``new_head``, a fresh one of ``num_classes``.
    Without weights: the library's initialisation. ``kwargs`` go to the library's constructor (timm's
    ``img_size``, say). Raises ValueError (one line)."""
    kind, arch = split_name(name) or (None, None)
    if kind is None:
        raise ValueError(f"{name!r} is not timm:<arch> or torchvision:<arch>")
    if num_classes is None and weights is None:
        raise ValueError(f"{name}: without weights the number of classes is needed")
    state = read_weights(weights) if weights else None
    try:
        net = _network(kind, arch, in_channels, num_classes or 1, **kwargs)
    except RuntimeError as e:  # timm and torchvision name an unknown arch so
        raise ValueError(f"{name}: {_one_line(e)}") from None
    except TypeError as e:  # a size argument the network's constructor does not take (model.img_size)
        if not kwargs:
            raise
        raise ValueError(f"{name} takes no {' or '.join(kwargs)} argument ({_one_line(e)})") from None
    clf_name = _classifier_name(net, kind, name)
    if state is not None:
        if kind == "timm":
            _adapt_stem(net, state, in_channels)
        theirs = state.get(f"{clf_name}.weight")
        if theirs is not None and theirs.dim() == 2:
            _set_classes(net, kind, clf_name, theirs.shape[0])
        _load_strict(net, state, name, weights)
        classes = net.get_submodule(clf_name).out_features
        if num_classes is not None and new_head:
            _set_classes(net, kind, clf_name, num_classes)
        elif num_classes is not None and classes != num_classes:
            raise ValueError(f"{weights}: its head has {classes} classes, the data {num_classes} (a new head: "
                             "model.new_head=true)")
    head = net.get_submodule(clf_name)
    if kind == "timm":
        net.reset_classifier(0)  # timm's features API: the forward returns pooled features
    else:
        net.set_submodule(clf_name, nn.Identity())
        _drop_aux(net)
    return split_norm_act(net), head


def fixed_input(name: str, in_channels: int, **kwargs) -> tuple[Optional[int], Optional[int]]:
    """(image side, patch side) of a timm network that takes images of one size only (a ViT: its patch
    grid and position embedding are built for it), else (None, None). The network is built with
    ``kwargs`` (model.img_size, model.patch_size) on the meta device: no memory, no initialisation
    (a ViT-Tiny in 0.1 s, where a real one takes 1.2 s), so a preflight can afford it. Raises
    ValueError (one line) for an argument the network does not take."""
    kind, arch = split_name(name) or (None, None)
    if kind != "timm":
        return None, None
    import timm
    pretrained = timm.models.get_pretrained_cfg(arch)
    fixed = bool(pretrained and pretrained.fixed_input_size)
    if not kwargs and not fixed:
        return None, None
    try:
        with torch.device("meta"):
            net = timm.create_model(arch, pretrained=False, in_chans=in_channels, **kwargs)
    except TypeError as e:
        raise ValueError(f"{name} takes no {' or '.join(kwargs)} argument ({_one_line(e)})") from None
    except Exception:  # noqa: BLE001 - an arch that cannot be built on the meta device: checked when it runs
        return None, None
    from timm.layers import PatchEmbed  # it knows the size it was built for (a ViT's patch_embed, a Mixer's stem)
    embed = next((m for m in net.modules() if isinstance(m, PatchEmbed)), getattr(net, "patch_embed", None))
    size = getattr(embed, "img_size", None)
    if getattr(net, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", True):
        return None, None  # it interpolates its position embedding: any size
    if size is None and fixed:  # a fixed-size network without a PatchEmbed
        size = kwargs.get("img_size") or pretrained.input_size[-1]
    patch = getattr(embed, "patch_size", None) if size is not None else None
    side = lambda v: v[-1] if isinstance(v, (tuple, list)) else v  # timm keeps (h, w)
    return side(size), side(patch)


def load_external(name: str, weights: str, normalize: Any, in_channels: int,
                  dataset_mean: Optional[Sequence[float]] = None, dataset_std: Optional[Sequence[float]] = None):
    """The ImageClassifier of a weights file, with the weights' own head, in eval mode (what ``dist-robust
    eval --model timm:ARCH --weights W`` evaluates); ``normalize`` is a model.normalize spec ('dataset'
    needs the dataset's mean/std). Raises ValueError (one line)."""
    from . import build_model  # the package imports this module
    mean, std = normalize_stats(normalize, dataset_mean, dataset_std)
    return build_model(name, in_channels, None, mean, std, weights=weights, new_head=False).eval()

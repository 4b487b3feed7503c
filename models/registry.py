"""The networks the project trains and compresses: by name, or any importable module.

A network is described by a ``NetworkSpec``: ``arch`` is either
- a short name of this project: ``alexnet`` (torchvision's), ``vgg19`` (the paper authors'
  CIFAR variant, ``models.vgg``), ``resnet20``/``32``/``44``/``56``/``110`` (the CIFAR ResNets
  of ``models.cifar_resnet``, option-B shortcuts);
- any torchvision classification builder (``torchvision.models.list_models(module=
  torchvision.models)``: ``resnet18``, ``resnet50``, ``mobilenet_v2``, ``mobilenet_v3_small``,
  ``efficientnet_b0``, ``vgg16_bn``, ...), built with ``weights=None`` and ``num_classes``
  (torchvision's own ``vgg19`` is ``{"class_path": "torchvision.models.vgg19"}``: the short
  name is the paper's network);
- or a ``{"class_path": "package.module.Class", "init_args": {...}}`` mapping, LightningCLI's
  form: any importable ``nn.Module`` class or builder function, called with ``init_args``
  (plus ``num_classes`` when it takes one and ``init_args`` does not set it).
``small_input`` replaces the stem of the torchvision families that have a down-sampling stem
(``SMALL_INPUT_STEMS``) by one suited to 32x32 images: stride 1, no max-pool; for the vision
transformers (``vit_b_16``, ...), 32x32 images in 4x4 patches (64 tokens and the class token).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Callable, Union

import torch
import torchvision
from torch import nn

from models.cifar_resnet import DEPTHS, CifarResNet
from models.vgg import VGG19

Arch = Union[str, dict[str, Any]]

# AlexNet is torchvision's own, so that torchvision state dicts (and the paper authors' AlexNet
# checkpoint, saved from it) load unchanged.
SHORT_NAMES: dict[str, Callable[[int], nn.Module]] = {
    "alexnet": lambda num_classes: torchvision.models.alexnet(weights=None, num_classes=num_classes),
    "vgg19": lambda num_classes: VGG19(num_classes=num_classes),
    **{f"resnet{d}": (lambda num_classes, d=d: CifarResNet(d, num_classes)) for d in DEPTHS},
}

# Short names of the layers the paper compresses, per architecture, and of the
# convolutions that can be compressed by input channel. conv1 is deliberately absent:
# its inputs are the image's pixels, not neurons (analysing it says so).
LAYER_ALIASES: dict[str, dict[str, str]] = {
    # torchvision layout: features.0 conv1, .3 conv2, .6 conv3, .8 conv4, .10 conv5
    "alexnet": {"first": "classifier.1", "pen": "classifier.4", "last": "classifier.6",
                "conv2": "features.3", "conv3": "features.6", "conv4": "features.8", "conv5": "features.10"},
    # models/vgg.py names its convolutions conv1..conv16
    "vgg19": {"first": "classifier.1", "pen": "classifier.4", "last": "classifier.6",
              **{f"conv{i}": f"conv{i}" for i in range(2, 17)}},
}


@lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    """torchvision's classification builders (the names its ``get_model`` accepts)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def _stride_one(conv: nn.Conv2d) -> None:
    conv.stride = (1, 1)


def _resnet_stem(model: nn.Module) -> None:
    """3x3 stride-1 first convolution, no max-pool (the CIFAR stem of ResNet-18 et al.)."""
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _shufflenet_stem(model: nn.Module) -> None:
    _stride_one(model.conv1[0])
    model.maxpool = nn.Identity()


def _vit_stem(model: nn.Module, size: int = 32, patch: int = 4) -> None:
    """A torchvision ``VisionTransformer`` for ``size`` x ``size`` images in ``patch`` x ``patch``
    patches: a new patch embedding and position embedding (initialised as torchvision does)."""
    hidden = model.hidden_dim
    model.image_size, model.patch_size = size, patch
    model.conv_proj = nn.Conv2d(3, hidden, kernel_size=patch, stride=patch)
    nn.init.trunc_normal_(model.conv_proj.weight, std=(1.0 / (3 * patch * patch)) ** 0.5)
    nn.init.zeros_(model.conv_proj.bias)
    model.seq_length = (size // patch) ** 2 + 1
    model.encoder.pos_embedding = nn.Parameter(torch.empty(1, model.seq_length, hidden).normal_(std=0.02))


# Family prefix -> the change that makes its stem keep 32x32 images large enough.
SMALL_INPUT_STEMS: dict[str, Callable[[nn.Module], None]] = {
    "resnet": _resnet_stem, "resnext": _resnet_stem, "wide_resnet": _resnet_stem,
    "mobilenet_v2": lambda m: _stride_one(m.features[0][0]),
    "mobilenet_v3": lambda m: _stride_one(m.features[0][0]),
    "efficientnet": lambda m: _stride_one(m.features[0][0]),
    "mnasnet": lambda m: _stride_one(m.layers[0]),
    "regnet": lambda m: _stride_one(m.stem[0]),
    "shufflenet": _shufflenet_stem,
    "vit_": _vit_stem,
}


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"class_path {path!r} must be a full import path, e.g. 'mypackage.models.MyNet'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"class_path {path!r} cannot be imported: {err}") from err


def _takes(builder: Callable[..., Any], argument: str) -> bool:
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False
    return argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def arch_label(arch: Arch) -> str:
    """A short readable name: the name itself, or a mapping's class name."""
    return arch if isinstance(arch, str) else str(arch.get("class_path", "?")).rpartition(".")[2]


def build_model(arch: Arch, num_classes: int = 10, small_input: bool = False) -> nn.Module:
    """A freshly initialised network (see the module doc for what ``arch`` may be)."""
    if isinstance(arch, dict):
        unknown = sorted(set(arch) - {"class_path", "init_args"})
        if "class_path" not in arch or unknown:
            raise ValueError(f"a network given as a mapping needs 'class_path' (and optionally 'init_args'); "
                             f"got keys {sorted(arch)}")
        builder = _import(str(arch["class_path"]))
        kwargs = dict(arch.get("init_args") or {})
        if "num_classes" not in kwargs and _takes(builder, "num_classes"):
            kwargs["num_classes"] = num_classes
        if builder.__module__.startswith("torchvision.models") and _takes(builder, "weights"):
            kwargs.setdefault("weights", None)
        model = builder(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"class_path {arch['class_path']!r} built a {type(model).__name__}, not an nn.Module")
        name = str(arch["class_path"]).rpartition(".")[2]
    elif arch in SHORT_NAMES:
        model, name = SHORT_NAMES[arch](num_classes), arch
    elif arch in torchvision_names():
        model, name = torchvision.models.get_model(arch, weights=None, num_classes=num_classes), arch
    else:
        raise ValueError(
            f"unknown arch {arch!r}; valid choices: {', '.join(SHORT_NAMES)}, any torchvision classification "
            f"model ({', '.join(n for n in torchvision_names() if n not in SHORT_NAMES)}), or a "
            "{class_path: package.module.Class, init_args: {...}} mapping"
        )
    if small_input:
        stem = next((f for prefix, f in SMALL_INPUT_STEMS.items() if name.startswith(prefix)), None)
        if stem is None:
            raise ValueError(f"small_input: no small-image stem is defined for {name!r}; it is defined for the "
                             f"torchvision families {', '.join(SMALL_INPUT_STEMS)} (the CIFAR ResNets have one "
                             "already)")
        stem(model)
    return model


def default_input_shape(spec: "NetworkSpec") -> tuple[int, int, int]:
    """The image size a network is used at here when no data says: 64x64 for AlexNet (the
    paper's), 32x32 for the CIFAR networks and small-input stems, the ``image_size`` of a
    network given with one (a ``VisionTransformer``'s), else 224x224."""
    size = spec.arch.get("init_args", {}).get("image_size") if isinstance(spec.arch, dict) else None
    if isinstance(size, int):
        return (3, size, size)
    if spec.arch == "alexnet":
        return (3, 64, 64)
    if spec.small_input or spec.arch == "vgg19" or (isinstance(spec.arch, str) and spec.arch in SHORT_NAMES):
        return (3, 32, 32)
    return (3, 224, 224)


@dataclass(frozen=True)
class NetworkSpec:
    """Everything needed to rebuild a network before its weights are loaded."""

    arch: Arch = "alexnet"
    num_classes: int = 10
    small_input: bool = False

    def build(self) -> nn.Module:
        return build_model(self.arch, self.num_classes, self.small_input)

    @property
    def label(self) -> str:
        return arch_label(self.arch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, info: dict[str, Any]) -> "NetworkSpec":
        """From a mapping with ``arch``, ``num_classes`` and optionally ``small_input``."""
        return cls(info["arch"], int(info["num_classes"]), bool(info.get("small_input", False)))

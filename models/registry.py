"""The networks the project trains and compresses, by name."""
from __future__ import annotations

from typing import Callable

import torchvision
from torch import nn

from models.vgg import VGG19

# AlexNet is torchvision's own, so that torchvision state dicts (and the paper
# authors' AlexNet checkpoint, saved from it) load unchanged.
ARCHS: dict[str, Callable[[int], nn.Module]] = {
    "alexnet": lambda num_classes: torchvision.models.alexnet(weights=None, num_classes=num_classes),
    "vgg19": lambda num_classes: VGG19(num_classes=num_classes),
}

# Short names of the layers the paper compresses, per architecture.
LAYER_ALIASES: dict[str, dict[str, str]] = {
    "alexnet": {"first": "classifier.1", "pen": "classifier.4", "last": "classifier.6"},
    "vgg19": {"first": "classifier.1", "pen": "classifier.4", "last": "classifier.6"},
}


def build_model(arch: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised network; ``arch`` is one of ``ARCHS``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(ARCHS)}")
    return ARCHS[arch](num_classes)

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


def build_model(arch: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised network; ``arch`` is one of ``ARCHS``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(ARCHS)}")
    return ARCHS[arch](num_classes)

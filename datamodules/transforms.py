"""The paper's image transforms, by preset name: (train transform, deterministic eval transform)."""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MEAN = (0.2860,) * 3  # Fashion-MNIST's training images, made 3-channel
FASHION_STD = (0.3530,) * 3

_to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def build_transforms(preset: str) -> tuple[Callable, Callable]:
    """``(train, eval)`` transforms; images in [0, 1] (normalised where the paper did).

    - ``alexnet``: resize 70, random crop 64 (train) / center crop 64 (eval), no normalisation
      (the paper's AlexNet on CIFAR-10).
    - ``vgg``: reflect-pad 4 + random crop 32 + horizontal flip (train), CIFAR normalisation.
    - ``imagenet``: random-resized crop 224 + flip (train) / resize 256 + center crop 224.
    - ``fashion_alexnet``: grayscale made 3-channel, then the ``alexnet`` preset.
    - ``fashion_32``: grayscale made 3-channel and resized to 32x32 (the CIFAR networks' input:
      ResNet-20..110, small-input torchvision models), Fashion-MNIST normalisation; training
      adds a random crop with 4 pixels of zero padding and horizontal flips.
    """
    if preset == "alexnet":
        return (
            v2.Compose([v2.Resize(70), v2.RandomCrop(64), *_to_tensor]),
            v2.Compose([v2.Resize(70), v2.CenterCrop(64), *_to_tensor]),
        )
    if preset == "fashion_alexnet":
        gray3 = v2.Grayscale(num_output_channels=3)
        return (
            v2.Compose([gray3, v2.Resize(70), v2.RandomCrop(64), *_to_tensor]),
            v2.Compose([gray3, v2.Resize(70), v2.CenterCrop(64), *_to_tensor]),
        )
    if preset == "fashion_32":
        gray3, norm = v2.Grayscale(num_output_channels=3), v2.Normalize(FASHION_MEAN, FASHION_STD)
        return (
            v2.Compose([gray3, v2.Resize(32), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *_to_tensor,
                        norm]),
            v2.Compose([gray3, v2.Resize(32), *_to_tensor, norm]),
        )
    if preset == "vgg":
        norm = v2.Normalize(CIFAR_MEAN, CIFAR_STD)
        return (
            v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip(), *_to_tensor, norm]),
            v2.Compose([*_to_tensor, norm]),
        )
    if preset == "imagenet":
        norm = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        return (
            v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), *_to_tensor, norm]),
            v2.Compose([v2.Resize(256), v2.CenterCrop(224), *_to_tensor, norm]),
        )
    raise ValueError(f"unknown transform preset {preset!r}; valid choices: alexnet, vgg, imagenet, fashion_alexnet, fashion_32")

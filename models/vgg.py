"""VGG-19 with batch norm, CIFAR variant (32x32 inputs), in the paper authors' layout.

Parameter names match the authors' checkpoints (a dict whose ``'net'`` holds the state
dict): ``conv1..conv16`` (3x3, no bias), ``batch_norm1..batch_norm16`` and
``classifier.{1,4,6}``, so their state dicts load unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# Output channels of the 16 convolutions; a 2x2 max-pool follows the ones listed in POOL_AFTER.
VGG19_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)
POOL_AFTER = frozenset({2, 4, 8, 12, 16})


class VGG19(nn.Module):
    """Input (B, 3, 32, 32) -> logits (B, num_classes).

    16 x [conv 3x3 (no bias) -> BatchNorm -> ReLU], max-pool after conv 2, 4, 8, 12, 16
    (32 -> 1 pixels), then classifier: Dropout, Linear 512->512, ReLU, Dropout,
    Linear 512->512, ReLU, Linear 512->num_classes.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        in_channels = 3
        for i, out_channels in enumerate(VGG19_CHANNELS, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False))
            setattr(self, f"batch_norm{i}", nn.BatchNorm2d(out_channels))
            in_channels = out_channels
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_channels, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, len(VGG19_CHANNELS) + 1):
            x = self.relu(getattr(self, f"batch_norm{i}")(getattr(self, f"conv{i}")(x)))
            if i in POOL_AFTER:
                x = self.pool(x)
        return self.classifier(torch.flatten(x, 1))

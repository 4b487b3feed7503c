"""The CIFAR ResNets of He et al. (2016, section 4.2): ResNet-20/32/44/56/110 for 32x32 images.

Layout (depth = 6n + 2): a 3x3 convolution to 16 channels with BatchNorm and ReLU, three
stages of n BasicBlocks with 16, 32 and 64 channels (the first block of stages 2 and 3
halves the resolution with stride 2), global average pooling and one Linear layer. This is
the network of Torch-Pruning's ResNet-56 CIFAR-10 benchmark. Module names follow
torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.bn1``, ...,
``layer2.0.downsample.0``, ``fc``), so the same short names and globs work on both.

Where a block changes the number of channels, its shortcut is
- option ``"B"`` (default): a 1x1 convolution with stride 2 and BatchNorm (``downsample``);
- option ``"A"``: the identity, subsampled by 2 and zero-padded with the missing channels
  (no parameters, the original paper's CIFAR choice). It ties channel c of a stage to
  channel c + pad of the next, across stages, which channel removal refuses for the
  stages' residual streams (their blocks' internal widths are unaffected).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch.nn.functional as F
from torch import Tensor, nn

DEPTHS = (20, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::2, ::2]`` with ``pad`` zero channels on either side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)), 3x3 convolutions without bias."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Literal["A", "B"] = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = PadShortcut((planes - in_planes) // 2)
            else:
                self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                                nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """Input (B, 3, 32, 32) -> logits (B, num_classes); ``depth`` in 20, 32, 44, 56, 110.

    Args:
        depth: 6n + 2 layers with weights (n BasicBlocks per stage).
        num_classes: outputs of ``fc``.
        shortcut: ``"B"`` (1x1 convolution and BatchNorm where the shape changes) or ``"A"``
            (subsampled identity, zero-padded channels); see the module doc.
        widths: channels of the three stages.
    """

    def __init__(self, depth: int = 56, num_classes: int = 10, shortcut: Literal["A", "B"] = "B",
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (padded identity) or 'B' (1x1 projection), got {shortcut!r}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for stage, planes in enumerate(widths, start=1):
            layers = []
            for i in range(blocks):
                stride = 2 if stage > 1 and i == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))

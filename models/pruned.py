"""Modules that only appear in compressed networks."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class IndexedLinear(nn.Linear):
    """A Linear layer that reads only some of its inputs: ``y = W x[..., index] + b``.

    Used when the inputs of a layer are not neurons that can be deleted one by one
    (the 9216 flattened conv features of AlexNet's first classifier layer): the
    unused inputs are skipped here and whole conv channels are deleted upstream.
    ``index`` (in_features,) indexes the ``source_features`` inputs that arrive; both
    are buffers, so the module saves and loads like any other.
    """

    def __init__(self, index: Tensor, source_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(len(index), out_features, bias=bias)
        self.register_buffer("index", index.to(torch.long).clone())
        self.register_buffer("source_features", torch.tensor(int(source_features)))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.index_select(-1, self.index))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", indexed"


def is_depthwise(conv: nn.Conv2d) -> bool:
    """One filter per channel (``groups == in_channels == out_channels > 1``): channel c in,
    channel c out, so the convolution acts per channel."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def resized_conv(conv: nn.Conv2d, out_channels: int, in_channels: int | None = None) -> nn.Conv2d:
    """A fresh Conv2d like ``conv`` with other channel counts; a depthwise ``conv`` stays
    depthwise (``groups`` = the new channel count, which ``in_channels`` must equal)."""
    groups = conv.groups
    if is_depthwise(conv):
        in_channels = out_channels if in_channels is None else in_channels
        if in_channels != out_channels:
            raise ValueError(f"a depthwise convolution keeps in = out channels, got {in_channels} and {out_channels}")
        groups = out_channels
    return nn.Conv2d(
        conv.in_channels if in_channels is None else in_channels, out_channels, conv.kernel_size,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=groups,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )

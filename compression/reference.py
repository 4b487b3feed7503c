"""The original network's outputs, as the targets of a layer-by-layer run's later refits.

Compressed one group at a time, a network drifts: every refit reproduces its consumers'
outputs only approximately, and the next group's statistics, taken on the network compressed
so far, would ask its consumers to reproduce the drifted outputs. With ``ReferenceOutputs``
they ask for the original's instead, from the compressed network's inputs,

    C = mean (y_orig - b) x_comp^T,   G = mean x_comp x_comp^T,   s = mean ||y_orig - b||^2,

so each refit also corrects the error made upstream of it (the least-squares reconstruction of
He, Zhang and Sun's channel pruning and of ThiNet, here on the certified group lasso). The
problem stays an ordinary multi-task lasso in (G, C, s): same solvers, certificate and refit.

A consumer's outputs can themselves have lost units (a residual stream's channels are removed
from every producer of the stream, and those producers are later groups' consumers), so the
original output is read at the units the compressed layer still has: ``output_index``.

Not every group can aim at the original. A residual stream's consumers read a tensor their
own outputs flow back into (block k's first convolution feeds the block whose output block
k + 1 reads), and they are refit together from statistics taken before any of them changed:
each would also correct the error the refits before it already removed. On ResNet-56's third
stream (the network compressed layer by layer, the stream at full width) each of its nine
consumers refit to the original alone left validation accuracy within 0.2 point of 91.0 %;
all nine together took it to 88.2 %, and more of them lost more. Such a group is refit to the
current network's outputs instead (at full width exactly the trained weights), while the
channels it removes are still recorded: ``aims_at``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from models.dependency import NeuronGroup


@dataclass
class ReferenceOutputs:
    """``network``: the original (never modified). ``output_index``: module path -> the
    original output units (rows of a Linear, channels of a Conv2d) the compressed network's
    module still has, for every module that lost some; absent: all."""

    network: nn.Module
    output_index: dict[str, Tensor] = field(default_factory=dict)

    def aims_at(self, group: NeuronGroup) -> bool:
        """Whether ``group``'s refit reproduces the original's outputs: not for several consumers
        of a stream tied by an addition (a residual stream; see the module doc), which reproduce
        the current network's."""
        return not (group.coupled and len(group.consumers) > 1)

    def removed(self, group: NeuronGroup, kept: Sequence[int]) -> None:
        """Record that surgery kept only channels ``kept`` (ascending, numbered as before it) of
        ``group``: every producer's output units (``units`` per channel) and every per-channel
        module's entries."""
        keep = torch.as_tensor(list(kept) or [0], dtype=torch.long)  # surgery keeps one channel at least
        rows = (keep[:, None] * group.units + torch.arange(group.units)).reshape(-1)
        for name in (*group.producers, *group.channel_ops):
            module = self.network.get_submodule(name)
            if name in group.producers or isinstance(module, nn.Linear):
                units = rows
            elif isinstance(module, nn.Conv2d):  # a depthwise convolution: one output per channel
                units = keep
            else:  # BatchNorm, PReLU, an attention module: no outputs a consumer is
                continue
            before = self.output_index.get(name)
            self.output_index[name] = units if before is None else before[units]

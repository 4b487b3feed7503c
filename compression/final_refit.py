"""The last refit sweep: after the last cut, every layer downstream of a cut refit once more.

Layer by layer, a layer's weights are refit when its own group is cut, to the network as it
was then. Cuts made after that change its inputs again: on ResNet-56 a block's first
convolution is refit when its residual stream is cut (to the *current* network,
``compression.reference``), before the earlier blocks' internal widths are cut, and the fully
connected layer is refit when the last stream is cut, before nothing else. The sweep gives
each of them the inputs the final network really feeds it:

    W_l = argmin_W  mean || y_orig,l - b_l - W x_l ||^2

for every Conv2d (not grouped: a depthwise convolution keeps its own filter per channel) and
Linear layer l from the first consumer of a cut group on, in forward order, where y_orig,l is
the original network's output of l at the units l still has (``ReferenceOutputs``) and x_l
l's input in the network as swept so far, the layer's bias fixed. Nothing is removed: only
weights change, at the inputs each layer still reads (``grouplasso.debias`` at the layer's
current support). One layer at a time, each from the network the previous refits left: refit
jointly from one set of statistics, a residual stream's consumers would each correct what the
others already corrected (``compression.reference``; ``benchmarks/stream_refit.py``).

The swept network replaces the compressed one only if its validation accuracy is not lower:
the widths were chosen, and the budget checked, on the network before the sweep.

Measured on the second ResNet-56 trained here (Fashion-MNIST, the config's 5,000 statistics
images; README, "A last refit sweep"): at 2.10x fewer multiply-adds test 90.65 -> 91.27 %,
validation +0.10; at 2.59x test 90.18 -> 90.79 %, validation +0.45; 57 layers in 12 minutes.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from compression.reference import ReferenceOutputs
from models.dependency import NetworkAnalysis


def reference_after(original: nn.Module, analysis: NetworkAnalysis, entries: Sequence[dict[str, Any]]) -> ReferenceOutputs:
    """The original network's output units that the compressed network still has, from the
    report's entries (each group's ``kept_indices``, numbered as before its cut), replayed in
    the order the groups were cut."""
    reference = ReferenceOutputs(original)
    for entry in entries:
        reference.removed(analysis.group_of(entry["module"]), entry["kept_indices"])
    return reference


def layers_to_sweep(analysis: NetworkAnalysis, entries: Sequence[dict[str, Any]]) -> list[str]:
    """The layers the sweep refits, in forward order: every layer that reads a tensor of the
    network (``analysis.reads``: Linear and ungrouped Conv2d layers only; a depthwise or grouped
    convolution reads none) from the first consumer of a group that lost channels on. The
    layers before it read exactly what they read in the original network."""
    consumers = {c.name for e in entries if e["width_after"] < e["width_before"]
                 for c in analysis.group_of(e["module"]).consumers}
    order = [layer for layer in analysis.layers if layer in analysis.reads]
    start = next((i for i, layer in enumerate(order) if layer in consumers), len(order))
    return order[start:]

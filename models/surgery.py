"""Physically removing neurons: a compressed layer's zero columns become a smaller network.

Given a Linear layer (``LayerInfo``) and its new weight ``V`` (D, K) whose zero columns
mark unused inputs, ``remove_neurons`` returns a copy of the network where
- the layer keeps only the surviving columns S: weight ``V[:, S]``, same bias;
- a Linear producer keeps only rows S (weight and bias), a BatchNorm after it entries S;
- a Conv2d producer keeps the channels with at least one surviving position (and its
  BatchNorm those entries); if some positions of a kept channel are unused, the layer
  becomes an ``IndexedLinear`` that reads only the surviving ones.
For a Conv2d layer (``info.kind == "conv"``), ``V`` is the flattened weight (D, C_in*kh*kw)
(or the weight's own 4-D shape) and an input channel is removed when its group of kh*kw
columns is zero: the layer keeps input channels S (weight ``V[:, S]``), the producer conv
output channels S, a BatchNorm between them entries S.
Dropout and pooling need no change. The copy computes exactly what the original
computes with ``V`` in place of the layer's weight (``with_weight``).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from grouplasso import active_columns, active_groups
from models.layers import LayerInfo
from models.pruned import IndexedLinear, resized_conv


def with_weight(model: nn.Module, layer: str, V: Tensor) -> nn.Module:
    """A copy of ``model`` whose ``layer`` weight is ``V`` (zero columns kept): the weight's
    shape, or for a Conv2d also the flattened (D, C_in*kh*kw) of the compression problem."""
    out = copy.deepcopy(model)
    weight = out.get_submodule(layer).weight
    with torch.no_grad():
        weight.copy_(_as_weight(V, weight, layer).to(weight.dtype))
    return out


def _as_weight(V: Tensor, weight: Tensor, name: str) -> Tensor:
    """``V`` in the weight's shape; a flattened (D, -1) conv weight is reshaped."""
    if V.shape == weight.shape:
        return V
    if weight.ndim == 4 and V.shape == (weight.shape[0], weight[0].numel()):
        return V.reshape(weight.shape)
    expected = f" or {(weight.shape[0], weight[0].numel())}" if weight.ndim == 4 else ""
    raise ValueError(f"V has shape {tuple(V.shape)} but {name!r} has weight {tuple(weight.shape)}{expected}")


def remove_neurons(model: nn.Module, info: LayerInfo, V: Tensor) -> nn.Module:
    """A smaller copy of ``model`` with the neurons feeding the zero columns of ``V`` removed."""
    out = copy.deepcopy(model)
    layer = out.get_submodule(info.name)
    if info.kind == "conv":
        _remove_input_channels(out, info, layer, _as_weight(V, layer.weight, info.name).to(layer.weight))
        return out
    if V.shape != layer.weight.shape:
        raise ValueError(f"V has shape {tuple(V.shape)} but {info.name!r} has weight {tuple(layer.weight.shape)}")
    keep = active_columns(V).to(layer.weight.device)
    V = V.to(layer.weight)
    if info.producer_kind == "linear":
        _keep_outputs(out, info.producer, keep)
        if info.norm:
            _keep_norm_entries(out, info.norm, keep)
        new = nn.Linear(len(keep), layer.out_features, bias=layer.bias is not None)
    else:
        source = layer.index[keep] if isinstance(layer, IndexedLinear) else keep
        channels = torch.unique(torch.div(source, info.positions, rounding_mode="floor"))
        _keep_outputs(out, info.producer, channels)
        if info.norm:
            _keep_norm_entries(out, info.norm, channels)
        # Re-number the surviving features in the reduced (channel-major) feature map.
        rank = torch.full((int(channels.max()) + 1 if len(channels) else 1,), -1, dtype=torch.long, device=source.device)
        rank[channels] = torch.arange(len(channels), device=source.device)
        index = rank[torch.div(source, info.positions, rounding_mode="floor")] * info.positions + source % info.positions
        n_source = len(channels) * info.positions
        if torch.equal(index, torch.arange(n_source, device=index.device)):
            new = nn.Linear(len(keep), layer.out_features, bias=layer.bias is not None)
        else:
            new = IndexedLinear(index, n_source, layer.out_features, bias=layer.bias is not None)
    new = new.to(layer.weight)
    with torch.no_grad():
        new.weight.copy_(V[:, keep])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    replace_module(out, info.name, new)
    return out


def _remove_input_channels(model: nn.Module, info: LayerInfo, layer: nn.Conv2d, V: Tensor) -> None:
    """Conv layer with weight ``V`` (D, C_in, kh, kw): keep the input channels whose slice is nonzero."""
    keep = active_groups(V.reshape(V.shape[0], -1), V[0, 0].numel()).to(V.device)
    if len(keep) == 0:
        # A Conv2d cannot have 0 input channels; one zero channel keeps the output (the bias) exact.
        keep = torch.zeros(1, dtype=torch.long, device=V.device)
    _keep_outputs(model, info.producer, keep)
    if info.norm:
        _keep_norm_entries(model, info.norm, keep)
    new = resized_conv(layer, layer.out_channels, len(keep)).to(layer.weight)
    with torch.no_grad():
        new.weight.copy_(V[:, keep])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    replace_module(model, info.name, new)


def _keep_outputs(model: nn.Module, name: str, keep: Tensor) -> None:
    """Keep only output units ``keep`` (rows of a Linear, channels of a Conv2d)."""
    old = model.get_submodule(name)
    if isinstance(old, nn.Conv2d):
        new: nn.Module = resized_conv(old, len(keep))
    elif isinstance(old, IndexedLinear):
        new = IndexedLinear(old.index, int(old.source_features), len(keep), bias=old.bias is not None)
    else:
        new = nn.Linear(old.in_features, len(keep), bias=old.bias is not None)
    new = new.to(old.weight)
    with torch.no_grad():
        new.weight.copy_(old.weight[keep])
        if old.bias is not None:
            new.bias.copy_(old.bias[keep])
    replace_module(model, name, new)


def _keep_norm_entries(model: nn.Module, name: str, keep: Tensor) -> None:
    old = model.get_submodule(name)
    new = type(old)(len(keep), eps=old.eps, momentum=old.momentum, affine=old.affine,
                    track_running_stats=old.track_running_stats).to(old.weight if old.affine else old.running_mean)
    new.load_state_dict({k: (v[keep] if v.ndim else v) for k, v in old.state_dict().items()})
    new.train(old.training)  # an eval-mode network stays in eval mode (running statistics, not batch ones)
    replace_module(model, name, new)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at module path ``name`` (e.g. ``classifier.4``)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)

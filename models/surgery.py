"""Physically removing neurons: a group's unused channels leave every module they touch.

A ``NeuronGroup`` (``models.dependency``) lists the producers of some channels, the
per-channel modules in between and the consumers that read them. Given new weights for the
consumers (``weights``: module path -> the layer's problem layout (D, K), or the weight's
own shape), channel c is unused when every consumer's columns for c are zero, and
``remove_neurons`` returns a copy of the network where
- every producer keeps only the used output units (rows and biases of a Linear, filters of a
  Conv2d);
- every per-channel module keeps their entries (a BatchNorm's statistics and affine
  parameters, a depthwise convolution's filters, a PReLU's slopes; an attention module keeps
  the heads' rows of its q, k and v projections and counts fewer heads);
- every consumer keeps the used channels' columns of its new weight: a Conv2d its input
  channels, a Linear its inputs (after flattening, a channel's positions; where some
  positions of a kept channel are unused the layer becomes an ``IndexedLinear`` that reads
  only the others).
Elementwise activations, dropout and pooling need no change. The copy computes exactly what
``with_weights(network, weights)`` computes: the original with the new weights in place,
zero columns included.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from grouplasso import active_columns
from models.attention import HeadAttention
from models.dependency import Consumer, NeuronGroup
from models.pruned import IndexedLinear, is_depthwise, resized_conv


def with_weights(model: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """A copy of ``model`` whose layers named in ``weights`` have those weights (zero columns
    kept): each the weight's shape, or for a Conv2d also the flattened (D, C_in*kh*kw)."""
    out = copy.deepcopy(model)
    for layer, V in weights.items():
        set_weight(out, layer, V)
    return out


def set_weight(model: nn.Module, layer: str, V: Tensor) -> None:
    """Write ``V`` into ``layer``'s weight in place (``as_weight``: its shape, or a Conv2d's
    flattened (D, C_in*kh*kw)), in the weight's dtype."""
    weight = model.get_submodule(layer).weight
    with torch.no_grad():
        weight.copy_(as_weight(V, weight, layer).to(weight.dtype))


def as_weight(V: Tensor, weight: Tensor, name: str) -> Tensor:
    """``V`` in the weight's shape; a flattened (D, -1) conv weight is reshaped."""
    if V.shape == weight.shape:
        return V
    if weight.ndim == 4 and V.shape == (weight.shape[0], weight[0].numel()):
        return V.reshape(weight.shape)
    expected = f" or {(weight.shape[0], weight[0].numel())}" if weight.ndim == 4 else ""
    raise ValueError(f"V has shape {tuple(V.shape)} but {name!r} has weight {tuple(weight.shape)}{expected}")


def used_channels(model: nn.Module, group: NeuronGroup, weights: dict[str, Tensor]) -> Tensor:
    """The channels (ascending) that at least one consumer's new weight reads."""
    used = torch.zeros(group.width, dtype=torch.bool)
    for consumer in group.consumers:
        layer = model.get_submodule(consumer.name)
        V = as_weight(weights[consumer.name], layer.weight, consumer.name).detach().cpu()
        if consumer.kind == "conv":
            used |= V.flatten(2).abs().sum(dim=(0, 2)) > 0
            continue
        features = active_columns(V).cpu()
        source = layer.index.cpu()[features] if isinstance(layer, IndexedLinear) else features
        used[torch.div(source, consumer.positions, rounding_mode="floor")] = True
    return torch.nonzero(used).flatten()


def remove_neurons(model: nn.Module, group: NeuronGroup, weights: dict[str, Tensor]) -> nn.Module:
    """A smaller copy of ``model`` without the channels of ``group`` that no consumer's new
    weight reads (see the module doc). ``weights`` holds a new weight for every consumer."""
    missing = [c.name for c in group.consumers if c.name not in weights]
    if missing:
        raise ValueError(f"remove_neurons needs a weight for every consumer of the group; missing {missing}")
    out = with_weights(model, weights)
    keep = used_channels(model, group, weights)
    if len(keep) == 0:
        # A Conv2d cannot have 0 input channels; one channel whose columns are zero keeps the output exact.
        keep = torch.zeros(1, dtype=torch.long)
    prune_channels(out, group, keep)
    return out


def prune_channels(model: nn.Module, group: NeuronGroup, keep: Tensor) -> None:
    """Keep only channels ``keep`` (ascending) of ``group`` in ``model``, in place: the
    producers' outputs, the per-channel modules' entries, the consumers' inputs (their current
    weights' columns, so set the new weights first)."""
    keep = keep.to(torch.long).cpu()
    # channel c is output units c*units .. (c+1)*units - 1 of every producer (an attention head's rows)
    rows = (keep[:, None] * group.units + torch.arange(group.units)).reshape(-1)
    for name in group.producers:
        _keep_outputs(model, name, rows)
    for name in group.channel_ops:
        if isinstance(model.get_submodule(name), nn.Linear):  # an attention's q and k projections
            _keep_outputs(model, name, rows)
        else:
            _keep_entries(model, name, keep)
    for consumer in group.consumers:
        _keep_inputs(model, consumer, keep)


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
    keep = keep.to(old.weight.device)
    with torch.no_grad():
        new.weight.copy_(old.weight[keep])
        if old.bias is not None:
            new.bias.copy_(old.bias[keep])
    replace_module(model, name, new)


def _keep_entries(model: nn.Module, name: str, keep: Tensor) -> None:
    """Keep entries ``keep`` of a per-channel module: BatchNorm, depthwise Conv2d, PReLU."""
    old = model.get_submodule(name)
    if isinstance(old, nn.Conv2d) and is_depthwise(old):
        _keep_outputs(model, name, keep)  # filter c reads channel c only: the rows are the channels
        return
    if isinstance(old, HeadAttention):  # its projections are pruned as the group's own modules
        old.num_heads = len(keep)
        return
    if isinstance(old, nn.PReLU):
        new: nn.Module = nn.PReLU(len(keep)).to(old.weight)
    elif isinstance(old, nn.modules.batchnorm._BatchNorm):
        new = type(old)(len(keep), eps=old.eps, momentum=old.momentum, affine=old.affine,
                        track_running_stats=old.track_running_stats)
        new = new.to(old.weight if old.affine else old.running_mean)
    else:
        raise TypeError(f"{name!r} is a {type(old).__name__}: no per-channel entries to keep")
    state = old.state_dict()
    new.load_state_dict({k: (v[keep.to(v.device)] if v.ndim else v) for k, v in state.items()})
    new.train(old.training)  # an eval-mode network stays in eval mode (running statistics, not batch ones)
    replace_module(model, name, new)


def _keep_inputs(model: nn.Module, consumer: Consumer, keep: Tensor) -> None:
    """Keep a consumer's inputs of channels ``keep``: a Conv2d's input channels; a Linear's
    features of those channels that its weight reads (an ``IndexedLinear`` where a kept
    channel's positions are not all read)."""
    layer = model.get_submodule(consumer.name)
    weight = layer.weight.detach()
    if consumer.kind == "conv":
        new: nn.Module = resized_conv(layer, layer.out_channels, len(keep)).to(weight)
        with torch.no_grad():
            new.weight.copy_(weight[:, keep.to(weight.device)])
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        replace_module(model, consumer.name, new)
        return
    p = consumer.positions
    features = active_columns(weight).cpu()
    source = layer.index.cpu()[features] if isinstance(layer, IndexedLinear) else features
    channel = torch.div(source, p, rounding_mode="floor")
    rank = torch.full((max(int(keep.max()) + 1, int(channel.max()) + 1 if len(channel) else 0),), -1,
                      dtype=torch.long)
    rank[keep] = torch.arange(len(keep))
    inside = rank[channel] >= 0
    features, source, channel = features[inside], source[inside], channel[inside]
    # The surviving features renumbered in the reduced (channel-major) input.
    index = rank[channel] * p + source % p
    n_source = len(keep) * p
    if torch.equal(index, torch.arange(n_source)):
        new = nn.Linear(len(features), layer.out_features, bias=layer.bias is not None)
    else:
        new = IndexedLinear(index, n_source, layer.out_features, bias=layer.bias is not None)
    new = new.to(weight)
    with torch.no_grad():
        new.weight.copy_(weight[:, features.to(weight.device)])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    replace_module(model, consumer.name, new)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at module path ``name`` (e.g. ``classifier.4``)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)

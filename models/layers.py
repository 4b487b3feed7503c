"""Which Linear layers can be compressed, and which neurons feed them.

A Linear layer's input features are removable neurons when they are ReLU outputs
(possibly passed through dropout, pooling and flattening, which act per channel).
``analyse_layer`` traces the network with torch.fx and walks back from the layer to
the ReLU and on to the *producer*: the Linear (one feature per neuron) or Conv2d
(``positions`` features per channel, channel-major as ``torch.flatten`` orders them),
with the BatchNorm in between if there is one.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from models.pruned import IndexedLinear
from models.registry import LAYER_ALIASES

# Operations between a ReLU and the layer that keep each feature tied to one channel.
_PER_CHANNEL_MODULES = (nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity)
_PER_CHANNEL_FUNCTIONS = (torch.flatten, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d)
_PER_CHANNEL_METHODS = ("flatten", "view", "reshape", "contiguous")
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)


class LayerError(ValueError):
    """A layer name that does not exist, is not Linear, or cannot be compressed."""


@dataclass(frozen=True)
class LayerInfo:
    """The layer to compress and the neurons that produce its inputs.

    ``name``: module path of the Linear layer (D outputs, K inputs).
    ``producer``: module path of the Linear/Conv2d whose output neurons (rows /
    channels), after ``norm`` (a BatchNorm or None) and a ReLU, are the K inputs.
    ``positions``: input features per producer neuron (1 for Linear; H*W for Conv2d).
    """

    name: str
    producer: str
    producer_kind: str  # "linear" | "conv"
    norm: Optional[str]
    positions: int


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def resolve_layer_name(model: nn.Module, name: str, arch: Optional[str] = None) -> str:
    """Module path for a short name (``first``/``pen``/``last``) or a module path; errors list the valid names."""
    aliases = LAYER_ALIASES.get(arch or "", {})
    path = aliases.get(name, name)
    linears = linear_layer_names(model)
    if path not in linears:
        named = ", ".join(f"{alias} = {target}" for alias, target in aliases.items())
        kind = "is not a Linear layer" if path in dict(model.named_modules()) else "does not exist in this network"
        raise LayerError(
            f"layer {name!r} {kind}. Linear layers: {', '.join(linears)}" + (f"; short names: {named}" if named else "")
        )
    return path


def analyse_layer(model: nn.Module, name: str) -> LayerInfo:
    """Trace ``model`` and find the producer of layer ``name``'s inputs (see module doc).

    Raises ``LayerError`` naming the reason when the inputs are not ReLU outputs
    (their neurons cannot be removed) or the graph is not one we can cut.
    """
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        raise LayerError(f"layer {name!r} is called {len(calls)} times in the forward pass; only once is supported")
    node = calls[0].args[0]
    while not _is_relu(node, modules):
        if not _is_per_channel(node, modules):
            raise LayerError(
                f"the inputs of {name!r} come from {_describe(node, modules)}, not from a ReLU: they are not "
                "neurons that can be removed. Compress a layer whose inputs are ReLU activations "
                f"(Linear layers: {', '.join(linear_layer_names(model))})"
            )
        node = node.args[0]
    node = node.args[0]
    norm = None
    if node.op == "call_module" and isinstance(modules[node.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
        if len(node.users) != 1:
            raise LayerError(f"the output of {node.target!r} is used in several places; its channels cannot be removed")
        norm = node.target
        node = node.args[0]
    producer = modules.get(node.target) if node.op == "call_module" else None
    if not isinstance(producer, (nn.Linear, nn.Conv2d)):
        raise LayerError(
            f"the ReLU before {name!r} follows {_describe(node, modules)}; neurons can be removed only when a "
            "Linear or Conv2d layer (optionally followed by BatchNorm) produces them"
        )
    if len(node.users) != 1:
        raise LayerError(f"the output of {node.target!r} is used in several places; its neurons cannot be removed")
    layer = modules[name]
    # An IndexedLinear (an already compressed first layer) reads a subset of the flattened features.
    arriving = int(layer.source_features) if isinstance(layer, IndexedLinear) else layer.in_features
    if isinstance(producer, nn.Linear):
        if producer.out_features != arriving:
            raise LayerError(f"{node.target!r} has {producer.out_features} outputs but {name!r} reads {arriving}")
        return LayerInfo(name, node.target, "linear", norm, 1)
    if arriving % producer.out_channels:
        raise LayerError(f"{name!r} reads {arriving} features, not a multiple of {node.target!r}'s channels")
    return LayerInfo(name, node.target, "conv", norm, arriving // producer.out_channels)


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps the project's own layers (IndexedLinear) as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, IndexedLinear) or super().is_leaf_module(m, qualname)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return (
        (node.op == "call_module" and isinstance(modules[node.target], nn.ReLU))
        or (node.op == "call_function" and node.target in _RELU_FUNCTIONS)
        or (node.op == "call_method" and node.target in ("relu", "relu_"))
    )


def _is_per_channel(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return (
        (node.op == "call_module" and isinstance(modules[node.target], _PER_CHANNEL_MODULES))
        or (node.op == "call_function" and node.target in _PER_CHANNEL_FUNCTIONS)
        or (node.op == "call_method" and node.target in _PER_CHANNEL_METHODS)
    )


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target!r} (a {type(modules[node.target]).__name__})"
    if node.op == "placeholder":
        return "the network's input"
    if node.op == "call_function" and node.target is operator.add:
        return "an addition (a residual connection)"
    return f"{getattr(node.target, '__name__', node.target)!s} ({node.op})"

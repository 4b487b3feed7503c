"""Which Linear and Conv2d layers can be compressed, and which neurons feed them.

A layer's inputs are removable neurons when they are ReLU outputs (possibly passed
through dropout, pooling and, before a Linear layer, flattening: operations that act
per channel). ``analyse_layer`` traces the network with torch.fx and walks back from
the layer to the ReLU and on to the *producer*: the Linear (one feature per neuron)
or Conv2d (``positions`` features per channel, channel-major as ``torch.flatten``
orders them), with the BatchNorm in between if there is one.

A Conv2d layer (weight (D, C_in, kh, kw)) is compressed by input channel: its
problem's V is the flattened weight (D, C_in * kh * kw), channel-major as
``torch.nn.functional.unfold`` orders patches, and channel c is the group of columns
c*g .. (c+1)*g - 1 with g = kh * kw. Its producer must be a Conv2d.
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

# Operations between a ReLU and a Conv2d layer that keep each input channel tied to one channel.
_CHANNEL_MODULES = (nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                    nn.AdaptiveMaxPool2d, nn.Identity)
_CHANNEL_FUNCTIONS = (F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                      F.adaptive_max_pool2d)
_CHANNEL_METHODS = ("contiguous",)
# Before a Linear layer flattening is allowed too: each feature stays tied to one channel.
_PER_CHANNEL_MODULES = _CHANNEL_MODULES + (nn.Flatten,)
_PER_CHANNEL_FUNCTIONS = _CHANNEL_FUNCTIONS + (torch.flatten,)
_PER_CHANNEL_METHODS = _CHANNEL_METHODS + ("flatten", "view", "reshape")
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)


class LayerError(ValueError):
    """A layer name that does not exist, is not Linear/Conv2d, or cannot be compressed.

    ``reason`` is a short form of the message (used when listing refused layers)."""

    def __init__(self, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class LayerInfo:
    """The layer to compress and the neurons that produce its inputs.

    ``name``: module path of the layer: a Linear (D outputs, K inputs) or a Conv2d
    (D output channels, C_in input channels, kh x kw kernel; K = C_in * kh * kw).
    ``producer``: module path of the Linear/Conv2d whose output neurons (rows /
    channels), after ``norm`` (a BatchNorm or None) and a ReLU, are the inputs.
    ``producer_kind``: "linear" | "conv", the producer's type.
    ``positions``: input features per producer neuron (1 for Linear; H*W for Conv2d
    feeding a Linear layer; 1 for Conv2d feeding a Conv2d layer: one channel each).
    ``kind``: "linear" | "conv", the layer's own type.
    ``group``: consecutive columns of the layer's problem V (D, K) that form one
    removable group: kh*kw for a conv layer (one group per input channel); for a
    Linear layer fed by a Conv2d, ``positions`` (one group per channel) unless the
    layer is an ``IndexedLinear`` (already compressed: its columns are not whole
    channels, so 1); 1 for a Linear layer fed by a Linear.
    """

    name: str
    producer: str
    producer_kind: str  # "linear" | "conv"
    norm: Optional[str]
    positions: int
    kind: str = "linear"  # "linear" | "conv"
    group: int = 1


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def conv_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resolve_layer_name(model: nn.Module, name: str, arch: Optional[str] = None) -> str:
    """Module path for a short name (``first``/``pen``/``last``/``conv2``...) or a module path.

    Linear layers are accepted as they are (``analyse_layer`` checks them); a Conv2d
    layer is analysed here, and refused with the reason when it cannot be compressed.
    Errors list the compressible Conv2d layers, the Linear layers and the short names.
    """
    aliases = LAYER_ALIASES.get(arch or "", {})
    path = aliases.get(name, name)
    module = dict(model.named_modules()).get(path)
    if isinstance(module, nn.Linear):
        return path
    if isinstance(module, nn.Conv2d):
        try:
            analyse_layer(model, path)
        except LayerError as err:
            raise LayerError(
                f"layer {name!r} is not a Linear layer, and the Conv2d {path!r} cannot be compressed: {err}",
                reason=err.reason,
            ) from err
        return path
    kind = "is not a Linear or Conv2d layer" if module is not None else "does not exist in this network"
    raise LayerError(f"layer {name!r} {kind}. {_valid_names(model, aliases)}")


def _valid_names(model: nn.Module, aliases: dict[str, str]) -> str:
    """'Conv2d layers: ...; Linear layers: ...; short names: ...' for error messages."""
    parts = []
    convs = conv_layer_names(model)
    if convs:
        refused = _refused_convs(model, convs)
        text = "Conv2d layers: " + (", ".join(c for c in convs if c not in refused) or "none")
        if refused:
            text += " (not compressible: " + ", ".join(f"{c}, {why}" for c, why in refused.items()) + ")"
        parts.append(text)
    parts.append(f"Linear layers: {', '.join(linear_layer_names(model))}")
    if aliases:
        parts.append("short names: " + ", ".join(f"{alias} = {target}" for alias, target in aliases.items()))
    return "; ".join(parts)


def _refused_convs(model: nn.Module, convs: list[str]) -> dict[str, str]:
    """The Conv2d layers that cannot be compressed, with the short reason."""
    try:
        graph = trace(model)
    except (fx.proxy.TraceError, TypeError, RuntimeError):  # untraceable: analyse_layer reports fx's error
        return {}
    modules = dict(model.named_modules())
    refused = {}
    for conv in convs:
        try:
            _analyse(graph, modules, conv)
        except LayerError as err:
            refused[conv] = err.reason
    return refused


def analyse_layer(model: nn.Module, name: str) -> LayerInfo:
    """Trace ``model`` and find the producer of layer ``name``'s inputs (see module doc).

    Raises ``LayerError`` naming the reason when the inputs are not ReLU outputs
    (their neurons cannot be removed) or the graph is not one we can cut.
    """
    layer = dict(model.named_modules()).get(name)
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        kind = "is not a Linear or Conv2d layer" if layer is not None else "does not exist in this network"
        raise LayerError(f"layer {name!r} {kind}. {_valid_names(model, {})}")
    return _analyse(trace(model), dict(model.named_modules()), name)


def _analyse(graph: fx.Graph, modules: dict[str, nn.Module], name: str) -> LayerInfo:
    layer = modules[name]
    conv = isinstance(layer, nn.Conv2d)
    if conv:
        _check_conv(layer, name, "layer")
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        raise LayerError(f"layer {name!r} is called {len(calls)} times in the forward pass; only once is supported",
                         reason="called several times")
    node = calls[0].args[0]
    passes = _is_channel_op if conv else _is_per_channel
    while not _is_relu(node, modules):
        if not passes(node, modules):
            what = "input channels" if conv else "inputs"
            hint = "a convolution whose input channels are ReLU outputs of another convolution, or " if conv else ""
            raise LayerError(
                f"the {what} of {name!r} come from {_describe(node, modules)}, not from a ReLU: they are not "
                f"neurons that can be removed. Compress {hint}a layer whose inputs are ReLU activations "
                f"(Linear layers: {', '.join(linear_layer_names(modules['']))})",
                reason=f"its inputs come from {_describe(node, modules)}, not from a ReLU",
            )
        _check_single_use(node)
        node = node.args[0]
    _check_single_use(node)
    node = node.args[0]
    norm = None
    if node.op == "call_module" and isinstance(modules[node.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
        _check_single_use(node)
        norm = node.target
        node = node.args[0]
    producer = modules.get(node.target) if node.op == "call_module" else None
    allowed = (nn.Conv2d,) if conv else (nn.Linear, nn.Conv2d)
    if not isinstance(producer, allowed):
        kinds = "a Conv2d layer" if conv else "a Linear or Conv2d layer"
        raise LayerError(
            f"the ReLU before {name!r} follows {_describe(node, modules)}; neurons can be removed only when "
            f"{kinds} (optionally followed by BatchNorm) produces them",
            reason=f"its ReLU follows {_describe(node, modules)}",
        )
    _check_single_use(node)
    if isinstance(producer, nn.Conv2d):
        _check_conv(producer, node.target, "producer")
    if norm is not None and modules[norm].num_features != _outputs(producer):
        raise LayerError(f"{norm!r} has {modules[norm].num_features} entries but {node.target!r} "
                         f"{_outputs(producer)} outputs", reason="its BatchNorm does not match its producer")
    if conv:
        if producer.out_channels != layer.in_channels:
            raise LayerError(f"{node.target!r} has {producer.out_channels} channels but {name!r} reads "
                             f"{layer.in_channels}", reason="its producer's channels do not match")
        return LayerInfo(name, node.target, "conv", norm, 1, kind="conv",
                         group=layer.kernel_size[0] * layer.kernel_size[1])
    # An IndexedLinear (an already compressed first layer) reads a subset of the flattened features.
    indexed = isinstance(layer, IndexedLinear)
    arriving = int(layer.source_features) if indexed else layer.in_features
    if isinstance(producer, nn.Linear):
        if producer.out_features != arriving:
            raise LayerError(f"{node.target!r} has {producer.out_features} outputs but {name!r} reads {arriving}",
                             reason="its producer's outputs do not match")
        return LayerInfo(name, node.target, "linear", norm, 1)
    if arriving % producer.out_channels:
        raise LayerError(f"{name!r} reads {arriving} features, not a multiple of {node.target!r}'s channels",
                         reason="its inputs are not whole channels")
    positions = arriving // producer.out_channels
    return LayerInfo(name, node.target, "conv", norm, positions, group=1 if indexed else positions)


def _check_conv(conv: nn.Conv2d, name: str, role: str) -> None:
    """Refuse the convolutions whose channels cannot be removed one by one."""
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        raise LayerError(
            f"{role} {name!r} is a {kind} convolution (groups={conv.groups}): removing its channels is not "
            "supported (only groups=1)",
            reason=f"{kind} convolution (groups={conv.groups}) not supported",
        )
    if conv.padding_mode != "zeros":
        raise LayerError(
            f"{role} {name!r} pads with {conv.padding_mode!r}: only padding_mode='zeros' is supported (the "
            "layer's statistics unfold zero-padded patches)",
            reason=f"padding_mode {conv.padding_mode!r} not supported",
        )


def _check_single_use(node: fx.Node) -> None:
    if len(node.users) != 1:
        raise LayerError(f"the output of {_name(node)} is used in several places; its neurons cannot be removed",
                         reason=f"the output of {_name(node)} is used in several places")


def _outputs(producer: nn.Module) -> int:
    return producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features


def _name(node: fx.Node) -> str:
    return repr(node.target) if node.op == "call_module" else repr(node.name)


def layer_width(model: nn.Module, info: LayerInfo) -> int:
    """The width a target counts for the layer ``info`` describes (``analyse_layer``): its input
    neurons (a Linear layer fed by a Linear), or channels (a convolution, or a Linear layer
    reading convolution channels)."""
    return model.get_submodule(info.name).weight[0].numel() // info.group


def trace(model: nn.Module) -> fx.Graph:
    """The torch.fx graph of ``model``, the project's own layers (IndexedLinear) kept whole."""
    return _Tracer().trace(model)


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
    """Between a ReLU and a Linear layer: per-channel ops and flattening."""
    return (
        (node.op == "call_module" and isinstance(modules[node.target], _PER_CHANNEL_MODULES))
        or (node.op == "call_function" and node.target in _PER_CHANNEL_FUNCTIONS)
        or (node.op == "call_method" and node.target in _PER_CHANNEL_METHODS)
    )


def _is_channel_op(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Between a ReLU and a Conv2d layer: ops that keep the (N, C, H, W) channels as they are."""
    return (
        (node.op == "call_module" and isinstance(modules[node.target], _CHANNEL_MODULES))
        or (node.op == "call_function" and node.target in _CHANNEL_FUNCTIONS)
        or (node.op == "call_method" and node.target in _CHANNEL_METHODS)
    )


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target!r} (a {type(modules[node.target]).__name__})"
    if node.op == "placeholder":
        return "the network's input (e.g. an image's pixels)"
    if node.op == "call_function" and node.target is operator.add:
        return "an addition (a residual connection)"
    return f"{getattr(node.target, '__name__', node.target)!s} ({node.op})"

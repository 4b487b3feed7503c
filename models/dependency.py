"""Neurons of any network: which channels can be removed, and everything that changes with them.

One torch.fx trace of the network is read once, front to back, following the *channel axis*
of every tensor (a Linear's output features, a Conv2d's output channels). Tensors whose
channel c is tied to channel c of another tensor share one ``NeuronGroup``:

- a **producer** (a Linear, or a Conv2d with ``groups=1``) starts a group of ``width``
  channels: its output row / filter c makes channel c;
- **per-channel operations** keep channel c tied to channel c: any elementwise activation
  (ReLU, ReLU6, LeakyReLU, GELU, SiLU, Hardswish, Sigmoid, Tanh, ...; module, function or
  method), dropout, pooling, flattening (a channel becomes its positions, channel-major),
  identity and stochastic depth, and the ones with an entry per channel, which lose entry c
  with it (``channel_ops``): BatchNorm, PReLU, and **depthwise convolutions** (groups ==
  channels: filter c reads only channel c);
- an **addition** (a residual connection) or a **product** of two tracked tensors (the
  squeeze-excitation scale, a gated unit) ties its operands: their groups become one, with
  several producers (``coupled_by`` names the nodes that tied them);
- **attention heads** (``models.attention.HeadAttention``, which ``nn.MultiheadAttention``
  and the qkv/proj layout of timm's ``Attention`` become on loading) are a group of their own: head h is ``head_dim`` rows of the q, k and v
  projections and as many columns of ``out_proj``, its consumer; the softmax is per head, so
  nothing else sees it. Its q, k and v projections consume the attention's inputs;
- a **consumer** (a Linear or a ``groups=1`` Conv2d) reads the group: its weight columns
  for channel c (``Consumer.group`` consecutive columns: kh*kw for a convolution, the
  channel's positions for a Linear after flattening) are what the lasso solves for.

Removing channel c is exact when every consumer's columns for c are zero: the producers'
rows, the per-channel entries and the consumers' columns all go, and nothing else in the
network sees channel c. That is why any elementwise activation works (nothing here needs a
ReLU; the paper's width bounds do). A group cannot be compressed (``NeuronGroup.reason``)
when its channels reach an operation that mixes or reshapes them (LayerNorm, GroupNorm,
softmax, a concatenation, a slice, an unknown module), the network's input or output, a
grouped convolution, or a module called more than once; the reason is one line naming the
operation and why. ``analyse_network`` returns every group; ``models.layers`` names layers.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from models.attention import HeadAttention, SelfAttention
from models.pruned import IndexedLinear, is_depthwise


class LayerError(ValueError):
    """A layer name that does not exist, is not Linear/Conv2d, or cannot be compressed.

    ``reason`` is a short form of the message (used when listing refused layers)."""

    def __init__(self, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class Consumer:
    """A layer reading a group's channels.

    ``name``: module path of a Linear (D outputs) or Conv2d (D output channels). ``kind``:
    ``"linear"`` | ``"conv"``. ``group``: consecutive columns of the layer's problem V (D, K)
    per channel: kh*kw for a convolution (V is its weight flattened channel-major, as
    ``F.unfold`` orders patches); for a Linear reading flattened convolution channels, the
    channel's ``positions``, except for an ``IndexedLinear`` (an already compressed layer,
    whose columns are not whole channels: 1); 1 for a Linear reading a Linear's features.
    ``positions``: input features per channel (1 for a convolution and for Linear features).
    """

    name: str
    kind: str
    group: int
    positions: int = 1


@dataclass(frozen=True)
class NeuronGroup:
    """One set of removable neurons (channels) and every module that changes with them.

    ``producers``: module paths of the Linear/Conv2d layers whose output units make the
    channels (one for a plain chain, every input of a residual addition for coupled ones).
    ``channel_ops``: per-channel modules with an entry per channel in between (BatchNorm,
    depthwise Conv2d, PReLU), in network order. ``consumers``: the layers reading the
    channels, in network order. ``width``: the number of channels. ``coupled_by``: the fx
    nodes (additions, products) that tied several producers together. ``reason``: why the
    channels cannot be removed, or None. ``units``: output units of every producer (and rows
    of every Linear among ``channel_ops``) per channel: 1, or ``head_dim`` for the heads of a
    ``HeadAttention`` (producer ``v_proj``; ``q_proj``, ``k_proj`` and the attention module
    itself, whose ``num_heads`` goes down, in ``channel_ops``; consumer ``out_proj``).
    """

    producers: tuple[str, ...]
    channel_ops: tuple[str, ...]
    consumers: tuple[Consumer, ...]
    width: int
    coupled_by: tuple[str, ...] = ()
    reason: Optional[str] = None
    units: int = 1

    @property
    def name(self) -> str:
        """The first consumer's module path: how a group is named by default."""
        return self.consumers[0].name if self.consumers else (self.producers[0] if self.producers else "?")

    @property
    def compressible(self) -> bool:
        return self.reason is None

    @property
    def coupled(self) -> bool:
        """Whether several producers make the same channels (a residual addition, a product)."""
        return len(self.producers) > 1

    def consumer(self, name: str) -> Consumer:
        return next(c for c in self.consumers if c.name == name)

    @property
    def modules(self) -> tuple[str, ...]:
        """Every module that changes when a channel goes."""
        return tuple(dict.fromkeys((*self.producers, *self.channel_ops, *(c.name for c in self.consumers))))

    def describe(self) -> dict[str, Any]:
        """What the report records of the group."""
        return {"producers": list(self.producers), "channel_ops": list(self.channel_ops),
                "consumers": [c.name for c in self.consumers], "width": self.width,
                "coupled_by": list(self.coupled_by)}


# Elementwise activations and operations that act on each channel separately, without
# parameters per channel: between a producer and a consumer they need no change.
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)
PER_CHANNEL_MODULES = ELEMENTWISE_MODULES + (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh,
    torch.clamp, torch.clip, torch.abs, operator.neg,
}
PER_CHANNEL_FUNCTIONS = ELEMENTWISE_FUNCTIONS | {
    F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}
PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "abs",
                       "neg", "contiguous", "clone", "float", "to", "type_as"}
FLATTEN_METHODS = {"flatten", "view", "reshape"}
REDUCTIONS = {"mean", "sum", "amax", "amin"}
# Operations that tie their tracked operands channel by channel (broadcasting allowed).
TYING = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub,
         operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}
TYING_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
# Values that are never tensors with channels: reading them does not affect removal.
SHAPE_METHODS = {"size", "dim", "numel"}
SHAPE_FUNCTIONS = {getattr, len}
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _stochastic_depth() -> set[Any]:
    """torchvision's stochastic depth (the identity in eval mode), when torchvision is there."""
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover
        return set()
    return {stochastic_depth}


PER_CHANNEL_FUNCTIONS |= _stochastic_depth()


class Tracer(fx.Tracer):
    """torch.fx tracer that keeps the project's own layers (``IndexedLinear``, ``HeadAttention``)
    as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (IndexedLinear, HeadAttention)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """The torch.fx graph of ``model`` in eval mode (stochastic depth and dropout as at test time)."""
    was_training = model.training
    model.eval()
    try:
        return Tracer().trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError, ... on dynamic control flow
        raise LayerError(
            f"the network cannot be traced by torch.fx ({type(err).__name__}: {err}); layer analysis needs a forward "
            "pass without data-dependent Python control flow",
            reason="the network cannot be traced by torch.fx",
        ) from err
    finally:
        model.train(was_training)


@dataclass(eq=False)  # identity: a group is a node of the union-find forest
class _Group:
    """A group being built (union-find node)."""

    width: Optional[int]
    producers: list[str] = field(default_factory=list)
    channel_ops: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    coupled_by: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    units: int = 1
    parent: Optional["_Group"] = None

    def root(self) -> "_Group":
        group = self
        while group.parent is not None:
            group = group.parent
        return group

    def block(self, reason: str) -> None:
        root = self.root()
        if reason not in root.reasons:
            root.reasons.append(reason)


@dataclass(frozen=True, eq=False)
class _Tensor:
    """The channel axis of a traced value: its group, and whether it is laid out as maps
    (channels on dim 1) or as features (channels on the last dim)."""

    group: _Group
    layout: str  # "maps" | "features"


@dataclass
class NetworkAnalysis:
    """Every ``NeuronGroup`` of a network and which group each Linear/Conv2d layer reads.

    ``layers``: the Linear and Conv2d module paths in forward order. ``reads[layer]``: the
    group the layer consumes (its input neurons). ``refused[layer]``: why a layer's input is not
    a group at all (it is never called, or is called several times)."""

    groups: list[NeuronGroup]
    reads: dict[str, NeuronGroup]
    layers: list[str]
    refused: dict[str, str]

    def group_of(self, layer: str) -> NeuronGroup:
        """The group layer ``layer`` reads; ``LayerError`` with the reason when it cannot be compressed."""
        if layer in self.refused:
            raise LayerError(f"{layer!r} cannot be compressed: {self.refused[layer]}", reason=self.refused[layer])
        group = self.reads.get(layer)
        if group is None:
            raise LayerError(f"{layer!r} is not a Linear or Conv2d layer of this network")
        if group.reason is not None:
            reason = group.reason
            if group.coupled:
                reason += f"; they are coupled with {', '.join(group.producers)}"
            raise LayerError(f"the inputs of {layer!r} cannot be removed: {reason}", reason=reason)
        return group


def analyse_network(model: nn.Module) -> NetworkAnalysis:
    """Trace ``model`` and describe every group of channels (see the module doc)."""
    return _Analysis(model, trace(model)).run()


class _Analysis:
    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model, self.graph = model, graph
        self.modules = dict(model.named_modules())
        self.values: dict[fx.Node, Optional[_Tensor]] = {}
        self.read: dict[str, _Group] = {}
        self.refused: dict[str, str] = {}
        self.order: list[str] = []
        self.depthwise: dict[str, int] = {}
        self.pairs: dict[fx.Node, tuple[Optional[_Tensor], ...]] = {}  # (output, weights) of an attention call
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        self.calls = calls

    # --- helpers --------------------------------------------------------------------------
    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target!r} (a {type(self.modules[node.target]).__name__})"
        if node.op == "placeholder":
            return "the network's input"
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name!r} ({node.name})"

    def _tracked(self, args: Any) -> list[tuple[fx.Node, _Tensor]]:
        found: list[tuple[fx.Node, _Tensor]] = []
        fx.node.map_arg(args, lambda n: found.append((n, self.values[n])) if self.values.get(n) is not None else None)
        return found

    def _opaque(self, node: fx.Node, why: str, out_reason: str) -> _Tensor:
        """``node`` mixes its tracked inputs' channels: block them; its output is a new group
        that cannot be compressed either."""
        for _, value in self._tracked((node.args, node.kwargs)):
            value.group.block(why)
        group = _Group(width=None)
        group.block(out_reason)
        return _Tensor(group, "maps")

    def _new_group(self, width: int, producer: str, layout: str) -> _Tensor:
        group = _Group(width=width, producers=[producer])
        return _Tensor(group, layout)

    def _union(self, values: Sequence[_Tensor], node: fx.Node) -> _Tensor:
        roots = list(dict.fromkeys(v.group.root() for v in values))
        first = roots[0]
        widths = {r.width for r in roots if r.width is not None}
        for other in roots[1:]:
            other.parent = first
            first.producers += [p for p in other.producers if p not in first.producers]
            first.channel_ops += [p for p in other.channel_ops if p not in first.channel_ops]
            first.consumers += other.consumers
            first.coupled_by += other.coupled_by
            first.reasons += [r for r in other.reasons if r not in first.reasons]
            first.width = first.width if first.width is not None else other.width
        if len(roots) > 1:
            first.coupled_by.append(node.name)
        if len(widths) > 1:
            first.block(f"{node.name!r} combines tensors of {' and '.join(map(str, sorted(widths)))} channels")
        layouts = {v.layout for v in values}
        return _Tensor(first, values[0].layout if len(layouts) == 1 else "maps")

    # --- the walk ---------------------------------------------------------------------------
    def run(self) -> NetworkAnalysis:
        for node in self.graph.nodes:
            self.values[node] = self._visit(node)
        groups: dict[int, NeuronGroup] = {}
        position = {name: i for i, name in enumerate(dict.fromkeys(
            n.target for n in self.graph.nodes if n.op == "call_module"))}

        def ordered(names: list[str]) -> tuple[str, ...]:
            return tuple(sorted(dict.fromkeys(names), key=lambda n: position.get(n, len(position))))

        def freeze(group: _Group) -> NeuronGroup:
            root = group.root()
            if id(root) not in groups:
                reason = root.reasons[0] if root.reasons else None
                if reason is None and not root.producers:
                    reason = "no layer produces them"
                consumers = sorted(dict.fromkeys(root.consumers), key=lambda c: position.get(c.name, len(position)))
                groups[id(root)] = NeuronGroup(
                    producers=ordered(root.producers), channel_ops=ordered(root.channel_ops),
                    consumers=tuple(consumers), width=int(root.width or 0),
                    coupled_by=tuple(root.coupled_by), reason=reason, units=root.units)
            return groups[id(root)]

        reads = {layer: freeze(group) for layer, group in self.read.items()}
        for name in self.depthwise:
            self.refused.setdefault(name, "a depthwise convolution: its channels go with the channels it reads "
                                          "(compress a layer that reads its outputs)")
        layers = list(dict.fromkeys(self.order + [n for n, m in self.modules.items()
                                                   if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in self.order]))
        for name in layers:
            if name not in reads and name not in self.refused:
                self.refused[name] = "it is never called in the forward pass"
        return NetworkAnalysis(list(groups.values()), reads, layers, self.refused)

    def _visit(self, node: fx.Node) -> Optional[_Tensor]:
        if node.op == "placeholder":
            group = _Group(width=None)
            group.block("they are the network's input (e.g. an image's pixels), not neurons")
            return _Tensor(group, "maps")
        if node.op == "get_attr":
            return None
        if node.op == "output":
            for _, value in self._tracked(node.args):
                value.group.block("they are the network's outputs")
            return None
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.pairs:
            return self.pairs[node.args[0]][node.args[1]]
        tracked = self._tracked((node.args, node.kwargs))
        if node.op == "call_module":
            return self._module(node, tracked)
        if not tracked:
            return None
        if node.op == "call_function":
            return self._function(node, tracked)
        if node.op == "call_method":
            return self._method(node, tracked)
        return self._opaque(node, f"they go through {self._describe(node)}", f"they come from {self._describe(node)}")

    def _module(self, node: fx.Node, tracked: list[tuple[fx.Node, _Tensor]]) -> Optional[_Tensor]:
        name, module = node.target, self.modules[node.target]
        value = tracked[0][1] if tracked else None
        attention = isinstance(module, HeadAttention)
        shared = self.calls[name] > 1 and (attention or any(True for _ in module.parameters(recurse=False)))
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            self.order.append(name)
        if shared:
            why = f"{name!r} is called {self.calls[name]} times in the forward pass (shared weights)"
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                self.refused[name] = why
            for layer in ([f"{name}.{p}_proj" for p in ("q", "k", "v", "out")] if attention else []):
                self.order.append(layer)
                self.refused[layer] = why
            return self._opaque(node, why, why)
        if attention:
            return self._attention(node, name, module)
        if isinstance(module, nn.Conv2d) and is_depthwise(module):
            self.depthwise[name] = module.in_channels
            if value is None:
                return None
            self._check_width(value, module.in_channels, node)
            value.group.root().channel_ops.append(name)
            return value
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            why = (f"{name!r} is a grouped convolution (groups={module.groups}): its channels are tied in groups, "
                   "not removable one by one")
            self.refused[name] = why
            return self._opaque(node, f"they are read by {why}", f"they are made by {why}")
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            why = f"{name!r} pads with {module.padding_mode!r} (only padding_mode='zeros' is supported)"
            self.refused[name] = why
            return self._opaque(node, why, why)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if value is not None:
                self._consume(name, module, value)
            if isinstance(module, nn.Conv2d):
                return self._new_group(module.out_channels, name, "maps")
            return self._new_group(module.out_features, name, "features")
        if value is None:
            return None
        if isinstance(module, NORM_MODULES):
            self._check_width(value, module.num_features, node)
            value.group.root().channel_ops.append(name)
            return value
        if isinstance(module, nn.PReLU):
            if module.num_parameters > 1:
                self._check_width(value, module.num_parameters, node)
                value.group.root().channel_ops.append(name)
            return value
        if isinstance(module, nn.Flatten):
            return _Tensor(value.group, "features") if module.start_dim == 1 else self._opaque(
                node, f"they go through {self._describe(node)} (start_dim={module.start_dim})",
                f"they come from {self._describe(node)}")
        if isinstance(module, PER_CHANNEL_MODULES):
            return value
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            why = ("normalises across these features: removing one changes the others' normalisation (a "
                   "transformer's residual stream)")
            return self._opaque(node, f"{self._describe(node)} {why}", f"they come from {self._describe(node)}, which {why}")
        if isinstance(module, nn.GroupNorm):
            why = (f"{self._describe(node)} normalises groups of these channels together: removing one changes the "
                   "others' normalisation")
            return self._opaque(node, why, f"they come from {why}")
        return self._opaque(node, f"they go through {self._describe(node)}, which this analysis does not know",
                            f"they come from {self._describe(node)}, which this analysis does not know")

    def _attention(self, node: fx.Node, name: str, module: HeadAttention) -> Optional[_Tensor]:
        """A ``HeadAttention`` call: q, k and v consume the query, key and value (a
        ``SelfAttention``'s one input x, all three); the heads are a new group read by
        ``out_proj``, whose output is the call's. A ``SelfAttention`` returns it; a
        ``HeadAttention`` returns the pair (output, weights), taken apart by the ``getitem``
        nodes that follow."""
        if isinstance(module, SelfAttention):
            given = [node.args[0] if node.args else node.kwargs.get("x")] * 3
        else:
            names = ("query", "key", "value")
            given = [node.args[i] if i < len(node.args) else node.kwargs.get(n) for i, n in enumerate(names)]
        projections = [f"{name}.{p}_proj" for p in "qkv"]
        for layer, argument in zip(projections, given):
            self.order.append(layer)
            value = self.values.get(argument) if isinstance(argument, fx.Node) else None
            if value is not None:
                self._consume(layer, self.modules[layer], value)
            else:
                self.refused[layer] = "its input is not a tensor of this network's channels"
        heads = _Group(width=module.num_heads, producers=[projections[2]],
                       channel_ops=[projections[0], projections[1], name], units=module.head_dim)
        out = f"{name}.out_proj"
        self.order.append(out)
        self.read[out] = heads
        heads.consumers.append(Consumer(out, "linear", module.head_dim, module.head_dim))
        output = self._new_group(module.out_proj.out_features, out, "features")
        if isinstance(module, SelfAttention):
            return output
        self.pairs[node] = (output, None)
        return None

    def _check_width(self, value: _Tensor, entries: int, node: fx.Node) -> None:
        root = value.group.root()
        if root.width is None:
            root.width = entries
        elif root.width != entries:
            root.reasons.append(f"{self._describe(node)} has {entries} entries for {root.width} channels")

    def _consume(self, name: str, module: nn.Module, value: _Tensor) -> None:
        root = value.group.root()
        self.read[name] = root
        width = root.width
        if isinstance(module, nn.Conv2d):
            if width is not None and module.in_channels != width:
                root.block(f"{name!r} reads {module.in_channels} channels but its producers make {width}")
            kh, kw = module.kernel_size
            root.consumers.append(Consumer(name, "conv", kh * kw, 1))
            return
        indexed = isinstance(module, IndexedLinear)
        arriving = int(module.source_features) if indexed else module.in_features
        if width is None or arriving % width:
            if width is not None:
                root.block(f"{name!r} reads {arriving} features, not whole channels of {width}")
            root.consumers.append(Consumer(name, "linear", 1, 1))
            return
        positions = arriving // width
        if positions > 1 and value.layout != "features":
            root.block(f"{name!r} reads {arriving} features of {width} channels without a flatten")
        root.consumers.append(Consumer(name, "linear", 1 if indexed else positions, positions))

    def _function(self, node: fx.Node, tracked: list[tuple[fx.Node, _Tensor]]) -> Optional[_Tensor]:
        target = node.target
        if target in SHAPE_FUNCTIONS:
            return None
        if target in TYING:
            return self._tie(node, tracked)
        if target is torch.flatten:
            return self._flatten(node, tracked, node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0))
        if target in (torch.mean, torch.sum, torch.amax, torch.amin):
            return self._reduce(node, tracked, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        if target in PER_CHANNEL_FUNCTIONS and len(tracked) == 1 and tracked[0][0] is node.args[0]:
            return tracked[0][1]
        if target is torch.cat:
            why = f"they are concatenated by {self._describe(node)} (concatenations are not supported yet)"
            return self._opaque(node, why, f"they come from the concatenation {node.name!r} (concatenations are not "
                                           "supported yet)")
        if target in (F.layer_norm, F.group_norm, F.rms_norm):
            why = "normalises across these channels: removing one changes the others' normalisation"
            return self._opaque(node, f"{self._describe(node)} {why}", f"they come from {self._describe(node)}, which {why}")
        return self._opaque(node, f"they go through {self._describe(node)}, which mixes or reshapes channels",
                            f"they come from {self._describe(node)}, which mixes or reshapes channels")

    def _method(self, node: fx.Node, tracked: list[tuple[fx.Node, _Tensor]]) -> Optional[_Tensor]:
        target = node.target
        if target in SHAPE_METHODS:
            return None
        first = tracked[0][0] is node.args[0]
        if target in TYING_METHODS:
            return self._tie(node, tracked)
        if target in PER_CHANNEL_METHODS and first and len(tracked) == 1:
            return tracked[0][1]
        if target == "flatten" and first:
            return self._flatten(node, tracked, node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0))
        if target in ("view", "reshape") and first and len(node.args) == 3 and node.args[2] == -1:
            return _Tensor(tracked[0][1].group, "features")  # x.view(x.size(0), -1): a flatten
        if target in REDUCTIONS and first:
            return self._reduce(node, tracked, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        return self._opaque(node, f"they go through {self._describe(node)}, which mixes or reshapes channels",
                            f"they come from {self._describe(node)}, which mixes or reshapes channels")

    def _tie(self, node: fx.Node, tracked: list[tuple[fx.Node, _Tensor]]) -> _Tensor:
        constants = [a for a in (*node.args, *node.kwargs.values())
                     if isinstance(a, fx.Node) and self.values.get(a) is None and a.op == "get_attr"]
        if constants:
            why = f"{self._describe(node)} combines them with the parameter {constants[0].target!r} (not supported)"
            return self._opaque(node, why, why)
        return self._union([v for _, v in tracked], node)

    def _flatten(self, node: fx.Node, tracked: list[tuple[fx.Node, _Tensor]], start_dim: Any) -> _Tensor:
        value = tracked[0][1]
        if value.layout == "features" or start_dim == 1:
            return _Tensor(value.group, "features")
        return self._opaque(node, f"they go through {self._describe(node)} (start_dim={start_dim})",
                            f"they come from {self._describe(node)}")

    def _reduce(self, node: fx.Node, tracked: list[tuple[fx.Node, _Tensor]], dim: Any) -> _Tensor:
        """A mean or sum over spatial dimensions acts per channel (squeeze-excitation's pooling)."""
        value = tracked[0][1]
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if value.layout == "maps" and dims and all(isinstance(d, int) and d in (2, 3, -1, -2) for d in dims):
            return _Tensor(value.group, "maps" if keepdim else "features")
        return self._opaque(node, f"they go through {self._describe(node)} over dims {dim}, which mixes channels",
                            f"they come from {self._describe(node)}")

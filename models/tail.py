"""A network cut in two at one tensor, so that candidates are judged without rerunning the front.

A candidate solution of a layer's problem is judged by the network's accuracy with the
weights of the layers that read the group (its consumers) replaced. Everything before the
first of them is the same for every candidate, so the value of one *cut* tensor before them
is computed once per split (``prefix``) and a candidate costs only ``tail``: the network
from the cut to the logits, cut out of the torch.fx graph, with the consumers replaced.

A node is a valid cut when nothing after it reads anything computed before it: in a chain
any layer's input; in a residual network the input of a block (the identity path of the
block reads the block's input, which is the cut itself). ``cut_before`` takes the latest
valid cut before the first consumer. Consumers are replaced by ``Narrowed`` layers that
read only the groups a candidate keeps, so a narrow candidate is cheap.
"""
from __future__ import annotations

from copy import copy as copy_module, deepcopy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.experimental.optimization import fuse

from grouplasso import active_groups
from models.dependency import LayerError, trace
from models.pruned import IndexedLinear


def _nodes(module: nn.Module) -> list[fx.Node]:
    return list(trace(module).nodes)


def cut_before(module: nn.Module, layers: Sequence[str]) -> str:
    """The name of the latest node of ``trace(module)`` that is a valid cut (module doc) and
    comes before every call of ``layers`` (module paths inside ``module``)."""
    nodes = _nodes(module)
    index = {node: i for i, node in enumerate(nodes)}
    called = {n.target for n in nodes if n.op == "call_module"}
    wanted = {_called(called, layer) for layer in layers}
    calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target in wanted]
    missing = wanted - {nodes[i].target for i in calls}
    if missing:
        raise LayerError(f"{sorted(missing)} are not called in the forward pass")
    first = min(calls)
    # earliest[i]: the earliest node read by any node from i on
    earliest = [len(nodes)] * (len(nodes) + 1)
    for i in range(len(nodes) - 1, -1, -1):
        reads = [index[a] for a in nodes[i].all_input_nodes]
        earliest[i] = min([earliest[i + 1], *reads])
    for i in range(first - 1, -1, -1):
        if nodes[i].op in ("get_attr", "output"):
            continue
        if earliest[i + 1] >= i:
            return nodes[i].name
    raise LayerError(f"no tensor before {nodes[first].target!r} separates the network into two parts")


def prefix(module: nn.Module, cut: str) -> fx.GraphModule:
    """A module mapping ``module``'s input to the value of node ``cut`` (sharing parameters)."""
    nodes = _nodes(module)
    graph, env = fx.Graph(), {}
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.name == cut:
            graph.output(env[node])
            return fx.GraphModule(module, graph)
    raise LayerError(f"no node {cut!r} in the traced network")


def tail(module: nn.Module, cut: str, replace: Optional[dict[str, nn.Module]] = None) -> fx.GraphModule:
    """A module mapping the value of node ``cut`` to ``module``'s output, with the modules
    ``replace`` names (module paths) replaced by the given ones; the others are shared."""
    nodes = _nodes(module)
    names = [n.name for n in nodes]
    if cut not in names:
        raise LayerError(f"no node {cut!r} in the traced network")
    start = names.index(cut)
    graph = fx.Graph()
    env = {nodes[start]: graph.placeholder("cut")}
    replace = replace or {}

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            raise LayerError(f"after {cut!r} the network still reads {node.name!r}, computed before it (a connection "
                             "around the cut): the cut alone does not determine the network's output")
        return env[node]

    called = {n.target for n in nodes if n.op == "call_module"}
    replace = _lift(module, called, replace)
    root: dict[str, nn.Module] = {}
    for node in nodes[start + 1:]:
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], lookup))
            break
        if node.op == "call_module":
            root[node.target] = replace.get(node.target) or module.get_submodule(node.target)
        elif node.op == "get_attr":
            root[node.target] = _attribute(module, node.target)
        env[node] = graph.node_copy(node, lookup)
    return fx.GraphModule(root, graph)


def for_inference(module: fx.GraphModule) -> nn.Module:
    """``module`` (a ``tail``, in eval mode) laid out for fast CPU inference: a copy with every
    BatchNorm that follows a convolution folded into it (w' = w * gamma / sqrt(var + eps),
    b' = (b - mean) * gamma / sqrt(var + eps) + beta) and 4-d weights in channels-last layout,
    for inputs in that layout; the network's own layers are untouched. On ResNet-56's tails the
    two halve the time of a validation pass. The logits move by float32 rounding (1e-5 there),
    so an argmax can differ on an image whose two best classes tie to that precision. A module
    without convolutions is returned as it is."""
    if not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        return module
    folded = fuse(module, no_trace=True) if any(isinstance(m, nn.BatchNorm2d) for m in module.modules()) \
        else deepcopy(module)
    return folded.to(memory_format=torch.channels_last)


def _called(called: set[str], path: str) -> str:
    """``path``, or the nearest module above it that the graph calls (a layer inside a leaf such
    as ``HeadAttention``'s ``out_proj``); ``path`` itself when neither is called."""
    parent = path
    while parent and parent not in called:
        parent = parent.rpartition(".")[0]
    return parent or path


def _lift(module: nn.Module, called: set[str], replace: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``replace`` with every layer inside a called leaf module moved up to that leaf: a shallow
    copy of the leaf with the layer swapped (the original is untouched)."""
    lifted: dict[str, nn.Module] = {}
    for path, new in replace.items():
        leaf = _called(called, path)
        if leaf == path:
            lifted[path] = new
            continue
        duplicate = lifted.get(leaf) or _shallow(module.get_submodule(leaf))
        owner, _, child = path[len(leaf) + 1:].rpartition(".")
        target = duplicate
        for part in owner.split(".") if owner else []:
            target._modules[part] = _shallow(target._modules[part])
            target = target._modules[part]
        target._modules[child] = new
        lifted[leaf] = duplicate
    return lifted


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares its parameters but not its table of children."""
    out = copy_module(module)
    out._modules = dict(module._modules)
    return out


def _attribute(module: nn.Module, target: str) -> object:
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def tail_after(network: nn.Module, layer: str) -> fx.GraphModule:
    """A module mapping ``layer``'s output to ``network``'s output (sharing its parameters)."""
    nodes = [n for n in _nodes(network) if n.op == "call_module" and n.target == layer]
    if len(nodes) != 1:
        raise LayerError(f"layer {layer!r} is called {len(nodes)} times in the forward pass; only once is supported")
    return tail(network, nodes[0].name)


class Narrowed(nn.Module):
    """A Linear or Conv2d ``layer`` with weight ``V`` (its problem's (D, K) layout, zero groups
    kept) that reads only the inputs of V's nonzero groups of ``group`` columns: the same
    output as ``layer`` with weight V, at the cost of the kept inputs only."""

    def __init__(self, layer: nn.Module, V: Tensor, group: int = 1) -> None:
        super().__init__()
        weight = layer.weight
        bias = None if layer.bias is None else layer.bias.detach().to(torch.float32)
        keep = active_groups(V, group)
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            W = V.reshape(weight.shape)[:, keep]
            self.register_buffer("keep", keep)
        else:
            columns = (keep[:, None] * group + torch.arange(group)).reshape(-1)
            source = layer.index[columns] if isinstance(layer, IndexedLinear) else columns
            W = V[:, columns]
            self.register_buffer("keep", source)
        self.register_buffer("weight", W.detach().to(torch.float32).contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv:
            x = x.index_select(1, self.keep)
            if x.shape[1] == 0:  # nothing kept: the output is the bias everywhere
                x = x.new_zeros(x.shape[0], 1, *x.shape[2:])
                return F.conv2d(x, self.weight.new_zeros(self.weight.shape[0], 1, *self.weight.shape[2:]), self.bias,
                                self.stride, self.padding, self.dilation)
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return F.linear(x.index_select(-1, self.keep), self.weight, self.bias)

"""The rest of a network after one of its layers, as a module of its own.

A candidate solution of a layer's problem is judged by the network's accuracy with the
layer's weight replaced. Running the network up to the layer again for every candidate
would repeat the same work, so the layer's inputs are stored once and a candidate costs
the layer's own product plus ``tail_after(network, layer)``: the network from the layer's
output to the logits, cut out of the torch.fx graph. This works for any layer of a chain
(AlexNet's convolutions and classifier, VGG-19's blocks); a network whose output after
the layer still reads an earlier value (a residual connection across it) is refused.
"""
from __future__ import annotations

from torch import fx, nn

from models.layers import LayerError, trace


def tail_after(network: nn.Module, layer: str) -> fx.GraphModule:
    """A module mapping ``layer``'s output to ``network``'s output (sharing its parameters)."""
    nodes = list(trace(network).nodes)
    calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        raise LayerError(f"layer {layer!r} is called {len(calls)} times in the forward pass; only once is supported")
    graph = fx.Graph()
    env = {nodes[calls[0]]: graph.placeholder("layer_output")}

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            raise LayerError(f"after {layer!r} the network still reads {node.name!r}, computed before it (a "
                             "connection around the layer): its output alone does not determine the network's")
        return env[node]

    for node in nodes[calls[0] + 1:]:
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], lookup))
            break
        env[node] = graph.node_copy(node, lookup)
    return fx.GraphModule(network, graph)

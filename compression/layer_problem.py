"""One group's lasso as the pipeline solves it, and the way back to the consumers' weights.

The statistics of a consumer (``grouplasso.LassoStats``) come in the layer's own layout: a
Linear layer's K inputs, a convolution's C_in*kh*kw patch entries in groups of kh*kw (one
group per input channel), or a Linear layer reading convolution channels in groups of the
channel's positions. A group of neurons read by one layer is that layer's problem; read by
several (coupled channels), the consumers' problems are stacked into one
(``grouplasso.stack_problems``). One case is folded first: when a single consumer's every
group of inputs is copies of one value (AlexNet's classifier.1 at 64x64 inputs, whose
convolutions end at 1x1 and whose adaptive pool repeats that value 36 times), the problem
is solved on one column per group with the group's weights summed, which is the same
function; a solution is expanded back onto the first column of each group, so the
compressed layer reads one input per channel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from torch import Tensor, nn

from grouplasso import Folding, LassoStats, Stacking, active_groups, fold_repeated_groups, stack_problems
from models.dependency import Consumer, NeuronGroup


@dataclass
class LayerProblem:
    """``stats`` and the trained weight ``W`` (D, K') in the layout the lasso is solved in;
    ``consumers`` the layers whose weights it solves for; ``stacking`` their joint layout (None
    for a single consumer); ``folding`` maps a single consumer's layout back from folded
    repeated inputs."""

    stats: LassoStats
    W: Tensor
    consumers: tuple[Consumer, ...]
    folding: Optional[Folding] = None
    stacking: Optional[Stacking] = None
    layer_group: int = 1  # a single consumer's group size in its own layout

    @classmethod
    def of(cls, stats: LassoStats, W: Tensor, consumer: Optional[Consumer] = None, fold: bool = True) -> "LayerProblem":
        """The problem of one layer with statistics ``stats`` and weight ``W`` (D, K), folded when
        ``fold`` and every group repeats one input."""
        consumers = (consumer,) if consumer is not None else (Consumer("layer", "linear", stats.group),)
        folding = fold_repeated_groups(stats) if fold and stats.group > 1 else None
        if folding is None:
            return cls(stats, W, consumers, layer_group=stats.group)
        return cls(folding.stats, folding.fold(W), consumers, folding=folding, layer_group=stats.group)

    @classmethod
    def of_group(cls, network: nn.Module, group: NeuronGroup, stats: dict[str, LassoStats]) -> "LayerProblem":
        """The problem of ``group`` from its consumers' statistics (module path -> stats): one
        layer's own problem, or the consumers' problems stacked."""
        parts = [replace(stats[c.name], group=c.group) for c in group.consumers]
        weights = [network.get_submodule(c.name).weight.detach().reshape(s.D, -1) for c, s in zip(group.consumers, parts)]
        if len(parts) == 1:
            return cls.of(parts[0], weights[0], group.consumers[0])
        if any(c.kind == "linear" and c.positions > 1 and c.group == 1 for c in group.consumers):
            raise ValueError(f"the consumers of {group.name!r} include an already compressed IndexedLinear, whose "
                             "columns are not whole channels; compress them one at a time")
        joint, W, stacking = stack_problems(parts, weights)
        return cls(joint, W, group.consumers, stacking=stacking, layer_group=joint.group)

    @property
    def group(self) -> int:
        return self.stats.group

    @property
    def groups(self) -> int:
        """The problem's width: input neurons, or channels."""
        return self.stats.K // self.stats.group

    def width(self, V: Tensor) -> int:
        """Neurons (or channels) a solution V keeps."""
        return len(active_groups(V, self.group))

    def weight(self, V: Tensor) -> Tensor:
        """A single consumer's solution V (D, K') as the layer's weight (D, K)."""
        if self.stacking is not None:
            raise ValueError("a stacked problem has one weight per consumer: use weights(V)")
        return V if self.folding is None else self.folding.expand(V)

    def weights(self, V: Tensor) -> dict[str, Tensor]:
        """A solution V as every consumer's weight in its problem layout (D_j, K_j)."""
        if self.stacking is None:
            return {self.consumers[0].name: self.weight(V)}
        return {c.name: part for c, part in zip(self.consumers, self.stacking.split(V))}

    def weights_with_groups(self, V: Tensor) -> dict[str, tuple[Tensor, int]]:
        """``weights(V)`` with each consumer's group size, as candidate evaluations read them."""
        return {name: (part, c.group) for (name, part), c in zip(self.weights(V).items(), self.consumers)}

    def describe(self) -> dict:
        """What the report says about the problem's layout."""
        out = {"group_size": self.layer_group, "folded": self.folding is not None}
        if self.stacking is not None:
            out["stacked"] = {"consumers": [c.name for c in self.consumers], "outputs": list(self.stacking.outputs),
                              "columns_per_channel": list(self.stacking.groups),
                              "scales": [round(a, 6) for a in self.stacking.scales]}
        return out

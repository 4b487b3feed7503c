"""One layer's lasso as the pipeline solves it, and the way back to the layer's weight.

The statistics of a layer (``grouplasso.LassoStats``) come in the layer's own layout: a
Linear layer's K inputs, a convolution's C_in*kh*kw patch entries in groups of kh*kw (one
group per input channel), or a Linear layer reading convolution channels in groups of the
channel's positions. One case is folded first: when every group's inputs are copies of one
value (AlexNet's classifier.1 at 64x64 inputs, whose convolutions end at 1x1 and whose
adaptive pool repeats that value 36 times), the problem is solved on one column per group
with the group's weights summed, which is the same function; a solution is expanded back
onto the first column of each group, so the compressed layer reads one input per channel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from grouplasso import Folding, LassoStats, active_groups, fold_repeated_groups


@dataclass
class LayerProblem:
    """``stats`` and the trained weight ``W`` (D, K') in the layout the lasso is solved in;
    ``folding`` maps that layout back to the layer's when repeated inputs were folded."""

    stats: LassoStats
    W: Tensor
    folding: Optional[Folding] = None
    layer_group: int = 1  # the group size in the layer's own layout

    @classmethod
    def of(cls, stats: LassoStats, W: Tensor, fold: bool = True) -> "LayerProblem":
        """The problem of a layer with statistics ``stats`` and weight ``W`` (D, K), folded when
        ``fold`` and every group repeats one input."""
        folding = fold_repeated_groups(stats) if fold and stats.group > 1 else None
        if folding is None:
            return cls(stats, W, layer_group=stats.group)
        return cls(folding.stats, folding.fold(W), folding, layer_group=stats.group)

    @property
    def group(self) -> int:
        return self.stats.group

    @property
    def groups(self) -> int:
        """The layer's width: input neurons, or channels."""
        return self.stats.K // self.stats.group

    def width(self, V: Tensor) -> int:
        """Neurons (or channels) a solution V keeps."""
        return len(active_groups(V, self.group))

    def weight(self, V: Tensor) -> Tensor:
        """A solution V (D, K') as the layer's weight (D, K), for evaluation and surgery."""
        return V if self.folding is None else self.folding.expand(V)

    def describe(self) -> dict:
        """What the report says about the problem's layout."""
        return {"group_size": self.layer_group, "folded": self.folding is not None}

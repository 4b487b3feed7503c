"""Sufficient statistics of a layer's compression problem, accumulated batch by batch.

For a Linear layer y = W x + b with inputs x_i (K) and outputs y_i (D), i = 1..n:

    G = (1/n) sum_i x_i x_i^T          (K, K)
    C = (1/n) sum_i (y_i - b) x_i^T    (D, K)
    s = (1/n) sum_i ||y_i - b||^2      scalar

Every quantity of the problem (objective, gradient, duality gap) is a function of
(G, C, s), so solvers never touch the n samples again and memory is O(K^2 + D K)
whatever n is. The sums are accumulated in float64 (G squares the inputs: float32
sums would lose the small eigenvalues that decide which neurons are redundant).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import torch
from scipy.linalg.blas import dsyrk
from torch import Tensor

from grouplasso.prox import group_columns

#: The block structure of a stacked problem (``grouplasso.stacking``): per consumer j, its rows
#: (a slice of the D) and its columns within every group (a slice of the g: consumer j owns the
#: columns c*g + offset_j .. c*g + offset_j + g_j - 1 of every group c). G is zero outside the
#: (columns of j, columns of j) blocks, C outside the (rows of j, columns of j) ones.
Blocks = tuple[tuple[slice, slice], ...]


def _tiles(parts: list[slice], size: int) -> bool:
    """Whether the unit-step ``parts`` follow one another from 0 to ``size``, none empty."""
    ends = [0] + [part.stop for part in parts]
    return bool(parts) and ends[-1] == size and all(
        part.step == 1 and part.start == start and part.stop > start for part, start in zip(parts, ends))


@dataclass
class LassoStats:
    """(G, C, s) of one layer over ``n`` samples; see the module doc. Tensors are float64.

    ``group``: the penalty's group size g. Columns c*g .. (c+1)*g - 1 form group c (one input
    channel of a convolution, its kh*kw patch entries); g = 1 is one column per neuron.

    ``blocks``: None, or the block structure of a stacked problem (``Blocks``; set by
    ``grouplasso.stacking.stack_problems``): the rows and within-group columns of every consumer,
    in order, covering all D rows and all g columns of a group. The products with G then run
    block by block (``grouplasso.problem.gram_product``), for V zero off the blocks, as every
    solver keeps it. A structure is stated per group, so it holds unchanged on any whole groups
    (``restrict``)."""

    G: Tensor
    C: Tensor
    s: float
    n: int
    group: int = 1
    blocks: Optional[Blocks] = None

    @property
    def D(self) -> int:
        return int(self.C.shape[0])

    @property
    def K(self) -> int:
        return int(self.C.shape[1])

    @property
    def device(self) -> torch.device:
        return self.G.device

    def to(self, device: torch.device | str) -> "LassoStats":
        return LassoStats(self.G.to(device), self.C.to(device), self.s, self.n, self.group, self.blocks)

    def __post_init__(self) -> None:
        if self.group < 1 or self.K % self.group:
            raise ValueError(f"group size {self.group} does not divide the {self.K} columns")
        if self.blocks is not None:
            rows = [slice(*part.indices(self.D)) for part, _ in self.blocks]
            columns = [slice(*part.indices(self.group)) for _, part in self.blocks]
            if not (_tiles(rows, self.D) and _tiles(columns, self.group)):
                raise ValueError(f"blocks {self.blocks} do not tile the {self.D} rows and the {self.group} "
                                 "columns of a group in order")
            self.blocks = tuple((slice(r.start, r.stop), slice(c.start, c.stop)) for r, c in zip(rows, columns))

    @property
    def groups(self) -> int:
        """The number of groups, K / group (the number of neurons when group = 1)."""
        return self.K // self.group

    @cached_property
    def block_grams(self) -> tuple[Tensor, ...]:
        """With ``blocks``: every consumer's block G_j = G[J_j, J_j] (K_j, K_j), contiguous, in its own
        group-major order (row c * g_j + u: column u of consumer j in group c). Gathered once, so
        that the products read rows of it (a view, or a copy of whole rows) rather than gathering
        them out of G's strided blocks every time."""
        if self.blocks is None:
            raise ValueError("block_grams: the statistics have no block structure")
        G4 = self.G.reshape(self.groups, self.group, self.groups, self.group)
        return tuple(G4[:, columns, :, columns].reshape(self.groups * (columns.stop - columns.start), -1)
                     for _, columns in self.blocks)

    def restrict(self, columns: Tensor) -> "LassoStats":
        """The statistics of the problem on the inputs ``columns`` only (the others fixed at zero).

        With group g > 1 the result keeps g, so ``columns`` must be whole groups, each group's g
        columns consecutive and in order (``grouplasso.prox.group_columns`` of some groups, e.g.
        ``active_columns(V, g)``); anything else is refused."""
        if self.group > 1:
            columns = torch.as_tensor(columns, device=self.G.device)
            if columns.dtype == torch.bool:
                columns = torch.nonzero(columns).flatten()
            whole = columns.ndim == 1 and columns.numel() % self.group == 0
            if whole:
                blocks = columns.reshape(-1, self.group)
                starts = blocks[:, :1]
                whole = torch.equal(blocks, starts + torch.arange(self.group, device=columns.device)) \
                    and not bool((starts % self.group).any())
            if not whole:
                raise ValueError(f"restrict: with group size {self.group} the columns must be whole groups "
                                 f"(c*{self.group} .. c*{self.group}+{self.group - 1}, in this order); use restrict_groups")
        # Whole groups in order: each consumer keeps its within-group columns, so the structure
        # holds unchanged on the kept columns.
        return LassoStats(self.G[columns][:, columns], self.C[:, columns], self.s, self.n, self.group, self.blocks)

    def restrict_groups(self, groups: Tensor) -> "LassoStats":
        """The statistics of the problem on the groups ``groups`` (indices) only."""
        groups = torch.as_tensor(groups, device=self.G.device)
        return self.restrict(group_columns(groups, self.group))

    def to_stored(self) -> dict:
        """The fields as stored on disk (the pass cache): G as its upper triangle, row by row,
        K (K + 1) / 2 numbers instead of K^2. G is exactly symmetric (``StatsAccumulator.finalize``
        mirrors one triangle), so this is lossless and halves G's bytes, most of an entry's:
        0.68 GB -> 0.34 GB for the 9,216 inputs of AlexNet's first classifier layer."""
        upper = torch.ones(self.K, self.K, dtype=torch.bool, device=self.G.device).triu()
        return {"G_upper": self.G[upper], "C": self.C, "s": self.s, "n": self.n, "group": self.group,
                "blocks": self.blocks}

    @classmethod
    def from_stored(cls, stored: dict) -> "LassoStats":
        """The statistics ``to_stored`` wrote (or, from an older cache, the fields with G whole)."""
        fields = dict(stored)
        if "G_upper" in fields:
            packed = fields.pop("G_upper")
            K = int(fields["C"].shape[1])
            upper = torch.ones(K, K, dtype=torch.bool, device=packed.device).triu()
            G = torch.zeros(K, K, dtype=packed.dtype, device=packed.device)
            G[upper] = packed
            lower = ~upper
            G[lower] = G.T[lower]  # G[i, j] = G[j, i] below the diagonal
            fields["G"] = G
        return cls(**fields)

    @classmethod
    def from_features(cls, X: Tensor, Y: Tensor, bias: Optional[Tensor] = None, group: int = 1) -> "LassoStats":
        """All at once from inputs ``X`` (n, K) and outputs ``Y`` (n, D)."""
        acc = StatsAccumulator(X.shape[1], Y.shape[1], bias=bias, device=X.device, group=group)
        acc.update(X, Y)
        return acc.finalize()


class StatsAccumulator:
    """Running float64 sums of ``x x^T``, ``(y - b) x^T``, ``||y - b||^2`` and the count.

    ``update`` takes a batch (B, K) of inputs and (B, D) of outputs; under data
    parallelism every rank accumulates its own shard and ``all_reduce`` sums them.
    """

    def __init__(self, K: int, D: int, bias: Optional[Tensor] = None, device: torch.device | str = "cpu",
                 group: int = 1) -> None:
        if group < 1 or K % group:
            raise ValueError(f"group size {group} does not divide the {K} columns")
        self.K, self.D, self.group = K, D, group
        self.bias = None if bias is None else bias.detach().to(device=device, dtype=torch.float64)
        self.G = torch.zeros(K, K, dtype=torch.float64, device=device)
        self.C = torch.zeros(D, K, dtype=torch.float64, device=device)
        self.s = torch.zeros((), dtype=torch.float64, device=device)
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self._upper_only = self.G.device.type == "cpu"  # G holds x^T x's upper triangle (see update)

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != self.K or y.shape[1] != self.D:
            raise ValueError(f"expected inputs (B, {self.K}) and outputs (B, {self.D}), got {tuple(x.shape)} and {tuple(y.shape)}")
        x = x.to(self.G.device, torch.float64)
        r = y.to(self.G.device, torch.float64)
        if self.bias is not None:
            r = r - self.bias
        self.C.addmm_(r.T, x)
        self.s += r.square().sum()
        self.n += x.shape[0]
        # Weight decay leaves many ReLU inputs dead (zero on every sample): the product over
        # the live columns only is exact and, with G's cost quadratic in them, much cheaper.
        live = torch.nonzero(x.any(dim=0)).flatten()
        dense = len(live) >= 0.8 * self.K
        if not dense:
            x = x[:, live]
        if self._upper_only:
            # BLAS dsyrk: x^T x at half the multiply-adds of a matrix product, upper triangle
            # only (``finalize`` mirrors it). ``live`` ascends, so upper entries stay upper.
            product = torch.from_numpy(dsyrk(1.0, x.contiguous().numpy().T, trans=0, lower=0))
        else:
            product = x.T @ x
        if dense:
            self.G += product
        else:
            self.G.index_put_((live[:, None], live[None, :]), product, accumulate=True)

    def all_reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Replace the sums by ``reduce_sum`` of them over all processes (e.g. the DDP strategy's reduce)."""
        self.G = reduce_sum(self.G)
        self.C = reduce_sum(self.C)
        self.s = reduce_sum(self.s)
        self.n = reduce_sum(self.n)

    def finalize(self) -> LassoStats:
        """The means; at least one sample must have been accumulated (the passes over the data
        check that, ``lightning_modules.network_pass.require_samples``)."""
        n = int(self.n.item())
        if self._upper_only:
            G = (torch.triu(self.G) + torch.triu(self.G, 1).T) / n
        else:  # symmetric in exact arithmetic; solvers rely on it exactly
            G = (self.G + self.G.T) / (2 * n)
        return LassoStats(G=G, C=self.C / n, s=float(self.s) / n, n=n, group=self.group)

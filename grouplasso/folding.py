"""Folding groups of identical inputs into one input each.

For 64x64 images torchvision's AlexNet ends its convolutions at 1x1 and the adaptive average
pool repeats each channel's value over 6x6, so the 9216 inputs of classifier.1 are 256
distinct values, each 36 times (DESIGN.md, "Removing neurons"). With groups of g = 36 (one
per channel) every group is then g copies of one input x_c, and a weight block W[:, group c]
acts on the layer's output only through the sum of its columns:

    W x = sum_c (sum_{j in group c} W[:, j]) x_c = W' x'       (W' = fold(W), x' = one input per channel).

So the problem is really a lasso over the function W' (D, K/g) on the K/g distinct inputs,
with one column per channel: G' = G[reps][:, reps], C' = C[:, reps], same s and n, group 1.
Solving that is exact and (K/g)^2 instead of K^2 in size; the lasso then acts on the
function, reading one input per channel, and its penalty is the norm of the channel's total
weight ||W'[:, c]||, not the Frobenius norm of how that weight happens to be spread over the
copies. (The two agree up to scale: for a fixed sum u, ||V[:, group c]||_F is smallest,
||u|| / sqrt(g), when spread evenly, so the grouped problem at lam and the folded problem at
lam / sqrt(g) have the same solutions, the grouped one being the folded one spread evenly,
and lambda_max scales by the same sqrt(g).) A folded solution V' goes back to the K inputs
by ``expand``: V' at each group's first column, zeros elsewhere, the same function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from grouplasso.stats import LassoStats


@dataclass(frozen=True)
class Folding:
    """The folded problem of ``fold_repeated_groups``.

    ``stats``: the problem on one input per group (group size 1, K / g columns);
    ``representatives`` (K / g,): the column of the full problem each folded column reads
    (the first of its group); ``group``: g; ``K``: the full problem's number of columns."""

    stats: LassoStats
    representatives: Tensor
    group: int
    K: int

    def fold(self, W: Tensor) -> Tensor:
        """(D, K) -> (D, K / g): the sum of each group's columns, so W x = fold(W) x[reps]
        exactly when the inputs are repeated."""
        return W.reshape(W.shape[0], -1, self.group).sum(dim=-1)

    def expand(self, V: Tensor) -> Tensor:
        """(D, K / g) -> (D, K): V at the representative columns, zeros elsewhere (the same
        function of the repeated inputs: fold(expand(V)) = V)."""
        out = torch.zeros(V.shape[0], self.K, dtype=V.dtype, device=V.device)
        out[:, self.representatives.to(V.device)] = V
        return out


def fold_repeated_groups(stats: LassoStats, rtol: float = 1e-6) -> Optional[Folding]:
    """The folded problem when every group's ``stats.group`` columns are one repeated input,
    else None (always None for group 1).

    Columns i and j are the same input when E (x_i - x_j)^2 = G_ii + G_jj - 2 G_ij = 0; it is
    checked as G_ii = G_jj = G_ij for every column i of a group and its first column j, within
    ``rtol`` times the largest diagonal entry of G."""
    g = stats.group
    if g == 1:
        return None
    K = stats.K
    reps = torch.arange(0, K, g, device=stats.G.device)
    rep_of = reps.repeat_interleave(g)  # (K,): the first column of each column's group
    columns = torch.arange(K, device=stats.G.device)
    diag = torch.diagonal(stats.G)
    tol = rtol * float(diag.max()) if K else 0.0
    same = ((diag - diag[rep_of]).abs() <= tol) & ((stats.G[rep_of, columns] - diag[rep_of]).abs() <= tol)
    if not bool(same.all()):
        return None
    folded = LassoStats(stats.G[reps][:, reps], stats.C[:, reps], stats.s, stats.n, 1)
    return Folding(stats=folded, representatives=reps, group=g, K=K)

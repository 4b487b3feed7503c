"""The multi-task lasso objective on sufficient statistics, its gradient, and its duality gap.

With the statistics (G, C, s) of ``grouplasso.stats`` and V (D, K):

    MSE(V)  = (s - 2 <V, C> + <V G, V>) / D            (mean over samples and the D outputs)
    F(V)    = MSE(V) + lam * sum_c ||V[:, group c]||_F
    grad    = 2 (V G - C) / D,       Lipschitz constant L = 2 lambda_max(G) / D

Group c is the ``stats.group`` = g consecutive columns c*g .. (c+1)*g - 1 (g = 1: one column,
a neuron; g = kh*kw: one input channel of a convolution). Every formula below reads "column"
as "group" and the column norm as the group's Frobenius norm; every function reads g from
``stats.group``.

Duality gap. Multiplying F by D/2 gives scikit-learn's MultiTaskLasso form
P(V) = (1/2n) ||Y - b - X V^T||^2 + alpha sum_c ||V[:, group c]||_F, alpha = lam D / 2, whose dual is

    max_theta <theta, Y - b> - (n/2) ||theta||^2   s.t.  ||X[:, group c]^T theta||_F <= alpha for every c.

The residual scaled by c, theta = c R / n, is feasible for |c| <= alpha / max_c ||Gamma[:, group c]||_F
with Gamma = C - V G = (1/n) R^T X, and its dual value c * (s - <V, C>) - c^2 rho / 2, rho =
n^{-1} ||R||^2 = D * MSE(V), is maximised over c in closed form. The gap F(V) - dual >= F(V) - F*
certifies how far V is from optimal; at the optimum it is zero.

Every product with G goes through ``gram_product``, which for a stacked problem (``stats.blocks``,
``grouplasso.stacking``) multiplies each consumer's block alone: there G is block diagonal and V
zero off the blocks, so the dense product would spend most of its D K^2 multiply-adds on zeros.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from grouplasso.prox import active_columns, active_groups, group_columns, group_norms
from grouplasso.stats import LassoStats

Groups = Tensor | slice  # group indices (ascending), or a slice of groups


def _columns(groups: Groups, group: int) -> Tensor | slice:
    """The columns of ``groups``: a slice of groups gives a slice (a view of G, not a copy)."""
    if isinstance(groups, slice):
        scaled = [None if end is None else end * group for end in (groups.start, groups.stop)]
        return slice(*scaled)
    return group_columns(groups, group)


def gram_product(stats: LassoStats, X: Tensor, groups: Groups | None = None, out: Tensor | None = None,
                 into: slice = slice(None)) -> Tensor:
    """X G[S, T] (D, |T|): S the columns of ``groups`` (all when None), X (D, |S|) V's entries on
    them (V zero on the other columns, so that the product is (V G)[:, T]), T the columns of the
    groups ``into`` (all by default). A new tensor, or added to ``out`` (D, |T|) in place.

    Without a structure this is the one product ``X @ G[S][:, T]``, D |S| |T| multiply-adds.
    With ``stats.blocks`` (consumer j: rows R_j, columns J_j of every group) it is, exactly,

        (X G)[R_j, T_j] = X[R_j, S_j] G[S_j, T_j],   zero on (R_j, T_i) for i != j,

    since G[J_j, J_i] = 0 and X is zero off (R_j, J_j): sum_j D_j |S_j| |T_j| multiply-adds, on
    the rows of the blocks G_j kept in ``stats.block_grams``. The zero entries are left as they
    are (in ``out``) or zero (a new tensor)."""
    g, D = stats.group, X.shape[0]
    if stats.blocks is None:
        G = stats.G if groups is None else stats.G[_columns(groups, g)]
        if into != slice(None):
            G = G[:, _columns(into, g)]
        return X @ G if out is None else out.addmm_(X, G)
    groups = slice(None) if groups is None else groups
    n, width = stats.groups, len(range(stats.groups)[into])  # groups of G, of T
    X3 = X.reshape(D, -1, g)
    out = X.new_zeros(D, width * g) if out is None else out
    out3 = out.view(D, width, g)
    for (rows, columns), Gj in zip(stats.blocks, stats.block_grams):  # one product per consumer
        Dj, gj = rows.stop - rows.start, columns.stop - columns.start
        Xj = X3[rows, :, columns].reshape(Dj, X3.shape[1] * gj)  # (D_j, |S_j|), group-major as G_j
        GS = Gj.view(n, gj, n * gj)[groups].reshape(Xj.shape[1], n * gj)  # rows S_j: a view for a slice
        GT = GS if into == slice(None) else GS[:, _columns(into, gj)]  # G[S_j, T_j]
        out3[rows, :, columns].add_((Xj @ GT).view(Dj, width, gj))
    return out


def times_gram(stats: LassoStats, V: Tensor) -> Tensor:
    """V G (D, K), reading only the rows of G of V's nonzero groups: solutions are sparse,
    and this product is the cost of every gradient and certificate."""
    active = active_groups(V, stats.group)
    if 2 * len(active) * stats.group >= stats.K:
        return gram_product(stats, V)
    return gram_product(stats, V[:, group_columns(active, stats.group)], active)


def residual_energy(stats: LassoStats, V: Tensor) -> Tensor:
    """rho = (1/n) sum_i ||y_i - b - V x_i||^2 = s - 2 <V, C> + <V G, V> (a 0-dim tensor)."""
    V = V.to(stats.G)
    return stats.s - 2.0 * torch.sum(V * stats.C) + torch.sum(times_gram(stats, V) * V)


def mse(stats: LassoStats, V: Tensor) -> float:
    """MSE(V): mean over samples and outputs, as ``torch.nn.MSELoss`` computes it."""
    return float(residual_energy(stats, V)) / stats.D


def group_norm(V: Tensor, group: int = 1) -> float:
    """The penalty without lam: sum_c ||V[:, group c]||_F (groups of ``group`` columns)."""
    return float(group_norms(V, group).sum())


def objective(stats: LassoStats, V: Tensor, lam: float) -> float:
    """F(V) = MSE(V) + lam * sum_c ||V[:, group c]||_F."""
    return mse(stats, V) + lam * group_norm(V, stats.group)


def gradient(stats: LassoStats, V: Tensor) -> Tensor:
    """grad MSE(V) = 2 (V G - C) / D, shape (D, K)."""
    return (times_gram(stats, V) - stats.C) * (2.0 / stats.D)


def largest_eigenvalue(G: Tensor, tol: float = 1e-10, max_iter: int = 1000,
                       times: Callable[[Tensor], Tensor] | None = None) -> float:
    """lambda_max of the symmetric positive semi-definite ``G`` (K, K), by power iteration
    (a Gram matrix of nonnegative features has a dominant eigenvalue, so this converges fast),
    returned with a 0.1% margin so that 1/L is a safe step. (Cheaper and steadier than a
    full eigendecomposition, whose threads stall on a busy machine.) ``times``: v -> G v, when
    G has a cheaper product than the dense one."""
    times = times or G.__matmul__
    v = torch.ones(G.shape[0], dtype=G.dtype, device=G.device) / math.sqrt(G.shape[0])
    value = 0.0
    for _ in range(max_iter):
        w = times(v)
        new = float(torch.dot(v, w))
        norm = torch.linalg.vector_norm(w)
        if norm == 0:
            return 0.0
        v = w / norm
        if abs(new - value) <= tol * abs(new):
            break
        value = new
    return new * 1.001


def check_lambda(lam: float) -> float:
    """``lam`` as a float if it is a positive finite number; the one error for any other."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lambda must be a positive number, got {lam!r}; larger lambda removes more neurons")
    return float(lam)


def lambda_max(stats: LassoStats) -> float:
    """The smallest lam for which V = 0 is optimal: (2/D) max_c ||C[:, group c]||_F (the gradient
    at V = 0 is -2C/D, and 0 is optimal iff every group of it lies in the ball of radius lam).
    Every useful lambda lies below it."""
    return 2.0 / stats.D * float(group_norms(stats.C, stats.group).max()) if stats.K else 0.0


def lipschitz(stats: LassoStats) -> float:
    """L = 2 lambda_max(G) / D, the Lipschitz constant of ``gradient``."""
    if stats.blocks is None:
        return 2.0 * largest_eigenvalue(stats.G) / stats.D
    # The same power iteration with G v block by block: a product with each consumer's block
    # G_j (sum_j K_j^2 entries) per iteration instead of one with all of G.
    n, g = stats.groups, stats.group
    parts = list(zip((columns for _, columns in stats.blocks), stats.block_grams))

    def times(v: Tensor) -> Tensor:
        w = torch.empty_like(v)
        for columns, Gj in parts:
            w.view(n, g)[:, columns] = (Gj @ v.view(n, g)[:, columns].reshape(-1)).view(n, -1)
        return w

    return 2.0 * largest_eigenvalue(stats.G, times=times) / stats.D


@dataclass(frozen=True)
class DualityGap:
    """Primal F(V), the dual value of a feasible dual point, their gap and the gap relative
    to F(V); ``scores`` (K / g,) = ||Gamma[:, group c]||_F / alpha, the dual constraint of every
    group (at the optimum: 1 for a nonzero group, at most 1 for a zero one)."""

    primal: float
    dual: float
    gap: float
    rel_gap: float
    scores: Tensor = field(repr=False, compare=False)


def duality_gap(stats: LassoStats, V: Tensor, lam: float) -> DualityGap:
    """The duality gap of V (see the module doc), in the units of F."""
    V = V.to(stats.G)
    VG = times_gram(stats, V)
    VC = float(torch.sum(V * stats.C))
    rho = stats.s - 2.0 * VC + float(torch.sum(VG * V))  # residual_energy, sharing V G
    ry = stats.s - VC  # (1/n) <R, Y - b>
    alpha = lam * stats.D / 2.0
    scores = group_norms(stats.C - VG, stats.group) / alpha
    worst = float(scores.max()) if stats.K else 0.0
    c_max = 1.0 / worst if worst > 0 else math.inf
    c = ry / rho if rho > 0 else c_max
    c = max(-c_max, min(c_max, c))
    dual_p = c * ry - 0.5 * c * c * rho if math.isfinite(c) else 0.0
    primal_p = 0.5 * rho + alpha * group_norm(V, stats.group)
    scale = 2.0 / stats.D  # back to the units of F
    primal, dual = primal_p * scale, dual_p * scale
    gap = max(primal - dual, 0.0)
    return DualityGap(primal=primal, dual=dual, gap=gap, rel_gap=gap / primal if primal > 0 else 0.0, scores=scores)


def rounded_width(width: int, multiple: int, groups: int) -> int:
    """``width`` rounded up to a multiple of ``multiple``, at most ``groups`` (every group)."""
    return min(groups, -(-width // multiple) * multiple)


def round_up_support(stats: LassoStats, V: Tensor, multiple: int) -> Tensor:
    """The groups (ascending indices) a refit of V keeps when widths must be multiples of
    ``multiple`` (kernels work on blocks of 8 or 16 channels): V's nonzero groups, then the zero
    groups j of largest residual correlation ||(C - V G)[:, group j]||_F, until there are
    ``rounded_width(k, multiple, K / g)``. That correlation is the dual score of the duality gap:
    along the regularisation path the group with the largest one is the next to enter the
    support as lambda decreases, and it is the one whose column most lowers the refit's MSE
    first (the MSE's gradient in a zero group is -2 (C - V G)_j / D)."""
    kept = active_groups(V, stats.group).to(stats.G.device)
    total = stats.K // stats.group
    want = rounded_width(len(kept), multiple, total)
    if want == len(kept):
        return kept
    scores = group_norms(stats.C - times_gram(stats, V.to(stats.G)), stats.group)
    scores[kept] = -math.inf
    added = torch.topk(scores, want - len(kept)).indices
    return torch.sort(torch.cat([kept, added])).values


def debias(stats: LassoStats, V: Tensor, rcond: float = 1e-10, groups: Tensor | None = None) -> Tensor:
    """Refit the columns S of V's nonzero groups (or of ``groups``, indices) by least squares
    without penalty: V_S G_SS = C_S (minimum-norm solution where G_SS is singular); the other
    groups are zero."""
    keep = (active_columns(V, stats.group) if groups is None else group_columns(groups, stats.group)).to(stats.G.device)
    out = torch.zeros_like(V, dtype=stats.G.dtype, device=stats.G.device)
    if len(keep):
        sub = stats.restrict(keep)
        out[:, keep] = torch.linalg.lstsq(sub.G, sub.C.T, rcond=rcond, driver="gelsd" if sub.G.is_cpu else None).solution.T
    return out.to(V.device)

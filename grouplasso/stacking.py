"""Several consumers of the same neurons as one multi-task lasso (coupled channels).

When m layers read the same m-channel tensor (every convolution reading a ResNet stage's
residual stream; a squeeze-excitation's squeeze and the projection reading one expansion),
removing channel c removes its columns from all of them, so they share one group per
channel. Consumer j has its own statistics (G_j, C_j, s_j) over its own samples (its own
output positions), D_j outputs and g_j columns per channel (kh*kw, or 1). The problem is

    min over V_1..V_m:  (1/m) sum_j rho_j(V_j) / s_j
                        + lam * sum_c || (alpha_j V_j[:, group c])_{j=1..m} ||_F,

rho_j(V_j) = s_j - 2 <V_j, C_j> + <V_j G_j, V_j> the residual energy of consumer j (its
mean squared reconstruction error per sample, s_j at V_j = 0). Each consumer counts by its
*relative* error, so layers of different output scales weigh alike, and
alpha_j = sqrt(D / (m s_j)), D = sum_j D_j, is the scale in which that holds.

It is an ordinary multi-task group lasso (``LassoStats``) in the scaled variables
V'_j = alpha_j V_j, stacked block-diagonally: rows of consumer j, then of j + 1; columns
channel-major with group size g = sum_j g_j (channel c's columns of consumer 1, then of
consumer 2, ...), and

    G = blockdiag_j(G_j) (within each channel pair),  C = blockdiag_j(alpha_j C_j),  s = sum_j alpha_j^2 s_j,

so MSE(V') = (s - 2 <V', C> + <V' G, V'>) / D is the objective above. Its off-block entries
(rows of consumer j, columns of consumer i != j) have no linear term and only add to the
quadratic and the penalty, so they are zero at every optimum and stay zero from a
block-diagonal start; every solver, certificate, lambda_max and refit of ``grouplasso``
applies unchanged. A single consumer is its own problem, unscaled (alpha = 1): exactly the
one-layer lasso.

The joint statistics carry that structure (``LassoStats.blocks``: each consumer's rows and
columns within a group), so that their products with G run block by block: stored densely, G
is mostly zeros (for the 9 consumers of a ResNet-56 stage about 60 times as many products as
the blocks' own), and the same iterates come out at a fraction of the cost.

What it leaves out: a coupled tensor usually also reaches the next addition directly (the
identity path of a residual block), which has no weight to refit; the problem reconstructs
every consumer's output, not what the identity carries on. Removing a channel from the whole
stream removes it from that path too, so judge the result by the network's accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from grouplasso.stats import Blocks, LassoStats


@dataclass(frozen=True)
class Stacking:
    """The layout of a stacked problem: per consumer its outputs D_j, its columns per
    channel g_j and its scale alpha_j; ``channels`` m. Joint row of (j, d): sum_{i<j} D_i + d;
    joint column of (c, j, u): c * g + sum_{i<j} g_i + u."""

    outputs: tuple[int, ...]
    groups: tuple[int, ...]
    scales: tuple[float, ...]
    channels: int

    @property
    def group(self) -> int:
        return sum(self.groups)

    @property
    def D(self) -> int:
        return sum(self.outputs)

    def rows(self, j: int) -> slice:
        start = sum(self.outputs[:j])
        return slice(start, start + self.outputs[j])

    def columns(self, j: int) -> Tensor:
        """Joint columns of consumer j's own columns c * g_j + u, in that order."""
        g, offset = self.group, sum(self.groups[:j])
        c = torch.arange(self.channels)[:, None]
        return (c * g + offset + torch.arange(self.groups[j])[None, :]).reshape(-1)

    @property
    def blocks(self) -> Blocks:
        """Per consumer its joint rows and its columns within every group (``LassoStats.blocks``)."""
        offsets = [sum(self.groups[:j]) for j in range(len(self.groups) + 1)]
        return tuple((self.rows(j), slice(offsets[j], offsets[j + 1])) for j in range(len(self.groups)))

    def join(self, parts: list[Tensor]) -> Tensor:
        """Per-consumer matrices (D_j, m * g_j) in their own layout -> the scaled joint (D, m * g)."""
        first = parts[0]
        out = torch.zeros(self.D, self.channels * self.group, dtype=first.dtype, device=first.device)
        for j, part in enumerate(parts):
            out[self.rows(j), self.columns(j).to(first.device)] = part.to(out.dtype) * self.scales[j]
        return out

    def split(self, V: Tensor) -> list[Tensor]:
        """The joint solution (D, m * g) -> each consumer's weight (D_j, m * g_j), unscaled."""
        return [V[self.rows(j)][:, self.columns(j).to(V.device)] / self.scales[j] for j in range(len(self.outputs))]


def stack_problems(stats: list[LassoStats], weights: list[Tensor]) -> tuple[LassoStats, Tensor, Stacking]:
    """The joint problem of consumers with statistics ``stats`` (each over the same ``channels``
    in groups of its own g_j) and trained weights ``weights`` (D_j, K_j): its ``LassoStats``
    (float64), the trained weights in its layout and the ``Stacking`` (see the module doc)."""
    channels = {s.groups for s in stats}
    if len(channels) != 1:
        raise ValueError(f"the consumers read different numbers of channels: {sorted(channels)}")
    m = channels.pop()
    for s, W in zip(stats, weights):
        if tuple(W.shape) != (s.D, s.K):
            raise ValueError(f"a weight of shape {tuple(W.shape)} does not fit statistics of ({s.D}, {s.K})")
    if len(stats) == 1:
        stacking = Stacking((stats[0].D,), (stats[0].group,), (1.0,), m)
        return stats[0], weights[0], stacking
    D = sum(s.D for s in stats)
    scales = tuple(math.sqrt(D / (len(stats) * s.s)) if s.s > 0 else 1.0 for s in stats)
    stacking = Stacking(tuple(s.D for s in stats), tuple(s.group for s in stats), scales, m)
    g, device = stacking.group, stats[0].G.device
    G = torch.zeros(m, g, m, g, dtype=torch.float64, device=device)
    offset = 0
    for s in stats:
        gj = s.group
        G[:, offset:offset + gj, :, offset:offset + gj] = s.G.to(device, torch.float64).reshape(m, gj, m, gj)
        offset += gj
    C = stacking.join([s.C.to(device, torch.float64) for s in stats])
    joint = LassoStats(G=G.reshape(m * g, m * g), C=C, s=sum(a * a * s.s for a, s in zip(scales, stats)),
                       n=min(s.n for s in stats), group=g, blocks=stacking.blocks)
    return joint, stacking.join([W.to(device, torch.float64) for W in weights]), stacking

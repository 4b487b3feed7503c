"""The proximal operator of the group-lasso penalty ``t * lam * sum_c ||V[:, group c]||_F``.

Group c is the ``group`` (g) consecutive columns c*g .. (c+1)*g - 1 of V (D, K); K must be a
multiple of g. With g = 1 a group is a column (one neuron of a Linear layer) and the
Frobenius norm is the column's Euclidean norm; with g = kh * kw a group is one input channel
of a convolution. Every function here takes g = 1 by default and then runs exactly the
one-column code it always ran (g > 1 views V as (D, K/g, g): free for a contiguous V).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check(K: int, group: int) -> None:
    if group < 1 or K % group:
        raise ValueError(f"group size {group} does not divide the {K} columns")


def group_norms(V: Tensor, group: int = 1) -> Tensor:
    """Frobenius norm of every group of columns: ``V`` (D, K) -> (K / group,).

    Summing squared rows is contiguous; ``torch.linalg.vector_norm(V, dim=0)`` reduces
    across rows and is up to 30 times slower for the D = 10 layers that matter most."""
    squares = V.square().sum(dim=0)
    if group == 1:
        return squares.sqrt()
    _check(V.shape[-1], group)
    return squares.view(-1, group).sum(dim=1).sqrt()


def group_columns(groups: Tensor, group: int = 1) -> Tensor:
    """The column indices of ``groups`` (M,): (M * group,), each group's columns in order,
    the groups in the order given."""
    if group == 1:
        return groups
    return (groups[:, None] * group + torch.arange(group, device=groups.device)).flatten()


def keep_groups(V: Tensor, groups: Tensor, group: int = 1) -> Tensor:
    """V (D, K) with every group not in ``groups`` zeroed (a new tensor)."""
    columns = group_columns(groups.to(V.device), group)
    out = torch.zeros_like(V)
    out[:, columns] = V[:, columns]
    return out


def active_groups(V: Tensor, group: int = 1) -> Tensor:
    """Indices (ascending) of the nonzero groups of ``V`` (D, K): the neurons (g = 1) or input
    channels (g > 1) a solution keeps."""
    return torch.nonzero(group_norms(V, group) > 0).flatten()


def active_columns(V: Tensor, group: int = 1) -> Tensor:
    """Indices (ascending) of every column of the nonzero groups of ``V`` (D, K); with
    g = 1 the nonzero columns."""
    return group_columns(active_groups(V, group), group)


def group_soft_threshold(W: Tensor, threshold: float | Tensor, group: int = 1) -> Tensor:
    """Group soft-threshold of the groups of columns of ``W`` (D, K), returns a new (D, K) tensor.

        V[:, group c] = max(0, 1 - threshold / ||W[:, group c]||_F) * W[:, group c]

    which is ``prox_{threshold * sum_c ||.||_F}(W)``: groups whose norm is at most
    ``threshold`` become exactly zero, the others shrink by exactly ``threshold`` in
    norm. Vectorised over groups; a zero group stays zero (no division by zero).
    """
    norms = group_norms(W, group)
    scale = torch.clamp(1.0 - threshold / torch.clamp(norms, min=torch.finfo(W.dtype).tiny), min=0.0)
    if group == 1:
        return W * scale
    return (W.reshape(W.shape[0], -1, group) * scale[:, None]).view(W.shape)

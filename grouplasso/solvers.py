"""Solvers of min_V F(V) = MSE(V) + lam * sum_c ||V[:, group c]||_F on sufficient statistics.

Groups are ``stats.group`` consecutive columns (one column when 1); the proximal step is the
group soft-threshold of each group's block (``grouplasso.prox``).

Every solver advances by ``step()`` (the unit a Lightning ``training_step`` takes), keeps
its iterate in ``V`` (D, K, float64, on the statistics' device) and its whole state in
``state_dict()``, so a run interrupted and resumed from a checkpoint takes exactly the
steps an uninterrupted run takes.

- ``fista``: accelerated proximal gradient (step 1/L, gradient-based adaptive restart).
- ``bcd``: cyclic block coordinate descent over the groups, each with its own step 1/L_c
  (celer / skglm's GroupBCD on the statistics); the inner solver of ``working_set`` for g > 1.
- ``paper_adam``: the paper's procedure: Adam (lr = mu) on the MSE, then the group
  soft-threshold with threshold mu * lam. No convergence guarantee; kept to compare.
- ``working_set`` (``auto``): see ``grouplasso.working_set``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from grouplasso.problem import (
    DualityGap, check_lambda, duality_gap, gradient, gram_product, group_norm, lipschitz, mse, times_gram,
)
from grouplasso.prox import active_groups, group_norms, group_soft_threshold
from grouplasso.stats import LassoStats


class Solver(ABC):
    """Base class: holds the problem (``stats``, ``lam``) and the iterate ``V``."""

    #: steps between duality-gap certificates worth their cost (one costs about a step of FISTA)
    certify_every = 10

    def __init__(self, stats: LassoStats, lam: float, V0: Tensor) -> None:
        if tuple(V0.shape) != (stats.D, stats.K):
            raise ValueError(f"V0 has shape {tuple(V0.shape)}, expected (D, K) = ({stats.D}, {stats.K})")
        self.stats, self.lam = stats, check_lambda(lam)
        self.V = V0.detach().to(stats.G).clone()
        self.iterations = 0
        # time.monotonic() after which a long step returns early (a time limit on the solve); None: never
        self.deadline: float | None = None
        self._certificate: tuple[int, DualityGap] | None = None

    @abstractmethod
    def step(self) -> None:
        """Advance the iterate ``V``."""

    @property
    def step_size(self) -> float:
        return math.nan

    def certificate(self) -> DualityGap:
        """The duality gap of the current ``V`` (computed once per iterate: D K^2 multiply-adds)."""
        if self._certificate is None or self._certificate[0] != self.iterations:
            self._certificate = (self.iterations, duality_gap(self.stats, self.V, self.lam))
        return self._certificate[1]

    def metrics(self) -> dict[str, float]:
        """Objective, MSE, penalty sum_c ||V[:, group c]||_F (without lam), active groups (neurons
        or channels) and step size of ``V``."""
        m, g = mse(self.stats, self.V), group_norm(self.V, self.stats.group)
        return {"objective": m + self.lam * g, "mse": m, "group_norm": g,
                "active": float(len(active_groups(self.V, self.stats.group))), "step_size": self.step_size}

    # Checkpointing: tensors and numbers, nothing else (torch.load(weights_only=True) reads it).
    def state_dict(self) -> dict[str, Any]:
        return {"V": self.V.cpu(), "iterations": self.iterations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.V = state["V"].to(self.stats.G)
        self.iterations = int(state["iterations"])
        self._certificate = None


class FISTA(Solver):
    """Accelerated proximal gradient with step 1/L and adaptive restart (O'Donoghue & Candes 2015).

        V+ = prox_{lam/L}(Z - grad(Z) / L),   t+ = (1 + sqrt(1 + 4 t^2)) / 2,
        Z+ = V+ + (t - 1)/t+ (V+ - V);   restart (t = 1, Z = V+) when <Z - V+, V+ - V> > 0.
    One ``step`` is one gradient evaluation, D K^2 multiply-adds.
    """


    def __init__(self, stats: LassoStats, lam: float, V0: Tensor) -> None:
        super().__init__(stats, lam, V0)
        self.L = lipschitz(stats)
        self.Z = self.V.clone()
        self.t = 1.0

    @property
    def step_size(self) -> float:
        return 1.0 / self.L if self.L > 0 else math.inf

    def step(self) -> None:
        if self.L == 0:  # all inputs are zero: only V = 0 is optimal
            self.V = torch.zeros_like(self.V)
            self.iterations += 1
            return
        V_new = group_soft_threshold(self.Z - gradient(self.stats, self.Z) / self.L, self.lam / self.L, self.stats.group)
        if torch.sum((self.Z - V_new) * (V_new - self.V)) > 0:
            self.t, self.Z = 1.0, V_new.clone()
        else:
            t_new = (1.0 + math.sqrt(1.0 + 4.0 * self.t * self.t)) / 2.0
            self.Z = V_new + ((self.t - 1.0) / t_new) * (V_new - self.V)
            self.t = t_new
        self.V = V_new
        self.iterations += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "Z": self.Z.cpu(), "t": self.t, "L": self.L}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.Z, self.t, self.L = state["Z"].to(self.stats.G), float(state["t"]), float(state["L"])


class PaperAdam(Solver):
    """The paper's procedure: one Adam step (lr = ``lr``, i.e. mu) on the full-batch MSE
    gradient, then V <- group_soft_threshold(V, lr * lam) (per group of ``stats.group`` columns)."""


    def __init__(self, stats: LassoStats, lam: float, V0: Tensor, lr: float = 0.07) -> None:
        super().__init__(stats, lam, V0)
        if not lr > 0:
            raise ValueError(f"the paper's step size mu (model.lr) must be positive, got {lr}")
        self.lr = float(lr)
        self._param = torch.nn.Parameter(self.V)
        self._adam = torch.optim.Adam([self._param], lr=self.lr)

    @property
    def step_size(self) -> float:
        return self.lr

    @torch.no_grad()
    def step(self) -> None:
        self._param.grad = gradient(self.stats, self._param.data)
        self._adam.step()
        self._param.data.copy_(group_soft_threshold(self._param.data, self.lr * self.lam, self.stats.group))
        self.V = self._param.data
        self.iterations += 1

    def state_dict(self) -> dict[str, Any]:
        adam = self._adam.state_dict()["state"].get(0, {})
        return {**super().state_dict(), "adam": {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in adam.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._param = torch.nn.Parameter(self.V)
        self._adam = torch.optim.Adam([self._param], lr=self.lr)
        if state["adam"]:
            moved = {k: (v.to(self.stats.G) if torch.is_tensor(v) and v.ndim else v) for k, v in state["adam"].items()}
            self._adam.load_state_dict({"state": {0: moved}, "param_groups": self._adam.state_dict()["param_groups"]})
        self.V = self._param.data


class BCD(Solver):
    """Cyclic block coordinate descent over the groups (celer's and skglm's GroupBCD, on the statistics).

    For every group c in turn (columns S_c, g = ``stats.group`` of them):

        V_c <- prox_{lam / L_c}(V_c - grad_c / L_c),   grad_c = 2 (P[:, S_c] - C[:, S_c]) / D,
        L_c = 2 lambda_max(G[S_c, S_c]) / D,

    with P = V G (D, K) kept up to date as groups change. FISTA's single step 1/L is set by the
    largest eigenvalue of the whole G, which for nonnegative (ReLU) features is the common
    positive direction of all columns and is tens of times any group's own L_c; here each group
    moves with the step of its own g x g diagonal block, and its update already sees the groups
    updated before it. A group whose inputs are all zero (L_c = 0) is held at zero, optimal for it.

    One ``step`` is one epoch over all groups and costs about what one FISTA step costs (D K^2
    multiply-adds at most, D K times the nonzero columns in practice), provided P is not
    rewritten after every group (a (D, g) x (g, K) product per group reads and writes all of P:
    memory-bound). So the groups are swept in chunks of about ``chunk`` columns: within a chunk
    only its own columns of V G - C are updated after each group (through the chunk's diagonal
    block of G), and P once per chunk, by one product with the rows of G of the groups that
    changed. This is the same cyclic BCD, the arithmetic reordered (and for a stacked problem,
    ``stats.blocks``, each product is taken block by block: ``grouplasso.problem.gram_product``).
    On the CPU a zero group whose gradient is within the threshold (it would stay zero: most of
    a working set) costs one norm; on a GPU every group is updated, so that the loop never waits
    for the device (the loop over groups issues a dozen small kernels per group, so on a GPU
    FISTA's one large product per step is the better inner solver; see ``grouplasso.working_set``).

    ``anderson`` > 0: every ``anderson`` epochs, Anderson extrapolation (as skglm's) from the last
    ``anderson`` + 1 iterates: the affine combination of them whose successive differences are
    smallest, kept if it lowers F.
    On the Gram of a convolution's patches it cuts the epochs two- to three-fold
    (benchmarks/conv_solver_inner.py).

    The state is V, P and the iterates kept for the extrapolation (P is saved rather than
    recomputed, so that a resumed run is bitwise the uninterrupted one); ``step_size`` is the
    mean over groups of 1/L_c (nan with no group).
    """

    def __init__(self, stats: LassoStats, lam: float, V0: Tensor, chunk: int = 128, anderson: int = 10) -> None:
        super().__init__(stats, lam, V0)
        if chunk < 1 or anderson < 0:
            raise ValueError(f"need chunk >= 1 column and anderson >= 0, got {chunk} and {anderson}")
        self.anderson = anderson
        self._history: Tensor | None = None  # (anderson + 1, D, K): the last epochs' iterates
        self._stored = 0
        g, groups = stats.group, stats.groups
        blocks = stats.G.reshape(groups, g, groups, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (groups, g, g)
        top = blocks[:, 0, 0] if g == 1 else torch.linalg.eigvalsh(blocks)[:, -1]
        self.L = (2.0 / stats.D) * torch.clamp(top, min=0.0)
        live = self.L > 0
        if not bool(live.all()):  # groups of dead inputs: zero is optimal and G's rows are zero
            self.V.view(stats.D, groups, g)[:, ~live] = 0.0
        self.P = gram_product(stats, self.V)
        # On the CPU, which zero groups to screen (a Python list, read without synchronising);
        # on a GPU every group is updated, so that no group waits for the device.
        self._screen: list[bool] | None = None
        self._rescreen()
        # A stacked problem's products are per consumer: a chunk counts its columns per consumer
        # (the widest g_j), so that the updates of P stay of about ``chunk`` columns' rank, not of
        # one group's (g = 73 columns of 9 consumers: P rewritten after every group).
        width = g if stats.blocks is None else max(columns.stop - columns.start for _, columns in stats.blocks)
        per_chunk = max(1, chunk // width)
        inverse = [1.0 / L if L > 0 else 0.0 for L in self.L.tolist()]
        self._chunks = [[(c, inverse[c]) for c in range(first, min(first + per_chunk, groups)) if inverse[c] > 0]
                        for first in range(0, groups, per_chunk)]
        self._chunks = [chunk for chunk in self._chunks if chunk]

    def _rescreen(self) -> None:
        if self.stats.G.device.type == "cpu":
            self._screen = (group_norms(self.V, self.stats.group) == 0).tolist()

    @property
    def step_size(self) -> float:
        """The mean over groups of the block steps 1/L_c (nan when no group has inputs)."""
        live = self.L[self.L > 0]
        return float((1.0 / live).mean()) if len(live) else math.nan

    def step(self) -> None:
        V, P, C, g, stats = self.V, self.P, self.stats.C, self.stats.group, self.stats
        scale, lam = 2.0 / self.stats.D, self.lam
        stay = lam / scale  # a zero group stays zero when ||(P - C)[:, S_c]||_F <= lam D / 2
        screen = self._screen
        for chunk in self._chunks:
            first, last = chunk[0][0], chunk[-1][0]
            a, b = first * g, (last + 1) * g  # the chunk's columns
            residual = P[:, a:b] - C[:, a:b]  # (V G - C) on the chunk, kept current
            changed: list[tuple[int, Tensor]] = []
            for c, inv_L in chunk:
                here = slice(c * g - a, (c + 1) * g - a)
                part = residual[:, here]
                if screen is not None and screen[c] and float(torch.linalg.vector_norm(part)) <= stay:
                    continue  # zero, and its gradient step would be thresholded back to zero: skip the prox
                old = V[:, c * g:(c + 1) * g]
                new = group_soft_threshold(torch.add(old, part, alpha=-scale * inv_L), lam * inv_L, g)
                delta = new - old
                old.copy_(new)
                if c != last:  # the chunk's later groups read it (through the chunk's diagonal block of G)
                    gram_product(stats, delta, slice(c, c + 1), out=residual, into=slice(first, last + 1))
                changed.append((c, delta))
                if screen is not None:
                    screen[c] = not bool(new.any())
            # each changed group's step, through its rows of G (a group changes once per epoch);
            # for a stacked problem block by block, a group's step touching its consumers' rows only
            if len(changed) == 1:
                c, delta = changed[0]
                gram_product(stats, delta, slice(c, c + 1), out=P)
            elif changed:
                groups = torch.tensor([c for c, _ in changed], device=P.device)
                gram_product(stats, torch.cat([delta for _, delta in changed], dim=1), groups, out=P)
        self.iterations += 1
        if self.anderson:
            self._extrapolate()

    def _objective(self, V: Tensor, P: Tensor) -> float:
        return (self.stats.s - 2.0 * float(torch.sum(V * self.stats.C)) + float(torch.sum(P * V))) / self.stats.D \
            + self.lam * group_norm(V, self.stats.group)

    def _extrapolate(self) -> None:
        """Anderson extrapolation on epochs (skglm): from the last ``anderson`` + 1 iterates, the
        affine combination whose successive differences are smallest; kept if it lowers F. Its
        P = V G is computed afresh (one product, every ``anderson`` epochs), not combined from the
        iterates' P: the coefficients grow large as the iterates converge, and so would the
        rounding errors of the combination, which the following epochs would then descend on."""
        if self._history is None:
            self._history = self.V.new_empty(self.anderson + 1, *self.V.shape)
        self._history[self._stored].copy_(self.V)
        self._stored += 1
        if self._stored <= self.anderson:
            return
        history, self._stored = self._history, 0
        U = (history[1:] - history[:-1]).flatten(1)
        M = U @ U.T
        try:
            z = torch.linalg.solve(M, torch.ones(len(M), dtype=M.dtype, device=M.device))
        except RuntimeError:  # singular: the iterates have stopped moving
            return
        if not bool(torch.isfinite(z).all()) or float(z.sum()) == 0.0:
            return
        V = torch.tensordot(z / z.sum(), history[1:], dims=1)
        P = times_gram(self.stats, V)
        if self._objective(V, P) < self._objective(self.V, self.P):
            self.V, self.P = V, P
            self._rescreen()

    def state_dict(self) -> dict[str, Any]:
        history = self._history[:self._stored] if self._history is not None else self.V.new_zeros(0, *self.V.shape)
        return {**super().state_dict(), "P": self.P.cpu(), "history": history.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.P = state["P"].to(self.stats.G)
        history = state["history"].to(self.stats.G)
        self._history, self._stored = None, len(history)
        if self._stored:
            self._history = self.V.new_empty(self.anderson + 1, *self.V.shape)
            self._history[:self._stored] = history
        self._rescreen()

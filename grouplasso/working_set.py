"""The default solver: working sets, each solved by accelerated proximal gradient on the Gram.

Why: the ReLU features of a trained layer are strongly correlated, so proximal gradient on
all K columns converges slowly (its rate is set by the conditioning of G) and spends
D K^2 multiply-adds per step on columns that end at zero. Most columns are certified
zero early by the dual: at the optimum every zero column k has score
||(C - V G)[:, k]|| / alpha <= 1 (``grouplasso.problem.duality_gap``). Like celer and
skglm we therefore solve a sequence of small problems on a *working set* W (the nonzero
columns plus the columns that violate the dual constraint most, twice as many as are
nonzero), each to a gap of ``inner_ratio`` times the current full gap, and grow W until
the full problem's gap certifies the solution. Unlike them we work on (G, C, s), so a
working-set iteration costs D |W|^2, independent of the number of samples, and the
inner solver is the same vectorised FISTA (``grouplasso.solvers.FISTA``) on
``stats.restrict(W)``: one matrix product and one group soft-threshold per iteration,
equally at home on a GPU.

One ``step`` is one outer iteration: certify V on the full problem, choose W, solve the
subproblem. V changes only through these steps, so the state is V alone and a resumed
run repeats exactly the steps of an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from grouplasso.problem import duality_gap
from grouplasso.prox import group_norms
from grouplasso.solvers import FISTA, Solver
from grouplasso.stats import LassoStats


class WorkingSet(Solver):
    """Working-set multi-task lasso solver (see the module doc).

    Args:
        min_size: smallest working set (columns).
        grow: the working set holds ``grow`` times as many columns as V has nonzero ones.
        inner_ratio: each subproblem is solved to a gap of ``inner_ratio`` times the full gap.
        inner_check_every: inner iterations between subproblem gap evaluations.
        max_inner: inner iterations per step at most (a step always returns in bounded time).
    """

    certify_every = 1  # every step ends with a certificate anyway

    def __init__(self, stats: LassoStats, lam: float, V0: Tensor, min_size: int = 100, grow: float = 2.0,
                 inner_ratio: float = 0.3, inner_check_every: int = 10, max_inner: int = 20_000) -> None:
        super().__init__(stats, lam, V0)
        if min_size < 1 or grow < 1 or not 0 < inner_ratio < 1 or inner_check_every < 1 or max_inner < 1:
            raise ValueError("need min_size >= 1, grow >= 1, 0 < inner_ratio < 1, inner_check_every >= 1, max_inner >= 1")
        self.min_size, self.grow, self.inner_ratio = min_size, grow, inner_ratio
        self.inner_check_every, self.max_inner = inner_check_every, max_inner
        self.working_set_size = 0
        self.inner_iterations = 0
        self.inner_step_size = math.nan

    def working_set(self) -> Tensor:
        """Indices (ascending) of the columns of the next subproblem: every nonzero column of V,
        then the zero columns with the largest dual scores."""
        scores = self.certificate().scores.clone()
        active = group_norms(self.V) > 0
        size = min(self.stats.K, max(self.min_size, math.ceil(self.grow * int(active.sum()))))
        scores[active] = math.inf
        return torch.sort(torch.topk(scores, size, sorted=False).indices).values

    def step(self) -> None:
        full_gap = self.certificate().gap
        columns = self.working_set()
        sub, lam, target = self.stats.restrict(columns), self.lam, self.inner_ratio * full_gap
        start = self.V[:, columns]
        basis = None
        if sub.D > 2 * len(columns):
            # Many outputs, few columns (a 4096-wide layer): the subproblem's optimum lies in the
            # span of C's columns (a component of V outside it only adds to the MSE and the
            # norms), and column norms are invariant under an orthonormal basis Q of that span.
            # So solve for A in V = Q A with C = Q R: R (w, w) replaces C (D, w), exactly, and an
            # inner step costs w^3 instead of D w^2. The /D of the MSE becomes /w, so lambda and
            # the gap target scale by D / w to keep the same minimiser and certificate.
            basis, R = torch.linalg.qr(sub.C)
            scale = sub.D / len(columns)
            sub, lam, target = LassoStats(sub.G, R, sub.s, sub.n), lam * scale, target * scale
            start = basis.T @ start  # the projection can only lower the objective
        inner = FISTA(sub, lam, start)
        for i in range(1, self.max_inner + 1):
            inner.step()
            if i % self.inner_check_every == 0 and duality_gap(sub, inner.V, lam).gap <= target:
                break
        V = torch.zeros_like(self.V)
        V[:, columns] = inner.V if basis is None else basis @ inner.V
        self.V = V
        self.working_set_size, self.inner_iterations, self.inner_step_size = len(columns), i, inner.step_size
        self.iterations += 1

    @property
    def step_size(self) -> float:
        """The inner FISTA's step 1/L of the last working set."""
        return self.inner_step_size

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "working_set": float(self.working_set_size),
                "inner_iterations": float(self.inner_iterations)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "working_set_size": self.working_set_size,
                "inner_iterations": self.inner_iterations, "inner_step_size": self.inner_step_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.working_set_size = int(state["working_set_size"])
        self.inner_iterations = int(state["inner_iterations"])
        self.inner_step_size = float(state["inner_step_size"])

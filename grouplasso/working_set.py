"""The default solver: working sets, each solved by accelerated proximal gradient on the Gram.

Why: the ReLU features of a trained layer are strongly correlated, so proximal gradient on
all K columns converges slowly (its rate is set by the conditioning of G) and spends
D K^2 multiply-adds per step on columns that end at zero. Most columns are certified
zero early by the dual: at the optimum every zero column k has score
||(C - V G)[:, k]|| / alpha <= 1 (``grouplasso.problem.duality_gap``). Like celer and
skglm we therefore solve a sequence of small problems on a *working set* W (the nonzero
columns plus the columns that violate the dual constraint most, twice as many as are
nonzero), each to a gap of ``inner_ratio`` times the current full gap, and grow W until
the full problem's gap certifies the solution. With groups of g = ``stats.group`` columns
everything above is counted in groups: the scores are per group, W holds whole groups (its
columns are those groups' columns, in group order) and the subproblem keeps the group size;
only the test D > 2 |W| for the span reduction below counts columns. Unlike them we work on
(G, C, s), so a working-set iteration costs D |W|^2, independent of the number of samples.

The inner solver runs on ``stats.restrict(W)``. For g = 1 (Linear layers) it is the
vectorised FISTA (``grouplasso.solvers.FISTA``): one matrix product and one group
soft-threshold per iteration, equally at home on a GPU. For g > 1 (convolutions) on the CPU
it is block coordinate descent over the groups with Anderson extrapolation
(``grouplasso.solvers.BCD``), as in celer and skglm: FISTA's single step 1/lambda_max(G) is
tens of times smaller than the step each group's own g x g block allows, and on AlexNet's
conv5 statistics BCD needs three to five times fewer epochs than FISTA iterations, of about
the same cost (benchmarks/conv_solver_inner.py). BCD loops over groups in Python, a dozen
small kernels each, so on a GPU, where FISTA's one large product per step is nearly free,
``inner="auto"`` keeps FISTA (an estimate, not measured). Either is stopped on the
subproblem's duality gap.

One ``step`` is one outer iteration: certify V on the full problem, choose W, solve the
subproblem. V changes only through these steps, so the state is V alone and a resumed
run repeats exactly the steps of an uninterrupted one. A step at a small lambda can take
tens of seconds (hundreds of columns, thousands of inner iterations); past the solver's
``deadline`` (a time limit on the solve) it returns after the inner iteration under way, with
the iterate reached so far.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from grouplasso.problem import duality_gap
from grouplasso.prox import group_columns, group_norms
from grouplasso.solvers import BCD, FISTA, Solver
from grouplasso.stats import LassoStats


class WorkingSet(Solver):
    """Working-set multi-task lasso solver (see the module doc).

    Args:
        min_size: smallest working set, in columns: at least ``min_size / stats.group`` groups (and at
            least one), so that a convolution's channels of 9 or 73 columns (a residual stream read by
            several layers) start from a few groups, as a Linear layer starts from 100 columns.
        grow: the working set holds ``grow`` times as many groups as V has nonzero ones.
        inner_ratio: each subproblem is solved to a gap of ``inner_ratio`` times the full gap.
        inner_check_every: FISTA iterations between subproblem gap evaluations.
        max_inner: inner iterations (FISTA iterations or BCD epochs) per step at most (a step
            always returns in bounded time).
        inner: the subproblem solver: ``"fista"``, ``"bcd"`` or ``"auto"`` (BCD for g > 1 on the
            CPU; FISTA for g = 1, and on a GPU).
        bcd_check_every: BCD epochs between subproblem gap evaluations.
        anderson: BCD's Anderson extrapolation memory in epochs (0: none; see ``BCD``).

    ``metrics()["inner_iterations"]`` counts the last step's FISTA iterations or BCD epochs;
    ``step_size`` is FISTA's 1/L or, for BCD, the mean over the working set's groups of 1/L_c.
    """

    certify_every = 1  # every step ends with a certificate anyway

    def __init__(self, stats: LassoStats, lam: float, V0: Tensor, min_size: int = 100, grow: float = 2.0,
                 inner_ratio: float = 0.3, inner_check_every: int = 10, max_inner: int = 20_000,
                 inner: str = "auto", bcd_check_every: int = 5, anderson: int = 10) -> None:
        super().__init__(stats, lam, V0)
        if min_size < 1 or grow < 1 or not 0 < inner_ratio < 1 or inner_check_every < 1 or max_inner < 1 \
                or bcd_check_every < 1 or anderson < 0:
            raise ValueError("need min_size >= 1, grow >= 1, 0 < inner_ratio < 1, inner_check_every >= 1, "
                             "max_inner >= 1, bcd_check_every >= 1, anderson >= 0")
        if inner not in ("auto", "fista", "bcd"):
            raise ValueError(f"inner solver must be 'auto', 'fista' or 'bcd', got {inner!r}")
        self.min_size, self.grow, self.inner_ratio = min_size, grow, inner_ratio
        self.inner_check_every, self.max_inner = inner_check_every, max_inner
        if inner == "auto":
            inner = "bcd" if stats.group > 1 and stats.G.device.type == "cpu" else "fista"
        self.inner = inner
        self.bcd_check_every, self.anderson = bcd_check_every, anderson
        self.working_set_size = 0
        self.inner_iterations = 0
        self.inner_step_size = math.nan

    def working_set(self) -> Tensor:
        """Indices (ascending) of the groups of the next subproblem (the columns when
        ``stats.group`` = 1): every nonzero group of V, then the zero groups with the largest
        dual scores."""
        scores = self.certificate().scores.clone()
        active = group_norms(self.V, self.stats.group) > 0
        smallest = max(1, self.min_size // self.stats.group)
        size = min(self.stats.groups, max(smallest, math.ceil(self.grow * int(active.sum()))))
        scores[active] = math.inf
        return torch.sort(torch.topk(scores, size, sorted=False).indices).values

    def step(self) -> None:
        full_gap = self.certificate().gap
        groups = self.working_set()
        columns = group_columns(groups, self.stats.group)
        sub, lam, target = self.stats.restrict(columns), self.lam, self.inner_ratio * full_gap
        start = self.V[:, columns]
        basis = None
        # A stacked problem (``stats.blocks``) skips the reduction: one QR of its C mixes the
        # consumers' rows, so the block structure, and with it the block products, would be lost.
        # (A QR per consumer block would keep both, exactly; but the reduction applies to working
        # sets of a few groups only, where the block products, sum_j D_j w_j^2 multiply-adds, are
        # already cheap: a ResNet-56 stage's 9 consumers on 2 groups, 0.17 M against w^3 = 3.1 M.)
        if sub.D > 2 * len(columns) and sub.blocks is None:
            # Many outputs, few columns (a 4096-wide layer): the subproblem's optimum lies in the
            # span of C's columns (a component of V outside it only adds to the MSE and the
            # norms), and column norms (so group Frobenius norms) are invariant under an
            # orthonormal basis Q of that span.
            # So solve for A in V = Q A with C = Q R: R (w, w) replaces C (D, w), exactly, and an
            # inner step costs w^3 instead of D w^2. The /D of the MSE becomes /w, so lambda and
            # the gap target scale by D / w to keep the same minimiser and certificate.
            basis, R = torch.linalg.qr(sub.C)
            scale = sub.D / len(columns)
            sub, lam, target = LassoStats(sub.G, R, sub.s, sub.n, sub.group), lam * scale, target * scale
            start = basis.T @ start  # the projection can only lower the objective
        # The span reduction serves BCD as it serves FISTA (an epoch costs D w^2 too): A's groups
        # have V's Frobenius norms and G, so the blocks L_c, are unchanged.
        if self.inner == "bcd":
            inner, check_every = BCD(sub, lam, start, anderson=self.anderson), self.bcd_check_every
        else:
            inner, check_every = FISTA(sub, lam, start), self.inner_check_every
        for i in range(1, self.max_inner + 1):
            inner.step()
            if i % check_every == 0 and duality_gap(sub, inner.V, lam).gap <= target:
                break
            if self.deadline is not None and time.monotonic() >= self.deadline:
                break
        V = torch.zeros_like(self.V)
        V[:, columns] = inner.V if basis is None else basis @ inner.V
        self.V = V
        self.working_set_size, self.inner_iterations, self.inner_step_size = len(groups), i, inner.step_size
        self.iterations += 1

    @property
    def step_size(self) -> float:
        """The inner solver's step on the last working set: FISTA's 1/L, BCD's mean 1/L_c."""
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

"""The sparsest optimal solution of ``min sum_k ||v_k|| s.t. V X = Y`` (paper's Fig. 5).

For X (K, N) and Y (D, N): the smallest number of nonzero columns among *all* optimal V.
Two methods that give the same answer:

* :func:`sparsest_exhaustive`, the published approach: solve the problem restricted to
  every support T of every size N..K (a new cvxpy problem each time) and, among the
  supports whose optimum is within ``tol`` of the global optimum, take the smallest
  number of nonzero columns. 2^K - sum_{s<N} C(K, s) solves per trial (1981 for K = 11).

* :func:`sparsest_fast`: the optimal set is small and known from one solve. With Lambda a
  dual optimum, every optimal V has v_k = c_k u_k, u_k = Lambda x_k, c >= 0, supported on
  S = {k : ||u_k|| = 1}, and sum_k c_k u_k x_k^T = Y; conversely every such c is optimal
  (its objective sum_k c_k equals <Lambda, Y>). So the optimal solutions are exactly the
  nonnegative solutions c of the linear system  sum_{k in S} c_k M_k = Y,  M_k = u_k x_k^T,
  and the sparsest is found by trying subsets T of S by increasing size with a
  nonnegative least-squares test (microseconds). A subset that passes is confirmed by the
  same restricted solve and the same ``tol`` as the exhaustive method, so "reaches the
  optimum" is decided identically; the test only prunes (it provably never rejects a
  support the exhaustive search accepts). |S| is about the support size (<= N*D), not K.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from experiments.min_norm import active_columns, dual_correlations, solve_min_norm

#: Restricted optima within this (absolute) distance of the global optimum count as optimal.
OPTIMUM_TOL = 1e-6


@dataclass(frozen=True)
class SparsestResult:
    """sparsest: fewest nonzero columns of an optimal solution (-1 if none was found);
    support: the columns of one such solution; optimum: the global optimum;
    solves: cvxpy solves used (the full problem included); solution_nonzero: nonzero columns
    of the solution of the full problem (``solve_min_norm``), for comparison."""

    sparsest: int
    support: tuple[int, ...]
    optimum: float
    solves: int
    solution_nonzero: int


def _restricted_count(X: np.ndarray, Y: np.ndarray, T: tuple[int, ...], optimum: float, tol: float,
                      reuse: bool) -> int | None:
    """Nonzero columns of the optimum restricted to the rows T of X, if it reaches ``optimum + tol``."""
    sol = solve_min_norm(X[list(T)], Y, reuse=reuse)
    if not sol.ok or sol.value > optimum + tol:
        return None
    return int(active_columns(sol.V).sum())


def sparsest_exhaustive(X: np.ndarray, Y: np.ndarray, tol: float = OPTIMUM_TOL, reuse: bool = False) -> SparsestResult:
    """The published brute force: every support of size N..K, one cvxpy problem each.

    X: (K, N), Y: (D, N). ``reuse=False`` (default) builds each problem anew, as published;
    ``True`` solves compiled parametrised problems (the same answers, faster).
    """
    K, N = X.shape
    full = solve_min_norm(X, Y, reuse=reuse)
    solves, best, best_support = 1, None, ()
    for size in range(N, K + 1):
        for T in itertools.combinations(range(K), size):
            solves += 1
            count = _restricted_count(X, Y, T, full.value, tol, reuse)
            if count is not None and (best is None or count < best):
                best, best_support = count, T
    return SparsestResult(-1 if best is None else best, best_support, full.value, solves, int(full.active().sum()))


def sparsest_fast(X: np.ndarray, Y: np.ndarray, tol: float = OPTIMUM_TOL, dual_slack: float = 1e-3) -> SparsestResult:
    """Solve once, then enumerate only supports inside the dual's (near-)equicorrelation set.

    X: (K, N), Y: (D, N). Candidates are the columns with ||Lambda x_k|| >= 1 - dual_slack.
    A support using a column outside them is within ``tol`` of the optimum only if that
    column's weight is at most tol / dual_slack (= 1e-3): by weak duality the excess of any
    feasible V_T over the optimum is at least sum_k ||v_k|| (1 - ||Lambda x_k||).

    The screen never rejects a support that the exhaustive method accepts. If V_T is
    feasible and within ``tol`` of the optimum, then with c_k = ||v_k|| and unit
    u^_k = Lambda x_k / ||Lambda x_k||:  sum_k (c_k - v_k.u^_k) <= tol / (1 - dual_slack), so
    ||Y - sum_k c_k u^_k x_k^T||_F <= sqrt(2 c_max tol / (1 - dual_slack)) ||X_T||_F, and
    nonnegative least squares on {u^_k x_k^T : k in T} finds a residual at most that. A
    false pass costs one restricted solve, whose value decides exactly as in
    :func:`sparsest_exhaustive`. The search starts at rank(Y), a lower bound on any
    support (Y = V_T X_T).
    """
    full = solve_min_norm(X, Y)
    solves = 1
    if not full.ok:
        return SparsestResult(-1, (), full.value, solves, -1)
    corr = dual_correlations(X, full.dual)
    S = np.flatnonzero((corr >= 1.0 - dual_slack) | active_columns(full.V))
    U = full.dual @ X[S].T                                    # (D, |S|): u_k = Lambda x_k
    U = U / np.linalg.norm(U, axis=0)
    M = np.einsum("dj,jn->dnj", U, X[S]).reshape(-1, len(S))  # column j: vec(u^_j x_j^T)
    y = Y.reshape(-1)
    c_max = full.value + tol
    screen = 1.01 * np.sqrt(2.0 * c_max * tol / (1.0 - dual_slack)) * np.linalg.norm(X[S]) + 1e-9 * np.linalg.norm(y)
    start = max(1, int(np.linalg.matrix_rank(Y)))
    for size in range(start, len(S) + 1):
        best, best_support = None, ()
        for local in itertools.combinations(range(len(S)), size):
            _, residual = nnls(M[:, local], y)
            if residual > screen:
                continue
            T = tuple(int(k) for k in S[list(local)])
            solves += 1
            count = _restricted_count(X, Y, T, full.value, tol, reuse=True)
            if count is not None and (best is None or count < best):
                best, best_support = count, T
        if best is not None:
            return SparsestResult(best, best_support, full.value, solves, int(full.active().sum()))
    # Nothing passed (numerical trouble): the certified basic solution is optimal, so its
    # support size is an upper bound; report it rather than nothing.
    support = tuple(int(k) for k in np.flatnonzero(active_columns(full.V)))
    return SparsestResult(len(support), support, full.value, solves, len(support))

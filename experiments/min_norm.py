"""The exact multi-task-lasso interpolation problem: the one place where it is solved.

    minimise_V  sum_k ||v_k||_2   subject to   V X = Y,

with X (K, N) the K features of N samples (row k, written x_k in R^N, is feature k over
the samples), Y (D, N) the targets and V (D, K); v_k = V[:, k] is the weight column of
feature k (an output-weight vector of neuron k). Every experiment of Figs. 3-5
(histograms, exhaustive and fast enumeration) calls :func:`solve_min_norm`.

Optimality (KKT), which the certificate below and the fast enumeration use: with
Lambda (D, N) the multiplier of V X = Y,

    ||Lambda x_k|| <= 1 for every k,   and   v_k = c_k Lambda x_k with c_k = ||v_k|| >= 0,

and c_k > 0 only where ||Lambda x_k|| = 1. Hence V X = Lambda G(c) = Y with
G(c) = sum_k c_k x_k x_k^T (N, N), and the optimum equals <Lambda, Y> = sum_k c_k.

Why a certificate: cvxpy's interior-point answer has no exact zeros. Its "zero" columns
sit at about mu / (1 - ||Lambda x_k||), in the units of the problem, so columns that are
almost equicorrelated stay above the paper's absolute threshold 1e-7: we saw 180
"nonzero" columns for a Fig. 3 solution that has 171, and about 50 for 31 on Fig. 4's
targets Y = A X, whose entries are some 100 times larger. Where the optimum is not unique
(duplicated features, say) it returns a point inside the optimal face, which uses every
column that some optimal solution can use. So :func:`solve_min_norm` also computes a
*basic* optimal solution with exact zeros, by an active-set Newton method on the KKT
system started from the interior-point answer, and keeps it only if the KKT conditions
certify it (V X = Y to 1e-9 ||Y||, ||Lambda x_k|| = 1 on the support and <= 1 + 1e-9 off
it, c > 0). Its nonzero columns have linearly independent matrices v_k x_k^T, which is
where the width bounds come from (:func:`width_bounds`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cvxpy as cp
import numpy as np

#: A column counts as nonzero (an active neuron) above this norm (the paper's 1e-7).
NONZERO_TOL = 1e-7
#: One solver everywhere, so that every experiment is reproducible and comparable.
SOLVER = "CLARABEL"
#: KKT tolerances of the certificate (relative to 1 for the dual norms, to ||Y|| for V X = Y).
_KKT_TOL = 1e-9
_NEWTON_TOL = 1e-10  # Newton stalls near 1e-16 * cond(G), which reaches 1e-11 for cond(G) ~ 1e6


@dataclass(frozen=True)
class MinNormSolution:
    """A solution of ``min sum_k ||v_k|| s.t. V X = Y``.

    V: (D, K) the certified basic optimal solution (exact zeros) when ``certified``, else
       the solver's. value: sum_k ||V[:, k]||_2. dual: (D, N) multiplier Lambda, signed so
       that <Lambda, Y> = value. status: cvxpy's status ("optimal" unless infeasible or
       failed). V_solver: (D, K) the interior-point solution as cvxpy returned it (what the
       published scripts counted). certified: whether the KKT conditions hold for V.
    """

    V: np.ndarray
    value: float
    dual: np.ndarray
    status: str
    V_solver: np.ndarray
    certified: bool

    @property
    def ok(self) -> bool:
        """Solved: cvxpy says optimal, or the KKT conditions certify V."""
        return self.status == cp.OPTIMAL or self.certified

    def active(self, tol: float = NONZERO_TOL) -> np.ndarray:
        """(K,) boolean mask of the columns of V with ||v_k|| > tol."""
        return active_columns(self.V, tol)


def active_columns(V: np.ndarray, tol: float = NONZERO_TOL) -> np.ndarray:
    """(K,) mask of the columns of ``V`` (D, K) whose Euclidean norm exceeds ``tol``."""
    return np.linalg.norm(V, axis=0) > tol


def dual_correlations(X: np.ndarray, dual: np.ndarray) -> np.ndarray:
    """(K,) values ||Lambda x_k||_2 for X (K, N), Lambda (D, N); at most 1 at a dual optimum,
    and equal to 1 on every feature that an optimal V uses."""
    return np.linalg.norm(np.asarray(dual) @ np.asarray(X).T, axis=0)


def width_bounds(X: np.ndarray, Y: np.ndarray) -> dict[str, int]:
    """Upper bounds on the number of nonzero columns of a basic optimal solution.

    With r = rank(X), r_Y = rank(Y): the matrices v_k x_k^T of a basic solution are linearly
    independent, and they lie (i) in range(Y) (x) rowspace(X), of dimension r_Y * r (an
    optimal v_k lies in range(Y): projecting it there keeps V X = Y and cannot increase its
    norm), and (ii) in {Lambda S : S symmetric on rowspace(X)}, of dimension r (r + 1) / 2
    (v_k x_k^T = c_k Lambda x_k x_k^T). Returns ``paper`` = D * r (N * D for full-rank X,
    the paper's bound), ``tight`` = min(r_Y * r, r (r + 1) / 2), and the ranks.
    """
    r = int(np.linalg.matrix_rank(X))
    r_y = int(np.linalg.matrix_rank(Y))
    return {"rank_x": r, "rank_y": r_y, "paper": Y.shape[0] * r, "tight": min(r_y * r, r * (r + 1) // 2)}


def _build(K: int, N: int, D: int) -> tuple[cp.Problem, cp.Variable, cp.Parameter, cp.Parameter, cp.Constraint]:
    V = cp.Variable((D, K))
    X = cp.Parameter((K, N))
    Y = cp.Parameter((D, N))
    constraint = V @ X == Y  # parameter-affine times variable: DPP, so compiled once per shape
    problem = cp.Problem(cp.Minimize(cp.sum(cp.norm(V, 2, axis=0))), [constraint])
    return problem, V, X, Y, constraint


@lru_cache(maxsize=64)
def _compiled(K: int, N: int, D: int) -> tuple[cp.Problem, cp.Variable, cp.Parameter, cp.Parameter, cp.Constraint]:
    # One parametrised problem per shape: later solves skip cvxpy's canonicalisation, which
    # dominates the run time of small problems (Fig. 5 solves thousands of them).
    return _build(K, N, D)


def solve_min_norm(X: np.ndarray, Y: np.ndarray, *, reuse: bool = True, certify: bool = True) -> MinNormSolution:
    """Solve ``min_V sum_k ||V[:, k]||_2  s.t.  V X = Y`` exactly (interior point, Clarabel),
    then certify a basic optimal solution with exact zeros (see the module docstring).

    Args:
        X: (K, N) features x samples. Y: (D, N) targets x samples.
        reuse: solve a cached parametrised problem for this shape (fast); ``False`` builds a
            new cvxpy problem each call, as the published scripts did.
        certify: compute the certified basic solution (else V is the solver's).
    Returns:
        :class:`MinNormSolution`. An infeasible problem (rows of Y outside the row space of
        X) has status "infeasible", NaN arrays and value ``inf``.

    If rank(X) = r < N the problem is first written in an orthonormal basis B (N, r) of the
    row space of X: V X = Y  <=>  V (X B) = Y B when the rows of Y lie in that row space
    (else it is infeasible). This is exact, and drops the D (N - r) redundant equalities that
    otherwise leave the interior-point method inaccurate (Fig. 4's rank-deficient X).
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"X must be (K, N) and Y (D, N) with the same N, got {X.shape} and {Y.shape}")
    (K, N), D = X.shape, Y.shape[0]
    B = _row_space_basis(X)
    if B.shape[1] < N:
        if np.linalg.norm(Y - (Y @ B) @ B.T) > _KKT_TOL * max(1.0, float(np.linalg.norm(Y))):
            return _failed(D, K, N, cp.INFEASIBLE)
        Xs, Ys = X @ B, Y @ B
    else:
        Xs, Ys, B = X, Y, np.eye(N)
    problem, V, Xp, Yp, constraint = _compiled(K, Xs.shape[1], D) if reuse else _build(K, Xs.shape[1], D)
    Xp.value, Yp.value = Xs, Ys
    try:
        problem.solve(solver=SOLVER)
        status = str(problem.status)
    except cp.SolverError:
        status = "solver_error"
    if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or V.value is None:
        return _failed(D, K, N, status)
    V_solver = np.array(V.value, dtype=np.float64)
    dual = np.asarray(constraint.dual_value, dtype=np.float64).reshape(D, Xs.shape[1])
    # cvxpy's sign convention for equality multipliers is not part of its API: fix the sign
    # by strong duality, <Lambda, Y> = optimum > 0.
    if float(np.sum(dual * Ys)) < 0:
        dual = -dual
    basic = _certified_basic_solution(Xs, Ys, V_solver) if certify else None
    certified = basic is not None
    V_out, dual = basic if certified else (V_solver, dual)
    value = float(np.linalg.norm(V_out, axis=0).sum())
    return MinNormSolution(V_out, value, dual @ B.T, status, V_solver, certified)


def _failed(D: int, K: int, N: int, status: str) -> MinNormSolution:
    nan_v = np.full((D, K), np.nan)
    return MinNormSolution(nan_v, np.inf, np.full((D, N), np.nan), status, nan_v, False)


def _row_space_basis(X: np.ndarray) -> np.ndarray:
    """(N, r) orthonormal basis of the row space of X (K, N), r = numerical rank of X."""
    _, sv, Wt = np.linalg.svd(X, full_matrices=False)
    if sv.size == 0 or sv[0] == 0:
        return np.zeros((X.shape[1], 0))
    r = int(np.sum(sv > sv[0] * max(X.shape) * np.finfo(np.float64).eps))
    return Wt[:r].T


def _certified_basic_solution(
    X: np.ndarray, Y: np.ndarray, V0: np.ndarray, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray] | None:
    """Active-set Newton on the KKT system, from the approximate solution V0 (D, K).

    X (K, N) must have full column rank N (``solve_min_norm`` reduces to the row space
    first). On a support T with weights c > 0, Lambda(c) = Y G(c)^-1 with
    G(c) = sum_T c_k x_k x_k^T makes V X = Y hold exactly; Newton solves
    F_k(c) = (||Lambda x_k||^2 - 1) / 2 = 0 on T, with Jacobian
    J_kj = -<u_k, u_j> x_j^T G^-1 x_k (u_k = Lambda x_k): minus the Gram matrix of the matrices
    u_k x_k^T, so J is nonsingular exactly when the solution on T is basic. A column whose
    weight a step would drive below 0 leaves T; once F = 0, the column with the largest
    ||Lambda x_k|| > 1 enters. Returns (V (D, K), Lambda (D, N)) if the KKT conditions
    certify optimality, else None.
    """
    K, D = X.shape[0], Y.shape[0]
    scale_y = max(1.0, float(np.linalg.norm(Y)))
    weights = np.linalg.norm(V0, axis=0)
    T = list(np.flatnonzero(weights > NONZERO_TOL))
    c = weights[T].copy()
    for _ in range(max_iter):
        if not T:
            return None
        XT = X[T]
        G = XT.T @ (c[:, None] * XT)
        G_inv = np.linalg.pinv(G, hermitian=True)  # pinv: G is singular while T spans less than R^N
        Lam = Y @ G_inv
        U = Lam @ XT.T
        F = 0.5 * (np.sum(U * U, axis=0) - 1.0)
        if np.max(np.abs(F)) <= _NEWTON_TOL:
            corr = np.linalg.norm(Lam @ X.T, axis=0)
            corr[T] = -np.inf
            entering = int(np.argmax(corr))
            if corr[entering] <= 1.0 + _KKT_TOL:
                V = np.zeros((D, K))
                V[:, T] = U * c
                if np.linalg.norm(V @ X - Y) > _KKT_TOL * scale_y or np.any(c <= 0):
                    return None
                return V, Lam
            T.append(entering)
            c = np.append(c, 1e-6 * c.max())
            continue
        J = -(U.T @ U) * (XT @ G_inv @ XT.T)
        step = np.linalg.lstsq(J, -F, rcond=None)[0]
        shrinking = step < 0
        ratios = np.full(len(T), np.inf)
        ratios[shrinking] = -c[shrinking] / step[shrinking]
        blocking = int(np.argmin(ratios))
        if ratios[blocking] < 1.0:  # the full step would make a weight negative: that column leaves
            c = c + ratios[blocking] * step
            del T[blocking]
            c = np.delete(c, blocking)
        else:
            c = c + step
    return None

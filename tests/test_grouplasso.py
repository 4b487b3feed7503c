"""The multi-task lasso core against independent oracles: cvxpy on the raw data and
scikit-learn's MultiTaskLasso; the duality gap; streamed statistics; resumable solvers."""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from sklearn.linear_model import MultiTaskLasso

from grouplasso import (
    group_norms,
    SOLVERS, LassoStats, PaperAdam, StatsAccumulator, debias, duality_gap, group_soft_threshold, lambda_max, mse,
    objective, round_up_support,
)


def make_problem(seed: int, n: int = 60, K: int = 15, D: int = 3):
    """ReLU-like correlated features X (n, K) >= 0, outputs Y (n, D) of a layer with bias b."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, 4))
    X = np.maximum(Z @ rng.standard_normal((4, K)) + 0.3 * rng.standard_normal((n, K)), 0.0)
    W = rng.standard_normal((D, K))
    b = rng.standard_normal(D)
    Y = X @ W.T + b + 0.1 * rng.standard_normal((n, D))
    return X, Y, b


def cvxpy_solution(X: np.ndarray, Y: np.ndarray, b: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """argmin_V (1/(n D)) ||Y - b - X V^T||_F^2 + lam sum_k ||V[:, k]||, straight from the data."""
    n, K = X.shape
    D = Y.shape[1]
    V = cp.Variable((D, K))
    loss = cp.sum_squares(Y - b[None, :] - X @ V.T) / (n * D)
    problem = cp.Problem(cp.Minimize(loss + lam * cp.sum(cp.norm(V, 2, axis=0))))
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return V.value, problem.value


def stats_of(X, Y, b) -> LassoStats:
    return LassoStats.from_features(torch.from_numpy(X), torch.from_numpy(Y), bias=torch.from_numpy(b))


def solve(name: str, stats: LassoStats, lam: float, tol: float = 1e-10, max_steps: int = 200_000):
    solver = SOLVERS[name](stats, lam, torch.zeros(stats.D, stats.K, dtype=torch.float64))
    while solver.certificate().rel_gap > tol and solver.iterations < max_steps:
        solver.step()
    return solver


def test_group_soft_threshold_zeroes_and_shrinks_exactly():
    W = torch.tensor([[3.0, 0.3, 0.0], [4.0, 0.4, 0.0]], dtype=torch.float64)  # norms 5, 0.5, 0
    V = group_soft_threshold(W, 1.0)
    assert torch.equal(V[:, 1:], torch.zeros(2, 2, dtype=torch.float64))
    assert torch.linalg.vector_norm(V[:, 0]).item() == pytest.approx(4.0, abs=1e-15)
    torch.testing.assert_close(V[:, 0] / 4.0, W[:, 0] / 5.0)


def test_statistics_streamed_equal_all_at_once_and_give_the_mse():
    X, Y, b = make_problem(0, n=101)
    whole = stats_of(X, Y, b)
    acc = StatsAccumulator(X.shape[1], Y.shape[1], bias=torch.from_numpy(b))
    for start in range(0, 101, 17):  # uneven last batch
        acc.update(torch.from_numpy(X[start:start + 17]).float(), torch.from_numpy(Y[start:start + 17]).float())
    streamed = acc.finalize()
    assert streamed.n == whole.n == 101
    torch.testing.assert_close(streamed.G, whole.G, rtol=1e-6, atol=1e-6)  # float32 batches, float64 sums
    torch.testing.assert_close(streamed.C, whole.C, rtol=1e-6, atol=1e-6)
    V = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 15)))
    direct = np.mean((Y - b - X @ V.numpy().T) ** 2)
    assert mse(whole, V) == pytest.approx(direct, rel=1e-12)


def test_statistics_with_dead_inputs_equal_the_dense_products():
    # Dead ReLU inputs take the accumulator's live-columns path; G must not change.
    rng = np.random.default_rng(3)
    X = np.maximum(rng.standard_normal((64, 50)), 0.0)
    X[:, ::2] = 0.0  # dead on every sample
    X[:32, 1::4] = 0.0  # dead in the first batch only
    Y = rng.standard_normal((64, 4))
    acc = StatsAccumulator(50, 4)
    for start in (0, 32):
        acc.update(torch.from_numpy(X[start:start + 32]), torch.from_numpy(Y[start:start + 32]))
    stats = acc.finalize()
    torch.testing.assert_close(stats.G, torch.from_numpy(X.T @ X / 64), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(stats.C, torch.from_numpy(Y.T @ X / 64), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("seed, lam", [(3, 0.05), (4, 0.3)])
def test_working_set_with_many_outputs_solves_in_the_span_of_c_exactly(seed, lam):
    """D = 40 outputs, K = 15 columns: the working set's subproblems are solved in the span of
    C's columns (D > 2 |W|); the result must still be cvxpy's optimum with its zero columns."""
    X, Y, b = make_problem(seed, n=80, K=15, D=40)
    V_ref, F_ref = cvxpy_solution(X, Y, b, lam)
    stats = stats_of(X, Y, b)
    solver = solve("working_set", stats, lam)
    assert objective(stats, solver.V, lam) == pytest.approx(F_ref, rel=1e-6)
    ours = set(torch.nonzero(group_norms(solver.V) == 0).flatten().tolist())
    theirs = set(np.flatnonzero(np.linalg.norm(V_ref, axis=0) < 1e-6).tolist())
    assert ours == theirs and 0 < len(ours) < X.shape[1]
    torch.testing.assert_close(solver.V, torch.from_numpy(V_ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed, lam", [(0, 0.05), (1, 0.2), (2, 0.5)])
@pytest.mark.parametrize("name", ["working_set", "fista"])
def test_solver_matches_cvxpy_objective_and_zero_columns(name, seed, lam):
    X, Y, b = make_problem(seed)
    V_ref, F_ref = cvxpy_solution(X, Y, b, lam)
    stats = stats_of(X, Y, b)
    solver = solve(name, stats, lam)
    F = objective(stats, solver.V, lam)
    assert F == pytest.approx(F_ref, rel=1e-6)
    assert F <= F_ref * (1 + 1e-9)  # cvxpy is approximate too: we may be lower, never meaningfully higher
    ours = set(torch.nonzero(torch.linalg.vector_norm(solver.V, dim=0) == 0).flatten().tolist())
    theirs = set(np.flatnonzero(np.linalg.norm(V_ref, axis=0) < 1e-6).tolist())
    assert ours == theirs and 0 < len(ours) < X.shape[1]


def test_solver_matches_scikit_learn_multitask_lasso():
    """scikit-learn minimises (1/2n)||Y - X B||^2 + alpha sum_k ||B_k||: alpha = lam * D / 2."""
    X, Y, b = make_problem(3, n=200, K=40, D=5)
    lam = 0.1
    reference = MultiTaskLasso(alpha=lam * 5 / 2, fit_intercept=False, tol=1e-12, max_iter=200_000).fit(X, Y - b)
    stats = stats_of(X, Y, b)
    ours = solve("auto", stats, lam).V
    F_ref = objective(stats, torch.from_numpy(reference.coef_), lam)
    assert objective(stats, ours, lam) == pytest.approx(F_ref, rel=1e-7)
    torch.testing.assert_close(ours, torch.from_numpy(reference.coef_), rtol=0, atol=1e-4)


def test_duality_gap_is_nonnegative_and_vanishes_at_the_optimum():
    X, Y, b = make_problem(4)
    lam = 0.1
    stats = stats_of(X, Y, b)
    rng = np.random.default_rng(0)
    for _ in range(20):
        V = torch.from_numpy(rng.standard_normal((3, 15)) * rng.uniform(0, 2))
        certificate = duality_gap(stats, V, lam)
        assert certificate.gap >= 0 and certificate.dual <= certificate.primal
        assert certificate.primal == pytest.approx(objective(stats, V, lam), rel=1e-12)
    V_ref, F_ref = cvxpy_solution(X, Y, b, lam)
    at_optimum = duality_gap(stats, torch.from_numpy(V_ref), lam)
    assert at_optimum.rel_gap < 1e-7
    assert at_optimum.dual == pytest.approx(F_ref, rel=1e-7)  # the dual reaches the optimal value
    # a random V's gap bounds its true suboptimality from above
    V = torch.from_numpy(rng.standard_normal((3, 15)))
    assert duality_gap(stats, V, lam).gap >= objective(stats, V, lam) - F_ref


def test_debias_refits_the_support_by_least_squares():
    X, Y, b = make_problem(5)
    stats = stats_of(X, Y, b)
    V = solve("auto", stats, 0.3).V
    support = torch.linalg.vector_norm(V, dim=0) > 0
    refit = debias(stats, V)
    assert torch.equal(torch.linalg.vector_norm(refit, dim=0) > 0, support)
    ls = np.linalg.lstsq(X[:, support.numpy()], Y - b, rcond=None)[0].T
    torch.testing.assert_close(refit[:, support], torch.from_numpy(ls), rtol=1e-8, atol=1e-8)
    assert mse(stats, refit) < mse(stats, V)


def test_a_support_rounded_up_gains_the_groups_the_lasso_path_adds_next():
    """scikit-learn's MultiTaskLasso on a fine grid of lambdas (400 steps; on 120 two groups that enter
    close together can swap) is the oracle: wherever one step
    down the grid adds exactly one neuron j to the support S, rounding S up to |S| + 1 adds j.
    Rounded to a multiple of 4, the support contains S, has a multiple of 4 groups (or all), and
    its least-squares refit fits at least as well as the refit of S alone."""
    X, Y, b = make_problem(7, n=200, K=24, D=4)
    stats = stats_of(X, Y, b)
    top = lambda_max(stats)
    coefs = [MultiTaskLasso(alpha=lam * 4 / 2, fit_intercept=False, tol=1e-12, max_iter=200_000).fit(X, Y - b).coef_
             for lam in top * np.geomspace(0.95, 0.01, 400)]
    supports = [frozenset(np.flatnonzero(np.linalg.norm(c, axis=0) > 0)) for c in coefs]
    checked = 0
    for coef, here, below in zip(coefs, supports, supports[1:]):
        if here < below and len(below - here) == 1:
            rounded = round_up_support(stats, torch.from_numpy(coef), len(here) + 1)
            assert set(rounded.tolist()) == set(below), (sorted(here), sorted(below))
            checked += 1
    assert checked >= 5, checked
    for coef, here in zip(coefs[::10], supports[::10]):
        V = torch.from_numpy(coef)
        rounded = round_up_support(stats, V, 4)
        assert set(rounded.tolist()) >= here and (len(rounded) % 4 == 0 or len(rounded) == 24)
        assert len(rounded) == min(24, -(-len(here) // 4) * 4)
        assert mse(stats, debias(stats, V, groups=rounded)) <= mse(stats, debias(stats, V)) + 1e-12



@pytest.mark.parametrize("name", ["working_set", "fista", "paper_adam"])
def test_solver_state_round_trip_continues_exactly(name):
    X, Y, b = make_problem(6)
    stats = stats_of(X, Y, b)
    V0 = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 15)))
    straight = SOLVERS[name](stats, 0.1, V0)
    for _ in range(6):
        straight.step()
    first = SOLVERS[name](stats, 0.1, V0)
    for _ in range(3):
        first.step()
    saved = first.state_dict()
    resumed = SOLVERS[name](stats, 0.1, torch.zeros_like(V0))
    resumed.load_state_dict(saved)
    for _ in range(3):
        resumed.step()
    assert torch.equal(resumed.V, straight.V)


def test_paper_adam_step_is_adam_then_threshold():
    X, Y, b = make_problem(7)
    stats = stats_of(X, Y, b)
    V0 = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 15)))
    solver = PaperAdam(stats, 0.2, V0, lr=0.05)
    solver.step()
    # one Adam step from zero moments: V - lr * g / (|g| + eps), then the threshold lr * lam
    g = 2 * (V0 @ stats.G - stats.C) / 3
    expected = group_soft_threshold(V0 - 0.05 * g / (g.abs() + 1e-8), 0.05 * 0.2)
    torch.testing.assert_close(solver.V, expected)


def test_bad_lambda_is_refused():
    X, Y, b = make_problem(8)
    with pytest.raises(ValueError, match="lambda must be a positive number"):
        SOLVERS["auto"](stats_of(X, Y, b), 0.0, torch.zeros(3, 15, dtype=torch.float64))

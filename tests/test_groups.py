"""Groups of g > 1 consecutive columns (convolution channels) in ``grouplasso``: the solvers
against cvxpy's group lasso on the raw data, lambda_max, the debiased refit against an
explicit least squares, g = 1 unchanged, and folding groups of repeated inputs."""
from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import pytest
import torch

from grouplasso import (
    FISTA, LassoStats, PaperAdam, WorkingSet, active_columns, active_groups, debias, duality_gap,
    fold_repeated_groups, group_columns, group_norm, group_norms, group_soft_threshold, lambda_max, mse, objective,
)
from lightning_modules.lasso import LassoCompression
from tests.test_grouplasso import make_problem as base_problem


def make_problem(seed: int, n: int = 60, K: int = 24, D: int = 5):
    """The features of ``tests.test_grouplasso.make_problem``, sized for groups of 3 and 4."""
    return base_problem(seed, n=n, K=K, D=D)


def stats_of(X, Y, b, group: int) -> LassoStats:
    return LassoStats.from_features(torch.from_numpy(X), torch.from_numpy(Y), bias=torch.from_numpy(b), group=group)


def cvxpy_group_solution(X, Y, b, lam: float, group: int) -> tuple[np.ndarray, float]:
    """argmin_V (1/(n D)) ||Y - b - X V^T||_F^2 + lam sum_c ||V[:, c g:(c+1) g]||_F, from the data."""
    n, K = X.shape
    D = Y.shape[1]
    V = cp.Variable((D, K))
    loss = cp.sum_squares(Y - b[None, :] - X @ V.T) / (n * D)
    penalty = sum(cp.norm(V[:, c * group:(c + 1) * group], "fro") for c in range(K // group))
    problem = cp.Problem(cp.Minimize(loss + lam * penalty))
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return V.value, problem.value


def numpy_group_norms(V: np.ndarray, group: int) -> np.ndarray:
    D, K = V.shape
    return np.sqrt((V.reshape(D, K // group, group) ** 2).sum(axis=(0, 2)))


def solve(solver, tol: float = 1e-10, max_steps: int = 200_000):
    sizes = []
    while solver.certificate().rel_gap > tol and solver.iterations < max_steps:
        solver.step()
        sizes.append(getattr(solver, "working_set_size", 0))
    solver.working_set_sizes = sizes
    return solver


def zeros(stats: LassoStats) -> torch.Tensor:
    return torch.zeros(stats.D, stats.K, dtype=torch.float64)


# --- prox -------------------------------------------------------------------------------

def test_group_norms_threshold_and_active_sets_act_on_whole_groups():
    W = torch.zeros(2, 6, dtype=torch.float64)
    W[:, 0:2] = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # group 0: norm 5
    W[:, 2:4] = torch.tensor([[0.3, 0.0], [0.0, 0.4]], dtype=torch.float64)  # group 1: norm 0.5
    W[1, 5] = 2.0  # group 2: norm 2, one of its two columns zero
    torch.testing.assert_close(group_norms(W, 2), torch.tensor([5.0, 0.5, 2.0], dtype=torch.float64), rtol=0, atol=1e-15)
    V = group_soft_threshold(W, 1.0, 2)
    assert torch.equal(V[:, 2:4], torch.zeros(2, 2, dtype=torch.float64))
    torch.testing.assert_close(V[:, 0:2], W[:, 0:2] * 0.8, rtol=0, atol=1e-15)  # shrunk by 1 in Frobenius norm
    torch.testing.assert_close(V[:, 4:6], W[:, 4:6] * 0.5, rtol=0, atol=1e-15)
    assert active_groups(V, 2).tolist() == [0, 2]
    assert active_columns(V, 2).tolist() == [0, 1, 4, 5]  # whole groups, the zero column 4 included
    assert active_columns(V).tolist() == [0, 1, 5]  # g = 1: the nonzero columns
    # against the group norms of the transposed block layout (D * g, K / g)
    rng = np.random.default_rng(0)
    A = torch.from_numpy(rng.standard_normal((5, 24)))
    blocks = A.reshape(5, 8, 3).permute(0, 2, 1).reshape(15, 8)
    torch.testing.assert_close(group_norms(A, 3), torch.linalg.vector_norm(blocks, dim=0), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="does not divide"):
        group_norms(A, 5)


def test_group_one_is_the_column_formulas_exactly():
    rng = np.random.default_rng(1)
    W = torch.from_numpy(rng.standard_normal((4, 30)))
    W[:, ::3] = 0.0
    norms = torch.linalg.vector_norm(W, dim=0)
    torch.testing.assert_close(group_norms(W, 1), norms, rtol=1e-15, atol=0)
    expected = W * torch.clamp(1.0 - 1.3 / torch.clamp(norms, min=1e-300), min=0.0)
    torch.testing.assert_close(group_soft_threshold(W, 1.3, 1), expected, rtol=1e-15, atol=0)
    assert torch.equal(active_columns(W, 1), torch.nonzero(norms > 0).flatten())
    assert torch.equal(active_groups(W, 1), active_columns(W, 1))
    assert torch.equal(group_columns(torch.tensor([4, 1]), 3), torch.tensor([12, 13, 14, 3, 4, 5]))


# --- statistics -------------------------------------------------------------------------

def test_restrict_keeps_the_group_and_refuses_partial_groups():
    X, Y, b = make_problem(0)
    stats = stats_of(X, Y, b, 3)
    assert stats.groups == 8
    sub = stats.restrict_groups(torch.tensor([1, 5]))
    assert sub.group == 3 and sub.groups == 2
    columns = torch.tensor([3, 4, 5, 15, 16, 17])
    torch.testing.assert_close(sub.G, stats.G[columns][:, columns], rtol=0, atol=0)
    torch.testing.assert_close(sub.C, stats.C[:, columns], rtol=0, atol=0)
    assert torch.equal(stats.restrict(columns).G, sub.G)
    for bad in ([3, 4], [4, 5, 6], [5, 4, 3], [3, 4, 5, 6]):
        with pytest.raises(ValueError, match="whole groups"):
            stats.restrict(torch.tensor(bad))
    with pytest.raises(ValueError, match="does not divide"):
        LassoStats(stats.G, stats.C, stats.s, stats.n, group=5)


# --- solvers against cvxpy --------------------------------------------------------------

@pytest.mark.parametrize("group, seed, ratio", [(3, 0, 0.05), (3, 1, 0.2), (4, 2, 0.2), (4, 0, 0.5)])
@pytest.mark.parametrize("name", ["working_set", "fista"])
def test_group_solver_matches_cvxpy_objective_and_zero_groups(name, group, seed, ratio):
    X, Y, b = make_problem(seed, K=24, D=5)
    stats = stats_of(X, Y, b, group)
    lam = ratio * lambda_max(stats)
    V_ref, F_ref = cvxpy_group_solution(X, Y, b, lam, group)
    # min_size 1: the working sets really are chosen among the groups, not all of them at once
    solver = solve(WorkingSet(stats, lam, zeros(stats), min_size=1) if name == "working_set" else FISTA(stats, lam, zeros(stats)))
    ours = assert_matches_cvxpy(stats, solver.V, lam, V_ref, F_ref)
    assert solver.metrics()["active"] == stats.groups - len(ours)  # counted in groups
    if name == "working_set":
        # it grew through proper subsets of the groups: 1 group first (min_size 1, V = 0), then more
        assert solver.working_set_sizes[0] == 1 and len(set(solver.working_set_sizes)) > 1


def assert_matches_cvxpy(stats, V, lam: float, V_ref: np.ndarray, F_ref: float) -> set[int]:
    """V's objective within 1e-6 of cvxpy's (and not below it beyond rounding), the same zero
    groups, some but not all of them, each exactly zero; returns the zero groups."""
    F = objective(stats, V, lam)
    assert F == pytest.approx(F_ref, rel=1e-6)
    assert F <= F_ref * (1 + 1e-9)
    ours = set(torch.nonzero(group_norms(V, stats.group) == 0).flatten().tolist())
    theirs = set(np.flatnonzero(numpy_group_norms(V_ref, stats.group) < 1e-6).tolist())
    assert ours == theirs and 0 < len(ours) < stats.groups
    zero_columns = group_columns(torch.tensor(sorted(ours)), stats.group)
    assert torch.equal(V[:, zero_columns], torch.zeros(stats.D, len(zero_columns), dtype=torch.float64))
    return ours


@pytest.mark.parametrize("group, seed, ratio", [(3, 3, 0.1), (4, 4, 0.3)])
def test_group_working_set_with_many_outputs_solves_in_the_span_of_c(group, seed, ratio):
    """D = 60 > 2 K: every subproblem takes the QR branch (a basis of the span of C)."""
    X, Y, b = make_problem(seed, n=80, K=24, D=60)
    stats = stats_of(X, Y, b, group)
    lam = ratio * lambda_max(stats)
    V_ref, F_ref = cvxpy_group_solution(X, Y, b, lam, group)
    solver = solve(WorkingSet(stats, lam, zeros(stats), min_size=1))
    assert objective(stats, solver.V, lam) == pytest.approx(F_ref, rel=1e-6)
    ours = set(torch.nonzero(group_norms(solver.V, group) == 0).flatten().tolist())
    theirs = set(np.flatnonzero(numpy_group_norms(V_ref, group) < 1e-6).tolist())
    assert ours == theirs and 0 < len(ours) < stats.groups
    torch.testing.assert_close(solver.V, torch.from_numpy(V_ref), atol=1e-4, rtol=0)


def test_group_duality_gap_certifies_cvxpy_optimum_and_bounds_suboptimality():
    X, Y, b = make_problem(5)
    stats = stats_of(X, Y, b, 4)
    lam = 0.2 * lambda_max(stats)
    V_ref, F_ref = cvxpy_group_solution(X, Y, b, lam, 4)
    at_optimum = duality_gap(stats, torch.from_numpy(V_ref), lam)
    assert at_optimum.scores.shape == (6,)
    assert at_optimum.rel_gap < 1e-7 and at_optimum.dual == pytest.approx(F_ref, rel=1e-7)
    rng = np.random.default_rng(0)
    for _ in range(10):
        V = torch.from_numpy(rng.standard_normal((5, 24)))
        certificate = duality_gap(stats, V, lam)
        assert certificate.primal == pytest.approx(objective(stats, V, lam), rel=1e-12)
        assert certificate.gap >= objective(stats, V, lam) - F_ref >= 0
    # the penalty is the groups' Frobenius norms, from the data
    V = torch.from_numpy(rng.standard_normal((5, 24)))
    direct = np.mean((Y - b - X @ V.numpy().T) ** 2) + lam * numpy_group_norms(V.numpy(), 4).sum()
    assert objective(stats, V, lam) == pytest.approx(direct, rel=1e-12)
    assert group_norm(V, 4) == pytest.approx(numpy_group_norms(V.numpy(), 4).sum(), rel=1e-14)


# --- lambda_max -------------------------------------------------------------------------

@pytest.mark.parametrize("group", [1, 3, 4])
def test_lambda_max_is_where_zero_stops_being_optimal(group):
    X, Y, b = make_problem(6)
    stats = stats_of(X, Y, b, group)
    n, D = Y.shape
    C = (Y - b).T @ X / n  # independent of the accumulator
    expected = 2.0 / D * numpy_group_norms(C, group).max()
    lam_max = lambda_max(stats)
    assert lam_max == pytest.approx(expected, rel=1e-12)
    zero = zeros(stats)
    assert duality_gap(stats, zero, lam_max).gap <= 1e-14 * mse(stats, zero)  # V = 0 certified optimal
    at = solve(FISTA(stats, lam_max, zero))
    assert torch.equal(at.V, zero)
    below = solve(WorkingSet(stats, 0.99 * lam_max, zero))
    assert duality_gap(stats, zero, 0.99 * lam_max).gap > 0
    assert below.metrics()["active"] == 1  # the group of the largest ||C[:, group]||_F enters first
    assert active_groups(below.V, group).tolist() == [int(np.argmax(numpy_group_norms(C, group)))]
    assert objective(stats, below.V, 0.99 * lam_max) < objective(stats, zero, 0.99 * lam_max)


# --- debias -----------------------------------------------------------------------------

def test_group_debias_is_least_squares_on_the_kept_groups_columns():
    X, Y, b = make_problem(7)
    stats = stats_of(X, Y, b, 3)
    V = solve(WorkingSet(stats, 0.3 * lambda_max(stats), zeros(stats))).V
    kept = active_groups(V, 3)
    assert 0 < len(kept) < stats.groups
    columns = group_columns(kept, 3)
    refit = debias(stats, V)
    assert torch.equal(active_groups(refit, 3), kept)
    assert torch.equal(refit[:, torch.ones(24, dtype=torch.bool).index_fill_(0, columns, False)], torch.zeros(5, 24 - len(columns), dtype=torch.float64))
    Xt, Rt = torch.from_numpy(X), torch.from_numpy(Y - b)
    ls = torch.linalg.lstsq(Xt[:, columns], Rt, driver="gelsd").solution.T
    torch.testing.assert_close(refit[:, columns], ls, rtol=1e-8, atol=1e-8)
    assert mse(stats, refit) < mse(stats, V)


# --- g = 1 unchanged --------------------------------------------------------------------

def reference_fista(stats: LassoStats, lam: float, V0: torch.Tensor, steps: int, L: float) -> torch.Tensor:
    """FISTA with the column-wise threshold spelt out (the g = 1 code, independently)."""
    V, Z, t = V0.clone(), V0.clone(), 1.0
    for _ in range(steps):
        W = Z - 2.0 * (Z @ stats.G - stats.C) / stats.D / L
        norms = torch.linalg.vector_norm(W, dim=0)
        V_new = W * torch.clamp(1.0 - (lam / L) / torch.clamp(norms, min=torch.finfo(W.dtype).tiny), min=0.0)
        if torch.sum((Z - V_new) * (V_new - V)) > 0:
            t, Z = 1.0, V_new.clone()
        else:
            t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            Z, t = V_new + ((t - 1.0) / t_new) * (V_new - V), t_new
        V = V_new
    return V


def test_group_one_solvers_follow_the_column_path():
    X, Y, b = make_problem(8)
    stats = stats_of(X, Y, b, 1)
    lam = 0.2 * lambda_max(stats)
    V0 = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 24)))
    fista = FISTA(stats, lam, V0)
    for _ in range(50):
        fista.step()
    torch.testing.assert_close(fista.V, reference_fista(stats, lam, V0, 50, fista.L), rtol=0, atol=1e-12)
    # the default group equals an explicit group=1 everywhere
    plain = LassoStats(stats.G, stats.C, stats.s, stats.n)
    a, c = solve(WorkingSet(plain, lam, zeros(stats))), solve(WorkingSet(stats, lam, zeros(stats)))
    assert torch.equal(a.V, c.V)
    assert lambda_max(plain) == 2.0 / 5 * float(torch.linalg.vector_norm(stats.C, dim=0).max())
    assert a.metrics()["active"] == len(torch.nonzero(torch.linalg.vector_norm(a.V, dim=0)))


def test_paper_adam_step_thresholds_groups():
    X, Y, b = make_problem(9)
    stats = stats_of(X, Y, b, 4)
    V0 = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 24))) * 0.05
    solver = PaperAdam(stats, 0.5, V0, lr=0.05)
    solver.step()
    g = 2 * (V0 @ stats.G - stats.C) / 5
    W = V0 - 0.05 * g / (g.abs() + 1e-8)
    blocks = W.reshape(5, 6, 4)
    norms = blocks.square().sum(dim=(0, 2)).sqrt()
    expected = (blocks * torch.clamp(1 - 0.025 / norms, min=0)[:, None]).reshape(5, 24)
    torch.testing.assert_close(solver.V, expected, rtol=1e-12, atol=1e-14)


# --- folding repeated inputs ------------------------------------------------------------

def repeated_problem(seed: int, channels: int = 8, group: int = 4, D: int = 5):
    """AlexNet's classifier.1 at 64x64 in miniature: every channel's input repeated ``group`` times."""
    X_distinct, Y, b = make_problem(seed, n=70, K=channels, D=D)
    return np.repeat(X_distinct, group, axis=1), X_distinct, Y, b


def test_fold_repeated_groups_is_the_same_function_on_one_input_per_channel():
    X, X_distinct, Y, b = repeated_problem(10)
    stats = stats_of(X, Y, b, 4)
    folding = fold_repeated_groups(stats)
    assert folding is not None and folding.stats.group == 1 and folding.stats.K == 8
    assert folding.representatives.tolist() == list(range(0, 32, 4))
    distinct = stats_of(X_distinct, Y, b, 1)
    torch.testing.assert_close(folding.stats.G, distinct.G, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(folding.stats.C, distinct.C, rtol=1e-13, atol=1e-15)
    assert folding.stats.s == stats.s and folding.stats.n == stats.n
    # fold: W x = fold(W) x_rep exactly (up to rounding)
    W = torch.from_numpy(np.random.default_rng(1).standard_normal((5, 32)))
    torch.testing.assert_close(torch.from_numpy(X) @ W.T, torch.from_numpy(X_distinct) @ folding.fold(W).T, rtol=1e-13, atol=1e-12)
    assert mse(stats, W) == pytest.approx(mse(folding.stats, folding.fold(W)), rel=1e-12)
    # the folded solution, expanded back, has the same MSE on the full features
    lam = 0.2 * lambda_max(folding.stats)
    V_folded = solve(WorkingSet(folding.stats, lam, zeros(folding.stats))).V
    assert 0 < len(active_groups(V_folded)) < 8
    V = folding.expand(V_folded)
    assert V.shape == (5, 32) and torch.equal(folding.fold(V), V_folded)
    direct = np.mean((Y - b - X @ V.numpy().T) ** 2)
    assert mse(folding.stats, V_folded) == pytest.approx(direct, rel=1e-10)
    assert mse(stats, V) == pytest.approx(direct, rel=1e-10)
    assert active_groups(V, 4).tolist() == active_groups(V_folded).tolist()  # the same channels kept


def test_grouped_problem_on_repeated_inputs_is_the_folded_one_at_lambda_over_sqrt_g():
    """Documented in grouplasso.folding: ||V_c||_F is smallest, ||u|| / sqrt(g), for an even spread."""
    X, _, Y, b = repeated_problem(11)
    stats = stats_of(X, Y, b, 4)
    folding = fold_repeated_groups(stats)
    lam = 0.2 * lambda_max(stats)
    assert lambda_max(folding.stats) == pytest.approx(lambda_max(stats) / 2, rel=1e-12)  # sqrt(4)
    grouped = solve(WorkingSet(stats, lam, zeros(stats)), tol=1e-12)
    folded = solve(WorkingSet(folding.stats, lam / 2, zeros(folding.stats)), tol=1e-12)
    torch.testing.assert_close(folding.fold(grouped.V), folded.V, rtol=0, atol=1e-6)
    assert objective(stats, grouped.V, lam) == pytest.approx(objective(folding.stats, folded.V, lam / 2), rel=1e-9)


def test_fold_repeated_groups_refuses_a_group_that_is_not_repeated():
    X, _, Y, b = repeated_problem(12)
    assert fold_repeated_groups(stats_of(X, Y, b, 1)) is None  # g = 1
    X_bad = X.copy()
    X_bad[:, 13] += 0.01 * np.abs(np.random.default_rng(0).standard_normal(len(X)))  # one column of group 3 differs
    assert fold_repeated_groups(stats_of(X_bad, Y, b, 4)) is None
    assert fold_repeated_groups(stats_of(X, Y, b, 4)) is not None
    assert fold_repeated_groups(stats_of(X, Y, b, 2)) is not None  # halves of the channels' copies: still repeated


# --- the LightningModule ----------------------------------------------------------------

def test_lightning_module_checkpoint_names_the_group_size():
    X, Y, b = make_problem(13)
    stats3 = stats_of(X, Y, b, 3)
    W = torch.zeros(5, 24, dtype=torch.float64)
    module = LassoCompression(solver="working_set").attach(stats3, 0.1, W)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["lasso_problem"]["group"] == 3
    module.on_load_checkpoint(checkpoint)  # the same problem resumes
    other = LassoCompression(solver="working_set").attach(stats_of(X, Y, b, 4), 0.1, W)
    with pytest.raises(ValueError, match="the checkpoint was written for"):
        other.on_load_checkpoint(checkpoint)
    old = {"lasso_problem": {"lam": 0.1, "layer": "layer", "D": 5, "K": 24}}  # written before groups: g = 1
    LassoCompression(solver="working_set").attach(stats_of(X, Y, b, 1), 0.1, W).on_load_checkpoint(old)
    with pytest.raises(ValueError):
        module.on_load_checkpoint(old)

"""Coupled channels: several consumers of the same neurons as one problem, against cvxpy on the
raw data of every consumer; its block structure (block products equal to the dense ones, kept by
``restrict``, structured solves equal to dense ones); and the budget allocation's knapsack
against brute force."""
from __future__ import annotations

import dataclasses
import itertools

import cvxpy as cp
import numpy as np
import pytest
import torch

from compression.allocation import Option, choose
from grouplasso import (
    FISTA, WorkingSet, active_groups, debias, duality_gap, gram_product, lambda_max, lipschitz, mse, objective,
    stack_problems,
)
from grouplasso.problem import times_gram
from grouplasso.stats import LassoStats

CHANNELS = 6


def consumer_data(seed: int, group: int, D: int, n: int):
    """Inputs (n, CHANNELS * group) whose channel c is a nonnegative signal, outputs of a random
    layer plus noise, a bias; each consumer has its own samples (its own output positions)."""
    rng = np.random.default_rng(seed)
    X = np.maximum(rng.standard_normal((n, CHANNELS * group)) + 0.3, 0)
    W = rng.standard_normal((D, CHANNELS * group))
    b = rng.standard_normal(D) * 0.1
    Y = X @ W.T + b + 0.3 * rng.standard_normal((n, D))
    return X, Y, b, W


def stacked_problem(seed: int = 0):
    layouts = [(9, 4, 80), (1, 3, 50), (9, 2, 120)]  # (columns per channel, outputs, samples)
    data = [consumer_data(seed + j, g, D, n) for j, (g, D, n) in enumerate(layouts)]
    stats = [LassoStats.from_features(torch.from_numpy(X), torch.from_numpy(Y), bias=torch.from_numpy(b), group=g)
             for (X, Y, b, _), (g, _, _) in zip(data, layouts)]
    weights = [torch.from_numpy(W) for *_, W in data]
    return data, layouts, stats, weights


def cvxpy_stacked(data, layouts, lam: float):
    """(1/m) sum_j rho_j / s_j + lam sum_c ||(alpha_j V_j[:, group c])_j||_F from the raw data."""
    m, D = len(data), sum(D for _, D, _ in layouts)
    Vs, loss, blocks = [], 0, [[] for _ in range(CHANNELS)]
    for (X, Y, b, _), (g, Dj, n) in zip(data, layouts):
        s = np.mean(np.sum((Y - b) ** 2, axis=1))
        alpha = np.sqrt(D / (m * s))
        V = cp.Variable((Dj, CHANNELS * g))
        Vs.append(V)
        loss = loss + cp.sum_squares(Y - b - X @ V.T) / n / s / m
        for c in range(CHANNELS):
            blocks[c].append(alpha * cp.vec(V[:, c * g:(c + 1) * g], order="F"))
    penalty = sum(cp.norm(cp.hstack(parts), 2) for parts in blocks)
    problem = cp.Problem(cp.Minimize(loss + lam * penalty))
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return [V.value for V in Vs], problem.value


@pytest.mark.parametrize("ratio", [0.5, 0.2, 0.05])
def test_stacked_problem_matches_cvxpy_on_every_consumers_raw_data(ratio):
    data, layouts, stats, weights = stacked_problem()
    joint, W, stacking = stack_problems(stats, weights)
    assert joint.group == 9 + 1 + 9 and joint.K == CHANNELS * joint.group and joint.D == 4 + 3 + 2
    lam = ratio * lambda_max(joint)
    solver = WorkingSet(joint, lam, torch.zeros_like(W))
    while solver.certificate().rel_gap > 1e-10 and solver.iterations < 500:
        solver.step()
    ours = mse(joint, solver.V) + lam * float(torch.linalg.matrix_norm(
        solver.V.reshape(joint.D, CHANNELS, joint.group).transpose(0, 1), ord="fro").sum())
    reference, F_ref = cvxpy_stacked(data, layouts, lam)
    assert ours == pytest.approx(F_ref, rel=1e-6, abs=1e-9)
    parts = stacking.split(solver.V)
    for part, ref, (g, Dj, _) in zip(parts, reference, layouts):
        assert part.shape == (Dj, CHANNELS * g)
        torch.testing.assert_close(part, torch.from_numpy(ref), atol=2e-4, rtol=1e-3)
    kept = active_groups(solver.V, joint.group)
    ref_kept = {c for c in range(CHANNELS)
                if sum(np.linalg.norm(r[:, c * g:(c + 1) * g]) for r, (g, _, _) in zip(reference, layouts)) > 1e-5}
    assert set(kept.tolist()) == ref_kept and 0 < len(kept) <= CHANNELS
    # the rows of one consumer never use another consumer's columns
    joined = stacking.join(parts)
    torch.testing.assert_close(joined, solver.V, atol=1e-12, rtol=0)


def test_lambda_max_zero_solution_and_refit_of_the_stacked_problem():
    data, layouts, stats, weights = stacked_problem(seed=3)
    joint, W, stacking = stack_problems(stats, weights)
    top = lambda_max(joint)
    assert mse(joint, torch.zeros_like(W)) == pytest.approx(1.0)  # every consumer's relative error is 1
    solver = WorkingSet(joint, 1.0001 * top, torch.zeros_like(W))
    solver.step()
    assert len(active_groups(solver.V, joint.group)) == 0
    # the refit on all channels is every consumer's own least squares
    refit = stacking.split(debias(joint, torch.ones_like(W)))
    for part, (X, Y, b, _) in zip(refit, data):
        ls = np.linalg.lstsq(X, Y - b, rcond=None)[0].T
        torch.testing.assert_close(part, torch.from_numpy(ls), atol=1e-8, rtol=1e-8)


def test_one_consumer_is_its_own_problem_unscaled():
    _, _, stats, weights = stacked_problem()
    joint, W, stacking = stack_problems(stats[:1], weights[:1])
    assert joint is stats[0] and W is weights[0] and stacking.scales == (1.0,)


# --- the block structure -----------------------------------------------------------------

def structured_and_dense(seed: int = 0):
    """The stacked problem with its block structure, the same without it, and a block-structured V."""
    _, _, stats, weights = stacked_problem(seed)
    joint, W, stacking = stack_problems(stats, weights)
    return joint, dataclasses.replace(joint, blocks=None), W, stacking


def test_stacked_statistics_carry_their_block_structure_through_restrict_and_to():
    joint, dense, _, stacking = structured_and_dense()
    assert joint.blocks == ((slice(0, 4), slice(0, 9)), (slice(4, 7), slice(9, 10)), (slice(7, 9), slice(10, 19))) \
        == stacking.blocks
    kept = torch.tensor([1, 3, 4])
    sub = joint.restrict_groups(kept)
    assert sub.blocks == joint.blocks and sub.K == 3 * joint.group
    assert joint.restrict(torch.arange(joint.group, 3 * joint.group)).blocks == joint.blocks
    assert joint.to("cpu").blocks == joint.blocks
    assert dense.restrict_groups(kept).blocks is None and dense.to("cpu").blocks is None
    # ordinary statistics: positional construction as before, no structure
    assert LassoStats(joint.G, joint.C, joint.s, joint.n, joint.group).blocks is None
    with pytest.raises(ValueError, match="tile"):  # column 9 of every group belongs to no consumer
        LassoStats(joint.G, joint.C, joint.s, joint.n, joint.group,
                   ((slice(0, 4), slice(0, 9)), (slice(4, 9), slice(10, 19))))
    # the restricted structure still describes the zeros of the restricted G and C
    for j, (rows, columns) in enumerate(sub.blocks):
        mine = torch.zeros(sub.group, dtype=torch.bool)
        mine[columns] = True
        mine = mine.repeat(len(kept))
        assert not bool(sub.G[mine][:, ~mine].any()) and not bool(sub.C[rows][:, ~mine].any())


def test_block_products_equal_the_dense_ones():
    joint, dense, W, _ = structured_and_dense()
    g = joint.group
    torch.testing.assert_close(gram_product(joint, W), W @ joint.G, rtol=1e-13, atol=1e-13)
    groups = torch.tensor([0, 2, 5])
    columns = torch.cat([torch.arange(c * g, (c + 1) * g) for c in groups.tolist()])
    torch.testing.assert_close(gram_product(joint, W[:, columns], groups), W[:, columns] @ joint.G[columns],
                               rtol=1e-13, atol=1e-13)
    # a slice of groups into a slice of groups, added in place (BCD's updates)
    out, reference = torch.ones(joint.D, 3 * g, dtype=torch.float64), torch.ones(joint.D, 3 * g, dtype=torch.float64)
    gram_product(joint, W[:, 2 * g:4 * g], slice(2, 4), out=out, into=slice(1, 4))
    reference.addmm_(W[:, 2 * g:4 * g], joint.G[2 * g:4 * g, g:4 * g])
    torch.testing.assert_close(out, reference, rtol=1e-13, atol=1e-13)
    for V in (W, torch.zeros_like(W), W * (torch.arange(joint.K) < 2 * g)):  # all, none and few groups active
        torch.testing.assert_close(times_gram(joint, V), V @ joint.G, rtol=1e-13, atol=1e-13)
    sub, dense_sub = joint.restrict_groups(groups), dense.restrict_groups(groups)
    torch.testing.assert_close(times_gram(sub, W[:, columns]), times_gram(dense_sub, W[:, columns]),
                               rtol=1e-13, atol=1e-13)
    # and so the certificate and the Lipschitz constant
    lam = 0.1 * lambda_max(joint)
    ours, theirs = duality_gap(joint, W, lam), duality_gap(dense, W, lam)
    assert ours.gap == pytest.approx(theirs.gap, rel=1e-12) and ours.primal == pytest.approx(theirs.primal, rel=1e-12)
    torch.testing.assert_close(ours.scores, theirs.scores, rtol=1e-12, atol=0)
    assert lipschitz(joint) == pytest.approx(lipschitz(dense), rel=1e-12)


def zeros_of(stats: LassoStats) -> torch.Tensor:
    return torch.zeros(stats.D, stats.K, dtype=torch.float64)


SOLVES = {
    "working_set_bcd": lambda stats, lam: WorkingSet(stats, lam, zeros_of(stats), inner="bcd", min_size=1),
    "working_set_bcd_plain": lambda stats, lam: WorkingSet(stats, lam, zeros_of(stats), inner="bcd", min_size=1,
                                                           anderson=0),
    "working_set_fista": lambda stats, lam: WorkingSet(stats, lam, zeros_of(stats), inner="fista", min_size=1),
    "fista": lambda stats, lam: FISTA(stats, lam, zeros_of(stats)),
}


@pytest.mark.parametrize("ratio", [0.3, 0.05])
@pytest.mark.parametrize("name", list(SOLVES))
def test_structured_solve_equals_the_dense_one(name, ratio):
    joint, dense, _, _ = structured_and_dense(seed=1)
    lam = ratio * lambda_max(joint)
    ours, theirs = SOLVES[name](joint, lam), SOLVES[name](dense, lam)
    for _ in range(3):
        ours.step()
        theirs.step()
    if name != "working_set_bcd":
        # The same iterates, up to rounding. (Not with Anderson extrapolation: its small linear
        # solve is ill-conditioned near convergence and turns rounding-level differences into
        # visibly different, equally valid extrapolations; only the optimum is compared then.)
        torch.testing.assert_close(ours.V, theirs.V, rtol=1e-8, atol=1e-10)
    for solver in (ours, theirs):
        while solver.certificate().rel_gap > 1e-11 and solver.iterations < 20_000:
            solver.step()
        assert solver.certificate().rel_gap <= 1e-11
    assert objective(joint, ours.V, lam) == pytest.approx(objective(dense, theirs.V, lam), rel=1e-10)
    # every solver keeps the entries off the blocks at zero
    mask = torch.zeros_like(ours.V, dtype=torch.bool)
    within = torch.arange(joint.K) % joint.group
    for rows, columns in joint.blocks:
        mask[rows] = (within >= columns.start) & (within < columns.stop)
    assert not bool(ours.V[~mask].any())


def test_knapsack_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    for trial in range(30):
        groups = [[Option(int(rng.integers(0, 12)), float(rng.uniform(0, 10)), k) for k in range(rng.integers(1, 5))]
                  for _ in range(rng.integers(1, 5))]
        budget = int(rng.integers(0, 20))
        chosen, saving, cost = choose(groups, budget)
        best = 0.0
        for pick in itertools.product(*[[None, *range(len(g))] for g in groups]):
            c = sum(g[k].cost for g, k in zip(groups, pick) if k is not None)
            s = sum(g[k].saving for g, k in zip(groups, pick) if k is not None)
            if c <= budget:
                best = max(best, s)
        assert saving == pytest.approx(best)
        assert cost <= budget
        assert cost == sum(g[k].cost for g, k in zip(groups, chosen) if k is not None)
        assert saving == pytest.approx(sum(g[k].saving for g, k in zip(groups, chosen) if k is not None))
    with pytest.raises(ValueError, match="budget"):
        choose([], -1)

"""Block coordinate descent over groups (``grouplasso.solvers.BCD``), the working-set solver's
inner solver for g > 1: against cvxpy, on a badly conditioned patch Gram, resumable, and the
g = 1 path left on FISTA."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import grouplasso.working_set as working_set_module
from grouplasso import (
    BCD, FISTA, SOLVERS, WorkingSet, duality_gap, group_norms, lambda_max, objective,
)
from tests.test_groups import assert_matches_cvxpy, cvxpy_group_solution, make_problem, numpy_group_norms, solve, stats_of, zeros


class Spy:
    """Counts the inner solvers ``WorkingSet`` builds (and, for the QR branch, their D)."""

    def __init__(self, monkeypatch) -> None:
        self.made: list[tuple[str, int]] = []
        for name, cls in (("BCD", BCD), ("FISTA", FISTA)):
            def make(stats, lam, V0, _cls=cls, _name=name, **options):
                self.made.append((_name, stats.D))
                return _cls(stats, lam, V0, **options)
            monkeypatch.setattr(working_set_module, name, make)

    def kinds(self) -> set[str]:
        return {kind for kind, _ in self.made}


def patch_problem(seed: int, channels: int = 24, images: int = 40, D: int = 6):
    """Features as a convolution sees them: 3x3 patches (padding 1, ``F.unfold`` order) of smooth
    nonnegative 3x3 maps (blurred noise, partly shared by all channels, through a ReLU), so that
    neighbouring entries of a channel's patch and the channels themselves are strongly
    correlated and G is badly conditioned; outputs of a channel-sparse W plus noise.
    Returns X (n, 9 channels), Y, b."""
    gen = torch.Generator().manual_seed(seed)
    fields = torch.randn(images, channels, 7, 7, generator=gen, dtype=torch.float64)
    fields += 0.5 * torch.randn(images, 1, 7, 7, generator=gen, dtype=torch.float64)
    blur = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
    blur = (blur[:, None] * blur[None, :]) / blur.sum() ** 2
    maps = torch.relu(F.conv2d(fields.reshape(-1, 1, 7, 7), blur[None, None]).reshape(images, channels, 3, 3) + 0.5)
    X = F.unfold(maps, kernel_size=3, padding=1).transpose(1, 2).reshape(-1, channels * 9)
    W = torch.randn(D, channels * 9, generator=gen, dtype=torch.float64)
    W.view(D, channels, 9)[:, ::2] = 0.0
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    Y = X @ W.T + b + 0.05 * torch.randn(len(X), D, generator=gen, dtype=torch.float64)
    return X.numpy(), Y.numpy(), b.numpy()


# --- the working-set solver with BCD inside, against cvxpy ----------------------------------

@pytest.mark.parametrize("group, K, D, seed, ratio", [
    (4, 36, 5, 0, 0.1), (4, 72, 5, 1, 0.2), (9, 36, 5, 2, 0.5), (9, 72, 5, 3, 0.2),
    (4, 36, 60, 4, 0.3), (9, 36, 60, 5, 0.5),  # D = 60 > 2 |W|: the QR span reduction
])
def test_working_set_with_bcd_matches_cvxpy(monkeypatch, group, K, D, seed, ratio):
    X, Y, b = make_problem(seed, n=80, K=K, D=D)
    stats = stats_of(X, Y, b, group)
    lam = ratio * lambda_max(stats)
    V_ref, F_ref = cvxpy_group_solution(X, Y, b, lam, group)
    spy = Spy(monkeypatch)
    solver = solve(WorkingSet(stats, lam, zeros(stats), min_size=1))
    assert spy.kinds() == {"BCD"}
    if D == 60:
        assert any(d < D for _, d in spy.made)  # some subproblems were solved in the span of C
    assert_matches_cvxpy(stats, solver.V, lam, V_ref, F_ref)
    m = solver.metrics()
    assert m["inner_iterations"] >= 1 and 0 < m["step_size"] < float("inf")


def test_bcd_as_a_solver_matches_cvxpy_and_its_blocks():
    X, Y, b = make_problem(6, n=80, K=36, D=5)
    stats = stats_of(X, Y, b, 4)
    lam = 0.15 * lambda_max(stats)
    V_ref, F_ref = cvxpy_group_solution(X, Y, b, lam, 4)
    bcd = SOLVERS["bcd"](stats, lam, zeros(stats))
    blocks = [torch.linalg.eigvalsh(stats.G[c * 4:(c + 1) * 4, c * 4:(c + 1) * 4])[-1] for c in range(9)]
    torch.testing.assert_close(bcd.L, 2.0 / 5 * torch.stack(blocks), rtol=1e-12, atol=0)
    assert bcd.step_size == pytest.approx(float((1.0 / bcd.L).mean()), rel=1e-12)
    solve(bcd)
    assert objective(stats, bcd.V, lam) == pytest.approx(F_ref, rel=1e-6)
    torch.testing.assert_close(bcd.P, bcd.V @ stats.G, rtol=0, atol=1e-12 * float(bcd.P.abs().max()))  # P stays V G
    ours = set(torch.nonzero(group_norms(bcd.V, 4) == 0).flatten().tolist())
    assert ours == set(np.flatnonzero(numpy_group_norms(V_ref, 4) < 1e-6).tolist())


def test_bcd_group_one_is_coordinate_descent_to_the_same_optimum():
    X, Y, b = make_problem(7, n=80, K=30, D=4)
    stats = stats_of(X, Y, b, 1)
    lam = 0.1 * lambda_max(stats)
    _, F_ref = cvxpy_group_solution(X, Y, b, lam, 1)
    for solver in (solve(BCD(stats, lam, zeros(stats))), solve(WorkingSet(stats, lam, zeros(stats), inner="bcd"))):
        assert objective(stats, solver.V, lam) == pytest.approx(F_ref, rel=1e-6)


def test_bcd_holds_groups_of_dead_inputs_at_zero():
    X, Y, b = make_problem(8, n=80, K=36, D=5)
    X[:, 8:12] = 0.0  # group 2 of 4 never fires
    stats = stats_of(X, Y, b, 4)
    lam = 0.05 * lambda_max(stats)
    V0 = torch.ones(stats.D, stats.K, dtype=torch.float64)
    bcd = solve(BCD(stats, lam, V0), tol=1e-9)
    assert torch.equal(bcd.V[:, 8:12], torch.zeros(5, 4, dtype=torch.float64))
    assert bcd.certificate().rel_gap <= 1e-9 and len(bcd.L) == 9 and bcd.L[2] == 0


# --- badly conditioned: patches of smooth maps ---------------------------------------------

def test_bcd_solves_a_badly_conditioned_patch_problem_in_fewer_epochs_than_fista_steps():
    X, Y, b = patch_problem(9)
    stats = stats_of(X, Y, b, 9)
    eig = torch.linalg.eigvalsh(stats.G)
    assert eig[-1] / eig[0] > 1e4  # badly conditioned, as a convolution's patches are
    bcd = BCD(stats, 0.05 * lambda_max(stats), zeros(stats))
    assert 2 / 6 * eig[-1] > 10 * bcd.L.max()  # FISTA's step is ten times smaller than any group's
    lam = 0.05 * lambda_max(stats)
    plain = solve(BCD(stats, lam, zeros(stats), anderson=0), tol=1e-6, max_steps=3000)
    assert plain.certificate().rel_gap <= 1e-6
    bcd = solve(BCD(stats, lam, zeros(stats)), tol=1e-6, max_steps=3000)  # with Anderson extrapolation
    assert bcd.certificate().rel_gap <= 1e-6 and bcd.iterations < plain.iterations
    fista = solve(FISTA(stats, lam, zeros(stats)), tol=1e-6, max_steps=2 * bcd.iterations)
    assert fista.certificate().rel_gap > 1e-6  # FISTA, at twice as many steps of about the same cost, has not
    ws = solve(WorkingSet(stats, lam, zeros(stats)), tol=1e-6)
    assert ws.inner == "bcd" and ws.certificate().rel_gap <= 1e-6
    assert objective(stats, ws.V, lam) == pytest.approx(objective(stats, bcd.V, lam), rel=1e-5)
    assert torch.equal(group_norms(ws.V, 9) == 0, group_norms(bcd.V, 9) == 0)
    assert 0 < int((group_norms(bcd.V, 9) == 0).sum()) < stats.groups


# --- state ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options", [("bcd", {}), ("bcd", {"anderson": 4}), ("working_set", {})])
def test_grouped_state_round_trip_continues_exactly(name, options):
    """With anderson = 4 the checkpoint falls between two extrapolations (3 of 5 iterates kept)."""
    X, Y, b = make_problem(10, n=80, K=36, D=5)
    stats = stats_of(X, Y, b, 4)
    lam = 0.1 * lambda_max(stats)
    V0 = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 36)))
    straight = SOLVERS[name](stats, lam, V0, **options)
    for _ in range(8):
        straight.step()
    first = SOLVERS[name](stats, lam, V0, **options)
    for _ in range(3):
        first.step()
    state = first.state_dict()
    resumed = SOLVERS[name](stats, lam, torch.zeros_like(V0), **options)
    resumed.load_state_dict(state)
    for _ in range(5):
        resumed.step()
    assert torch.equal(resumed.V, straight.V)
    if name == "bcd":
        assert torch.equal(resumed.P, straight.P)


# --- g = 1 stays on FISTA ---------------------------------------------------------------

@pytest.mark.parametrize("D", [5, 60])
def test_group_one_working_set_never_builds_bcd_and_is_the_fista_path(monkeypatch, D):
    X, Y, b = make_problem(11, n=80, K=30, D=D)
    stats = stats_of(X, Y, b, 1)
    lam = 0.1 * lambda_max(stats)
    explicit = solve(WorkingSet(stats, lam, zeros(stats), min_size=2, inner="fista"))
    spy = Spy(monkeypatch)
    auto = solve(WorkingSet(stats, lam, zeros(stats), min_size=2))
    assert spy.kinds() == {"FISTA"} and auto.inner == "fista"
    assert torch.equal(auto.V, explicit.V) and auto.iterations == explicit.iterations
    assert auto.step_size == explicit.step_size and auto.inner_iterations == explicit.inner_iterations
    assert duality_gap(stats, auto.V, lam).rel_gap <= 1e-10


def test_inner_solver_name_is_checked():
    X, Y, b = make_problem(12)
    stats = stats_of(X, Y, b, 3)
    with pytest.raises(ValueError, match="inner solver"):
        WorkingSet(stats, 0.1, zeros(stats), inner="newton")
    assert WorkingSet(stats, 0.1, zeros(stats)).inner == "bcd"
    assert WorkingSet(stats, 0.1, zeros(stats), inner="fista").inner == "fista"


@pytest.mark.parametrize("inner", ["bcd", "fista"])
def test_a_step_past_its_deadline_returns_after_one_inner_iteration(inner):
    """A time limit on a solve reaches inside a working-set step (which can run thousands of
    inner iterations at a small lambda): past the deadline the step ends after the iteration
    under way, with a valid iterate."""
    X, Y, b = patch_problem(7)
    stats = stats_of(X, Y, b, group=9)
    lam = 1e-4 * float(lambda_max(stats))
    free = WorkingSet(stats, lam, zeros(stats), inner=inner, inner_ratio=1e-6)
    free.step()
    assert free.metrics()["inner_iterations"] > 5
    limited = WorkingSet(stats, lam, zeros(stats), inner=inner, inner_ratio=1e-6)
    limited.deadline = time.monotonic() - 1.0
    limited.step()
    assert limited.metrics()["inner_iterations"] == 1
    assert objective(stats, limited.V, lam) < objective(stats, zeros(stats), lam)  # it still moved

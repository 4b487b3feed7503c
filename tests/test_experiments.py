"""The synthetic experiments: neuron sharing (proximal weight decay) and the sparsity of
multi-task-lasso interpolants (Figs. 3-5). CPU, small sizes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cvxpy as cp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.teacher import TeacherDataModule
from experiments import sparsity
from experiments.min_norm import dual_correlations, solve_min_norm, width_bounds
from experiments.random_problems import gaussian_problem, low_rank_problem, trial_rng
from models.shallow_relu import mse_gradients_
from experiments.sparsest import sparsest_exhaustive, sparsest_fast
from lightning_modules.neuron_sharing import NeuronSharing
from train import main as train_main


# ---------------------------------------------------------------- neuron sharing: one step
def _module(regularization: str, **kwargs) -> NeuronSharing:
    torch.manual_seed(0)
    return NeuronSharing(regularization=regularization, **kwargs).double()


def test_proximal_step_thresholds_columns_and_normalises_inputs():
    """One iteration of the module at a zero-residual point (Y = net(X), so the SGD step
    moves nothing): columns of V at or below lr*reg become exactly 0, the others shrink by
    exactly lr*reg in norm along their direction, and every (w_k, b_k) ends at unit norm
    with its direction kept."""
    module = _module("prox", width=6, lr=0.5, reg=0.1, steps_per_batch=1)
    threshold = 0.5 * 0.1
    net = module.net
    with torch.no_grad():
        net.hidden.weight.copy_(torch.tensor([[3.0, 4.0], [0.1, 0.2], [-1.0, 2.0], [0.5, 0.5], [2.0, -1.0],
                                              [0.0, 1.0]]))
        net.hidden.bias.copy_(torch.tensor([0.0, 0.3, -2.0, 0.1, 0.7, -0.5]))
        directions = F.normalize(torch.randn(2, 6, dtype=torch.float64), dim=0)
        norms_before = torch.tensor([0.01, 0.049, 0.2, 1.0, 3.0, 0.0505], dtype=torch.float64)
        net.output.weight.copy_(directions * norms_before)
    X = torch.randn(20, 2, dtype=torch.float64)
    Y = net(X).detach()
    u_before = torch.cat([net.hidden.weight, net.hidden.bias[:, None]], dim=1).detach().clone()
    V_before = net.output.weight.detach().clone()

    optimizer = module.configure_optimizers()
    module.sgd_iteration(X, Y, optimizer.step)

    assert torch.count_nonzero(net.hidden.weight.grad) == 0 and torch.count_nonzero(net.output.weight.grad) == 0
    V_after = net.output.weight.detach()
    below = norms_before <= threshold
    assert below.tolist() == [True, True, False, False, False, False]
    assert torch.equal(V_after[:, below], torch.zeros(2, 2, dtype=torch.float64))  # exactly zero
    shrunk = torch.linalg.vector_norm(V_after[:, ~below], dim=0)
    torch.testing.assert_close(shrunk, norms_before[~below] - threshold, rtol=0, atol=1e-14)
    torch.testing.assert_close(F.normalize(V_after[:, ~below], dim=0), F.normalize(V_before[:, ~below], dim=0))
    u_after = torch.cat([net.hidden.weight, net.hidden.bias[:, None]], dim=1).detach()
    torch.testing.assert_close(torch.linalg.vector_norm(u_after, dim=1), torch.ones(6, dtype=torch.float64),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(u_after, F.normalize(u_before, dim=1), rtol=0, atol=1e-14)


def test_closed_form_gradient_equals_autograd():
    module = _module("none", width=30)
    X, Y = torch.randn(50, 2, dtype=torch.float64), torch.randn(50, 2, dtype=torch.float64)
    mse_gradients_(module.net, X, Y)
    ours = [p.grad.clone() for p in module.net.parameters()]
    module.net.zero_grad()
    F.mse_loss(module.net(X), Y).backward()
    for mine, reference in zip(ours, (p.grad for p in module.net.parameters())):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-14)


def test_weight_decay_mode_is_torch_sgd_with_weight_decay():
    """20 iterations of the module's weight-decay mode equal torch.optim.SGD(weight_decay=reg)
    on autograd's MSE gradient, from the same start."""
    module = _module("weight_decay", width=20, lr=0.2, reg=0.01)
    reference = _module("none", width=20).net
    reference.load_state_dict(module.net.state_dict())
    X, Y = torch.randn(50, 2, dtype=torch.float64), torch.randn(50, 2, dtype=torch.float64)
    optimizer = module.configure_optimizers()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.2, weight_decay=0.01)
    for _ in range(20):
        with torch.no_grad():
            module.sgd_iteration(X, Y, optimizer.step)
        ref_optimizer.zero_grad()
        F.mse_loss(reference(X), Y).backward()
        ref_optimizer.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(module.net.state_dict()[name], value, rtol=1e-10, atol=1e-12)
    assert not torch.equal(module.net.hidden.weight, _module("weight_decay", width=20).net.hidden.weight)


def test_teacher_data_is_seeded_and_labelled_by_the_teacher():
    a, b, c = TeacherDataModule(seed=3), TeacherDataModule(seed=3), TeacherDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert a.X.shape == (50, 2) and a.Y.shape == (50, 2)
    assert torch.equal(a.X, b.X) and torch.equal(a.Y, b.Y) and not torch.equal(a.X, c.X)
    torch.testing.assert_close(a.Y, a.teacher(a.X))
    assert len(a.train_dataloader()) == 1  # full batch


# ---------------------------------------------------------------- neuron sharing: short runs
def _train(tmp_path: Path, mode: str, *extra: str):
    override = [] if mode == "prox" else ["--config", f"neuron_sharing_{mode}"]  # on top of the base (prox)
    return train_main([
        "--config", "neuron_sharing", *override,
        "--model.init_args.steps_per_batch", "1000",
        "--model.init_args.reg", "1e-3",
        "--trainer.max_epochs", "10",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        *extra,
    ])


def _recount(net, tol: float) -> tuple[list[int], int]:
    """Active neurons per output and shared, recomputed from the weights in numpy."""
    W = net.hidden.weight.detach().numpy()
    b = net.hidden.bias.detach().numpy()
    V = net.output.weight.detach().numpy()
    amplitude = np.abs(V) * np.sqrt((W ** 2).sum(axis=1) + b ** 2)[None, :]
    active = amplitude > tol * amplitude.max()
    return active.sum(axis=1).tolist(), int(active.all(axis=0).sum())


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharing")
    return {mode: _train(tmp / mode, mode) for mode in ("prox", "none")}


def test_prox_kills_neurons_and_none_keeps_all(short_runs):
    prox, none = short_runs["prox"], short_runs["none"]
    prox_report, none_report = prox.model.report(), none.model.report()
    assert none_report["active"] == 100
    # Per output, an unregularised weight is "inactive" only if its initial value happened to
    # be within active_tol of zero and training left it there: rare, not the rule.
    assert none_report["shared"] >= 98
    assert prox_report["active"] <= 20, prox_report  # most of the 100 neurons died in 1e4 iterations (9 here)
    assert prox_report["shared"] >= prox_report["active"] - 1  # the survivors serve both outputs
    assert prox.model.iterations == 10_000 and prox.trainer.global_step == 10
    # The loss still went down: dying neurons are not a failure to fit.
    # 6e-4 here; the targets' variances are 0.56 and 0.19.
    assert float(prox.trainer.callback_metrics["train/loss"]) < 5e-3


def test_reported_counts_match_an_independent_recount(short_runs):
    for mode, cli in short_runs.items():
        module = cli.model
        per_output, shared = _recount(module.net, module.hparams.active_tol)
        report = module.report()
        assert [report["active_output0"], report["active_output1"]] == per_output and report["shared"] == shared
        log_dir = Path(cli.trainer.logger.log_dir)
        written = json.loads((log_dir / "neurons.json").read_text())
        assert [written["active_output0"], written["active_output1"], written["shared"]] == per_output + [shared]
        assert (log_dir / "neuron_sharing.png").stat().st_size > 10_000
        assert float(cli.trainer.callback_metrics["neurons/shared"]) == shared


def test_prox_input_vectors_stay_on_the_sphere_and_dead_columns_are_exact_zeros(short_runs):
    net = short_runs["prox"].model.net
    norms = torch.hypot(torch.linalg.vector_norm(net.hidden.weight, dim=1), net.hidden.bias)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-12)
    dead = torch.linalg.vector_norm(net.output.weight, dim=0) == 0
    assert int(dead.sum()) == 100 - short_runs["prox"].model.report()["active"]


def test_same_seed_same_network(tmp_path):
    a = _train(tmp_path / "a", "prox", "--trainer.max_epochs", "2")
    b = _train(tmp_path / "b", "prox", "--trainer.max_epochs", "2")
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name


def test_neuron_sharing_config_prints(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", "neuron_sharing.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "lightning_modules.neuron_sharing.NeuronSharing" in printed and "regularization: prox" in printed


# ---------------------------------------------------------------- min-norm interpolation
@pytest.mark.parametrize("trial", range(3))
def test_min_norm_interpolates_is_optimal_and_respects_the_bounds(trial):
    X, Y = gaussian_problem(trial_rng(0, 3, 6, trial), 80, 6, 3)
    sol = solve_min_norm(X, Y)
    assert sol.ok and sol.certified
    assert np.abs(sol.V @ X - Y).max() < 1e-9 * max(1, np.abs(Y).max())
    assert np.abs(sol.V_solver @ X - Y).max() < 1e-6 * max(1, np.abs(Y).max())
    bounds = width_bounds(X, Y)
    assert bounds == {"rank_x": 6, "rank_y": 3, "paper": 18, "tight": 18}
    nonzero = int(sol.active().sum())
    assert 6 <= nonzero <= bounds["tight"]
    # KKT: ||Lambda x_k|| <= 1 everywhere, = 1 on the support, and v_k parallel to Lambda x_k.
    corr = dual_correlations(X, sol.dual)
    assert corr.max() <= 1 + 1e-8 and np.allclose(corr[sol.active()], 1, atol=1e-8)
    assert abs(float(np.sum(sol.dual * Y)) - sol.value) < 1e-8 * sol.value
    # An independent solver (first-order SCS) on a fresh problem finds the same optimum.
    V = cp.Variable(sol.V.shape)
    scs = cp.Problem(cp.Minimize(cp.sum(cp.norm(V, 2, axis=0))), [V @ X == Y]).solve(solver="SCS", eps=1e-9)
    assert abs(scs - sol.value) < 1e-4 * sol.value
    assert sol.value <= float(np.linalg.norm(sol.V_solver, axis=0).sum()) + 1e-9


@pytest.mark.parametrize("targets, rows", [("paper", 4), ("published", 3)])
def test_rank_deficient_problem_is_reduced_and_solved(targets, rows):
    X, Y = low_rank_problem(trial_rng(0, 4, 3, 0), 40, 8, 4, 3, targets)
    assert np.linalg.matrix_rank(X) == 3 and Y.shape == (rows, 8)
    sol = solve_min_norm(X, Y)
    assert sol.ok and sol.certified and sol.dual.shape == (rows, 8)
    assert np.abs(sol.V @ X - Y).max() < 1e-9 * np.abs(Y).max()
    bounds = width_bounds(X, Y)
    assert bounds["tight"] == 6 and int(sol.active().sum()) <= 6  # min(3*3, 3*4/2)


def test_infeasible_targets_are_reported():
    X, _ = low_rank_problem(trial_rng(0, 4, 2, 0), 30, 6, 2, 2)
    Y = np.random.default_rng(0).standard_normal((2, 6))  # generic: outside the 2-dim row space
    sol = solve_min_norm(X, Y)
    assert sol.status == "infeasible" and not sol.ok and math.isinf(sol.value)


# ---------------------------------------------------------------- sparsest solutions (Fig. 5)
@pytest.mark.parametrize("K, trial", [(7, 0), (7, 1), (8, 2), (8, 3)])
def test_fast_enumeration_agrees_with_exhaustive(K, trial):
    X, Y = gaussian_problem(trial_rng(0, 5, K, trial), K, 3, 2)
    fast, exhaustive = sparsest_fast(X, Y), sparsest_exhaustive(X, Y)
    assert fast.sparsest == exhaustive.sparsest and 3 <= fast.sparsest <= 6
    assert abs(fast.optimum - exhaustive.optimum) < 1e-8
    assert fast.solves <= 5 < exhaustive.solves == 1 + sum(math.comb(K, s) for s in range(3, K + 1))
    restricted = solve_min_norm(X[list(fast.support)], Y)  # the support found is optimal
    assert restricted.value <= fast.optimum + 1e-6


def test_near_tie_is_decided_like_the_exhaustive_search():
    """Trial 610 of Fig. 5's K = 10: the exact optimum puts a weight of ~1e-6 on a fourth
    column, so the certified solution has 4 nonzero columns, yet three columns reach the
    optimum within the 1e-6 tolerance. Both searches must answer 3."""
    X, Y = gaussian_problem(trial_rng(0, 5, 10, 610), 10, 3, 2)
    fast = sparsest_fast(X, Y)
    exhaustive = sparsest_exhaustive(X, Y, reuse=True)  # compiled problems: the same answers, 3x faster
    assert fast.solution_nonzero == 4 and fast.sparsest == exhaustive.sparsest == 3
    assert fast.support == exhaustive.support


def test_sparsest_beats_the_solver_when_the_optimum_is_not_unique():
    """Feature 5 duplicates feature 0: an optimal solution may split weight between them, so
    the interior-point solution uses both while the sparsest uses one. Both methods find that."""
    rng = np.random.default_rng(7)
    for _ in range(20):  # find a draw in which feature 0 is used at the optimum
        X5, Y = rng.standard_normal((5, 3)), rng.standard_normal((2, 3))
        X = np.vstack([X5, X5[:1]])
        sol = solve_min_norm(X, Y)
        if np.linalg.norm(sol.V_solver[:, 0]) > 1e-3:
            break
    interior = int((np.linalg.norm(sol.V_solver, axis=0) > 1e-7).sum())
    fast, exhaustive = sparsest_fast(X, Y), sparsest_exhaustive(X, Y)
    assert fast.sparsest == exhaustive.sparsest == interior - 1
    assert not {0, 5} <= set(fast.support)


# ---------------------------------------------------------------- the figure commands
def test_figure_commands_write_png_json_and_respect_bounds(tmp_path):
    assert sparsity.main(["--figure", "3", "--trials", "2", "--sizes", "4", "5", "--K", "40", "--D", "3",
                          "--out", str(tmp_path / "f3"), "--no-progress"]) == 0
    assert sparsity.main(["--figure", "4", "--trials", "2", "--sizes", "2", "4", "--K", "30", "--N", "6", "--D", "3",
                          "--out", str(tmp_path / "f4"), "--no-progress"]) == 0
    assert sparsity.main(["--figure", "5", "--trials", "3", "--sizes", "6", "7", "--out", str(tmp_path / "f5"),
                          "--no-progress"]) == 0
    for n in (3, 4, 5):
        folder = tmp_path / f"f{n}"
        assert (folder / f"fig{n}.png").stat().st_size > 10_000
        assert any(p.name.startswith("events.out.tfevents") for p in folder.iterdir())
        data = json.loads((folder / f"fig{n}.json").read_text())
        for setting in data["settings"]:
            counts = [t["nonzero"] for t in setting["trials"]]
            assert sum(setting["histogram"].values()) == len(counts) == data["arguments"]["trials"]
            assert all(t["nonzero"] <= t["tight"] <= t["paper"] for t in setting["trials"])
    f3 = json.loads((tmp_path / "f3" / "fig3.json").read_text())
    again = sparsity.main(["--figure", "3", "--trials", "2", "--sizes", "4", "5", "--K", "40", "--D", "3",
                           "--out", str(tmp_path / "f3b"), "--no-progress"])
    f3b = json.loads((tmp_path / "f3b" / "fig3.json").read_text())
    assert again == 0 and [s["histogram"] for s in f3["settings"]] == [s["histogram"] for s in f3b["settings"]]

"""Saying how much to compress: scale-free lambda ratios, width and accuracy targets, the
paper's absolute setting, and bad input. Pipeline runs on a small synthetic task (seconds)."""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from callbacks.convergence import Convergence
from compression.baselines import torch_pruning_available
from compression.passes import DataPasses, Verdict
from compression.pipeline import CompressionPipeline
from compression.report import format_report, plot_path, write_report
from compression.settings import Target, TrainerSettings
from grouplasso import FISTA, LassoStats
from lightning_modules.lasso import LassoCompression
from models.registry import NetworkSpec
from tests.helpers import ToyDataModule, toy_network


@pytest.fixture(scope="module")
def toy() -> torch.nn.Module:
    return toy_network()


def pipeline(network: torch.nn.Module, folder: Path, **kwargs) -> CompressionPipeline:
    options = {"make_convergence": partial(Convergence, tol=1e-6, verbose=False),
               "trainer": TrainerSettings(accelerator="cpu", enable_progress_bar=False)}
    options.update(kwargs)
    return CompressionPipeline(
        network=network, spec=NetworkSpec("toy", 3), datamodule=ToyDataModule(root=".", num_workers=0, batch_size=256),
        run_dir=folder, cache_dir=None, **options)


def test_lambda_ratios_keep_the_same_neurons_when_inputs_or_outputs_are_scaled(toy, tmp_path):
    """Scaling the layer's inputs by c (and its weight by 1/c: the same function) or its outputs
    by c multiplies lambda_max by c; the same ratio keeps exactly the same neurons."""
    reference = pipeline(toy, tmp_path / "a").run(["4"], lambda_ratios=[0.05])["layers"][0]
    assert 0 < reference["width_after"] < 40
    inputs_scaled = toy_network()
    with torch.no_grad():
        inputs_scaled[2].weight.mul_(7.0), inputs_scaled[2].bias.mul_(7.0), inputs_scaled[4].weight.div_(7.0)
    outputs_scaled = toy_network()
    with torch.no_grad():
        outputs_scaled[4].weight.mul_(3.0), outputs_scaled[4].bias.mul_(3.0)
    for network, c, name in ((inputs_scaled, 7.0, "b"), (outputs_scaled, 3.0, "c")):
        entry = pipeline(network, tmp_path / name).run(["4"], lambda_ratios=[0.05])["layers"][0]
        assert entry["lambda_max"] == pytest.approx(c * reference["lambda_max"], rel=1e-6)
        assert entry["lambda"] == pytest.approx(c * reference["lambda"], rel=1e-6)
        assert entry["ratio"] == pytest.approx(0.05)
        assert entry["kept_indices"] == reference["kept_indices"]


@pytest.mark.parametrize("width", [1, 6, 17])
def test_target_width_keeps_exactly_that_many_neurons(toy, tmp_path, width):
    report = pipeline(toy, tmp_path).run(["4"], target=Target(width=[width]))
    entry = report["layers"][0]
    assert entry["width_after"] == width == linear_widths_of(report)["4"]
    assert entry["chosen_by"] == "width" and len(entry["candidates"]) >= 1
    certified = [c for c in entry["candidates"] if c["resolved"] == "solved"]
    assert all(c["rel_gap"] <= 1e-6 for c in certified)  # every candidate is a certified solve
    widths = [c["width"] for c in entry["candidates"]]
    assert width in widths or "truncated" in entry["stop"]


def linear_widths_of(report: dict) -> dict[str, int]:
    return report["after"]["widths"]


def test_two_layers_by_width_and_the_report_says_how_each_was_chosen(toy, tmp_path):
    report = pipeline(toy, tmp_path).run(["2", "4"], target=Target(width=[30, 12]))
    assert [e["width_after"] for e in report["layers"]] == [30, 12]
    assert report["after"]["widths"] == {"0": 8, "2": 30, "4": 12}
    for entry in report["layers"]:
        assert {"lambda", "lambda_max", "ratio"} <= set(entry)
        assert entry["ratio"] == pytest.approx(entry["lambda"] / entry["lambda_max"])


def test_accuracy_budget_missed_at_every_width_keeps_the_layer(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(DataPasses, "judge", lambda self, network, cut, *args, **kwargs: Verdict(
        0.0, len(cut.labels), torch.zeros(len(cut.labels), dtype=torch.bool)))
    with pytest.warns(UserWarning, match="keeps its full width"):
        report = pipeline(toy, tmp_path).run(["4"], target=Target(max_accuracy_drop=1.0))
    entry = report["layers"][0]
    assert entry["width_after"] == 40 and entry["stop"].startswith("kept at full width")
    assert report["after"]["test_accuracy"] == report["before"]["test_accuracy"]


def test_paper_procedure_runs_above_lambda_max_with_a_warning_and_the_certified_twin(toy, tmp_path):
    top = pipeline(toy, tmp_path / "probe").run(["2"], lambda_ratios=[0.5])["layers"][0]["lambda_max"]
    paper = partial(LassoCompression, solver="paper_adam", lr=0.01)
    with pytest.warns(UserWarning, match=r"above lambda_max.*exact optimum .* removes every neuron"):
        report = pipeline(toy, tmp_path / "paper", make_module=paper,
                          trainer=TrainerSettings(accelerator="cpu", enable_progress_bar=False, max_steps=30)
                          ).run(["2"], lambdas=[1.2 * top])
    entry = report["layers"][0]
    assert entry["lambda"] == pytest.approx(1.2 * top) and entry["width_after"] > 0
    twin = entry["certified_same_width"]
    assert twin["width"] == entry["width_after"] and twin["lambda"] < top and twin["rel_gap"] <= 1e-6


def test_the_comparison_s_time_limit_covers_the_same_lambda_solve_too(toy, tmp_path):
    """One limit for the whole comparison: a same-lambda solve that uses it up leaves the
    same-width search skipped, and the report says so (instead of a second full limit)."""
    top = pipeline(toy, tmp_path / "probe").run(["2"], lambda_ratios=[0.5])["layers"][0]["lambda_max"]
    paper = partial(LassoCompression, solver="paper_adam", lr=0.01)
    report = pipeline(toy, tmp_path / "paper", make_module=paper, comparison_seconds=1e-6,
                      trainer=TrainerSettings(accelerator="cpu", enable_progress_bar=False, max_steps=30)
                      ).run(["2"], lambdas=[0.01 * top])
    twin = report["layers"][0]["certified_same_width"]
    assert "time limit" in twin["same_lambda"]["note"]
    assert twin["width"] is None and twin["resolved"].startswith("skipped: the same-lambda solve used")
    assert "the certified optimum of the same width: skipped" in format_report(report)


def test_a_width_search_under_a_time_limit_stops_the_solve_under_way_and_returns_the_nearest_certified(monkeypatch):
    """Each solve takes 10 (simulated) seconds and widens as lambda falls; a 25-second limit stops the
    third solve after the 5 seconds left, and the answer is the nearest *certified* candidate."""
    import compression.search as search

    clock = [0.0]
    monkeypatch.setattr(search.time, "perf_counter", lambda: clock[0])
    given = []

    def solve(lam, V0, seconds):
        given.append(seconds)
        width = min(40, int(round(0.2 / lam)))  # lambda_max 1: widths 0, 2, 3, ... as lambda falls
        clock[0] += 10.0 if seconds is None or seconds >= 10 else seconds
        V = torch.zeros(3, 40)
        V[:, :width] = 1.0
        return V, (1e-7 if seconds is None or seconds >= 10 else 0.5)

    lam_search = search.LambdaSearch(solve, 1.0)
    found = lam_search.at_width(30, seconds=25)
    assert given == [25, 15, 5]
    assert [c.width for c in lam_search.candidates] == [0, 2, 26] and lam_search.candidates[2].rel_gap == 0.5
    assert "not certified" in lam_search.candidates[2].resolved
    assert found.width == 2 and found.rel_gap == 1e-7
    assert found.resolved.startswith("time limit: width 2 (asked 30) after 3 solves") and "1 solve stopped" in found.resolved
    assert lam_search.deadline is None
    # without a limit the same search reaches 30 exactly, every solve unlimited
    given.clear()
    exact = search.LambdaSearch(solve, 1.0).at_width(30)
    assert exact.width == 30 and set(given) == {None}


def relu_problem(K: int = 300, D: int = 20) -> LassoStats:
    """Statistics of a seeded problem: inputs X = relu(Z A) (400 samples, K of rank 8), outputs
    X B / K (D)."""
    g = torch.Generator().manual_seed(0)
    X = torch.relu(torch.randn(400, 8, generator=g, dtype=torch.float64) @ torch.randn(8, K, generator=g,
                                                                                       dtype=torch.float64))
    return LassoStats.from_features(X, X @ torch.randn(K, D, generator=g, dtype=torch.float64) / K)


def test_a_solve_stopped_by_its_time_limit_is_not_kept_as_finished(toy, tmp_path):
    stats = relu_problem()
    runner = pipeline(toy, tmp_path, make_convergence=partial(Convergence, tol=1e-14, verbose=False),
                      trainer=TrainerSettings(accelerator="cpu", enable_progress_bar=False, max_steps=10 ** 7))
    solution = runner.solve(stats, 1e-6, torch.zeros(20, 300), "x", tag="timed", seconds=1.0, solver="fista")
    assert solution.reason.startswith("stopped by the time limit (1 s)") and solution.rel_gap > 1e-14
    assert not (tmp_path / "solve" / "timed" / "solution.pt").exists()  # a resumed run solves it again
    # stopped by its step budget instead: that is the configured solve, finished and kept
    budgeted = pipeline(toy, tmp_path, make_convergence=partial(Convergence, tol=1e-14, verbose=False),
                        trainer=TrainerSettings(accelerator="cpu", enable_progress_bar=False, max_steps=3))
    solution = budgeted.solve(stats, 1e-6, torch.zeros(20, 300), "x", tag="budget", seconds=60.0, solver="fista")
    assert solution.steps == 3 and solution.reason.startswith("stopped by the budget")
    assert (tmp_path / "solve" / "budget" / "solution.pt").is_file()


def test_a_solve_checkpoints_for_resuming_only(toy, tmp_path, monkeypatch):
    """Checkpoints every checkpoint_every steps, but none when the solve ends (Lightning's
    save_last would write one there, only for the pipeline to delete it)."""
    saved: list[int] = []
    real = pl.Trainer.save_checkpoint
    monkeypatch.setattr(pl.Trainer, "save_checkpoint", lambda self, *a, **k: (saved.append(self.global_step),
                                                                              real(self, *a, **k)))
    stats = relu_problem()
    runner = pipeline(toy, tmp_path, make_convergence=partial(Convergence, tol=1e-14, verbose=False),
                      trainer=TrainerSettings(accelerator="cpu", enable_progress_bar=False, max_steps=25),
                      checkpoint_every=10)
    runner.solve(stats, 1e-6, torch.zeros(20, 300), "x", tag="a", solver="fista")
    assert saved == [10, 20]  # not at its end, step 25
    assert not (tmp_path / "solve" / "a" / "checkpoints").exists() and (tmp_path / "solve" / "a" / "solution.pt").is_file()
    saved.clear()
    runner.checkpoint_every = 100  # a solve shorter than that writes none at all
    runner.solve(stats, 1e-6, torch.zeros(20, 300), "x", tag="b", solver="fista")
    assert saved == []


@pytest.mark.parametrize("kwargs, message", [
    ({"target": Target(width=[41])}, r"width 41 for '4' is not possible: it has 40 input neurons; choose 1 to 40"),
    ({"target": Target(width=[0])}, r"width 0 for '4' is not possible"),
    ({"target": Target(max_accuracy_drop=-1.0)}, r"max_accuracy_drop is in percentage points"),
    ({"lambda_ratios": [1.5]}, r"lambda ratio must be in \(0, 1\)"),
    ({"lambda_ratios": [0.1], "lambdas": [0.1]}, r"exactly one of .* got lambdas, lambda_ratios"),
    ({}, r"exactly one of .* got none"),
])
def test_impossible_requests_say_what_is_possible(toy, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipeline(toy, tmp_path).run(["4"], **kwargs)


def test_targets_refuse_the_paper_procedure(toy, tmp_path):
    with pytest.raises(ValueError, match="targets need a certified solver"):
        pipeline(toy, tmp_path, make_module=partial(LassoCompression, solver="paper_adam")).run(
            ["4"], target=Target(width=[3]))


@pytest.mark.parametrize("extra, expected", [
    ([], {"target": Target(max_accuracy_drop=0.5, share="cumulative")}),  # the demo config's own choice
    (["--lambdas", "[0.01]"], {"lambdas": [0.01]}),
    (["--lambda_ratios=[0.1,0.2]"], {"lambda_ratios": [0.1, 0.2]}),
    (["--target.width", "[7]"], {"target": Target(width=[7], share="cumulative")}),
    (["--target.share", "macs"], {"target": Target(max_accuracy_drop=0.5, share="macs")}),  # how, not how much
])
def test_the_command_line_choice_replaces_the_config_choice(tmp_path, extra, expected):
    from cli.compress import CompressCLI

    cli = CompressCLI(["--config", "alexnet_fashion_compress", "--checkpoint", "unused.ckpt",
                       "--trainer.logger.init_args.save_dir", str(tmp_path), *extra])
    # the config's way of sharing a budget stays unless the command line changes it
    assert cli.amount() == {"lambdas": None, "lambda_ratios": None, "target": Target(share="cumulative"), **expected}


def test_baselines_at_every_path_width_and_at_the_final_width(toy, tmp_path):
    """--baselines: every method at the widths of the path and of the result, each keeping
    exactly that many neurons; the lasso's own row reproduces the compressed network's accuracy."""
    report = pipeline(toy, tmp_path, baselines=True).run(["4"], target=Target(width=[6]),
                                                         path_ratios=[0.5, 0.2, 0.05])
    rows, entry = report["baselines"]["4"], report["layers"][0]
    widths = {r["active"] for r in report["paths"]["4"] if r["active"]} | {6}
    methods = {"magnitude", "magnitude_refit", "activation", "lasso", "lasso_refit"}
    if torch_pruning_available():
        methods |= {"torch_pruning_magnitude", "torch_pruning_taylor"}
    assert {(r["method"], r["width"]) for r in rows} == {(m, w) for m in methods for w in widths}
    assert all(r["kept"] == r["width"] for r in rows)
    final = {r["method"]: r for r in rows if r["width"] == 6}
    # The tail evaluation of the lasso's V equals the pass of the pruned network over the test set.
    assert final["lasso"]["test_accuracy"] == pytest.approx(report["after"]["test_accuracy"], abs=1e-12)
    assert final["lasso"]["train_mse"] == pytest.approx(entry["mse"], rel=1e-9)
    # The refit is the least-squares optimum on the lasso's support: never a worse MSE.
    assert final["lasso_refit"]["train_mse"] <= final["lasso"]["train_mse"] * (1 + 1e-9)
    assert final["magnitude_refit"]["train_mse"] <= final["magnitude"]["train_mse"] * (1 + 1e-9)
    written = write_report(report, tmp_path / "report")
    assert tmp_path / "report" / "path-4.png" in written and (tmp_path / "report" / "path-4.png").stat().st_size > 0
    text = format_report(report)
    assert "baselines at equal width for 4" in text and "magnitude_refit" in text


def test_the_path_figure_has_one_line_per_method(toy, tmp_path):
    report = pipeline(toy, tmp_path, baselines=True).run(["4"], lambda_ratios=[0.2], path_ratios=[0.5, 0.1])
    fig = plot_path("4", report["paths"]["4"], report["baselines"]["4"])
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert {"lasso path", "magnitude", "magnitude_refit", "activation", "lasso_refit"} <= labels


def test_a_time_limit_gives_the_solver_its_deadline(toy, tmp_path, monkeypatch):
    """Lightning's max_time is checked after each solver step; the solver also gets the time left
    as a deadline, which the working-set solver checks inside a step."""
    seen: list = []
    real = FISTA.step
    monkeypatch.setattr(FISTA, "step", lambda self: (seen.append(self.deadline), real(self)))
    stats = relu_problem(K=50, D=5)
    runner = pipeline(toy, tmp_path, trainer=TrainerSettings(accelerator="cpu", enable_progress_bar=False, max_steps=5))
    start = time.monotonic()
    runner.solve(stats, 1e-3, torch.zeros(5, 50), "x", tag="limited", seconds=100.0, solver="fista")
    assert len(seen) == 5 and all(start < d <= start + 100.0 + 1.0 for d in seen)
    seen.clear()
    runner.solve(stats, 1e-3, torch.zeros(5, 50), "x", tag="free", solver="fista")
    assert seen == [None] * 5


def test_an_accuracy_walk_stops_at_the_first_candidate_that_keeps_every_group():
    """Below a solution that keeps all 8 groups every solution keeps them all: the walk ends
    there (None: the floor is missed) instead of halving lambda down to min_ratio."""
    import compression.search as search

    def solve(lam, V0, seconds):
        V = torch.zeros(2, 8)
        V[:, :min(8, int(1 / lam))] = 1.0  # lambda_max 1: widths 2, 4, 8, 8, ...
        return V, 1e-7

    lam_search = search.LambdaSearch(solve, 1.0, evaluate=lambda V: SimpleNamespace(accuracy=0.5, se=0.0, images=10,
                                                                                   correct=None))
    assert lam_search.at_accuracy(0.9) is None
    assert [c.width for c in lam_search.candidates] == [2, 4, 8]


def test_an_accuracy_search_validates_each_kept_set_once(toy, tmp_path):
    """With a refit, surgery's weights depend on the kept neurons alone: a candidate that keeps
    the same neurons as one already validated gets that accuracy without another pass; without
    a refit every candidate is its own network and is validated."""
    from compression.layer_problem import LayerProblem
    from grouplasso import StatsAccumulator, active_groups

    torch.manual_seed(0)
    x = torch.randn(500, 6, dtype=torch.float64)
    W = torch.randn(3, 6, dtype=torch.float64)
    accumulator = StatsAccumulator(6, 3)
    accumulator.update(x, x @ W.T)
    problem = LayerProblem.of(accumulator.finalize(), W)

    class Passes:  # the validation pass: records the weights it is asked about
        def __init__(self):
            self.seen = []

        def judge(self, network, cut, weights, before, floor):
            V, _ = weights["layer"]
            self.seen.append(V)
            return float(len(active_groups(V, 1))) / 10

    same = torch.zeros(3, 6, dtype=torch.float64)
    same[:, :2] = 1.0
    scaled, other = 0.5 * same, same.clone()
    other[:, 4] = 1.0
    for debias, passes_expected in ((True, 2), (False, 3)):
        passes = Passes()
        runner = pipeline(toy, tmp_path, debias=debias)
        runner._val_before = (toy, torch.ones(10, dtype=torch.bool))
        evaluate = runner._validation(toy, problem, passes, None, 0.5)
        accuracies = [evaluate(V) for V in (same, scaled, other)]
        assert accuracies == [0.2, 0.2, 0.3] and len(passes.seen) == passes_expected
        if debias:  # the pass saw the refit: least squares on the kept columns
            torch.testing.assert_close(passes.seen[0][:, :2], torch.linalg.lstsq(x[:, :2], x @ W.T).solution.T)


def test_a_verdict_counts_the_paired_difference_and_its_standard_error():
    """Lost and gained images against a reference, and the standard error of the paired
    difference, against numpy's mean and standard deviation of the per-image differences."""
    import numpy as np

    rng = np.random.default_rng(0)
    reference = rng.random(1000) < 0.9
    correct = reference ^ (rng.random(1000) < 0.06)
    verdict = Verdict.count(torch.from_numpy(correct), torch.from_numpy(reference), lambda t: t)
    d = reference.astype(float) - correct.astype(float)
    assert verdict.accuracy == pytest.approx(correct.mean()) and verdict.images == 1000
    assert (verdict.lost, verdict.gained) == ((reference & ~correct).sum(), (~reference & correct).sum())
    assert verdict.difference == pytest.approx(d.mean())
    assert verdict.se == pytest.approx(d.std() / np.sqrt(1000))


def test_a_validation_pass_stops_early_only_on_a_clear_failure(toy, tmp_path):
    """A candidate that keeps one of 40 neurons fails the floor by far: the pass stops after a few
    batches, and its estimate (the reference's accuracy minus the difference so far) is below
    the floor, as is its accuracy on all images. The layer's own weights pass: every image is
    judged, and the accuracy is the original's exactly."""
    runner = pipeline(toy, tmp_path)
    runner.datamodule.setup("fit")
    passes = DataPasses(runner.datamodule, "", runner.trainer, None, tmp_path)
    cut = passes.cut_inputs(toy, "val", ["4"])
    n = len(cut.labels)
    before = passes.judge(toy, cut, {})
    _, problem, _ = runner.layer_problem(toy, "4", passes)
    floor = before.accuracy - 0.01
    one = problem.W.to(torch.float64).clone()
    one[:, 1:] = 0.0
    bad = problem.weights_with_groups(one)
    stopped = passes.judge(toy, cut, bad, before.correct, floor, batch_size=20)
    whole = passes.judge(toy, cut, bad, before.correct, batch_size=20)
    assert stopped.images < n and whole.images == n
    assert stopped.accuracy < floor and whole.accuracy < floor
    same = passes.judge(toy, cut, problem.weights_with_groups(problem.W.to(torch.float64)), before.correct, floor,
                        batch_size=20)
    assert same.images == n and same.accuracy == pytest.approx(before.accuracy) and same.lost == same.gained == 0


def test_a_margin_of_standard_errors_keeps_a_wider_candidate():
    """Widths 2, 3, 4, 5, 8 with validation accuracy 0.86 + 0.01 * width and a standard error of
    0.012: at the floor 0.895 width 4 passes without a margin; one standard error asks for 0.907,
    which width 5 has."""
    import compression.search as search

    def solve(lam, V0, seconds):
        V = torch.zeros(2, 8)
        V[:, :min(8, int(1 / lam))] = 1.0
        return V, 1e-7

    def evaluate(V):
        width = int((V.abs().sum(0) > 0).sum())
        return SimpleNamespace(accuracy=0.86 + 0.01 * width, se=0.012, images=1000, correct=None)

    assert search.LambdaSearch(solve, 1.0, evaluate=evaluate).at_accuracy(0.895).width == 4
    assert search.LambdaSearch(solve, 1.0, evaluate=evaluate).at_accuracy(0.895, margin=1.0).width == 5


def test_a_margin_run_records_each_candidate_s_standard_error(toy, tmp_path):
    """With ``margin_se``, every candidate row has its standard error and images judged, and the
    kept candidate clears the floor by the margin; a negative margin is refused up front."""
    report = pipeline(toy, tmp_path, margin_se=1.0).run(["4"], target=Target(max_accuracy_drop=2.0))
    entry = report["layers"][0]
    assert entry["margin_se"] == 1.0 and all({"val_se", "val_images"} <= set(c) for c in entry["candidates"])
    kept = [c for c in entry["candidates"] if c["width"] == entry["active"]]
    assert any(c["val_accuracy"] - c["val_se"] >= entry["val_accuracy_floor"] for c in kept)
    assert report["after"]["val_accuracy"] >= entry["val_accuracy_floor"]
    with pytest.raises(ValueError, match="margin_se"):
        pipeline(toy, tmp_path, margin_se=-1.0).plan(["4"], target=Target(max_accuracy_drop=1.0))
    with pytest.raises(ValueError, match="share: macs judges candidates"):
        pipeline(toy, tmp_path, margin_se=1.0).plan(["2", "4"], target=Target(max_accuracy_drop=1.0))


def test_a_cumulative_budget_by_multiply_adds_gives_each_group_its_part(toy, tmp_path):
    """``share: cumulative_macs``: after each group the network may have lost the budget times the
    multiply-adds of the groups so far over all of them; ``cumulative``: i/n of it."""
    def shares(share: str) -> list[float]:
        plans = pipeline(toy, tmp_path).plan(["2", "4"], target=Target(max_accuracy_drop=1.0, share=share))
        return [plan.value for plan in plans]

    # the 48 neurons read by "2" are made by "0" (8 -> 48) and read by "2" (48 -> 40); the 40 read
    # by "4", made by "2" and read by "4" (40 -> 3)
    first, second = 8 * 48 + 48 * 40, 48 * 40 + 40 * 3
    assert shares("cumulative_macs") == pytest.approx([first / (first + second), 1.0])
    assert shares("cumulative") == pytest.approx([0.5, 1.0])

"""A budget over many layers of a residual network: the allocation by what each group's
candidates buy against the cumulative share, on a small synthetic task (seconds)."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from callbacks.convergence import Convergence
from compression.passes import DataPasses
from compression.pipeline import CompressionPipeline
from compression.report import format_report, write_report
from compression.settings import Target, TrainerSettings
from models.checkpoints import load_network
from models.profile import count_macs
from models.registry import NetworkSpec
from tests.helpers import ResidualMLP, ToyDataModule, train_on_toy


@pytest.fixture(scope="module")
def residual() -> nn.Module:
    torch.manual_seed(0)
    return train_on_toy(ResidualMLP())


def pipeline(network: nn.Module, folder, **kwargs) -> CompressionPipeline:
    """The pipeline on ResidualMLP and ToyDataModule, solves certified to the shipped relative gap
    of 1e-4: the allocation is tested here, not the solvers (tests/test_grouplasso.py)."""
    return CompressionPipeline(
        network=network, spec=NetworkSpec({"class_path": "tests.helpers.ResidualMLP"}, 3),
        datamodule=ToyDataModule(root=".", num_workers=0, batch_size=256), run_dir=folder, cache_dir=None,
        make_convergence=partial(Convergence, tol=1e-4, verbose=False), debias=True,
        trainer=TrainerSettings(accelerator="cpu", enable_progress_bar=False), **kwargs)


def test_allocation_keeps_the_budget_on_the_whole_network_and_so_does_the_cumulative_share(residual, tmp_path):
    budget = 2.0
    report = pipeline(residual, tmp_path / "macs").run(["all"], target=Target(max_accuracy_drop=budget))
    groups = [e["layer"] for e in report["layers"]]
    assert groups == ["fc1a", "fc2a", "fc2b"]  # the stream (read by fc1a, fc1b, out) is named by fc1a
    assert report["layers"][0]["stacked"]["consumers"] == ["fc1a", "fc1b", "out"]
    allocation = report["allocation"]
    assert allocation["validation_images"] == 120 and allocation["budget_images"] == 2
    # the chosen set, re-validated on the whole network, is within the budget
    loss = 100 * (report["before"]["val_accuracy"] - report["after"]["val_accuracy"])
    assert loss <= budget + 1e-9
    assert any(t["within_budget"] for t in allocation["tries"])
    assert report["after"]["macs"] < report["before"]["macs"]
    # every option the knapsack had is a certified candidate with its measured loss
    for entry in report["layers"]:
        assert all(c["rel_gap"] <= 1e-4 for c in entry["candidates"])
        assert entry["width_after"] in [c["width"] for c in entry["candidates"]] + [entry["width_before"]]
    # each candidate is judged against the original on the same 120 images: a paired standard error,
    # at least what its net loss of k images implies (lost + gained >= k: se >= sqrt(k - k^2/n) / n)
    losing = [c for e in report["layers"] for c in e["candidates"] if 1 <= c["images_lost"] < 60]
    assert losing and all(c["val_images"] == 120 for e in report["layers"] for c in e["candidates"])
    for c in losing:
        k = c["images_lost"]
        assert c["val_se"] >= (k - k * k / 120) ** 0.5 / 120 - 1e-12
    # the saved network is the allocation's, and loads without the original
    again = load_network(report["network"])
    assert count_macs(again, (8,)) == report["after"]["macs"]
    x = torch.randn(5, 8)
    assert again(x).shape == (5, 3)

    cumulative = pipeline(residual, tmp_path / "cumulative").run(["all"], target=Target(max_accuracy_drop=budget,
                                                                                          share="cumulative"))
    assert 100 * (cumulative["before"]["val_accuracy"] - cumulative["after"]["val_accuracy"]) <= budget + 1e-9
    assert "allocation" not in cumulative and cumulative["after"]["macs"] < cumulative["before"]["macs"]

    written = write_report(report, tmp_path / "macs")
    assert tmp_path / "macs" / "widths.png" in written
    text = format_report(report)
    assert "shared by multiply-adds saved per image lost" in text


def test_the_allocation_counts_widths_rounded_to_a_block(residual, tmp_path):
    """``round_to=8`` on the two internal widths (the stream's stacked problem is rounded in
    tests/test_reference.py): the knapsack chooses, and the report records, the widths surgery
    keeps (each a multiple of 8, or the full width), not the lasso's own supports."""
    report = pipeline(residual, tmp_path, round_to=8).run(["fc2a", "fc2b"], target=Target(max_accuracy_drop=2.0))
    widths = [e["width_after"] for e in report["layers"]]
    assert all(w % 8 == 0 or w == e["width_before"] for w, e in zip(widths, report["layers"]))
    assert any(w < e["width_before"] for w, e in zip(widths, report["layers"]))
    assert [w if k is not None else None for w, k in zip(widths, report["allocation"]["chosen"])] == \
        report["allocation"]["chosen"]
    assert 100 * (report["before"]["val_accuracy"] - report["after"]["val_accuracy"]) <= 2.0 + 1e-9


def test_an_unmet_budget_keeps_every_layer(residual, tmp_path, monkeypatch):
    judge = DataPasses.judge

    def every_candidate_wrong(self, network, cut, weights, *args, **kwargs):
        verdict = judge(self, network, cut, weights, *args, **kwargs)
        if weights:  # a candidate; the original (no weights) is judged as it is
            verdict.accuracy, verdict.correct = 0.0, torch.zeros_like(verdict.correct)
        return verdict

    monkeypatch.setattr(DataPasses, "judge", every_candidate_wrong)
    # two groups, not the stacked stream: every candidate fails, so each group walks its whole path
    report = pipeline(residual, tmp_path).run(["fc2a", "fc2b"], target=Target(max_accuracy_drop=0.5))
    assert all(e["width_after"] == e["width_before"] for e in report["layers"])
    assert report["after"]["macs"] == report["before"]["macs"]


def test_the_corrected_budget_always_changes_an_overshooting_choice():
    from compression.allocation import next_budget

    # ResNet-56's internal widths (a real run): at a budget of 60 images the choice predicted to
    # lose 21 lost 62, and a proportional step (22 * 60 / 62 = 21) kept choosing the same sets
    # until the tries ran out; the next budget is now below the prediction.
    assert next_budget(22, 60, 62.0, 21) == 20
    assert next_budget(20, 60, 63.0, 18) == 17
    assert next_budget(60, 60, 160.0, 60) == 22  # far over: the proportional step is the smaller
    assert next_budget(5, 60, 70.0, 0) is None  # free candidates only, still over: nothing left to try
    assert next_budget(19, 60, 30.0, 18) == 38 and next_budget(60, 60, 0.0, 60) == 240  # within: grow, at most 4x


def test_the_longest_prefix_that_holds_is_found_by_bisection():
    from compression.allocation import Option, by_efficiency, longest_prefix

    options = [[Option(3, 30.0, 0)], [Option(0, 5.0, 0), Option(2, 50.0, 1)], [Option(0, 9.0, 0)], [Option(1, 40.0, 0)]]
    # free first (by saving), then by multiply-adds per image: 40/1 before 50/2 before 30/3
    assert by_efficiency(options, [0, 1, 0, 0]) == [2, 3, 1, 0]
    assert by_efficiency(options, [None, 0, 0, None]) == [2, 1]
    for count in range(0, 9):
        for answer in range(count + 1):
            asked = []
            found = longest_prefix(count, lambda m: asked.append(m) or m <= answer)
            assert found == answer and 0 not in asked and len(asked) <= max(1, count.bit_length())


def test_the_held_out_check_judges_the_network_on_images_no_choice_saw(residual, tmp_path):
    """``held_out``: the candidates are judged on the first 84 of the 120 validation images, the
    finished network on the last 36, against the original (recomputed here from the split); the
    run ends within the budget there or with every cut given back."""
    budget = 2.0
    report = pipeline(residual, tmp_path / "held", held_out=0.3).run(
        ["all"], target=Target(max_accuracy_drop=budget, share="cumulative"))
    assert all(c["val_images"] == 84 for e in report["layers"] for c in e["candidates"])
    check = report["held_out"]
    dm = ToyDataModule(root=".", num_workers=0, batch_size=256)
    dm.setup("fit")
    X, y = (torch.cat(t) for t in zip(*dm.val_dataloader()))
    X, y = X[84:], y[84:]
    network = load_network(report["network"])
    with torch.no_grad():
        original, compressed = residual(X).argmax(1) == y, network(X).argmax(1) == y
    assert check["images"] == 36 and check["original_accuracy"] == pytest.approx(original.float().mean().item())
    assert check["accuracy"] == pytest.approx(compressed.float().mean().item())
    assert check["drop"] == pytest.approx(100 * (original.float().mean() - compressed.float().mean()).item())
    assert check["within_budget"] == (check["drop"] <= budget)
    cut = [e for e in report["layers"] if e["width_after"] < e["width_before"]]
    assert check["within_budget"] or not cut
    assert "held-out val. accuracy" in format_report(report)
    # the floors are the original's accuracy on the choosing images minus each group's part
    choosing = report["before"]["val_accuracy_choosing"]
    assert report["layers"][-1]["val_accuracy_floor"] == pytest.approx(choosing - budget / 100)
    with pytest.raises(ValueError, match="held_out checks a layer-by-layer run"):
        pipeline(residual, tmp_path / "x", held_out=0.3).run(["all"], target=Target(max_accuracy_drop=budget))
    with pytest.raises(ValueError, match="fraction of the validation images"):
        pipeline(residual, tmp_path / "x", held_out=1.5).run(["all"], target=Target(max_accuracy_drop=budget,
                                                                                    share="cumulative"))


class FixedVerdicts:
    """A stand-in for ``DataPasses`` whose networks get the given validation images right."""

    def __init__(self, correct: dict[int, torch.Tensor]) -> None:
        self.by_network = correct

    def correct(self, network, split):
        return self.by_network[id(network)]


def test_the_held_out_check_gives_back_the_last_cuts_until_the_budget_holds(tmp_path):
    """Three groups, the first and last cut, the middle kept at full width: the finished network
    loses 3 of the 10 held-out images (30 points), the one before the last cut 1 (10 points), the
    original none. With a 20-point budget the last cut is given back; with 5 both are."""
    networks = [nn.Linear(1, 1) for _ in range(4)]  # the original, after group 0, after 1, after 2
    right = torch.ones(30, dtype=torch.bool)

    def wrong(count: int) -> torch.Tensor:  # the last ``count`` images (held out) wrong
        return torch.cat([torch.ones(30 - count, dtype=torch.bool), torch.zeros(count, dtype=torch.bool)])
    passes = FixedVerdicts({id(networks[0]): right, id(networks[1]): wrong(1), id(networks[2]): wrong(1),
                            id(networks[3]): wrong(3)})

    def entries():
        return [{"layer": name, "width_before": 8, "width_after": width, "kept_indices": list(range(width))}
                for name, width in (("a", 4), ("b", 8), ("c", 2))]

    run = CompressionPipeline(network=networks[0], spec=NetworkSpec("alexnet", 10), datamodule=None,
                              run_dir=tmp_path, held_out=1 / 3)
    layers = entries()
    network, check = run.check_held_out(networks[3], networks[:3], layers, 20.0, passes, right)
    assert network is networks[2] and check["within_budget"] and check["images"] == 10
    assert [t["drop"] for t in check["tries"]] == pytest.approx([30.0, 10.0])
    assert check["given_back"] == [{"layer": "c", "width": 2}]
    assert [e["width_after"] for e in layers] == [4, 8, 8] and layers[2]["kept_indices"] == list(range(8))
    assert layers[2]["stop"].startswith("given back")

    layers = entries()
    network, check = run.check_held_out(networks[3], networks[:3], layers, 5.0, passes, right)
    assert network is networks[0] and check["within_budget"] and check["drop"] == 0
    assert [g["layer"] for g in check["given_back"]] == ["c", "a"] and [e["width_after"] for e in layers] == [8, 8, 8]

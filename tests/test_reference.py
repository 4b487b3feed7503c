"""Refits aimed at the original network's outputs (``--target.refit_to original``), and on
supports rounded up to a multiple of a block size (``--round_to``).

Layer by layer, a later layer's statistics pair the compressed network's inputs with the
original network's outputs (``compression.reference``). The oracle is least squares on the raw
samples: the compressed layer's weight must be argmin_V ||Y_orig - b - X_comp[:, S] V^T||,
computed here with numpy from the two networks' activations, not from the statistics.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from compress import main as compress
from models.checkpoints import load_network, save_network
from models.registry import NetworkSpec
from tests.helpers import ResidualMLP, ToyDataModule, ToyMLP, toy_compress_args, toy_network, train_on_toy


def _activations(network: nn.Module, X: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and outputs of ``layer`` over ``X``."""
    seen = {}
    hook = network.get_submodule(layer).register_forward_hook(
        lambda m, i, o: seen.update(x=i[0].detach().clone(), y=o.detach().clone()))
    with torch.no_grad():
        network(X)
    hook.remove()
    return seen["x"].double(), seen["y"].double()


def _training_inputs() -> torch.Tensor:
    """The samples the statistics are computed on: ToyDataModule's training split (validation held out)."""
    dm = ToyDataModule(root=".", num_workers=0)
    dm.setup("fit")
    return torch.stack([dm.train_eval_set[i][0] for i in range(len(dm.train_eval_set))])


def _compress(tmp_path, network: nn.Module, cls: type, *extra: str, **kwargs) -> tuple[dict, nn.Module]:
    args = toy_compress_args(tmp_path, "--debias", "true", *extra, network=cls, **kwargs)
    save_network(network, tmp_path / "net.pt", NetworkSpec({"class_path": f"tests.helpers.{cls.__name__}"}, 3))
    report = compress(args)
    return report, load_network(tmp_path / "runs" / "disk" / "run" / "compressed.pt").eval()


def test_later_refit_reproduces_the_original_outputs_from_the_compressed_inputs(tmp_path):
    """Two layers of a trained MLP at fixed widths: the second layer's weight is the least-squares
    fit of the original network's outputs on the compressed network's inputs (numpy oracle), and
    the compressed network's logits are closer to the original's than when each refit reproduces
    the network compressed so far."""
    original = toy_network()
    runs = {}
    for refit_to in ("original", "current"):
        runs[refit_to] = _compress(tmp_path / refit_to, original, ToyMLP, "--target.refit_to", refit_to,
                                   "--lambda_ratios", "null", "--target.width", "[12, 8]", layers='["2", "4"]')
    report, compressed = runs["original"]
    assert [e["width_after"] for e in report["layers"]] == [12, 8]
    assert "refit_to" not in report["layers"][0] and report["layers"][1]["refit_to"] == "original"
    X = _training_inputs()
    x_comp, _ = _activations(compressed, X, "4")
    _, y_orig = _activations(original, X, "4")
    kept = report["layers"][1]["kept_indices"]
    # the compressed layer reads the kept neurons only, in order
    assert compressed.get_submodule("4").in_features == len(kept)
    b = original.get_submodule("4").bias.detach().double()
    oracle, *_ = np.linalg.lstsq(x_comp.numpy(), (y_orig - b).numpy(), rcond=None)
    np.testing.assert_allclose(compressed.get_submodule("4").weight.detach().double().numpy(), oracle.T,
                               rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        target = original(X)
        errors = {k: float((net(X) - target).square().mean()) for k, (_, net) in runs.items()}
    assert errors["original"] < errors["current"], errors


def test_an_internal_width_after_the_coupled_stream_reads_the_original_at_the_kept_units(tmp_path):
    """ResidualMLP: the residual stream first (its consumers fc1a, fc1b and out; producers
    stem, fc2a and fc2b lose outputs), then fc2a's group (fc1a's outputs), whose consumer fc2a
    lost output units in the first step: its original outputs are read at the units it kept.
    Refit to the original, the whole network stays closer to the original than with refits to
    the network compressed so far."""
    torch.manual_seed(0)
    original = train_on_toy(ResidualMLP())
    runs = {refit_to: _compress(tmp_path / refit_to, original, ResidualMLP, "--target.refit_to", refit_to,
                                layers='["out", "fc2a"]', lambda_ratios="[0.1, 0.05]") for refit_to in ("original", "current")}
    report, compressed = runs["original"]
    assert [e["module"] for e in report["layers"]] == ["out", "fc2a"]
    assert report["layers"][1]["refit_to"] == "original"
    widths = [e["width_after"] for e in report["layers"]]
    assert widths == [e["width_after"] for e in runs["current"][0]["layers"]] and widths[0] < 32 and widths[1] < 48
    assert compressed.out.in_features == widths[0] and compressed.fc2a.out_features == widths[0]
    assert compressed.fc1a.out_features == widths[1]
    X = _training_inputs()
    with torch.no_grad():
        target = original(X)
        errors = {k: float((net(X) - target).square().mean()) for k, (_, net) in runs.items()}
    assert errors["original"] < errors["current"], errors


def test_a_residual_streams_consumers_reproduce_the_current_network_not_the_original(tmp_path):
    """ResidualMLP with ``refit_to original``: fc1a's outputs cut to 24 of 48 (refit to the
    original), then the residual stream at its full 32 channels. Its consumers (fc1a, fc1b,
    out) feed one another through the stream, so they reproduce the network compressed so
    far: at full width the second step changes nothing. Refit to the original together, from
    statistics taken before any of them changed, they would each correct what the others'
    refits had already corrected (ResNet-56's third stream: 91.0 % -> 88.2 % at full width)."""
    torch.manual_seed(0)
    original = train_on_toy(ResidualMLP())
    first, after_first = _compress(tmp_path / "first", original, ResidualMLP, "--target.refit_to", "original",
                                   "--lambda_ratios", "null", "--target.width", "[24]", layers='["fc2a"]')
    both, after_both = _compress(tmp_path / "both", original, ResidualMLP, "--target.refit_to", "original",
                                 "--lambda_ratios", "null", "--target.width", "[24, 32]", layers='["fc2a", "fc1a"]')
    assert [e["width_after"] for e in both["layers"]] == [24, 32]
    assert both["layers"][1]["refit_to"].startswith("current")
    X = _training_inputs()
    with torch.no_grad():
        torch.testing.assert_close(after_both(X), after_first(X), rtol=1e-4, atol=1e-4)
        # the original network's outputs differ from these: a refit to them would have moved
        assert (after_first(X) - original(X)).abs().max() > 1e-2


def test_only_a_residual_streams_consumers_are_kept_from_the_original():
    """``ReferenceOutputs.aims_at`` on ResNet-20: a block's internal width (one consumer) aims at
    the original, the stage's stream (nine consumers tied by additions) does not."""
    from compression.reference import ReferenceOutputs
    from models.dependency import analyse_network
    from models.registry import build_model

    network = build_model("resnet20")
    analysis, reference = analyse_network(network), ReferenceOutputs(network)
    assert reference.aims_at(analysis.group_of("layer1.0.conv2"))
    stream = analysis.group_of("layer1.0.conv1")
    assert stream.coupled and len(stream.consumers) > 1 and not reference.aims_at(stream)


def test_output_units_of_a_layer_that_lost_some_are_required(tmp_path):
    """A reference network whose layer has more outputs than the compressed one's, without the
    kept units, is refused with the fix named (not silently misaligned)."""
    from lightning_modules.network_pass import NetworkPass
    original = ToyMLP()
    smaller = ToyMLP()
    smaller[0] = nn.Linear(8, 40)
    smaller[2] = nn.Linear(40, 40)
    module = NetworkPass(smaller, ["0"], targets=original)
    module.on_predict_start()
    with pytest.raises(ValueError, match="output_index"):
        module.predict_step((torch.randn(4, 8), torch.zeros(4, dtype=torch.long)), 0)


def test_convolution_statistics_pair_compressed_patches_with_the_original_kept_channels():
    """ResNet-20 with two of layer1's stream channels removed, then layer1.1.conv2's statistics
    against the original: its output channels (stream channels, now 14 of 16) are read from the
    original at the kept ones, its input patches from the compressed network (explicit patches,
    no F.unfold, as in test_conv_stats)."""
    from compression.reference import ReferenceOutputs
    from lightning_modules.network_pass import run_pass
    from models.dependency import analyse_network
    from models.registry import build_model
    from models.surgery import remove_neurons
    from tests.test_conv_stats import assert_stats, explicit_patches, plain_stats, trainer
    from tests.test_dependency import zeroed_weights
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    original = build_model("resnet20").double().eval()
    stream = analyse_network(original).group_of("layer1.0.conv1")
    dead = torch.tensor([3, 9])
    compressed = remove_neurons(original, stream, zeroed_weights(original, stream, dead)).eval()
    reference = ReferenceOutputs(original)
    kept = [c for c in range(16) if c not in dead.tolist()]
    reference.removed(stream, kept)
    assert reference.output_index["layer1.1.conv2"].tolist() == kept
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    layer = "layer1.1.conv2"
    stats = run_pass(trainer(), compressed, DataLoader(TensorDataset(images, torch.zeros(6, dtype=torch.long)),
                                                       batch_size=4), [layer], targets=original,
                     output_index=reference.output_index).stats[layer]
    x_comp = _activations(compressed, images, layer)[0]
    y_orig = _activations(original, images, layer)[1][:, kept]
    P, _ = explicit_patches(compressed.get_submodule(layer), x_comp)
    R = y_orig.flatten(2).transpose(1, 2)  # (B, P, D); the layer has no bias
    assert_stats(stats, *plain_stats(P.reshape(-1, P.shape[-1]), R.reshape(-1, R.shape[-1])))


def test_rounded_widths_keep_the_lasso_support_and_refit_on_it(tmp_path):
    """``--round_to 8`` on ResidualMLP: fc1a's 48 outputs (fc2a's inputs), then the residual stream
    of 32 (read by fc1a, fc1b and out). Every group keeps a multiple of 8 units; the first keeps
    the lasso's own support (the same run without rounding) plus the units nearest to entering it,
    and fc2a's refit is the least-squares fit on exactly those units (numpy oracle on the
    activations, as above)."""
    torch.manual_seed(0)
    original = train_on_toy(ResidualMLP())
    runs = {name: _compress(tmp_path / name, original, ResidualMLP, *extra, layers='["fc2a", "fc1a"]',
                            lambda_ratios="[0.1, 0.05]") for name, extra in (("plain", ()), ("rounded", ("--round_to", "8")))}
    plain, (report, compressed) = runs["plain"][0], runs["rounded"]
    widths = [e["width_after"] for e in report["layers"]]
    assert all(w % 8 == 0 for w in widths) and [e["round_to"] for e in report["layers"]] == [8, 8]
    lasso_width = plain["layers"][0]["width_after"]
    assert lasso_width % 8 and widths[0] == -(-lasso_width // 8) * 8  # rounded up, not already a multiple
    kept = report["layers"][0]["kept_indices"]
    assert set(kept) > set(plain["layers"][0]["kept_indices"])
    assert compressed.fc1a.out_features == widths[0] and compressed.fc2a.in_features == widths[0]
    assert compressed.stem.out_features == widths[1] and compressed.out.in_features == widths[1]
    X = _training_inputs()
    x, y = _activations(original, X, "fc2a")
    b = original.fc2a.bias.detach().double()
    oracle, *_ = np.linalg.lstsq(x[:, kept].numpy(), (y - b).numpy(), rcond=None)
    # the refit's MSE (fc2a's weight itself lost output units in the stream step after it) is the
    # least-squares optimum on the kept units
    fitted = report["layers"][0]
    assert fitted["mse_debiased"] == pytest.approx(float(((x[:, kept] @ torch.from_numpy(oracle) - (y - b)) ** 2).mean()),
                                                   rel=1e-6)


#: ResidualMLP's stream cut to 20 of 32 channels, then fc1a's outputs to 24 of 48, refit to the original
#: (``layers=["out", "fc2a"]``): the compression both final-refit tests sweep after.
_STREAM_20_INNER_24 = ("--target.refit_to", "original", "--lambda_ratios", "null", "--target.width", "[20, 24]")


def test_the_final_refit_sweep_refits_every_layer_after_the_first_cut_in_forward_order(tmp_path):
    """ResidualMLP, the stream cut to 20 of 32 channels and fc1a's outputs to 24 of 48 (refit to
    the original), then ``--final_refit``: fc1a, fc2a, fc1b, fc2b and out (the first consumer of a
    cut on; the stem reads what it always read) are refit one after the other. Each weight is the
    numpy least-squares fit of the original's outputs at the units the layer kept on the inputs
    of the network refit so far (the oracle sweeps the run's network without the sweep), and the
    in-sample error to the original's outputs never grows."""
    torch.manual_seed(0)
    original = train_on_toy(ResidualMLP())
    _, before = _compress(tmp_path / "plain", original, ResidualMLP, *_STREAM_20_INNER_24, layers='["out", "fc2a"]')
    report, swept = _compress(tmp_path / "swept", original, ResidualMLP, *_STREAM_20_INNER_24, "--final_refit", "true",
                              layers='["out", "fc2a"]')
    assert [e["width_after"] for e in report["layers"]] == [20, 24]
    sweep = report["final_refit"]
    order = ["fc1a", "fc2a", "fc1b", "fc2b", "out"]
    assert [row["layer"] for row in sweep["layers"]] == order
    assert all(row["mse_after"] <= row["mse_before"] * (1 + 1e-9) for row in sweep["layers"])
    assert sweep["kept"] == (sweep["val_accuracy_after"] >= sweep["val_accuracy_before"])
    assert sweep["kept"], sweep  # this case gains; the guard's other side is tested below
    stream, inner = (report["layers"][i]["kept_indices"] for i in (0, 1))
    units = {"fc1a": inner, "fc2a": stream, "fc1b": list(range(48)), "fc2b": stream, "out": list(range(3))}
    X = _training_inputs()
    oracle = copy.deepcopy(before)
    for layer in order:
        x = _activations(oracle, X, layer)[0]
        y = _activations(original, X, layer)[1][:, units[layer]]
        b = oracle.get_submodule(layer).bias.detach().double()
        W, *_ = np.linalg.lstsq(x.numpy(), (y - b).numpy(), rcond=None)
        with torch.no_grad():
            oracle.get_submodule(layer).weight.copy_(torch.from_numpy(W.T))
        np.testing.assert_allclose(swept.get_submodule(layer).weight.detach().double().numpy(), W.T,
                                   rtol=1e-4, atol=1e-5, err_msg=layer)
    assert swept.stem.weight.equal(before.stem.weight)  # before the first cut's consumer: untouched
    with torch.no_grad():
        target = original(X)
        assert (swept(X) - target).square().mean() < (before(X) - target).square().mean()


def test_a_final_refit_that_lowers_validation_accuracy_is_not_kept(tmp_path, monkeypatch):
    """The sweep's guard: when the swept network's validation accuracy is below the network's
    before the sweep, the run keeps (and saves) the network before it. Here every refit is made
    to zero the layer's weights, a sweep that can only lose."""
    import compression.pipeline as pipeline
    from models.surgery import set_weight

    torch.manual_seed(0)
    original = train_on_toy(ResidualMLP())
    monkeypatch.setattr(pipeline, "set_weight",
                        lambda network, layer, V: set_weight(network, layer, torch.zeros_like(V)))
    report, compressed = _compress(tmp_path / "guard", original, ResidualMLP, *_STREAM_20_INNER_24,
                                   "--final_refit", "true", layers='["out", "fc2a"]')
    sweep = report["final_refit"]
    assert sweep["val_accuracy_after"] < sweep["val_accuracy_before"] and not sweep["kept"]
    assert all(compressed.get_submodule(row["layer"]).weight.abs().sum() > 0 for row in sweep["layers"])

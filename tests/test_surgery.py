"""Surgery: the smaller network computes exactly what the original computes with zeroed columns."""
from __future__ import annotations

import pytest
import torch

from models import build_model
from models.registry import NetworkSpec
from models.checkpoints import load_network, save_network
from models.layers import analyse_layer, resolve_layer_name
from models.profile import count_macs, count_parameters, linear_widths
from grouplasso import active_columns
from models.surgery import remove_neurons, with_weights


def _zero_columns(W: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    V = W.detach().clone()
    V[:, torch.rand(V.shape[1], generator=g) < fraction] = 0
    return V


@pytest.mark.parametrize("arch, size", [("alexnet", 64), ("vgg19", 32)])
def test_pruned_network_equals_zeroed_original_layer_by_layer(arch, size):
    torch.manual_seed(0)
    network = build_model(arch).eval()
    x = torch.rand(8, 3, size, size)
    for step, short in enumerate(["first", "pen", "last"]):
        path = resolve_layer_name(network, short, arch)
        info = analyse_layer(network, path)
        V = _zero_columns(network.get_submodule(path).weight, 0.7, seed=step)
        reference = with_weights(network, {path: V})
        smaller = remove_neurons(network, info, {info.name: V}).eval()
        torch.testing.assert_close(smaller(x), reference(x), rtol=1e-5, atol=1e-5)
        assert linear_widths(smaller)[path] == len(active_columns(V)) < V.shape[1]
        network = smaller


def test_alexnet_parameter_counts_drop_by_the_expected_amounts():
    network = build_model("alexnet").eval()
    n0 = count_parameters(network)
    # last: rows of classifier.4 (4096 inputs + bias) and columns of classifier.6 (10 outputs) go
    info = analyse_layer(network, "classifier.6")
    V = _zero_columns(network.classifier[6].weight, 0.8, seed=1)
    m = len(active_columns(V))
    last = remove_neurons(network, info, {info.name: V})
    assert count_parameters(last) == n0 - (4096 - m) * (4096 + 1 + 10)
    assert linear_widths(last) == {"classifier.1": 9216, "classifier.4": 4096, "classifier.6": m}
    # pen: rows of classifier.1 (9216 inputs + bias) and columns of classifier.4 (4096 outputs) go
    V = _zero_columns(network.classifier[4].weight, 0.8, seed=2)
    p = len(active_columns(V))
    pen = remove_neurons(network, analyse_layer(network, "classifier.4"), {"classifier.4": V})
    assert count_parameters(pen) == n0 - (4096 - p) * (9216 + 1 + 4096)
    # first: whole conv channels (all 36 positions unused) go from features.10, their columns from classifier.1
    W = network.classifier[1].weight.detach().clone()
    dead_channels = torch.arange(0, 256, 3)
    for c in dead_channels:
        W[:, c * 36:(c + 1) * 36] = 0
    W[:, 1 * 36 + 5] = 0  # one position of a live channel: skipped by index, the channel stays
    first = remove_neurons(network, analyse_layer(network, "classifier.1"), {"classifier.1": W})
    removed_conv = len(dead_channels) * (256 * 3 * 3 + 1)
    removed_linear = (len(dead_channels) * 36 + 1) * 4096
    assert count_parameters(first) == n0 - removed_conv - removed_linear
    assert first.features[10].out_channels == 256 - len(dead_channels)
    assert count_macs(first, (3, 64, 64)) < count_macs(network, (3, 64, 64))


def test_compressed_network_saves_and_loads_without_the_original(tmp_path):
    torch.manual_seed(0)
    network = build_model("alexnet").eval()
    x = torch.rand(4, 3, 64, 64)
    for path in ("classifier.1", "classifier.4", "classifier.6"):
        V = _zero_columns(network.get_submodule(path).weight, 0.5, seed=3)
        network = remove_neurons(network, analyse_layer(network, path), {path: V}).eval()
    save_network(network, tmp_path / "small.pt", NetworkSpec("alexnet", 10))
    again = load_network(tmp_path / "small.pt")
    assert count_parameters(again) == count_parameters(network)
    torch.testing.assert_close(again(x), network(x))

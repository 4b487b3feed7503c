"""Baselines at equal width (compression/baselines.py): magnitude, activation, lasso, Torch-Pruning."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compression.baselines import activation_scores, equal_width_weights, magnitude_scores, top_groups, torch_pruning_network
from grouplasso import LassoStats, debias, mse
from grouplasso.prox import active_groups
from models.dependency import Consumer, NeuronGroup
from models.layers import analyse_layer
from models.surgery import remove_neurons, with_weights


def tiny_mlp(seed: int = 0, steps: int = 30) -> nn.Module:
    """20 -> 16 -> 12 -> 3 ReLU network, a few Adam steps on a random teacher's labels."""
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    X = torch.randn(256, 20)
    y = (X @ torch.randn(20, 3)).argmax(1)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(network(X), y).backward()
        optimizer.step()
    return network.eval()


def tiny_conv(seed: int = 0) -> nn.Module:
    """Conv(3->6) + BatchNorm (random statistics and affine) + ReLU + pool, flatten (6 x 16), 96 -> 10 -> 3."""
    torch.manual_seed(seed)
    network = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(96, 10), nn.ReLU(), nn.Linear(10, 3),
    )
    bn = network[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    return network.eval()


def tiny_conv_conv(seed: int = 0) -> nn.Module:
    """Conv(3->6) + BatchNorm + ReLU feeding a Conv(6->5, 3x3): the layer "3" is a convolution."""
    torch.manual_seed(seed)
    network = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(80, 3),
    )
    with torch.no_grad():
        network[1].weight.uniform_(0.5, 1.5)
        network[1].running_var.uniform_(0.5, 2.0)
    return network.eval()


def mlp_inputs(n: int = 300, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 20, generator=torch.Generator().manual_seed(seed))


def conv_inputs(n: int = 200, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def layer_io(network: nn.Module, layer: str, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's inputs X (n, K) and outputs Y (n, D), float64; for a Conv2d layer one row
    per (image, output position): X the unfolded patches, Y the D channels there."""
    seen = {}
    module = network.get_submodule(layer)
    handle = module.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        network(inputs)
    handle.remove()
    x, y = seen["x"].double(), seen["y"].double()
    if isinstance(module, nn.Conv2d):
        x = nn.functional.unfold(x, module.kernel_size, padding=module.padding, stride=module.stride)  # (n, K, P)
        x = x.transpose(1, 2).reshape(-1, x.shape[1])
        y = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return x, y


def layer_problem(network: nn.Module, layer: str, inputs: torch.Tensor):
    info = analyse_layer(network, layer)
    X, Y = layer_io(network, layer, inputs)
    module = network.get_submodule(layer)
    stats = LassoStats.from_features(X, Y, bias=module.bias, group=info.consumers[0].group)
    return info, stats, X, Y, module.weight.detach().double().reshape(module.weight.shape[0], -1)


CASES = [("mlp", "2", 6), ("mlp", "4", 5), ("mlp", "4", 12), ("conv", "5", 3), ("conv", "5", 1), ("conv2", "3", 4)]


def make(kind: str):
    return {"mlp": lambda: (tiny_mlp(), mlp_inputs()), "conv": lambda: (tiny_conv(), conv_inputs()),
            "conv2": lambda: (tiny_conv_conv(), conv_inputs(60))}[kind]()


def reads(network: nn.Module, info: NeuronGroup) -> int:
    """How many neurons (producer units) the layer reads."""
    layer = network.get_submodule(info.name)
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features // info.consumers[0].positions


@pytest.mark.parametrize("kind,layer,k", CASES)
def test_every_baseline_keeps_k_neurons_and_surgery_matches_the_zeroed_original(kind, layer, k):
    network, inputs = make(kind)
    info, stats, X, Y, W = layer_problem(network, layer, inputs)
    lasso_V = W.clone()
    lasso_V[:, k * stats.group:] = 0  # any V with k nonzero groups stands in for the lasso solution
    weights = equal_width_weights(stats, W, k, lasso_V=lasso_V)
    assert set(weights) == {"magnitude", "magnitude_refit", "activation", "lasso", "lasso_refit"}
    probe = inputs[:40] + 0.1 * torch.randn_like(inputs[:40])
    for name, V in weights.items():
        assert V.dtype == torch.float64 and V.shape == W.shape
        assert len(active_groups(V, stats.group)) == k, name
        small = remove_neurons(network, info, {info.name: V}).eval()  # (surgery's new BatchNorm starts in train mode)
        assert reads(small, info) == k, name
        with torch.no_grad():
            torch.testing.assert_close(small(probe), with_weights(network, {layer: V})(probe), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,layer,k", CASES)
def test_refit_is_the_least_squares_optimum_on_the_support(kind, layer, k):
    network, inputs = make(kind)
    info, stats, X, Y, W = layer_problem(network, layer, inputs)
    b = network.get_submodule(layer).bias.detach().double()
    weights = equal_width_weights(stats, W, k)
    for name in ("magnitude_refit", "activation"):
        V = weights[name]
        S = torch.nonzero(V.abs().sum(0) > 0).flatten()
        assert len(S) == k * stats.group
        explicit = torch.linalg.lstsq(X[:, S], Y - b, driver="gelsd").solution.T  # (D, |S|)
        torch.testing.assert_close(V[:, S], explicit, atol=1e-7, rtol=1e-6)
        assert mse(stats, V) <= mse(stats, weights["magnitude"] if name == "magnitude_refit" else
                                    W * (V.abs().sum(0) > 0)) + 1e-12
    # The refit's support is the magnitude support.
    assert torch.equal(weights["magnitude_refit"].abs().sum(0) > 0, weights["magnitude"].abs().sum(0) > 0)


@pytest.mark.parametrize("kind,layer,k", CASES)
def test_magnitude_keeps_the_largest_norm_groups_unchanged(kind, layer, k):
    network, inputs = make(kind)
    info, stats, X, Y, W = layer_problem(network, layer, inputs)
    g = stats.group
    norms = torch.stack([W[:, c * g:(c + 1) * g].norm() for c in range(W.shape[1] // g)])
    expected = sorted(torch.argsort(norms, descending=True)[:k].tolist())
    V = equal_width_weights(stats, W, k)["magnitude"]
    assert active_groups(V, g).tolist() == expected
    kept = torch.zeros(W.shape[1], dtype=torch.bool)
    for c in expected:
        kept[c * g:(c + 1) * g] = True
    assert torch.equal(V[:, kept], W[:, kept]) and not V[:, ~kept].any()
    torch.testing.assert_close(magnitude_scores(W, g), norms)


@pytest.mark.parametrize("kind,layer,k", CASES)
def test_activation_score_is_the_rms_of_the_neurons_output_contribution(kind, layer, k):
    network, inputs = make(kind)
    info, stats, X, Y, W = layer_problem(network, layer, inputs)
    g = stats.group
    rms = []
    for c in range(W.shape[1] // g):
        cols = slice(c * g, (c + 1) * g)
        contribution = X[:, cols] @ W[:, cols].T  # (n, D): what group c adds to the layer's output
        rms.append(contribution.square().sum(1).mean().sqrt())
    rms = torch.stack(rms)
    torch.testing.assert_close(activation_scores(stats, W), rms, atol=1e-10, rtol=1e-9)
    if g == 1:
        torch.testing.assert_close(rms, W.norm(dim=0) * torch.diagonal(stats.G).sqrt())
    V = equal_width_weights(stats, W, k)["activation"]
    assert active_groups(V, g).tolist() == sorted(torch.argsort(rms, descending=True)[:k].tolist())


def test_ties_keep_the_lowest_indices():
    assert top_groups(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 2).tolist() == [1, 2]
    assert top_groups(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 4).tolist() == [1, 2, 3, 4]
    assert top_groups(torch.tensor([0.0, 0.0, 0.0]), 1, then=torch.tensor([0.0, 1.0, 1.0])).tolist() == [1]
    X = torch.rand(50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    W = torch.ones(2, 6, dtype=torch.float64)
    stats = LassoStats.from_features(X, X[:, :2] @ W[:, :2].T * 0 + X @ W.T)
    stats.G = torch.eye(6, dtype=torch.float64)  # equal activation scores too
    for name, V in equal_width_weights(stats, W, 3).items():
        assert active_groups(V).tolist() == [0, 1, 2], name


def test_a_conv_layers_4d_weight_is_taken_as_its_flattened_view():
    network, inputs = make("conv2")
    info, stats, X, Y, W = layer_problem(network, "3", inputs)
    assert stats.group == 9 and W.shape == (5, 54)
    flat = equal_width_weights(stats, W, 2)
    four = equal_width_weights(stats, network[3].weight.detach(), 2)
    for name in flat:
        torch.testing.assert_close(four[name], flat[name])


def test_lasso_is_passed_through_and_lasso_refit_is_debias():
    network, inputs = make("mlp")
    info, stats, X, Y, W = layer_problem(network, "4", inputs)
    lasso_V = torch.zeros_like(W)
    S = [1, 4, 7, 10]
    lasso_V[:, S] = 0.5 * W[:, S]
    weights = equal_width_weights(stats, W, 4, lasso_V=lasso_V)
    assert torch.equal(weights["lasso"], lasso_V)
    assert weights["lasso"] is not lasso_V
    torch.testing.assert_close(weights["lasso_refit"], debias(stats, lasso_V))
    assert active_groups(weights["lasso_refit"]).tolist() == S
    assert "lasso" not in equal_width_weights(stats, W, 4)


def test_bad_widths_are_refused():
    network, inputs = make("conv")
    info, stats, X, Y, W = layer_problem(network, "5", inputs)  # 6 groups of 16 columns
    for k in (0, 7, 96, -1):
        with pytest.raises(ValueError, match="1..6"):
            equal_width_weights(stats, W, k)
    for k in (2.0, True, "2"):
        with pytest.raises(ValueError, match="integer"):
            equal_width_weights(stats, W, k)
    assert len(equal_width_weights(stats, W, torch.tensor(2))) == 3  # integer tensors are fine
    lasso_V = W.clone()
    lasso_V[:, 48:] = 0  # 3 groups
    with pytest.raises(ValueError, match="3 nonzero groups, not k = 2"):
        equal_width_weights(stats, W, 2, lasso_V=lasso_V)
    with pytest.raises(ValueError, match="shape"):
        equal_width_weights(stats, W[:, :95], 2)


def test_a_dead_neuron_kept_by_magnitude_keeps_its_weights_after_the_refit():
    network = tiny_mlp()
    with torch.no_grad():
        network[2].bias[3] = -1e3  # neuron 3 of the layer-4 inputs never fires
        network[4].weight[:, 3] = 10.0  # ... and has the largest weights
    info, stats, X, Y, W = layer_problem(network, "4", mlp_inputs())
    assert stats.G[3, 3] == 0
    weights = equal_width_weights(stats, W, 4)
    for name, V in weights.items():
        assert len(active_groups(V)) == 4, name
    assert 3 in active_groups(weights["magnitude_refit"]).tolist()
    assert torch.equal(weights["magnitude_refit"][:, 3], W[:, 3])
    assert 3 not in active_groups(weights["activation"]).tolist()  # its output contribution is zero


# --------------------------------------------------------------------------------------------
# Torch-Pruning
# --------------------------------------------------------------------------------------------

def _tp():
    return pytest.importorskip("torch_pruning", reason="the Torch-Pruning baseline needs pip install -e .[test] (or .[bench])")


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which rows (output units) of ``before`` survive in ``after`` (Torch-Pruning keeps their order)."""
    kept = [int(torch.nonzero((before == row).all(dim=tuple(range(1, before.ndim)))).flatten()[0]) for row in after]
    assert kept == sorted(kept)
    return kept


def _shapes(network: nn.Module, skip: set[str]) -> dict:
    return {name: tuple(t.shape) for name, t in network.state_dict().items() if name.rpartition(".")[0] not in skip}


def _batches(kind: str):
    inputs = mlp_inputs(128, seed=5) if kind == "mlp" else conv_inputs(64, seed=5)  # conv and conv2: images
    labels = torch.randint(0, 3, (len(inputs),), generator=torch.Generator().manual_seed(6))
    return [(inputs[:len(inputs) // 2], labels[:len(inputs) // 2]), (inputs[len(inputs) // 2:], labels[len(inputs) // 2:])]


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
@pytest.mark.parametrize("kind,layer,k", [("mlp", "2", 5), ("mlp", "4", 7), ("conv", "5", 2), ("conv", "5", 6),
                                         ("conv2", "3", 3)])
def test_torch_pruning_reads_exactly_k_and_touches_only_the_producer_norm_and_layer(kind, layer, k, importance):
    _tp()
    network, inputs = make(kind)
    info = analyse_layer(network, layer)
    reference = {name: t.clone() for name, t in network.state_dict().items()}
    pruned, count = torch_pruning_network(network, info, k, importance, example_inputs=inputs[:2],
                                          loss_batches=_batches(kind) if importance == "taylor" else None)
    assert count == k == reads(pruned, info)
    assert not pruned.training and all(p.grad is None for p in pruned.parameters())
    touched = set(info.modules)
    assert _shapes(pruned, touched) == _shapes(network, touched)
    for name, t in pruned.state_dict().items():
        if name.rpartition(".")[0] not in touched:
            assert torch.equal(t, reference[name]), name  # other layers unchanged, values too
    for name, t in network.state_dict().items():
        assert torch.equal(t, reference[name]), name  # the original is not modified
    with torch.no_grad():
        assert pruned(inputs[:4]).shape == (4, 3)


def test_torch_pruning_magnitude_on_an_mlp_drops_the_smallest_group_norms_and_equals_zeroing_them():
    _tp()
    network, inputs = make("mlp")
    info = analyse_layer(network, "4")
    k = 7
    pruned, reads = torch_pruning_network(network, info, k, "magnitude", example_inputs=inputs[:2])
    assert reads == k
    kept = _kept_rows(network[2].weight, pruned[2].weight)
    # Torch-Pruning's GroupMagnitudeImportance (p=2, mean over layers): squared norms of the
    # producer's row and the consumer's column, averaged; biases do not enter.
    score = (network[2].weight.detach().square().sum(1) + network[4].weight.detach().square().sum(0)) / 2
    assert kept == sorted(torch.argsort(score, descending=True)[:k].tolist())
    V = network[4].weight.detach().clone()
    V[:, [j for j in range(12) if j not in kept]] = 0
    with torch.no_grad():
        torch.testing.assert_close(pruned(inputs), with_weights(network, {"4": V})(inputs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pruned(inputs), remove_neurons(network, info, {info.name: V}).eval()(inputs), atol=1e-5, rtol=1e-5)


def test_torch_pruning_magnitude_on_a_conv_net_scores_filter_gamma_and_consumer_columns():
    _tp()
    network, inputs = make("conv")
    info = analyse_layer(network, "5")
    assert (info.producers, info.channel_ops, info.consumers[0].positions) == (("0",), ("1",), 16)
    k = 3
    pruned, reads = torch_pruning_network(network, info, k, "magnitude", example_inputs=inputs[:2])
    assert reads == k
    kept = _kept_rows(network[0].weight, pruned[0].weight)
    conv, bn, consumer = network[0].weight.detach(), network[1].weight.detach(), network[5].weight.detach()
    score = (conv.square().sum((1, 2, 3)) + bn.square() + consumer.square().reshape(10, 6, 16).sum((0, 2))) / 3
    assert kept == sorted(torch.argsort(score, descending=True)[:k].tolist())
    V = consumer.clone().reshape(10, 6, 16)
    V[:, [c for c in range(6) if c not in kept]] = 0
    V = V.reshape(10, 96)
    with torch.no_grad():
        torch.testing.assert_close(pruned(inputs), with_weights(network, {"5": V})(inputs), atol=1e-5, rtol=1e-5)


def test_torch_pruning_taylor_on_an_mlp_scores_weight_times_gradient():
    _tp()
    network, inputs = make("mlp")
    info = analyse_layer(network, "4")
    batches = _batches("mlp")
    reference = [p.grad for p in network.parameters()]
    pruned, reads = torch_pruning_network(network, info, 6, "taylor", example_inputs=inputs[:2], loss_batches=batches)
    assert [p.grad for p in network.parameters()] == reference  # gradients were taken on the copy
    kept = _kept_rows(network[2].weight, pruned[2].weight)
    copy = tiny_mlp()
    for images, labels in batches:
        nn.functional.cross_entropy(copy(images), labels).backward()
    w2, w4 = copy[2].weight, copy[4].weight
    score = ((w2 * w2.grad).abs().sum(1) + (w4 * w4.grad).abs().sum(0)) / 2
    assert kept == sorted(torch.argsort(score.detach(), descending=True)[:6].tolist())


def test_torch_pruning_refuses_other_layers_bad_widths_and_missing_batches():
    _tp()

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(20, 16)
            self.head = nn.Linear(16, 3)
            self.side = nn.Linear(16, 2)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return torch.cat([self.head(h), self.side(h)], dim=1)

    network = TwoHeads().eval()
    info = NeuronGroup(producers=("body",), channel_ops=(), consumers=(Consumer("head", "linear", 1),), width=16)
    with pytest.raises(ValueError, match="'side'"):
        torch_pruning_network(network, info, 8, example_inputs=mlp_inputs(2))
    mlp = tiny_mlp(steps=0)
    info = analyse_layer(mlp, "4")
    for k in (0, 13):
        with pytest.raises(ValueError, match="1..12"):
            torch_pruning_network(mlp, info, k, example_inputs=mlp_inputs(2))
    with pytest.raises(ValueError, match="loss_batches"):
        torch_pruning_network(mlp, info, 4, "taylor", example_inputs=mlp_inputs(2))
    with pytest.raises(ValueError, match="importance"):
        torch_pruning_network(mlp, info, 4, "l1", example_inputs=mlp_inputs(2))


@pytest.mark.parametrize("arch, layer, k", [("resnet20", "layer2.1.conv1", 20), ("resnet20", "layer1.0.conv2", 9),
                                            ("mobilenet_v2", "features.2.conv.2", 40)])
def test_torch_pruning_at_equal_width_on_residual_and_depthwise_groups(arch, layer, k):
    """Torch-Pruning's own dependency graph prunes the same modules as ours (a whole residual
    stream; an expansion with its depthwise convolution), to the same shapes as our surgery."""
    _tp()
    from models.registry import build_model
    from tests.test_dependency import zeroed_weights

    network = build_model(arch, 10, small_input=arch == "mobilenet_v2").eval()
    group = analyse_layer(network, layer)
    x = torch.rand(2, 3, 32, 32)
    pruned, count = torch_pruning_network(network, group, k, "magnitude", example_inputs=x)
    assert count == k
    ours = remove_neurons(network, group, zeroed_weights(network, group, torch.arange(k, group.width)))
    assert {n: tuple(t.shape) for n, t in pruned.state_dict().items()} == \
           {n: tuple(t.shape) for n, t in ours.state_dict().items()}
    with torch.no_grad():
        assert pruned(x).shape == (2, 10)

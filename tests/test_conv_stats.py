"""Statistics of a Conv2d's compression problem (grouplasso.conv, NetworkPass on a Conv2d)
against patches cut out by hand from the zero-padded input, one output position at a time."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from compression.settings import TrainerSettings
from grouplasso import StatsAccumulator, mse
from grouplasso.conv import (
    ConvStatsAccumulator, PositionSampler, conv_chunks, conv_outputs, conv_padding, conv_patches, pixel_route_pays,
)
from lightning_modules.network_pass import run_pass

CONVS = {
    "3x3-pad1": lambda: nn.Conv2d(3, 4, 3, padding=1),
    "3x2-stride2-pad(1,0)": lambda: nn.Conv2d(3, 5, (3, 2), stride=2, padding=(1, 0)),
    "3x3-dilation2-pad2": lambda: nn.Conv2d(2, 3, 3, dilation=2, padding=2),
    "2x4-same-nobias": lambda: nn.Conv2d(2, 3, (2, 4), padding="same", bias=False),  # asymmetric padding
}
IMAGES, BATCH, SIZE = 20, 7, 9  # uneven batches: 7, 7, 6


def network_with(conv: nn.Conv2d) -> nn.Sequential:
    """conv as layer "2" of a small float64 network (in-place ReLU after it, as in AlexNet)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, conv.in_channels, 3, padding=1), nn.ReLU(), conv, nn.ReLU(inplace=True),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(conv.out_channels, 4))
    return net.double()


def data(size: int = SIZE) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(size)
    return torch.randn(IMAGES, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 4, (IMAGES,), generator=g)


def loader(size: int = SIZE) -> DataLoader:
    return DataLoader(TensorDataset(*data(size)), batch_size=BATCH)


def trainer():
    return TrainerSettings(accelerator="cpu", enable_progress_bar=False).data_parallel(use_distributed_sampler=False)


def explicit_patches(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, Tensor]:
    """(B, P, K) patches and (B, P, D) outputs, by slicing the zero-padded input at every output
    position (no F.unfold)."""
    left, right, top, bottom = conv_padding(conv)
    padded = torch.zeros(x.shape[0], x.shape[1], x.shape[2] + top + bottom, x.shape[3] + left + right, dtype=x.dtype)
    padded[:, :, top:top + x.shape[2], left:left + x.shape[3]] = x
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    y = conv(x).detach()
    H, W = y.shape[-2:]
    patches = []
    for i in range(H):
        for j in range(W):
            window = padded[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw]
            assert window.shape[-2:] == (kh, kw)
            patches.append(window.reshape(x.shape[0], -1))
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=x.dtype)
    return torch.stack(patches, dim=1), y.flatten(2).transpose(1, 2) - b


def plain_stats(X: Tensor, R: Tensor) -> tuple[Tensor, Tensor, float, int]:
    """G, C, s, n from rows X (n, K) and outputs less the bias R (n, D), by the definitions."""
    n = X.shape[0]
    return X.T @ X / n, R.T @ X / n, float(R.square().sum()) / n, n


def layer_inputs(net: nn.Sequential, size: int = SIZE) -> Tensor:
    with torch.no_grad():
        return net[:2](data(size)[0])


def assert_stats(stats, G, C, s, n) -> None:
    assert stats.n == n
    torch.testing.assert_close(stats.G, G, rtol=1e-10, atol=1e-10 * float(G.abs().max()))
    torch.testing.assert_close(stats.C, C, rtol=1e-10, atol=1e-10 * float(C.abs().max()))
    assert stats.s == pytest.approx(s, rel=1e-10)


@pytest.mark.parametrize("make", CONVS.values(), ids=CONVS.keys())
def test_statistics_equal_those_of_explicit_patches(make):
    net = network_with(make())
    conv = net[2]
    result = run_pass(trainer(), net, loader(), ["2"])
    P, R = explicit_patches(conv, layer_inputs(net))
    assert result.n == IMAGES
    assert_stats(result.stats["2"], *plain_stats(P.reshape(-1, P.shape[-1]), R.reshape(-1, R.shape[-1])))
    assert result.stats["2"].n == IMAGES * P.shape[1]
    # The unfolded rows themselves, in the documented (image, position) order.
    x = layer_inputs(net)
    torch.testing.assert_close(conv_patches(conv, x), P.reshape(-1, P.shape[-1]), rtol=0, atol=0)
    torch.testing.assert_close(conv_outputs(conv(x).detach()) - (conv.bias.detach() if conv.bias is not None else 0),
                               R.reshape(-1, R.shape[-1]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("make", CONVS.values(), ids=CONVS.keys())
def test_small_inputs_take_the_pixel_route_through_run_pass(make):
    """3x3 maps (AlexNet's last convolutions on 64x64 images): the pixel route, same statistics."""
    net = network_with(make())
    conv = net[2]
    x = layer_inputs(net, 3)
    P, R = explicit_patches(conv, x)
    assert pixel_route_pays(conv, 3, 3, P.shape[1]) == (P.shape[1] > 2)  # not for the 2x1 stride-2 output
    stats = run_pass(trainer(), net, loader(3), ["2"]).stats["2"]
    assert_stats(stats, *plain_stats(P.reshape(-1, P.shape[-1]), R.reshape(-1, R.shape[-1])))


@pytest.mark.parametrize("route", ["patches", "pixels"])
@pytest.mark.parametrize("make", CONVS.values(), ids=CONVS.keys())
def test_both_routes_over_batches_of_several_sizes(make, route):
    """Either route, batches of 3x3, 5x4 and again 3x3 maps, then an (identity) all-reduce."""
    net = network_with(make())
    conv = net[2]
    acc = ConvStatsAccumulator(conv, route=route, budget=10_000)
    Ps, Rs = [], []
    for size in (3, 5, 3):
        x = layer_inputs(net, size)[:, :, :, :size - (size == 5)]
        acc.update(x, conv(x).detach())
        P, R = explicit_patches(conv, x)
        Ps.append(P.reshape(-1, P.shape[-1])), Rs.append(R.reshape(-1, R.shape[-1]))
    acc.all_reduce(lambda t: t)
    stats = acc.finalize()
    assert stats.group == conv.kernel_size[0] * conv.kernel_size[1]
    assert_stats(stats, *plain_stats(torch.cat(Ps), torch.cat(Rs)))


@pytest.mark.parametrize("make", CONVS.values(), ids=CONVS.keys())
def test_the_convolution_weight_reproduces_the_outputs(make):
    net = network_with(make())
    conv = net[2]
    stats = run_pass(trainer(), net, loader(), ["2"]).stats["2"]
    kh, kw = conv.kernel_size
    assert stats.group == kh * kw
    assert (stats.K, stats.D) == (conv.in_channels * kh * kw, conv.out_channels)
    V = conv.weight.detach().reshape(conv.out_channels, -1)
    assert abs(mse(stats, V)) <= 1e-12 * stats.s / stats.D


@pytest.mark.parametrize("make", list(CONVS.values())[:2], ids=list(CONVS.keys())[:2])
def test_sampled_positions(make):
    net = network_with(make())
    conv = net[2]
    P, R = explicit_patches(conv, layer_inputs(net))
    m = 5
    a = run_pass(trainer(), net, loader(), ["2"], positions=m, seed=3).stats["2"]
    b = run_pass(trainer(), net, loader(), ["2"], positions=m, seed=3).stats["2"]
    other = run_pass(trainer(), net, loader(), ["2"], positions=m, seed=4).stats["2"]
    assert a.n == IMAGES * m
    assert torch.equal(a.G, b.G) and torch.equal(a.C, b.C) and a.s == b.s
    assert not torch.equal(a.G, other.G)
    # The same draws, batch by batch, from a sampler seeded alike.
    sampler = PositionSampler(m, seed=3)
    index = torch.cat([sampler(len(batch), P.shape[1]) for batch in torch.arange(IMAGES).split(BATCH)])
    assert index.shape == (IMAGES, m) and all(len(set(row.tolist())) == m for row in index)
    rows = torch.arange(IMAGES)[:, None]
    X, Y = P[rows, index], R[rows, index]
    assert_stats(a, *plain_stats(X.reshape(-1, X.shape[-1]), Y.reshape(-1, Y.shape[-1])))
    # More positions than the output has: all of them.
    full = run_pass(trainer(), net, loader(), ["2"]).stats["2"]
    every = run_pass(trainer(), net, loader(), ["2"], positions=P.shape[1]).stats["2"]
    assert every.n == full.n and torch.equal(every.G, full.G)


@pytest.mark.parametrize("sampled", [False, True])
def test_chunks_give_the_statistics_of_one_chunk(sampled):
    net = network_with(CONVS["3x2-stride2-pad(1,0)"]())
    conv = net[2]
    x = layer_inputs(net)
    y = conv(x).detach()
    index = PositionSampler(4, seed=0)(IMAGES, y.shape[-2] * y.shape[-1]) if sampled else None
    results = []
    for budget in (1, 2**30):
        acc = StatsAccumulator(conv.in_channels * 6, conv.out_channels, bias=conv.bias, group=6)
        chunks = list(conv_chunks(conv, x, y, index, budget=budget))
        assert len(chunks) == (IMAGES if budget == 1 else 1)
        for patches, outputs in chunks:
            assert patches.dtype == outputs.dtype == torch.float64
            acc.update(patches, outputs)
        results.append(acc.finalize())
    tiny, one = results
    assert tiny.n == one.n == IMAGES * (4 if sampled else y.shape[-2] * y.shape[-1])
    assert_stats(tiny, one.G, one.C, one.s, one.n)


@pytest.mark.parametrize("conv, message", [
    (nn.Conv2d(4, 4, 3, groups=2), "groups"),
    (nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
])
def test_unsupported_convolutions_are_refused(conv, message):
    with pytest.raises(ValueError, match=message):
        conv_patches(conv, torch.randn(1, conv.in_channels, 5, 5))
    net = network_with(conv)
    with pytest.raises(ValueError, match=message):
        run_pass(trainer(), net, loader(), ["2"])


def test_positions_apply_to_convolutions_only():
    """A Linear layer has one sample per image: position sampling leaves its statistics alone
    (a coupled group collects convolutions and Linear layers in the same pass)."""
    net = network_with(nn.Conv2d(3, 4, 3, padding=1))
    sampled = run_pass(trainer(), net, loader(), ["2", "6"], positions=3).stats
    whole = run_pass(trainer(), net, loader(), ["6"]).stats["6"]
    torch.testing.assert_close(sampled["6"].G, whole.G, rtol=0, atol=0)
    assert sampled["6"].n == whole.n == IMAGES and sampled["2"].n == 3 * IMAGES
    with pytest.raises(ValueError, match="positive"):
        PositionSampler(0)
    with pytest.raises(ValueError, match="cannot sample"):
        ConvStatsAccumulator(nn.Conv2d(3, 4, 3), positions=3, route="pixels")

"""Conv2d layers compressed by input channel: analysis, names, surgery, saving (CPU, small inputs)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from models.registry import NetworkSpec
from models.checkpoints import load_network, save_network
from models.dependency import Consumer
from models.layers import LayerError, analyse_layer, resolve_layer_name
from models.profile import count_macs, count_parameters, layer_widths, linear_widths
from models.pruned import IndexedLinear
from models.surgery import remove_neurons, with_weights
from models.vgg import VGG19

ALEXNET_CONVS = {"conv2": "features.3", "conv3": "features.6", "conv4": "features.8", "conv5": "features.10"}


@pytest.fixture(scope="module")
def alexnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None, num_classes=10).eval()


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    """VGG-19 in eval mode whose BatchNorms have random running statistics and affine parameters."""
    torch.manual_seed(1)
    model = VGG19(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def _drop_channels(conv: nn.Conv2d, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flattened weight (D, C*kh*kw) with a random subset of input channels zeroed, and the kept channels."""
    g = torch.Generator().manual_seed(seed)
    dead = torch.rand(conv.in_channels, generator=g) < fraction
    V = conv.weight.detach().clone()
    V[:, dead] = 0
    return V.reshape(conv.out_channels, -1), torch.nonzero(~dead).flatten()


def _output_sizes(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Spatial size H*W of every Conv2d's output for input ``x``."""
    sizes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda _m, _i, y, name=name: sizes.__setitem__(name, y[0, 0].numel())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.parametrize("short", list(ALEXNET_CONVS))
def test_alexnet_conv_pruned_equals_zeroed_original(alexnet, short):
    x = torch.rand(4, 3, 64, 64)
    path = resolve_layer_name(alexnet, short, "alexnet")
    assert path == ALEXNET_CONVS[short]
    info = analyse_layer(alexnet, path)
    layer = alexnet.get_submodule(path)
    kh, kw = layer.kernel_size
    assert info.consumers == (Consumer(path, "conv", kh * kw),) and info.channel_ops == ()
    (producer_name,) = info.producers
    producer = alexnet.get_submodule(producer_name)
    assert producer.out_channels == layer.in_channels

    V, kept = _drop_channels(layer, 0.5, seed=len(short) + int(short[-1]))
    removed = layer.in_channels - len(kept)
    assert 0 < removed < layer.in_channels
    reference = with_weights(alexnet, {path: V})
    smaller = remove_neurons(alexnet, info, {info.name: V}).eval()
    with torch.no_grad():
        torch.testing.assert_close(smaller(x), reference(x), rtol=1e-5, atol=1e-5)

    new_layer, new_producer = smaller.get_submodule(path), smaller.get_submodule(producer_name)
    assert (new_layer.in_channels, new_producer.out_channels) == (len(kept), len(kept))
    assert torch.equal(new_layer.weight, V.reshape(layer.weight.shape)[:, kept])
    assert torch.equal(new_producer.weight, producer.weight[kept])
    assert layer_widths(smaller)[path] == len(kept)

    # Parameters: the producer's filters and biases, the layer's input slices.
    p_k = producer.kernel_size[0] * producer.kernel_size[1]
    per_channel = producer.in_channels * p_k + 1 + layer.out_channels * kh * kw
    assert count_parameters(smaller) == count_parameters(alexnet) - removed * per_channel

    # MACs: each removed channel saves its producer filter at every producer output position
    # and its slice of the layer at every layer output position.
    sizes = _output_sizes(alexnet, x[:1])
    saved = removed * (sizes[producer_name] * producer.in_channels * p_k + sizes[path] * layer.out_channels * kh * kw)
    assert count_macs(smaller, (3, 64, 64)) == count_macs(alexnet, (3, 64, 64)) - saved


@pytest.mark.parametrize("conv", ["conv3", "conv5", "conv6"])
def test_vgg_conv_with_batchnorm_pruned_equals_zeroed_original(vgg, conv):
    x = torch.rand(4, 3, 32, 32)
    path = resolve_layer_name(vgg, conv, "vgg19")
    info = analyse_layer(vgg, path)
    i = int(conv[4:])
    assert (info.consumers, info.producers, info.channel_ops) == ((Consumer(path, "conv", 9),), (f"conv{i - 1}",),
                                                                  (f"batch_norm{i - 1}",))

    V, kept = _drop_channels(vgg.get_submodule(path), 0.6, seed=i)
    reference = with_weights(vgg, {path: V})
    smaller = remove_neurons(vgg, info, {info.name: V}).eval()
    with torch.no_grad():
        torch.testing.assert_close(smaller(x), reference(x), rtol=1e-5, atol=1e-5)

    old_norm, norm = vgg.get_submodule(info.channel_ops[0]), smaller.get_submodule(info.channel_ops[0])
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(norm, key), getattr(old_norm, key)[kept]), key
    assert int(norm.num_batches_tracked) == 7
    assert smaller.get_submodule(f"conv{i - 1}").out_channels == smaller.get_submodule(path).in_channels == len(kept)


def test_conv_v_may_be_flat_or_four_dimensional(alexnet):
    path = "features.8"
    V, _ = _drop_channels(alexnet.get_submodule(path), 0.3, seed=5)
    info = analyse_layer(alexnet, path)
    four = V.reshape(alexnet.get_submodule(path).weight.shape)
    assert torch.equal(with_weights(alexnet, {path: V}).get_submodule(path).weight, four)
    a, b = remove_neurons(alexnet, info, {info.name: V}), remove_neurons(alexnet, info, {info.name: four})
    assert torch.equal(a.get_submodule(path).weight, b.get_submodule(path).weight)
    with pytest.raises(ValueError, match="has weight"):
        remove_neurons(alexnet, info, {info.name: V[:, :-1]})


def test_all_zero_conv_keeps_one_zero_channel_and_the_bias():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).eval()
    V = torch.zeros(4, 6 * 9)
    small = remove_neurons(net, analyse_layer(net, "2"), {"2": V})
    x = torch.rand(2, 3, 8, 8)
    assert small[2].in_channels == small[0].out_channels == 1
    torch.testing.assert_close(small(x), with_weights(net, {"2": V})(x))


def test_conv_reading_pixels_is_refused_with_the_reason(alexnet, vgg):
    with pytest.raises(LayerError, match=r"network's input \(e.g. an image's pixels\), not neurons"):
        analyse_layer(alexnet, "features.0")
    with pytest.raises(LayerError, match=r"layer conv1 cannot be compressed: they are the network's input"):
        resolve_layer_name(vgg, "conv1", "vgg19")


class _Concatenated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(12, 4, 3)

    def forward(self, x):
        return self.conv3(torch.cat([torch.relu(self.conv1(x)), torch.relu(self.conv2(x))], dim=1))


@pytest.mark.parametrize(
    "net, layer, reason",
    [
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2)), "2",
         r"grouped convolution \(groups=2\): its channels are tied in groups"),
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8)), "2",
         r"a depthwise convolution: its channels go with the channels it reads"),
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect")), "2",
         r"padding_mode='zeros'"),
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 3)), "2",
         r"'1' \(a GroupNorm\) normalises groups of these channels together"),
        (_Concatenated(), "conv3", r"concatenation 'cat' \(concatenations are not supported yet\)"),
    ],
)
def test_conv_layers_that_cannot_be_cut_are_refused(net, layer, reason):
    with pytest.raises(LayerError, match=reason):
        analyse_layer(net, layer)


def test_short_names_resolve_and_unknown_names_list_the_valid_ones(alexnet, vgg):
    for short, path in ALEXNET_CONVS.items():
        assert resolve_layer_name(alexnet, short, "alexnet") == resolve_layer_name(alexnet, path, "alexnet") == path
    for i in (2, 9, 16):
        assert resolve_layer_name(vgg, f"conv{i}", "vgg19") == f"conv{i}"
    with pytest.raises(LayerError) as err:
        resolve_layer_name(alexnet, "conv1", "alexnet")
    message = str(err.value)
    assert "'conv1' does not exist in this network" in message
    assert ("compressible layers: features.3, features.6, features.8, features.10, classifier.1, classifier.4, "
            "classifier.6") in message
    assert "not compressible: features.0 (they are the network's input" in message
    assert "conv2 = features.3" in message and "first = classifier.1" in message
    with pytest.raises(LayerError, match="is not a Linear or Conv2d layer.*compressible layers: features.3"):
        resolve_layer_name(alexnet, "features.1", "alexnet")


def test_layer_info_groups(alexnet, vgg):
    assert analyse_layer(alexnet, "classifier.1").consumers[0].group == 36  # one group per conv channel
    assert analyse_layer(alexnet, "classifier.4").consumers[0].group == 1
    assert analyse_layer(alexnet, "features.3").consumers[0].group == 25  # 5x5 kernel
    assert analyse_layer(vgg, "classifier.1").consumers[0].group == 1  # 1x1 feature map: one feature per channel
    assert analyse_layer(vgg, "conv16").consumers[0].kind == "conv"
    assert analyse_layer(alexnet, "classifier.1").consumers[0].kind == "linear"


def test_folded_first_layer_reads_one_input_per_kept_channel(alexnet):
    """64x64 inputs end the convolutions at 1x1, so classifier.1's 36 inputs per channel are
    copies: folding each channel's 36 columns into its first keeps the function, and the
    pruned layer is an IndexedLinear reading exactly one feature per kept channel."""
    x = torch.rand(4, 3, 64, 64)
    W = alexnet.classifier[1].weight.detach().clone()
    dead = torch.arange(0, 256, 4)
    kept = torch.tensor([c for c in range(256) if c not in set(dead.tolist())])
    blocks = W.reshape(W.shape[0], 256, 36)
    blocks[:, dead] = 0
    folded = torch.zeros_like(blocks)
    folded[:, :, 0] = blocks.sum(dim=2)
    V = folded.reshape(W.shape)

    info = analyse_layer(alexnet, "classifier.1")
    smaller = remove_neurons(alexnet, info, {info.name: V}).eval()
    first = smaller.classifier[1]
    assert isinstance(first, IndexedLinear)
    assert first.in_features == len(first.index) == len(kept) == smaller.features[10].out_channels
    assert torch.equal(first.index, torch.arange(len(kept)) * 36)
    assert int(first.source_features) == len(kept) * 36
    with torch.no_grad():
        zeroed = with_weights(alexnet, {"classifier.1": blocks.reshape(W.shape)})
        torch.testing.assert_close(smaller(x), zeroed(x), rtol=1e-5, atol=1e-5)
    assert linear_widths(smaller)["classifier.1"] == len(kept)
    # The already compressed layer has no whole-channel groups any more.
    assert analyse_layer(smaller, "classifier.1").consumers[0].group == 1


def test_pruned_conv_network_saves_and_loads_without_the_original(alexnet, tmp_path):
    x = torch.rand(3, 3, 64, 64)
    V, kept = _drop_channels(alexnet.features[6], 0.5, seed=11)
    smaller = remove_neurons(alexnet, analyse_layer(alexnet, "features.6"), {"features.6": V}).eval()
    # and all but 64 pen neurons: the classifier holds most of the 228 MB a whole AlexNet saves to
    W = smaller.classifier[4].weight.detach().clone()
    W[:, 64:] = 0
    smaller = remove_neurons(smaller, analyse_layer(smaller, "classifier.4"), {"classifier.4": W}).eval()
    save_network(smaller, tmp_path / "small.pt", NetworkSpec("alexnet", 10))
    again = load_network(tmp_path / "small.pt")
    assert again.features[6].in_channels == again.features[3].out_channels == len(kept)
    assert again.classifier[1].out_features == again.classifier[4].in_features == 64
    assert count_parameters(again) == count_parameters(smaller)
    with torch.no_grad():
        torch.testing.assert_close(again(x), smaller(x))

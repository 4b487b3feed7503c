"""Neurons of any network: the dependency analysis and the surgery it drives, for every family.

The exactness test of every family: the compressed network's outputs equal the original's
with the removed channels' columns zeroed in every consumer."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from compress import main as compress_main
from models.cifar_resnet import CifarResNet
from models.dependency import LayerError, NeuronGroup, analyse_network
from models.layers import analyse_layer, resolve_layers
from models.pruned import is_depthwise
from models.registry import build_model
from models.surgery import as_weight, prune_channels, remove_neurons, used_channels, with_weights


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode with random BatchNorm statistics and affine parameters, so that a wrong
    entry kept anywhere shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def zeroed_weights(model: nn.Module, group: NeuronGroup, dead: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every consumer's weight with the columns of channels ``dead`` set to zero."""
    out = {}
    for consumer in group.consumers:
        W = model.get_submodule(consumer.name).weight.detach().clone()
        if consumer.kind == "conv":
            W[:, dead] = 0
        else:
            W = W.reshape(W.shape[0], group.width, consumer.positions)
            W[:, dead] = 0
            W = W.reshape(W.shape[0], -1)
        out[consumer.name] = W
    return out


def output_of(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.update(y=o.clone()))
    model(x)
    handle.remove()
    return seen["y"]


def check_surgery(model: nn.Module, layer: str, x: torch.Tensor, fraction: float = 0.5, seed: int = 0) -> NeuronGroup:
    """Remove a random ``fraction`` of the channels feeding ``layer``; the smaller network equals
    the zeroed original, and every module of the group has the kept width."""
    group = analyse_layer(model, layer)
    g = torch.Generator().manual_seed(seed)
    dead = torch.nonzero(torch.rand(group.width, generator=g) < fraction).flatten()
    assert 0 < len(dead) < group.width
    weights = zeroed_weights(model, group, dead)
    smaller = remove_neurons(model, group, weights).eval()
    reference = with_weights(model, weights).eval()
    with torch.no_grad():
        torch.testing.assert_close(smaller(x), reference(x), rtol=1e-4, atol=1e-5)
        first = group.consumers[0].name  # the zeroed channels mattered to the first consumer
        assert not torch.allclose(output_of(model, first, x), output_of(reference, first, x), atol=1e-4)
    kept = group.width - len(dead)
    for name in group.producers:
        m = smaller.get_submodule(name)
        assert (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) == kept, name
    for name in group.channel_ops:
        m = smaller.get_submodule(name)
        assert (m.out_channels if isinstance(m, nn.Conv2d) else m.num_features) == kept, name
    for consumer in group.consumers:
        m = smaller.get_submodule(consumer.name)
        assert (m.in_channels if isinstance(m, nn.Conv2d) else m.in_features // consumer.positions) == kept
    return group


def test_basic_block_internal_width_and_its_coupled_stage():
    model = randomise_norms(torchvision.models.resnet18(num_classes=10))
    x = torch.rand(2, 3, 32, 32)
    internal = check_surgery(model, "layer1.0.conv2", x)
    assert internal.producers == ("layer1.0.conv1",) and internal.channel_ops == ("layer1.0.bn1",)
    stream = check_surgery(model, "layer2.0.conv1", x, seed=1)
    assert stream.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    assert [c.name for c in stream.consumers] == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
                                                   "layer2.0.downsample.0"]
    assert len(stream.coupled_by) == 2 and stream.coupled  # the two residual additions of layer1


def test_bottleneck_internal_widths_and_stream():
    model = randomise_norms(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10))
    x = torch.rand(2, 3, 32, 32)
    assert check_surgery(model, "layer1.0.conv2", x).producers == ("layer1.0.conv1",)
    assert check_surgery(model, "layer1.0.conv3", x, seed=2).producers == ("layer1.0.conv2",)
    stream = check_surgery(model, "layer2.0.conv1", x, seed=3)
    assert stream.producers == ("layer1.0.conv3", "layer1.0.downsample.0")


def test_inverted_residual_expansion_goes_with_its_depthwise_convolution():
    model = randomise_norms(build_model("mobilenet_v2", 10, small_input=True))
    x = torch.rand(2, 3, 32, 32)
    expansion = check_surgery(model, "features.2.conv.2", x)
    assert expansion.producers == ("features.2.conv.0.0",)
    assert expansion.channel_ops == ("features.2.conv.0.1", "features.2.conv.1.0", "features.2.conv.1.1")
    assert is_depthwise(model.get_submodule("features.2.conv.1.0"))
    stream = check_surgery(model, "features.4.conv.0.0", x, seed=4)  # the 24-channel stream of blocks 2 and 3
    assert stream.producers == ("features.2.conv.2", "features.3.conv.2")
    assert [c.name for c in stream.consumers] == ["features.3.conv.0.0", "features.4.conv.0.0"]


def test_squeeze_excitation_ties_its_scale_to_the_expansion():
    model = randomise_norms(build_model("efficientnet_b0", 10))
    x = torch.rand(2, 3, 64, 64)
    group = check_surgery(model, "features.2.0.block.3.0", x)
    assert group.producers == ("features.2.0.block.0.0", "features.2.0.block.2.fc2")
    assert [c.name for c in group.consumers] == ["features.2.0.block.2.fc1", "features.2.0.block.3.0"]
    squeeze = check_surgery(model, "features.2.0.block.2.fc2", x, seed=5)  # the squeeze's own width
    assert squeeze.producers == ("features.2.0.block.2.fc1",)


def test_coupled_residual_stage_of_a_cifar_resnet():
    model = randomise_norms(CifarResNet(20))
    x = torch.rand(2, 3, 32, 32)
    group = check_surgery(model, "layer2.1.conv1", x)
    assert group.producers == ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2", "layer2.2.conv2")
    assert [c.name for c in group.consumers] == ["layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1",
                                                   "layer3.0.downsample.0"]


@pytest.mark.parametrize("arch, size", [("mobilenet_v2", 32), ("resnet20", 32), ("resnet18", 64)])
def test_every_group_cut_at_once_equals_the_zeroed_original(arch, size):
    """What an allocation applies (``CompressionPipeline._apply``): every group's new weights first,
    then every group's channels removed, in one network where one layer is the consumer of one
    group and the producer of another (a projection conv feeds the stream and reads the expansion)."""
    model = randomise_norms(build_model(arch, 10, small_input=True))
    groups = [g for g in analyse_network(model).groups if g.reason is None]
    g = torch.Generator().manual_seed(1)
    weights = {}
    for group in groups:
        weights.update(zeroed_weights(model, group, torch.nonzero(torch.rand(group.width, generator=g) < 0.3).flatten()))
    reference, smaller = with_weights(model, weights), with_weights(model, weights)
    for group in groups:
        prune_channels(smaller, group, used_channels(model, group, weights))
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(smaller(x), reference(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in smaller.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    assert len(groups) >= 12


class GatedNet(nn.Module):
    """Convolutions with GELU and SiLU, a Linear head with GELU: no ReLU anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 10, 3, stride=2)
        self.fc1, self.fc2 = nn.Linear(10 * 7 * 7, 24), nn.Linear(24, 5)

    def forward(self, x):
        x = nn.functional.silu(self.bn1(self.conv1(x)))
        x = nn.functional.gelu(self.conv2(x)).flatten(1)
        return self.fc2(nn.functional.gelu(self.fc1(x)))


@pytest.mark.parametrize("layer", ["conv2", "fc1", "fc2"])
def test_any_elementwise_activation_gelu_and_silu(layer):
    model = randomise_norms(GatedNet())
    group = check_surgery(model, layer, torch.rand(3, 3, 16, 16))
    assert group.consumers[0].positions == (49 if layer == "fc1" else 1)


def test_option_a_shortcut_keeps_internal_widths_and_refuses_the_streams_with_the_coupled_layers():
    model = randomise_norms(CifarResNet(20, shortcut="A"))
    check_surgery(model, "layer2.0.conv2", torch.rand(2, 3, 32, 32))
    with pytest.raises(LayerError, match=r"getitem.*mixes or reshapes channels.*coupled with conv1, layer1.0.conv2"):
        analyse_layer(model, "layer1.1.conv1")


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))


class Softmaxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.softmax(self.fc(x), dim=-1))


@pytest.mark.parametrize("model, layer, reason", [
    (nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)), "2",
     r"LayerNorm\), which normalises across these features: removing one changes the others' normalisation"),
    (Softmaxed(), "out", r"'softmax' \(softmax\), which mixes or reshapes channels"),
    (Shared(), "out", r"'fc' is called 2 times in the forward pass \(shared weights\)"),
    (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "0", r"network's input"),
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4)), "2", r"grouped convolution"),
])
def test_every_unsupported_case_is_refused_with_one_line_saying_why(model, layer, reason):
    with pytest.raises(LayerError, match=reason) as err:
        analyse_layer(model, layer)
    assert "\n" not in str(err.value)


def test_globs_and_all_select_compressible_layers_in_network_order():
    model = CifarResNet(20)
    conv2s = resolve_layers(model, ["layer*.*.conv2"])
    assert conv2s == [f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)]
    every = resolve_layers(model, ["all"])
    assert "conv1" not in every and every[-1] == "fc" and len(every) == 21
    with pytest.raises(LayerError, match="no compressible layer matches 'block\\*'"):
        resolve_layers(model, ["block*"])
    groups = {analyse_network(model).group_of(layer).name for layer in every}
    assert len(groups) == 9 + 3  # nine internal widths, three residual streams


@pytest.mark.parametrize("arch, expected", [
    ("resnet18", ["conv1 ", "no: they are the network's input", "layer1.0.conv1", "yes; with conv1"]),
    ("mobilenet_v2", ["features.1.conv.0.0", "no: a depthwise convolution", "features.1.conv.1", "yes"]),
    ("efficientnet_b0", ["features.1.0.block.1.fc1", "features.1.0.block.1.fc2", "no: a depthwise convolution"]),
])
def test_list_layers_on_torchvision_networks(tmp_path, arch, expected):
    torch.save(torchvision.models.get_model(arch, num_classes=10).state_dict(), tmp_path / "net.pt")
    table = compress_main(["--checkpoint", str(tmp_path / "net.pt"), "--arch", arch, "--list_layers", "true",
                           "--trainer.logger", "false"])["layers_table"]
    for text in expected:
        assert text in table, text
    shares = [float(line.split("%")[0].split()[-1]) for line in table.splitlines()[2:-1]]
    assert sum(shares) == pytest.approx(100, abs=1.0)  # the layers do (almost) all the multiply-adds
    assert table.splitlines()[-1].split()[0].isdigit()  # "<n> of <m> layers can be compressed"


def test_a_weight_in_the_wrong_shape_is_refused():
    model = CifarResNet(20).eval()
    group = analyse_layer(model, "layer1.0.conv2")
    with pytest.raises(ValueError, match="has weight"):
        as_weight(torch.zeros(3, 3), model.layer1[0].conv2.weight, "layer1.0.conv2")
    with pytest.raises(ValueError, match="needs a weight for every consumer"):
        remove_neurons(model, analyse_layer(model, "layer2.1.conv1"), {"layer2.1.conv1": model.layer2[1].conv1.weight})
    assert group.width == 16


def test_a_tail_for_inference_folds_its_batchnorms_and_leaves_the_network_untouched():
    """What a candidate's validation runs (``models.tail.for_inference``): the tail after a
    block input with every BatchNorm folded into its convolution, channels-last, the same
    logits; the network's own weights keep their values and layout."""
    from models.tail import Narrowed, cut_before, for_inference, prefix, tail

    model = randomise_norms(CifarResNet(20))
    before = {name: (value.clone(), value.stride()) for name, value in model.state_dict().items()}
    cut = cut_before(model, ["layer2.1.conv1"])
    V = model.layer2[1].conv1.weight.detach().reshape(32, -1).clone()
    V[:, :9 * 5] = 0  # a candidate without five of the stream's channels
    rest = tail(model, cut, {"layer2.1.conv1": Narrowed(model.layer2[1].conv1, V, 9)}).eval()
    fast = for_inference(rest)
    called = [fast.get_submodule(n.target) for n in fast.graph.nodes if n.op == "call_module"]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in called) == 1  # the candidate's own, after a Narrowed
    assert sum(isinstance(m, nn.BatchNorm2d) for m in rest.modules()) == 11  # 2 in each of 5 blocks, 1 shortcut
    middle = prefix(model, cut)(torch.rand(16, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(fast(middle.contiguous(memory_format=torch.channels_last)), rest(middle),
                                   rtol=1e-4, atol=1e-5)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name][0]) and value.stride() == before[name][1], name

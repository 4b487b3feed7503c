"""Networks, checkpoint formats (the project's, Lightning's, torchvision's, the paper authors'), layer analysis."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from models import build_model
from models.registry import NetworkSpec
from models.checkpoints import CheckpointMismatchError, load_network, save_network
from models.layers import LayerError, analyse_layer, resolve_layer_name

# The VGG-19 checkpoint format of the authors' published training scripts (Shenouda, Parhi, Lee,
# Nowak, JMLR 25(231), 2024; arXiv 2305.16534), written out by hand rather than from our model.
VGG_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]


def authors_vgg_state_dict(narrow: int = 1) -> dict[str, torch.Tensor]:
    """The authors' checkpoint layout with random weights; ``narrow``: every width divided by it
    (a compressed network's shapes: 80 MB less to write where the widths do not matter)."""
    g = torch.Generator().manual_seed(0)
    state, c_in = {}, 3
    for i, c in enumerate(VGG_CHANNELS, start=1):
        c //= narrow
        state[f"conv{i}.weight"] = torch.randn(c, c_in, 3, 3, generator=g) * 0.05
        state[f"batch_norm{i}.weight"] = torch.rand(c, generator=g) + 0.5
        state[f"batch_norm{i}.bias"] = torch.randn(c, generator=g) * 0.1
        state[f"batch_norm{i}.running_mean"] = torch.randn(c, generator=g) * 0.1
        state[f"batch_norm{i}.running_var"] = torch.rand(c, generator=g) + 0.5
        state[f"batch_norm{i}.num_batches_tracked"] = torch.tensor(100)
        c_in = c
    for name, (o, i) in {"1": (512 // narrow, c_in), "4": (512 // narrow, 512 // narrow), "6": (10, 512 // narrow)}.items():
        state[f"classifier.{name}.weight"] = torch.randn(o, i, generator=g) * 0.05
        state[f"classifier.{name}.bias"] = torch.randn(o, generator=g) * 0.05
    return state


def test_vgg19_loads_the_authors_checkpoint_unchanged(tmp_path):
    state = authors_vgg_state_dict()
    torch.save({"net": state, "acc": 93.1, "epoch": 199}, tmp_path / "ckpt.pth")
    model = load_network(tmp_path / "ckpt.pth")
    assert set(model.state_dict()) == set(state)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert torch.equal(model.conv7.weight, state["conv7.weight"])
    # DataParallel-saved variant ("module." prefix) loads too; at an eighth of the widths
    narrow = authors_vgg_state_dict(narrow=8)
    torch.save({"net": {f"module.{k}": v for k, v in narrow.items()}}, tmp_path / "dp.pth")
    dp = load_network(tmp_path / "dp.pth")
    assert all(torch.equal(dp.state_dict()[k], v) for k, v in narrow.items())
    assert dp(x).shape == (2, 10)


def test_alexnet_loads_a_plain_torchvision_state_dict(tmp_path):
    """torchvision's AlexNet, its classifier narrowed as a compressed one is (the full one's
    first classifier layer alone is 151 MB to write and read back)."""
    reference = torchvision.models.alexnet(num_classes=10).eval()
    reference.classifier[1], reference.classifier[4] = torch.nn.Linear(9216, 64), torch.nn.Linear(64, 64)
    reference.classifier[6] = torch.nn.Linear(64, 10)
    torch.save(reference.state_dict(), tmp_path / "alexnet.pt")
    model = load_network(tmp_path / "alexnet.pt")
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(model(x), reference(x))


def test_round_trip_of_the_project_format(tmp_path):
    model = build_model("resnet20", num_classes=7).eval()
    save_network(model, tmp_path / "net.pt", NetworkSpec("resnet20", 7))
    again = load_network(tmp_path / "net.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), model(x))


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    # every tensor of the right shape, backed by one number: the file is kilobytes, not 80 MB
    state = {name: torch.zeros(()).expand(value.shape) for name, value in authors_vgg_state_dict().items()}
    state["classifier.9.weight"] = state.pop("classifier.6.weight")
    state["conv3.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save({"net": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_network(tmp_path / "bad.pth", arch="vgg19", num_classes=10)
    message = str(err.value)
    assert "missing keys (1): classifier.6.weight" in message
    assert "unexpected keys (1): classifier.9.weight" in message
    assert "conv3.weight: checkpoint (128, 64, 5, 5) vs model (128, 64, 3, 3)" in message


def test_unrecognised_architecture_lists_the_known_ones(tmp_path):
    torch.save({"foo.weight": torch.zeros(2, 2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointMismatchError, match="alexnet, vgg19"):
        load_network(tmp_path / "x.pt")


@pytest.mark.parametrize(
    "arch, short, path, producer, positions",
    [
        ("alexnet", "first", "classifier.1", "features.10", 36),
        ("alexnet", "pen", "classifier.4", "classifier.1", 1),
        ("alexnet", "last", "classifier.6", "classifier.4", 1),
        ("vgg19", "last", "classifier.6", "classifier.4", 1),
        ("vgg19", "first", "classifier.1", "conv16", 1),
    ],
)
def test_layer_analysis_finds_the_producer(arch, short, path, producer, positions):
    model = build_model(arch)
    assert resolve_layer_name(model, short, arch) == path
    assert resolve_layer_name(model, path, arch) == path
    info = analyse_layer(model, path)
    assert (info.producers, info.consumers[0].positions) == ((producer,), positions)
    assert info.channel_ops == (("batch_norm16",) if producer == "conv16" else ())
    assert [c.name for c in info.consumers] == [path]


def test_unknown_layer_lists_the_compressible_layers():
    with pytest.raises(LayerError, match=r"compressible layers: features.3, .*classifier.4, classifier.6; "
                                         r"not compressible: features.0 .*short names: first"):
        resolve_layer_name(build_model("alexnet"), "fc7", "alexnet")
    with pytest.raises(LayerError, match="features.0 cannot be compressed: they are the network's input"):
        resolve_layer_name(build_model("alexnet"), "features.0", "alexnet")


def test_any_elementwise_activation_passes_and_layer_norm_is_refused_with_the_reason():
    for activation in (nn.Tanh(), nn.GELU(), nn.SiLU(), nn.Identity()):
        mlp = nn.Sequential(nn.Linear(3, 8), activation, nn.Linear(8, 2))
        assert analyse_layer(mlp, "2").producers == ("0",)
    mlp = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(LayerError, match=r"'1' \(a LayerNorm\), which normalises across these features: removing one "
                                         r"changes the others' normalisation"):
        analyse_layer(mlp, "2")

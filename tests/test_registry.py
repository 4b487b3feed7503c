"""Networks by name and by class, and compressed networks of every family saved and loaded."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_modules.classifier import Classifier
from models.checkpoints import CheckpointMismatchError, load_network, read_checkpoint, save_network
from models.cifar_resnet import CifarResNet
from models.layers import analyse_layer
from models.profile import count_macs, count_parameters, layer_widths
from models.registry import NetworkSpec, build_model
from models.surgery import remove_neurons
from tests.test_dependency import randomise_norms, zeroed_weights


class TinyNet(nn.Module):
    """A network of the user's own, importable by its path."""

    def __init__(self, hidden: int = 12, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def test_cifar_resnets_have_the_published_sizes():
    # He et al. (2016), Table 6: 0.27 M parameters for ResNet-20, 0.85 M for ResNet-56
    assert round(count_parameters(build_model("resnet20")) / 1e6, 2) == 0.27
    assert round(count_parameters(build_model("resnet56")) / 1e6, 2) == 0.86
    assert count_macs(build_model("resnet56"), (3, 32, 32)) == pytest.approx(125.5e6, rel=0.01)
    option_a = CifarResNet(20, shortcut="A")
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in option_a.modules())
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)


def test_torchvision_builders_by_name_with_a_small_input_stem():
    for name in ("resnet18", "mobilenet_v2", "efficientnet_b0", "mobilenet_v3_small"):
        model = build_model(name, 7, small_input=True).eval()
        with torch.no_grad():
            assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    big, small = build_model("resnet18"), build_model("resnet18", small_input=True)
    assert count_macs(small, (3, 32, 32)) > 10 * count_macs(big, (3, 32, 32))  # no stride-4 stem at 32x32
    with pytest.raises(ValueError, match="no small-image stem is defined for 'alexnet'"):
        build_model("alexnet", small_input=True)
    with pytest.raises(ValueError, match="unknown arch 'resnet7'.*resnet20.*mobilenet_v2.*class_path"):
        build_model("resnet7")


def test_any_importable_module_the_lightningcli_way():
    spec = {"class_path": "tests.test_registry.TinyNet", "init_args": {"hidden": 5}}
    model = build_model(spec, num_classes=4)
    assert isinstance(model, TinyNet) and model.head.out_features == 4 and model.head.in_features == 5
    assert isinstance(build_model({"class_path": "torchvision.models.vgg11"}, 3), torchvision.models.VGG)
    with pytest.raises(ValueError, match="cannot be imported"):
        build_model({"class_path": "tests.nowhere.Net"})
    with pytest.raises(ValueError, match="needs 'class_path'"):
        build_model({"init_args": {}})


def test_classifier_checkpoint_rebuilds_a_class_path_network_without_arch(tmp_path):
    spec = {"class_path": "tests.test_registry.TinyNet", "init_args": {"hidden": 6}}
    module = Classifier(arch=spec, num_classes=3)
    trainer_checkpoint = {"pytorch-lightning_version": "2", "hyper_parameters": dict(module.hparams),
                          "state_dict": module.state_dict()}
    torch.save(trainer_checkpoint, tmp_path / "run.ckpt")
    state, info = read_checkpoint(tmp_path / "run.ckpt")
    assert info["arch"] == spec and info["num_classes"] == 3
    again = load_network(tmp_path / "run.ckpt")
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(again(x), module.model.eval()(x))


def compress_some(model: nn.Module, layers: list[str], x: torch.Tensor) -> nn.Module:
    for i, layer in enumerate(layers):
        group = analyse_layer(model, layer)
        dead = torch.arange(i % 2, group.width, 3)
        model = remove_neurons(model, group, zeroed_weights(model, group, dead)).eval()
    return model


@pytest.mark.parametrize("arch, small, layers, size", [
    ("resnet20", False, ["layer1.0.conv2", "layer2.1.conv1", "fc"], 32),
    ("resnet18", True, ["layer1.0.conv2", "layer3.0.conv1"], 32),
    ("mobilenet_v2", True, ["features.2.conv.2", "features.4.conv.0.0", "classifier.1"], 32),
    ("efficientnet_b0", False, ["features.2.0.block.3.0", "features.2.0.block.2.fc2"], 64),
])
def test_compressed_networks_of_every_family_load_without_the_original(tmp_path, arch, small, layers, size):
    spec = NetworkSpec(arch, 10, small)
    model = randomise_norms(spec.build())
    x = torch.rand(2, 3, size, size)
    smaller = compress_some(model, layers, x)
    assert count_parameters(smaller) < count_parameters(model)
    save_network(smaller, tmp_path / "compressed.pt", spec)
    again = load_network(tmp_path / "compressed.pt")
    assert layer_widths(again) == layer_widths(smaller)
    with torch.no_grad():
        torch.testing.assert_close(again(x), smaller(x))
    # A plain state dict (what Torch-Pruning's users ask for) rebuilds with the network's name.
    torch.save(smaller.state_dict(), tmp_path / "state_dict.pt")
    plain = load_network(tmp_path / "state_dict.pt", arch=arch, small_input=small)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), smaller(x))


def test_plain_state_dicts_say_their_network_or_ask_for_it(tmp_path):
    torch.save(CifarResNet(32).state_dict(), tmp_path / "r32.pt")
    assert read_checkpoint(tmp_path / "r32.pt")[1]["arch"] == "resnet32"
    torch.save(torchvision.models.mobilenet_v2(num_classes=10).state_dict(), tmp_path / "mnv2.pt")
    with pytest.raises(CheckpointMismatchError, match="say which it is with --arch"):
        load_network(tmp_path / "mnv2.pt")
    assert isinstance(load_network(tmp_path / "mnv2.pt", arch="mobilenet_v2"), torchvision.models.MobileNetV2)


def test_a_nan_in_a_weight_is_refused_before_any_pass_naming_the_tensor(tmp_path):
    model = build_model("resnet20")
    state = model.state_dict()
    state["layer2.1.conv1.weight"][3, 1, 0, 2] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"layer2.1.conv1.weight\[3, 1, 0, 2\] is nan \(1 non-finite of 9216 values"):
        load_network(tmp_path / "nan.pt")
    state["layer2.1.conv1.weight"][3, 1, 0, 2] = 0.0
    state["fc.bias"][0] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    with pytest.raises(ValueError, match=r"fc.bias\[0\] is inf"):
        load_network(tmp_path / "inf.pt")


def test_a_batch_with_non_finite_activations_stops_the_pass():
    import pytorch_lightning as pl

    from lightning_modules.network_pass import run_pass

    model = build_model("resnet20").eval()
    images = torch.rand(6, 3, 32, 32)
    images[4, 0, 0, 0] = float("inf")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(6, dtype=torch.long)),
                                         batch_size=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False)
    with pytest.raises(FloatingPointError, match=r"batch 1 gives non-finite inputs or outputs at 'layer1.0.conv1'"):
        run_pass(trainer, model, loader, ["layer1.0.conv1"])

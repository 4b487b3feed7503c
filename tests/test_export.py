"""Shipping compressed networks: ONNX and TorchScript files compute what the network computes.

Every family the project compresses, after compression: AlexNet with a conv layer narrowed and
``classifier.1`` an ``IndexedLinear``, a CIFAR ResNet-20 with a coupled residual stream and an
internal width narrowed, MobileNetV2 with an expansion narrowed together with its depthwise
convolution, and a vision transformer with attention heads and MLP neurons removed. BatchNorm layers have random running statistics (eval mode), so an entry exported
in the wrong place shows in the outputs. Exporting is the slow part (seconds per network), so
each network is compressed and exported once per module."""
from __future__ import annotations

import ast
import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models.checkpoints import save_network
from models.export import (ExportMismatchError, check_onnx, check_torchscript, export_onnx, export_torchscript,
                           onnx_latency_ms)
from models.layers import analyse_layer
from models.pruned import IndexedLinear, is_depthwise
from models.registry import NetworkSpec, build_model
from models.surgery import remove_neurons
from tests.test_dependency import randomise_norms, zeroed_weights

REPO = Path(__file__).resolve().parent.parent
NO_EXTRA = "needs the export extra: pip install -e .[export]"


def needs_onnx() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=NO_EXTRA)


def compressed(model: nn.Module, layer: str, fraction: float = 0.5, seed: int = 0) -> nn.Module:
    """``model`` without a random ``fraction`` of the channels feeding ``layer``."""
    group = analyse_layer(model, layer)
    g = torch.Generator().manual_seed(seed)
    dead = torch.nonzero(torch.rand(group.width, generator=g) < fraction).flatten()
    return remove_neurons(model, group, zeroed_weights(model, group, dead)).eval()


def alexnet() -> nn.Module:
    """conv3's inputs narrowed; ``classifier.1`` loses whole conv5 channels and one position of a
    kept channel, so it becomes an IndexedLinear; the pen layer keeps about 2 % of its inputs (a
    whole AlexNet's classifier would make each exported file 175 MB)."""
    torch.manual_seed(0)
    model = compressed(build_model("alexnet").eval(), "features.6")
    W = model.classifier[1].weight.detach().clone()  # (4096, 256 channels * 36 positions)
    for c in range(0, 256, 3):
        W[:, c * 36:(c + 1) * 36] = 0
    W[:, 1 * 36 + 5] = 0
    model = remove_neurons(model, analyse_layer(model, "classifier.1"), {"classifier.1": W}).eval()
    model = compressed(model, "classifier.4", fraction=0.98)
    assert isinstance(model.classifier[1], IndexedLinear) and model.features[10].out_channels < 256
    return model


def resnet20() -> nn.Module:
    torch.manual_seed(0)
    model = randomise_norms(build_model("resnet20"))
    model = compressed(model, "layer2.1.conv1", seed=1)  # the stream of layer2, coupled by its additions
    return compressed(model, "layer1.0.conv2", seed=2)


def mobilenet_v2() -> nn.Module:
    torch.manual_seed(0)
    model = randomise_norms(build_model("mobilenet_v2", 10, small_input=True))
    model = compressed(model, "features.2.conv.2")  # the expansion and its depthwise convolution
    depthwise = model.get_submodule("features.2.conv.1.0")
    assert is_depthwise(depthwise) and depthwise.out_channels < 96
    return model


def vit() -> nn.Module:
    """A small torchvision ViT with half the heads of block 0 and of the MLP neurons of block 1
    removed (its attention is this project's ``HeadAttention``)."""
    from models.attention import HeadAttention, separate_attention
    from tests.test_transformers import small_vit

    model = small_vit()  # its classifier random: torchvision's zero start would hide every difference
    separate_attention(model)
    model = compressed(model, "encoder.layers.encoder_layer_0.self_attention.out_proj", seed=5)
    model = compressed(model, "encoder.layers.encoder_layer_1.mlp.3", seed=6)
    assert model.get_submodule("encoder.layers.encoder_layer_0.self_attention").num_heads < 4
    assert isinstance(model.get_submodule("encoder.layers.encoder_layer_1.self_attention"), HeadAttention)
    return model


NETWORKS = {"alexnet": (alexnet, (3, 64, 64)), "resnet20": (resnet20, (3, 32, 32)),
            "mobilenet_v2": (mobilenet_v2, (3, 32, 32)), "vit": (vit, (3, 32, 32))}


@pytest.fixture(scope="module", params=list(NETWORKS))
def network(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    build, shape = NETWORKS[request.param]
    return request.param, build(), shape, tmp_path_factory.mktemp(request.param)


def test_onnx_file_equals_the_network_for_any_batch_size(network):
    needs_onnx()
    import onnx

    name, model, shape, folder = network
    path = export_onnx(model, folder / f"{name}.onnx", shape)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, i.e. dynamic, batch dimension
    for batch in (1, 5):
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
        difference = check_onnx(path, model, x, rtol=1e-4)
        print(f"{name} ONNX, batch {batch}: {difference}")
        assert difference.max_rel <= 1e-4


def test_torchscript_file_equals_the_network_for_any_batch_size(network):
    name, model, shape, folder = network
    path = export_torchscript(model, folder / f"{name}.pt", shape)
    for batch in (1, 5):
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
        difference = check_torchscript(path, model, x, rtol=1e-4)
        print(f"{name} TorchScript, batch {batch}: {difference}")
        assert difference.max_rel <= 1e-4


@pytest.fixture(scope="module")
def resnets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, nn.Module]:
    """The compressed ResNet-20 and a copy with one weight of a narrowed layer changed."""
    model = resnet20()
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        tampered.layer1[0].conv2.weight[0, 0, 1, 1] += 0.5
    return {"compressed": model, "tampered": tampered}


@pytest.mark.parametrize("size, expected", [(64, nn.Upsample), (100, nn.Upsample), (224, nn.Identity),
                                           (12, nn.AvgPool2d), (5, nn.AdaptiveAvgPool2d)])
def test_adaptive_pools_are_exported_as_the_ordinary_pools_they_are_at_the_input_size(size, expected):
    """AlexNet's pool to 6x6 at 64x64 (its input 1x1: a repetition), 100x100 (2x2), 224x224 (6x6:
    nothing); a 12x12 map pooled to 6x6 (an average pool); a 5x5 one (no plain pool) is left as it
    is. Each time the network computes the same function."""
    from models.export import _static_pools

    torch.manual_seed(0)
    if size < 64:
        model, shape = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d((6, 6))).eval(), (3, size, size)
        name = "1"
    else:
        model, shape, name = build_model("alexnet", 10).eval(), (3, size, size), "avgpool"
    static = _static_pools(model, shape)
    assert type(static.get_submodule(name)) is expected
    assert isinstance(model.get_submodule(name), nn.AdaptiveAvgPool2d)  # the caller's network is left as it was
    x = torch.rand(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(static(x), model(x), rtol=1e-6, atol=1e-6)


def test_checks_fail_on_a_file_of_another_network(resnets, tmp_path):
    x = torch.rand(4, 3, 32, 32)
    torchscript = export_torchscript(resnets["tampered"], tmp_path / "tampered.pt", (3, 32, 32))
    with pytest.raises(ExportMismatchError, match="more than rtol=0.0001"):
        check_torchscript(torchscript, resnets["compressed"], x)
    needs_onnx()
    path = export_onnx(resnets["tampered"], tmp_path / "tampered.onnx", (3, 32, 32))
    check_onnx(path, resnets["tampered"], x)  # the file is right for its own network
    with pytest.raises(ExportMismatchError, match="more than rtol=0.0001"):
        check_onnx(path, resnets["compressed"], x)


def test_latency_of_several_files_measured_in_turns(tmp_path):
    needs_onnx()
    torch.manual_seed(0)
    original = randomise_norms(build_model("resnet20"))
    files = {"original": export_onnx(original, tmp_path / "original.onnx", (3, 32, 32)),
             "compressed": export_onnx(compressed(original, "layer1.0.conv2", fraction=0.7), tmp_path / "small.onnx",
                                       (3, 32, 32))}
    latency = onnx_latency_ms(files, (3, 32, 32), batch_sizes=(1, 64), rounds=3, repeats=2)
    print(f"ONNX Runtime latency (ms): {latency}")
    assert set(latency) == {"original", "compressed"}
    assert all(set(per_batch) == {1, 64} and all(ms > 0 for ms in per_batch.values()) for per_batch in latency.values())


def test_a_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[export\]"):
        check_onnx(tmp_path / "any.onnx", nn.Linear(2, 2), torch.rand(1, 2))


def load_snippet():
    """``docs/load_without_narrow.py`` as a module, imported by path."""
    spec = importlib.util.spec_from_file_location("load_without_narrow", REPO / "docs" / "load_without_narrow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documented_loader_rebuilds_a_compressed_torchvision_network(tmp_path):
    snippet = REPO / "docs" / "load_without_narrow.py"
    imported = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
                for node in ast.walk(ast.parse(snippet.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert imported <= {"__future__", "sys", "pathlib", "torch", "torchvision"}, imported  # not narrow's modules
    model = mobilenet_v2()
    model = compressed(model, "features.4.conv.0.0", seed=4)  # and the 24-channel stream of blocks 2 and 3
    path = save_network(model, tmp_path / "compressed.pt", NetworkSpec("mobilenet_v2", 10, small_input=True))
    again = load_snippet().load_compressed(path)
    assert is_depthwise(again.get_submodule("features.2.conv.1.0"))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_compress_exports_checks_and_times_the_original_and_the_compressed_network(tmp_path):
    """``compress.py --export onnx,torchscript``: both files of both networks next to
    compressed.pt, each within 1e-4 of PyTorch, and ONNX Runtime's latency in the report."""
    pytest.importorskip("onnxruntime", reason="the export extra: pip install -e .[export]")
    from compress import main as compress
    from tests.helpers import toy_compress_args

    report = compress(toy_compress_args(tmp_path, "--export", "onnx,torchscript"))
    export = report["export"]
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".ts.pt")):
        for name in ("original", "compressed"):
            assert export[fmt][name]["file"].endswith(name + suffix) and Path(export[fmt][name]["file"]).is_file()
            assert export[fmt][name]["max_rel_difference"] <= 1e-4
    assert export["onnx"]["compressed"]["bytes"] < export["onnx"]["original"]["bytes"]
    for table in (export["onnx_latency_ms"], export["torch_latency_ms"]):
        assert all(table[name][b] > 0 for name in ("original", "compressed") for b in (1, 64))
    with pytest.raises(ValueError, match="export format 'tflite': choose from onnx, torchscript"):
        compress(toy_compress_args(tmp_path / "bad", "--export", "tflite"))

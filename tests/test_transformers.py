"""Transformers: MLP widths and attention heads, by the same dependency analysis and lasso.

``nn.MultiheadAttention`` becomes ``models.attention.HeadAttention`` (the same function with
separate projections), whose heads are a group of ``head_dim`` columns of ``out_proj``; an
MLP's hidden neurons are a group like any other, the gated (SwiGLU) form a coupled one. The
residual stream is normalised across features (LayerNorm, RMSNorm) and refused."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from callbacks.convergence import Convergence
from compression.pipeline import CompressionPipeline
from compression.settings import Target, TrainerSettings
from models.attention import HeadAttention, separate_attention
from models.checkpoints import load_network, save_network
from models.dependency import LayerError, analyse_network
from models.layers import block_names, resolve_layers
from models.profile import count_macs
from models.registry import NetworkSpec, build_model
from models.surgery import remove_neurons, with_weights
from tests.helpers import TinyLlama, ToyDataModule, small_compress_args, small_train_args, train_on_toy

VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 4, "hidden_dim": 32, "mlp_dim": 64}
VIT_SPEC = NetworkSpec({"class_path": "torchvision.models.VisionTransformer", "init_args": VIT}, 10)


def small_vit(seed: int = 0) -> nn.Module:
    """A random ``VisionTransformer`` of ``VIT``'s sizes, in eval mode. torchvision starts the
    classifier at zero (every output 0 for every image); it gets random weights here, so that
    comparisons of outputs see the whole network."""
    torch.manual_seed(seed)
    vit = VisionTransformer(num_classes=10, **VIT).eval()
    nn.init.normal_(vit.heads.head.weight)
    return vit


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_attention_computes_what_multihead_attention_computes(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first).eval()
    heads = HeadAttention.from_multihead(mha).eval()
    x = torch.randn(2, 5, 12) if batch_first else torch.randn(5, 2, 12)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 3:] = True
    blocked = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.6
    blocked.fill_diagonal_(False)
    for kwargs in ({"need_weights": False}, {"need_weights": True},
                   {"need_weights": True, "average_attn_weights": False},
                   {"need_weights": False, "key_padding_mask": padding, "attn_mask": blocked},
                   {"need_weights": False, "attn_mask": torch.randn(5, 5)}):
        (a, wa), (b, wb) = mha(x, x, x, **kwargs), heads(x, x, x, **kwargs)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert (wa is None) == (wb is None)
        if wa is not None:
            torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-6)
    # keys and values of other widths (kdim, vdim): the unpacked projections
    cross = nn.MultiheadAttention(12, 3, kdim=7, vdim=5, batch_first=True).eval()
    q, k, v = torch.randn(2, 4, 12), torch.randn(2, 6, 7), torch.randn(2, 6, 5)
    torch.testing.assert_close(HeadAttention.from_multihead(cross)(q, k, v)[0], cross(q, k, v)[0],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="add_bias_kv"):
        HeadAttention.from_multihead(nn.MultiheadAttention(12, 3, add_bias_kv=True))


def test_a_vision_transformer_has_mlp_and_head_groups_and_its_residual_stream_is_refused():
    vit = small_vit()
    x = torch.randn(3, 3, 32, 32)
    before = vit(x)
    assert separate_attention(vit) == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    torch.testing.assert_close(vit(x), before, rtol=1e-5, atol=1e-6)  # the same function
    analysis = analyse_network(vit)
    for i in range(2):
        block = f"encoder.layers.encoder_layer_{i}"
        mlp = analysis.group_of(f"{block}.mlp.3")
        assert (mlp.producers, mlp.width, mlp.units, mlp.channel_ops) == ((f"{block}.mlp.0",), 64, 1, ())
        heads = analysis.group_of(f"{block}.self_attention.out_proj")
        assert heads.producers == (f"{block}.self_attention.v_proj",)
        assert set(heads.channel_ops) == {f"{block}.self_attention", f"{block}.self_attention.q_proj",
                                          f"{block}.self_attention.k_proj"}
        assert (heads.width, heads.units, heads.consumers[0].group) == (4, 8, 8)
        # the residual stream: LayerNorm normalises across its features
        for layer in (f"{block}.mlp.0", f"{block}.self_attention.q_proj", f"{block}.self_attention.v_proj"):
            with pytest.raises(LayerError, match="LayerNorm.*normalises across these features"):
                analysis.group_of(layer)
    # attention's two matrix products are counted: 2 blocks x 2 x tokens^2 x width
    linear_macs = sum(m.in_features * m.out_features for m in vit.modules() if isinstance(m, nn.Linear)) * 17 \
        - 32 * 10 * 16  # the head reads one token, not 17
    patches = 16 * 3 * 64 * 32
    assert count_macs(vit, (3, 32, 32)) == linear_macs + patches + 2 * 2 * 17 * 17 * 32
    assert count_macs(vit, (3, 32, 32), within="encoder") == linear_macs - 32 * 10 + 2 * 2 * 17 * 17 * 32


def test_blocks_have_short_names_and_globs_select_across_blocks(tmp_path):
    # any torchvision ViT by name, with a 32x32 stem (4x4 patches: 64 tokens and the class token)
    vit = build_model("vit_b_16", 7, small_input=True).eval()
    with torch.no_grad():
        assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert vit.encoder.pos_embedding.shape == (1, 65, 768)
    separate_attention(vit)
    analysis = analyse_network(vit)
    names = block_names(vit, analysis)
    assert len(names) == 24
    assert names["encoder_layer_11.mlp"] == "encoder.layers.encoder_layer_11.mlp.3"
    assert names["encoder_layer_0.heads"] == "encoder.layers.encoder_layer_0.self_attention.out_proj"
    assert resolve_layers(vit, ["encoder_layer_1*.heads"], "vit_b_16", analysis) == [
        f"encoder.layers.encoder_layer_{i}.self_attention.out_proj" for i in (1, 10, 11)]
    assert resolve_layers(vit, ["encoder_layer_3.mlp"], "vit_b_16", analysis) == ["encoder.layers.encoder_layer_3.mlp.3"]
    with pytest.raises(LayerError, match="encoder_layer_0.heads = encoder.layers.encoder_layer_0.self_attention.out_proj"):
        resolve_layers(vit, ["encoder_layer_12.mlp"], "vit_b_16", analysis)
    # --list_layers on a saved ViT: short names, heads, and the residual stream refused with the reason
    from compress import main as compress
    checkpoint = save_network(small_vit(), tmp_path / "vit.pt", VIT_SPEC)
    table = compress(["--checkpoint", str(checkpoint), "--list_layers", "true", "--trainer.logger", "false"])[
        "layers_table"]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:-1]}
    heads = rows["encoder.layers.encoder_layer_1.self_attention.out_proj"]
    assert heads[1:5] == ["[encoder_layer_1.heads]", "linear", "4", "8"] and heads[6] == "yes;"  # 4 heads of 8
    assert rows["encoder.layers.encoder_layer_0.mlp.3"][1:5] == ["[encoder_layer_0.mlp]", "linear", "64", "1"]
    assert "no: they come from 'encoder.layers.encoder_layer_0.ln_2' (a LayerNorm), which normalises across these " \
           "features" in " ".join(rows["encoder.layers.encoder_layer_0.mlp.0"])
    assert table.splitlines()[-1].startswith("4 of 14 layers can be compressed")
    # a block without attention (a plain MLP) has no transformer names
    mlp = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2))
    assert block_names(mlp, analyse_network(mlp)) == {}


def test_removing_heads_and_mlp_neurons_equals_zeroing_them(tmp_path):
    vit = small_vit()
    separate_attention(vit)
    x = torch.randn(3, 3, 32, 32)
    net = vit
    for layer, zero in (("encoder.layers.encoder_layer_0.self_attention.out_proj", slice(8, 24)),  # heads 1, 2
                        ("encoder.layers.encoder_layer_1.mlp.3", slice(0, 64, 3)),
                        ("encoder.layers.encoder_layer_1.self_attention.out_proj", slice(0, 24))):  # heads 0-2
        group = analyse_network(net).group_of(layer)
        W = net.get_submodule(layer).weight.detach().clone()
        W[:, zero] = 0
        zeroed = with_weights(net, {layer: W})(x)
        net = remove_neurons(net, group, {layer: W})
        torch.testing.assert_close(net(x), zeroed, rtol=1e-5, atol=1e-6)
    first, second = (net.get_submodule(f"encoder.layers.encoder_layer_{i}.self_attention") for i in range(2))
    assert (first.num_heads, second.num_heads, first.head_dim) == (2, 1, 8)
    assert first.q_proj.weight.shape == first.k_proj.weight.shape == first.v_proj.weight.shape == (16, 32)
    assert first.out_proj.weight.shape == (32, 16)
    assert net.get_submodule("encoder.layers.encoder_layer_1.mlp.0").out_features == 64 - 22
    # saved, it loads without the original as the same smaller network; an uncompressed file too
    again = load_network(save_network(net, tmp_path / "vit.pt", VIT_SPEC))
    torch.testing.assert_close(again(x), net(x), rtol=1e-5, atol=1e-6)
    assert again.get_submodule("encoder.layers.encoder_layer_0.self_attention").num_heads == 2
    packed = small_vit(1)
    original = load_network(save_network(packed, tmp_path / "packed.pt", VIT_SPEC))
    assert isinstance(original.get_submodule("encoder.layers.encoder_layer_0.self_attention"), HeadAttention)
    torch.testing.assert_close(original(x), packed(x), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    torch.manual_seed(0)
    return train_on_toy(TinyLlama())


def test_a_gated_mlp_is_one_coupled_group_and_its_surgery_is_exact(llama):
    analysis = analyse_network(llama)
    mlp = analysis.group_of("down")
    assert mlp.producers == ("gate", "up") and mlp.coupled and mlp.width == 32
    assert analysis.group_of("attention.out_proj").width == 4
    with pytest.raises(LayerError, match="RMSNorm.*normalises across these features"):
        analysis.group_of("gate")
    assert block_names(llama, analysis) == {"heads": "attention.out_proj", "mlp": "down"}
    x = torch.randn(50, 8)
    W = llama.down.weight.detach().clone()
    W[:, 1::2] = 0
    smaller = remove_neurons(llama, mlp, {"down": W})
    torch.testing.assert_close(smaller(x), with_weights(llama, {"down": W})(x), rtol=1e-5, atol=1e-6)
    assert smaller.gate.out_features == smaller.up.out_features == smaller.down.in_features == 16


def test_a_llama_block_compresses_within_its_budget(llama, tmp_path):
    runner = CompressionPipeline(
        network=llama, spec=NetworkSpec({"class_path": "tests.helpers.TinyLlama"}, 3),
        datamodule=ToyDataModule(root=".", num_workers=0, batch_size=256), run_dir=tmp_path, cache_dir=None,
        make_convergence=partial(Convergence, tol=1e-6, verbose=False), debias=True,
        trainer=TrainerSettings(accelerator="cpu", enable_progress_bar=False))
    budget = 3.0
    report = runner.run(["all"], target=Target(max_accuracy_drop=budget))
    assert [e["layer"] for e in report["layers"]] == ["attention.out_proj", "down"]
    assert 100 * (report["before"]["val_accuracy"] - report["after"]["val_accuracy"]) <= budget + 1e-9
    assert report["after"]["macs"] < report["before"]["macs"]
    for entry in report["layers"]:
        assert all(c["rel_gap"] <= 1e-6 for c in entry["candidates"])
    again = load_network(report["network"])
    x = torch.randn(20, 8)
    assert again(x).shape == (20, 3)
    assert count_macs(again, (8,)) == report["after"]["macs"]


@pytest.mark.slow
def test_a_vision_transformer_trained_on_fashion_mnist_compresses_its_mlps_and_heads(tmp_path_factory, fashion_root,
                                                                                     shared_cache):
    from compress import main as compress
    from train import main as train

    folder = tmp_path_factory.mktemp("vit")
    arch = "{class_path: torchvision.models.VisionTransformer, init_args: " + \
           "{" + ", ".join(f"{k}: {v}" for k, v in VIT.items()) + "}}"
    trained = train(small_train_args(folder, fashion_root, "--model.init_args.arch", arch, "--trainer.max_epochs", "5",
                                     "--model.init_args.lr", "3.0e-3",
                                     "--trainer.limit_test_batches", "16", "--model.init_args.save_last", "false",
                                     subset=4096, config="vit_fashion"))
    checkpoint = trained.trainer.checkpoint_callback.best_model_path
    report = compress(small_compress_args(folder, fashion_root, checkpoint, train_subset=1024, cache_dir=shared_cache,
                                          config="vit_fashion"))
    before, after = report["before"], report["after"]
    assert before["test_accuracy"] >= 0.55, before  # a trained network, far above chance (10%)
    names = [e["layer"] for e in report["layers"]]
    assert names == [f"encoder.layers.encoder_layer_{i}.{part}" for i in range(2)
                     for part in ("self_attention.out_proj", "mlp.3")]
    assert 100 * (before["val_accuracy"] - after["val_accuracy"]) <= 1.0 + 1e-9  # the shipped 1-point budget
    assert after["macs"] < before["macs"]
    network = load_network(report["network"])
    assert sum(m.num_heads for m in network.modules() if isinstance(m, HeadAttention)) + sum(
        network.get_submodule(f"encoder.layers.encoder_layer_{i}.mlp.0").out_features for i in range(2)) < 2 * (4 + 64)


def test_torch_pruning_removes_whole_heads_and_mlp_neurons_of_a_vision_transformer():
    """Torch-Pruning at the lasso's widths on a ViT: its group importance averaged over each
    head's units (as its pruners do with prune_num_heads), the lowest heads removed whole."""
    pytest.importorskip("torch_pruning", reason="the Torch-Pruning baseline needs pip install -e .[test] (or .[bench])")
    from compression.baselines import torch_pruning_at_widths, torch_pruning_network

    vit = small_vit()
    separate_attention(vit)
    x = torch.randn(3, 3, 32, 32)
    heads = "encoder.layers.encoder_layer_0.self_attention.out_proj"
    attention = vit.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    group = analyse_network(vit).group_of(heads)
    pruned, kept = torch_pruning_network(vit, group, 3, "magnitude", example_inputs=x[:1])
    assert kept == 3 and pruned.get_submodule("encoder.layers.encoder_layer_0.self_attention").num_heads == 3
    # Torch-Pruning's GroupMagnitudeImportance: per unit, the mean over q, k, v rows and out_proj
    # columns of their squared norms; a head's score is its 8 units' mean
    unit = sum(attention.get_submodule(p).weight.detach().square().sum(1) for p in ("q_proj", "k_proj", "v_proj"))
    unit = (unit + attention.out_proj.weight.detach().square().sum(0)) / 4
    dropped = int(unit.reshape(4, 8).mean(1).argmin())
    W = attention.out_proj.weight.detach().clone()
    W[:, dropped * 8:(dropped + 1) * 8] = 0  # no refit: the same as zeroing the head
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), with_weights(vit, {heads: W})(x), rtol=1e-5, atol=1e-6)
    both = torch_pruning_at_widths(vit, {heads: 2, "encoder.layers.encoder_layer_1.mlp.3": 20}, "taylor",
                                   example_inputs=x[:1], loss_batches=[(x, torch.tensor([0, 1, 2]))])
    assert both.get_submodule("encoder.layers.encoder_layer_0.self_attention").q_proj.out_features == 16
    assert both.get_submodule("encoder.layers.encoder_layer_1.mlp.0").out_features == 20
    with torch.no_grad():
        assert both(x).shape == (3, 10)


TIMM_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 10}


def test_timm_attention_of_the_qkv_layout_becomes_heads_and_compresses_exactly(tmp_path):
    """timm's vision transformer: one qkv Linear layer and a proj, read by a module with
    num_heads. It becomes a SelfAttention (checked equal on conversion), whose heads are a group
    like torchvision's; a variant with extras (q and k normalised) is left as it is and refused."""
    timm = pytest.importorskip("timm", reason="the test extra installs timm: pip install -e .[test]")
    from models.attention import SelfAttention

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_VIT).eval()
    nn.init.normal_(vit.head.weight)  # timm starts the classifier at zero too
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = vit(x)
        assert separate_attention(vit) == ["blocks.0.attn", "blocks.1.attn"]
        assert isinstance(vit.blocks[0].attn, SelfAttention)
        torch.testing.assert_close(vit(x), before, rtol=1e-5, atol=1e-5)
    analysis = analyse_network(vit)
    assert block_names(vit, analysis) == {"blocks.0.heads": "blocks.0.attn.out_proj", "blocks.0.mlp": "blocks.0.mlp.fc2",
                                          "blocks.1.heads": "blocks.1.attn.out_proj", "blocks.1.mlp": "blocks.1.mlp.fc2"}
    net = vit
    for layer, zero in (("blocks.0.attn.out_proj", slice(8, 16)), ("blocks.1.mlp.fc2", slice(0, 128, 2))):
        group = analyse_network(net).group_of(layer)
        W = net.get_submodule(layer).weight.detach().clone()
        W[:, zero] = 0
        with torch.no_grad():
            zeroed = with_weights(net, {layer: W})(x)
            net = remove_neurons(net, group, {layer: W})
            torch.testing.assert_close(net(x), zeroed, rtol=1e-5, atol=1e-5)
    assert net.blocks[0].attn.num_heads == 3 and net.blocks[1].mlp.fc1.out_features == 64
    spec = NetworkSpec({"class_path": "timm.models.vision_transformer.VisionTransformer", "init_args": TIMM_VIT}, 10)
    again = load_network(save_network(net, tmp_path / "timm.pt", spec))  # without the original
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), rtol=1e-5, atol=1e-5)
    # q and k normalised: not the function SelfAttention computes, so not converted; refused
    normed = timm.create_model("vit_tiny_patch16_224", pretrained=False, qk_norm=True, **TIMM_VIT).eval()
    assert separate_attention(normed) == []
    with pytest.raises(LayerError, match="reshape"):
        analyse_network(normed).group_of("blocks.0.attn.proj")

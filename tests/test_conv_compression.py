"""Convolution channels end to end: compress.py on the briefly trained AlexNet and real
Fashion-MNIST, a convolution (conv2: its 64 input channels, groups of 5x5 patch entries) and
then 'first' by channel (classifier.1: 256 channels of 36 repeated positions, folded)."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl

from compress import main as compress
from datamodules.fashion_mnist import FashionMNISTDataModule
from lightning_modules.network_pass import run_pass
from models.checkpoints import load_network
from models.pruned import IndexedLinear
from tests.helpers import small_compress_args


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory, fashion_root, trained_alexnet):
    folder = tmp_path_factory.mktemp("conv")
    checkpoint = trained_alexnet.trainer.checkpoint_callback.best_model_path
    # No pass cache: no other test reads these passes, and the statistics of 'first' (9,216
    # inputs, 4,096 outputs) would store 0.64 GB.
    report = compress(small_compress_args(folder, fashion_root, checkpoint, "--layers", "[conv2,first]",
                                          "--lambda_ratios", "[0.003,0.01]", "--cache_dir", "null",
                                          train_subset=1024))
    return folder, report


@pytest.mark.slow
def test_a_convolution_and_first_by_channel_give_a_smaller_network_that_keeps_accuracy(conv_run, fashion_root):
    _, report = conv_run
    conv, first = report["layers"]
    before, after = report["before"], report["after"]
    # conv2: groups of 5x5 patch entries, one per input channel; fewer channels than conv1 had.
    assert conv["module"] == "features.3" and conv["kind"] == "conv" and conv["group_size"] == 25
    assert conv["width_before"] == 64 and 0 < conv["width_after"] < 64
    assert conv["samples"] == 1024 * 7 * 7  # every output position of every image (7x7 maps at 64x64 inputs)
    # first: the 36 positions of a channel are copies of one value at 64x64 inputs, folded into one.
    assert first["group_size"] == 36 and first["folded"] and first["width_before"] == 256
    assert 0 < first["width_after"] < 256
    # The stated margin: the briefly trained network (about 65% on these 1,000 test images)
    # may lose at most 8 points with lambda ratios of 0.3% on conv2 and 1% on first (at 1% and 5%
    # it kept 6 and 5 channels and lost 15 points); a broken compression (wrong channels
    # removed, wrong weights) falls towards chance (10%).
    assert after["test_accuracy"] >= before["test_accuracy"] - 0.08, (before["test_accuracy"], after["test_accuracy"])
    assert after["macs"] < before["macs"] and after["parameters"] < before["parameters"]
    network = load_network(report["network"])  # an ordinary smaller AlexNet, loaded without the original
    assert network.features[0].out_channels == network.features[3].in_channels == conv["width_after"]
    assert network.features[10].out_channels == first["width_after"]
    assert isinstance(network.classifier[1], IndexedLinear)
    assert network.classifier[1].in_features == first["width_after"]  # one input per kept channel, not 36
    dm = FashionMNISTDataModule(root=fashion_root, batch_size=500, num_workers=0, test_subset=1000)
    dm.setup("test")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False)
    assert run_pass(trainer, network, dm.test_dataloader()).accuracy == pytest.approx(after["test_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_the_report_counts_channels_and_the_widths_include_convolutions(conv_run):
    _, report = conv_run
    conv = report["layers"][0]
    assert len(conv["kept_indices"]) == conv["width_after"] and max(conv["kept_indices"]) < 64
    assert report["after"]["widths"]["features.3"] == conv["width_after"]
    assert report["before"]["widths"]["features.3"] == 64


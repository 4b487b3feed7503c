"""compress.py end to end on a real (briefly trained) AlexNet and real Fashion-MNIST: the
smaller network, the report, resuming, the statistics cache and under DDP, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from callbacks.convergence import Convergence
from compress import main as compress
from compression.finetune import FinetuneSettings, finetune_batch_size, finetune_settings_from_training
from datamodules.fashion_mnist import FashionMNISTDataModule
from grouplasso import LassoStats, objective
from lightning_modules.lasso import LassoCompression
from lightning_modules.network_pass import run_pass
from models.checkpoints import load_network, read_checkpoint
from models.layers import LayerError
from models.profile import count_parameters, layer_widths
from tests.helpers import REPO, VAL_SUBSET, ToyClassifier, small_compress_args, toy_compress_args

# Small fractions of the briefly trained test network's lambda_max (0.016 for pen, 5.6 for
# last), like the demo's (alexnet_fashion_compress.yaml): a few dozen neurons stay per layer.
PEN, LAST = 5e-5, 0.01
DEMO_TRAIN_SUBSET = 4096  # training images of demo_run's statistics


@pytest.fixture(scope="module")
def checkpoint(trained_alexnet) -> str:
    return trained_alexnet.trainer.checkpoint_callback.best_model_path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, fashion_root, checkpoint, shared_cache):
    """compress.py on [pen, last] with a regularisation path, statistics over 4,096 training images
    (as many as the K = 4,096 pen inputs; the refit of the few dozen neurons kept is well posed,
    and the suite writes 0.15 GB of head inputs instead of the 0.3 GB of 8,192 images)."""
    folder = tmp_path_factory.mktemp("compress")
    report = compress(small_compress_args(folder, fashion_root, checkpoint, "--lambdas", f"[{PEN},{LAST}]",
                                          "--path", f"[{4 * LAST},{2 * LAST},{LAST},{LAST / 2}]",
                                          "--report", str(folder / "extra" / "report.json"),
                                          "--finetune.epochs", "1", train_subset=DEMO_TRAIN_SUBSET,
                                          cache_dir=shared_cache))
    return folder, report


@pytest.mark.slow
def test_compressed_network_keeps_accuracy_and_loses_most_neurons(demo_run, fashion_root):
    folder, report = demo_run
    before, after = report["before"], report["after_surgery"]  # the compression itself; fine-tuning below
    # The stated margin: at most 7 points of test accuracy on 1,000 real test images while
    # removing 99% of both layers' neurons. This briefly trained network (64.8%) is fragile and
    # loses 5.4 points; the fully trained demo network (statistics over 54,000 images) loses
    # 0.5 points at the same lambdas. A broken compression falls towards chance (10%).
    assert after["test_accuracy"] >= before["test_accuracy"] - 0.07, (before["test_accuracy"], after["test_accuracy"])
    for entry in report["layers"]:
        assert entry["width_after"] < 0.25 * entry["width_before"], entry  # most neurons removed
        assert entry["rel_gap"] <= 1e-4 and entry["stop"].startswith("converged")
    assert after["parameters"] < 0.6 * before["parameters"] and after["macs"] < before["macs"]
    # The saved network is an ordinary smaller AlexNet that loads without the original and
    # reproduces the reported accuracy.
    network = load_network(report["network"])
    assert count_parameters(network) == after["parameters"]
    assert network.classifier[6].in_features == report["layers"][1]["width_after"]
    dm = FashionMNISTDataModule(root=fashion_root, batch_size=500, num_workers=0, test_subset=1000)
    dm.setup("test")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False)
    assert run_pass(trainer, network, dm.test_dataloader()).accuracy == pytest.approx(report["after"]["test_accuracy"],
                                                                                        abs=1e-9)


@pytest.mark.slow
def test_fine_tuning_keeps_the_compressed_widths(demo_run, shared_cache, checkpoint):
    folder, report = demo_run
    # The fine-tuned network is evaluated by whole-network passes: its new head inputs (0.15 GB
    # for these 4,096 training images) are not stored; only the original network's are.
    assert len(list(shared_cache.glob("train-head-classifier-*.f32"))) == 1
    surgery, tuned = report["after_surgery"], report["after"]
    assert tuned["widths"] == surgery["widths"] == {
        "features.0": 3, "features.3": 64, "features.6": 192, "features.8": 384, "features.10": 256,  # convolutions
        "classifier.1": 9216, "classifier.4": report["layers"][0]["width_after"],
        "classifier.6": report["layers"][1]["width_after"]}
    assert tuned["parameters"] == surgery["parameters"]
    # The network straight from surgery is kept beside the fine-tuned one.
    kept, final = load_network(report["network_after_surgery"]), load_network(report["network"])
    assert layer_widths(kept) == surgery["widths"] == layer_widths(final)
    assert any(not torch.equal(a, b) for a, b in zip(kept.state_dict().values(), final.state_dict().values()))
    assert report["finetune"]["epochs"] == 1 and report["finetune"]["lr"] == pytest.approx(3e-5)  # 0.1 x training lr
    assert report["finetune"]["batch_size"] == 64  # the training run's, not the compression's 500
    # Both files carry the training run's hyper-parameters, so compressing either again fine-tunes
    # by its recipe (not by Adam at 1e-5, the default for a file without them).
    trained = read_checkpoint(checkpoint)[1]["hparams"]
    for saved in (report["network_after_surgery"], report["network"]):
        info = read_checkpoint(saved)[1]
        assert info["hparams"] == trained
        assert finetune_settings_from_training(info, FinetuneSettings(epochs=1))["lr"] == report["finetune"]["lr"]
        assert finetune_batch_size(info, FinetuneSettings(epochs=1), None) == 64
    assert tuned["train_loss"] != surgery["train_loss"]  # it trained
    # 64 steps (4,096 images in the training run's batches of 64) at 0.1 x the training lr, dropout
    # off, recover part of what compressing the briefly trained network cost; a broken fine-tuning
    # falls instead.
    assert tuned["test_accuracy"] > surgery["test_accuracy"]


@pytest.mark.slow
def test_shipped_paper_config_meets_its_accuracy_target_on_the_real_network(tmp_path, fashion_root, checkpoint,
                                                                            shared_cache):
    """alexnet_fashion_last.yaml (at most 1 point of validation accuracy) runs unchanged, data
    section aside, and keeps the narrowest certified candidate that meets the budget."""
    report = compress([
        "--config", "alexnet_fashion_last", "--checkpoint", checkpoint,
        "--data.init_args.root", fashion_root, "--data.init_args.train_subset", str(DEMO_TRAIN_SUBSET),
        "--data.init_args.val_subset", str(VAL_SUBSET), "--data.init_args.test_subset", "1000",
        "--data.init_args.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--cache_dir", str(shared_cache),
    ])
    entry = report["layers"][0]
    floor = report["before"]["val_accuracy"] - 0.01
    assert entry["chosen_by"] == "accuracy" and entry["val_accuracy_floor"] == pytest.approx(floor)
    assert report["after"]["val_accuracy"] >= floor
    meeting = [c for c in entry["candidates"] if c["val_accuracy"] >= floor]
    assert all(c["rel_gap"] <= 1e-4 for c in entry["candidates"])
    assert entry["width_after"] == min(c["width"] for c in meeting) < entry["width_before"]
    # The saved network's validation accuracy, measured apart from the search and its caches.
    dm = FashionMNISTDataModule(root=fashion_root, batch_size=500, num_workers=0, val_subset=VAL_SUBSET)
    dm.setup("fit")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False)
    measured = run_pass(trainer, load_network(report["network"]), dm.val_dataloader()).accuracy
    assert measured == pytest.approx(report["after"]["val_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_report_is_written_everywhere_with_the_path(demo_run):
    folder, report = demo_run
    run_dir = Path(report["network"]).parent
    for path in (run_dir / "report.json", folder / "extra" / "report.json"):
        saved = json.loads(path.read_text())
        assert saved["after"]["widths"] == report["after"]["widths"]
    keys = {"train_loss", "test_accuracy", "parameters", "macs", "latency_ms", "widths"}
    assert keys <= set(report["before"]) and keys <= set(report["after"])
    layer_keys = {"width_before", "width_after", "rel_gap", "seconds", "lambda_max", "mse", "stop"}
    assert all(layer_keys <= set(entry) for entry in report["layers"])
    rows = report["paths"]["last"]
    assert [r["lambda"] for r in rows] == sorted((r["lambda"] for r in rows), reverse=True)
    widths = [r["active"] for r in rows]
    assert widths == sorted(widths) and widths[0] < widths[-1]  # smaller lambda keeps more neurons
    assert all(r["rel_gap"] <= 1e-4 for r in rows)
    assert (run_dir / "path-last.png").stat().st_size > 10_000


@pytest.mark.slow
def test_second_run_with_another_lambda_reuses_the_statistics(demo_run, fashion_root, checkpoint, shared_cache):
    folder, first = demo_run
    cached = sorted(shared_cache.glob("train-classifier.4-*.pt"))
    assert len(cached) == 1
    again = compress(small_compress_args(folder, fashion_root, checkpoint, "--layers", "[pen]",
                                         "--lambdas", f"[{2 * PEN}]", train_subset=DEMO_TRAIN_SUBSET,
                                         cache_dir=shared_cache))
    assert again["layers"][0]["stats_seconds"] == 0.0  # read from the cache, not recomputed
    assert again["layers"][0]["width_after"] < first["layers"][0]["width_after"]


def _stats(seed: int = 0, n: int = 400, K: int = 60, D: int = 4) -> LassoStats:
    g = torch.Generator().manual_seed(seed)
    X = torch.relu(torch.randn(n, 8, generator=g, dtype=torch.float64) @ torch.randn(8, K, generator=g, dtype=torch.float64))
    Y = X @ torch.randn(K, D, generator=g, dtype=torch.float64) / K
    return LassoStats.from_features(X, Y)


class Crash(Exception):
    """Stands for a crash or a kill mid-solve (Ctrl-C makes Lightning exit the process)."""


class _CrashAt(pl.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise Crash


@pytest.mark.parametrize("solver", ["fista", "auto"])
def test_interrupted_solve_resumes_to_the_same_end(tmp_path, solver):
    stats, lam = _stats(), 0.002
    W = torch.zeros(stats.D, stats.K)

    def fit(folder: Path, interrupt_at: int | None = None, resume: bool = False):
        module = LassoCompression(solver=solver).attach(stats, lam, W, "test")
        convergence = Convergence(tol=1e-8, verbose=False)
        callbacks = [convergence, pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0,
                                                               every_n_train_steps=2)]
        if interrupt_at:
            callbacks.append(_CrashAt(interrupt_at))
        trainer = pl.Trainer(accelerator="cpu", max_steps=5000, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks)
        trainer.fit(module, ckpt_path=str(folder / "last.ckpt") if resume else None)
        return module, trainer, convergence

    whole, whole_trainer, whole_conv = fit(tmp_path / "a")
    assert whole_conv.converged and whole_trainer.global_step > 5
    with pytest.raises(Crash):
        fit(tmp_path / "b", interrupt_at=5)
    resumed, resumed_trainer, _ = fit(tmp_path / "b", resume=True)
    assert resumed_trainer.global_step == whole_trainer.global_step
    assert torch.equal(resumed.solver.V, whole.solver.V)
    assert objective(stats, resumed.solver.V, lam) == objective(stats, whole.solver.V, lam)


def test_a_long_solve_says_where_it_is(caplog):
    """Solves have no progress bar: one that runs past ``report_seconds`` prints its step, the step
    budget and the certificate at its checks (here every check), then its end."""
    stats = _stats()
    module = LassoCompression(solver="fista").attach(stats, 0.002, torch.zeros(stats.D, stats.K), "test")
    trainer = pl.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[Convergence(tol=1e-12, check_every=10, report_seconds=0.0)])
    with caplog.at_level("INFO", logger="pytorch_lightning.utilities.rank_zero"):
        trainer.fit(module)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[test, lambda=0.002]")]
    assert [line.split("] ")[1].split(",")[0] for line in lines[:2]] == ["step 10/30", "step 20/30"], lines
    assert "relative duality gap" in lines[0] and "stopped by the budget" in lines[-1]


def test_interrupted_compress_run_resumes(tmp_path, monkeypatch):
    """compress.py stopped mid-solve says how to resume; --resume ends where an uninterrupted run ends."""
    args = toy_compress_args(tmp_path, "--model.solver", "fista", "--checkpoint_every", "5",
                             "--trainer.max_steps", "40", layers="[fc2a]", lambda_ratios="[0.01]")
    whole = compress(args + ["--trainer.logger.init_args.version", "whole"])
    assert whole["layers"][0]["steps"] > 12  # the crash below comes mid-solve
    original = Convergence.on_train_batch_end

    def crash(self, trainer, pl_module, outputs, batch, batch_idx):
        original(self, trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == 12:
            raise Crash

    monkeypatch.setattr(Convergence, "on_train_batch_end", crash)
    with pytest.warns(UserWarning, match=r"stopped at step 12 \(Crash\).*--resume"), pytest.raises(Crash):
        compress(args + ["--trainer.logger.init_args.version", "cut"])
    monkeypatch.setattr(Convergence, "on_train_batch_end", original)
    run_dir = tmp_path / "runs" / "disk" / "cut"
    assert (run_dir / "solve").is_dir()
    resumed = compress(args + ["--resume", str(run_dir)])
    assert resumed["layers"][0]["steps"] == whole["layers"][0]["steps"]
    assert resumed["layers"][0]["objective"] == whole["layers"][0]["objective"]
    assert resumed["after"]["widths"] == whole["after"]["widths"]


@pytest.mark.slow
def test_two_process_ddp_statistics_equal_one_process(tmp_path):
    """The statistics pass sharded over 2 CPU processes (gloo) and all-reduced equals one
    process, on AlexNet's layout at toy size: each process stores its shard of the head inputs."""
    args = toy_compress_args(tmp_path, layers="[classifier.4]", network=ToyClassifier)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ddp = subprocess.run([sys.executable, str(REPO / "compress.py"), *args, "--trainer.devices", "2",
                          "--trainer.strategy", "ddp", "--cache_dir", str(tmp_path / "ddp_cache"),
                          "--trainer.logger.init_args.version", "ddp"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "distributed_backend=gloo" in ddp.stderr
    assert len(list((tmp_path / "ddp_cache").glob("train-head-classifier-*-rank*of2.f32"))) == 2
    single = compress(args + ["--cache_dir", str(tmp_path / "single_cache")])
    (ddp_file,) = (tmp_path / "ddp_cache").glob("train-classifier.4-*.pt")
    (single_file,) = (tmp_path / "single_cache").glob("train-classifier.4-*.pt")
    a, b = (torch.load(f, weights_only=True)["entry"] for f in (ddp_file, single_file))
    assert a["n"] == b["n"] == 1080  # ToyDataModule's training split
    assert a["accuracy"] == b["accuracy"]
    # The layer's inputs come from float32 passes of the head in other batch sizes and thread
    # counts (each process its own shard), which round differently in the last bits: the sums
    # agree to float32 precision. A lost or doubly counted shard would be off by a factor.
    a, b = (LassoStats.from_stored(entry["stats"]["classifier.4"]) for entry in (a, b))
    torch.testing.assert_close(a.G, b.G, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.C, b.C, rtol=1e-5, atol=1e-7)
    assert a.s == pytest.approx(b.s, rel=1e-6)
    report = json.loads((tmp_path / "runs" / "disk" / "ddp" / "report.json").read_text())
    assert report["after"]["widths"] == single["after"]["widths"]


@pytest.mark.parametrize(
    "override, error, message",
    [
        (["--layers", "[fc7]"], LayerError, r"compressible layers: features.3, .*classifier.4, classifier.6; .*short "
                                            r"names: first"),
        (["--lambdas", "[0.0]"], ValueError, "lambda must be a positive number"),
        (["--lambdas", "[1000.0]", "--layers", "[last]"], ValueError, r"removes every neuron feeding 'last'.*lambda_max"),
        (["--lambdas", "[1.0,2.0,3.0]"], ValueError, "one lambda for all layers or one per compressed group"),
    ],
)
@pytest.mark.slow
def test_bad_input_stops_with_a_message(tmp_path, fashion_root, checkpoint, shared_cache, override, error, message):
    # the shared cache holds the statistics of 'last' (the shipped paper config's test)
    with pytest.raises(error, match=message):
        compress(small_compress_args(tmp_path, fashion_root, checkpoint, *override, train_subset=DEMO_TRAIN_SUBSET,
                                     cache_dir=shared_cache))


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path, fashion_root):
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11), "classifier.9.weight": torch.zeros(3, 3)},
               tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"(?s)missing keys .*classifier.1.weight.*unexpected keys \(1\): classifier.9.weight"):
        compress(small_compress_args(tmp_path, fashion_root, str(tmp_path / "bad.pt")))


def test_diverging_or_nan_objective_stops_with_advice():
    stats = _stats()
    module = LassoCompression(solver="paper_adam", lr=50.0, log_every=1).attach(stats, 1e-4, torch.zeros(4, 60), "x")
    trainer = pl.Trainer(accelerator="cpu", max_steps=200, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(FloatingPointError, match=r"diverging .*lower the step size \(model.lr"):
        trainer.fit(module)
    broken = LassoStats(stats.G.clone(), stats.C.clone(), float("nan"), stats.n)
    module = LassoCompression(solver="fista", log_every=1).attach(broken, 1e-3, torch.zeros(4, 60), "x")
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(FloatingPointError, match="became nan"):
        trainer.fit(module)


def test_empty_data_set_is_refused(tmp_path):
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False)
    with pytest.raises(ValueError, match="the data set is empty"):
        run_pass(trainer, network, empty, ["3"])

"""A stop signal ends compress.py within seconds, says how to resume, and loses nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from compress import main as compress
from models.checkpoints import save_network
from models.registry import NetworkSpec
from tests.helpers import REPO, ResidualMLP, toy_compress_args


def test_sigterm_mid_solve_stops_within_seconds_and_the_run_resumes(tmp_path):
    torch.manual_seed(0)
    save_network(ResidualMLP().eval(), tmp_path / "net.pt", NetworkSpec({"class_path": "tests.helpers.ResidualMLP"}, 3))
    args = ["--checkpoint", str(tmp_path / "net.pt"), "--data.class_path", "tests.helpers.ToyDataModule",
            "--data.init_args.root", ".", "--data.init_args.num_workers", "0", "--layers", "[out]",
            "--lambda_ratios", "[0.0001]", "--model.solver", "fista", "--convergence.tol", "1e-12",
            "--trainer.max_steps", "4000", "--checkpoint_every", "50", "--cache_dir", "null",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.class_path", "pytorch_lightning.loggers.TensorBoardLogger",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.logger.init_args.name", "stop", "--trainer.logger.init_args.version", "cut"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "compress.py"), *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "runs" / "stop" / "cut" / "solve"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-2000:]  # still solving
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "--resume" in err and "nothing certified is lost" in err
    resumed = compress(args + ["--resume", str(tmp_path / "runs" / "stop" / "cut")])
    entry = resumed["layers"][0]
    assert entry["steps"] == 4000 and "budget" in entry["stop"]  # the same budget as one uninterrupted solve


def test_a_cache_limit_too_small_or_a_full_disk_stop_before_writing_and_the_run_resumes(tmp_path, monkeypatch):
    from compression import cache

    with pytest.raises(cache.CacheSpaceError, match=r"a cache entry of .* is larger than the cache's limit of "
                                                     r".*--cache_max_gb 1e-06"):
        compress(toy_compress_args(tmp_path, "--cache_max_gb", "1e-6"))
    assert not any((tmp_path / "cache").glob("*.pt"))  # refused before the write
    monkeypatch.setattr(cache, "RESERVE_BYTES", 10 ** 18)  # a disk with too little free space
    with pytest.raises(cache.CacheSpaceError, match=r"needs .* free .* but the disk has .* free: free some space or "
                                                     r"point --cache_dir at a larger disk"):
        compress(toy_compress_args(tmp_path))
    monkeypatch.setattr(cache, "RESERVE_BYTES", 0)
    report = compress(toy_compress_args(tmp_path, "--resume", str(tmp_path / "runs" / "disk" / "run")))
    assert [e["width_after"] < e["width_before"] for e in report["layers"]] == [True, True]
    assert report["cache"]["written"] > 0 and report["cache"]["max_bytes"] > 0

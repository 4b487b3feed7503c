"""Command lines shared by the tests: every shipped config shrunk to a CPU-sized run."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def small_train_args(tmp_path: Path, fashion_root: str, *extra: str, subset: int = 256) -> list[str]:
    """``alexnet_fashion.yaml`` on ``subset`` images, one epoch, a few val/test batches, logs in ``tmp_path``."""
    return [
        "--config", "alexnet_fashion",
        "--data.init_args.root", fashion_root,
        "--data.init_args.train_subset", str(subset),
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "64",
        "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        *extra,
    ]


def small_compress_args(tmp_path: Path, fashion_root: str, checkpoint: str, *extra: str, train_subset: int = 2048,
                        test_subset: int = 1000) -> list[str]:
    """``alexnet_fashion_compress.yaml`` on ``train_subset`` training images (the statistics) and
    ``test_subset`` test images, on the CPU, with logs, caches and reports in ``tmp_path``."""
    return [
        "--config", "alexnet_fashion_compress",
        "--checkpoint", checkpoint,
        "--data.init_args.root", fashion_root,
        "--data.init_args.train_subset", str(train_subset),
        "--data.init_args.test_subset", str(test_subset),
        "--data.init_args.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--cache_dir", str(tmp_path / "cache"),
        *extra,
    ]

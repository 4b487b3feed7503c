"""Command lines shared by the tests: every shipped config shrunk to a CPU-sized run."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from datamodules.base import ImageDataModule
from models.attention import HeadAttention
from models.checkpoints import save_network
from models.registry import NetworkSpec

REPO = Path(__file__).resolve().parent.parent


def small_train_args(tmp_path: Path, fashion_root: str, *extra: str, subset: int = 256,
                     config: str = "alexnet_fashion") -> list[str]:
    """``config`` (``alexnet_fashion.yaml``) on ``subset`` images, one epoch, a few val/test batches, logs in ``tmp_path``."""
    return [
        "--config", config,
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


# Validation images of the compression tests: budgets and floors are judged on these. The whole
# split (6,000) made every AlexNet run store 0.22 GB of head inputs for it (0.3 GB of images for
# a convolution), most of what the suite wrote.
VAL_SUBSET = 2000


def small_compress_args(tmp_path: Path, fashion_root: str, checkpoint: str, *extra: str, train_subset: int = 2048,
                        test_subset: int = 1000, cache_dir: Optional[Path] = None,
                        config: str = "alexnet_fashion_compress") -> list[str]:
    """``config`` (``alexnet_fashion_compress.yaml``) on ``train_subset`` training images (the statistics),
    ``VAL_SUBSET`` validation images and ``test_subset`` test images, on the CPU, with logs and
    reports in ``tmp_path`` and the pass cache
    there too, or in ``cache_dir`` (the ``shared_cache`` fixture: entries are keyed by everything
    they depend on, so tests can share what they compute alike and the suite writes it once)."""
    return [
        "--config", config,
        "--checkpoint", checkpoint,
        "--data.init_args.root", fashion_root,
        "--data.init_args.train_subset", str(train_subset),
        "--data.init_args.val_subset", str(VAL_SUBSET),
        "--data.init_args.test_subset", str(test_subset),
        "--data.init_args.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--cache_dir", str(cache_dir or tmp_path / "cache"),
        *extra,
    ]


class ToyDataModule(ImageDataModule):
    """A small synthetic classification task in the DataModule shape the pipeline reads:
    x ~ N(0, I_8), labels from a fixed random ReLU teacher (3 classes); 1,200 training
    samples (10% held out for validation) and 400 test samples."""

    def make_dataset(self, train: bool, transform: Optional[Callable]) -> Dataset:
        g = torch.Generator().manual_seed(0 if train else 1)
        X = torch.randn(1200 if train else 400, 8, generator=g)
        teacher = torch.Generator().manual_seed(123)
        hidden = torch.relu(X @ torch.randn(8, 16, generator=teacher))
        return TensorDataset(X, (hidden @ torch.randn(16, 3, generator=teacher)).argmax(1))


def train_on_toy(network: nn.Module, steps: int = 300) -> nn.Module:
    """``network`` trained full-batch for ``steps`` Adam steps with weight decay on
    ``ToyDataModule``'s training samples, in eval mode."""
    X, y = ToyDataModule(root=".", num_workers=0).make_dataset(True, None).tensors
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(network(X), y).backward()
        optimizer.step()
    return network.eval()


class ToyMLP(nn.Sequential):
    """8 -> 48 -> 40 -> 3 with ReLUs (layers ``0``, ``2``, ``4``), for ``ToyDataModule``."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(8, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 3))


def toy_network(seed: int = 0) -> nn.Module:
    """A ``ToyMLP`` trained on ``ToyDataModule`` (about 90% test accuracy)."""
    torch.manual_seed(seed)
    return train_on_toy(ToyMLP())


class ResidualMLP(nn.Module):
    """8 -> 32 (stream) -> two residual blocks 32 -> 48 -> 32 with GELU -> 3, for ``ToyDataModule``:
    two internal widths and one coupled stream (producers stem, fc2a, fc2b; consumers fc1a,
    fc1b, out)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 32)
        self.fc1a, self.fc2a = nn.Linear(32, 48), nn.Linear(48, 32)
        self.fc1b, self.fc2b = nn.Linear(32, 48), nn.Linear(48, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.fc2a(nn.functional.gelu(self.fc1a(x))))
        x = torch.relu(x + self.fc2b(nn.functional.gelu(self.fc1b(x))))
        return self.out(x)


class TinyLlama(nn.Module):
    """A Llama-style pre-norm block of this project's own for ``ToyDataModule``: 8 inputs -> 4
    tokens of width 16 -> RMSNorm, 4-head ``HeadAttention`` (heads of 4) and a residual add ->
    RMSNorm, SwiGLU MLP ``down(silu(gate x) * up x)`` 16 -> 32 -> 16 and a residual add -> the
    tokens' mean -> 3. Two compressible groups: the 4 heads (read by ``attention.out_proj``) and
    the 32 MLP neurons (made by gate and up, coupled by their product; read by ``down``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 64)
        self.norm1, self.norm2 = nn.RMSNorm(16), nn.RMSNorm(16)
        self.attention = HeadAttention(16, 4, batch_first=True)
        self.gate, self.up = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x).unflatten(1, (4, 16))
        n = self.norm1(h)
        h = h + self.attention(n, n, n, need_weights=False)[0]
        n = self.norm2(h)
        h = h + self.down(nn.functional.silu(self.gate(n)) * self.up(n))
        return self.out(h.mean(dim=1))


class ToyClassifier(nn.Module):
    """AlexNet's layout at toy size, for ``ToyDataModule``: ``features`` (8 -> 32, ReLU), then a
    ``classifier`` Sequential 32 -> 48 -> 40 -> 3 with ReLUs that ends the network, so that the
    compression passes store the classifier's inputs (the head inputs) as they do AlexNet's."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


def toy_compress_args(tmp_path: Path, *extra: str, network: type[nn.Module] = ResidualMLP,
                      layers: str = "[fc2a, out]", lambda_ratios: str = "[0.1]") -> list[str]:
    """compress.py on an untrained ``network`` (seeded) saved in ``tmp_path`` (its class path:
    rebuilt without the original), ``ToyDataModule``, ``layers`` at ``lambda_ratios`` of
    lambda_max: seconds, and kilobytes on disk."""
    torch.manual_seed(0)
    save_network(network().eval(), tmp_path / "net.pt", NetworkSpec({"class_path": f"tests.helpers.{network.__name__}"}, 3))
    return ["--checkpoint", str(tmp_path / "net.pt"), "--data.class_path", "tests.helpers.ToyDataModule",
            "--data.init_args.root", ".", "--data.init_args.num_workers", "0", "--layers", layers,
            "--lambda_ratios", lambda_ratios, "--cache_dir", str(tmp_path / "cache"), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--convergence.verbose", "false",
            "--trainer.logger.class_path", "pytorch_lightning.loggers.TensorBoardLogger",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.logger.init_args.name", "disk", "--trainer.logger.init_args.version", "run", *extra]

"""Fashion-MNIST, the real data set, through torchvision's loader (``<root>/FashionMNIST/raw``).

``prepare_data`` fills ``raw/`` from Debian's ``dataset-fashion-mnist`` package when it
is installed (``/usr/share/datasets/fashion-mnist``), otherwise downloads with
torchvision when ``download: true``. ``python -m datamodules.fashion_mnist --root data``
does the same from the command line (``make data`` calls it).
"""
from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from torch.utils.data import Dataset
from torchvision.datasets import FashionMNIST

from datamodules.base import ImageDataModule

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def prepare_fashion_mnist(root: str | Path, download: bool = False) -> Path:
    """Make sure ``<root>/FashionMNIST/raw`` holds the four idx files; return that folder."""
    raw = Path(root) / "FashionMNIST" / "raw"
    missing = [name for name in IDX_FILES if not (raw / name).is_file()]
    if missing and all((DEBIAN_DIR / f"{name}.gz").is_file() for name in missing):
        raw.mkdir(parents=True, exist_ok=True)
        for name in missing:
            with gzip.open(DEBIAN_DIR / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    elif missing and download:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    elif missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {str(raw)!r} (missing {', '.join(missing)}). Run `make data` "
            "(Debian: apt-get install dataset-fashion-mnist), or set data.init_args.download: true"
        )
    return raw


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST; preset ``fashion_alexnet`` makes the 28x28 grayscale images
    3-channel and resizes them like the paper's AlexNet inputs (70, crop 64); ``fashion_32``
    makes them 3-channel 32x32 images for the CIFAR-sized networks (ResNet-56, MobileNetV2
    with a small-input stem)."""

    num_classes = 10

    def __init__(self, *, preset: Literal["fashion_alexnet", "fashion_32"] = "fashion_alexnet", download: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(preset=preset, **kwargs)

    def prepare_data(self) -> None:
        prepare_fashion_mnist(self.hparams.root, self.hparams.download)

    def make_dataset(self, train: bool, transform: Optional[Callable]) -> Dataset:
        prepare_fashion_mnist(self.hparams.root, self.hparams.download)
        return FashionMNIST(self.hparams.root, train=train, transform=transform)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data")
    parser.add_argument("--download", action="store_true", help="fall back to torchvision's download")
    args = parser.parse_args()
    print(f"Fashion-MNIST ready in {prepare_fashion_mnist(args.root, args.download)}")

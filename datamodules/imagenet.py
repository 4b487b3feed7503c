"""ImageNet (or any ImageFolder data set) from ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from datamodules.base import ImageDataModule


class ImageNetDataModule(ImageDataModule):
    """ImageFolder trees with the standard 224-pixel transforms. ImageNet's ``val/``
    (one folder per class, e.g. after torchvision's ``ImageNet`` preparation or the
    usual ``valprep.sh``) is the test set; validation is held out from ``train/``."""

    def __init__(
        self,
        root: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        val_fraction: float = 0.01,
        train_subset: Optional[int] = None,
        test_subset: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(root, batch_size, num_workers, val_fraction, train_subset, test_subset, seed, preset="imagenet")

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.make_dataset(True, None).classes)

    def make_dataset(self, train: bool, transform: Optional[Callable]) -> Dataset:
        folder = Path(self.hparams.root) / ("train" if train else "val")
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ImageNet folder {str(folder)!r} not found: data.init_args.root must hold train/ and val/, "
                "each with one sub-folder of images per class"
            )
        return ImageFolder(str(folder), transform=transform)

"""ImageNet (or any ImageFolder data set) from ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from datamodules.base import ImageDataModule


class ImageNetDataModule(ImageDataModule):
    """ImageFolder trees with the standard 224-pixel transforms. ImageNet's ``val/``
    (one folder per class, e.g. after torchvision's ``ImageNet`` preparation or the
    usual ``valprep.sh``) is the test set; validation is held out from ``train/``."""

    def __init__(self, *, root: str = "data/imagenet", num_workers: int = 8, val_fraction: float = 0.01,
                 **kwargs: Any) -> None:
        # Only the defaults that differ from ImageDataModule's are repeated here.
        super().__init__(root=root, num_workers=num_workers, val_fraction=val_fraction, preset="imagenet", **kwargs)

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

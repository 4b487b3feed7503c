"""CIFAR-10 through torchvision's own loader (``<root>/cifar-10-batches-py``)."""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional

from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

from datamodules.base import ImageDataModule


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 with the paper's presets: ``alexnet`` (resize 70, crop 64, no normalisation)
    or ``vgg`` (reflect-pad 4, crop 32, flip, normalisation). ``download: true`` fetches
    the data set once (needs a network)."""

    num_classes = 10

    def __init__(self, *, preset: Literal["alexnet", "vgg"] = "alexnet", download: bool = False, **kwargs: Any) -> None:
        super().__init__(preset=preset, **kwargs)

    def prepare_data(self) -> None:
        if self.hparams.download:
            CIFAR10(self.hparams.root, train=True, download=True)
            CIFAR10(self.hparams.root, train=False, download=True)

    def make_dataset(self, train: bool, transform: Optional[Callable]) -> Dataset:
        try:
            return CIFAR10(self.hparams.root, train=train, transform=transform)
        except RuntimeError as err:
            raise RuntimeError(
                f"CIFAR-10 not found under {self.hparams.root!r}/cifar-10-batches-py ({err}). "
                "Set data.init_args.download: true (needs a network) or point data.init_args.root at it."
            ) from err

"""What every image DataModule shares: a seeded validation split, an optional training
subset, and a deterministic pass over the training split for compression."""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Callable, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules.transforms import build_transforms


class ImageDataModule(pl.LightningDataModule, ABC):
    """Base class; subclasses say how to read their data set (``make_dataset``).

    Args:
        root: folder holding the data set (torchvision's layout).
        batch_size: per process (under DDP every rank loads this many).
        num_workers: DataLoader worker processes.
        val_fraction: share of the training set held out for validation (seeded).
        train_subset: train on only the first this-many images of the (seeded,
            shuffled) training split; ``None`` uses all of it.
        val_subset: validate on only the first this-many images of the (seeded)
            validation split (quick runs: a compression's budgets and floors are then
            judged on these); ``None`` uses all of it.
        test_subset: evaluate on only the first this-many test images (quick runs);
            ``None`` uses the whole test set.
        seed: seeds the split and the subset, so a config gives the same data twice.
        preset: transform preset (see ``datamodules.transforms.build_transforms``).
    """

    num_classes: int = 10

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 256,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        train_subset: Optional[int] = None,
        test_subset: Optional[int] = None,
        seed: int = 0,
        preset: str = "alexnet",
        val_subset: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        for name, value in (("train_subset", train_subset), ("val_subset", val_subset), ("test_subset", test_subset)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive number of images or null, got {value}")
        self.save_hyperparameters()
        self.train_transform, self.eval_transform = build_transforms(preset)
        self.train_set: Optional[Dataset] = None

    @abstractmethod
    def make_dataset(self, train: bool, transform: Callable) -> Dataset:
        """The full training (``train=True``) or test split with ``transform`` applied."""

    def split_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train indices, validation indices) into the full training split, seeded."""
        n = len(self.make_dataset(True, None))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.seed))
        n_val = int(round(self.hparams.val_fraction * n))
        train_idx, val_idx = perm[n_val:], perm[:n_val]
        if self.hparams.train_subset is not None:
            train_idx = train_idx[: self.hparams.train_subset]
        if self.hparams.val_subset is not None:
            val_idx = val_idx[: self.hparams.val_subset]
        return train_idx, val_idx

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        train_idx, val_idx = self.split_indices()
        self.train_set = Subset(self.make_dataset(True, self.train_transform), train_idx.tolist())
        # The same images with test-time transforms: what compression reads (deterministic).
        self.train_eval_set = Subset(self.make_dataset(True, self.eval_transform), train_idx.tolist())
        self.val_set = Subset(self.make_dataset(True, self.eval_transform), val_idx.tolist())
        self.test_set = self.make_dataset(False, self.eval_transform)
        if self.hparams.test_subset is not None:
            self.test_set = Subset(self.test_set, range(min(self.hparams.test_subset, len(self.test_set))))
        if len(self.train_set) == 0:
            raise ValueError(f"{type(self).__name__}: the training split is empty (check root={self.hparams.root!r})")

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def with_batch_size(self, batch_size: int) -> "ImageDataModule":
        """The same data (the same splits, shared once set up) in batches of ``batch_size``:
        a compression reads its passes in large batches, and its fine-tuning trains in the
        training run's."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        other = copy.copy(self)
        # its own hyper-parameters, so that this one keeps its batch size; the initial ones too,
        # which are what a logger writes to the run's hparams.yaml
        other._hparams = copy.copy(self.hparams)
        other._hparams_initial = copy.copy(self.hparams_initial)
        other.hparams.batch_size = other._hparams_initial.batch_size = batch_size
        return other

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def train_eval_dataloader(self, limit: Optional[int] = None) -> DataLoader:
        """The training split with eval transforms, in a fixed order (compression statistics, train
        loss); ``limit``: only its first this-many images."""
        dataset = self.train_eval_set
        if limit is not None and limit < len(dataset):
            dataset = Subset(dataset, range(limit))
        return self._loader(dataset, shuffle=False)

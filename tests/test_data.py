"""DataModules read the real on-disk formats through torchvision and apply the paper's presets."""
from __future__ import annotations

import pytest
import torch

from datamodules.cifar10 import CIFAR10DataModule
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.imagenet import ImageNetDataModule


def _first_batch(loader):
    images, labels = next(iter(loader))
    return images, labels


@pytest.mark.parametrize("preset, size", [("alexnet", 64), ("vgg", 32)])
def test_cifar10_presets_shapes_and_split(cifar10_checksums, preset, size):
    dm = CIFAR10DataModule(root=cifar10_checksums, batch_size=8, num_workers=0, val_fraction=0.1, preset=preset)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (90, 10, 20)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        images, labels = _first_batch(loader)
        assert images.shape == (8, 3, size, size) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and int(labels.max()) < 10
    raw, _ = _first_batch(dm.test_dataloader())
    if preset == "alexnet":  # no normalisation: pixels stay in [0, 1]
        assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0
    else:  # normalised: uniform noise pixels have mean ~ (0.5 - mean)/std, i.e. around 0
        assert float(raw.min()) < -1.0 and abs(float(raw.mean())) < 0.5


def test_cifar10_split_is_seeded_and_disjoint(cifar10_checksums):
    a = CIFAR10DataModule(root=cifar10_checksums, seed=1, train_subset=30).split_indices()
    b = CIFAR10DataModule(root=cifar10_checksums, seed=1, train_subset=30).split_indices()
    c = CIFAR10DataModule(root=cifar10_checksums, seed=2, train_subset=30).split_indices()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert len(a[0]) == 30 and len(a[1]) == 10 and not set(a[0].tolist()) & set(a[1].tolist())
    # val_subset: the first images of the same validation split, never training images
    small = CIFAR10DataModule(root=cifar10_checksums, seed=1, val_subset=4).split_indices()
    assert torch.equal(small[1], a[1][:4]) and len(small[0]) == 90
    with pytest.raises(ValueError, match="val_subset must be a positive number"):
        CIFAR10DataModule(root=cifar10_checksums, val_subset=0)


def test_cifar10_missing_data_says_how_to_fix(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path))
    with pytest.raises(RuntimeError, match="download: true"):
        dm.setup("fit")


def test_imagenet_folder_shapes(imagenet_root):
    dm = ImageNetDataModule(root=imagenet_root, batch_size=4, num_workers=0, val_fraction=0.25)
    dm.setup("fit")
    assert dm.num_classes == 3
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (14, 4, 6)
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        images, labels = _first_batch(loader)
        assert images.shape == (4, 3, 224, 224)
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        ImageNetDataModule(root=imagenet_root + "/nowhere").setup("fit")


def test_fashion_mnist_real_data(fashion_root):
    dm = FashionMNISTDataModule(root=fashion_root, batch_size=16, num_workers=0, val_fraction=0.1, train_subset=100)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (100, 6000, 10000)
    images, labels = _first_batch(dm.train_dataloader())
    assert images.shape == (16, 3, 64, 64)
    # grayscale made 3-channel: the channels are identical
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
    eval_a, _ = _first_batch(dm.train_eval_dataloader())
    eval_b, _ = _first_batch(dm.train_eval_dataloader())
    assert torch.equal(eval_a, eval_b)  # deterministic pass for compression

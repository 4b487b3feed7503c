"""Shared fixtures: small data sets in the real on-disk formats, and the real Fashion-MNIST."""
from __future__ import annotations

import hashlib
import pickle
import resource
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10

from cli.setup import configure_process
from datamodules.fashion_mnist import prepare_fashion_mnist
from tests.helpers import small_train_args

configure_process()  # the test process gets the settings train.py and compress.py make at start

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def fashion_root() -> str:
    """The real Fashion-MNIST (``make data`` puts it in ``data/``); never downloads."""
    root = REPO / "data"
    try:
        prepare_fashion_mnist(root, download=False)
    except FileNotFoundError as err:
        pytest.fail(f"{err}\nRun `make data` first (the test suite never downloads).")
    return str(root)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny CIFAR-10 in torchvision's python pickle format (5 train batches + test batch)."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / CIFAR10.base_folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        n = 20
        batch = {
            "batch_label": name,
            "labels": [int(v) for v in rng.integers(0, 10, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / CIFAR10.meta["filename"], "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 20}, f)
    return str(root)


@pytest.fixture
def cifar10_checksums(cifar10_root: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """torchvision checks the md5 of every CIFAR-10 file: point it at the fixture's checksums."""
    folder = Path(cifar10_root) / CIFAR10.base_folder
    monkeypatch.setattr(CIFAR10, "train_list", [[n, _md5(folder / n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, _md5(folder / n)] for n, _ in CIFAR10.test_list])
    monkeypatch.setitem(CIFAR10.meta, "md5", _md5(folder / CIFAR10.meta["filename"]))
    return cifar10_root


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An ImageFolder tree ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` of odd-sized JPEGs."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", 2)):
        for c in ("n01440764", "n01443537", "n01484850"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                h, w = rng.integers(180, 320, 2)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{c}_{i}.JPEG")
    return str(root)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pass cache for the compression tests of the session (``tests.helpers.small_compress_args``)."""
    return tmp_path_factory.mktemp("shared_cache")


@pytest.fixture(scope="session")
def trained_alexnet(tmp_path_factory: pytest.TempPathFactory, fashion_root: str):
    """AlexNet trained by ``train.py`` on 4,096 real Fashion-MNIST images for 2 epochs and
    tested on 1,280 (about a minute): the network the accuracy-floor and compression tests use.
    Returns the finished ``TrainCLI``; its best checkpoint is ``trained_alexnet.trainer.checkpoint_callback.best_model_path``."""
    from train import main

    folder = tmp_path_factory.mktemp("alexnet")
    # validated once, after the second epoch: best.ckpt (228 MB) is written once, not after each epoch
    return main(small_train_args(folder, fashion_root, "--trainer.max_epochs", "2", "--trainer.limit_test_batches", "20",
                                 "--model.init_args.save_last", "false", "--trainer.check_val_every_n_epoch", "2",
                                 subset=4096))


def _bytes_written() -> int | None:
    """Bytes this process has written to files so far, deleted later or not (Linux's /proc/self/io
    ``write_bytes``: what went to the storage layer; not ``wchar``, which also counts sockets, and
    a two-process DDP test all-reduces a 0.7 GB Gram matrix through one), or None without /proc."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


_WRITTEN_AT_START = _bytes_written()
_WRITTEN_BY_TEST: dict[str, int] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Bytes written by each test, its fixtures' set-up and tear-down included (a session fixture
    counts for the first test that uses it)."""
    start = _bytes_written()
    yield
    end = _bytes_written()
    if start is not None and end is not None:
        _WRITTEN_BY_TEST[item.nodeid] = end - start


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """How much the suite wrote to disk (temporary folders and caches; the README's figure), and
    which tests wrote most."""
    end = _bytes_written()
    if end is None or _WRITTEN_AT_START is None:
        return
    # subprocesses (DDP ranks, the stop-signal runs): what reached the block layer, in 512-byte units
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock * 512
    terminalreporter.write_line(f"the test session wrote {(end - _WRITTEN_AT_START) / 1e9:.2f} GB "
                                f"to files (this process's write_bytes, /proc/self/io) and its subprocesses "
                                f"{children / 1e9:.2f} GB (block writes, getrusage)")
    for nodeid, written in sorted(_WRITTEN_BY_TEST.items(), key=lambda kv: -kv[1])[:8]:
        terminalreporter.write_line(f"  {written / 1e9:6.2f} GB  {nodeid}")

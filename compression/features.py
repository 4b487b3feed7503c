"""The inputs of the head (the block of layers being compressed), cached on disk per split.

Every layer that a run compresses lies in one head, such as AlexNet's ``classifier``: its
statistics, the evaluations of target-search candidates and the report's train and test
accuracies all depend only on what enters the head. So the network before the head (the
convolutions) runs once per split and its outputs are stored, float32, in a flat file
that is read back through ``numpy.memmap`` in chunks: memory stays at one chunk whatever
the number of samples, and disk holds N x F x 4 bytes (Fashion-MNIST at 64x64 for AlexNet:
54,000 x 9,216 x 4 = 2.0 GB; ImageNet's 1.28 M images at 224x224: 47 GB).
Under DDP each process stores and reads its own shard, and sums are all-reduced.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor


class FeatureWriter:
    """Appends batches of (inputs, labels) to ``<path>.f32`` and ``<path>.labels``; ``close``
    writes ``<path>.json`` (shape, count) last, so an interrupted write is never taken as whole."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data = open(self.path.with_suffix(".f32.tmp"), "wb")
        self._labels: list[np.ndarray] = []
        self.shape: tuple[int, ...] | None = None
        self.n = 0

    def write(self, inputs: Tensor, labels: Tensor) -> None:
        shape = tuple(inputs.shape[1:])
        if self.shape is not None and shape != self.shape:
            raise ValueError(f"the head's inputs changed shape from {self.shape} to {shape}")
        self.shape = shape
        self._data.write(inputs.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        self._labels.append(labels.detach().cpu().numpy().astype(np.int64))
        self.n += len(labels)

    def close(self) -> "BlockFeatures":
        self._data.close()
        self.path.with_suffix(".f32.tmp").replace(self.path.with_suffix(".f32"))
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
        np.save(self.path.with_suffix(".labels.npy"), labels)
        self.path.with_suffix(".json").write_text(json.dumps({"n": self.n, "shape": list(self.shape or ())}))
        return BlockFeatures.open(self.path)


@dataclass
class BlockFeatures:
    """One process's shard of a split's head inputs: ``n`` samples of ``shape``, and labels."""

    path: Path
    n: int
    shape: tuple[int, ...]

    @classmethod
    def open(cls, path: Path) -> "BlockFeatures":
        meta = json.loads(Path(path).with_suffix(".json").read_text())
        return cls(Path(path), int(meta["n"]), tuple(meta["shape"]))

    @classmethod
    def exists(cls, path: Path) -> bool:
        return all(Path(path).with_suffix(s).is_file() for s in (".json", ".f32", ".labels.npy"))

    @property
    def labels(self) -> Tensor:
        return torch.from_numpy(np.load(self.path.with_suffix(".labels.npy")))

    def batches(self, batch_size: int = 2048) -> Iterator[tuple[Tensor, Tensor]]:
        """(inputs (B, *shape), labels (B,)) in order, read from disk a chunk at a time."""
        if self.n == 0:
            return
        data = np.memmap(self.path.with_suffix(".f32"), dtype=np.float32, mode="r", shape=(self.n, *self.shape))
        labels = self.labels
        for start in range(0, self.n, batch_size):
            stop = min(start + batch_size, self.n)
            yield torch.from_numpy(np.array(data[start:stop])), labels[start:stop]

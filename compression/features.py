"""The inputs of the head (the block of layers being compressed), cached on disk per split.

Every layer that a run compresses lies in one head, such as AlexNet's ``classifier``: its
statistics, the evaluations of target-search candidates and the report's train and test
accuracies all depend only on what enters the head. So the network before the head (the
convolutions) runs once per split and its outputs are stored, float32, in a flat file
that is read back through ``numpy.memmap`` in chunks: memory stays at one chunk whatever
the number of samples, and disk holds N x F x 4 bytes (Fashion-MNIST at 64x64 for AlexNet:
54,000 x 9,216 x 4 = 2.0 GB; ImageNet's 1.28 M images at 224x224: 47 GB).
Under DDP each process stores and reads its own shard, and sums are all-reduced.

A feature set is an entry of ``compression.cache``: before its first batch is written the
writer reserves its whole size there (samples x features x 4 bytes, known from the first
batch's shape and the number of samples), which checks the disk's free space, keeps the
folder's size limit by evicting least recently used entries, and refuses a set too large for
either before anything is written. Opening a set makes it the most recently used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from compression import cache


class FeatureWriter:
    """Appends batches of (inputs, labels) to ``<path>.f32`` and ``<path>.labels``; ``close``
    writes ``<path>.json`` (shape, count, ``description``) last, so an interrupted write is never
    taken as whole. ``samples``: how many samples the split has in all (all processes' shards:
    on one machine they share the disk), to reserve the set's size before its first batch
    (None: each batch is checked against the free space as it comes, and the limit is kept at
    ``close``); ``max_bytes``: the folder's cache limit (None: none). A set that does not fit
    raises ``compression.cache.CacheSpaceError`` at the first batch, before anything is written."""

    def __init__(self, path: Path, samples: Optional[int] = None, max_bytes: Optional[int] = None,
                 description: Optional[dict[str, Any]] = None) -> None:
        self.path = Path(path)
        self.samples, self.max_bytes, self.description = samples, max_bytes, description
        self._data: Any = None  # opened at the first batch, once its room is reserved: a refusal leaves no file
        self._labels: list[np.ndarray] = []
        self.shape: tuple[int, ...] | None = None
        self.n = 0

    def write(self, inputs: Tensor, labels: Tensor) -> None:
        shape = tuple(inputs.shape[1:])
        if self.shape is not None and shape != self.shape:
            raise ValueError(f"the head's inputs changed shape from {self.shape} to {shape}")
        self.shape = shape
        data = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
        per_sample = int(np.prod(shape)) * 4 + 8  # bytes: float32 inputs and an int64 label
        if self._data is None:
            cache.reserve(self.path.parent, (self.samples or len(labels)) * per_sample + 4096, self.max_bytes,
                          keep=self.path.name)  # 4 kB: the .npy header and the .json
            self._open()
        elif self.samples is None:
            cache.check_free_space(self.path.parent, len(labels) * per_sample)
        self._data.write(data.tobytes())
        cache.counts.written += data.nbytes
        self._labels.append(labels.detach().cpu().numpy().astype(np.int64))
        self.n += len(labels)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data = open(self.path.with_suffix(".f32.tmp"), "wb")

    def close(self) -> "BlockFeatures":
        if self._data is None:  # no batch: an empty set
            self._open()
        self._data.close()
        self.path.with_suffix(".f32.tmp").replace(self.path.with_suffix(".f32"))
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
        np.save(self.path.with_suffix(".labels.npy"), labels)
        meta = {"n": self.n, "shape": list(self.shape or ()), "description": self.description}
        self.path.with_suffix(".json").write_text(json.dumps(meta))
        files = [self.path.with_suffix(s) for s in (".f32", ".labels.npy", ".json")]
        sizes = [f.stat().st_size for f in files]
        cache.counts.written += sizes[1] + sizes[2]  # the inputs were counted batch by batch
        # What was reserved was an estimate (a DDP sampler pads shards; without ``samples``, one
        # batch): keep the limit for the real size.
        cache.settle(self.path.parent, sum(sizes), self.max_bytes, keep=self.path.name)
        return BlockFeatures.open(self.path)


@dataclass
class BlockFeatures:
    """One process's shard of a split's head inputs: ``n`` samples of ``shape``, and labels."""

    path: Path
    n: int
    shape: tuple[int, ...]

    @classmethod
    def open(cls, path: Path) -> "BlockFeatures":
        """The stored set at ``path``, now the cache's most recently used entry."""
        meta = json.loads(Path(path).with_suffix(".json").read_text())
        cache.touch(Path(path).with_suffix(s) for s in (".json", ".f32", ".labels.npy"))
        return cls(Path(path), int(meta["n"]), tuple(meta["shape"]))

    @classmethod
    def exists(cls, path: Path) -> bool:
        return all(Path(path).with_suffix(s).is_file() for s in (".json", ".f32", ".labels.npy"))

    @property
    def labels(self) -> Tensor:
        labels = np.load(self.path.with_suffix(".labels.npy"))
        cache.counts.read += labels.nbytes
        return torch.from_numpy(labels)

    def batches(self, batch_size: int = 2048) -> Iterator[tuple[Tensor, Tensor]]:
        """(inputs (B, *shape), labels (B,)) in order, read from disk a chunk at a time."""
        if self.n == 0:
            return
        data = np.memmap(self.path.with_suffix(".f32"), dtype=np.float32, mode="r", shape=(self.n, *self.shape))
        labels = self.labels
        for start in range(0, self.n, batch_size):
            stop = min(start + batch_size, self.n)
            chunk = np.array(data[start:stop])
            cache.counts.read += chunk.nbytes
            yield torch.from_numpy(chunk), labels[start:stop]

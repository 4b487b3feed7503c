"""On-disk cache of what passes over the data produce (layer statistics, loss, accuracy),
keyed by everything that determines them.

``describe`` fingerprints a pass: a SHA-256 over the weights that the pass reads, the layer
(or none), the data set class, root, split and exact sample indices, the eval transform
and the sample count. A stored entry carries that description in readable form; an entry
whose description differs from what is asked for, or that cannot be read, is recomputed,
never trusted. A second compression of the same checkpoint with another lambda therefore
starts at once. Entries are plain dicts of tensors and numbers (``torch.load`` with
``weights_only=True`` reads them); what they mean is the caller's business.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over named tensors (names and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe(network: nn.Module, layer: Optional[str], datamodule: Any, split: str,
             skip_prefix: Optional[str] = None) -> dict[str, Any]:
    """What a pass of ``network`` over ``split`` ('train', 'val' or 'test') depends on.
    Weights under ``skip_prefix`` (a module path) are left out: the pass does not read them."""
    skip = None if skip_prefix is None else (skip_prefix + "." if skip_prefix else "")
    weights = fingerprint((n, t) for n, t in network.state_dict().items() if skip is None or not n.startswith(skip))
    dataset = {"train": datamodule.train_eval_set, "val": datamodule.val_set, "test": datamodule.test_set}[split]
    indices = list(getattr(dataset, "indices", range(len(dataset))))
    return {
        "weights": weights,
        "layer": layer,
        "dataset": type(datamodule).__name__,
        "root": str(Path(datamodule.hparams.root).resolve()),
        "split": split,
        "indices": hashlib.sha256(str(indices).encode()).hexdigest(),
        "transform": repr(datamodule.eval_transform),
        "samples": len(dataset),
    }


def entry_path(cache_dir: str | Path, description: dict[str, Any], suffix: str = ".pt") -> Path:
    key = hashlib.sha256(repr(sorted(description.items())).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{description['split']}-{description['layer'] or 'eval'}-{key}{suffix}"


def load_entry(cache_dir: str | Path, description: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The stored entry for ``description`` if a valid file exists, else None."""
    path = entry_path(cache_dir, description)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file: recompute
        return None
    if not isinstance(saved, dict) or saved.get("description") != description:
        return None
    return saved["entry"]


def save_entry(cache_dir: str | Path, description: dict[str, Any], entry: dict[str, Any]) -> Path:
    path = entry_path(cache_dir, description)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"description": description, "entry": entry}, tmp)
    tmp.replace(path)  # atomic: an interrupted write never leaves a half file under the real name
    return path

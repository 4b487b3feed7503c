"""On-disk cache of network passes (layer statistics, loss, accuracy), keyed by everything
that determines them.

The key is a SHA-256 over the network's weights, the layer (or none), the data set class,
root, split and exact sample indices, the eval transform and the sample count. The file
also stores that description in readable form; a file whose description or shapes differ
from what is asked for, or that cannot be read, is recomputed, never trusted. A second
compression of the same checkpoint with another lambda therefore starts at once.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from grouplasso import LassoStats
from lightning_modules.network_pass import PassResult


def describe(network: nn.Module, layer: Optional[str], datamodule: Any, split: str) -> dict[str, Any]:
    """What a pass of ``network`` over ``split`` ('train' or 'test') depends on."""
    weights = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    dataset = datamodule.train_eval_set if split == "train" else datamodule.test_set
    indices = list(getattr(dataset, "indices", range(len(dataset))))
    return {
        "weights": weights.hexdigest(),
        "layer": layer,
        "dataset": type(datamodule).__name__,
        "root": str(Path(datamodule.hparams.root).resolve()),
        "split": split,
        "indices": hashlib.sha256(str(indices).encode()).hexdigest(),
        "transform": repr(datamodule.eval_transform),
        "samples": len(dataset),
    }


def _path(cache_dir: str | Path, description: dict[str, Any]) -> Path:
    key = hashlib.sha256(repr(sorted(description.items())).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{description['split']}-{description['layer'] or 'eval'}-{key}.pt"


def load_pass(cache_dir: str | Path, description: dict[str, Any]) -> Optional[PassResult]:
    """The cached result for ``description`` if a valid file exists, else None."""
    path = _path(cache_dir, description)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["description"] != description or saved["n"] != description["samples"]:
            return None
        stats = LassoStats(**saved["stats"]) if saved["stats"] is not None else None
    except Exception:  # a truncated or foreign file: recompute
        return None
    if (stats is None) != (description["layer"] is None):
        return None
    return PassResult(loss=saved["loss"], accuracy=saved["accuracy"], n=saved["n"], stats=stats)


def save_pass(cache_dir: str | Path, description: dict[str, Any], result: PassResult) -> Path:
    path = _path(cache_dir, description)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = None
    if result.stats is not None:
        stats = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(result.stats).items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"description": description, "loss": result.loss, "accuracy": result.accuracy, "n": result.n,
                "stats": stats}, tmp)
    tmp.replace(path)  # atomic: an interrupted write never leaves a half file under the real name
    return path

"""Every pass over the data that a compression run makes, through the head-input cache.

The network before the head runs once per split (``compression.features``); evaluations
and layer statistics then run the head alone over the stored inputs, and their results
are cached on disk by fingerprint (``compression.cache``). A layer's own inputs on the
validation split are kept in memory for the target search, where a candidate costs one
product with the layer's new weight and the rest of the head.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import IterableDataset

from compression.cache import describe, entry_path, load_entry, save_entry
from compression.features import BlockFeatures, FeatureWriter
from compression.settings import TrainerSettings
from grouplasso import LassoStats, active_columns
from lightning_modules.network_pass import BlockInputPass, PassResult, require_samples, run_pass
from models.pruned import IndexedLinear


def head_of(network: nn.Module, module_paths: list[str]) -> str:
    """The module path of the smallest ``nn.Sequential`` that holds every layer in
    ``module_paths`` as a direct child (``classifier`` for AlexNet's first, pen and last);
    ``""`` when that is the network itself. Raises ``ValueError`` when there is none."""
    parents = {path.rpartition(".")[0] for path in module_paths}
    if len(parents) == 1:
        (parent,) = parents
        if isinstance(network.get_submodule(parent), nn.Sequential):
            return parent
    raise ValueError(f"the layers {module_paths} are not children of one nn.Sequential (such as AlexNet's classifier); "
                     "compress them in separate runs")


def relative_name(head: str, module_path: str) -> str:
    return module_path[len(head) + 1:] if head else module_path


class _Shard(IterableDataset):
    """The stored head inputs of this process as a stream of ready-made batches."""

    def __init__(self, features: BlockFeatures, batch_size: int) -> None:
        self.features, self.batch_size = features, batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.features.batches(self.batch_size)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over the processes of a DDP run (the tensor itself in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


@dataclass
class DataPasses:
    """The passes of one run over ``datamodule``'s splits, for layers inside ``head``."""

    datamodule: pl.LightningDataModule
    head: str
    trainer: TrainerSettings
    cache_dir: Optional[Path]
    work_dir: Path
    # Read the stored inputs in the data loader's batches: the head then computes exactly what
    # it computes inside a whole-network pass (float32 products round by batch shape).
    batch_size: int = 500
    seconds: dict[str, float] = field(default_factory=dict)  # time of each split's pass up to the head
    _done: dict[str, tuple[PassResult, float]] = field(default_factory=dict, repr=False)
    _shard: Optional[str] = field(default=None, repr=False)

    def loader(self, split: str) -> Any:
        dm = self.datamodule
        return {"train": dm.train_eval_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()

    def features(self, network: nn.Module, split: str) -> BlockFeatures:
        """This process's stored head inputs of ``split``, made by one pass up to the head if needed."""
        description = describe(network, f"head-{self.head}", self.datamodule, split, skip_prefix=self.head)
        if self._shard is None:  # a Trainer knows this process's rank before DDP starts
            probe = self.trainer.data_parallel()
            self._shard = f"rank{probe.global_rank}of{probe.world_size}"
        path = entry_path(self.cache_dir or self.work_dir / "features", description, suffix=f"-{self._shard}")
        if BlockFeatures.exists(path):
            return BlockFeatures.open(path)
        trainer = self.trainer.data_parallel()
        start = time.perf_counter()
        writer = FeatureWriter(path)
        trainer.predict(BlockInputPass(network, self.head, writer), dataloaders=self.loader(split),
                        return_predictions=False)
        network.cpu()
        features = writer.close()
        require_samples(int(all_reduce_sum(torch.tensor(features.n, dtype=torch.float64)).item()))
        self.seconds[split] = self.seconds.get(split, 0.0) + time.perf_counter() - start
        return features

    def evaluate(self, network: nn.Module, split: str, layer: Optional[str] = None) -> tuple[PassResult, float]:
        """Loss and accuracy of ``network`` on ``split`` (and the statistics of ``layer``, a module
        path inside the head), from the cache when possible; returns the result and the seconds
        spent (0 for a cache hit)."""
        description = describe(network, layer, self.datamodule, split)
        key = repr(sorted(description.items()))
        if key in self._done:  # computed earlier in this run: the time it took then
            return self._done[key]
        if self.cache_dir and (hit := load_entry(self.cache_dir, description)) is not None:
            return _from_entry(hit), 0.0
        features = self.features(network, split)
        start = time.perf_counter()
        trainer = self.trainer.data_parallel(use_distributed_sampler=False)
        result = run_pass(trainer, network.get_submodule(self.head), _Shard(features, self.batch_size),
                          relative_name(self.head, layer) if layer else None)
        network.cpu()
        seconds = time.perf_counter() - start
        if self.cache_dir and trainer.is_global_zero:
            save_entry(self.cache_dir, description, _to_entry(result))
        self._done[key] = (result, seconds)
        return result, seconds

    def layer_inputs(self, network: nn.Module, split: str, layer: str) -> tuple[Tensor, Tensor]:
        """The inputs x (n, K) of ``layer`` on this process's shard of ``split`` (as the layer reads
        them: an ``IndexedLinear`` sees its selected inputs) and the labels (n,), in memory."""
        head = network.get_submodule(self.head).eval()
        module = network.get_submodule(layer)
        device = self.trainer.compute_device
        inputs: list[Tensor] = []

        def record(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            inputs.append((x.index_select(-1, module.index) if isinstance(module, IndexedLinear) else x).cpu())
            raise _LayerReached

        hook = module.register_forward_pre_hook(record)
        labels = []
        try:
            head.to(device)
            with torch.no_grad():
                for x, y in self.features(network, split).batches(self.batch_size):
                    try:
                        head(x.to(device))
                    except _LayerReached:
                        pass
                    labels.append(y)
        finally:
            hook.remove()
            head.cpu()
        return torch.cat(inputs), torch.cat(labels)


class _LayerReached(Exception):
    """The layer's inputs are recorded; the rest of the head is not needed."""


def tail_accuracy(network: nn.Module, head: str, layer: str, inputs: Tensor, labels: Tensor, V: Tensor,
                  batch_size: int = 4096) -> float:
    """Accuracy over all processes of ``network`` with ``layer``'s weight replaced by ``V``
    (D, K), from the layer's stored ``inputs`` (n, K): y = x V^T + b, then the rest of the head.
    Only V's nonzero columns are multiplied."""
    sequential = network.get_submodule(head)
    index = list(dict(sequential.named_children())).index(relative_name(head, layer))
    rest = sequential[index + 1:].eval()
    bias = network.get_submodule(layer).bias
    device = inputs.device
    keep = active_columns(V).to(device)
    W = V[:, keep].to(device, torch.float32)
    rest.to(device)
    correct = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            x = inputs[start:start + batch_size].index_select(1, keep)
            y = F.linear(x, W, None if bias is None else bias.to(device, torch.float32))
            correct += (rest(y).argmax(1).cpu() == labels[start:start + batch_size]).sum()
    rest.cpu()
    n = all_reduce_sum(torch.tensor(float(len(labels)), dtype=torch.float64))
    return float(all_reduce_sum(correct) / require_samples(int(n.item())))


def _to_entry(result: PassResult) -> dict[str, Any]:
    stats = None if result.stats is None else {k: (v.cpu() if isinstance(v, Tensor) else v)
                                               for k, v in vars(result.stats).items()}
    return {"loss": result.loss, "accuracy": result.accuracy, "n": result.n, "stats": stats}


def _from_entry(entry: dict[str, Any]) -> PassResult:
    stats = None if entry["stats"] is None else LassoStats(**entry["stats"])
    return PassResult(loss=entry["loss"], accuracy=entry["accuracy"], n=entry["n"], stats=stats)

"""Every pass over the data that a compression run makes, through the head-input cache.

The network before the head runs once per split (``compression.features``); evaluations
and layer statistics then run the head alone over the stored inputs, and their results
are cached on disk by fingerprint (``compression.cache``). A layer's own inputs on the
validation split are kept in memory for the target search, where a candidate costs one
product with the layer's new weight and the rest of the head.
"""
from __future__ import annotations

import time
from functools import partial
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
from grouplasso import LassoStats, active_columns, active_groups
from lightning_modules.network_pass import BlockInputPass, PassResult, require_samples, run_pass
from models.pruned import IndexedLinear
from models.tail import tail_after


def head_of(network: nn.Module, module: str) -> str:
    """Where the passes for layer ``module`` start reading stored inputs: its parent module
    path when that is an ``nn.Sequential`` that ends the network (AlexNet's and VGG-19's
    ``classifier``), else ``""``, the network itself (a convolution: its passes read the
    images). ``BlockInputPass`` checks on the first batch that the head's output is the
    network's output."""
    parent = module.rpartition(".")[0]
    children = [name for name, _ in network.named_children()]
    if parent and parent in children and isinstance(network.get_submodule(parent), nn.Sequential) \
            and children[-1] == parent:
        return parent
    return ""


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
    # Output positions sampled per image for a convolution's statistics (``NetworkPass``'s
    # ``positions`` and ``seed``); empty: all positions.
    conv_sampling: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # time of each split's pass up to the head
    _done: dict[str, tuple[PassResult, float]] = field(default_factory=dict, repr=False)
    _shard: Optional[str] = field(default=None, repr=False)

    def loader(self, split: str) -> Any:
        dm = self.datamodule
        return {"train": dm.train_eval_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()

    def features(self, network: nn.Module, split: str) -> BlockFeatures:
        """This process's stored head inputs of ``split``, made by one pass up to the head if needed
        (only for a head inside the network: the network's own inputs are the data set's)."""
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
        if layer is not None and self.conv_sampling and isinstance(network.get_submodule(layer), nn.Conv2d):
            description["conv_sampling"] = repr(sorted(self.conv_sampling.items()))
        key = repr(sorted(description.items()))
        if key in self._done:  # computed earlier in this run: the time it took then
            return self._done[key]
        if self.cache_dir and (hit := load_entry(self.cache_dir, description)) is not None:
            return _from_entry(hit), 0.0
        start = time.perf_counter()
        if self.head:
            features = self.features(network, split)
            start = time.perf_counter()
            trainer = self.trainer.data_parallel(use_distributed_sampler=False)
            loader: Any = _Shard(features, self.batch_size)
        else:  # the head is the network: read the data set (sharded by the Trainer under DDP)
            trainer, loader = self.trainer.data_parallel(), self.loader(split)
        result = run_pass(trainer, network.get_submodule(self.head), loader,
                          relative_name(self.head, layer) if layer else None, **self.conv_sampling)
        network.cpu()
        seconds = time.perf_counter() - start
        if self.cache_dir and trainer.is_global_zero:
            save_entry(self.cache_dir, description, _to_entry(result))
        self._done[key] = (result, seconds)
        return result, seconds

    def layer_inputs(self, network: nn.Module, split: str, layer: str) -> tuple[Tensor, Tensor]:
        """The inputs of ``layer`` on this process's shard of ``split`` (as the layer reads them:
        an ``IndexedLinear`` sees its selected inputs; a convolution its (n, C, H, W) maps) and
        the labels (n,), in memory."""
        head = network.get_submodule(self.head).eval()
        module = network.get_submodule(layer)
        device = self.trainer.compute_device
        inputs: list[Tensor] = []

        def record(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            inputs.append((x.index_select(-1, module.index) if isinstance(module, IndexedLinear) else x).cpu())
            raise _LayerReached

        if self.head:
            batches: Iterator = self.features(network, split).batches(self.batch_size)
        else:  # this process's share of the data set's batches
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
                else (0, 1)
            batches = (batch for i, batch in enumerate(self.loader(split)) if i % world == rank)
        hook = module.register_forward_pre_hook(record)
        labels = []
        try:
            head.to(device)
            with torch.no_grad():
                for x, y in batches:
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


def tail_accuracy(network: nn.Module, layer: str, inputs: Tensor, labels: Tensor, V: Tensor,
                  group: int = 1, batch_size: int = 4096) -> float:
    """Accuracy over all processes of ``network`` with ``layer``'s weight replaced by ``V``
    (D, K; a convolution's flattened (D, C*kh*kw) weight), from the layer's stored ``inputs``:
    the layer's product with V, then ``models.tail.tail_after``. Only V's nonzero groups of
    ``group`` columns (input neurons or channels) are read."""
    module = network.get_submodule(layer)
    rest = tail_after(network, layer).eval()
    device = inputs.device
    keep = active_groups(V, group).to(device)
    bias = None if module.bias is None else module.bias.detach().to(device, torch.float32)
    if isinstance(module, nn.Conv2d):
        W = V.reshape(module.weight.shape)[:, keep].to(device, torch.float32)
        product = partial(F.conv2d, weight=W, bias=bias, stride=module.stride, padding=module.padding,
                          dilation=module.dilation)
        select = 1
    else:
        columns = active_columns(V, group).to(device)
        W = V[:, columns].to(device, torch.float32)
        product, select, keep = partial(F.linear, weight=W, bias=bias), -1, columns
    rest.to(device)
    correct = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            y = product(inputs[start:start + batch_size].index_select(select, keep))
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

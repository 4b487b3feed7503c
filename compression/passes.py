"""Every pass over the data that a compression run makes, through the head-input cache.

The network before the head runs once per split (``compression.features``); evaluations
and layer statistics then run the head alone over the stored inputs, and their results
are cached on disk by fingerprint (``compression.cache``). For the target search the value
of one tensor before a group's consumers (``models.tail``) is kept in memory per split, so
that a candidate costs the rest of the network with the consumers' new weights, read only
at the groups the candidate keeps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import IterableDataset

from compression.cache import describe, entry_path, load_entry, save_entry
from compression.features import BlockFeatures, FeatureWriter
from compression.settings import TrainerSettings
from grouplasso import LassoStats
from lightning_modules.network_pass import BlockInputPass, PassResult, require_samples, run_pass
from models.tail import Narrowed, cut_before, for_inference, prefix, tail


def head_of(network: nn.Module, modules: Sequence[str]) -> str:
    """Where the passes for layers ``modules`` start reading stored inputs: their common parent
    module path when that is an ``nn.Sequential`` that ends the network (AlexNet's and VGG-19's
    ``classifier``), else ``""``, the network itself (convolutions, residual networks: their
    passes read the images). ``BlockInputPass`` checks on the first batch that the head's
    output is the network's output."""
    parents = {module.rpartition(".")[0] for module in modules}
    if len(parents) != 1:
        return ""
    parent = parents.pop()
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

    def __len__(self) -> int:
        """Batches in the stream: what gives the pass's progress bar its total."""
        return -(-self.features.n // self.batch_size)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over the processes of a DDP run (the tensor itself in a single process)."""
    if _distributed():
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
    # Only the first this-many training images for statistics and the train loss (None: all).
    train_limit: Optional[int] = None
    seconds: dict[str, float] = field(default_factory=dict)  # time of each split's pass up to the head
    _done: dict[str, tuple[PassResult, float]] = field(default_factory=dict, repr=False)
    _shard: Optional[str] = field(default=None, repr=False)
    # Bytes ``cache_dir`` may hold (``--cache_max_gb``; None: no limit): writing an entry first
    # evicts the least recently used ones (``compression.cache.reserve``).
    cache_max_bytes: Optional[int] = None

    def loader(self, split: str) -> Any:
        dm = self.datamodule
        if split == "train":
            return dm.train_eval_dataloader(self.train_limit)
        return {"val": dm.val_dataloader, "test": dm.test_dataloader}[split]()

    def _limit(self, split: str) -> Optional[int]:
        return self.train_limit if split == "train" else None

    def features(self, network: nn.Module, split: str) -> BlockFeatures:
        """This process's stored head inputs of ``split``, made by one pass up to the head if needed
        (only for a head inside the network: the network's own inputs are the data set's)."""
        description = describe(network, [f"head-{self.head}"], self.datamodule, split, skip_prefix=self.head,
                               limit=self._limit(split))
        if self._shard is None:  # a Trainer knows this process's rank before DDP starts
            probe = self.trainer.data_parallel()
            self._shard = f"rank{probe.global_rank}of{probe.world_size}"
        path = entry_path(self.cache_dir or self.work_dir / "features", description, suffix=f"-{self._shard}")
        if BlockFeatures.exists(path):
            return BlockFeatures.open(path)
        trainer = self.trainer.data_parallel()
        start = time.perf_counter()
        writer = FeatureWriter(path, samples=description["samples"], description=description,
                               max_bytes=self.cache_max_bytes if self.cache_dir else None)
        trainer.predict(BlockInputPass(network, self.head, writer), dataloaders=self.loader(split),
                        return_predictions=False)
        network.cpu()
        features = writer.close()
        require_samples(int(all_reduce_sum(torch.tensor(features.n, dtype=torch.float64)).item()))
        self.seconds[split] = self.seconds.get(split, 0.0) + time.perf_counter() - start
        return features

    def evaluate(self, network: nn.Module, split: str, layers: Sequence[str] = (),
                 once: bool = False, targets: Optional[nn.Module] = None,
                 output_index: Optional[dict[str, Tensor]] = None) -> tuple[PassResult, float]:
        """Loss and accuracy of ``network`` on ``split`` (and the statistics of ``layers``, module
        paths inside the head, all in the same pass), from the cache when possible; returns the
        result and the seconds spent (0 for a cache hit). ``once``: no other pass will read this
        network's head inputs (a fine-tuned network, whose layers before the head changed):
        the whole network reads the data set and nothing is stored but the result (storing
        AlexNet's head inputs of 8,192 training images would write 0.3 GB to read them once).
        ``targets``, ``output_index``: the statistics' outputs are the ``targets`` network's (the
        original, for a partly compressed ``network``; see ``NetworkPass``)."""
        layers = tuple(layers)
        targets = None if targets is network or not layers else targets
        description = describe(network, layers, self.datamodule, split, limit=self._limit(split))
        if self.conv_sampling and any(isinstance(network.get_submodule(layer), nn.Conv2d) for layer in layers):
            description["conv_sampling"] = repr(sorted(self.conv_sampling.items()))
        if targets is not None:
            index = {layer: output_index[layer].tolist() for layer in layers if output_index and layer in output_index}
            description["targets"] = describe(targets, layers, self.datamodule, split)["weights"] + repr(index)
        key = repr(sorted(description.items()))
        if key in self._done:  # computed earlier in this run: the time it took then
            return self._done[key]
        if self.cache_dir and (hit := load_entry(self.cache_dir, description)) is not None:
            return _from_entry(hit), 0.0
        start = time.perf_counter()
        head = "" if once else self.head
        if head and targets is not None and not self._same_front(network, targets, split):
            head = ""  # the stored head inputs are ``network``'s, not the reference's: read the images
        if head:
            features = self.features(network, split)
            start = time.perf_counter()
            trainer = self.trainer.data_parallel(use_distributed_sampler=False)
            loader: Any = _Shard(features, self.batch_size)
        else:  # the whole network: read the data set (sharded by the Trainer under DDP)
            trainer, loader = self.trainer.data_parallel(), self.loader(split)
        result = run_pass(trainer, network.get_submodule(head), loader,
                          [relative_name(head, layer) for layer in layers], **self.conv_sampling,
                          targets=None if targets is None else targets.get_submodule(head),
                          output_index={relative_name(head, layer): index
                                        for layer, index in (output_index or {}).items() if layer in layers})
        if result.stats is not None:
            result.stats = {layer: result.stats[relative_name(head, layer)] for layer in layers}
        network.cpu()
        if targets is not None:
            targets.cpu()
        seconds = time.perf_counter() - start
        if self.cache_dir and trainer.is_global_zero:
            save_entry(self.cache_dir, description, _to_entry(result), max_bytes=self.cache_max_bytes)
        self._done[key] = (result, seconds)
        return result, seconds

    def _same_front(self, network: nn.Module, other: nn.Module, split: str) -> bool:
        """Whether the two networks compute the same head inputs (the same weights before the head)."""
        def front(model: nn.Module) -> str:
            return describe(model, [], self.datamodule, split, skip_prefix=self.head)["weights"]
        return front(network) == front(other)

    def cut_inputs(self, network: nn.Module, split: str, layers: Sequence[str],
                   limit: Optional[int] = None) -> "CutInputs":
        """The value, on this process's shard of ``split``, of the tensor just before ``layers``
        (``models.tail.cut_before``: for a chain the first layer's input, for a residual network
        the input of the block), with the labels, in memory: what a candidate's accuracy is
        computed from. ``limit``: only (about) the first this-many samples of the shard, in whole
        batches."""
        head = network.get_submodule(self.head).eval()
        relative = [relative_name(self.head, layer) for layer in layers]
        cut = cut_before(head, relative)
        front = for_inference(prefix(head, cut).eval())  # BatchNorm folded, channels-last: as the tails run
        device = self.trainer.compute_device
        if self.head:
            batches: Iterator = self.features(network, split).batches(self.batch_size)
        else:  # this process's share of the data set's batches
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
                else (0, 1)
            batches = (batch for i, batch in enumerate(self.loader(split)) if i % world == rank)
        inputs, labels = [], []
        front.to(device)
        try:
            with torch.no_grad():
                for x, y in batches:
                    if limit is not None and sum(map(len, labels)) >= limit:
                        break
                    x = x.to(device)
                    inputs.append(front(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x).cpu())
                    labels.append(y)
        finally:
            head.cpu()
        return CutInputs(self.head, cut, torch.cat(inputs), torch.cat(labels))

    def correct(self, network: nn.Module, split: str) -> Tensor:
        """Which images of ``split`` the whole ``network`` gets right: bool (n,), in the data
        loader's order, by one pass over the data set (one process: the held-out check's images
        are the last of the split, ``CompressionPipeline.held_out``)."""
        device = self.trainer.compute_device
        network.eval().to(device)
        right = []
        try:
            with torch.no_grad():
                for x, y in self.loader(split):
                    right.append(network(x.to(device)).argmax(1).cpu() == y)
        finally:
            network.cpu()
        return torch.cat(right)

    def accuracy(self, network: nn.Module, cut: "CutInputs", weights: dict[str, tuple[Tensor, int]]) -> float:
        """Accuracy over all processes of ``network`` with the layers in ``weights`` given those
        weights (``judge``)."""
        return self.judge(network, cut, weights).accuracy

    def judge(self, network: nn.Module, cut: "CutInputs", weights: dict[str, tuple[Tensor, int]],
              reference: Optional[Tensor] = None, floor: Optional[float] = None,
              batch_size: int = 500) -> "Verdict":
        """``network`` with the layers in ``weights`` (module path -> (V in the layer's problem
        layout (D, K), its group size)) given those weights, judged on ``cut``'s stored tensor:
        ``models.tail.tail`` with the layers ``Narrowed`` to V's nonzero groups.

        ``reference``: which of this process's images another network gets right (bool (n,),
        e.g. the network before this group's cut); the verdict then counts the images lost and
        gained against it, for the standard error of the difference. With a ``floor`` too, the
        pass stops early on a clear failure: after each batch, when even the accuracy
        ``GIVE_UP_SE`` standard errors above the estimate from the images so far is below the
        floor (the estimate: the reference's accuracy on all images minus the paired
        difference from it on the images so far). A search's sparsest candidates lose points, not
        images; at four standard errors a candidate that would pass is stopped with probability
        about 3e-5 per batch."""
        head = network.get_submodule(self.head).eval()
        replace = {relative_name(self.head, layer): Narrowed(network.get_submodule(layer), V, group)
                   for layer, (V, group) in weights.items()}
        device = self.trainer.compute_device
        rest = for_inference(tail(head, cut.cut, replace).eval()).to(device)
        layout = torch.channels_last if cut.inputs.dim() == 4 else torch.contiguous_format  # for_inference's
        n = int(all_reduce_sum(torch.tensor(float(len(cut.labels)), dtype=torch.float64)).item())
        require_samples(n)
        base = None if reference is None else float(all_reduce_sum(reference.sum().to(torch.float64))) / n
        correct = torch.zeros(len(cut.labels), dtype=torch.bool)
        seen = len(cut.labels)
        # one process only: under DDP the shards' batch counts can differ, and every check all-reduces
        early = floor is not None and reference is not None and not _distributed()
        try:
            with torch.no_grad():
                for start in range(0, len(cut.inputs), batch_size):
                    end = start + batch_size
                    logits = rest(cut.inputs[start:end].to(device).contiguous(memory_format=layout))
                    correct[start:end] = logits.argmax(1).cpu() == cut.labels[start:end]
                    if early and end < len(cut.labels):
                        partial = Verdict.count(correct[:end], reference[:end], all_reduce_sum)
                        if base - partial.difference + GIVE_UP_SE * partial.se < floor:
                            seen = end
                            break
        finally:
            head.cpu()
        return Verdict.count(correct[:seen], None if reference is None else reference[:seen], all_reduce_sum,
                             base=base)


GIVE_UP_SE = 4.0  # ``DataPasses.judge``: standard errors of a clear failure


@dataclass
class Verdict:
    """A network judged on ``images`` images (over all processes): its ``accuracy``; against a
    reference network's per-image correctness, the images it ``lost`` (the reference right, it
    wrong) and ``gained``. ``correct``: this process's per-image correctness (bool (n,)).

    ``difference`` = (lost - gained) / images is the accuracy the reference has above it on
    these images, and ``se`` the standard error of that paired difference,
    sqrt(lost + gained - (lost - gained)^2 / images) / images. A verdict on part of the images
    (``DataPasses.judge`` stopped early) estimates the accuracy on all of them as the
    reference's there minus ``difference``."""

    accuracy: float
    images: int
    correct: Tensor = field(repr=False)
    lost: int = 0
    gained: int = 0

    @classmethod
    def count(cls, correct: Tensor, reference: Optional[Tensor], reduce: Any, base: Optional[float] = None) -> "Verdict":
        sums = [correct.sum(), torch.tensor(len(correct))]
        if reference is not None:
            sums += [(reference & ~correct).sum(), (~reference & correct).sum()]
        right, images, *against = (int(v) for v in reduce(torch.stack(sums).to(torch.float64)))
        lost, gained = against or (0, 0)
        verdict = cls(accuracy=right / max(images, 1), images=images, correct=correct, lost=lost, gained=gained)
        if base is not None and reference is not None:
            verdict.accuracy = base - verdict.difference  # on all images, estimated when stopped early
        return verdict

    @property
    def difference(self) -> float:
        return (self.lost - self.gained) / max(self.images, 1)

    @property
    def se(self) -> float:
        d = self.lost - self.gained
        return max(self.lost + self.gained - d * d / max(self.images, 1), 0.0) ** 0.5 / max(self.images, 1)


@dataclass
class CutInputs:
    """The value of node ``cut`` of the traced head ``head`` on one split (this process's shard),
    and the labels: ``inputs`` (n, ...), ``labels`` (n,)."""

    head: str
    cut: str
    inputs: Tensor
    labels: Tensor

    def first(self, count: int) -> "CutInputs":
        """The first ``count`` images only."""
        return CutInputs(self.head, self.cut, self.inputs[:count], self.labels[:count])


def _to_entry(result: PassResult) -> dict[str, Any]:
    stats = None if result.stats is None else {layer: layer_stats.to("cpu").to_stored()
                                               for layer, layer_stats in result.stats.items()}
    return {"loss": result.loss, "accuracy": result.accuracy, "n": result.n, "stats": stats}


def _from_entry(entry: dict[str, Any]) -> PassResult:
    stats = None if entry["stats"] is None else {layer: LassoStats.from_stored(v) for layer, v in entry["stats"].items()}
    return PassResult(loss=entry["loss"], accuracy=entry["accuracy"], n=entry["n"], stats=stats)

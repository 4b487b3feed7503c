"""One pass of a frozen network over a data set: evaluation sums and a layer's statistics.

Run with ``Trainer.predict`` so that under DDP every rank reads its own shard of the data
(Lightning's unrepeated distributed sampler: no sample is counted twice) and the sums are
all-reduced at the end. The same pass gives the loss and accuracy of the network and, when
a layer is named, the sufficient statistics of that layer's compression problem, captured
with a forward hook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grouplasso import LassoStats, StatsAccumulator
from models.pruned import IndexedLinear


@dataclass
class PassResult:
    """Sums over the whole data set (all ranks): mean cross-entropy, accuracy, sample count,
    and the layer's ``LassoStats`` when a layer was named."""

    loss: float
    accuracy: float
    n: int
    stats: Optional[LassoStats] = None


class NetworkPass(pl.LightningModule):
    """Evaluate ``network`` (eval mode, no gradients) and optionally collect the statistics
    G, C, s of its Linear layer ``layer`` (inputs x: (B, K), outputs y: (B, D), bias b)."""

    def __init__(self, network: nn.Module, layer: Optional[str] = None) -> None:
        super().__init__()
        self.network = network
        self.layer = layer
        self.result: Optional[PassResult] = None

    def on_predict_start(self) -> None:
        self.network.eval()
        dev = self.device
        self._sums = {"loss": torch.zeros((), dtype=torch.float64, device=dev),
                      "correct": torch.zeros((), dtype=torch.float64, device=dev),
                      "n": torch.zeros((), dtype=torch.float64, device=dev)}
        self._accumulator: Optional[StatsAccumulator] = None
        self._hook = None
        if self.layer is not None:
            linear = self.network.get_submodule(self.layer)
            self._accumulator = StatsAccumulator(
                linear.in_features, linear.out_features, bias=linear.bias.detach() if linear.bias is not None else None,
                device=dev,
            )
            self._hook = linear.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        # Consumed right here: the next in-place ReLU would overwrite ``output``.
        x = inputs[0]
        if isinstance(module, IndexedLinear):
            x = x.index_select(-1, module.index)
        self._accumulator.update(x.detach(), output.detach())

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        logits = self.network(images)
        self._sums["loss"] += F.cross_entropy(logits.double(), labels, reduction="sum")
        self._sums["correct"] += (logits.argmax(dim=1) == labels).sum()
        self._sums["n"] += len(labels)

    def on_predict_epoch_end(self) -> None:
        reduce = self._reduce_sum
        sums = {k: reduce(v) for k, v in self._sums.items()}
        n = int(sums["n"].item())
        if n == 0:
            raise ValueError("the data set is empty: nothing to evaluate or to compress (check the data config)")
        stats = None
        if self._accumulator is not None:
            self._hook.remove()
            self._accumulator.all_reduce(reduce)
            stats = self._accumulator.finalize()
        self.result = PassResult(loss=float(sums["loss"]) / n, accuracy=float(sums["correct"]) / n, n=n, stats=stats)

    def _reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")


def run_pass(trainer: pl.Trainer, network: nn.Module, loader: Any, layer: Optional[str] = None) -> PassResult:
    """Evaluate ``network`` over ``loader`` (and collect ``layer``'s statistics) with ``trainer``.

    Make ``trainer`` with ``inference_mode=False`` (gradients are still off): statistics
    created under inference mode could not be updated in place later.
    """
    module = NetworkPass(network, layer)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    if module.result is None:  # Lightning skips the epoch hooks when there are no batches
        raise ValueError("the data set is empty: nothing to evaluate or to compress (check the data config)")
    return module.result

"""Passes of a frozen network over a data set, run with ``Trainer.predict``.

- ``NetworkPass``: the loss and accuracy of a network and, when a layer is named, the
  sufficient statistics of that layer's compression problem, captured with a forward hook
  (a Linear layer: one sample per image; a Conv2d: one sample per image and output
  position, its input patches as ``grouplasso.conv`` unfolds them).
- ``BlockInputPass``: the inputs of one submodule (the *head* that holds the layers being
  compressed, such as AlexNet's ``classifier``), written to a ``FeatureWriter``; the head
  itself never runs, so the pass costs the network before it (the convolutions).

Under DDP every rank reads its own shard of the data (Lightning's unrepeated distributed
sampler: no sample is counted twice) and sums are all-reduced at the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grouplasso import LassoStats, StatsAccumulator
from grouplasso.conv import ConvStatsAccumulator
from models.pruned import IndexedLinear


@dataclass
class PassResult:
    """Sums over the whole data set (all ranks): mean cross-entropy, accuracy, sample count
    (images), and, when layers were named, each one's ``LassoStats`` by module path. For a
    Conv2d layer the statistics' own ``n`` counts patches: images times output positions (or
    times the sampled ``positions`` per image)."""

    loss: float
    accuracy: float
    n: int
    stats: Optional[dict[str, LassoStats]] = None


class NetworkPass(pl.LightningModule):
    """Evaluate ``network`` (eval mode, no gradients) and optionally collect the statistics
    G, C, s of its ``layers`` in the same pass: a Linear layer (inputs x: (B, K), outputs y:
    (B, D), bias b) or a Conv2d (patches (B*P, C_in*kh*kw), outputs (B*P, D), bias b, group
    size kh*kw; see ``grouplasso.conv``). The several layers of a coupled group (every
    consumer of one residual stream) are collected together.

    ``positions`` (Conv2d layers; Linear layers ignore it): sample that many output positions
    of each image (without replacement, reproducibly from ``seed``) instead of using all of
    them; the statistics' ``n`` is then images * positions (all positions when the output has
    no more).

    ``targets``: the outputs y of the statistics are taken from this other network instead
    (the original, when ``network`` is a partly compressed copy of it): each named layer's
    output in ``targets`` on the same batch, its units ``output_index[layer]`` where the layer
    has lost some (indices into the reference layer's outputs; absent: all). The inputs x stay
    ``network``'s own, so C = mean (y_ref - b) x^T asks the layer to reproduce the original's
    output from the compressed network's inputs, correcting the error made upstream. Such a
    pass is for the statistics alone: both networks stop at the last named layer (a layer in
    the first half of a ResNet costs half a forward pass), and loss and accuracy are NaN.
    """

    def __init__(self, network: nn.Module, layers: Sequence[str] = (), positions: Optional[int] = None,
                 seed: int = 0, targets: Optional[nn.Module] = None,
                 output_index: Optional[dict[str, Tensor]] = None) -> None:
        super().__init__()
        self.network = network
        self.targets = None if targets is network else targets  # the network itself: its own outputs
        self.output_index = dict(output_index or {})
        self.layers = tuple(layers)
        self.positions, self.seed = positions, seed
        self.result: Optional[PassResult] = None
        self._target: dict[str, Tensor] = {}

    def on_predict_start(self) -> None:
        """Eval mode, zeroed sums, and a statistics hook on every named layer."""
        self.network.eval()
        dev = self.device
        self._sums = {"loss": torch.zeros((), dtype=torch.float64, device=dev),
                      "correct": torch.zeros((), dtype=torch.float64, device=dev),
                      "n": torch.zeros((), dtype=torch.float64, device=dev)}
        self._accumulators: dict[str, StatsAccumulator | ConvStatsAccumulator] = {}
        self._hooks = []
        self._batch = 0
        if self.targets is not None:
            self.targets.eval()
            for layer in self.layers:
                module = self.targets.get_submodule(layer)
                self._hooks.append(module.register_forward_hook(partial(self._keep_target, layer)))
        for index, layer in enumerate(self.layers):
            module = self.network.get_submodule(layer)
            if isinstance(module, nn.Conv2d):  # refuses the convolutions grouplasso.conv cannot unfold
                # one sampler stream per layer: the draws of one do not depend on the others
                self._accumulators[layer] = ConvStatsAccumulator(module, device=dev, positions=self.positions,
                                                                 seed=self.seed + index)
                self._hooks.append(module.register_forward_hook(partial(self._capture_conv, layer)))
            else:  # a Linear layer: one sample per image (per token for (B, T, K) inputs)
                self._accumulators[layer] = StatsAccumulator(
                    module.in_features, module.out_features,
                    bias=module.bias.detach() if module.bias is not None else None, device=dev,
                )
                self._hooks.append(module.register_forward_hook(partial(self._capture, layer)))

    def _check(self, layer: str, x: Tensor, y: Tensor) -> None:
        """Stop at the first batch whose activations at ``layer`` are not finite (a NaN would make
        the whole statistics NaN, and the solve fail later with a less helpful message)."""
        if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
            raise FloatingPointError(f"batch {self._batch} gives non-finite inputs or outputs at {layer!r} (NaN or "
                                     "inf): check the data (its transform and normalisation) and the network's weights")

    def _keep_target(self, layer: str, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        # A copy: a later in-place ReLU of the reference would overwrite ``output``.
        index = self.output_index.get(layer)
        dim = 1 if isinstance(module, nn.Conv2d) else -1
        self._target[layer] = (output if index is None else output.index_select(dim, index.to(output.device))
                               ).detach().clone()
        self._stop_when_all_seen(self._seen_targets, layer)

    def _output(self, layer: str, output: Tensor) -> Tensor:
        """What the statistics take as the layer's output: its own, or the reference's."""
        if self.targets is None:
            return output.detach()
        target = self._target.pop(layer)
        if target.shape != output.shape:
            raise ValueError(f"{layer!r}: the reference network's output {tuple(target.shape)} does not match the "
                             f"compressed one's {tuple(output.shape)}; give the kept output units in output_index")
        return target

    def _stop_when_all_seen(self, seen: set[str], layer: str) -> None:
        """With ``targets``, the rest of a forward pass is not needed once every layer has fired."""
        seen.add(layer)
        if self.targets is not None and len(seen) == len(self.layers):
            raise _Reached

    def _capture(self, layer: str, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        # Consumed right here: the next in-place ReLU would overwrite ``output``.
        self._check(layer, inputs[0], output)
        x = inputs[0]
        if isinstance(module, IndexedLinear):
            x = x.index_select(-1, module.index)
        y = self._output(layer, output)
        self._accumulators[layer].update(x.detach().reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
        self._stop_when_all_seen(self._seen, layer)

    def _capture_conv(self, layer: str, module: nn.Conv2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        # Consumed right here, like ``_capture`` (patches fed in chunks: bounded memory).
        self._check(layer, inputs[0], output)
        self._accumulators[layer].update(inputs[0].detach(), self._output(layer, output))
        self._stop_when_all_seen(self._seen, layer)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> int:
        """Forward one batch (the hooks accumulate the statistics) and add to the sums; returns the
        batch's size (the sums are the result; Lightning keeps nothing with ``return_predictions=False``,
        and a ``None`` would make it warn on every pass)."""
        images, labels = batch
        self._batch = batch_idx
        self._seen, self._seen_targets = set(), set()
        if self.targets is not None:  # statistics only: both forward passes stop at the last named layer
            try:
                self.targets(images)  # its hooks keep the named layers' outputs for the captures below
            except _Reached:
                pass
            try:
                self.network(images)
            except _Reached:
                pass
            self._sums["n"] += len(labels)
            return len(labels)
        logits = self.network(images)
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError(f"batch {batch_idx} gives non-finite outputs (NaN or inf): check the data (its "
                                     "transform and normalisation) and the network's weights")
        self._sums["loss"] += F.cross_entropy(logits.double(), labels, reduction="sum")
        self._sums["correct"] += (logits.argmax(dim=1) == labels).sum()
        self._sums["n"] += len(labels)
        return len(labels)

    def on_predict_epoch_end(self) -> None:
        """All-reduce the sums over the processes and finish the result."""
        reduce = self._reduce_sum
        sums = {k: reduce(v) for k, v in self._sums.items()}
        n = require_samples(int(sums["n"].item()))
        for hook in self._hooks:
            hook.remove()
        stats = None
        if self._accumulators:
            stats = {}
            for layer, accumulator in self._accumulators.items():
                accumulator.all_reduce(reduce)
                stats[layer] = accumulator.finalize()
        loss, accuracy = (math.nan, math.nan) if self.targets is not None else (float(sums["loss"]) / n,
                                                                               float(sums["correct"]) / n)
        self.result = PassResult(loss=loss, accuracy=accuracy, n=n, stats=stats)

    def _reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")


def run_pass(trainer: pl.Trainer, network: nn.Module, loader: Any, layers: Sequence[str] = (),
             positions: Optional[int] = None, seed: int = 0, targets: Optional[nn.Module] = None,
             output_index: Optional[dict[str, Tensor]] = None) -> PassResult:
    """Evaluate ``network`` over ``loader`` (and collect the statistics of ``layers``) with
    ``trainer``; ``positions``, ``seed``: a Conv2d layer's position sampling; ``targets``,
    ``output_index``: the statistics' outputs from that reference network (see ``NetworkPass``).

    Make ``trainer`` with ``inference_mode=False`` (gradients are still off): statistics
    created under inference mode could not be updated in place later.
    """
    module = NetworkPass(network, layers, positions=positions, seed=seed, targets=targets, output_index=output_index)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    if module.result is None:  # Lightning skips the epoch hooks when there are no batches
        require_samples(0)
    return module.result


def require_samples(n: int) -> int:
    """``n`` if positive; otherwise the one error for an empty data set."""
    if n <= 0:
        raise ValueError("the data set is empty: nothing to evaluate or to compress (check the data config)")
    return n


class _Reached(Exception):
    """Raised by a hook once a statistics-only pass has seen every layer it needs."""


class _HeadReached(Exception):
    """Raised by the pre-hook on the head: the batch's head inputs are recorded, stop there."""


class BlockInputPass(pl.LightningModule):
    """Record the inputs of ``network``'s submodule ``head`` (``""``: the network's own input)
    and the labels into ``writer`` (``compression.features.FeatureWriter``), without running
    the head. The first batch also checks that the network's output is the head's output
    (otherwise the recorded inputs could not stand for the network)."""

    def __init__(self, network: nn.Module, head: str, writer: Any) -> None:
        super().__init__()
        self.network, self.head, self.writer = network, head, writer
        self._checked = False

    def on_predict_start(self) -> None:
        """Eval mode and the pre-hook that records the head's inputs."""
        self.network.eval()
        self._hook = self.network.get_submodule(self.head).register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._inputs = inputs[0].detach()
        if self._checked:
            raise _HeadReached

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> int:
        """Run the network up to the head and write the head's inputs with the labels; returns the
        batch's size (see ``NetworkPass.predict_step``)."""
        images, labels = batch
        if not self._checked:  # one full forward: is the head's output the network's output?
            logits = self.network(images)
            if not torch.allclose(self.network.get_submodule(self.head)(self._inputs), logits, rtol=1e-4, atol=1e-5):
                raise ValueError(f"the network's output is not the output of {self.head!r}: its layers cannot be "
                                 "evaluated from its inputs alone")
            self._checked = True
        else:
            try:
                self.network(images)
            except _HeadReached:
                pass
        self.writer.write(self._inputs, labels)
        return len(labels)

    def on_predict_epoch_end(self) -> None:
        """Remove the hook."""
        self._hook.remove()

"""Typed settings of a compression run, as ``compress.py``'s config spells them.

``TrainerSettings`` is the one place where the pipeline's Trainers are made: the passes
over the data (sharded under DDP), the solves (one device per process) and fine-tuning
all inherit the config's ``trainer`` section from here. ``Target`` says what the user
wants instead of a lambda.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Optional, Union

import pytorch_lightning as pl
import torch


@dataclass
class TrainerSettings:
    """The config's ``trainer`` keys that every Trainer of the pipeline inherits."""

    accelerator: str = "auto"
    devices: Union[int, str, list[int]] = 1
    strategy: Any = "auto"
    num_nodes: int = 1
    enable_progress_bar: bool = True
    max_steps: int = 10_000  # the budget of one solve

    @classmethod
    def from_config(cls, trainer: Any) -> "TrainerSettings":
        """From LightningCLI's parsed ``trainer`` namespace (any mapping with these keys)."""
        return cls(**{f.name: trainer[f.name] for f in fields(cls) if trainer.get(f.name) is not None})

    def distributed(self) -> dict[str, Any]:
        """The Trainer arguments that place work on the config's devices (all but ``max_steps``)."""
        return {k: v for k, v in asdict(self).items() if k != "max_steps"}

    def data_parallel(self, **overrides: Any) -> pl.Trainer:
        """A Trainer for a pass over data, sharded over the config's devices (DDP)."""
        return pl.Trainer(**{**self.distributed(), "logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                             "inference_mode": False, **overrides})

    def single_device(self, **overrides: Any) -> pl.Trainer:
        """A Trainer on this process's own device (under DDP on GPUs, process i uses GPU i):
        solves are small, and every process solves the same all-reduced problem. No progress
        bar: a compression makes dozens of solves, each reported in one line when it ends."""
        on_gpu = self.accelerator != "cpu" and torch.cuda.is_available()
        devices = [int(os.environ.get("LOCAL_RANK", 0))] if on_gpu else 1
        return pl.Trainer(**{"accelerator": self.accelerator, "devices": devices, "max_steps": self.max_steps,
                             "max_epochs": -1, "enable_model_summary": False, "enable_progress_bar": False,
                             **overrides})

    @property
    def compute_device(self) -> torch.device:
        """Where in-memory work (candidate evaluations) runs on this process."""
        if self.accelerator != "cpu" and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")


@dataclass
class Target:
    """What the user wants instead of a lambda (set at most one of ``max_accuracy_drop`` and
    ``width``).

    Args:
        max_accuracy_drop: percentage points of validation accuracy the whole run may lose.
        width: the exact number of surviving neurons per layer (one value for all layers, or
            one per layer).
        share: how an accuracy budget is shared between several layers: ``macs`` (default) by
            what each layer's certified candidates buy, multiply-adds saved per validation image
            lost, chosen together by a knapsack and re-validated on the whole network
            (``compression.allocation``); ``cumulative``: layer i of n, compressed in order on the
            network compressed so far, may bring the loss to i/n of the budget;
            ``cumulative_macs``: the same, with each group's part in proportion to the
            multiply-adds of the modules that lose its channels
            (``compression.pipeline.cumulative_shares``).
        candidate_images: with ``share: macs``, judge each layer's candidates on the first this
            many validation images only (None: all); the chosen set is re-validated on all.
        margin_se: an accuracy floor is met by a candidate only when its validation accuracy
            clears it by this many standard errors of its difference from the network before the
            cut (paired over the same images; 0: no margin). The search keeps the narrowest
            candidate that passes, so with many layers judged on the same images its luck adds
            up; 1 accepts a cut only when its loss is below the allowance by more than its own
            measurement noise (``compression.search.LambdaSearch.at_accuracy``). For floors per
            group: ``share: cumulative`` or ``cumulative_macs``, or one layer.
        refit_to: when layers are compressed one after the other (``share: cumulative``, a
            width, lambdas), what a later layer's refit reproduces: ``current``, its outputs in
            the network compressed so far; ``original``, the original network's outputs, from
            the compressed network's inputs, so that each refit also corrects the error made
            upstream (``compression.reference``; one more forward pass of the original per
            statistics pass). A residual stream's consumers, refit together, reproduce the
            current network's outputs either way (``ReferenceOutputs.aims_at``).
        held_out: the fraction of the validation images (the last ones) that no group's choice
            sees (0: none). After the last group the whole network is judged on them against the
            original, and while it loses more than ``max_accuracy_drop`` there, the last cut still
            standing is given back (``CompressionPipeline.check_held_out``): each group takes the
            narrowest candidate that clears its floor on the same choosing images, and the luck
            of many such choices can add up where a fresh sample shows it. For layer-by-layer
            shares (``cumulative``, ``cumulative_macs``) on one process.
    """

    max_accuracy_drop: Optional[float] = None
    width: Optional[list[int]] = None
    share: Literal["macs", "cumulative", "cumulative_macs"] = "macs"
    candidate_images: Optional[int] = None
    margin_se: float = 0.0
    refit_to: Literal["current", "original"] = "current"
    held_out: float = 0.0

    @property
    def is_set(self) -> bool:
        return self.max_accuracy_drop is not None or self.width is not None

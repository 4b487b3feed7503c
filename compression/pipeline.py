"""Layer-by-layer compression of a trained network, from statistics to a smaller network.

For every requested layer, in order, on the network compressed so far:
1. statistics of the layer over the training split (eval transforms), cached on disk;
2. optionally a regularisation path (warm-started, largest lambda first), each point
   certified by its duality gap and evaluated on the test set;
3. the multi-task lasso at the chosen lambda (``LassoCompression`` with a fresh Trainer
   per solve, stopped by ``Convergence``, checkpointed so that an interrupted run resumes);
4. optional debiasing, then surgery: the neurons feeding zero columns are deleted.
The result is an ordinary, smaller nn.Module, saved with ``models.checkpoints.save_network``,
and a before/after report.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LambdaCallback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from callbacks.convergence import Convergence
from compression.cache import describe, load_pass, save_pass
from grouplasso import LassoStats, debias, lambda_max, mse, objective
from lightning_modules.compression import LassoCompression
from lightning_modules.network_pass import PassResult, run_pass
from models.checkpoints import save_network
from models.layers import analyse_layer, resolve_layer_name
from models.profile import count_macs, count_parameters, latency_ms, linear_widths
from models.surgery import kept_columns, remove_neurons, with_weight

# Trainer settings of the config that every Trainer the pipeline makes inherits.
TRAINER_KEYS = ("accelerator", "devices", "strategy", "num_nodes", "enable_progress_bar")


def check_lambda(stats: LassoStats, lam: float, layer: str) -> None:
    """Refuse a lambda at which every neuron goes: V = 0 is optimal from lambda_max up."""
    top = lambda_max(stats)
    if lam >= top:
        raise ValueError(
            f"lambda={lam:g} removes every neuron feeding {layer!r}: for this layer V = 0 is optimal from "
            f"lambda_max={top:.4g} up. Choose lambda below it (0.1 * lambda_max = {0.1 * top:.3g} is a usual start), "
            "or pass --path with several values to see width against accuracy"
        )


@dataclass
class Solution:
    """A solved layer problem: V (D, K) and how it was obtained."""

    V: Tensor
    lam: float
    rel_gap: float
    steps: int
    seconds: float
    reason: str

    def summary(self, stats: LassoStats) -> dict[str, Any]:
        return {
            "lambda": self.lam, "active": int(len(kept_columns(self.V))), "mse": float(mse(stats, self.V)),
            "objective": float(objective(stats, self.V, self.lam)), "rel_gap": self.rel_gap,
            "steps": self.steps, "seconds": round(self.seconds, 3), "stop": self.reason,
        }


@dataclass
class CompressionPipeline:
    """Compress ``network`` (in eval mode) layer by layer; see the module doc.

    ``trainer`` holds Trainer settings (``TRAINER_KEYS`` and ``max_steps``); ``module`` the
    ``LassoCompression`` arguments; ``convergence`` the ``Convergence`` arguments.
    """

    network: nn.Module
    arch: str
    num_classes: int
    datamodule: pl.LightningDataModule
    run_dir: Path
    module: dict[str, Any] = field(default_factory=dict)
    convergence: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    cache_dir: Optional[Path] = Path(".cache/passes")
    checkpoint_every: int = 200
    debias: bool = False
    logger: Optional[TensorBoardLogger] = None

    @property
    def is_global_zero(self) -> bool:
        """Whether this process writes files (always, except in DDP's other processes)."""
        return rank_zero_only.rank == 0

    # --- passes over the data ----------------------------------------------------------
    def _pass_trainer(self) -> pl.Trainer:
        settings = {k: self.trainer[k] for k in TRAINER_KEYS if k in self.trainer}
        return pl.Trainer(**settings, logger=False, enable_checkpointing=False, enable_model_summary=False,
                          inference_mode=False)

    def network_pass(self, network: nn.Module, split: str, layer: Optional[str] = None) -> tuple[PassResult, float]:
        """Loss, accuracy (and ``layer``'s statistics) of ``network`` on ``split``, from the cache when
        possible; returns the result and the seconds spent (0 for a cache hit)."""
        description = describe(network, layer, self.datamodule, split) if self.cache_dir else None
        if description is not None and (hit := load_pass(self.cache_dir, description)) is not None:
            return hit, 0.0
        loader = self.datamodule.train_eval_dataloader() if split == "train" else self.datamodule.test_dataloader()
        start = time.perf_counter()
        result = run_pass(self._pass_trainer(), network, loader, layer)
        seconds = time.perf_counter() - start
        network.cpu()
        if description is not None and self.is_global_zero:
            save_pass(self.cache_dir, description, result)
        return result, seconds

    def profile(self, network: nn.Module, train: PassResult, test: PassResult) -> dict[str, Any]:
        shape = tuple(self.datamodule.test_set[0][0].shape)
        return {
            "train_loss": train.loss, "train_accuracy": train.accuracy, "test_accuracy": test.accuracy,
            "parameters": count_parameters(network), "macs": count_macs(network, shape),
            "latency_ms": latency_ms(network, shape, batch_size=1), "widths": linear_widths(network),
        }

    # --- solving ----------------------------------------------------------------------
    def solve(self, stats: LassoStats, lam: float, W: Tensor, layer: str, tag: str, V0: Optional[Tensor] = None) -> Solution:
        """One multi-task lasso solve with a fresh Trainer; resumes from ``<run_dir>/solve/<tag>``
        when an earlier, interrupted run left a checkpoint there, and returns a finished one's result."""
        fit_dir = self.run_dir / "solve" / tag
        done = fit_dir / "solution.pt"
        if done.is_file():
            saved = torch.load(done, map_location="cpu", weights_only=True)
            return Solution(**saved)
        module = LassoCompression(**self.module).attach(stats, lam, W, layer, start=V0)
        convergence = Convergence(**self.convergence)
        # The solve is small and runs on one device. Under DDP every process solves the same
        # (all-reduced) problem identically, so all hold the same V; only rank 0 writes.
        callbacks: list[pl.Callback] = [convergence]
        if self.is_global_zero:
            callbacks += [ModelCheckpoint(dirpath=fit_dir / "checkpoints", save_last=True, save_top_k=0,
                                          every_n_train_steps=self.checkpoint_every), self._resume_hint(tag)]
        trainer = pl.Trainer(
            accelerator=self.trainer.get("accelerator", "auto"), devices=self._solve_devices(),
            max_steps=self.trainer.get("max_steps", 10_000), max_epochs=-1,
            logger=TensorBoardLogger(self.run_dir, name="solve", version=tag, default_hp_metric=False)
            if self.is_global_zero else False,
            callbacks=callbacks, enable_checkpointing=self.is_global_zero, enable_model_summary=False,
            enable_progress_bar=self.trainer.get("enable_progress_bar", True) and self.is_global_zero,
            log_every_n_steps=1,  # the module decides how often to log (its log_every)
        )
        last = fit_dir / "checkpoints" / "last.ckpt"
        trainer.fit(module, ckpt_path=str(last) if last.is_file() else None)
        solution = Solution(V=module.solver.V.detach().cpu().clone(), lam=lam, rel_gap=convergence.rel_gap,
                            steps=convergence.steps, seconds=convergence.seconds, reason=convergence.reason)
        if self.is_global_zero:
            done.parent.mkdir(parents=True, exist_ok=True)
            torch.save(vars(solution), done)
        return solution

    def _solve_devices(self) -> Any:
        """This process's own device: under DDP on GPUs, process i solves on GPU i."""
        if self.trainer.get("accelerator", "auto") == "cpu" or not torch.cuda.is_available():
            return 1
        return [int(os.environ.get("LOCAL_RANK", 0))]

    def _resume_hint(self, tag: str) -> LambdaCallback:
        """On Ctrl-C or a crash mid-solve, say how to continue from the last solver checkpoint."""
        def hint(trainer: pl.Trainer, module: pl.LightningModule, error: BaseException) -> None:
            rank_zero_warn(f"solving {tag} stopped at step {trainer.global_step} ({type(error).__name__}); "
                           f"continue from its last checkpoint with: python compress.py ... --resume {self.run_dir}")
        return LambdaCallback(on_exception=hint)

    def regularisation_path(self, network: nn.Module, stats: LassoStats, path_lambdas: list[float], layer: str,
                            module_path: str) -> tuple[list[dict[str, Any]], dict[float, Solution]]:
        """Solve for every lambda, largest first, each warm-started from the previous solution;
        evaluate each zeroed network on the test set."""
        W = network.get_submodule(module_path).weight.detach()
        rows, solutions, V0 = [], {}, None
        for lam in sorted(path_lambdas, reverse=True):
            solution = self.solve(stats, lam, W, layer, tag=f"{layer}-path-lam{lam:g}", V0=V0)
            V0 = solution.V
            test, _ = self.network_pass(with_weight(network, module_path, solution.V), "test")
            rows.append({**solution.summary(stats), "test_accuracy": test.accuracy})
            solutions[lam] = solution
        return rows, solutions

    # --- the whole job -----------------------------------------------------------------
    def run(self, layers: list[str], lambdas: list[float], path: Optional[list[float]] = None) -> dict[str, Any]:
        """Compress ``layers`` in order with ``lambdas`` (one per layer, or one for all); returns the report."""
        if not layers:
            raise ValueError("no layers to compress: set layers, e.g. [pen, last]")
        for layer in layers:  # an unknown name first: its error lists the valid ones
            resolve_layer_name(self.network, layer, self.arch)
        if len(lambdas) not in (1, len(layers)):
            raise ValueError(f"give one lambda for all layers or one per layer ({len(layers)}), got {len(lambdas)}")
        for lam in list(lambdas) + list(path or []):
            if not (isinstance(lam, (int, float)) and lam > 0 and math.isfinite(lam)):
                raise ValueError(f"lambda must be a positive number, got {lam}; larger lambda removes more neurons")
        lambdas = list(lambdas) * len(layers) if len(lambdas) == 1 else list(lambdas)

        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        network = self.network.eval()
        first = resolve_layer_name(network, layers[0], self.arch)
        train, stats_seconds = self.network_pass(network, "train", first)
        test, _ = self.network_pass(network, "test")
        report: dict[str, Any] = {"before": self.profile(network, train, test), "layers": [], "paths": {}}

        for i, (layer, lam) in enumerate(zip(layers, lambdas)):
            module_path = resolve_layer_name(network, layer, self.arch)
            info = analyse_layer(network, module_path)
            if i > 0:  # statistics of the network compressed so far
                train, stats_seconds = self.network_pass(network, "train", module_path)
            stats = train.stats
            check_lambda(stats, lam, layer)
            W = network.get_submodule(module_path).weight.detach()
            solutions: dict[float, Solution] = {}
            if path:
                rows, solutions = self.regularisation_path(network, stats, path, layer, module_path)
                report["paths"][layer] = rows
            solution = solutions.get(lam) or self.solve(stats, lam, W, layer, tag=f"{layer}-lam{lam:g}")
            V = debias(stats, solution.V) if self.debias else solution.V
            entry = {"layer": layer, "module": module_path, "lambda_max": lambda_max(stats), "width_before": stats.K,
                     "width_after": int(len(kept_columns(V))), "stats_seconds": round(stats_seconds, 2),
                     "samples": stats.n, "debiased": self.debias, **solution.summary(stats)}
            if self.debias:
                entry["mse_debiased"] = float(mse(stats, V))
            report["layers"].append(entry)
            network = remove_neurons(network, info, V).eval()

        train, _ = self.network_pass(network, "train")
        test, _ = self.network_pass(network, "test")
        report["after"] = self.profile(network, train, test)
        self.compressed = network
        if self.is_global_zero:
            report["network"] = str(save_network(network, self.run_dir / "compressed.pt", self.arch, self.num_classes,
                                                 layers=report["layers"]))
        return report

"""Layer-by-layer compression of a trained network, from statistics to a smaller network.

``CompressionPipeline.run`` has three parts:
1. ``plan``: every input checked once, before any pass over the data (layer names,
   lambdas, ratios, targets), so that a mistake costs nothing;
2. ``compress_layer`` for every requested layer, in order, on the network compressed so
   far: the layer's statistics over the training split (through the head-input cache of
   ``compression.passes``), the lambda (given, a ratio of lambda_max, or searched for a
   target by ``compression.search``), an optional regularisation path, the certified
   solve (``LassoCompression`` with a fresh Trainer per solve, stopped by
   ``Convergence``, checkpointed so that an interrupted run resumes), optional debiasing,
   then surgery: the neurons feeding zero columns are deleted;
3. ``finish``: the smaller network saved (``models.checkpoints.save_network``), optional
   recovery fine-tuning (``compression.finetune``), and the before/after report.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LambdaCallback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from callbacks.convergence import Convergence
from compression.baselines import IMPORTANCES, equal_width_weights, torch_pruning_available, torch_pruning_network
from compression.finetune import FinetuneSettings, finetune
from compression.layer_problem import LayerProblem
from compression.passes import DataPasses, head_of, tail_accuracy
from compression.search import Candidate, LambdaSearch
from compression.settings import Target, TrainerSettings
from grouplasso import LassoStats, active_columns, active_groups, check_lambda, debias, lambda_max, mse, objective
from lightning_modules.lasso import LassoCompression
from models.checkpoints import save_network
from models.layers import LayerInfo, analyse_layer, layer_width, resolve_layer_name
from models.profile import count_macs, count_parameters, latency_ms, layer_widths
from models.surgery import remove_neurons


@dataclass
class Solution:
    """A solved layer problem: V (D, K) and how it was obtained."""

    V: Tensor
    lam: float
    rel_gap: float
    steps: int
    seconds: float
    reason: str

    def save(self, path: Path) -> None:
        """Write the solution; V by its nonzero columns (a dense pen-layer V is 134 MB)."""
        keep = active_columns(self.V)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**vars(self), "V": self.V[:, keep].clone(), "columns": keep, "K": self.V.shape[1]}, path)

    @classmethod
    def load(cls, path: Path) -> "Solution":
        saved = torch.load(path, map_location="cpu", weights_only=True)
        V = torch.zeros(saved["V"].shape[0], saved.pop("K"), dtype=saved["V"].dtype)
        V[:, saved.pop("columns")] = saved["V"]
        return cls(**{**saved, "V": V})

    def summary(self, stats: LassoStats) -> dict[str, Any]:
        return {
            "lambda": self.lam, "active": len(active_groups(self.V, stats.group)), "mse": mse(stats, self.V),
            "objective": objective(stats, self.V, self.lam), "rel_gap": self.rel_gap,
            "steps": self.steps, "seconds": round(self.seconds, 3), "stop": self.reason,
        }


@dataclass(frozen=True)
class LayerPlan:
    """What to do with one layer: ``how`` is ``lambda``, ``ratio``, ``width`` or ``accuracy``;
    ``value`` the lambda, the ratio of lambda_max, the width, or the accuracy floor (a fraction)."""

    layer: str
    module: str
    how: str
    value: float


def check_ratio(ratio: float, what: str = "lambda ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"{what} must be in (0, 1), a fraction of each layer's lambda_max; got {ratio!r}")
    return float(ratio)


def _per_layer(values: list, layers: list[str], what: str) -> list:
    if len(values) not in (1, len(layers)):
        raise ValueError(f"give one {what} for all layers or one per layer ({len(layers)}), got {len(values)}")
    return list(values) * len(layers) if len(values) == 1 else list(values)


@dataclass
class CompressionPipeline:
    """Compress ``network`` (in eval mode) layer by layer; see the module doc.

    ``make_module(**overrides)`` builds a ``LassoCompression`` with the config's solver
    settings, ``make_convergence()`` the stopping rule, ``trainer`` makes every Trainer.
    """

    network: nn.Module
    arch: str
    num_classes: int
    datamodule: pl.LightningDataModule
    run_dir: Path
    make_module: Callable[..., LassoCompression] = LassoCompression
    make_convergence: Callable[[], Convergence] = Convergence
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    cache_dir: Optional[Path] = Path(".cache/passes")
    checkpoint_every: int = 200
    debias: bool = False
    logger: Optional[TensorBoardLogger] = None
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    train_hparams: dict[str, Any] = field(default_factory=dict)
    baselines: bool = False
    conv_sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def is_global_zero(self) -> bool:
        """Whether this process writes files (always, except in DDP's other processes)."""
        return rank_zero_only.rank == 0

    @property
    def solver(self) -> str:
        return self.make_module().hparams.solver

    # --- 1. inputs, checked once ------------------------------------------------------------
    def plan(self, layers: list[str], lambdas: Optional[list[float]] = None,
             lambda_ratios: Optional[list[float]] = None, target: Optional[Target] = None) -> list[LayerPlan]:
        """One ``LayerPlan`` per layer; raises ``ValueError`` naming the problem and the fix."""
        if not layers:
            raise ValueError("no layers to compress: set layers, e.g. [pen, last]")
        modules = [resolve_layer_name(self.network, layer, self.arch) for layer in layers]  # errors list valid names
        # refuses layers whose inputs are not removable neurons, with the reason
        infos = [analyse_layer(self.network, module) for module in modules]
        target = target or Target()
        chosen = [name for name, given in (("lambdas", lambdas), ("lambda_ratios", lambda_ratios),
                                           ("target.width", target.width),
                                           ("target.max_accuracy_drop", target.max_accuracy_drop)) if given is not None]
        if len(chosen) != 1:
            raise ValueError("say how much to compress with exactly one of --target.max_accuracy_drop (points of "
                             "validation accuracy), --target.width, --lambda_ratios (fractions of lambda_max) or "
                             f"--lambdas; got {', '.join(chosen) or 'none'}")
        if lambdas is not None:
            values, how = [check_lambda(v) for v in _per_layer(lambdas, layers, "lambda")], "lambda"
        elif lambda_ratios is not None:
            values, how = [check_ratio(v) for v in _per_layer(lambda_ratios, layers, "lambda ratio")], "ratio"
        elif target.width is not None:
            values, how = _per_layer(target.width, layers, "width"), "width"
            for layer, info, k in zip(layers, infos, values):
                K = layer_width(self.network, info)
                unit = "input neurons" if info.group == 1 else "input channels"
                if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K:
                    raise ValueError(f"target width {k!r} for {layer!r} is not possible: it has {K} {unit}; "
                                     f"choose 1 to {K}")
        else:
            budget = target.max_accuracy_drop
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < 100:
                raise ValueError(f"target.max_accuracy_drop is in percentage points of validation accuracy, from 0 "
                                 f"(no loss allowed) to below 100; got {budget!r}")
            # Shared out in equal parts, cumulatively: after layer i of n the network may have lost
            # i/n of the budget, so what one layer leaves unused passes to the next.
            values, how = [budget * (i + 1) / len(layers) for i in range(len(layers))], "accuracy"
        if how in ("width", "accuracy") and self.solver == "paper_adam":
            raise ValueError("targets need a certified solver (model.solver: auto); paper_adam reproduces the paper's "
                             "absolute lambdas: give them with --lambdas")
        return [LayerPlan(layer, module, how, float(v)) for layer, module, v in zip(layers, modules, values)]

    # --- solving ----------------------------------------------------------------------------
    def solve(self, stats: LassoStats, lam: float, W: Tensor, layer: str, tag: str, V0: Optional[Tensor] = None,
              **module_overrides: Any) -> Solution:
        """One multi-task lasso solve with a fresh Trainer; resumes from ``<run_dir>/solve/<tag>``
        when an earlier, interrupted run left a checkpoint there, and returns a finished one's result."""
        fit_dir = self.run_dir / "solve" / tag
        done = fit_dir / "solution.pt"
        if done.is_file():
            return Solution.load(done)
        module = self.make_module(**module_overrides).attach(stats, lam, W, layer, start=V0)
        convergence = self.make_convergence()
        # Under DDP every process solves the same (all-reduced) problem identically, so all
        # hold the same V; only rank 0 writes.
        callbacks: list[pl.Callback] = [convergence]
        if self.is_global_zero:
            callbacks += [ModelCheckpoint(dirpath=fit_dir / "checkpoints", save_last=True, save_top_k=0,
                                          every_n_train_steps=self.checkpoint_every, save_on_train_epoch_end=False),
                          self._resume_hint(tag)]
        trainer = self.trainer.single_device(
            self.is_global_zero, callbacks=callbacks, enable_checkpointing=self.is_global_zero,
            logger=TensorBoardLogger(self.run_dir, name="solve", version=tag, default_hp_metric=False)
            if self.is_global_zero else False,
            log_every_n_steps=1,  # the module decides how often to log (its log_every)
        )
        last = fit_dir / "checkpoints" / "last.ckpt"
        trainer.fit(module, ckpt_path=str(last) if last.is_file() else None)
        solution = Solution(V=module.solver.V.detach().cpu().clone(), lam=lam, rel_gap=convergence.rel_gap,
                            steps=convergence.steps, seconds=convergence.seconds, reason=convergence.reason)
        if self.is_global_zero:
            solution.save(done)
            shutil.rmtree(fit_dir / "checkpoints", ignore_errors=True)  # only an unfinished solve needs them
        return solution

    def _resume_hint(self, tag: str) -> LambdaCallback:
        """On Ctrl-C or a crash mid-solve, say how to continue from the last solver checkpoint."""
        def hint(trainer: pl.Trainer, module: pl.LightningModule, error: BaseException) -> None:
            rank_zero_warn(f"solving {tag} stopped at step {trainer.global_step} ({type(error).__name__}); "
                           f"continue from its last checkpoint with: python compress.py ... --resume {self.run_dir}")
        return LambdaCallback(on_exception=hint)

    def _check_below_lambda_max(self, lam: float, top: float, layer: str) -> None:
        """V = 0 is optimal from lambda_max up: refuse, except for the paper's procedure,
        which is not this problem's solver and runs as published (with a warning)."""
        if lam < top:
            return
        if self.solver == "paper_adam":
            rank_zero_warn(f"lambda={lam:g} is above lambda_max={top:.4g} of {layer!r}: the exact optimum of the "
                           "problem at this lambda removes every neuron (V = 0). The paper's Adam procedure runs "
                           "as published anyway; the report adds the certified optimum of the same width")
            return
        raise ValueError(
            f"lambda={lam:g} removes every neuron feeding {layer!r}: for this layer V = 0 is optimal from "
            f"lambda_max={top:.4g} up. Choose lambda below it, or give fractions of it with --lambda_ratios "
            "(0.1 is a usual start), or a target (--target.width, --target.max_accuracy_drop)"
        )

    def regularisation_path(self, network: nn.Module, problem: LayerProblem, lambdas: list[float], plan: LayerPlan,
                            test: tuple[Tensor, Tensor]) -> list[dict[str, Any]]:
        """Solve for every lambda, largest first, each warm-started from the previous solution;
        evaluate each on the test set from the layer's stored ``test`` inputs and labels; each
        row keeps its solution under ``V`` for the baselines at the same width."""
        inputs, labels = test
        stats, top, rows, V0 = problem.stats, lambda_max(problem.stats), [], None
        for lam in sorted(lambdas, reverse=True):
            solution = self.solve(stats, lam, problem.W, plan.layer, tag=f"{plan.layer}-lam{lam:.9g}", V0=V0)
            V0 = solution.V
            accuracy = tail_accuracy(network, plan.module, inputs, labels, problem.weight(self._final(stats, solution.V)),
                                     problem.layer_group)
            rows.append({**solution.summary(stats), "ratio": lam / top, "test_accuracy": accuracy, "V": solution.V})
        return rows

    def _final(self, stats: LassoStats, V: Tensor) -> Tensor:
        """What surgery uses of a solution: V, or its least-squares refit with ``debias``."""
        return debias(stats, V) if self.debias else V

    # --- 2. one layer ------------------------------------------------------------------------
    def layer_problem(self, network: nn.Module, module: str, passes: DataPasses) -> tuple[LayerInfo, LayerProblem, float]:
        """The layer's analysis, its problem on the training split's statistics (grouped by the
        layer's input neurons or channels, folded where inputs repeat), and the seconds the
        statistics took (0 from the cache)."""
        info = analyse_layer(network, module)
        train, seconds = passes.evaluate(network, "train", module)
        weight = network.get_submodule(module).weight.detach()
        problem = LayerProblem.of(replace(train.stats, group=info.group), weight.reshape(weight.shape[0], -1))
        return info, problem, seconds

    def compress_layer(self, network: nn.Module, plan: LayerPlan, passes: DataPasses, reference: dict[str, Any],
                       path: Optional[list[float]], path_ratios: Optional[list[float]]) -> tuple[nn.Module, dict]:
        """Statistics, lambda, solve, surgery for one layer; returns the smaller network and the report entry."""
        info, problem, stats_seconds = self.layer_problem(network, plan.module, passes)
        stats = problem.stats
        top = lambda_max(stats)
        entry: dict[str, Any] = {"layer": plan.layer, "module": plan.module, "kind": info.kind,
                                 **problem.describe(), "lambda_max": top, "width_before": problem.groups,
                                 "stats_seconds": round(stats_seconds, 2), "samples": stats.n, "chosen_by": plan.how,
                                 "debiased": self.debias}
        if info.kind == "conv" and passes.conv_sampling:
            entry["conv_sampling"] = dict(passes.conv_sampling)
        rows = None
        test = passes.layer_inputs(network, "test", plan.module) if path or path_ratios or self.baselines else None
        if path or path_ratios:
            lambdas = path or [check_ratio(r, "path ratio") * top for r in path_ratios]
            rows = self.regularisation_path(network, problem, lambdas, plan, test)
        solution: Optional[Solution] = None
        if plan.how in ("lambda", "ratio"):
            lam = plan.value if plan.how == "lambda" else plan.value * top
            self._check_below_lambda_max(lam, top, plan.layer)
            solution = self.solve(stats, lam, problem.W, plan.layer, tag=f"{plan.layer}-lam{lam:.9g}")
            V = solution.V
        else:
            found = self._search(network, problem, plan, passes, reference, entry)
            V = problem.W.to(torch.float64) if found is None else found.V
            if found is not None:
                solution = Solution(V=found.V, lam=found.lam, rel_gap=found.rel_gap, steps=0, seconds=found.seconds,
                                    reason=f"searched: {found.resolved} ({len(entry['candidates'])} candidates)")
        if solution is not None:
            entry.update(solution.summary(stats))
            entry["ratio"] = solution.lam / top
        else:  # the budget is missed even at full width: the layer stays as it is
            entry.update({"lambda": 0.0, "ratio": 0.0, "active": problem.groups, "mse": mse(stats, V),
                          "objective": mse(stats, V), "rel_gap": 0.0, "steps": 0, "seconds": 0.0,
                          "stop": "kept at full width: no candidate met the accuracy budget"})
        if rows is not None:
            entry["path"] = rows
        if self.solver == "paper_adam" and solution is not None:
            entry["certified_same_width"] = self._certified_at_width(problem, plan, entry["active"])
        if self.baselines and solution is not None:
            widths = sorted({r["active"] for r in rows or []} | {entry["active"]}, reverse=True)
            entry["baselines"] = self.compare_baselines(network, info, problem, plan, passes, test, widths,
                                                        {entry["active"]: V, **{r["active"]: r.pop("V") for r in rows or []}})
        for r in rows or []:
            r.pop("V", None)
        V = self._final(stats, V) if solution is not None else V
        # the neurons (or channels) kept, numbered as before this layer
        entry["kept_indices"] = active_groups(V, problem.group).tolist()
        entry["width_after"] = len(entry["kept_indices"])
        if self.debias:
            entry["mse_debiased"] = mse(stats, V)
        return remove_neurons(network, info, problem.weight(V)).eval(), entry

    def compare_baselines(self, network: nn.Module, info: LayerInfo, problem: LayerProblem, plan: LayerPlan,
                          passes: DataPasses, test: tuple[Tensor, Tensor], widths: list[int],
                          lasso: dict[int, Tensor]) -> list[dict[str, Any]]:
        """Every baseline of ``compression.baselines`` at each width (with the lasso solution of
        that width): test accuracy (from the layer's stored ``test`` inputs and labels, or for
        Torch-Pruning's networks a pass over the test split) and the layer's train MSE, one row
        per method and width."""
        inputs, labels = test
        shape = tuple(self.datamodule.test_set[0][0].shape)
        loss_batches = self._loss_batches() if torch_pruning_available() else None
        rows = []
        for k in widths:
            if k == 0:
                continue
            for method, V in equal_width_weights(problem.stats, problem.W, k, lasso.get(k)).items():
                rows.append({"method": method, "width": k, "kept": problem.width(V),
                             "test_accuracy": tail_accuracy(network, plan.module, inputs, labels, problem.weight(V),
                                                            problem.layer_group),
                             "train_mse": mse(problem.stats, V)})
            for importance in IMPORTANCES if torch_pruning_available() else ():
                pruned, kept = torch_pruning_network(network, info, k, importance, example_inputs=torch.zeros(1, *shape),
                                                     loss_batches=loss_batches)
                rows.append({"method": f"torch_pruning_{importance}", "width": k, "kept": kept,
                             "test_accuracy": passes.evaluate(pruned.eval(), "test")[0].accuracy})
        return rows

    def _loss_batches(self, count: int = 4) -> list:
        """A few training batches (gradient-based importances need a loss)."""
        batches = []
        for batch in self.datamodule.train_eval_dataloader():
            batches.append(batch)
            if len(batches) == count:
                break
        return batches

    def _searcher(self, problem: LayerProblem, plan: LayerPlan, evaluate: Optional[Callable[[Tensor], float]],
                  **module_overrides: Any) -> LambdaSearch:
        def solve(lam: float, V0: Optional[Tensor]) -> tuple[Tensor, float]:
            solution = self.solve(problem.stats, lam, problem.W, plan.layer, tag=f"{plan.layer}-search-lam{lam:.9g}",
                                  V0=V0, **module_overrides)
            return solution.V, solution.rel_gap

        return LambdaSearch(solve, lambda_max(problem.stats), evaluate, group=problem.group,
                            on_candidate=partial(self._log_candidate, plan.layer))

    def _search(self, network: nn.Module, problem: LayerProblem, plan: LayerPlan, passes: DataPasses,
                reference: dict[str, Any], entry: dict[str, Any]) -> Optional[Candidate]:
        """The candidate that meets the layer's target (None: an accuracy floor missed at every width)."""
        if plan.how == "width":
            search = self._searcher(problem, plan, None)
            found = search.at_width(int(plan.value))
        else:
            inputs, labels = passes.layer_inputs(network, "val", plan.module)
            floor = reference["val_accuracy"] - plan.value / 100
            entry["val_accuracy_floor"] = floor
            search = self._searcher(problem, plan, lambda V: tail_accuracy(
                network, plan.module, inputs, labels, problem.weight(self._final(problem.stats, V)), problem.layer_group))
            found = search.at_accuracy(floor)
            if found is None:
                rank_zero_warn(f"{plan.layer!r}: no width down to lambda = {search.min_ratio:g} * lambda_max keeps "
                               f"validation accuracy at {100 * floor:.2f}% or above (the original network has "
                               f"{100 * reference['val_accuracy']:.2f}%); the layer keeps its full width")
        entry["candidates"] = [c.row() for c in search.candidates]
        return found

    def _certified_at_width(self, problem: LayerProblem, plan: LayerPlan, width: int) -> dict[str, Any]:
        """The certified optimum (working-set solver) at the lambda that keeps ``width`` neurons."""
        if width == 0:
            return {"width": 0, "note": "the paper's procedure kept no neuron"}
        found = self._searcher(problem, plan, None, solver="auto", init="auto").at_width(width)
        stats = problem.stats
        return {"lambda": found.lam, "ratio": found.ratio, "width": found.width, "mse": mse(stats, found.V),
                "objective": objective(stats, found.V, found.lam), "rel_gap": found.rel_gap, "resolved": found.resolved}

    def _log_candidate(self, layer: str, candidate: Candidate) -> None:
        if self.logger is None or not self.is_global_zero:
            return
        experiment, step = self.logger.experiment, getattr(self, "_candidates_logged", 0)
        for key, value in candidate.row().items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                experiment.add_scalar(f"search/{layer}/{key}", value, step)
        self._candidates_logged = step + 1

    # --- 3. the result -------------------------------------------------------------------------
    def profile(self, network: nn.Module, passes: DataPasses, with_val: bool, layer: Optional[str] = None
                ) -> dict[str, Any]:
        """Accuracy, loss and size of ``network``. Naming the ``layer`` compressed next makes its
        statistics part of the same pass over the training split (and of the same cache entry)."""
        train, _ = passes.evaluate(network, "train", layer)
        test, _ = passes.evaluate(network, "test")
        shape = tuple(self.datamodule.test_set[0][0].shape)
        out = {"train_loss": train.loss, "train_accuracy": train.accuracy, "test_accuracy": test.accuracy}
        if with_val:
            out["val_accuracy"] = passes.evaluate(network, "val")[0].accuracy
        return {**out, "parameters": count_parameters(network), "macs": count_macs(network, shape),
                "latency_ms": latency_ms(network, shape, batch_size=1), "widths": layer_widths(network)}

    def finish(self, network: nn.Module, report: dict[str, Any], passes: DataPasses, with_val: bool) -> dict[str, Any]:
        """Save the network, fine-tune it if asked, and complete the report."""
        report["after"] = self.profile(network, passes, with_val)
        saved = self.run_dir / "compressed.pt"
        # With fine-tuning, the network straight from surgery is kept beside the fine-tuned one.
        surgery = self.run_dir / "surgery.pt" if self.finetune.epochs > 0 else saved
        if self.is_global_zero:
            save_network(network, surgery, self.arch, self.num_classes, layers=report["layers"])
        if self.finetune.epochs > 0:
            report["after_surgery"] = report["after"]
            report["network_after_surgery"] = str(surgery)
            tuned, details = finetune(surgery, self.arch, self.num_classes, self.datamodule, self.finetune,
                                      self.train_hparams, self.run_dir, self.trainer.distributed())
            report["finetune"] = details
            network = tuned.eval()
            report["after"] = self.profile(network, passes, with_val)
            if self.is_global_zero:
                save_network(network, saved, self.arch, self.num_classes, layers=report["layers"], finetune=details)
        report["network"] = str(saved)
        return report

    # --- the whole job -------------------------------------------------------------------------
    def run(self, layers: list[str], lambdas: Optional[list[float]] = None,
            lambda_ratios: Optional[list[float]] = None, target: Optional[Target] = None,
            path: Optional[list[float]] = None, path_ratios: Optional[list[float]] = None) -> dict[str, Any]:
        """Compress ``layers`` in order; returns the report (see the module doc)."""
        plans = self.plan(layers, lambdas, lambda_ratios, target)
        if path is not None and path_ratios is not None:
            raise ValueError("give the path as --path (lambdas) or --path_ratios (fractions of lambda_max), not both")
        for lam in path or []:
            check_lambda(lam)
        for ratio in path_ratios or []:
            check_ratio(ratio, "path ratio")
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        network = self.network.eval()
        heads: dict[str, DataPasses] = {}

        def passes_for(module: str) -> DataPasses:
            """The passes of the layer's head; layers with the same head share stored inputs."""
            head = head_of(network, module)
            if head not in heads:
                heads[head] = DataPasses(self.datamodule, head, self.trainer, self.cache_dir, self.run_dir,
                                         batch_size=self.datamodule.hparams.batch_size, conv_sampling=self.conv_sampling)
            return heads[head]

        with_val = any(p.how == "accuracy" for p in plans)
        first = passes_for(plans[0].module)
        report: dict[str, Any] = {"before": self.profile(network, first, with_val, plans[0].module), "layers": []}
        for plan in plans:
            network, entry = self.compress_layer(network, plan, passes_for(plan.module), report["before"], path,
                                                 path_ratios)
            report["layers"].append(entry)
        report["paths"] = {e["layer"]: e.pop("path") for e in report["layers"] if "path" in e}
        report["baselines"] = {e["layer"]: e.pop("baselines") for e in report["layers"] if "baselines" in e}
        report = self.finish(network, report, passes_for(plans[-1].module), with_val)
        seconds: dict[str, float] = {}
        for passes in heads.values():
            for split, value in passes.seconds.items():
                seconds[split] = round(seconds.get(split, 0.0) + value, 1)
        report["passes_seconds"] = seconds
        return report

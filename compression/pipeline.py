"""Layer-by-layer compression of a trained network, from statistics to a smaller network.

The unit of work is a group of neurons (``models.dependency.NeuronGroup``): the channels
feeding a named layer, with every layer that reads them (the consumers, whose weights the
lasso solves for) and every module that loses them. ``CompressionPipeline.run`` has three
parts:
1. ``plan``: every input checked once, before any pass over the data (layer names, globs,
   lambdas, ratios, targets), so that a mistake costs nothing; layers that read the same
   group are one compression;
2. the groups, in network order, either one by one on the network compressed so far
   (``compress_layer``: the consumers' statistics over the training split, through the
   head-input cache of ``compression.passes``; the lambda, given, a ratio of lambda_max,
   or searched for a target by ``compression.search``; an optional regularisation path;
   the certified solve (``LassoCompression`` with a fresh Trainer per solve, stopped by
   ``Convergence``, checkpointed so that an interrupted run resumes); optional debiasing;
   then surgery) or, for an accuracy budget shared by what each group's candidates buy
   (``allocate``), all candidates first, one knapsack choice, and one surgery;
   then, with ``final_refit``, every layer downstream of a cut refit once more to the
   original's outputs (``compression.final_refit``);
3. ``finish``: the smaller network saved (``models.checkpoints.save_network``), optional
   recovery fine-tuning (``compression.finetune``), and the before/after report.
"""
from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LambdaCallback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from callbacks.convergence import Convergence
from compression.allocation import Option, by_efficiency, choose, longest_prefix, next_budget
from compression.baselines import IMPORTANCES, equal_width_weights, torch_pruning_available, torch_pruning_network
from compression.final_refit import layers_to_sweep, reference_after
from compression.finetune import FinetuneSettings, carried_hparams, finetune
from compression.layer_problem import LayerProblem
from compression.passes import CutInputs, DataPasses, Verdict, all_reduce_sum, head_of
from compression.reference import ReferenceOutputs
from compression.search import Candidate, LambdaSearch
from compression.settings import Target, TrainerSettings
from grouplasso import (
    LassoStats, active_columns, active_groups, check_lambda, debias, lambda_max, mse, objective, round_up_support,
    rounded_width,
)
from lightning_modules.lasso import LassoCompression
from models.checkpoints import save_network
from models.dependency import NetworkAnalysis, NeuronGroup, analyse_network
from models.layers import analyse_layer, group_width, resolve_layers
from models.profile import count_macs, count_parameters, latency_ms, layer_widths, module_macs
from models.registry import NetworkSpec
from models.export import EXPORTERS, export_checked_and_timed
from models.surgery import prune_channels, remove_neurons, set_weight, used_channels, with_weights
from compression import cache

# format -> (writer, checker, file extension)
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
        tmp = path.with_name(path.name + ".tmp")
        torch.save({**vars(self), "V": self.V[:, keep].clone(), "columns": keep, "K": self.V.shape[1]}, tmp)
        tmp.replace(path)  # whole or absent: a stop signal mid-write leaves no half solution to trust

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


class SolveCheckpoint(ModelCheckpoint):
    """A solve's checkpoint, for resuming it: every ``every_n_train_steps`` steps and when the
    solve is interrupted, but not when it ends. Lightning's ``save_last`` also saves then, which
    a finished solve does not need (its ``solution.pt`` is written instead and the checkpoints
    are removed): for a pen-sized problem that was 134 MB written and deleted per solve."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return None


@dataclass(frozen=True)
class LayerPlan:
    """What to do with one group of neurons: ``layer`` is the name the user gave (or the module
    path a pattern matched), ``module`` its module path, ``joined`` other listed layers that read
    the same group; ``how`` is ``lambda``, ``ratio``, ``width`` or ``accuracy``; ``value`` the
    lambda, the ratio of lambda_max, the width, or the accuracy budget (points) of this group."""

    layer: str
    module: str
    how: str
    value: float
    joined: tuple[str, ...] = ()


def check_ratio(ratio: float, what: str = "lambda ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"{what} must be in (0, 1), a fraction of each layer's lambda_max; got {ratio!r}")
    return float(ratio)


def _per_layer(values: list, layers: list[str], what: str) -> list:
    if len(values) not in (1, len(layers)):
        raise ValueError(f"give one {what} for all layers or one per compressed group ({len(layers)}: "
                         f"{', '.join(layers)}), got {len(values)}")
    return list(values) * len(layers) if len(values) == 1 else list(values)


def cumulative_shares(budget: float, weights: Sequence[float]) -> list[float]:
    """The accuracy (points) the network may have lost after each of n groups, compressed in
    order: budget * (w_1 + ... + w_i) / (w_1 + ... + w_n), so that what one group leaves unused
    passes to the next. Equal weights give i/n of the budget; ``share: cumulative_macs`` weighs
    each group by the multiply-adds of the modules that lose its channels (on ResNet-56 a
    residual stream's, read and written by every block of its stage, are ten times an internal
    width's: in equal parts the first stream could lose 1.5 validation images)."""
    total = float(sum(weights))
    if total <= 0:
        weights, total = [1.0] * len(weights), float(len(weights))
    shares, running = [], 0.0
    for w in weights:
        running += w
        shares.append(budget * running / total)
    shares[-1] = float(budget)  # exactly, whatever the rounding of the sum
    return shares


def held_out_count(images: int, fraction: float) -> int:
    """How many of ``images`` validation images the held-out check keeps (the last ones): at least
    one, and at least one left to choose with."""
    return min(images - 1, max(1, round(fraction * images)))


def _safe_tag(layer: str) -> str:
    return layer.replace("/", "_")


def describe_plan(analysis: NetworkAnalysis, plans: list[LayerPlan], target: Target, allocate: bool,
                  final_refit: bool = False) -> str:
    """The plan, printed once before any pass: every group of neurons and how much to compress it."""
    how = {"lambda": "at lambda {:g}", "ratio": "at {:g} of its lambda_max", "width": "to width {:g}"}
    if plans[0].how == "accuracy":
        share = ("shared by the multiply-adds each group's candidates save per validation image lost"
                 if allocate else "shared cumulatively, layer by layer, in proportion to each group's multiply-adds"
                 if target.share == "cumulative_macs" else "shared cumulatively, layer by layer")
        head = f"compressing {len(plans)} group(s) of neurons within {target.max_accuracy_drop:g} point(s) of " \
               f"validation accuracy, {share}:"
    else:
        head = f"compressing {len(plans)} group(s) of neurons:"
    lines = [head]
    for plan in plans:
        group = analysis.group_of(plan.module)
        readers = [c.name for c in group.consumers]
        unit = f"attention heads of {group.units} features" if group.units > 1 else \
            "neurons" if all(c.kind == "linear" and c.group == 1 for c in group.consumers) else "channels"
        what = f"{group.width} {unit} read by {', '.join(readers[:4])}" + \
               (f" and {len(readers) - 4} more" if len(readers) > 4 else "") + \
               (f", made by {len(group.producers)} layers (coupled)" if group.coupled else "")
        amount = "" if plan.how == "accuracy" else " " + how[plan.how].format(plan.value)
        lines.append(f"  {plan.layer}{amount}: {what}")
    if final_refit:
        lines.append("then every layer from the first cut's consumer on refit once more to the original's outputs "
                     "(final_refit), kept if validation accuracy does not fall")
    return "\n".join(lines)


@dataclass
class CompressionPipeline:
    """Compress ``network`` (in eval mode) group by group; see the module doc.

    ``spec`` says how to rebuild the network (saved with the compressed one);
    ``make_module(**overrides)`` builds a ``LassoCompression`` with the config's solver
    settings, ``make_convergence()`` the stopping rule, ``trainer`` makes every Trainer.
    ``train_limit``: the training images the statistics (and the train loss) read (None: all);
    ``candidate_images``: the validation images an allocation's candidates are judged on
    (None: all; the chosen set is always re-validated on all of them).
    """

    # The network the next group's search starts from, and which of this process's validation
    # images it gets right (the kept candidate's verdict): the reference of every candidate's
    # paired difference, without a pass of its own.
    _val_before: Optional[tuple[nn.Module, Tensor]] = field(default=None, init=False, repr=False)

    network: nn.Module
    spec: NetworkSpec
    datamodule: pl.LightningDataModule
    run_dir: Path
    make_module: Callable[..., LassoCompression] = LassoCompression
    make_convergence: Callable[[], Convergence] = Convergence
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    cache_dir: Optional[Path] = Path(".cache/passes")
    checkpoint_every: int = 200
    debias: bool = False
    round_to: int = 1  # every compressed group keeps a multiple of this many neurons or channels (see _final)
    logger: Optional[TensorBoardLogger] = None
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    train_hparams: dict[str, Any] = field(default_factory=dict)
    baselines: bool = False
    conv_sampling: dict[str, Any] = field(default_factory=dict)
    train_limit: Optional[int] = None
    candidate_images: Optional[int] = None
    margin_se: float = 0.0  # ``Target.margin_se``: standard errors by which a candidate clears its floor
    held_out: float = 0.0  # ``Target.held_out``: the fraction of the validation images no choice sees
    max_tries: int = 10  # re-validations of an allocation (one pass over the validation split each)
    cache_max_bytes: Optional[int] = None  # what ``cache_dir`` may hold (``compression.cache``)
    export: tuple[str, ...] = ()  # "onnx", "torchscript": files written and checked at the end
    # The paper procedure's comparison: a certified width within this fraction of its width, in
    # at most this many seconds for the same-lambda solve and the same-width search together (a
    # solve near the dense end can take longer than the whole run). 570 s: with the report's
    # passes after it (about 15 s on the demo's network) the run ends within 10 minutes of its
    # Adam steps.
    width_tolerance: float = 0.05
    comparison_seconds: float = 570.0
    # After the last cut, refit every layer downstream of a cut once more, in forward order, to the
    # original network's outputs (``compression.final_refit``); kept if validation does not fall.
    final_refit: bool = False

    @property
    def is_global_zero(self) -> bool:
        """Whether this process writes files (always, except in DDP's other processes)."""
        return rank_zero_only.rank == 0

    @property
    def solver(self) -> str:
        return self.make_module().hparams.solver

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.datamodule.test_set[0][0].shape)

    # --- 1. inputs, checked once ------------------------------------------------------------
    def plan(self, layers: list[str], lambdas: Optional[list[float]] = None,
             lambda_ratios: Optional[list[float]] = None, target: Optional[Target] = None,
             analysis: Optional[NetworkAnalysis] = None) -> list[LayerPlan]:
        """One ``LayerPlan`` per group of neurons; raises ``ValueError`` naming the problem and the fix."""
        if not layers:
            raise ValueError("no layers to compress: set layers, e.g. [pen, last], [all] or ['layer*.*.conv1']")
        analysis = analysis or analyse_network(self.network)
        named: list[tuple[str, str]] = []  # (the name shown, module path)
        for name in layers:
            paths = resolve_layers(self.network, [name], self.spec.arch, analysis)  # errors list valid names
            named += [(name if len(paths) == 1 and paths[0] != name and "*" not in name and name != "all" else path,
                       path) for path in paths]
        units: dict[str, list[tuple[str, str]]] = {}  # the group's name -> the listed layers reading it
        for shown, path in named:
            units.setdefault(analysis.group_of(path).name, []).append((shown, path))
        # network order (of each group's first consumer), as the budget and the surgery assume
        order = {layer: i for i, layer in enumerate(analysis.layers)}
        if any("*" in name or name == "all" for name in layers):
            units = dict(sorted(units.items(), key=lambda item: order[item[0]]))
        groups = [analysis.group_of(members[0][1]) for members in units.values()]
        labels = [members[0][0] for members in units.values()]
        target = target or Target()
        chosen = [name for name, given in (("lambdas", lambdas), ("lambda_ratios", lambda_ratios),
                                           ("target.width", target.width),
                                           ("target.max_accuracy_drop", target.max_accuracy_drop)) if given is not None]
        if len(chosen) != 1:
            raise ValueError("say how much to compress with exactly one of --target.max_accuracy_drop (points of "
                             "validation accuracy), --target.width, --lambda_ratios (fractions of lambda_max) or "
                             f"--lambdas; got {', '.join(chosen) or 'none'}")
        if lambdas is not None:
            values, how = [check_lambda(v) for v in _per_layer(lambdas, labels, "lambda")], "lambda"
        elif lambda_ratios is not None:
            values, how = [check_ratio(v) for v in _per_layer(lambda_ratios, labels, "lambda ratio")], "ratio"
        elif target.width is not None:
            values, how = _per_layer(target.width, labels, "width"), "width"
            for layer, group, k in zip(labels, groups, values):
                K = group_width(self.network, group)
                unit = "input neurons" if group.consumers[0].kind == "linear" and group.consumers[0].group == 1 \
                    else "input channels"
                if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K:
                    raise ValueError(f"target width {k!r} for {layer!r} is not possible: it has {K} {unit}; "
                                     f"choose 1 to {K}")
        else:
            budget = target.max_accuracy_drop
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < 100:
                raise ValueError(f"target.max_accuracy_drop is in percentage points of validation accuracy, from 0 "
                                 f"(no loss allowed) to below 100; got {budget!r}")
            margin = self.margin_se
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 10:
                raise ValueError(f"target.margin_se is a number of standard errors from 0 (none) to 10 (1 is usual); "
                                 f"got {margin!r}")
            if margin and target.share == "macs" and len(labels) > 1:
                raise ValueError("target.margin_se applies to each group's own accuracy floor (--target.share "
                                 "cumulative or cumulative_macs, or one layer); share: macs judges candidates by the "
                                 "images they lose and re-validates the chosen set: set margin_se 0 or change the share")
            if target.share == "cumulative_macs" and len(labels) > 1:
                self.datamodule.setup("fit")  # the input shape, for the multiply-adds
                macs = module_macs(self.network, self.input_shape)
                values = cumulative_shares(budget, [sum(macs.get(m, 0) for m in g.modules) for g in groups])
            elif target.share == "cumulative" or len(labels) == 1:
                values = cumulative_shares(budget, [1.0] * len(labels))
            else:  # ``allocate`` shares the whole budget by what each group's candidates buy
                values = [float(budget)] * len(labels)
            how = "accuracy"
        if self.held_out:
            held = self.held_out
            if isinstance(held, bool) or not isinstance(held, (int, float)) or not 0 < held < 1:
                raise ValueError(f"target.held_out is the fraction of the validation images kept out of every "
                                 f"choice, above 0 and below 1 (0.3 is usual; 0: no held-out check); got {held!r}")
            if how != "accuracy":
                raise ValueError("target.held_out checks an accuracy budget: give --target.max_accuracy_drop")
            if target.share == "macs" and len(labels) > 1:
                raise ValueError("target.held_out checks a layer-by-layer run (--target.share cumulative or "
                                 "cumulative_macs); share: macs re-validates its chosen set on all the validation "
                                 "images: set held_out 0 or change the share")
        if how in ("width", "accuracy") and self.solver == "paper_adam":
            raise ValueError("targets need a certified solver (model.solver: auto); paper_adam reproduces the paper's "
                             "absolute lambdas: give them with --lambdas")
        return [LayerPlan(label, members[0][1], how, float(v), tuple(shown for shown, _ in members[1:]))
                for label, members, v in zip(labels, units.values(), values)]

    # --- solving ----------------------------------------------------------------------------
    def solve(self, stats: LassoStats, lam: float, W: Tensor, layer: str, tag: str, V0: Optional[Tensor] = None,
              quiet: bool = False, seconds: Optional[float] = None, **module_overrides: Any) -> Solution:
        """One multi-task lasso solve with a fresh Trainer; resumes from ``<run_dir>/solve/<tag>``
        when an earlier, interrupted run left a checkpoint there, and returns a finished one's result.
        ``seconds``: stop after that long (Lightning's ``max_time``, checked after every step); a
        solve stopped so is returned but not kept as finished (a resumed run solves it again)."""
        fit_dir = self.run_dir / "solve" / tag
        done = fit_dir / "solution.pt"
        if done.is_file():
            return Solution.load(done)
        module = self.make_module(**module_overrides).attach(stats, lam, W, layer, start=V0)
        convergence = self.make_convergence()
        if quiet:  # a search prints one line per candidate instead (``_log_candidate``)
            convergence.verbose = False
        # Under DDP every process solves the same (all-reduced) problem identically, so all
        # hold the same V; only rank 0 writes.
        callbacks: list[pl.Callback] = [convergence]
        if self.is_global_zero:
            callbacks += [SolveCheckpoint(dirpath=fit_dir / "checkpoints", save_last=True, save_top_k=0,
                                          every_n_train_steps=self.checkpoint_every, save_on_train_epoch_end=False),
                          self._resume_hint(tag)]
        trainer = self.trainer.single_device(
            callbacks=callbacks, enable_checkpointing=self.is_global_zero,
            logger=TensorBoardLogger(self.run_dir, name="solve", version=tag, default_hp_metric=False)
            if self.is_global_zero else False,
            log_every_n_steps=1,  # the module decides how often to log (its log_every)
            **({} if seconds is None else {"max_time": timedelta(seconds=seconds)}),
        )
        last = fit_dir / "checkpoints" / "last.ckpt"
        trainer.fit(module, ckpt_path=str(last) if last.is_file() else None)
        solution = Solution(V=module.solver.V.detach().cpu().clone(), lam=lam, rel_gap=convergence.rel_gap,
                            steps=convergence.steps, seconds=convergence.seconds, reason=convergence.reason)
        if self.is_global_zero:
            if convergence.stopped_by_time:
                limit = "" if seconds is None else f" ({seconds:.0f} s)"  # else the trainer's own max_time
                solution.reason = f"stopped by the time limit{limit} after {solution.steps} steps"
            else:
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
                            passes: DataPasses, test: CutInputs) -> list[dict[str, Any]]:
        """Solve for every lambda, largest first, each warm-started from the previous solution;
        evaluate each on the test set from the stored ``test`` cut; each row keeps its solution
        under ``V`` for the baselines at the same width."""
        stats, top, rows, V0 = problem.stats, lambda_max(problem.stats), [], None
        for lam in sorted(lambdas, reverse=True):
            solution = self.solve(stats, lam, problem.W, plan.layer, tag=f"{_safe_tag(plan.layer)}-lam{lam:.9g}", V0=V0)
            V0 = solution.V
            accuracy = passes.accuracy(network, test, problem.weights_with_groups(self._final(stats, solution.V)))
            rows.append({**solution.summary(stats), "ratio": lam / top, "test_accuracy": accuracy, "V": solution.V})
        return rows

    def _final(self, stats: LassoStats, V: Tensor) -> Tensor:
        """What surgery uses of a solution: V, or its least-squares refit with ``debias``. With
        ``round_to`` > 1 the support is first rounded up to a multiple of it by the groups nearest
        to entering (``grouplasso.round_up_support``) and refit on that, ``debias`` or not: the
        lasso gave the added groups no weights."""
        if self.round_to > 1:
            return debias(stats, V, groups=round_up_support(stats, V, self.round_to))
        return debias(stats, V) if self.debias else V

    @property
    def refits(self) -> bool:
        """Whether surgery uses a least-squares refit of each solution (``debias``, or ``round_to``)."""
        return self.debias or self.round_to > 1

    def _kept(self, problem: LayerProblem, width: int) -> int:
        """The width surgery keeps of a solution with ``width`` groups (``round_to``, above)."""
        return rounded_width(width, self.round_to, problem.groups)

    # --- 2. one group ------------------------------------------------------------------------
    def layer_problem(self, network: nn.Module, module: str, passes: DataPasses,
                      targets: Optional[ReferenceOutputs] = None,
                      group: Optional[NeuronGroup] = None) -> tuple[NeuronGroup, LayerProblem, float]:
        """The group feeding ``module`` (``group``, when already analysed), its problem on the
        training split's statistics (its consumers' problems, grouped by channel, folded where
        inputs repeat, stacked when several layers read the group), and the seconds the
        statistics took (0 from the cache). ``targets``: the consumers' outputs in the
        statistics are the original network's (``compression.reference``), not ``network``'s own."""
        group = group if group is not None else analyse_layer(network, module)
        train, seconds = passes.evaluate(network, "train", [c.name for c in group.consumers],
                                         **({} if targets is None else {"targets": targets.network,
                                                                        "output_index": targets.output_index}))
        return group, LayerProblem.of_group(network, group, train.stats), seconds

    def _entry(self, network: nn.Module, plan: LayerPlan, group: NeuronGroup, problem: LayerProblem,
               stats_seconds: float, passes: DataPasses) -> dict[str, Any]:
        module = network.get_submodule(plan.module)
        entry: dict[str, Any] = {"layer": plan.layer, "module": plan.module,
                                 "kind": "conv" if isinstance(module, nn.Conv2d) else "linear",
                                 **problem.describe(), "neurons": group.describe(), "lambda_max": lambda_max(problem.stats),
                                 "width_before": problem.groups, "stats_seconds": round(stats_seconds, 2),
                                 "samples": problem.stats.n, "chosen_by": plan.how, "debiased": self.refits}
        if plan.joined:
            entry["joined"] = list(plan.joined)
        if passes.conv_sampling and any(c.kind == "conv" for c in group.consumers):
            entry["conv_sampling"] = dict(passes.conv_sampling)
        return entry

    def _finish_entry(self, entry: dict[str, Any], problem: LayerProblem, solution: Optional[Solution],
                      V: Tensor) -> Tensor:
        """Complete ``entry`` with the solution (or the full width when there is none); returns the
        weights surgery uses (refit with ``debias``)."""
        stats = problem.stats
        if solution is not None:
            entry.update(solution.summary(stats))
            entry["ratio"] = solution.lam / entry["lambda_max"]
        else:  # the budget is missed even at full width: the group stays as it is
            entry.update({"lambda": 0.0, "ratio": 0.0, "active": problem.groups, "mse": mse(stats, V),
                          "objective": mse(stats, V), "rel_gap": 0.0, "steps": 0, "seconds": 0.0,
                          "stop": "kept at full width: no candidate met the accuracy budget"})
        V = self._final(stats, V) if solution is not None else V
        # the neurons (or channels) kept, numbered as before this layer
        entry["kept_indices"] = active_groups(V, problem.group).tolist()
        entry["width_after"] = len(entry["kept_indices"])
        if self.refits:
            entry["mse_debiased"] = mse(stats, V)
        if self.round_to > 1:
            entry["round_to"] = self.round_to
        return V

    def compress_layer(self, network: nn.Module, plan: LayerPlan, passes: DataPasses, reference: dict[str, Any],
                       path: Optional[list[float]], path_ratios: Optional[list[float]],
                       targets: Optional[ReferenceOutputs] = None) -> tuple[nn.Module, dict]:
        """Statistics, lambda, solve, surgery for one group; returns the smaller network and the
        report entry. ``targets``: refit to the original network's outputs (and record the
        channels this group keeps in it)."""
        group = analyse_layer(network, plan.module)
        aim = targets if targets is not None and targets.aims_at(group) else None
        group, problem, stats_seconds = self.layer_problem(network, plan.module, passes, aim, group)
        stats = problem.stats
        entry = self._entry(network, plan, group, problem, stats_seconds, passes)
        if targets is not None and targets.network is not network:
            entry["refit_to"] = "original" if aim is not None else "current (a residual stream's consumers)"
        top = entry["lambda_max"]
        consumers = [c.name for c in group.consumers]
        rows = None
        test = passes.cut_inputs(network, "test", consumers) if path or path_ratios or self.baselines else None
        if path or path_ratios:
            lambdas = path or [check_ratio(r, "path ratio") * top for r in path_ratios]
            rows = self.regularisation_path(network, problem, lambdas, plan, passes, test)
        solution: Optional[Solution] = None
        found: Optional[Candidate] = None
        if plan.how in ("lambda", "ratio"):
            lam = plan.value if plan.how == "lambda" else plan.value * top
            self._check_below_lambda_max(lam, top, plan.layer)
            solution = self.solve(stats, lam, problem.W, plan.layer, tag=f"{_safe_tag(plan.layer)}-lam{lam:.9g}")
            V = solution.V
        else:
            found = self._search(network, problem, plan, passes, reference, entry, consumers)
            V = problem.W.to(torch.float64) if found is None else found.V
            if found is not None:
                solution = Solution(V=found.V, lam=found.lam, rel_gap=found.rel_gap, steps=0, seconds=found.seconds,
                                    reason=f"searched: {found.resolved} ({len(entry['candidates'])} candidates)")
        if rows is not None:
            entry["path"] = rows
        if self.solver == "paper_adam" and solution is not None:
            entry["certified_same_width"] = self._certified_at_width(problem, plan, len(active_groups(V, problem.group)),
                                                                     solution.lam)
        if self.baselines and solution is not None:
            width = len(active_groups(V, problem.group))
            widths = sorted({r["active"] for r in rows or []} | {width}, reverse=True)
            entry["baselines"] = self.compare_baselines(network, group, problem, plan, passes, test, widths,
                                                        {width: V, **{r["active"]: r.pop("V") for r in rows or []}})
        for r in rows or []:
            r.pop("V", None)
        V = self._finish_entry(entry, problem, solution, V)
        if targets is not None:
            targets.removed(group, entry["kept_indices"])
        smaller = remove_neurons(network, group, problem.weights(V)).eval()
        if plan.how == "accuracy" and self._val_before is not None and self._val_before[0] is network:
            # the next search's reference: the kept candidate's verdict, or the same images right
            self._val_before = (smaller, self._val_before[1] if found is None or found.val_correct is None
                                else found.val_correct)
        return smaller, entry

    def compare_baselines(self, network: nn.Module, group: NeuronGroup, problem: LayerProblem, plan: LayerPlan,
                          passes: DataPasses, test: CutInputs, widths: list[int],
                          lasso: dict[int, Tensor]) -> list[dict[str, Any]]:
        """Every baseline of ``compression.baselines`` at each width (with the lasso solution of
        that width): test accuracy (from the stored ``test`` cut, or for Torch-Pruning's networks
        a pass over the test split) and the group's train MSE, one row per method and width."""
        loss_batches = self._loss_batches() if torch_pruning_available() else None
        rows = []
        for k in widths:
            if k == 0:
                continue
            for method, V in equal_width_weights(problem.stats, problem.W, k, lasso.get(k)).items():
                rows.append({"method": method, "width": k, "kept": problem.width(V),
                             "test_accuracy": passes.accuracy(network, test, problem.weights_with_groups(V)),
                             "train_mse": mse(problem.stats, V)})
            for importance in IMPORTANCES if torch_pruning_available() else ():
                pruned, kept = torch_pruning_network(network, group, k, importance,
                                                     example_inputs=torch.zeros(1, *self.input_shape),
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
        def solve(lam: float, V0: Optional[Tensor], seconds: Optional[float]) -> tuple[Tensor, float]:
            solution = self.solve(problem.stats, lam, problem.W, plan.layer, tag=f"{plan.layer}-search-lam{lam:.9g}",
                                  V0=V0, quiet=True, seconds=seconds, **module_overrides)
            return solution.V, solution.rel_gap

        return LambdaSearch(solve, lambda_max(problem.stats), evaluate, group=problem.group,
                            on_candidate=partial(self._log_candidate, plan.layer, problem))

    def _search(self, network: nn.Module, problem: LayerProblem, plan: LayerPlan, passes: DataPasses,
                reference: dict[str, Any], entry: dict[str, Any], consumers: list[str]) -> Optional[Candidate]:
        """The candidate that meets the group's target (None: an accuracy floor missed at every width)."""
        if plan.how == "width":
            search = self._searcher(problem, plan, None)
            found = search.at_width(int(plan.value))
        else:
            val = passes.cut_inputs(network, "val", consumers)
            if self.held_out:  # the last images are the held-out check's
                val = val.first(self._choosing(len(val.labels)))
            floor = reference.get("val_accuracy_choosing", reference["val_accuracy"]) - plan.value / 100
            entry["val_accuracy_floor"] = floor
            if self._val_before is None or self._val_before[0] is not network:
                self._val_before = (network, passes.judge(network, val, {}).correct)
            search = self._searcher(problem, plan, self._validation(network, problem, passes, val, floor))
            found = search.at_accuracy(floor, margin=self.margin_se)
            if self.margin_se:
                entry["margin_se"] = self.margin_se
            if found is None:
                rank_zero_warn(f"{plan.layer!r}: no width (down to lambda = {search.min_ratio:g} * lambda_max, or to the "
                               f"first candidate that keeps every group) keeps "
                               f"validation accuracy at {100 * floor:.2f}% or above"
                               + (f" by {self.margin_se:g} standard errors" if self.margin_se else "") +
                               f" (the original network has {100 * reference['val_accuracy']:.2f}%); the layer keeps "
                               "its full width")
        entry["candidates"] = [c.row() for c in search.candidates]
        return found

    def _validation(self, network: nn.Module, problem: LayerProblem, passes: DataPasses, val: CutInputs,
                    floor: float) -> Callable[[Tensor], Verdict]:
        """The verdict on the validation split of the network with the group's weights V (what
        surgery would use of them, ``_final``), against the network before the cut
        (``_val_before``), stopped early when it clearly fails ``floor`` (``DataPasses.judge``).
        With a refit those weights depend on the kept groups alone, so a candidate that keeps the
        same groups as one already validated is not validated again (the lambda walk meets the
        same few neurons at several lambdas: a tail pass each)."""
        seen: dict[tuple[int, ...], Verdict] = {}
        before = self._val_before[1]

        def judge(V: Tensor) -> Verdict:
            final = self._final(problem.stats, V)
            if not self.refits:
                return passes.judge(network, val, problem.weights_with_groups(final), before, floor)
            kept = tuple(active_groups(final, problem.group).tolist())
            if kept not in seen:
                seen[kept] = passes.judge(network, val, problem.weights_with_groups(final), before, floor)
            return seen[kept]

        return judge

    def _choosing(self, images: int) -> int:
        """How many of ``images`` validation images judge candidates: all but the held-out ones."""
        return images - held_out_count(images, self.held_out) if self.held_out else images

    def check_held_out(self, network: nn.Module, before: list[nn.Module], entries: list[dict[str, Any]],
                       budget: float, passes: DataPasses, original: Tensor) -> tuple[nn.Module, dict[str, Any]]:
        """The held-out check of a layer-by-layer run: the compressed network against the original
        on the last ``held_out`` of the validation images, which no group's choice saw
        (``original``: which validation images the original gets right). Every group takes the
        narrowest candidate that clears its floor on the same choosing images, so their luck can
        add up; these images are a fresh sample. While the network loses more than ``budget``
        points on them, the last cut still standing is given back: the network before it
        (``before[i]``, the network group i started from) is restored and the cut groups from i
        on are kept at full width. Returns the network and the check's record."""
        n = len(original)
        count = held_out_count(n, self.held_out)
        reference = original[n - count:]
        kept, tries, given_back = len(entries), [], []
        while True:
            verdict = Verdict.count(passes.correct(network, "val")[n - count:], reference, all_reduce_sum)
            drop = 100 * verdict.difference
            tries.append({"groups": kept, "accuracy": verdict.accuracy, "drop": drop, "se": 100 * verdict.se})
            cut = [i for i in range(kept) if entries[i]["width_after"] < entries[i]["width_before"]]
            within = drop <= budget
            if within or not cut:
                break
            kept, network = cut[-1], before[cut[-1]]
            entry = entries[kept]
            rank_zero_info(f"held-out check: {100 * verdict.accuracy:.2f}% on {count} validation images no choice saw, "
                           f"{drop:.2f} points below the original (budget {budget:g}): giving back the cut of "
                           f"{entry['layer']} ({entry['width_after']} of {entry['width_before']})")
            given_back.append({"layer": entry["layer"], "width": entry["width_after"]})
            entry["given_back"] = {"width": entry["width_after"], "kept_indices": entry["kept_indices"]}
            entry["kept_indices"] = list(range(entry["width_before"]))
            entry["width_after"] = entry["width_before"]
            entry["stop"] = "given back: the whole network lost more than the budget on the held-out images"
        rank_zero_info(f"held-out check: {100 * verdict.accuracy:.2f}% on {count} validation images no choice saw, "
                       f"{-drop:+.2f} ± {100 * verdict.se:.2f} points against the original (budget: -{budget:g}): "
                       + ("within the budget" if within else "every cut given back")
                       + (f", {len(given_back)} cut(s) given back" if given_back and within else ""))
        return network, {"images": count, "fraction": self.held_out, "budget": budget,
                         "original_accuracy": float(reference.float().mean()), "accuracy": verdict.accuracy,
                         "drop": drop, "se": 100 * verdict.se, "within_budget": within, "given_back": given_back,
                         "tries": tries}

    # --- 2'. one budget for many groups ----------------------------------------------------------
    def allocate(self, network: nn.Module, plans: list[LayerPlan], passes_for: Callable[[Sequence[str]], DataPasses],
                 reference: dict[str, Any], analysis: Optional[NetworkAnalysis] = None,
                 ) -> tuple[nn.Module, list[dict[str, Any]], dict[str, Any]]:
        """Share one accuracy budget between ``plans`` by what each group's candidates buy
        (``compression.allocation``): every group's certified candidates on the original network
        (all statistics in one pass per head), each judged alone on the validation split; the
        knapsack choice of widths; the chosen set applied at once and re-validated on the whole
        network, the budget corrected (at most ``max_tries`` times) until the real loss is
        within it; when the first choice overshot, also the longest best-buy-first prefix of it
        that holds (bisection). The choice that saves most within the budget is kept. Returns the
        network, the report entries and the allocation's record."""
        budget_points = plans[0].value
        analysis = analysis or analyse_network(network)
        groups = [analysis.group_of(plan.module) for plan in plans]
        # 1. every group's statistics on the original network: one pass per head
        heads: dict[int, list[int]] = {}
        for i, group in enumerate(groups):
            heads.setdefault(id(passes_for([c.name for c in group.consumers])), []).append(i)
        problems: list[Optional[LayerProblem]] = [None] * len(plans)
        seconds = [0.0] * len(plans)
        for members in heads.values():
            passes = passes_for([c.name for c in groups[members[0]].consumers])
            layers = list(dict.fromkeys(c.name for i in members for c in groups[i].consumers))
            train, took = passes.evaluate(network, "train", layers)
            for i in members:
                problems[i], seconds[i] = LayerProblem.of_group(network, groups[i], train.stats), took / len(members)
        # 2. every group's candidates, judged alone
        macs = module_macs(network, self.input_shape)
        n_val = len(self.datamodule.val_set)
        budget = int(math.floor(budget_points / 100 * n_val + 1e-9))
        options, entries, found_by_group = [], [], []
        for plan, group, problem, took in zip(plans, groups, problems, seconds):
            passes = passes_for([c.name for c in group.consumers])
            entry = self._entry(network, plan, group, problem, took, passes)
            entry["val_accuracy_floor"] = reference["val_accuracy"] - budget_points / 100
            cut = passes.cut_inputs(network, "val", [c.name for c in group.consumers], limit=self.candidate_images)
            judged = len(cut.labels)
            # the original on the same images: the candidates' accuracy baseline and the reference of
            # their paired standard errors
            original = passes.judge(network, cut, {})
            alone = original.accuracy
            search = self._searcher(problem, plan, lambda V, p=problem, c=cut, n=passes: n.judge(
                network, c, p.weights_with_groups(self._final(p.stats, V)), original.correct))
            # down the path until a candidate loses nothing, or keeps 15/16 of the group (the rest buys little)
            candidates = search.until(lambda c, full=problem.groups: (alone - c.val_accuracy) * n_val <= 0.5
                                      or 16 * c.width >= 15 * full)
            del cut
            per_channel = sum(macs.get(m, 0) for m in group.modules) / max(problem.groups, 1)
            group_options = []
            for k, candidate in enumerate(candidates):
                cost = max(0, int(round((alone - candidate.val_accuracy) * n_val)))
                saving = per_channel * (problem.groups - self._kept(problem, candidate.width))
                if cost <= budget and saving > 0:
                    group_options.append(Option(cost, saving, k))
            entry["candidates"] = [{**c.row(), "images_lost": max(0, int(round((alone - c.val_accuracy) * n_val))),
                                    "macs_saved": per_channel * (problem.groups - self._kept(problem, c.width))}
                                   for c in candidates]
            entry["judged_on"] = judged
            options.append(group_options)
            entries.append(entry)
            found_by_group.append(candidates)
        # 3. choose, apply, re-validate, correct
        record: dict[str, Any] = {"budget_points": budget_points, "budget_images": budget, "validation_images": n_val,
                                  "tries": []}
        best: Optional[tuple[nn.Module, list[Optional[int]], float]] = None
        tried: set[int] = set()
        level = budget
        passes = passes_for([c.name for group in groups for c in group.consumers])

        def attempt(chosen: list[Optional[int]], saving: float, cost: int, **about: Any) -> tuple[float, bool]:
            """Apply ``chosen``, re-validate it on the whole network, record it, keep it if it is the best
            within the budget; the validation images it loses, and whether that is within the budget."""
            nonlocal best
            candidate_net = self._apply(network, groups, problems, found_by_group, chosen)
            accuracy = passes.evaluate(candidate_net, "val")[0].accuracy
            lost = (reference["val_accuracy"] - accuracy) * n_val
            within = lost <= budget + 1e-9
            record["tries"].append({**about, "predicted_images_lost": cost, "macs_saved_predicted": saving,
                                    "val_accuracy": accuracy, "images_lost": lost, "within_budget": within,
                                    "widths": [problems[i].groups if k is None
                                               else self._kept(problems[i], found_by_group[i][k].width)
                                               for i, k in enumerate(chosen)]})
            if within and (best is None or saving > best[2]):
                best = (candidate_net, chosen, saving)
            return lost, within

        first: Optional[list[Optional[int]]] = None  # the choice at the real budget
        for _ in range(self.max_tries):
            if level in tried:
                break
            tried.add(level)
            chosen, saving, cost = choose(options, level)
            first = chosen if first is None else first
            lost, within = attempt(chosen, saving, cost, budget_images=level)
            if within and lost >= 0.8 * budget:
                break
            level = next_budget(level, budget, lost, cost)
            if level is None:
                break
        if first is not None and not record["tries"][0]["within_budget"]:
            # The cuts interact more than their sum says: the longest best-buy-first prefix of the
            # first choice that holds (``allocation.longest_prefix``).
            order = by_efficiency(options, first)
            option_of = {(g, o.index): o for g, group_options in enumerate(options) for o in group_options}

            def holds(m: int) -> bool:
                chosen = [first[g] if g in order[:m] else None for g in range(len(first))]
                picked = [option_of[g, first[g]] for g in order[:m]]
                return attempt(chosen, sum(o.saving for o in picked), sum(o.cost for o in picked),
                               prefix=f"{m} of {len(order)} best-buy cuts of the first choice")[1]

            longest_prefix(len(order), holds)
        if best is None:
            rank_zero_warn(f"no allocation of widths kept validation accuracy within {budget_points} points; every "
                           "layer keeps its full width")
            chosen: list[Optional[int]] = [None] * len(plans)
            result = network
        else:
            result, chosen = best[0], best[1]
        record["chosen"] = [None if k is None else self._kept(problems[i], found_by_group[i][k].width)
                            for i, k in enumerate(chosen)]
        for i, (entry, k) in enumerate(zip(entries, chosen)):
            problem = problems[i]
            if k is None:
                self._finish_entry(entry, problem, None, problem.W.to(torch.float64))
                entry["stop"] = "kept at full width: the allocation chose no candidate"
            else:
                c = found_by_group[i][k]
                solution = Solution(V=c.V, lam=c.lam, rel_gap=c.rel_gap, steps=0, seconds=c.seconds,
                                    reason=f"allocated: {c.resolved} ({len(entry['candidates'])} candidates)")
                self._finish_entry(entry, problem, solution, c.V)
        return result.eval(), entries, record

    def _apply(self, network: nn.Module, groups: list[NeuronGroup], problems: list[LayerProblem],
               candidates: list[list[Candidate]], chosen: list[Optional[int]]) -> nn.Module:
        """The network with every chosen candidate in place: all consumers' new weights first, then
        every group's unused channels removed (the two commute, so the order does not matter)."""
        # each chosen solution refit once (with round_to: a top-k and a least-squares solve)
        final = {i: problem.weights(self._final(problem.stats, found[k].V))
                 for i, (problem, found, k) in enumerate(zip(problems, candidates, chosen)) if k is not None}
        out = with_weights(network, {name: w for weights in final.values() for name, w in weights.items()})
        for i, weights in final.items():
            keep = used_channels(network, groups[i], weights)
            prune_channels(out, groups[i], keep if len(keep) else torch.zeros(1, dtype=torch.long))
        return out.eval()

    def _certified_at_width(self, problem: LayerProblem, plan: LayerPlan, width: int, lam: float) -> dict[str, Any]:
        """What the paper's Adam procedure at ``lam`` is to be compared with: the certified optimum
        at the same lambda (one solve; V = 0 from lambda_max up), then the certified optimum of the
        same width, searched within ``width_tolerance`` of it; both together for at most
        ``comparison_seconds`` (the report says what was skipped and why)."""
        stats, top = problem.stats, lambda_max(problem.stats)
        out: dict[str, Any] = {}
        began = time.perf_counter()
        if lam >= top:
            out["same_lambda"] = {"lambda": lam, "width": 0, "mse": mse(stats, torch.zeros_like(problem.W)),
                                  "note": "lambda >= lambda_max: the exact optimum is V = 0, no solve needed"}
        else:
            at = self.solve(stats, lam, problem.W, plan.layer, tag=f"{_safe_tag(plan.layer)}-certified-lam{lam:.9g}",
                            seconds=self.comparison_seconds, solver="auto", init="auto")
            out["same_lambda"] = {"lambda": lam, "width": len(active_groups(at.V, problem.group)),
                                  "mse": mse(stats, at.V), "objective": objective(stats, at.V, lam),
                                  "rel_gap": at.rel_gap, **({"note": at.reason} if "time limit" in at.reason else {})}
        if width == 0:
            return {**out, "width": 0, "note": "the paper's procedure kept no neuron"}
        left = self.comparison_seconds - (time.perf_counter() - began)
        if left <= 0:
            rank_zero_warn(f"{plan.layer!r}: the certified optimum of the paper's width {width} was not searched: the "
                           f"same-lambda solve used the comparison's {self.comparison_seconds:.0f} s")
            return {**out, "width": None, "resolved": f"skipped: the same-lambda solve used the comparison's "
                                                      f"{self.comparison_seconds:.0f} s"}
        found = self._searcher(problem, plan, None, solver="auto", init="auto").at_width(
            width, tolerance=self.width_tolerance, seconds=left)
        if found.resolved.startswith("time limit"):
            rank_zero_warn(f"{plan.layer!r}: the certified optimum of the paper's width {width} was not reached: "
                           f"{found.resolved}; the report compares with width {found.width}")
        return {**out, "lambda": found.lam, "ratio": found.ratio, "width": found.width, "mse": mse(stats, found.V),
                "objective": objective(stats, found.V, found.lam), "rel_gap": found.rel_gap,
                "resolved": found.resolved}

    def _log_candidate(self, layer: str, problem: LayerProblem, candidate: Candidate) -> None:
        """One line per certified candidate of ``problem``, and its numbers in TensorBoard
        (``search/<layer>/...``)."""
        if not self.is_global_zero:
            return
        accuracy = "" if candidate.val_accuracy is None else f", validation {100 * candidate.val_accuracy:.2f}%"
        if candidate.val_se is not None:
            choosing = self._choosing(len(self.datamodule.val_set))
            accuracy += f" (standard error {100 * candidate.val_se:.2f} against the network before the cut" + (
                f"; stopped after {candidate.val_images} images, a clear failure)"
                if candidate.val_images < choosing else ")")
        kept = "" if self.round_to == 1 else f" (kept {self._kept(problem, candidate.width)})"
        rank_zero_info(f"[{layer}] lambda {candidate.lam:.4g} ({candidate.ratio:.3g} lambda_max): width "
                       f"{candidate.width}{kept}{accuracy}, certified to a gap of {candidate.rel_gap:.1e} in "
                       f"{candidate.seconds:.1f} s")
        if self.logger is None:
            return
        experiment, step = self.logger.experiment, getattr(self, "_candidates_logged", 0)
        for key, value in candidate.row().items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                experiment.add_scalar(f"search/{layer}/{key}", value, step)
        self._candidates_logged = step + 1

    def refit_sweep(self, network: nn.Module, analysis: NetworkAnalysis, entries: list[dict[str, Any]],
                    passes_for: Callable[[Sequence[str]], DataPasses]) -> tuple[nn.Module, dict[str, Any]]:
        """The last refit sweep (``compression.final_refit``): every layer from the first consumer of
        a cut on, in forward order, refit by least squares to the original network's outputs from
        the inputs of the network as swept so far (training statistics; one pass each, both
        networks stopping at the layer). Returns the swept network if its validation accuracy is
        not lower than ``network``'s (else ``network``), and the sweep's record."""
        began = time.perf_counter()
        reference = reference_after(self.network, analysis, entries)
        swept = copy.deepcopy(network).eval()
        rows = []
        layers = layers_to_sweep(analysis, entries)
        for i, layer in enumerate(layers):
            train, seconds = passes_for([layer]).evaluate(swept, "train", [layer], targets=reference.network,
                                                          output_index=reference.output_index)
            stats = train.stats[layer]
            W = swept.get_submodule(layer).weight.detach().reshape(stats.D, -1).to(stats.G.dtype)
            V = debias(stats, W)
            set_weight(swept, layer, V)
            rows.append({"layer": layer, "mse_before": mse(stats, W), "mse_after": mse(stats, V),
                         "stats_seconds": round(seconds, 2)})
            rank_zero_info(f"[final refit {i + 1}/{len(layers)}] {layer}: MSE to the original's outputs "
                           f"{rows[-1]['mse_before']:.4g} -> {rows[-1]['mse_after']:.4g}")
        val = passes_for(())
        before = val.evaluate(network, "val")[0].accuracy
        after = val.evaluate(swept, "val")[0].accuracy if layers else before
        kept = after >= before
        rank_zero_info(f"final refit of {len(layers)} layers: validation accuracy {100 * before:.2f}% -> "
                       f"{100 * after:.2f}%, " + ("kept" if kept else "not kept: the network before the sweep stays"))
        record = {"layers": rows, "val_accuracy_before": before, "val_accuracy_after": after, "kept": kept,
                  "seconds": round(time.perf_counter() - began, 1)}
        return (swept if kept else network), record

    # --- 3. the result -------------------------------------------------------------------------
    def profile(self, network: nn.Module, passes: DataPasses, with_val: bool, layers: Sequence[str] = (),
                once: bool = False) -> dict[str, Any]:
        """Accuracy, loss and size of ``network``. Naming the ``layers`` compressed next makes their
        statistics part of the same pass over the training split (and of the same cache entry).
        ``once``: the last look at a network whose layers before the head are new (``DataPasses.evaluate``)."""
        train, _ = passes.evaluate(network, "train", layers, once=once)
        test, _ = passes.evaluate(network, "test", once=once)
        shape = self.input_shape
        out = {"train_loss": train.loss, "train_accuracy": train.accuracy, "test_accuracy": test.accuracy}
        if with_val:
            out["val_accuracy"] = passes.evaluate(network, "val", once=once)[0].accuracy
        return {**out, "parameters": count_parameters(network), "macs": count_macs(network, shape),
                "latency_ms": latency_ms(network, shape, batch_size=1), "widths": layer_widths(network)}

    def finish(self, network: nn.Module, report: dict[str, Any], passes: DataPasses, with_val: bool) -> dict[str, Any]:
        """Save the network, fine-tune it if asked, and complete the report."""
        report["after"] = self.profile(network, passes, with_val)
        saved = self.run_dir / "compressed.pt"
        # With fine-tuning, the network straight from surgery is kept beside the fine-tuned one.
        surgery = self.run_dir / "surgery.pt" if self.finetune.epochs > 0 else saved
        carried = carried_hparams(self.train_hparams)  # so that compressing either file again fine-tunes alike
        if self.is_global_zero:
            save_network(network, surgery, self.spec, layers=report["layers"], **carried)
        if self.finetune.epochs > 0:
            report["after_surgery"] = report["after"]
            report["network_after_surgery"] = str(surgery)
            tuned, details = finetune(surgery, self.spec, self.datamodule, self.finetune, self.train_hparams,
                                      self.run_dir, self.trainer.distributed(), teacher=self.network)
            report["finetune"] = details
            network = tuned.eval()
            report["after"] = self.profile(network, passes, with_val, once=True)
            if self.is_global_zero:
                save_network(network, saved, self.spec, layers=report["layers"], finetune=details, **carried)
        report["network"] = str(saved)
        report["spec"] = self.spec.to_dict()
        return report

    def export_files(self, network: nn.Module, original: nn.Module) -> dict[str, Any]:
        """``compressed.<ext>`` and ``original.<ext>`` for every format of ``export`` in the run's
        folder, each checked against PyTorch on a batch of validation images (``models.export``;
        a difference above 1e-4 relative stops the run), and the batch-1 and batch-64 CPU latency
        of the original and compressed networks in ONNX Runtime and in PyTorch, measured in turns."""
        images = torch.stack([self.datamodule.val_set[i][0] for i in range(min(64, len(self.datamodule.val_set)))])
        return export_checked_and_timed({"original": original, "compressed": network}, self.run_dir,
                                        self.input_shape, images, self.export)

    # --- the whole job -------------------------------------------------------------------------
    def run(self, layers: list[str], lambdas: Optional[list[float]] = None,
            lambda_ratios: Optional[list[float]] = None, target: Optional[Target] = None,
            path: Optional[list[float]] = None, path_ratios: Optional[list[float]] = None) -> dict[str, Any]:
        """Compress ``layers`` in order; returns the report (see the module doc)."""
        target = target or Target()
        # traced once: surgery changes widths, not which modules read a group, so the consumers'
        # names hold for every step of the run
        analysis = analyse_network(self.network.eval())
        plans = self.plan(layers, lambdas, lambda_ratios, target, analysis)
        if path is not None and path_ratios is not None:
            raise ValueError("give the path as --path (lambdas) or --path_ratios (fractions of lambda_max), not both")
        for lam in path or []:
            check_lambda(lam)
        for ratio in path_ratios or []:
            check_ratio(ratio, "path ratio")
        for fmt in self.export:
            if fmt not in EXPORTERS:
                raise ValueError(f"export format {fmt!r}: choose from {', '.join(EXPORTERS)}")
        cache.counts.reset()
        allocate = plans[0].how == "accuracy" and target.share == "macs" and len(plans) > 1
        if allocate and (path or path_ratios or self.baselines):
            raise ValueError("a regularisation path and the baselines are per layer: run them with "
                             "--target.share cumulative or one layer at a time")
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        network = self.network.eval()
        if self.is_global_zero:
            rank_zero_info(describe_plan(analysis, plans, target, allocate, self.final_refit))
        heads: dict[str, DataPasses] = {}

        def passes_for(modules: Sequence[str]) -> DataPasses:
            """The passes of the layers' head; layers with the same head share stored inputs."""
            head = head_of(network, modules) if modules else ""
            if head not in heads:
                heads[head] = DataPasses(self.datamodule, head, self.trainer, self.cache_dir, self.run_dir,
                                         batch_size=self.datamodule.hparams.batch_size, conv_sampling=self.conv_sampling,
                                         train_limit=self.train_limit, cache_max_bytes=self.cache_max_bytes)
            return heads[head]

        def consumers(plan: LayerPlan) -> list[str]:
            return [c.name for c in analysis.group_of(plan.module).consumers]

        with_val = any(p.how == "accuracy" for p in plans)
        first = passes_for(consumers(plans[0]))
        report: dict[str, Any] = {"before": self.profile(network, first, with_val, consumers(plans[0])), "layers": []}
        if allocate:
            network, report["layers"], report["allocation"] = self.allocate(network, plans, passes_for,
                                                                            report["before"], analysis)
        else:
            targets = ReferenceOutputs(self.network) if target.refit_to == "original" else None
            held: Optional[Tensor] = None  # which validation images the original gets right
            if self.held_out:
                if self.trainer.data_parallel().world_size > 1:
                    raise ValueError("target.held_out needs one process (its images are the last of the validation "
                                     "split): run without DDP, or set held_out 0")
                held = passes_for(()).correct(network, "val")
                report["before"]["val_accuracy_choosing"] = \
                    float(held[:self._choosing(len(held))].float().mean())
            before: list[nn.Module] = []  # the network before each group's cut, to give cuts back
            for plan in plans:
                if held is not None:
                    before.append(network)
                network, entry = self.compress_layer(network, plan, passes_for(consumers(plan)), report["before"],
                                                     path, path_ratios, targets)
                report["layers"].append(entry)
            if held is not None:
                network, report["held_out"] = self.check_held_out(network, before, report["layers"],
                                                                  target.max_accuracy_drop, passes_for(()), held)
        if self.final_refit:
            network, report["final_refit"] = self.refit_sweep(network, analysis, report["layers"], passes_for)
        report["paths"] = {e["layer"]: e.pop("path") for e in report["layers"] if "path" in e}
        report["baselines"] = {e["layer"]: e.pop("baselines") for e in report["layers"] if "baselines" in e}
        report = self.finish(network, report, passes_for(consumers(plans[-1])), with_val)
        if self.export and self.is_global_zero:
            report["export"] = self.export_files(network, self.network)
        report["cache"] = {"dir": None if self.cache_dir is None else str(self.cache_dir),
                           "max_bytes": self.cache_max_bytes, **cache.counts.as_dict()}
        seconds: dict[str, float] = {}
        for passes in heads.values():
            for split, value in passes.seconds.items():
                seconds[split] = round(seconds.get(split, 0.0) + value, 1)
        report["passes_seconds"] = seconds
        return report

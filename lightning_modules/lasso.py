"""Compressing one Linear layer: the multi-task lasso as a LightningModule.

The module owns V (D, K), initialised from the trained weight W (or randomly, as the
paper did), and solves

    min_V  MSE(V x + b, y) + lam * sum_c ||V[:, group c]||_F        (b fixed)

(groups of ``stats.group`` consecutive columns: one column, a neuron, for a Linear layer;
one input channel for a convolution) on the layer's sufficient statistics
(``grouplasso.LassoStats``), so every step costs
the same whatever the number of samples. The solver (``grouplasso.solvers``) is exposed
to Lightning as the module's optimizer: each ``training_step`` calls ``optimizer.step()``,
which takes one step of that solver (for ``fista`` and ``paper_adam`` one proximal-gradient
step: a gradient step on the MSE, then the vectorised group soft-threshold; for the
working-set solver one outer iteration: certify, choose the working set, solve it by
many inner proximal-gradient steps). Lightning counts it as a training step, and the
solver's state (momentum, step size, working set) travels in Lightning's checkpoints, so
an interrupted solve resumes exactly. Convergence is judged by
``callbacks.convergence.Convergence`` on the relative duality gap.
"""
from __future__ import annotations

import math
import time
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from grouplasso import SOLVERS, DualityGap, LassoStats, Solver

SolverName = Literal[tuple(SOLVERS)]  # type: ignore[valid-type]  # the names configs may give


class SolverOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` face for a ``grouplasso`` solver: ``step()`` takes one
    solver step and writes the iterate into the parameter V; ``state_dict()`` is the
    solver's, so Lightning checkpoints and restores it."""

    def __init__(self, V: nn.Parameter, solver: Solver) -> None:
        super().__init__([V], {})
        self.V = V
        self.solver = solver

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.solver.step()
        self.V.copy_(self.solver.V)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"solver": self.solver.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.solver.load_state_dict(state_dict["solver"])
        with torch.no_grad():
            self.V.copy_(self.solver.V)


class StepCounter(DataLoader):
    """The solve's "data": one counter per step, every batch the same to the solver (the data are
    the statistics). So it resumes from any point of an epoch: its state is empty. Saying so
    (Lightning's ``state_dict``/``load_state_dict`` protocol) answers the warning Lightning gives
    when a run resumes from a checkpoint taken mid-epoch with a loader it cannot restore."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: every batch is the same to the solver."""


class LassoCompression(pl.LightningModule):
    """Multi-task lasso on one layer's statistics (see module doc).

    Args:
        solver: ``auto`` (the fastest, ``grouplasso.WorkingSet``: working sets solved by
            accelerated proximal gradient), ``working_set`` (the same), ``fista``
            (accelerated proximal gradient on all columns, step 1/L, restarts) or
            ``paper_adam`` (the paper's procedure: Adam with lr = ``lr``, then the
            threshold ``lr * lam``).
        init: the starting V: ``trained`` (the layer's trained weight W), ``random`` (the
            paper's procedure), ``zero``, or ``auto``: the start each solver is fastest from:
            zero for the working-set solver (it grows its working sets from the dual
            certificate; started from the dense W its first working set is every column:
            49 s instead of 2.8 s on AlexNet's last layer), W for fista, random for paper_adam.
        lr: step size mu of ``paper_adam`` (the paper used 0.07 for AlexNet, 0.03 for VGG-19).
        log_every: log objective, MSE, group norm, active neurons, relative duality gap
            and step size every this many steps (default: the solver's ``certify_every``).
        steps_per_epoch: Lightning steps per "epoch" (only changes the progress bar).
    Call ``attach(stats, lam, W, layer)`` before fitting.
    """

    def __init__(
        self,
        solver: SolverName = "auto",
        init: Literal["auto", "trained", "random", "zero"] = "auto",
        lr: float = 0.07,
        log_every: Optional[int] = None,
        steps_per_epoch: int = 100,
    ) -> None:
        super().__init__()
        if lr <= 0 or (log_every is not None and log_every < 1) or steps_per_epoch < 1:
            raise ValueError("lr must be > 0, log_every (or null) and steps_per_epoch >= 1")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.stats: Optional[LassoStats] = None

    def attach(self, stats: LassoStats, lam: float, W: Tensor, layer: str = "layer",
               start: Optional[Tensor] = None) -> "LassoCompression":
        """Set the problem: statistics of the layer, the penalty ``lam`` > 0 (checked by the
        solver), the trained weight ``W`` (D, K) (the starting point when ``init='trained'``)
        and a name for logs. ``start`` (D, K), a warm start such as the previous solution
        along a path, overrides ``init``."""
        if tuple(W.shape) != (stats.D, stats.K):
            raise ValueError(f"W has shape {tuple(W.shape)} but the statistics are for D={stats.D}, K={stats.K}")
        self.stats, self.lam, self.layer = stats, float(lam), layer
        init = self.hparams.init
        if init == "auto":
            init = {"paper_adam": "random", "fista": "trained"}.get(self.hparams.solver, "zero")
        if start is not None:
            V0 = start.detach().to(torch.float64).clone()
        elif init == "trained":
            V0 = W.detach().to(torch.float64).clone()
        elif init == "zero":
            V0 = torch.zeros(stats.D, stats.K, dtype=torch.float64)
        else:
            # nn.Linear's default scale, drawn from the seeded global generator.
            bound = 1.0 / math.sqrt(stats.K)
            V0 = (torch.rand(stats.D, stats.K, dtype=torch.float64) * 2 - 1) * bound
        self.V = nn.Parameter(V0.cpu(), requires_grad=False)
        return self

    # --- Lightning hooks -------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Refuse to fit before ``attach`` has set the problem."""
        if self.stats is None:
            raise RuntimeError("call LassoCompression.attach(stats, lam, W) before fitting")

    def configure_optimizers(self) -> SolverOptimizer:
        """The solver, on the module's device, wrapped as the optimizer Lightning steps and checkpoints."""
        self.stats = self.stats.to(self.device)
        options = {"lr": self.hparams.lr} if self.hparams.solver == "paper_adam" else {}
        solver = SOLVERS[self.hparams.solver](self.stats, self.lam, self.V.detach().clone(), **options)
        # An objective far above both the start and V = 0 can only come from a step size too large.
        self._divergence_level = 10.0 * max(solver.metrics()["objective"], self.stats.s / self.stats.D)
        return SolverOptimizer(self.V, solver)

    def train_dataloader(self) -> DataLoader:
        """Step counters only: the data are the statistics."""
        return StepCounter(torch.arange(self.hparams.steps_per_epoch), batch_size=1)

    @property
    def log_every(self) -> int:
        return self.hparams.log_every or self.solver.certify_every

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        """One solver step; every ``log_every`` steps, check for divergence and log the metrics.
        Under a time limit (the Trainer's ``max_time``) the solver gets its deadline, so that a
        long step ends with the limit instead of after it."""
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining("train") if timer is not None else None
        self.solver.deadline = None if remaining is None else time.monotonic() + remaining
        self.optimizers().step()  # one solver step: gradient step on the MSE, group soft-threshold
        if self.global_step % self.log_every:
            return
        metrics = self.solver.metrics()
        objective = metrics["objective"]
        if not all(math.isfinite(v) for k, v in metrics.items() if k != "step_size"):
            raise FloatingPointError(
                f"the objective became {objective} at step {self.global_step} of layer {self.layer!r} "
                f"(lambda={self.lam}): lower the step size (model.lr) or check the statistics for NaNs"
            )
        if objective > self._divergence_level:
            raise FloatingPointError(
                f"the objective is diverging at step {self.global_step} of layer {self.layer!r} (lambda={self.lam}): "
                f"{objective:.3e}, more than 10 times its start; lower the step size (model.lr, now "
                f"{self.hparams.lr}) or use solver: auto"
            )
        metrics["rel_gap"] = self.certificate().rel_gap
        self.log_dict({f"lasso/{k}": float(v) for k, v in metrics.items()}, on_step=True, on_epoch=False)
        self.log("gap", metrics["rel_gap"], prog_bar=True, on_step=True, on_epoch=False, logger=False)
        self.log("active", metrics["active"], prog_bar=True, on_step=True, on_epoch=False, logger=False)

    # --- results ---------------------------------------------------------------------
    @property
    def solver(self) -> Solver:
        return self.optimizers(use_pl_optimizer=False).solver

    def certificate(self) -> DualityGap:
        """The duality gap of the current V (primal, dual, gap, rel_gap), cached per iterate."""
        return self.solver.certificate()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lasso_problem"] = self._problem()
        # V is the solver's iterate, saved with the solver's state: not a second time (D x K
        # float64, 134 MB for the penultimate layer of AlexNet)
        checkpoint.get("state_dict", {}).pop("V", None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is not None and "V" not in state:  # the strict load wants it; the solver's state restores it after
            state["V"] = checkpoint["optimizer_states"][0]["solver"]["V"]
        saved = checkpoint.get("lasso_problem", {})
        mine = self._problem()
        if saved and {"group": 1, **saved} != mine:  # checkpoints from before groups: group 1
            raise ValueError(f"the checkpoint was written for {saved}, not this problem {mine}: resume the matching run")

    def _problem(self) -> dict[str, Any]:
        """What identifies the problem a checkpoint was written for."""
        return {"lam": self.lam, "layer": self.layer, "D": self.stats.D, "K": self.stats.K, "group": self.stats.group}

"""Stopping a compression when it is solved, instead of by hand."""
from __future__ import annotations

import math
import time
from typing import Any, Literal, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info


class Convergence(pl.Callback):
    """Stop ``LassoCompression`` when the solution is certified, and say why it stopped.

    ``rule='duality_gap'`` (default): stop when the relative duality gap
    ``(F(V) - dual) / F(V)`` is at most ``tol``: a certificate that F(V) is within ``tol``
    (relatively) of the optimum. ``rule='relative_change'``: the paper's rule, stop when
    both the MSE and the penalty changed by less than ``tol`` (relatively) since the
    previous check (the paper checked every 1000 iterations with tol 1e-7); it certifies
    nothing and often stops early on slow solvers or never on noisy ones.
    The Trainer's ``max_steps`` is the budget; ``check_every`` steps between checks
    (default: the solver's ``certify_every``). After fitting, ``reason``, ``steps``,
    ``seconds`` and ``rel_gap`` describe the stop. A ``verbose`` solve that runs longer than
    ``report_seconds`` says where it is, at a check, at most that often (solves have no progress bar).
    """

    def __init__(self, tol: float = 1e-4, rule: Literal["duality_gap", "relative_change"] = "duality_gap",
                 check_every: Optional[int] = None, verbose: bool = True, report_seconds: float = 30.0) -> None:
        if not tol > 0 or (check_every is not None and check_every < 1):
            raise ValueError(f"tol must be > 0 and check_every >= 1 or null (got tol={tol}, check_every={check_every})")
        self.tol, self.rule, self.check_every, self.verbose = tol, rule, check_every, verbose
        self.reason = "not started"
        self.converged = False
        self.stopped_by_time = False
        self.rel_gap = math.nan
        self.steps = 0
        self.seconds = 0.0  # solver time, summed over interrupted and resumed parts of the run
        self._previous: Optional[tuple[float, float]] = None
        self._start = 0.0
        self.report_seconds = report_seconds
        self._reported = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._start = self._reported = time.perf_counter()
        self.converged, self.stopped_by_time, self.reason = False, False, "running"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.check_every or pl_module.solver.certify_every
        if trainer.global_step % every:
            return
        if self.rule == "duality_gap":
            self.rel_gap = pl_module.certificate().rel_gap
            done = self.rel_gap <= self.tol
            why = f"relative duality gap {self.rel_gap:.2e} <= tol {self.tol:.0e}"
        else:
            metrics = pl_module.solver.metrics()
            current = (metrics["mse"], metrics["group_norm"])
            done = self._previous is not None and all(
                abs(c - p) <= self.tol * max(abs(p), 1e-300) for c, p in zip(current, self._previous)
            )
            self._previous = current
            why = f"MSE and penalty changed by less than {self.tol:.0e} (relative) in {every} steps"
        if done:
            self.converged, self.reason = True, f"converged: {why}"
            trainer.should_stop = True
        elif self.verbose and time.perf_counter() - self._reported >= self.report_seconds:
            self._reported = time.perf_counter()
            gap = (f"relative duality gap {self.rel_gap:.2e}" if self.rule == "duality_gap"
                   else f"MSE {self._previous[0]:.4g}, penalty {self._previous[1]:.4g}")
            budget = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
            rank_zero_info(f"[{pl_module.layer}, lambda={pl_module.lam:g}] step {trainer.global_step}{budget}, {gap}, "
                           f"{self.seconds + self._reported - self._start:.0f} s")

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.steps = trainer.global_step
        self.seconds += time.perf_counter() - self._start
        self.rel_gap = pl_module.certificate().rel_gap
        if not self.converged and trainer.max_steps > 0 and self.steps >= trainer.max_steps:
            self.reason = (
                f"stopped by the budget (trainer.max_steps={trainer.max_steps}) with relative duality gap "
                f"{self.rel_gap:.2e} > tol {self.tol:.0e}: raise max_steps or tol"
            )
        elif not self.converged:  # Lightning's max_time (a search's time limit)
            self.stopped_by_time = True
            self.reason = (f"stopped by the time limit after {self.steps} steps, uncertified: relative duality gap "
                           f"{self.rel_gap:.2e} > tol {self.tol:.0e}")
        if self.verbose:
            rank_zero_info(f"[{pl_module.layer}, lambda={pl_module.lam:g}] {self.reason} after {self.steps} steps "
                           f"({self.seconds:.1f} s)")

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self._previous, "seconds": self.seconds + time.perf_counter() - self._start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._previous = state_dict.get("previous")
        self.seconds = float(state_dict.get("seconds", 0.0))

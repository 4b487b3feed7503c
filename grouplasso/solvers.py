"""Solvers of min_V F(V) = MSE(V) + lam * sum_k ||V[:, k]||_2 on sufficient statistics.

Every solver advances by ``step()`` (the unit a Lightning ``training_step`` takes), keeps
its iterate in ``V`` (D, K, float64, on the statistics' device) and its whole state in
``state_dict()``, so a run interrupted and resumed from a checkpoint takes exactly the
steps an uninterrupted run takes.

- ``fista``: accelerated proximal gradient (step 1/L, gradient-based adaptive restart).
- ``paper_adam``: the paper's procedure: Adam (lr = mu) on the MSE, then the group
  soft-threshold with threshold mu * lam. No convergence guarantee; kept to compare.
- ``working_set`` (``auto``): see ``grouplasso.working_set``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from grouplasso.problem import DualityGap, check_lambda, duality_gap, gradient, group_norm, lipschitz, mse
from grouplasso.prox import active_columns, group_soft_threshold
from grouplasso.stats import LassoStats


class Solver(ABC):
    """Base class: holds the problem (``stats``, ``lam``) and the iterate ``V``."""

    #: steps between duality-gap certificates worth their cost (one costs about a step of FISTA)
    certify_every = 10

    def __init__(self, stats: LassoStats, lam: float, V0: Tensor) -> None:
        if tuple(V0.shape) != (stats.D, stats.K):
            raise ValueError(f"V0 has shape {tuple(V0.shape)}, expected (D, K) = ({stats.D}, {stats.K})")
        self.stats, self.lam = stats, check_lambda(lam)
        self.V = V0.detach().to(stats.G).clone()
        self.iterations = 0
        self._certificate: tuple[int, DualityGap] | None = None

    @abstractmethod
    def step(self) -> None:
        """Advance the iterate ``V``."""

    @property
    def step_size(self) -> float:
        return math.nan

    def certificate(self) -> DualityGap:
        """The duality gap of the current ``V`` (computed once per iterate: D K^2 multiply-adds)."""
        if self._certificate is None or self._certificate[0] != self.iterations:
            self._certificate = (self.iterations, duality_gap(self.stats, self.V, self.lam))
        return self._certificate[1]

    def metrics(self) -> dict[str, float]:
        """Objective, MSE, penalty sum_k ||v_k|| (without lam), active columns and step size of ``V``."""
        m, g = mse(self.stats, self.V), group_norm(self.V)
        return {"objective": m + self.lam * g, "mse": m, "group_norm": g,
                "active": float(len(active_columns(self.V))), "step_size": self.step_size}

    # Checkpointing: tensors and numbers, nothing else (torch.load(weights_only=True) reads it).
    def state_dict(self) -> dict[str, Any]:
        return {"V": self.V.cpu(), "iterations": self.iterations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.V = state["V"].to(self.stats.G)
        self.iterations = int(state["iterations"])
        self._certificate = None


class FISTA(Solver):
    """Accelerated proximal gradient with step 1/L and adaptive restart (O'Donoghue & Candes 2015).

        V+ = prox_{lam/L}(Z - grad(Z) / L),   t+ = (1 + sqrt(1 + 4 t^2)) / 2,
        Z+ = V+ + (t - 1)/t+ (V+ - V);   restart (t = 1, Z = V+) when <Z - V+, V+ - V> > 0.
    One ``step`` is one gradient evaluation, D K^2 multiply-adds.
    """


    def __init__(self, stats: LassoStats, lam: float, V0: Tensor) -> None:
        super().__init__(stats, lam, V0)
        self.L = lipschitz(stats)
        self.Z = self.V.clone()
        self.t = 1.0

    @property
    def step_size(self) -> float:
        return 1.0 / self.L if self.L > 0 else math.inf

    def step(self) -> None:
        if self.L == 0:  # all inputs are zero: only V = 0 is optimal
            self.V = torch.zeros_like(self.V)
            self.iterations += 1
            return
        V_new = group_soft_threshold(self.Z - gradient(self.stats, self.Z) / self.L, self.lam / self.L)
        if torch.sum((self.Z - V_new) * (V_new - self.V)) > 0:
            self.t, self.Z = 1.0, V_new.clone()
        else:
            t_new = (1.0 + math.sqrt(1.0 + 4.0 * self.t * self.t)) / 2.0
            self.Z = V_new + ((self.t - 1.0) / t_new) * (V_new - self.V)
            self.t = t_new
        self.V = V_new
        self.iterations += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "Z": self.Z.cpu(), "t": self.t, "L": self.L}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.Z, self.t, self.L = state["Z"].to(self.stats.G), float(state["t"]), float(state["L"])


class PaperAdam(Solver):
    """The paper's procedure: one Adam step (lr = ``lr``, i.e. mu) on the full-batch MSE
    gradient, then V <- group_soft_threshold(V, lr * lam)."""


    def __init__(self, stats: LassoStats, lam: float, V0: Tensor, lr: float = 0.07) -> None:
        super().__init__(stats, lam, V0)
        if not lr > 0:
            raise ValueError(f"the paper's step size mu (model.lr) must be positive, got {lr}")
        self.lr = float(lr)
        self._param = torch.nn.Parameter(self.V)
        self._adam = torch.optim.Adam([self._param], lr=self.lr)

    @property
    def step_size(self) -> float:
        return self.lr

    @torch.no_grad()
    def step(self) -> None:
        self._param.grad = gradient(self.stats, self._param.data)
        self._adam.step()
        self._param.data.copy_(group_soft_threshold(self._param.data, self.lr * self.lam))
        self.V = self._param.data
        self.iterations += 1

    def state_dict(self) -> dict[str, Any]:
        adam = self._adam.state_dict()["state"].get(0, {})
        return {**super().state_dict(), "adam": {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in adam.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._param = torch.nn.Parameter(self.V)
        self._adam = torch.optim.Adam([self._param], lr=self.lr)
        if state["adam"]:
            moved = {k: (v.to(self.stats.G) if torch.is_tensor(v) and v.ndim else v) for k, v in state["adam"].items()}
            self._adam.load_state_dict({"state": {0: moved}, "param_groups": self._adam.state_dict()["param_groups"]})
        self.V = self._param.data

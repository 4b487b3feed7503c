"""The multi-task (group) lasso: the one place where its math lives.

Everything that thresholds columns, accumulates statistics, evaluates the objective,
certifies a solution or solves the problem calls into this package:
``prox`` (the group soft-threshold, active columns), ``stats`` (G, C, s), ``problem``
(MSE, F, gradient, lambda_max, duality gap, debiasing), ``solvers`` (FISTA, the paper's
Adam procedure) and ``working_set`` (the default solver).
"""
from grouplasso.problem import (
    DualityGap, check_lambda, debias, duality_gap, gradient, group_norm, lambda_max, lipschitz, mse, objective, residual_energy,
)
from grouplasso.prox import active_columns, group_norms, group_soft_threshold
from grouplasso.solvers import FISTA, PaperAdam, Solver
from grouplasso.stats import LassoStats, StatsAccumulator
from grouplasso.working_set import WorkingSet

# Solver names as configs spell them (the one list: ``LassoCompression``'s choices derive from
# it); ``auto`` is the fastest (see benchmarks/solver_speed.py).
SOLVERS: dict[str, type[Solver]] = {
    "auto": WorkingSet,
    "working_set": WorkingSet,
    "fista": FISTA,
    "paper_adam": PaperAdam,
}

__all__ = [
    "SOLVERS", "DualityGap", "active_columns", "check_lambda", "FISTA", "LassoStats", "PaperAdam", "Solver", "StatsAccumulator", "WorkingSet",
    "debias", "duality_gap", "gradient", "group_norm", "group_norms", "group_soft_threshold", "lambda_max", "lipschitz",
    "mse",
    "objective", "residual_energy",
]

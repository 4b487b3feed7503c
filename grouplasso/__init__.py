"""The multi-task (group) lasso: the one place where its math lives.

    min_V  MSE(V) + lam * sum_c ||V[:, group c]||_F,   group c = columns c*g .. (c+1)*g - 1,

with g = ``LassoStats.group``: 1 for a Linear layer (a group is a column, one neuron), kh*kw
for a convolution (a group is one input channel). Everything that thresholds groups,
accumulates statistics, evaluates the objective, certifies a solution or solves the problem
calls into this package: ``prox`` (the group soft-threshold, group norms, active groups and
their columns), ``stats`` (G, C, s and g), ``problem`` (MSE, F, gradient, lambda_max, duality
gap, debiasing), ``solvers`` (FISTA, block coordinate descent over the groups, the paper's
Adam procedure), ``working_set`` (the default solver) and ``folding`` (groups of one repeated
input folded to one column each) and ``stacking`` (several layers reading the same neurons as
one problem).
"""
from grouplasso.problem import (
    DualityGap, check_lambda, debias, duality_gap, gradient, gram_product, group_norm, lambda_max, lipschitz, mse, objective, residual_energy,
    round_up_support, rounded_width,
)
from grouplasso.folding import Folding, fold_repeated_groups
from grouplasso.prox import active_columns, active_groups, group_columns, group_norms, group_soft_threshold, keep_groups
from grouplasso.solvers import BCD, FISTA, PaperAdam, Solver
from grouplasso.stacking import Stacking, stack_problems
from grouplasso.stats import LassoStats, StatsAccumulator
from grouplasso.working_set import WorkingSet

# Solver names as configs spell them (the one list: ``LassoCompression``'s choices derive from
# it); ``auto`` is the fastest (see benchmarks/solver_speed.py).
SOLVERS: dict[str, type[Solver]] = {
    "auto": WorkingSet,
    "working_set": WorkingSet,
    "fista": FISTA,
    "bcd": BCD,
    "paper_adam": PaperAdam,
}

__all__ = [
    "SOLVERS", "BCD", "Stacking", "stack_problems", "DualityGap", "Folding", "active_columns", "active_groups", "keep_groups", "check_lambda", "FISTA", "LassoStats", "PaperAdam", "Solver", "StatsAccumulator", "WorkingSet",
    "debias", "duality_gap", "fold_repeated_groups", "gradient", "gram_product", "group_columns", "group_norm", "group_norms", "group_soft_threshold", "lambda_max", "lipschitz",
    "mse",
    "objective", "residual_energy", "round_up_support", "rounded_width",
]

"""The multi-task (group) lasso: the one place where its math lives.

Everything that thresholds columns, evaluates the objective, certifies a solution
or solves the problem calls into this package.
"""
from grouplasso.prox import group_norms, group_soft_threshold

__all__ = ["group_norms", "group_soft_threshold"]

"""Seeded random instances of ``min sum_k ||v_k|| s.t. V X = Y`` for Figs. 3-5.

Every trial has its own generator, seeded by (seed, figure, setting, trial), so a trial
is the same whichever subset of trials or settings is run, and in whichever order: the
benchmark and the tests re-run exactly the trials of the figures.
"""
from __future__ import annotations

from typing import Literal

import numpy as np


def trial_rng(seed: int, figure: int, setting: int, trial: int) -> np.random.Generator:
    """The generator of one trial (``numpy.random.default_rng`` on the 4-tuple)."""
    return np.random.default_rng([seed, figure, setting, trial])


def gaussian_problem(rng: np.random.Generator, K: int, N: int, D: int) -> tuple[np.ndarray, np.ndarray]:
    """Figs. 3 and 5: X (K, N) and Y (D, N) with i.i.d. standard normal entries."""
    X = rng.standard_normal((K, N))
    Y = rng.standard_normal((D, N))
    return X, Y


def low_rank_problem(
    rng: np.random.Generator, K: int, N: int, D: int, r: int,
    targets: Literal["paper", "published"] = "paper",
) -> tuple[np.ndarray, np.ndarray]:
    """Fig. 4: rank-r features and targets that are linear in them.

    X = U Z with U (K, r) and Z (r, N) standard normal, so the N columns of X lie in the
    random r-dimensional subspace span(U) of R^K (rank X = r). Y = A X with A standard
    normal of shape (D, K) (``targets="paper"``: the D = 10 the paper states) or (r, K)
    (``"published"``: what the published script does, so Y has r rows and D is unused).
    """
    if not 1 <= r <= min(K, N):
        raise ValueError(f"rank r must be in [1, min(K, N)] = [1, {min(K, N)}], got {r}")
    U = rng.standard_normal((K, r))
    Z = rng.standard_normal((r, N))
    X = U @ Z
    rows = D if targets == "paper" else r
    A = rng.standard_normal((rows, K))
    return X, A @ X

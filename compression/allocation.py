"""Sharing one accuracy budget between many layers by what their candidates buy.

Every group of neurons g has certified candidates, each a width with the multiply-adds it
saves, s_g(w), and the validation accuracy the network loses when only that group is cut to
it, measured in images: a_g(w) (the count of validation images it gets wrong beyond the
original's, at least 0). Keeping every group at full width costs and saves nothing. The
choice of one candidate per group that saves the most multiply-adds within a budget of B
images,

    maximise  sum_g s_g(w_g)   subject to  sum_g a_g(w_g) <= B,

is a multiple-choice knapsack; its costs are whole numbers of images, so dynamic
programming over the budget solves it exactly (``choose``) in O(groups x candidates x B).
Losses of different groups do not add exactly (two cuts interact), which is why the chosen
set is re-validated on the whole network and the budget corrected until it holds
(``compression.pipeline``, the next budget by ``next_budget``).

When the cuts interact far more than they add (MobileNetV2: 80 candidates that each lose a
few images alone lost 44 points together, and even the free ones 17), no budget of the sum
finds a set that holds. Then the chosen cuts are ranked by what they buy
(``by_efficiency``: free ones first, then the most multiply-adds per image) and the longest
prefix of that ranking that holds on the whole network is found by bisection
(``longest_prefix``: about log2(groups) re-validations, the loss taken as growing with the
prefix).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class Option:
    """One candidate of one group: ``cost`` in validation images lost (>= 0), ``saving`` in
    multiply-adds, and an ``index`` the caller uses to find it again."""

    cost: int
    saving: float
    index: int


def choose(options: Sequence[Sequence[Option]], budget: int) -> tuple[list[int | None], float, int]:
    """The best choice of at most one option per group (``None``: the group keeps its width)
    with total cost at most ``budget``: (chosen ``index`` per group, total saving, total cost).
    Exact (dynamic programming over the integer budget); ties keep fewer images lost."""
    if budget < 0:
        raise ValueError(f"the budget must be >= 0 images, got {budget}")
    best = [0.0] * (budget + 1)  # best[b]: the largest saving of the groups so far within cost b
    picks: list[list[int | None]] = []
    for group in options:
        new, pick = list(best), [None] * (budget + 1)
        for b in range(budget + 1):
            for k, option in enumerate(group):
                if option.cost <= b and option.saving > 0 and best[b - option.cost] + option.saving > new[b]:
                    new[b], pick[b] = best[b - option.cost] + option.saving, k
        best = new
        picks.append(pick)
    # walk back from the cheapest budget that reaches the best saving
    b = min(range(budget + 1), key=lambda c: (-best[c], c))
    total, cost = best[b], 0
    chosen: list[int | None] = [None] * len(options)
    for g in range(len(options) - 1, -1, -1):
        k = picks[g][b]
        if k is not None:
            option = options[g][k]
            chosen[g] = option.index
            b -= option.cost
            cost += option.cost
    return chosen, total, cost


def next_budget(level: int, budget: int, lost: float, predicted: int) -> Optional[int]:
    """The knapsack budget of the next try, after a try at ``level`` whose choice was predicted
    to lose ``predicted`` images and lost ``lost`` on the whole network, for a real budget of
    ``budget`` images.

    Too much lost: shrink in proportion, and below ``predicted`` too, so that the choice must
    change (when the cuts interact more than they add, a proportional step can keep choosing the
    same set); None when the choice was already of free candidates only (nothing smaller is
    left). Within the budget: grow in proportion (the sum over-estimated the loss), at most to
    four times the budget."""
    if lost > budget:
        if predicted <= 0:
            return None
        return max(0, min(int(math.floor(level * budget / lost)), predicted - 1))
    return min(4 * budget, int(math.ceil(level * budget / max(lost, 1.0))))


def by_efficiency(options: Sequence[Sequence[Option]], chosen: Sequence[int | None]) -> list[int]:
    """The groups with a chosen option (``chosen[g]``: an ``Option.index`` or None), best buy
    first: free options (cost 0) by saving, then by saving per image lost."""
    picked = []
    for g, index in enumerate(chosen):
        if index is None:
            continue
        option = next(o for o in options[g] if o.index == index)
        picked.append((option.cost > 0, -option.saving / max(option.cost, 1), g))
    return [g for *_, g in sorted(picked)]


def longest_prefix(count: int, holds: Callable[[int], bool]) -> int:
    """The largest m in [0, count] with ``holds(m)`` (the first m ranked cuts keep the budget), by
    bisection, taking ``holds`` as true up to some m and false after it; ``holds(0)`` (no cut) is
    taken as true and never asked. Calls ``holds`` about log2(count + 1) times."""
    low, high = 0, count  # holds(low) is known true; the answer is in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if holds(middle):
            low = middle
        else:
            high = middle - 1
    return low

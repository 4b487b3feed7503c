"""Choosing lambda from what the user wants: a width, or an accuracy floor.

Both searches walk the regularisation path from lambda_max downward, halving lambda and
warm-starting every solve from the previous (sparser) solution, until they pass the
target; then they bisect lambda (geometrically) between the last two points. Every
candidate is a certified solve (``CompressionPipeline.solve`` stops on the duality gap),
and every candidate is recorded.

- Width k: the bracket is found with steps that grow from the sparse end (lam_max / 2, / 8,
  / 128, ...), so that a width near the dense end costs a few solves, not a walk down by
  halves; then the bisection runs until the solution keeps exactly k neurons (or, with a
  tolerance, within it; with a time limit, the nearest so far, said in ``resolved``). The
  lasso path can jump over k (several columns enter at the same lambda, when inputs are
  tied); when the bracket has shrunk to a relative width of 1e-9 and still jumps, the
  solution just past the jump (more than k columns) keeps its k columns of largest norm, and
  the candidate says ``resolved: truncated``.
- Accuracy floor: the walk stops at the first lambda whose network meets the floor on
  the validation split; ``refine`` bisection steps then look for a narrower width that
  still meets it. The result is the narrowest of all candidates that meet the floor. The
  walk also stops at the first candidate that keeps every group: below it every solution
  keeps them all, so nothing narrower can meet the floor, and each solve is slower than the
  last (on ResNet-56 a coupled stage walked on for 20 halvings, 90 s a solve, at width 32
  of 32).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from grouplasso import active_groups, group_norms, keep_groups


@dataclass
class Candidate:
    """One certified solve of a search: its lambda, width and (for accuracy targets) the
    validation accuracy of the network that uses it."""

    lam: float
    ratio: float
    width: int
    rel_gap: float
    seconds: float
    val_accuracy: Optional[float] = None
    # against the network before the cut (``compression.passes.Verdict``): the standard error of
    # the accuracy difference, and the images judged (fewer than all: stopped as a clear failure)
    val_se: Optional[float] = None
    val_images: Optional[int] = None
    resolved: str = "solved"
    V: Tensor = field(default=None, repr=False)  # type: ignore[assignment]
    val_correct: Optional[Tensor] = field(default=None, repr=False)  # this process's images it gets right

    def row(self) -> dict:
        row = {"lambda": self.lam, "ratio": self.ratio, "width": self.width, "rel_gap": self.rel_gap,
               "seconds": round(self.seconds, 3), "resolved": self.resolved}
        if self.val_accuracy is not None:
            row["val_accuracy"] = self.val_accuracy
        if self.val_se is not None:
            row.update(val_se=self.val_se, val_images=self.val_images)
        return row


class LambdaSearch:
    """Searches one layer's lambda.

    Args:
        solve: ``solve(lam, V0, seconds) -> (V, rel_gap)``, a certified solve warm-started from V0,
            stopped after ``seconds`` (None: no limit; a solve stopped so has a gap above the
            tolerance, and the search does not count it as certified).
        lam_max: the layer's lambda_max (V = 0 from there up).
        evaluate: the verdict on the network with the layer's weight V (accuracy targets): a
            ``compression.passes.Verdict`` (its accuracy, standard error, images, per-image
            correctness).
        on_candidate: called with every candidate (logging).
        group: the problem's group size; widths count groups (neurons or channels).
        min_ratio: the path stops at ``min_ratio * lam_max``.
    """

    def __init__(self, solve: Callable[[float, Optional[Tensor], Optional[float]], tuple[Tensor, float]], lam_max: float,
                 evaluate: Optional[Callable[[Tensor], Any]] = None,
                 on_candidate: Optional[Callable[[Candidate], None]] = None, min_ratio: float = 1e-6,
                 group: int = 1) -> None:
        self._solve, self.lam_max, self._evaluate, self.group = solve, lam_max, evaluate, group
        self._on_candidate, self.min_ratio = on_candidate, min_ratio
        self.candidates: list[Candidate] = []
        self.deadline: Optional[float] = None  # time.perf_counter() after which a solve is stopped

    def candidate(self, lam: float, start: Optional[Candidate] = None) -> Candidate:
        began = time.perf_counter()
        seconds = None if self.deadline is None else max(1.0, self.deadline - began)
        V, rel_gap = self._solve(lam, None if start is None else start.V, seconds)
        found = Candidate(lam=lam, ratio=lam / self.lam_max, width=len(active_groups(V, self.group)), rel_gap=rel_gap,
                          seconds=time.perf_counter() - began, V=V)
        if seconds is not None and time.perf_counter() >= self.deadline:
            found.resolved = f"stopped by the time limit at a relative gap of {rel_gap:.1e} (not certified)"
        if self._evaluate is not None:
            verdict = self._evaluate(V)
            found.val_accuracy, found.val_se, found.val_images = verdict.accuracy, verdict.se, verdict.images
            found.val_correct = verdict.correct
        self.candidates.append(found)
        if self._on_candidate is not None:
            self._on_candidate(found)
        return found

    def walk(self, passed: Callable[[Candidate], bool]) -> tuple[Optional[Candidate], Optional[Candidate]]:
        """Halve lambda from lam_max / 2 until ``passed``; returns (last not passed, first passed).
        A candidate that keeps every group and does not pass ends the walk (None passed)."""
        previous: Optional[Candidate] = None
        lam = self.lam_max / 2
        while lam >= self.min_ratio * self.lam_max:
            current = self.candidate(lam, previous)
            if passed(current):
                return previous, current
            if current.width * self.group >= current.V.shape[-1]:
                break
            previous, lam = current, lam / 2
        return previous, None

    def until(self, done: Callable[[Candidate], bool], factor: float = 2.0) -> list[Candidate]:
        """Every candidate from lam_max / factor down by ``factor``, each warm-started from the
        previous one, until ``done`` (or ``min_ratio``): a group's menu of widths for a budget
        shared by what the candidates buy."""
        previous: Optional[Candidate] = None
        lam = self.lam_max / factor
        found: list[Candidate] = []
        while lam >= self.min_ratio * self.lam_max:
            previous = self.candidate(lam, previous)
            found.append(previous)
            if done(previous):
                break
            lam /= factor
        return found

    def at_width(self, k: int, tolerance: float = 0.0, seconds: Optional[float] = None) -> Candidate:
        """The certified solution with ``k`` nonzero groups, or within ``tolerance * k`` of it
        (see the module doc). The bracket is found from the sparse end with steps that grow
        (lam_max / 2, / 8, / 128, ...: a few solves even for k near the dense end), each
        warm-started from the previous, sparser solution, then bisected geometrically.
        ``seconds``: stop searching after that long, the solve under way included, and return
        the certified candidate nearest to k, its ``resolved`` saying so (None: no limit)."""
        began = time.perf_counter()
        self.deadline = None if seconds is None else began + seconds
        try:
            return self._bracket_width(k, tolerance, began, seconds)
        finally:
            self.deadline = None

    def _bracket_width(self, k: int, tolerance: float, began: float, seconds: Optional[float]) -> Candidate:
        close = lambda c: abs(c.width - k) <= tolerance * k  # noqa: E731
        out_of_time = lambda: seconds is not None and time.perf_counter() - began >= seconds  # noqa: E731
        above: Optional[Candidate] = None  # sparser than k
        below: Optional[Candidate] = None  # at least k groups
        step, lam = 2.0, self.lam_max / 2
        while lam >= self.min_ratio * self.lam_max:
            current = self.candidate(lam, above)
            if out_of_time():  # a solve stopped by the limit is not certified: never the answer itself
                return self._nearest(k, began, seconds)
            if current.width >= k or close(current):
                below = current
                break
            above = current
            step = step * step if step < 2 ** 16 else step
            lam = max(lam / step, self.min_ratio * self.lam_max) if lam > self.min_ratio * self.lam_max else lam / 2
        if below is None:
            widest = max((c.width for c in self.candidates), default=0)
            raise ValueError(f"no lambda down to {self.min_ratio:g} * lambda_max keeps {k} neurons (at most {widest}: "
                             "the other inputs are dead or redundant); choose a smaller width")
        while below.width != k and not close(below):
            hi_lam = self.lam_max if above is None else above.lam  # k is kept from the first point on
            if hi_lam / below.lam < 1 + 1e-9:
                V = keep_groups(below.V, torch.topk(group_norms(below.V, self.group), k).indices, self.group)
                return Candidate(lam=below.lam, ratio=below.ratio, width=k, rel_gap=math.nan, seconds=0.0,
                                 resolved=f"truncated from {below.width}", V=V)
            middle = self.candidate(math.sqrt(hi_lam * below.lam), above)
            if out_of_time():
                return self._nearest(k, began, seconds)
            if middle.width >= k or close(middle):
                below = middle
            else:
                above = middle
        return below

    def _nearest(self, k: int, began: float, seconds: float) -> Candidate:
        """The certified candidate nearest to width k, marked as the end of a search out of time."""
        certified = [c for c in self.candidates if c.resolved == "solved"] or self.candidates
        best = min(certified, key=lambda c: (abs(c.width - k), -c.width))
        stopped = len(self.candidates) - len([c for c in self.candidates if c.resolved == "solved"])
        best.resolved = (f"time limit: width {best.width} (asked {k}) after {len(self.candidates)} solves in "
                         f"{time.perf_counter() - began:.0f} s (limit {seconds:g} s"
                         + (f"; {stopped} solve stopped by it, uncertified, not used)" if stopped else ")"))
        return best

    def at_accuracy(self, floor: float, refine: int = 5, margin: float = 0.0) -> Optional[Candidate]:
        """The narrowest certified candidate whose validation accuracy is at least ``floor``,
        by ``margin`` standard errors of its difference from the network before the cut
        (``Candidate.val_se``; 0 where the evaluation gives none); None when none down to
        ``min_ratio`` is.

        Why a margin: the candidate kept is the narrowest that passes, so its measured accuracy
        is the luckier side of its noise, and layer after layer on the same validation images
        the luck adds up (ResNet-56, 30 groups: validation -0.70, test -1.16). A margin of one
        standard error accepts a cut only when its loss is below the allowance by more than its
        own measurement noise."""
        assert self._evaluate is not None, "an accuracy target needs an evaluation"
        meets = lambda c: c.val_accuracy - margin * (c.val_se or 0.0) >= floor  # noqa: E731
        above, below = self.walk(meets)
        if below is None:
            return None
        for _ in range(refine):
            if above is None or above.width + 1 >= below.width:
                break
            middle = self.candidate(math.sqrt(above.lam * below.lam), above)
            if meets(middle):
                below = middle
            else:
                above = middle
        return min((c for c in self.candidates if meets(c)), key=lambda c: (c.width, -c.val_accuracy))

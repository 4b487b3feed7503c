"""Sparsest optimal solutions (Fig. 5): the published exhaustive search against the fast one.

Both run on the same seeded trials as ``python -m experiments.sparsity --figure 5`` (trial t
of size K is ``trial_rng(seed, 5, K, t)``), alternately trial by trial so that load on a
shared machine affects both alike. Prints, per trial, both answers, times and cvxpy solves,
then the speed-up (total exhaustive time / total fast time) and how many answers agree.

    python -m benchmarks.enumeration_speed                  # K = 11, 5 trials
    python -m benchmarks.enumeration_speed --K 9 --trials 20 --compiled
    python -m benchmarks.enumeration_speed --K 10 --start 610 --trials 1   # a near-tie (below)

``--compiled`` also times the exhaustive search on compiled parametrised cvxpy problems,
to separate what the smaller search gains from what avoiding cvxpy's re-compilation gains.
The fast method's one-off compilation for a new problem shape is done before timing
(a warm-up trial, reported), as it is shared by all the trials of a figure.

Trial 610 of K = 10 is a near-tie: the exact optimum uses a fourth column with weight
1e-6, so the certified solution has 4 nonzero columns, but three columns reach the
optimum within the 1e-6 tolerance; both methods answer 3.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from experiments.random_problems import gaussian_problem, trial_rng
from experiments.sparsest import SparsestResult, sparsest_exhaustive, sparsest_fast


def timed(fn: Callable[[], SparsestResult]) -> tuple[SparsestResult, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--K", type=int, default=11)
    parser.add_argument("--N", type=int, default=3)
    parser.add_argument("--D", type=int, default=2)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--start", type=int, default=0, help="first trial index (trials start..start+trials-1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compiled", action="store_true", help="also time the exhaustive search on compiled problems")
    args = parser.parse_args(argv)

    def problem(t: int):
        return gaussian_problem(trial_rng(args.seed, 5, args.K, t), args.K, args.N, args.D)

    # Warm-up on a trial outside the timed range: compiles the fast method's problems.
    _, warm = timed(lambda: sparsest_fast(*problem(args.start + args.trials)))
    last = args.start + args.trials - 1
    print(f"K={args.K}, N={args.N}, D={args.D}, trials {args.start}..{last} (seed {args.seed}); "
          f"fast method's warm-up (cvxpy compilation): {warm * 1e3:.0f} ms")
    header = (f"{'trial':>5} {'exhaustive':>10} {'fast':>5} {'t_exh [s]':>10} {'t_fast [ms]':>11} "
              f"{'solves exh/fast':>16}")
    if args.compiled:
        header += f" {'t_exh_compiled [s]':>19}"
    print(header)
    totals = {"exhaustive": 0.0, "fast": 0.0, "compiled": 0.0}
    agree = 0
    for t in range(args.start, args.start + args.trials):
        X, Y = problem(t)
        exh, t_exh = timed(lambda: sparsest_exhaustive(X, Y))
        fast, t_fast = timed(lambda: sparsest_fast(X, Y))
        totals["exhaustive"] += t_exh
        totals["fast"] += t_fast
        agree += exh.sparsest == fast.sparsest
        line = (f"{t:>5} {exh.sparsest:>10} {fast.sparsest:>5} {t_exh:>10.2f} {t_fast * 1e3:>11.1f} "
                f"{f'{exh.solves}/{fast.solves}':>16}")
        if args.compiled:
            comp, t_comp = timed(lambda: sparsest_exhaustive(X, Y, reuse=True))
            totals["compiled"] += t_comp
            agree_comp = "" if comp.sparsest == exh.sparsest else "  (compiled exhaustive disagrees!)"
            line += f" {t_comp:>19.2f}{agree_comp}"
        print(line)
    speedup = totals["exhaustive"] / totals["fast"]
    print(f"total: exhaustive {totals['exhaustive']:.1f} s, fast {totals['fast']:.3f} s -> speed-up {speedup:.0f}x; "
          f"answers agree on {agree}/{args.trials} trials")
    if args.compiled:
        print(f"exhaustive on compiled problems: {totals['compiled']:.1f} s "
              f"(fast is {totals['compiled'] / totals['fast']:.0f}x faster than that)")
    return 0 if agree == args.trials else 1


if __name__ == "__main__":
    from cli.setup import configure_process

    configure_process()
    sys.exit(main())

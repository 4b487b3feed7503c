"""The working-set solver on a stacked problem: dense products against block products.

A synthetic problem shaped like ResNet-56's stage-3 residual stream (``grouplasso.stacking``):
64 channels read by 9 consumers, 8 of them 3x3 convolutions (g_j = 9 columns per channel,
D_j = 64 outputs) and one Linear layer (g_j = 1, D_j = 10), so K = 64 * 73 = 4672 columns and
D = 522 rows, of which each product with the dense G (D K^2) spends about 60 times what the
consumers' blocks take (sum_j D_j K_j^2). Each consumer has its own random nonnegative
features (channels correlated through a few shared latent factors, a channel's g_j entries
through the channel's value, through a ReLU) and outputs of a weight that uses 40% of the
channels (the same for every consumer), plus noise.

The same problem is solved with its block structure (``LassoStats.blocks``) and without it
(the structure dropped: the dense products), alternating in one process, by ``WorkingSet``
from V = 0 to a relative duality gap of ``--tol``, at each ``--ratios`` times lambda_max:

    .venv/bin/python -m benchmarks.stacked_solver [--samples 3000] [--tol 1e-4] [--ratios 0.05 0.01]

Measured (2 CPU cores shared with two training jobs, one torch thread, 3000 samples per
consumer, rel. gap 1e-4; two runs at different loads; seconds, outer steps):

    lam/lam_max   dense          blocks         dense / blocks   |F_dense - F_blocks| / F
    0.05          49.3 s, 9      10.8 s, 9      4.6x             1.2e-11
    0.01          93.3 s, 10     18.6 s, 11     5.0x             1.9e-10
    0.05          28.0 s, 9       7.5 s, 9      3.7x             1.2e-11
    0.01          49.8 s, 10     11.9 s, 11     4.2x             1.9e-10

The products with G are 25 times faster (V G on a 60-group working set); what is left is
what the structure does not touch: each working set's dense gather of G (``restrict``), the
elementwise work of BCD and of the certificates on V's dense (D, g) groups and (D, K) matrix
(8/9 of them the zeros off the blocks) and Anderson's history of such matrices.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from grouplasso import LassoStats, WorkingSet, lambda_max, stack_problems

#: (columns per channel g_j, outputs D_j) of the stage's consumers
CONSUMERS = [(9, 64)] * 8 + [(1, 10)]


def consumer_stats(gen: torch.Generator, keep: torch.Tensor, group: int, D: int, samples: int,
                   channels: int = 64) -> LassoStats:
    """One consumer's statistics: inputs (samples, channels * group), outputs (samples, D)."""
    latent = torch.randn(samples, 8, generator=gen, dtype=torch.float64)
    mix = torch.randn(8, channels, generator=gen, dtype=torch.float64) / 8 ** 0.5
    noise = 0.5 * torch.randn(samples, channels, group, generator=gen, dtype=torch.float64)
    X = torch.relu((latent @ mix)[:, :, None] + noise + 0.2).reshape(samples, -1)
    W = torch.randn(D, channels, group, generator=gen, dtype=torch.float64) / (channels * group) ** 0.5
    W[:, ~keep] = 0.0
    Y = X @ W.reshape(D, -1).T
    Y += 0.3 * Y.std() * torch.randn(Y.shape, generator=gen, dtype=torch.float64)
    return LassoStats.from_features(X, Y, group=group)


def stacked_problem(samples: int = 3000, channels: int = 64, seed: int = 0) -> LassoStats:
    """The joint statistics of ``CONSUMERS`` over ``channels`` (with their block structure)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(channels, dtype=torch.bool)
    keep[torch.randperm(channels, generator=gen)[:int(0.4 * channels)]] = True
    parts = [consumer_stats(gen, keep, g, D, samples, channels) for g, D in CONSUMERS]
    joint, _, _ = stack_problems(parts, [torch.zeros(s.D, s.K, dtype=torch.float64) for s in parts])
    return joint


def solve(stats: LassoStats, lam: float, tol: float, cap: float) -> dict:
    start = time.perf_counter()
    solver = WorkingSet(stats, lam, torch.zeros(stats.D, stats.K, dtype=torch.float64))
    while solver.certificate().rel_gap > tol and time.perf_counter() - start < cap:
        solver.step()
    gap = solver.certificate()
    return {"seconds": time.perf_counter() - start, "rel_gap": gap.rel_gap, "objective": gap.primal,
            "outer_steps": solver.iterations, "channels_kept": int(solver.metrics()["active"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000, help="samples per consumer")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.01])
    parser.add_argument("--cap", type=float, default=900.0, help="seconds per solve at most")
    args = parser.parse_args()
    torch.set_num_threads(1)  # steady timings on a loaded machine
    start = time.perf_counter()
    blocks = stacked_problem(args.samples)
    dense = dataclasses.replace(blocks, blocks=None)
    print(f"statistics K={blocks.K} D={blocks.D} g={blocks.group} in {time.perf_counter() - start:.1f} s", flush=True)
    for ratio in args.ratios:
        lam = ratio * lambda_max(blocks)
        runs = {name: solve(stats, lam, args.tol, args.cap) for name, stats in (("dense", dense), ("blocks", blocks))}
        for name, r in runs.items():
            print(f"lam={ratio:g} lam_max  {name:6s} {r['seconds']:7.1f} s  rel. gap {r['rel_gap']:.1e}  "
                  f"outer {r['outer_steps']}  channels {r['channels_kept']}/{blocks.groups}  F {r['objective']:.12g}",
                  flush=True)
        d, b = runs["dense"], runs["blocks"]
        print(f"lam={ratio:g} lam_max  dense / blocks {d['seconds'] / b['seconds']:.1f}x  "
              f"|F_dense - F_blocks| / F {abs(d['objective'] - b['objective']) / d['objective']:.1e}", flush=True)


if __name__ == "__main__":
    main()

"""The working-set solver's inner solver on a convolution-like problem: FISTA against BCD.

A conv5-sized problem of AlexNet (K = 384 channels x 3x3 = 3456 columns, groups of g = 9,
D = 256 outputs) from synthetic but realistically correlated patches: smooth nonnegative
3x3 feature maps (a low-rank mix of shared spatial fields, blurred, plus per-channel noise,
through a ReLU), unfolded with padding 1 as ``torch.nn.functional.unfold`` orders them, and
targets from a group-sparse W_true plus noise. Neighbouring entries of a channel's patch
are strongly correlated, as in a trained network, which is what makes G badly conditioned.

The variants (``WorkingSet`` with FISTA inside, with BCD, with BCD and Anderson
extrapolation: the default for g > 1) run in one process, one after the other, from V = 0 to
a relative duality gap of ``--tol``, at each ``--ratios`` times lambda_max:

    .venv/bin/python -m benchmarks.conv_solver_inner [--images 2000] [--tol 1e-4] [--threads 1]
    .venv/bin/python -m benchmarks.conv_solver_inner --stats conv5.pt   # real statistics

Measured (2 shared CPU cores, one torch thread, rel. gap 1e-4; seconds, inner iterations):

    problem                         lam/lam_max   FISTA          BCD            BCD+Anderson
    synthetic (2000 images)         0.1           19.5 s,  400    8.8 s,  160    6.1 s,  90
                                    0.01          91.1 s, 1140  199.2 s, 2830   59.6 s, 535
    AlexNet conv5, Fashion-MNIST    0.1            5.4 s,  380    2.1 s,  115    1.5 s,  65
    (2000 training images)          0.01          78.6 s, 1180  102.3 s, 1540   30.7 s, 430
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from grouplasso import LassoStats, WorkingSet, lambda_max


def conv_problem(images: int = 2000, channels: int = 384, D: int = 256, seed: int = 0, keep: float = 0.3) -> LassoStats:
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(images, 32, 7, 7, generator=gen, dtype=torch.float64)
    mix = torch.randn(channels, 32, generator=gen, dtype=torch.float64) / 32 ** 0.5
    fields = torch.einsum("ck,nkhw->nchw", mix, latent) + 0.5 * torch.randn(images, channels, 7, 7, generator=gen, dtype=torch.float64)
    blur = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
    blur = (blur[:, None] * blur[None, :]) / blur.sum() ** 2
    maps = F.conv2d(fields.reshape(-1, 1, 7, 7), blur[None, None]).reshape(images, channels, 3, 3)
    maps = torch.relu(maps + 0.1)
    X = F.unfold(maps, kernel_size=3, padding=1).transpose(1, 2).reshape(-1, channels * 9)  # (images * 9, K)
    W = torch.randn(D, channels, 9, generator=gen, dtype=torch.float64) / (channels * 9) ** 0.5
    W[:, torch.randperm(channels, generator=gen)[int(keep * channels):]] = 0.0
    Y = X @ W.reshape(D, -1).T
    Y += 0.3 * Y.std() * torch.randn(Y.shape, generator=gen, dtype=torch.float64)
    return LassoStats.from_features(X, Y, group=9)


INNERS = {"fista": {"inner": "fista"}, "bcd": {"inner": "bcd", "anderson": 0}, "bcd+anderson": {"inner": "bcd"}}


def run(stats: LassoStats, lam: float, inner: str, tol: float, cap: float) -> dict:
    start = time.perf_counter()
    solver = WorkingSet(stats, lam, torch.zeros(stats.D, stats.K, dtype=torch.float64), **INNERS[inner])
    inner_total, steps = 0, []
    while solver.certificate().rel_gap > tol and time.perf_counter() - start < cap:
        solver.step()
        inner_total += solver.inner_iterations
        steps.append((solver.working_set_size, solver.inner_iterations))
    gap = solver.certificate()
    return {"seconds": time.perf_counter() - start, "rel_gap": gap.rel_gap, "objective": gap.primal,
            "outer_steps": solver.iterations, "inner_iterations": inner_total, "steps": steps,
            "channels_kept": int(solver.metrics()["active"]), "reached": gap.rel_gap <= tol}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--inners", nargs="+", default=list(INNERS), choices=list(INNERS))
    parser.add_argument("--stats", type=Path, default=None,
                        help="statistics saved as torch.save({'G', 'C', 's', 'n', 'group'}) instead of the synthetic ones")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cap", type=float, default=600.0, help="seconds per solve at most")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    stats = LassoStats(**torch.load(args.stats)) if args.stats else conv_problem(args.images)
    print(f"statistics K={stats.K} D={stats.D} n={stats.n} in {time.perf_counter() - start:.1f} s", flush=True)
    results = {}
    for ratio in args.ratios:
        lam = ratio * lambda_max(stats)
        for inner in args.inners:
            r = run(stats, lam, inner, args.tol, args.cap)
            results[f"{ratio}/{inner}"] = r
            print(f"lam={ratio:g} lam_max  {inner:12s} {r['seconds']:7.1f} s  rel. gap {r['rel_gap']:.1e}  "
                  f"outer {r['outer_steps']}  inner {r['inner_iterations']}  channels {r['channels_kept']}/384  "
                  f"F {r['objective']:.10g}  steps {r['steps']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

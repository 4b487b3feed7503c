"""Peak memory of the statistics pass does not grow with the number of samples N.

Synthetic ReLU features (K = 4,096 inputs, D = 10 outputs, like AlexNet's last layer) are
generated batch by batch and streamed into ``grouplasso.StatsAccumulator``; for contrast,
the same batches are also collected into the (N, K) matrix that scikit-learn and skglm need.
Each measurement runs in a fresh process and reads its peak resident memory (VmHWM), for
N and 10 N side by side.

    python -m benchmarks.stats_memory [--n 6000] [--factor 10]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(mode: str, n: int, K: int, D: int, batch: int) -> None:
    """Runs inside the child process: stream ``n`` samples and print the peak memory."""
    import torch

    from grouplasso import StatsAccumulator

    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, K, generator=g)
    readout = torch.randn(K, D, generator=g) / K**0.5
    acc = StatsAccumulator(K, D)
    kept = []
    baseline = peak_rss_mib()
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x = torch.relu(torch.randn(b, 64, generator=g) @ mixing)  # correlated ReLU features
        y = x @ readout
        if mode == "stream":
            acc.update(x, y)
        else:
            kept.append(x)
    if mode == "stream":
        acc.finalize()
    else:
        torch.cat(kept)
    print(f"{peak_rss_mib() - baseline:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--K", type=int, default=4096)
    parser.add_argument("--D", type=int, default=10)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child[0], int(args.child[1]), args.K, args.D, args.batch)
        return
    rows = {}
    for mode in ("stream", "materialise"):
        for n in (args.n, args.factor * args.n):
            out = subprocess.run([sys.executable, "-m", "benchmarks.stats_memory", "--child", mode, str(n),
                                  "--K", str(args.K), "--D", str(args.D), "--batch", str(args.batch)],
                                 cwd=REPO, capture_output=True, text=True, check=True)
            rows[mode, n] = float(out.stdout.strip().splitlines()[-1])
    print(f"K={args.K}, D={args.D}, batches of {args.batch}; peak memory added by the pass (MiB):")
    print(f"{'':34s}{'N=' + str(args.n):>12s}{'N=' + str(args.factor * args.n):>12s}{'ratio':>8s}")
    labels = {"stream": "statistics (StatsAccumulator)", "materialise": "feature matrix (sklearn/skglm)"}
    for mode, label in labels.items():
        small, large = rows[mode, args.n], rows[mode, args.factor * args.n]
        print(f"{label:34s}{small:12.0f}{large:12.0f}{large / small:8.2f}")


if __name__ == "__main__":
    from cli.setup import configure_process

    configure_process()
    main()

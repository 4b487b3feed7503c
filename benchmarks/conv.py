"""Convolution channels on the demo network: what the compression buys, against Torch-Pruning,
and what the largest convolution problem costs to solve.

Part 1, the whole network: ``compress.py --config alexnet_fashion_conv`` (conv2..conv5's
input channels, then pen and last, each candidate refit by least squares) at validation
budgets of 1 and 2 points, each with 1 epoch of fine-tuning (dropout off, the default):
multiply-adds, test accuracy, and batch-1 CPU latency of every network measured side by side
at the end (in turns, so that load on the machine affects all alike). At the first budget's
widths also: the same fine-tuning with the network's own dropout (p = 0.5), and Torch-Pruning
(group magnitude and Taylor importance) pruning the same layers to the same channel counts,
with 0 and 1 epoch of the same fine-tuning.

Part 2, the solver on conv4 (``features.8``: K = 384 * 9 = 3,456 columns in groups of 9,
D = 256): the statistics over the training split, then the working-set solver and FISTA on
all columns to a relative duality gap of 1e-4, at 0.1 and 0.01 * lambda_max. skglm and
scikit-learn have no multi-task *group* lasso: skglm's GroupLasso is single-task and its
MultiTaskLasso (like scikit-learn's and celer's) has one column per group; the single-task
form of this problem needs a Kronecker design of (N * positions * D) rows by K * D columns
(124 million by 885 thousand here), so neither can express it.

    python -m benchmarks.conv [--checkpoint runs/alexnet_fashion/demo/checkpoints/best.ckpt]

Writes ``benchmarks/results/conv.json``.

The README's "Results measured here" gives the numbers of its last run.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks import read_results, write_results
from cli.setup import configure_process
from compress import main as compress
from compression.baselines import torch_pruning_at_widths
from compression.finetune import FinetuneSettings, finetune
from compression.passes import DataPasses
from compression.pipeline import CompressionPipeline
from compression.settings import TrainerSettings
from datamodules.fashion_mnist import FashionMNISTDataModule
from grouplasso import SOLVERS, active_groups, lambda_max
from models.registry import NetworkSpec
from models.checkpoints import load_network, network_from_state, read_checkpoint, save_network
from models.profile import count_macs, latencies_in_turns

TRAINER = TrainerSettings(accelerator="cpu", enable_progress_bar=False)


def compression_run(args: argparse.Namespace, work: Path, budget: float) -> dict:
    """``compress.py --config alexnet_fashion_conv`` at a validation budget of ``budget`` points,
    with 1 epoch of fine-tuning; an earlier run of this benchmark at that budget is resumed
    (its finished solves are read back)."""
    version = f"budget{budget:g}"
    run = work / "runs" / "compress_alexnet_fashion_conv" / version
    argv = ["--config", "alexnet_fashion_conv", "--checkpoint", args.checkpoint, "--cache_dir", args.cache_dir,
            "--trainer.logger.init_args.save_dir", str(work / "runs"), "--trainer.logger.init_args.version", version,
            "--trainer.enable_progress_bar", "false", "--convergence.verbose", "false",
            "--target.max_accuracy_drop", str(budget), "--finetune.epochs", "1"]
    if (run / "solve").is_dir():
        argv += ["--resume", str(run)]
    return compress(argv)


def whole_network(args: argparse.Namespace, work: Path) -> dict:
    _, info = read_checkpoint(args.checkpoint)
    hparams = info.get("hparams") or {}
    dm = FashionMNISTDataModule(root="data", batch_size=500, num_workers=2, val_fraction=0.1)
    dm.prepare_data()
    dm.setup("fit")
    shape = tuple(dm.test_set[0][0].shape)
    passes = DataPasses(dm, "", TRAINER, Path(args.cache_dir), work)
    trainer = {**TRAINER.distributed(), "enable_progress_bar": False}
    rows, networks, runs = [], {}, {}

    def add(method: str, epochs: int, budget: Optional[float], network: torch.nn.Module, **extra) -> None:
        network, name = network.eval(), f"{method}, budget {budget}, {epochs} epochs"
        networks[name] = network
        rows.append({"name": name, "method": method, "budget": budget, "finetune_epochs": epochs,
                     "test_accuracy": passes.evaluate(network, "test")[0].accuracy, "macs": count_macs(network, shape),
                     "parameters": sum(p.numel() for p in network.parameters()), **extra})

    original = load_network(args.checkpoint)
    add("original", 0, None, original)
    for budget in args.budgets:
        report = compression_run(args, work, budget)
        runs[f"{budget:g}"] = {"widths": {e["module"]: e["width_after"] for e in report["layers"]},
                               "network_after_surgery": report["network_after_surgery"], "layers": [
            {k: e[k] for k in ("layer", "module", "width_before", "width_after", "lambda", "ratio", "stats_seconds",
                               "samples", "group_size", "folded", "val_accuracy_floor") if k in e}
            for e in report["layers"]]}
        add("lasso", 0, budget, load_network(report["network_after_surgery"]))
        add("lasso", 1, budget, load_network(report["network"]))
    # The same widths as the first budget's run, by other means or other fine-tuning.
    budget = args.budgets[0]
    tuned, _ = finetune(runs[f"{budget:g}"]["network_after_surgery"], NetworkSpec("alexnet", 10), dm, FinetuneSettings(epochs=1, dropout=None), hparams,
                        work / "lasso_dropout_as_trained", trainer)
    add("lasso, fine-tuned with the network's dropout (0.5)", 1, budget, tuned)
    widths = runs[f"{budget:g}"]["widths"]
    loss_batches = CompressionPipeline(original, NetworkSpec("alexnet", 10), dm, work)._loss_batches()
    for importance in ("magnitude", "taylor"):
        pruned = torch_pruning_at_widths(original, widths, importance, example_inputs=torch.zeros(1, *shape),
                                         loss_batches=loss_batches)
        folder = work / f"torch_pruning_{importance}"
        saved = save_network(pruned.eval(), folder / "pruned.pt", NetworkSpec("alexnet", 10))
        tuned, _ = finetune(saved, NetworkSpec("alexnet", 10), dm, FinetuneSettings(epochs=1), hparams, folder, trainer)
        add(f"torch_pruning_{importance}", 0, budget, load_network(saved))
        add(f"torch_pruning_{importance}", 1, budget, tuned)
    latency = {name: per[1] for name, per in latencies_in_turns(networks, shape).items()}
    reference = rows[0]
    for row in rows:
        row["latency_ms"] = latency[row["name"]]
    for row in rows:
        print(f"{row['method'][:40]:40s} budget {row['budget'] or '':>3} {row['finetune_epochs']} epochs  "
              f"test {100 * row['test_accuracy']:6.2f}% ({100 * (row['test_accuracy'] - reference['test_accuracy']):+.2f})"
              f"  MACs {row['macs']:>12,d} (1/{reference['macs'] / row['macs']:.2f})  latency {row['latency_ms']:6.2f} ms"
              f" (1/{reference['latency_ms'] / row['latency_ms']:.2f})", flush=True)
    return {"runs": runs, "rows": rows}


def conv4_solver(args: argparse.Namespace, work: Path) -> dict:
    state, info = read_checkpoint(args.checkpoint)
    network = network_from_state(state, NetworkSpec("alexnet", info["num_classes"])).eval()
    dm = FashionMNISTDataModule(root="data", batch_size=500, num_workers=2, val_fraction=0.1)
    dm.prepare_data()
    dm.setup("fit")
    passes = DataPasses(dm, "", TRAINER, None, work)  # no cache: the statistics pass is timed
    pipeline = CompressionPipeline(network, NetworkSpec("alexnet", 10), dm, work)
    start = time.perf_counter()
    _, problem, _ = pipeline.layer_problem(network, "features.8", passes)
    out = {"stats_seconds": time.perf_counter() - start, "K": problem.stats.K, "D": problem.stats.D,
           "group": problem.group, "samples": problem.stats.n}
    out["solves"] = []
    for ratio in args.ratios:
        lam = ratio * lambda_max(problem.stats)
        solve = {"ratio": ratio, "lambda": lam}
        for name in ("working_set", "fista"):
            start = time.perf_counter()
            solver = SOLVERS[name](problem.stats, lam,
                                   torch.zeros(problem.stats.D, problem.stats.K, dtype=torch.float64))
            while solver.certificate().rel_gap > 1e-4 and time.perf_counter() - start < args.cap:
                for _ in range(solver.certify_every):
                    solver.step()
            seconds = time.perf_counter() - start
            gap = solver.certificate()
            kept = len(active_groups(solver.V, problem.group))
            solve[name] = {"seconds": seconds, "rel_gap": gap.rel_gap, "objective": gap.primal,
                           "steps": solver.iterations, "channels_kept": kept, "reached": gap.rel_gap <= 1e-4}
            print(f"conv4 at {ratio:g} lambda_max, {name:12s} {seconds:8.1f} s  rel. gap {gap.rel_gap:.1e}  "
                  f"channels {kept}/384", flush=True)
        solve["fista_over_working_set"] = solve["fista"]["seconds"] / solve["working_set"]["seconds"]
        out["solves"].append(solve)
    print(f"statistics {out['stats_seconds']:.1f} s over {out['samples']:,d} patches", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/alexnet_fashion/demo/checkpoints/best.ckpt")
    parser.add_argument("--cache_dir", default=".cache/passes")
    parser.add_argument("--work", default="runs/bench_conv")
    parser.add_argument("--cap", type=float, default=900.0, help="seconds per solver at most")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.01],
                        help="conv4's lambda as fractions of its lambda_max")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 2.0],
                        help="validation budgets (points) of the compression runs; Torch-Pruning gets the first's widths")
    parser.add_argument("--skip_network", action="store_true")
    parser.add_argument("--skip_solver", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/conv.json"))
    args = parser.parse_args()
    work = Path(args.work)
    results = read_results(args.out, {})
    if not args.skip_solver:
        results["conv4_solver"] = conv4_solver(args, work / "solver")
        write_results(args.out, results)
    if not args.skip_network:
        results["network"] = whole_network(args, work / "network")
    write_results(args.out, results)


if __name__ == "__main__":
    configure_process()
    main()

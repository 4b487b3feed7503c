"""Convolution channels on the demo network: what the compression buys, against Torch-Pruning,
and what the largest convolution problem costs to solve.

Part 1, the whole network: ``compress.py --config alexnet_fashion_conv`` (conv2..conv5's
input channels, then pen and last, one 1-point validation budget) with 1 fine-tuning
epoch: multiply-adds, CPU latency at batch size 1 and test accuracy before, after surgery
(0 epochs) and after fine-tuning; then Torch-Pruning (group magnitude and Taylor
importance) pruning the same layers to the same channel counts, with 0 and 1 epoch of the
same fine-tuning.

Part 2, the solver on conv4 (``features.8``: K = 384 * 9 = 3,456 columns in groups of 9,
D = 256): the statistics over the training split, then the working-set solver and FISTA on
all columns to a relative duality gap of 1e-4, at lam = 0.1 * lambda_max. skglm and
scikit-learn have no multi-task *group* lasso: skglm's GroupLasso is single-task and its
MultiTaskLasso (like scikit-learn's and celer's) has one column per group; the single-task
form of this problem needs a Kronecker design of (N * positions * D) rows by K * D columns
(124 million by 885 thousand here), so neither can express it.

    python -m benchmarks.conv [--checkpoint runs/alexnet_fashion/demo/checkpoints/best.ckpt]

Writes ``benchmarks/results/conv.json``.

Status: written but not yet run to completion on these two CPU cores (the README's
"What is not done here" says what is missing); its parts run the same pipeline code the
tests cover.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cli.setup import configure_process
from compress import main as compress
from compression.baselines import torch_pruning_network
from compression.finetune import FinetuneSettings, finetune
from compression.passes import DataPasses
from compression.pipeline import CompressionPipeline
from compression.settings import TrainerSettings
from datamodules.fashion_mnist import FashionMNISTDataModule
from grouplasso import SOLVERS, lambda_max
from models.checkpoints import network_from_state, read_checkpoint, save_network
from models.layers import analyse_layer
from models.profile import count_macs, latency_ms

TRAINER = TrainerSettings(accelerator="cpu", enable_progress_bar=False)


def whole_network(args: argparse.Namespace, work: Path) -> dict:
    report = compress(["--config", "alexnet_fashion_conv", "--checkpoint", args.checkpoint, "--cache_dir", args.cache_dir,
                       "--trainer.logger.init_args.save_dir", str(work / "runs"), "--trainer.enable_progress_bar",
                       "false", "--convergence.verbose", "false", "--finetune.epochs", "1"])
    rows = []
    for stage, method, epochs in (("before", "original", 0), ("after_surgery", "lasso", 0), ("after", "lasso", 1)):
        r = report[stage]
        rows.append({"method": method, "finetune_epochs": epochs, "test_accuracy": r["test_accuracy"],
                     "macs": r["macs"], "latency_ms": r["latency_ms"], "parameters": r["parameters"]})
    widths = [(e["module"], e["width_after"]) for e in report["layers"]]
    state, info = read_checkpoint(args.checkpoint)
    network = network_from_state(state, "alexnet", info["num_classes"]).eval()
    dm = FashionMNISTDataModule(root="data", batch_size=500, num_workers=2, val_fraction=0.1)
    dm.prepare_data()
    dm.setup("fit")
    shape = tuple(dm.test_set[0][0].shape)
    passes = DataPasses(dm, "", TRAINER, Path(args.cache_dir), work)
    loss_batches = CompressionPipeline(network, "alexnet", 10, dm, work)._loss_batches()
    for importance in ("magnitude", "taylor"):
        pruned = network
        for module, k in widths:
            pruned, kept = torch_pruning_network(pruned, analyse_layer(pruned, module), k, importance,
                                                 example_inputs=torch.zeros(1, *shape), loss_batches=loss_batches)
            assert kept == k, (module, k, kept)
        pruned = pruned.eval()
        folder = work / f"torch_pruning_{importance}"
        saved = save_network(pruned, folder / "pruned.pt", "alexnet", info["num_classes"])
        tuned, _ = finetune(saved, "alexnet", info["num_classes"], dm, FinetuneSettings(epochs=1),
                            info.get("hparams") or {}, folder, {**TRAINER.distributed(), "enable_progress_bar": False})
        for epochs, net in ((0, pruned), (1, tuned.eval())):
            rows.append({"method": f"torch_pruning_{importance}", "finetune_epochs": epochs,
                         "test_accuracy": passes.evaluate(net, "test")[0].accuracy, "macs": count_macs(net, shape),
                         "latency_ms": latency_ms(net, shape), "parameters": sum(p.numel() for p in net.parameters())})
    for row in rows:
        print(f"{row['method']:26s} {row['finetune_epochs']} epochs  test {100 * row['test_accuracy']:6.2f}%  "
              f"MACs {row['macs']:>12,d}  latency {row['latency_ms']:6.2f} ms", flush=True)
    return {"widths": dict(widths), "rows": rows, "layers": [
        {k: e[k] for k in ("layer", "module", "width_before", "width_after", "lambda", "ratio", "stats_seconds",
                           "samples", "group_size", "folded") if k in e} for e in report["layers"]]}


def conv4_solver(args: argparse.Namespace, work: Path) -> dict:
    state, info = read_checkpoint(args.checkpoint)
    network = network_from_state(state, "alexnet", info["num_classes"]).eval()
    dm = FashionMNISTDataModule(root="data", batch_size=500, num_workers=2, val_fraction=0.1)
    dm.prepare_data()
    dm.setup("fit")
    passes = DataPasses(dm, "", TRAINER, None, work)  # no cache: the statistics pass is timed
    pipeline = CompressionPipeline(network, "alexnet", 10, dm, work)
    start = time.perf_counter()
    _, problem, _ = pipeline.layer_problem(network, "features.8", passes)
    out = {"stats_seconds": time.perf_counter() - start, "K": problem.stats.K, "D": problem.stats.D,
           "group": problem.group, "samples": problem.stats.n}
    lam = 0.1 * lambda_max(problem.stats)
    for name in ("working_set", "fista"):
        start = time.perf_counter()
        solver = SOLVERS[name](problem.stats, lam, torch.zeros(problem.stats.D, problem.stats.K, dtype=torch.float64))
        while solver.certificate().rel_gap > 1e-4 and time.perf_counter() - start < args.cap:
            for _ in range(solver.certify_every):
                solver.step()
        seconds = time.perf_counter() - start
        gap = solver.certificate()
        out[name] = {"seconds": seconds, "rel_gap": gap.rel_gap, "objective": gap.primal, "steps": solver.iterations,
                     "channels_kept": len(torch.nonzero(solver.V.reshape(problem.stats.D, -1, problem.group)
                                                        .square().sum((0, 2)))), "reached": gap.rel_gap <= 1e-4}
        print(f"conv4 {name:12s} {seconds:8.1f} s  rel. gap {gap.rel_gap:.1e}  "
              f"channels {out[name]['channels_kept']}/384", flush=True)
    out["lambda"], out["ratio"] = lam, 0.1
    out["fista_over_working_set"] = out["fista"]["seconds"] / out["working_set"]["seconds"]
    print(f"statistics {out['stats_seconds']:.1f} s over {out['samples']:,d} patches", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/alexnet_fashion/demo/checkpoints/best.ckpt")
    parser.add_argument("--cache_dir", default=".cache/passes")
    parser.add_argument("--work", default="runs/bench_conv")
    parser.add_argument("--cap", type=float, default=900.0, help="seconds per solver at most")
    parser.add_argument("--skip_network", action="store_true")
    parser.add_argument("--skip_solver", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/conv.json"))
    args = parser.parse_args()
    work = Path(args.work)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if not args.skip_solver:
        results["conv4_solver"] = conv4_solver(args, work / "solver")
        args.out.write_text(json.dumps(results, indent=1))
    if not args.skip_network:
        results["network"] = whole_network(args, work / "network")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    configure_process()
    main()

"""What a target costs: the demo network's compression by fixed lambdas against the same
two layers searched for an accuracy budget, and a candidate's evaluation against a pass
of the whole network.

Each compress.py run starts from an empty cache (statistics and passes included) and is
timed from the command line's start to its report, in this one process, one after the
other. With ``--before PATH`` (a checkout of the code before the head-input cache, e.g.
``git worktree add /tmp/before 2f4c93a``) its fixed-lambda run is timed too, in a
subprocess, on the same machine and data.

    python -m benchmarks.targets --checkpoint runs/alexnet_fashion/demo/checkpoints/best.ckpt [--before /tmp/before]

Writes ``benchmarks/results/targets.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from cli.setup import configure_process
from compress import main as compress
from compression.passes import DataPasses
from compression.settings import TrainerSettings
from datamodules.fashion_mnist import FashionMNISTDataModule
from lightning_modules.network_pass import run_pass
from models.checkpoints import load_network

FIXED = ["--layers", "[pen,last]", "--lambdas", "[1.0e-4,0.01]"]
TARGET = ["--layers", "[pen,last]", "--target.max_accuracy_drop", "0.5"]


def timed_compress(checkpoint: str, extra: list[str], folder: Path) -> tuple[float, dict]:
    args = ["--config", "alexnet_fashion_compress", "--checkpoint", checkpoint, "--cache_dir", str(folder / "cache"),
            "--trainer.logger.init_args.save_dir", str(folder / "runs"), "--trainer.enable_progress_bar", "false",
            "--convergence.verbose", "false", *extra]
    start = time.perf_counter()
    report = compress(args)
    return time.perf_counter() - start, report


def timed_before(before: Path, checkpoint: str, folder: Path) -> float:
    args = [sys.executable, "compress.py", "--config", "configs/alexnet_fashion_compress.yaml",
            "--checkpoint", str(Path(checkpoint).resolve()), "--cache_dir", str(folder / "cache"),
            "--trainer.logger.init_args.save_dir", str(folder / "runs"), "--trainer.enable_progress_bar", "false",
            "--lambdas", "[1.0e-4,0.01]"]
    start = time.perf_counter()
    subprocess.run(args, cwd=before, check=True, capture_output=True)
    return time.perf_counter() - start


def evaluation_costs(checkpoint: str, report: dict, folder: Path) -> dict[str, float]:
    """Seconds for one candidate's validation accuracy from the stored inputs of pen, against
    one pass of the whole network over the validation split."""
    network = load_network(checkpoint)
    dm = FashionMNISTDataModule(root="data", batch_size=500, num_workers=2)
    dm.setup("fit")
    passes = DataPasses(dm, "classifier", TrainerSettings(accelerator="cpu", enable_progress_bar=False),
                        folder / "cache", folder)
    cut = passes.cut_inputs(network, "val", ["classifier.4"])
    V = network.get_submodule("classifier.4").weight.detach().clone()
    keep = torch.tensor(report["layers"][0]["kept_indices"])
    mask = torch.zeros(V.shape[1], dtype=torch.bool)
    mask[keep] = True
    V[:, ~mask] = 0
    start = time.perf_counter()
    passes.accuracy(network, cut, {"classifier.4": (V, 1)})
    candidate = time.perf_counter() - start
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False)
    start = time.perf_counter()
    run_pass(trainer, network, dm.val_dataloader())
    full = time.perf_counter() - start
    return {"candidate_seconds": candidate, "full_pass_seconds": full, "val_samples": len(cut.labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/alexnet_fashion/demo/checkpoints/best.ckpt")
    parser.add_argument("--before", type=Path, default=None, help="a checkout of the code before the head-input cache")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/targets.json"))
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.before is not None:
            results["before_fixed_seconds"] = timed_before(args.before, args.checkpoint, tmp / "before")
            print(f"before, fixed lambdas:   {results['before_fixed_seconds']:7.1f} s", flush=True)
        seconds, fixed = timed_compress(args.checkpoint, FIXED, tmp / "fixed")
        results["fixed_seconds"] = seconds
        print(f"fixed lambdas:           {seconds:7.1f} s", flush=True)
        seconds, target = timed_compress(args.checkpoint, TARGET, tmp / "target")
        results["target_seconds"] = seconds
        print(f"target (0.5 point):      {seconds:7.1f} s", flush=True)
        results.update(evaluation_costs(args.checkpoint, target, tmp / "target"))
    results["target_over_fixed"] = results["target_seconds"] / results["fixed_seconds"]
    results["full_pass_over_candidate"] = results["full_pass_seconds"] / results["candidate_seconds"]
    if "before_fixed_seconds" in results:
        results["fixed_over_before"] = results["fixed_seconds"] / results["before_fixed_seconds"]
    for name, report in (("fixed", fixed), ("target", target)):
        results[name] = {
            "widths": [e["width_after"] for e in report["layers"]],
            "lambdas": [e["lambda"] for e in report["layers"]],
            "candidates": [len(e.get("candidates", [])) for e in report["layers"]],
            "val_accuracy_before": report["before"].get("val_accuracy"),
            "val_accuracy_after": report["after"].get("val_accuracy"),
            "test_accuracy_before": report["before"]["test_accuracy"],
            "test_accuracy_after": report["after"]["test_accuracy"],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2))
    print(f"target / fixed: {results['target_over_fixed']:.2f} (goal: at most 2); a candidate's evaluation is "
          f"{results['full_pass_over_candidate']:.0f}x cheaper than a full pass over the validation split")


if __name__ == "__main__":
    configure_process()
    main()

"""Your network, not only AlexNet: ResNet-56 and MobileNetV2 compressed layer by layer, against
Torch-Pruning at the same widths, with 0 and 1 epoch of fine-tuning.

For each network (trained here on Fashion-MNIST by ``train.py --config <net>_fashion.yaml``):
- ``compress.py --config <net>_fashion.yaml`` (every compressible layer, certified candidates
  refit by least squares, the budget shared as the config says) at a 1-point budget and at a
  larger one, each followed by 1 epoch of fine-tuning (the config's ``finetune`` section: the
  ``Classifier`` at its learning rate, distilling from the original where it says so), run here
  by the same call as the peers' below;
- at the first budget, without fine-tuning, the other ways of sharing it (``--comparisons``):
  ``knapsack`` (``--target.share macs``: every group's candidates judged alone on the original
  network, chosen together), ``cumulative`` and ``layer_by_layer`` (``--target.share
  cumulative``: the groups in network order on the network compressed so far, layer i of n
  may lose i/n of the budget; each refit reproducing the current network's outputs, or the
  original's, ``--target.refit_to``), ``cumulative_macs`` (layer by layer, refit to the
  original, each group's share of the budget in proportion to its multiply-adds), and
  ``internal`` (the internal widths alone, the groups with one producer: what the coupled
  residual channels add);
- Torch-Pruning (group magnitude and Taylor importance, through its own dependency graph)
  pruning every group to the widths of each lasso run, with 0 and 1 epoch of the same
  fine-tuning (the config's ``finetune`` section, distillation from the original included);
- batch-1 CPU latency of every network, measured in turns in one process at the end.

    python -m benchmarks.architectures --network resnet56 [--checkpoint ...] [--budgets 1 2] [--finetune_epochs 0]
        [--comparisons knapsack internal]

Writes ``benchmarks/results/architectures.json``: one row per network, method and fine-tuning
length, ``{network, method, finetune_epochs, widths, macs_before, macs_after,
test_accuracy_before, test_accuracy_after, latency_ms_before, latency_ms_after}`` (plus the
budget and the run's seconds) under ``rows``, and each compression run's summary under
``runs[network]`` (seconds, the allocation's tries, widths), and under ``deployment[network]``
the first lasso network against the original exported to ONNX: the check against PyTorch and
batch-1 and batch-64 latency in ONNX Runtime and PyTorch; and beside it
``architectures_<network>_widths.png``, the widths chosen per group at the first budget.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from benchmarks import read_results, write_results
from cli.base import resolve_config_path
from cli.setup import configure_process
from compress import main as compress
from compression.baselines import torch_pruning_at_widths
from compression.finetune import FinetuneSettings, finetune
from compression.passes import DataPasses
from compression.pipeline import CompressionPipeline
from compression.settings import TrainerSettings
from datamodules.fashion_mnist import FashionMNISTDataModule
from models.checkpoints import load_network, network_spec, read_checkpoint, save_network
from models.dependency import analyse_network
from models.export import export_checked_and_timed
from models.layers import compressible_layers
from models.profile import count_macs, latencies_in_turns

TRAINER = TrainerSettings(accelerator="cpu", enable_progress_bar=False)
CHECKPOINTS = {"resnet56": "runs/resnet56_fashion/trained/checkpoints/best.ckpt",
               "mobilenet_v2": "runs/mobilenet_v2_fashion/trained/checkpoints/best.ckpt"}
Describe = Callable[[torch.nn.Module, tuple], dict[str, Any]]


def run_folder(args: argparse.Namespace, work: Path, name: str) -> Path:
    """Where ``lasso_run(args, work, name)`` writes its report, networks and widths figure."""
    return work / "runs" / f"compress_{args.network}_fashion" / name


def lasso_run(args: argparse.Namespace, work: Path, name: str, *extra: str) -> tuple[dict, float]:
    """``compress.py --config <network>_fashion`` with ``extra`` options, in ``work/runs/<name>``;
    an interrupted earlier run of this benchmark is resumed. Returns the report and its seconds."""
    run = run_folder(args, work, name)
    argv = ["--config", f"{args.network}_fashion", "--checkpoint", args.checkpoint, "--cache_dir", args.cache_dir,
            "--trainer.logger.init_args.save_dir", str(work / "runs"), "--trainer.logger.init_args.version", name,
            "--trainer.enable_progress_bar", "false", "--convergence.verbose", "false", *extra]
    timing = run / "benchmark_seconds.json"
    if (run / "report.json").is_file() and timing.is_file():  # finished in an earlier call: not run again
        return json.loads((run / "report.json").read_text()), json.loads(timing.read_text())["seconds"]
    if (run / "solve").is_dir():
        argv += ["--resume", str(run)]
    start = time.perf_counter()
    report = compress(argv)
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": seconds}))
    return report, seconds


def config_finetune(network: str, epochs: int) -> FinetuneSettings:
    """The fine-tuning of ``configs/compress/<network>_fashion.yaml`` (its ``finetune`` section:
    learning rate, dropout, distillation), for ``epochs``: the peers get the lasso's own."""
    config = yaml.safe_load(Path(resolve_config_path(f"{network}_fashion", "compress")).read_text())
    return FinetuneSettings(**{**(config.get("finetune") or {}), "epochs": epochs})


def internal_layers(checkpoint: str) -> list[str]:
    """The compressible layers whose input neurons have a single producer (no residual coupling)."""
    network = load_network(checkpoint)
    analysis = analyse_network(network)
    return [layer for layer in compressible_layers(analysis) if not analysis.reads[layer].coupled]


def main_runs(args: argparse.Namespace, work: Path, describe: Optional[Describe] = None) -> dict[str, Any]:
    """The runs of the module doc for ``args.network``; ``describe(network, input shape)``, when
    given, adds fields to every row: ``<field>_before`` of the original, ``<field>_after`` of
    the row's network (a transformer's encoder multiply-adds, say)."""
    _, info = read_checkpoint(args.checkpoint)
    spec = network_spec(info)
    hparams = info.get("hparams") or {}
    dm = FashionMNISTDataModule(root="data", preset="fashion_32", batch_size=500, num_workers=2, val_fraction=0.1)
    dm.prepare_data()
    dm.setup("fit")
    shape = tuple(dm.test_set[0][0].shape)
    images = torch.stack([dm.val_set[i][0] for i in range(64)])  # the ONNX files' check
    passes = DataPasses(dm, "", TRAINER, Path(args.cache_dir), work)
    trainer = {**TRAINER.distributed(), "enable_progress_bar": False}
    original = load_network(args.checkpoint)
    before = {"macs": count_macs(original, shape), "test_accuracy": passes.evaluate(original, "test")[0].accuracy}
    described = {f"{k}_before": v for k, v in describe(original, shape).items()} if describe else {}
    rows, networks, runs = [], {"original": original}, {}

    def add(method: str, epochs: int, network: torch.nn.Module, widths: dict[str, int], budget: Optional[float],
            **extra: Any) -> None:
        network = network.eval()
        key = f"{method}, budget {budget}, {epochs} epochs"
        networks[key] = network
        rows.append({"network": args.network, "method": method, "budget": budget, "finetune_epochs": epochs,
                     "widths": widths, "macs_before": before["macs"], "macs_after": count_macs(network, shape),
                     "test_accuracy_before": before["test_accuracy"],
                     "test_accuracy_after": passes.evaluate(network, "test")[0].accuracy, "key": key, **extra})
        r = rows[-1]
        if describe:
            r.update(described, **{f"{k}_after": v for k, v in describe(network, shape).items()})
        print(f"{args.network} {method:34s} budget {budget} {epochs} ep: test {100 * r['test_accuracy_after']:.2f}% "
              f"({100 * (r['test_accuracy_after'] - r['test_accuracy_before']):+.2f}) MACs 1/"
              f"{r['macs_before'] / r['macs_after']:.2f}", flush=True)

    def record(name: str, report: dict, seconds: float) -> dict[str, int]:
        widths = {e["module"]: e["width_after"] for e in report["layers"]}
        runs[name] = {"seconds": seconds,  # compress.py's; a fine-tuning's, when run, as finetune_seconds
                      "passes_seconds": report.get("passes_seconds"),
                      "allocation": report.get("allocation"), "widths": widths,
                      "widths_before": {e["module"]: e["width_before"] for e in report["layers"]},
                      "val_accuracy": [report["before"].get("val_accuracy"), report["after"].get("val_accuracy")],
                      "solve_seconds": sum(e.get("seconds", 0) for e in report["layers"]),
                      "candidates": sum(len(e.get("candidates", [])) for e in report["layers"])}
        return widths

    for budget in args.budgets:
        report, seconds = lasso_run(args, work, f"macs{budget:g}", "--target.max_accuracy_drop", str(budget),
                                    "--finetune.epochs", "0")
        widths = record(f"macs{budget:g}", report, seconds)
        add("lasso_refit", 0, load_network(report["network"]), widths, budget, seconds=seconds)
        if args.finetune_epochs:  # the peers' fine-tuning below, by the same call
            tuned, details = finetune(Path(report["network"]), spec, dm,
                                      config_finetune(args.network, args.finetune_epochs), hparams,
                                      run_folder(args, work, f"macs{budget:g}"), trainer, teacher=original)
            runs[f"macs{budget:g}"]["finetune_seconds"] = details["seconds"]
            add("lasso_refit", args.finetune_epochs, tuned, widths, budget)
        loss_batches = CompressionPipeline(original, spec, dm, work)._loss_batches()
        for importance in ("magnitude", "taylor"):
            pruned = torch_pruning_at_widths(original, widths, importance, example_inputs=torch.zeros(1, *shape),
                                             loss_batches=loss_batches)
            folder = work / f"torch_pruning_{importance}_{budget:g}"
            saved = save_network(pruned.eval(), folder / "pruned.pt", spec)
            add(f"torch_pruning_{importance}", 0, load_network(saved), widths, budget)
            if args.peer_finetune_epochs:
                # the pruning is redone on every call: an earlier call's fine-tuning may be of other widths
                tuned, _ = finetune(saved, spec, dm, config_finetune(args.network, args.peer_finetune_epochs), hparams,
                                    folder, trainer, teacher=original, replace_other=True)
                add(f"torch_pruning_{importance}", args.peer_finetune_epochs, tuned, widths, budget)
    budget = args.budgets[0]
    for name in args.comparisons:
        method, options = COMPARISONS[name]
        if name == "internal":
            options = ["--layers", json.dumps(internal_layers(args.checkpoint))]
        report, seconds = lasso_run(args, work, f"{name}{budget:g}", "--target.max_accuracy_drop", str(budget),
                                    "--finetune.epochs", "0", *options)
        add(method, 0, load_network(report["network"]), record(f"{name}{budget:g}", report, seconds), budget,
            seconds=seconds)
    return finish(rows, networks, runs, shape, work, images)


#: The runs beside the network's own config, at the first budget, without fine-tuning: name ->
#: (the method's row label, compress.py options).
COMPARISONS = {
    "knapsack": ("lasso_refit, knapsack over every group's candidates",  # which judges cuts by images lost, no margin
                 ["--target.share", "macs", "--target.candidate_images", "2000", "--target.margin_se", "0"]),
    "cumulative": ("lasso_refit, layer by layer, refit to the current network",
                   ["--target.share", "cumulative", "--target.refit_to", "current"]),
    "layer_by_layer": ("lasso_refit, layer by layer, refit to the original",
                       ["--target.share", "cumulative", "--target.refit_to", "original"]),
    "cumulative_macs": ("lasso_refit, layer by layer, refit to the original, shares by multiply-adds",
                        ["--target.share", "cumulative_macs", "--target.refit_to", "original"]),
    "internal": ("lasso_refit, internal widths only", []),  # the layers are the single-producer ones
}


def finish(rows: list[dict], networks: dict[str, torch.nn.Module], runs: dict, shape: tuple, work: Path,
           images: torch.Tensor) -> dict[str, Any]:
    """Batch-1 CPU latency of every network, measured in turns in one process, into the rows; and
    the original and the first lasso network as deployed: exported to ONNX, checked against
    PyTorch on ``images``, timed at batch 1 and 64 in ONNX Runtime and in PyTorch."""
    latency = {name: per[1] for name, per in latencies_in_turns(networks, shape).items()}
    deployed = {"original": networks["original"], "compressed": networks[rows[0]["key"]]}
    for row in rows:
        row["latency_ms_before"], row["latency_ms_after"] = latency["original"], latency[row.pop("key")]
    deployment = {"method": rows[0]["method"], "budget": rows[0]["budget"],
                  **export_checked_and_timed(deployed, work, shape, images)}
    return {"rows": rows, "runs": runs, "deployment": deployment}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=sorted(CHECKPOINTS), required=True)
    parser.add_argument("--checkpoint", default=None, help="default: the network's run of train.py in runs/")
    parser.add_argument("--cache_dir", default=".cache/passes")
    parser.add_argument("--work", default="runs/bench_architectures")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 2.0],
                        help="validation budgets (points); the first is also run with the cumulative share and "
                             "over the internal widths alone")
    parser.add_argument("--finetune_epochs", type=int, default=1,
                        help="fine-tuning after the lasso runs at each budget and after Torch-Pruning (0: none)")
    parser.add_argument("--peer_finetune_epochs", type=int, default=None,
                        help="fine-tuning after Torch-Pruning (default: --finetune_epochs)")
    parser.add_argument("--comparisons", nargs="*", choices=sorted(COMPARISONS),
                        default=["knapsack", "cumulative", "internal"],
                        help="runs beside the config's own (layer by layer, refit to the original) at the first "
                             "budget; none: --comparisons with no value")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/architectures.json"))
    args = parser.parse_args()
    args.checkpoint = args.checkpoint or CHECKPOINTS[args.network]
    if args.peer_finetune_epochs is None:
        args.peer_finetune_epochs = args.finetune_epochs
    results = read_results(args.out, {"rows": [], "runs": {}, "deployment": {}})
    measured = main_runs(args, Path(args.work) / args.network)
    results["rows"] = [r for r in results["rows"] if r["network"] != args.network] + measured["rows"]
    results["runs"][args.network] = measured["runs"]
    results.setdefault("deployment", {})[args.network] = measured["deployment"]
    write_results(args.out, results)
    # the widths chosen per group at the first budget, beside the results (the run's own figure)
    figure = run_folder(args, Path(args.work) / args.network, f"macs{args.budgets[0]:g}") / "widths.png"
    if figure.is_file():
        shutil.copyfile(figure, args.out.with_name(f"architectures_{args.network}_widths.png"))


if __name__ == "__main__":
    configure_process()
    main()

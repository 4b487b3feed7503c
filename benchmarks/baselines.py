"""Is the lasso worth it? Every method at equal width on the demo network.

Part 1, one layer at a time (pen, then last, each in the original network): at every width
of WIDTHS, the certified lasso solution with exactly that many neurons (``lasso``), its
least-squares refit (``lasso_refit``), and the baselines of ``compression.baselines``
(``magnitude``, ``magnitude_refit``, ``activation``, Torch-Pruning's group magnitude and
Taylor importances): test accuracy of the network and train MSE of the layer.

Part 2, the whole network: the demo's two-layer compression (pen then last, 0.5-point
validation budget, with the refit) against Torch-Pruning at the same two widths, each
with 0 and 1 epoch of fine-tuning (``compression.finetune``, the same settings for all).

    python -m benchmarks.baselines [--checkpoint runs/alexnet_fashion/demo/checkpoints/best.ckpt]

Writes ``benchmarks/results/baselines.json`` (rows ``{layer, method, width, test_accuracy,
train_mse, finetune_epochs}``) and ``benchmarks/results/baselines.png``.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from callbacks.convergence import Convergence
from cli.setup import configure_process
from compression.baselines import torch_pruning_at_widths
from compression.finetune import FinetuneSettings, finetune
from compression.passes import DataPasses
from compression.pipeline import CompressionPipeline, LayerPlan
from compression.settings import Target, TrainerSettings
from datamodules.fashion_mnist import FashionMNISTDataModule
from models.registry import NetworkSpec
from models.checkpoints import network_from_state, read_checkpoint, save_network

# From 1/32 of the layer down to where accuracy collapses (41 = 4096 / 100). Wider lasso solutions
# need lambda below 1e-4 * lambda_max on this network, where one certified pen solve takes over
# ten minutes on two CPU cores; at full width (4,096) every method is the original network.
WIDTHS = [128, 64, 41, 32, 16, 8, 4, 2]
LAYERS = {"pen": "classifier.4", "last": "classifier.6"}
TRAINER = TrainerSettings(accelerator="cpu", enable_progress_bar=False)


def per_layer(pipeline: CompressionPipeline, network: torch.nn.Module, passes: DataPasses) -> list[dict]:
    rows = []
    for layer, module in LAYERS.items():
        start = time.perf_counter()
        info, problem, _ = pipeline.layer_problem(network, module, passes)
        plan = LayerPlan(layer, module, "width", 0)
        search = pipeline._searcher(problem, plan, None)
        lasso = {k: search.at_width(k).V for k in WIDTHS}  # certified, exactly k neurons each
        test = passes.cut_inputs(network, "test", [c.name for c in info.consumers])
        for row in pipeline.compare_baselines(network, info, problem, plan, passes, test, WIDTHS, lasso):
            rows.append({"layer": layer, **row, "finetune_epochs": 0})
        original = passes.evaluate(network, "test")[0].accuracy
        rows.append({"layer": layer, "method": "original", "width": problem.groups, "kept": problem.groups,
                     "test_accuracy": original, "train_mse": 0.0, "finetune_epochs": 0})
        print(f"{layer}: {len(WIDTHS)} widths in {time.perf_counter() - start:.0f} s", flush=True)
        print_table([r for r in rows if r["layer"] == layer])
    return rows


def whole_network(args: argparse.Namespace, network: torch.nn.Module, info: dict, dm, work: Path) -> list[dict]:
    """The demo's compression with 1 fine-tuning epoch, then Torch-Pruning at its widths."""
    tune = FinetuneSettings(epochs=1)
    pipeline = make_pipeline(network, info, dm, work / "lasso", args.cache_dir, debias=True, finetune=tune)
    report = pipeline.run(["pen", "last"], target=Target(max_accuracy_drop=0.5, share="cumulative"))
    widths = [e["width_after"] for e in report["layers"]]
    rows = [{"layer": "pen+last", "method": "lasso_refit", "width": widths, "finetune_epochs": epochs,
             "test_accuracy": report[stage]["test_accuracy"], "train_loss": report[stage]["train_loss"]}
            for epochs, stage in ((0, "after_surgery"), (1, "after"))]
    rows.append({"layer": "pen+last", "method": "original", "width": [4096, 4096], "finetune_epochs": 0,
                 "test_accuracy": report["before"]["test_accuracy"], "train_loss": report["before"]["train_loss"]})
    passes = DataPasses(dm, "classifier", TRAINER, Path(args.cache_dir), work, batch_size=dm.hparams.batch_size)
    shape = tuple(dm.test_set[0][0].shape)
    for importance in ("magnitude", "taylor"):
        pruned = torch_pruning_at_widths(network, dict(zip(LAYERS.values(), widths)), importance,
                                         example_inputs=torch.zeros(1, *shape), loss_batches=pipeline._loss_batches())
        folder = work / f"torch_pruning_{importance}"
        saved = save_network(pruned, folder / "pruned.pt", NetworkSpec("alexnet", info["num_classes"]))
        tuned, _ = finetune(saved, NetworkSpec("alexnet", info["num_classes"]), dm, tune, info.get("hparams") or {}, folder,
                            {**TRAINER.distributed(), "enable_progress_bar": False})
        for epochs, net in ((0, pruned), (1, tuned.eval())):
            test = passes.evaluate(net, "test", once=epochs > 0)[0]  # fine-tuned: new layers before the head
            train = passes.evaluate(net, "train", once=epochs > 0)[0]
            rows.append({"layer": "pen+last", "method": f"torch_pruning_{importance}", "width": widths,
                         "finetune_epochs": epochs, "test_accuracy": test.accuracy, "train_loss": train.loss})
    for row in rows:
        print(f"{row['method']:28s} widths {row['width']}  {row['finetune_epochs']} epochs  "
              f"test {100 * row['test_accuracy']:.2f}%", flush=True)
    return rows


def make_pipeline(network, info, dm, run_dir: Path, cache_dir: str, **kwargs) -> CompressionPipeline:
    return CompressionPipeline(network=network, spec=NetworkSpec("alexnet", info["num_classes"]), datamodule=dm,
                               run_dir=run_dir, make_convergence=partial(Convergence, tol=1e-4, verbose=False),
                               trainer=TRAINER, cache_dir=Path(cache_dir), train_hparams=info.get("hparams") or {},
                               **kwargs)


def print_table(rows: list[dict]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    widths = list(dict.fromkeys(r["width"] for r in rows))
    print(f"{'width':>7s}" + "".join(f"{m[:16]:>17s}" for m in methods))
    for k in widths:
        cells = {r["method"]: r for r in rows if r["width"] == k}
        print(f"{k:7d}" + "".join(f"{100 * cells[m]['test_accuracy']:16.2f}%" if m in cells else f"{'':17s}"
                                   for m in methods))


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, layer in enumerate(LAYERS):
        layer_rows = [r for r in rows if r["layer"] == layer and r["method"] != "original"]
        for r in rows:
            if r["layer"] == layer and r["method"] == "original":
                axes[0, col].axhline(100 * r["test_accuracy"], color="gray", linestyle=":", label="original network")
        for method in dict.fromkeys(r["method"] for r in layer_rows):
            points = sorted((r["width"], r) for r in layer_rows if r["method"] == method)
            axes[0, col].plot([w for w, _ in points], [100 * r["test_accuracy"] for _, r in points], "o-", label=method)
            if all("train_mse" in r for _, r in points):
                axes[1, col].plot([w for w, _ in points], [r["train_mse"] for _, r in points], "o-", label=method)
        for row, label in ((0, "test accuracy (%)"), (1, "train MSE of the layer")):
            axes[row, col].set_xscale("log", base=2)
            axes[row, col].set_xlabel(f"neurons kept (into {LAYERS[layer]}, {layer})")
            axes[row, col].set_ylabel(label)
            axes[row, col].grid(alpha=0.3)
        axes[1, col].set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Equal-width comparison on the demo network (AlexNet, Fashion-MNIST), no fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> None:
    state, info = read_checkpoint(args.checkpoint)
    network = network_from_state(state, NetworkSpec("alexnet", info["num_classes"])).eval()
    dm = FashionMNISTDataModule(root="data", batch_size=500, num_workers=2, val_fraction=0.1)
    dm.prepare_data()
    dm.setup("fit")
    work = Path(args.work)
    rows: list[dict] = []
    if args.skip_layers and args.out.is_file():  # keep the per-layer rows of an earlier run
        rows = [r for r in json.loads(args.out.read_text()) if r["layer"] in LAYERS]
    if not args.skip_layers:
        pipeline = make_pipeline(network, info, dm, work / "layers", args.cache_dir)
        passes = DataPasses(dm, "classifier", TRAINER, Path(args.cache_dir), work, batch_size=500)
        rows += per_layer(pipeline, network, passes)
        plot(rows, args.out.with_suffix(".png"))
        args.out.write_text(json.dumps(rows, indent=1))
    if not args.skip_network:
        rows += whole_network(args, network, info, dm, work / "network")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"written: {args.out}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    configure_process()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/alexnet_fashion/demo/checkpoints/best.ckpt")
    parser.add_argument("--cache_dir", default=".cache/passes")
    parser.add_argument("--work", default="runs/bench_baselines")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/baselines.json"))
    parser.add_argument("--skip_layers", action="store_true")
    parser.add_argument("--skip_network", action="store_true")
    main(parser.parse_args())

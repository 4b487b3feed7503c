"""A residual stream's consumers, refit together: to the original network's outputs, or to the
current network's (``compression.reference``, ``ReferenceOutputs.aims_at``)?

On a network compressed layer by layer (``benchmarks.architectures``' run of ResNet-56, its
``surgery.pt`` and ``report.json``), one stream group (``--layer``, named by its first
consumer) is refit at full width and at 3/4 and 1/2 of its channels (kept by the trained
weights' group norms, so both refits keep the same ones), from statistics whose outputs are
the original's (the channels removed so far replayed from the report) or the current
network's. Printed and written: validation accuracy with the refit applied to the first k
consumers, k = 1..m, and at full width to each consumer alone. Accuracy that falls as more
consumers are refit together, where each alone costs little, is the refits correcting one
another's corrections.

    python -m benchmarks.stream_refit [--run runs/bench_architectures/resnet56/runs/compress_resnet56_fashion/macs1]
        [--layer layer3.1.conv1] [--stats_images 4000]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import read_results, write_results
from benchmarks.architectures import TRAINER
from compression.layer_problem import LayerProblem
from compression.passes import DataPasses
from compression.reference import ReferenceOutputs
from datamodules.fashion_mnist import FashionMNISTDataModule
from grouplasso.problem import debias
from models.checkpoints import load_network
from models.layers import analyse_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path,
                        default=Path("runs/bench_architectures/resnet56/runs/compress_resnet56_fashion/macs1"))
    parser.add_argument("--original", default="runs/resnet56_fashion/trained/checkpoints/best.ckpt")
    parser.add_argument("--layer", default="layer3.1.conv1")
    parser.add_argument("--stats_images", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_refit.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    report = json.loads((args.run / "report.json").read_text())
    original = load_network(args.original).eval()
    network = load_network(str(args.run / "surgery.pt")).eval()
    targets = ReferenceOutputs(original)
    for entry in report["layers"]:
        targets.removed(analyse_layer(original, entry["module"]), entry["kept_indices"])
    dm = FashionMNISTDataModule(root="data", preset="fashion_32", batch_size=500, num_workers=2, val_fraction=0.1)
    dm.prepare_data()
    dm.setup("fit")
    passes = DataPasses(dm, "", TRAINER, None, args.run.parent / "stream_refit",
                        conv_sampling={"positions": 64, "seed": 0}, train_limit=args.stats_images)
    group = analyse_layer(network, args.layer)
    names = [c.name for c in group.consumers]
    cut = passes.cut_inputs(network, "val", names)
    result = {"layer": args.layer, "consumers": names, "stats_images": args.stats_images,
              "val_accuracy": passes.accuracy(network, cut, {}), "refits": []}
    print(f"{args.layer}: consumers {names}; validation now {100 * result['val_accuracy']:.2f}%", flush=True)
    for aim in ("original", "current"):
        extra = {"targets": original, "output_index": targets.output_index} if aim == "original" else {}
        train, _ = passes.evaluate(network, "train", names, **extra)
        problem = LayerProblem.of_group(network, group, train.stats)
        W = problem.W.to(torch.float64)
        norms = W.reshape(W.shape[0], problem.groups, problem.group).norm(dim=(0, 2))
        for width in (problem.groups, 3 * problem.groups // 4, problem.groups // 2):
            kept = torch.zeros(problem.groups, dtype=torch.bool)
            kept[norms.argsort(descending=True)[:width]] = True
            weights = problem.weights_with_groups(debias(problem.stats, W * kept.repeat_interleave(problem.group)))
            row = {"refit_to": aim, "width": width, "channels": problem.groups,
                   "first_k": [passes.accuracy(network, cut, dict(list(weights.items())[:k]))
                               for k in range(1, len(names) + 1)]}
            if width == problem.groups:
                row["alone"] = [passes.accuracy(network, cut, {name: weights[name]}) for name in names]
            result["refits"].append(row)
            print(f"refit to the {aim:8s} {width}/{problem.groups}: first k consumers "
                  f"{[round(100 * a, 2) for a in row['first_k']]}"
                  + (f"; each alone {[round(100 * a, 2) for a in row['alone']]}" if "alone" in row else ""), flush=True)
    results = read_results(args.out, {})
    results[args.layer] = result
    write_results(args.out, results)


if __name__ == "__main__":
    main()

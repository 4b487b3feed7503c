"""How fast a candidate's validation pass runs: the tail of the network after a cut
(``models.tail.tail``, what ``DataPasses.accuracy`` runs for every candidate) as it is, against
the same tail prepared by ``models.tail.for_inference`` (BatchNorm folded into the convolution
before it, channels-last layout), timed in turns in one process on real validation images.

Printed and written (``benchmarks/results/validation_tail.json``): seconds per pass of each,
their ratio, the largest logit difference and the images whose predicted class differs.

    python -m benchmarks.validation_tail [--checkpoint runs/resnet56_fashion/trained/checkpoints/best.ckpt]
        [--layer layer1.0.conv2] [--images 2000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks import read_results, write_results
from datamodules.fashion_mnist import FashionMNISTDataModule
from models.checkpoints import load_network
from models.tail import cut_before, for_inference, prefix, tail


def seconds_per_pass(module: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 4096) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(inputs), batch_size):
            module(inputs[first:first + batch_size])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/resnet56_fashion/trained/checkpoints/best.ckpt")
    parser.add_argument("--layer", default="layer1.0.conv2", help="the tail starts at the cut before this layer")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/validation_tail.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    network = load_network(args.checkpoint).eval()
    dm = FashionMNISTDataModule(root="data", preset="fashion_32", batch_size=500, num_workers=0, val_fraction=0.1)
    dm.prepare_data()
    dm.setup("fit")
    images = torch.stack([dm.val_set[i][0] for i in range(args.images)])
    cut = cut_before(network, [args.layer])
    with torch.no_grad():
        middle = prefix(network, cut)(images)
    plain = tail(network, cut).eval()
    fast = for_inference(plain)
    layout = middle.contiguous(memory_format=torch.channels_last) if middle.dim() == 4 else middle
    times: dict[str, list[float]] = {"tail": [], "for_inference": []}
    for _ in range(args.rounds):  # in turns: both see the same machine load
        times["tail"].append(seconds_per_pass(plain, middle))
        times["for_inference"].append(seconds_per_pass(fast, layout))
    with torch.no_grad():
        a, b = plain(middle), fast(layout)
    best = {name: min(values) for name, values in times.items()}
    result = {"checkpoint": args.checkpoint, "layer": args.layer, "cut": cut, "images": args.images,
              "seconds": best, "speedup": best["tail"] / best["for_inference"],
              "max_abs_logit_difference": float((a - b).abs().max()),
              "predictions_differing": int((a.argmax(1) != b.argmax(1)).sum()),
              "threads": torch.get_num_threads()}
    print(f"tail after {cut!r} ({args.images} images): {best['tail']:.2f} s as it is, {best['for_inference']:.2f} s "
          f"prepared: {result['speedup']:.2f}x; logits within {result['max_abs_logit_difference']:.1e}, "
          f"{result['predictions_differing']} predictions differ")
    results = read_results(args.out, {})
    results[Path(args.checkpoint).parts[1] if len(Path(args.checkpoint).parts) > 1 else args.checkpoint] = result
    write_results(args.out, results)


if __name__ == "__main__":
    main()

"""Deployment latency of the convolution config's compressed AlexNet: ONNX Runtime against
PyTorch, batch 1 and 64, original against compressed, every network timed in turns in one
process (``models.export.export_checked_and_timed``, what ``compress.py --export onnx`` reports).

The compressed networks have the channel counts of ``benchmarks.conv``'s runs of
``compress.py --config alexnet_fashion_conv.yaml`` (``benchmarks/results/conv.json``: conv2..conv5
inputs, pen and last; the results file records widths, not which channels, so the first ones
are kept), and each of them with every width rounded up to a multiple of ``--round_to`` (what
``compress.py --round_to 8`` would keep of the same supports; a run with it compresses later
layers on a network already rounded, so its own widths differ: are odd channel counts what slows
ONNX Runtime down?). Weights are random (seeded): latency depends on the layers' shapes only, so this
needs neither the trained network nor the hour its compression takes; each ONNX file is still
checked against PyTorch on random images.

With ``--runs``, compression runs' own networks join them (each run folder's ``compressed.pt``,
and the trained network it was compressed from in place of the random original: all the runs
must come from one checkpoint), exported by this code whenever they were compressed.

    python -m benchmarks.export_latency [--conv_results benchmarks/results/conv.json] [--round_to 8]
        [--runs runs/compress_alexnet_fashion/version_0 runs/compress_alexnet_fashion_conv/round8]

Writes ``benchmarks/results/export_latency.json``: the widths of every network built from a
budget's widths (``widths``) and every run's folder and widths (``runs``), and the export's
check and latencies (``{onnx: {name: {bytes, max_abs_difference, ...}}, onnx_latency_ms,
torch_latency_ms}``, latencies ``{name: {batch: ms}}``).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import read_results, write_results
from cli.setup import configure_process
from grouplasso import rounded_width
from models.export import export_checked_and_timed
from models.checkpoints import load_network
from models.layers import analyse_layer
from models.registry import build_model
from models.surgery import prune_channels

RESULTS = Path(__file__).parent / "results"
SHAPE = (3, 64, 64)  # Fashion-MNIST as the demo network reads it


def narrowed(model: nn.Module, widths: dict[str, int]) -> nn.Module:
    """``model`` with, for every layer (module path -> width) in order, only its first ``width``
    input channels (or neurons) left: the shapes of the compressed network."""
    for module, width in widths.items():
        prune_channels(model, analyse_layer(model, module), torch.arange(width))
    return model.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conv_results", type=Path, default=RESULTS / "conv.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "export_latency.json")
    parser.add_argument("--round_to", type=int, default=8, help="also time the widths rounded up to this multiple (1: not)")
    parser.add_argument("--runs", type=Path, nargs="*", default=[],
                        help="compress.py run folders (report.json, compressed.pt) whose networks are timed too")
    args = parser.parse_args(argv)
    configure_process()
    runs = read_results(args.conv_results, {}).get("network", {}).get("runs", {})
    if not runs:
        raise SystemExit(f"{args.conv_results} holds no runs of the convolution config: run python -m benchmarks.conv")
    torch.manual_seed(0)
    reports = {folder.name: read_results(folder / "report.json", {}) for folder in args.runs}
    checkpoints = {report.get("checkpoint") for report in reports.values()}
    if len(checkpoints) > 1 or None in checkpoints:
        raise SystemExit(f"--runs must be compressions of one checkpoint, with their report.json: {sorted(map(str, checkpoints))}")
    original = load_network(checkpoints.pop()) if reports else build_model("alexnet", 10).eval()
    widths = {f"{budget}-point": run["widths"] for budget, run in runs.items()}
    if args.round_to > 1:
        before = {budget: {e["module"]: e["width_before"] for e in run["layers"]} for budget, run in runs.items()}
        widths.update({f"{budget}-point, round_to {args.round_to}": {
            module: rounded_width(w, args.round_to, before[budget][module]) for module, w in run["widths"].items()}
            for budget, run in runs.items()})
    networks = {"original": original, **{f"run {name}": load_network(report["network"]) for name, report in reports.items()}}
    for name, shape in widths.items():
        compressed = build_model("alexnet", 10)
        compressed.load_state_dict(original.state_dict())
        networks[name] = narrowed(compressed, shape)
    images = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as folder:
        measured = export_checked_and_timed(networks, Path(folder), SHAPE, images, ["onnx"])
    for files in measured["onnx"].values():
        files.pop("file")  # a temporary folder's
    onnx, torch_ms = measured["onnx_latency_ms"], measured["torch_latency_ms"]
    print(f"{'network':22s} {'ONNX b1':>9s} {'ONNX b64':>9s} {'torch b1':>9s} {'torch b64':>9s}   max abs difference")
    for name in networks:
        print(f"{name:22s} {onnx[name][1]:9.2f} {onnx[name][64]:9.2f} {torch_ms[name][1]:9.2f} {torch_ms[name][64]:9.2f}"
              f"   {measured['onnx'][name]['max_abs_difference']:.1e}")
    for name in list(networks)[1:]:
        ratios = {f"{engine} batch {b}": per["original"][b] / per[name][b]
                  for engine, per in (("ONNX Runtime", onnx), ("PyTorch", torch_ms)) for b in (1, 64)}
        print(f"{name}: original / compressed latency: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    results = {"widths": widths, "runs": {name: {"folder": str(folder), "widths": report["after"].get("widths")}
                                          for (name, report), folder in zip(reports.items(), args.runs)}, **measured}
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()

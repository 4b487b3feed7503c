"""Transformers: a vision transformer's MLP widths and attention heads by the certified lasso,
against Torch-Pruning's head and MLP pruning at the same widths, with 0 and 1 epoch of
fine-tuning.

The network is the small ViT of ``configs/train/vit_fashion.yaml`` (torchvision's
``VisionTransformer``), trained here on Fashion-MNIST. The runs are those of
``benchmarks.architectures`` for it, without the comparisons that concern convolutions:
``compress.py --config vit_fashion.yaml`` (every block's MLP neurons and heads, each
candidate refit by least squares, one validation budget shared by the multiply-adds each
candidate saves) at each budget, with and without 1 epoch of fine-tuning; Torch-Pruning
(group magnitude and Taylor importance; heads removed whole, their units' importance
averaged, as its pruners do with ``prune_num_heads``) at the lasso's widths, with the same
fine-tuning; batch-1 CPU latency in turns; ONNX Runtime against PyTorch.

    python -m benchmarks.transformers [--checkpoint ...] [--budgets 1] [--finetune_epochs 1]

Writes ``benchmarks/results/transformers.json``: under ``rows`` one row per method and
fine-tuning length, ``{network, method, finetune_epochs, mlp_widths, heads, macs_before,
macs_after, encoder_macs_before, encoder_macs_after, test_accuracy_before,
test_accuracy_after, latency_ms_before, latency_ms_after}`` (``mlp_widths`` and ``heads``: per
block, after); under ``runs`` each compression's seconds, allocation and widths; under
``deployment`` the ONNX Runtime check and latencies. And ``transformers_widths.png``: per
block, the fraction of MLP neurons and of heads each lasso run keeps.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import write_results  # noqa: E402
from benchmarks.architectures import main_runs  # noqa: E402
from cli.setup import configure_process  # noqa: E402
from models.attention import HeadAttention  # noqa: E402
from models.profile import count_macs  # noqa: E402

CHECKPOINT = "runs/vit_fashion/trained/checkpoints/best.ckpt"


def blocks(network: nn.Module, shape: tuple) -> dict[str, Any]:
    """Per encoder block (in order), its MLP's hidden neurons and its heads; the encoder's
    multiply-adds (attention's matrix products included) for one image of ``shape``."""
    attention = [m for m in network.modules() if isinstance(m, HeadAttention)]
    mlps = [m[0] for name, m in network.named_modules() if name.endswith(".mlp") and isinstance(m, nn.Sequential)]
    return {"mlp_widths": [m.out_features for m in mlps], "heads": [a.num_heads for a in attention],
            "encoder_macs": count_macs(network, shape, within="encoder")}


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Kept fraction of MLP neurons and of heads per block, for each lasso run without fine-tuning."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    runs = [r for r in rows if r["method"] == "lasso_refit" and r["finetune_epochs"] == 0]
    for r in runs:
        for ax, key in zip(axes, ("mlp_widths", "heads")):
            kept = [a / b for a, b in zip(r[f"{key}_after"], r[f"{key}_before"])]
            ax.plot(range(len(kept)), kept, marker="o", label=f"{r['budget']:g}-point budget")
    for ax, title in zip(axes, ("MLP neurons kept", "attention heads kept")):
        ax.set_xticks(range(len(runs[0]["heads_after"])) if runs else [])
        ax.set_title(title)
        ax.set_xlabel("encoder block")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of the trained network's")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"written: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=CHECKPOINT)
    parser.add_argument("--cache_dir", default=".cache/passes")
    parser.add_argument("--work", default="runs/bench_transformers")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0])
    parser.add_argument("--finetune_epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/transformers.json"))
    args = parser.parse_args()
    args.network, args.no_comparisons = "vit", True
    measured = main_runs(args, Path(args.work), describe=blocks)
    rows = []
    for r in measured["rows"]:
        r["mlp_widths"], r["heads"] = r["mlp_widths_after"], r["heads_after"]
        rows.append(r)
        print(f"{r['method']:28s} {r['finetune_epochs']} ep: test {100 * r['test_accuracy_after']:.2f}% "
              f"({100 * (r['test_accuracy_after'] - r['test_accuracy_before']):+.2f}), encoder MACs 1/"
              f"{r['encoder_macs_before'] / r['encoder_macs_after']:.2f}, MLP {r['mlp_widths']}, heads {r['heads']}")
    figure(rows, args.out.with_name("transformers_widths.png"))
    write_results(args.out, {"rows": rows, "runs": measured["runs"], "deployment": measured["deployment"]})


if __name__ == "__main__":
    configure_process()
    main()

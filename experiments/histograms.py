"""Histograms of numbers of nonzero columns, one panel per setting, with reference lines."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


@dataclass
class Panel:
    """One setting: ``counts`` (one per trial) drawn as bars, optionally ``other`` counts (a
    second series, e.g. the interior-point solutions) as an outline; ``lines`` are vertical
    reference lines (x, label, matplotlib line style)."""

    title: str
    counts: Sequence[int]
    label: str
    other: Optional[Sequence[int]] = None
    other_label: str = ""
    lines: list[tuple[float, str, str]] = field(default_factory=list)


def plot_histograms(panels: Sequence[Panel], xlabel: str, suptitle: str = "") -> Figure:
    """A row of histograms with integer bins (one bar per count)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1.6, 3.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        values = list(panel.counts) + list(panel.other or [])
        lo = min(values + [x for x, _, _ in panel.lines])
        hi = max(values + [x for x, _, _ in panel.lines])
        bins = np.arange(np.floor(lo) - 0.5, np.ceil(hi) + 1.5)
        ax.hist(panel.counts, bins=bins, color="tab:blue", alpha=0.8, label=panel.label)
        if panel.other is not None:
            ax.hist(panel.other, bins=bins, histtype="step", color="tab:orange", linewidth=1.2, label=panel.other_label)
        for x, label, style in panel.lines:
            ax.axvline(x, color="black" if style == "-" else "tab:red", linestyle=style, linewidth=1.0, label=label)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(xlabel)
    axes[0][0].set_ylabel("trials")
    # One legend for the row (the series and line styles are the same in every panel).
    fig.legend(*axes[0][-1].get_legend_handles_labels(), loc="center right", fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    return fig


def save_figure(fig: Figure, path: Path, dpi: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)

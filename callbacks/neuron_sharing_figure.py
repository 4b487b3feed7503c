"""The paper's neuron-sharing figure and the final neuron counts of a ``NeuronSharing`` run.

One panel per output j: every neuron active for that output is a dot at (theta, offset),
where relu(w.x + b) = ||w|| relu(e_theta.x + offset) with e_theta = (cos theta, sin theta)
(``models.shallow_relu.knots``); the dot's area is proportional to |V[j, k]| ||(w_k, b_k)||
(the neuron's weight for output j at unit input norm), red for a positive weight, blue for
a negative one, outlined in black if the neuron is active for every output (shared). The
teacher's neurons are black crosses. With weight decay the survivors sit at (or near) the
teacher's neurons and appear in every panel; without it all neurons stay.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback

from models.shallow_relu import ShallowReLU, active_mask, amplitudes, knots, neuron_report


def draw_neuron_sharing(net: ShallowReLU, active_tol: float, teacher: Optional[ShallowReLU] = None,
                        title: str = "") -> Figure:
    """The figure for a 2-input network ``net`` (one panel per output), as a matplotlib Figure."""
    net = copy.deepcopy(net).to(torch.float64)  # a copy: Module.to works in place
    amp = amplitudes(net)
    mask = active_mask(net, active_tol)
    shared = mask.all(dim=0)
    theta, offset = knots(net.hidden.weight, net.hidden.bias)
    sign = torch.sign(net.output.weight)
    top = float(amp.max()) if float(amp.max()) > 0 else 1.0
    finite = offset[mask.any(dim=0) & torch.isfinite(offset)].abs()
    limit = min(10.0, 1.05 * max(3.0, float(finite.max()) if finite.numel() else 0.0))

    out_dim = amp.shape[0]
    fig, axes = plt.subplots(1, out_dim, figsize=(4.2 * out_dim, 3.6), sharey=True, squeeze=False)
    for j, ax in enumerate(axes[0]):
        k = mask[j].nonzero().flatten()
        sizes = (300.0 * amp[j, k] / top).clamp(min=4.0)
        colors = ["tab:red" if s > 0 else "tab:blue" for s in sign[j, k].tolist()]
        edges = ["black" if shared[i] else "none" for i in k.tolist()]
        ax.scatter(theta[k].numpy(), offset[k].clamp(-limit, limit).numpy(), s=sizes.numpy(), c=colors,
                   edgecolors=edges, linewidths=0.8, alpha=0.75)
        if teacher is not None:
            t_theta, t_offset = knots(teacher.hidden.weight.double(), teacher.hidden.bias.double())
            ax.scatter(t_theta.numpy(), t_offset.clamp(-limit, limit).numpy(), marker="x", c="black", s=40,
                       label="teacher neurons", zorder=3)
        ax.set_xlim(-math.pi, math.pi)
        ax.set_ylim(-limit, limit)
        ax.set_xlabel(r"$\theta$ (direction of $w$)")
        ax.set_title(f"output {j + 1}: {len(k)} active, {int(shared.sum())} shared", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(r"$b / \|w\|$ (clipped to the axes)")
    if teacher is not None:
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper right", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class NeuronSharingFigure(Callback):
    """At the end of training: print and log the neuron counts (``final/*`` scalars), write
    them to ``neurons.json``, draw the figure into TensorBoard (tag ``neuron_sharing``) and
    save it as ``filename`` in the logger's directory (or ``default_root_dir``).

    Args:
        every_n_epochs: also draw the figure into TensorBoard every this many epochs (0: only
            at the end), to watch neurons die.
        filename: the PNG's name. dpi: its resolution.
    """

    def __init__(self, every_n_epochs: int = 0, filename: str = "neuron_sharing.png", dpi: int = 100) -> None:
        self.every_n_epochs = every_n_epochs
        self.filename = filename
        self.dpi = dpi
        self.png_path: Optional[Path] = None

    def _figure(self, trainer: pl.Trainer, pl_module: Any) -> Figure:
        hp = pl_module.hparams
        teacher = getattr(trainer.datamodule, "teacher", None) if trainer.datamodule is not None else None
        title = f"{hp.regularization}: {int(pl_module.iterations):,} iterations, lr {hp.lr:g}, reg {hp.reg:g}"
        return draw_neuron_sharing(pl_module.net, hp.active_tol, teacher, title)

    def _add_to_tensorboard(self, trainer: pl.Trainer, fig: Figure) -> None:
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure("neuron_sharing", fig, global_step=trainer.global_step, close=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        due = self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if due and trainer.is_global_zero:
            fig = self._figure(trainer, pl_module)
            self._add_to_tensorboard(trainer, fig)
            plt.close(fig)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        report = neuron_report(pl_module.net, pl_module.hparams.active_tol)
        out_dim = pl_module.hparams.out_dim
        per_output = ", ".join(f"output {j + 1}: {report[f'active_output{j}']}" for j in range(out_dim))
        print(f"[neuron sharing] {pl_module.hparams.regularization}: {report['active']} of {report['width']} neurons "
              f"active ({per_output}); {report['shared']} shared by all outputs")
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"final/{k}": float(v) for k, v in report.items()}, step=trainer.global_step)
        folder = Path(trainer.logger.log_dir if trainer.logger is not None and trainer.logger.log_dir
                      else trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "neurons.json").write_text(json.dumps(
            {**report, "regularization": pl_module.hparams.regularization,
             "iterations": int(pl_module.iterations), "active_tol": pl_module.hparams.active_tol}, indent=2) + "\n")
        fig = self._figure(trainer, pl_module)
        self._add_to_tensorboard(trainer, fig)
        self.png_path = folder / self.filename
        fig.savefig(self.png_path, dpi=self.dpi)
        plt.close(fig)

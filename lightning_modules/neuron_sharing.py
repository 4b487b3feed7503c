"""Neuron sharing (the paper's synthetic experiment): a shallow ReLU student 2 -> width -> 2
trained full-batch by SGD on a teacher's data, with the proximal weight decay, ordinary
weight decay, or no regularisation.

    python train.py --config neuron_sharing.yaml                                  # proximal weight decay
    python train.py --config neuron_sharing.yaml --config neuron_sharing_wd.yaml    # weight decay through the optimizer
    python train.py --config neuron_sharing.yaml --config neuron_sharing_none.yaml  # unregularised
"""
from __future__ import annotations

from typing import Callable, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor

from models.shallow_relu import (
    ShallowReLU, mse_gradients_, neuron_report, normalise_inputs_keeping_function_, path_penalty, proximal_map_,
)


class NeuronSharing(pl.LightningModule):
    """Full-batch SGD on L = mean((net(X) - Y)^2), ``steps_per_batch`` SGD iterations per
    Lightning training step (so 1e6 iterations are 100 epochs of 10,000, not 1e6 Lightning
    steps, whose per-step overhead would dominate the run).

    Each iteration: the gradient in closed form (``models.shallow_relu.mse_gradients_``,
    checked against autograd by the tests), then ``torch.optim.SGD.step``, then by mode:
      * ``prox``: the proximal weight-decay step (group soft-threshold of the output columns
        by lr * reg, input vectors projected onto the unit sphere; see
        ``models.shallow_relu`` for why this is the exact proximal-gradient step);
      * ``weight_decay``: nothing more; the optimizer's ``weight_decay = reg`` adds reg * theta
        to every gradient (hidden weight and bias, output weight), i.e. (reg / 2) ||theta||^2;
      * ``none``: nothing more.

    Args:
        width: hidden neurons K. in_dim / out_dim: d and D (2 and 2 in the paper).
        regularization: ``prox``, ``weight_decay`` or ``none``.
        lr: SGD step size (0.2 in the paper). reg: lambda (5e-5 in the paper).
        steps_per_batch: SGD iterations per training step.
        active_tol: neuron k is active for output j if |V[j, k]| ||(w_k, b_k)|| exceeds
            ``active_tol`` times the largest such value (see ``neuron_report``).
    Logged every training step: ``train/loss`` (MSE), ``train/penalty`` (sum_k ||u_k|| ||v_k||),
    ``train/objective`` (loss + reg * penalty), ``train/iterations``, and
    ``neurons/active_output{j}``, ``neurons/shared``, ``neurons/active``.
    """

    def __init__(
        self,
        width: int = 100,
        in_dim: int = 2,
        out_dim: int = 2,
        regularization: Literal["prox", "weight_decay", "none"] = "prox",
        lr: float = 0.2,
        reg: float = 5e-5,
        steps_per_batch: int = 10_000,
        active_tol: float = 1e-4,
    ) -> None:
        super().__init__()
        if lr <= 0 or reg < 0 or steps_per_batch < 1 or not 0 <= active_tol < 1:
            raise ValueError("need lr > 0, reg >= 0, steps_per_batch >= 1 and 0 <= active_tol < 1")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.net = ShallowReLU(in_dim, width, out_dim)
        self.register_buffer("iterations", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        """The student's outputs."""
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD on the student, with ``weight_decay = reg`` only in ``weight_decay`` mode."""
        hp = self.hparams
        weight_decay = hp.reg if hp.regularization == "weight_decay" else 0.0
        return torch.optim.SGD(self.net.parameters(), lr=hp.lr, weight_decay=weight_decay)

    def on_fit_start(self) -> None:
        """In ``prox`` mode, before the first iteration: unit-norm input vectors, same function."""
        # Put the input vectors on the sphere before the first step (the same function):
        # the constraint of the proximal formulation then holds from the start.
        if self.hparams.regularization == "prox" and int(self.iterations) == 0:
            normalise_inputs_keeping_function_(self.net)

    def sgd_iteration(self, X: Tensor, Y: Tensor, step: Callable[[], object]) -> None:
        """One full-batch iteration: gradient, ``step()`` of the optimizer, and the proximal
        step in ``prox`` mode."""
        mse_gradients_(self.net, X, Y)
        step()
        if self.hparams.regularization == "prox":
            proximal_map_(self.net, self.hparams.lr * self.hparams.reg)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """``steps_per_batch`` full-batch iterations (manual optimization), then logs loss, penalty and neurons."""
        X, Y = batch
        lightning_optimizer = self.optimizers()
        with torch.no_grad():
            for _ in range(self.hparams.steps_per_batch - 1):
                # The bare torch optimizer: Lightning's wrapper costs more than the step itself.
                self.sgd_iteration(X, Y, lightning_optimizer.optimizer.step)
            # The last step goes through the wrapper, so that trainer.global_step (which
            # counts wrapper steps in manual optimization) counts training steps.
            self.sgd_iteration(X, Y, lightning_optimizer.step)
        self.iterations += self.hparams.steps_per_batch
        self._log_state(X, Y)

    @torch.no_grad()
    def _log_state(self, X: Tensor, Y: Tensor) -> None:
        loss = torch.mean((self.net(X) - Y) ** 2)
        penalty = path_penalty(self.net)
        metrics = {
            "train/loss": loss,
            "train/penalty": penalty,
            # The same regularised objective in every mode, so that runs compare.
            "train/objective": loss + self.hparams.reg * penalty,
            "train/iterations": self.iterations.to(loss.dtype),
        }
        metrics.update({f"neurons/{k}": float(v) for k, v in self.report().items() if k != "width"})
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        self.log("loss", loss, prog_bar=True, logger=False)

    def report(self) -> dict[str, int]:
        """Active neurons per output, shared by all outputs, and in total (``neuron_report``)."""
        return neuron_report(self.net, self.hparams.active_tol)

"""Training a classifier with weight decay: the network the project later compresses."""
from __future__ import annotations

from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from models import build_model
from models.checkpoints import load_state_dict_strict, read_checkpoint


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``arch`` with weight decay, accuracy by torchmetrics.

    Args:
        arch: ``alexnet`` (torchvision's) or ``vgg19`` (CIFAR variant with batch norm).
        num_classes: outputs of the last layer.
        optimizer: ``adam`` or ``sgd`` (with ``momentum``, Nesterov off).
        lr: learning rate; weight_decay: L2 coefficient given to the optimizer (the
            weight decay whose effect on width the project studies).
        schedule: ``constant``, ``cosine`` (to 0 over ``max_epochs``) or ``step``
            (x ``gamma`` every ``step_size`` epochs).
        init_checkpoint: start from these weights (any format ``models.checkpoints`` reads).
    Logged: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.
    The best (``val/acc``) and last checkpoints are kept.
    """

    def __init__(
        self,
        arch: Literal["alexnet", "vgg19"] = "alexnet",
        num_classes: int = 10,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        schedule: Literal["constant", "cosine", "step"] = "constant",
        step_size: int = 30,
        gamma: float = 0.1,
        init_checkpoint: Optional[str] = None,
    ) -> None:
        super().__init__()
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0 (got lr={lr}, weight_decay={weight_decay})")
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes)
        if init_checkpoint:
            load_state_dict_strict(self.model, read_checkpoint(init_checkpoint)[0], source=init_checkpoint)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        images, labels = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        metric(logits, labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return opt
        if hp.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs or 1))
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.step_size, gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def configure_callbacks(self) -> list[Callback]:
        callbacks: list[Callback] = []
        if self.trainer.checkpoint_callback is not None:  # unless enable_checkpointing: false
            callbacks.append(
                ModelCheckpoint(
                    monitor="val/acc", mode="max", save_last=True, filename="best",
                    auto_insert_metric_name=False,
                )
            )
        if self.trainer.logger is not None:
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        return callbacks

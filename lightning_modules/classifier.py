"""Training a classifier with weight decay: the network the project later compresses."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from models.checkpoints import CheckpointMismatchError, network_from_state, read_checkpoint
from models.registry import NetworkSpec


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``arch`` with weight decay, accuracy by torchmetrics.

    Args:
        arch: the network: a short name (``alexnet``, torchvision's; ``vgg19``, the CIFAR variant
            with batch norm; ``resnet20`` ... ``resnet110``, the CIFAR ResNets), any torchvision
            classification model by name (``resnet18``, ``mobilenet_v2``, ``efficientnet_b0``, ...),
            or any importable module as ``{class_path: package.module.Class, init_args: {...}}``
            (see ``models.registry``). It is saved with the checkpoint, so ``compress.py`` and
            ``load_network`` rebuild the network from it.
        num_classes: outputs of the last layer.
        small_input: give a torchvision network a stem for 32x32 images (stride 1, no max-pool;
            ``models.registry.SMALL_INPUT_STEMS``).
        optimizer: ``adam`` or ``sgd`` (with ``momentum``, Nesterov off).
        lr: learning rate; weight_decay: L2 coefficient given to the optimizer (the
            weight decay whose effect on width the project studies).
        schedule: ``constant``, ``cosine`` (to 0 over ``max_epochs``) or ``step``
            (x ``gamma`` every ``step_size`` epochs).
        schedule_interval: ``epoch`` (the above) or ``step``: the schedule moves after every
            optimizer step, ``cosine`` reaching 0 at the run's last step
            (``Trainer.estimated_stepping_batches``) and ``step`` counting ``step_size`` in
            steps; what a fine-tuning of one epoch needs to anneal at all.
        save_last: write ``last.ckpt`` (weights, optimizer and loop state: what ``--ckpt_path``
            resumes from; three times ``best.ckpt`` with Adam) after every epoch. ``false`` keeps
            only ``best.ckpt``, for short runs that will not be resumed.
        save_best: write ``best.ckpt`` (the weights of the epoch with the best ``val/acc``).
            ``false`` for runs whose result is their last epoch (fine-tuning).
        init_checkpoint: start from these weights (any format ``models.checkpoints`` reads),
            also a compressed network (``save_network``): the layers are resized to the file's
            (smaller) shapes, so fine-tuning keeps the network compressed.
        distill: the weight a of a teacher network's softened outputs in the training loss
            (``distillation_loss``; the teacher is given by ``distill_from``, e.g. the original
            network while a compressed one is fine-tuned); 0: cross-entropy alone.
        temperature: the softening T of ``distill``.
    Logged: ``train/loss`` (with ``distill``, the distillation loss), ``train/acc``, ``val/loss``,
    ``val/acc``, ``test/loss``, ``test/acc`` (cross-entropy).
    The best (``val/acc``) and last checkpoints are kept.
    """

    def __init__(
        self,
        arch: Union[str, dict[str, Any]] = "alexnet",
        num_classes: int = 10,
        small_input: bool = False,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        schedule: Literal["constant", "cosine", "step"] = "constant",
        step_size: int = 30,
        gamma: float = 0.1,
        schedule_interval: Literal["epoch", "step"] = "epoch",
        init_checkpoint: Optional[str] = None,
        save_last: bool = True,
        save_best: bool = True,
        distill: float = 0.0,
        temperature: float = 4.0,
    ) -> None:
        super().__init__()
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0 (got lr={lr}, weight_decay={weight_decay})")
        if not (0 <= distill <= 1 and temperature > 0):
            raise ValueError(f"distill must be in [0, 1] and temperature > 0 (got distill={distill}, "
                             f"temperature={temperature})")
        self.save_hyperparameters()
        spec = NetworkSpec(arch, num_classes, small_input)
        self.model = model_from_checkpoint(init_checkpoint, spec) if init_checkpoint else spec.build()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._teacher: Optional[torch.nn.Module] = None

    def distill_from(self, teacher: torch.nn.Module) -> None:
        """Train towards ``teacher``'s outputs too (``distill`` > 0). The teacher is frozen and
        kept out of the module's parameters, state dict and checkpoints."""
        # object.__setattr__: as a registered submodule it would be trained and saved
        object.__setattr__(self, "_teacher", teacher.eval().requires_grad_(False))

    def on_fit_start(self) -> None:
        if self.hparams.get("distill", 0.0) > 0:
            if self._teacher is None:
                raise ValueError("distill > 0 needs a teacher network: call Classifier.distill_from(network) "
                                 "before fitting, or set distill to 0")
            self._teacher.to(self.device)

    def forward(self, x: Tensor) -> Tensor:
        """The network's logits."""
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        images, labels = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        weight = self.hparams.get("distill", 0.0)
        if stage == "train" and weight > 0:
            with torch.no_grad():
                teacher = self._teacher(images)
            loss = distillation_loss(logits, teacher, labels, weight, self.hparams.temperature)
        metric(logits, labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of one training batch; logs ``train/loss`` (per step and epoch) and ``train/acc``."""
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Loss and accuracy of one validation batch, logged per epoch as ``val/loss`` and ``val/acc``."""
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Loss and accuracy of one test batch, logged per epoch as ``test/loss`` and ``test/acc``."""
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        """Adam or SGD with ``weight_decay``, plus the ``schedule`` (none when constant), moved
        every epoch or every optimizer step (``schedule_interval``)."""
        hp = self.hparams
        if hp.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return opt
        # checkpoints written before schedule_interval existed were epoch-wise
        interval = hp.get("schedule_interval", "epoch")
        if hp.schedule == "cosine":
            length = self.trainer.estimated_stepping_batches if interval == "step" else self.trainer.max_epochs
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(length or 1)))
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.step_size, gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}

    def configure_callbacks(self) -> list[Callback]:
        """Best (``val/acc``) and last checkpoints, in a trainer-given ModelCheckpoint's ``dirpath``; lr logging.

        ``best.ckpt`` holds the weights and hyper-parameters only (what testing, compression and
        fine-tuning read: a third of AlexNet's 0.7 GB with Adam's state); ``last.ckpt`` holds
        everything a resumed run needs."""
        callbacks: list[Callback] = []
        given = self.trainer.checkpoint_callback
        # Only when fitting: at test time Lightning calls this again, and new instances would
        # replace the ones that know the best checkpoint (``best_model_path`` would read '').
        if given is not None and self.trainer.state.fn == TrainerFn.FITTING:  # unless enable_checkpointing: false
            # These replace the trainer's ModelCheckpoint; keep the folder it was given (None: the log dir).
            dirpath = given.dirpath if isinstance(given, ModelCheckpoint) else None
            if self.hparams.get("save_best", True):  # checkpoints written before the option: true
                callbacks.append(ModelCheckpoint(dirpath=dirpath, monitor="val/acc", mode="max", filename="best",
                                                 auto_insert_metric_name=False, save_weights_only=True))
            if self.hparams.save_last:
                # the latest epoch, whole (monitor None: top-1 is the newest), under the name resumes use
                callbacks.append(ModelCheckpoint(dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
                                                 enable_version_counter=False))
        if self.trainer.logger is not None and self.trainer.state.fn == TrainerFn.FITTING:  # nothing to log in test
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        return callbacks


def distillation_loss(logits: Tensor, teacher: Tensor, labels: Tensor, weight: float, temperature: float) -> Tensor:
    """Hinton et al.'s knowledge distillation, for logits and teacher (B, C), labels (B,):
    (1 - a) CE(logits, labels) + a T^2 KL(softmax(teacher / T) || softmax(logits / T)), batch mean,
    with a = ``weight`` and T = ``temperature`` (the T^2 keeps the soft term's gradients at the
    hard term's scale)."""
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * F.cross_entropy(logits, labels) + weight * temperature ** 2 * soft


def model_from_checkpoint(path: str, spec: NetworkSpec) -> torch.nn.Module:
    """``spec.build()`` with the weights of ``path``, resized to its layer shapes when they are
    smaller (a compressed network), in train mode.

    Raises ``CheckpointMismatchError`` naming the keys when the file does not fit: missing or
    unexpected keys, or a layer larger than the architecture's (or another number of classes).
    """
    state, _ = read_checkpoint(path, arch=spec.arch)
    with torch.device("meta"):  # shapes only, no memory
        full = spec.build().state_dict()
    grown = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(full[k].shape)}"
        for k in set(full) & set(state)
        if state[k].ndim != full[k].ndim or any(a > b for a, b in zip(state[k].shape, full[k].shape))
    )
    last = [k for k, v in full.items() if k.endswith(".weight") and v.ndim == 2][-1]
    if last in state and state[last].shape[0] != spec.num_classes:
        grown.append(f"{last}: {state[last].shape[0]} outputs vs num_classes {spec.num_classes}")
    if grown:
        shown = ", ".join(grown[:12]) + (f", ... ({len(grown) - 12} more)" if len(grown) > 12 else "")
        raise CheckpointMismatchError(
            f"{path} does not fit the {spec.label} network with {spec.num_classes} classes:\n"
            f"  shape mismatches ({len(grown)}): {shown}\n"
            "  a compressed network's layers can only be smaller; check arch, num_classes or the file itself"
        )
    return network_from_state(state, spec, source=str(path)).train()

"""Recovery fine-tuning: a few epochs of ordinary training of the compressed network.

Compression removes neurons and refits a layer; a few epochs of training at a small
learning rate recover most of the accuracy lost. The network stays compressed: it is
trained with the ``Classifier`` started from the compressed file, whose layers keep the
file's (smaller) shapes, and the result is checked against the file's widths.

Everything goes to ``<run_dir>/finetune``: TensorBoard logs, the checkpoint a resumed run
needs (``checkpoints/last.ckpt``, after every epoch of a run of several) and, once finished,
``finetuned.pt`` (the network and its summary, the marker of a finished run; the result is the
last epoch's network, so no ``best.ckpt`` is written, and a run of one epoch writes no
checkpoint: it could only resume from its end). A run interrupted mid-way continues from
``last.ckpt`` when called again with the same ``run_dir`` and ends with the weights an
uninterrupted run ends with (the random number generators are saved in the checkpoints and
restored); a finished one is loaded, not redone. Either is reused only if it started from the
same weights (``started_from.sha256``); one of another network is refused with the folder named.
"""
from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from torch import nn

from compression.cache import fingerprint
from lightning_modules.classifier import Classifier
from models.checkpoints import network_from_state, read_checkpoint, save_network
from models.registry import NetworkSpec
from models.profile import layer_widths

# Without the training run's hyper-parameters (a plain state dict, the authors' files).
DEFAULT_HPARAMS: dict[str, Any] = {"optimizer": "adam", "lr": 1e-5, "momentum": 0.9, "weight_decay": 1e-4}
DONE_FILE = "finetuned.pt"
#: The SHA-256 of the weights a fine-tuning started from (``compression.cache.fingerprint``).
START_FILE = "started_from.sha256"


@dataclass
class FinetuneSettings:
    """How long and how fast to fine-tune after compression.

    Args:
        epochs: training epochs; 0 turns fine-tuning off.
        batch_size: images per optimizer step (per process). ``None``: the training run's (its
            DataModule's, recorded in ``train.py``'s checkpoint), else the compression's
            DataModule's. The learning rate below is the training run's scaled, and it was tuned
            at the training run's batch size: a compression reads its passes in batches of 500,
            and one epoch in those batches is a quarter of the steps of one at ResNet-56's 128.
        lr_factor: the fine-tuning learning rate is the training run's times this.
        lr: an absolute learning rate that overrides ``lr_factor`` (``None``: use the factor).
        dropout: the probability of every Dropout layer while fine-tuning (``None``: the
            network's own, 0.5 in AlexNet and VGG-19). Off by default because a compressed layer
            of a few neurons loses half of them to p = 0.5: the demo's conv-compressed network
            (10 and 9 neurons in pen and last) has a cross-entropy of 0.28 in eval mode and 9.2
            with its dropout on, and one epoch of training under that noise made it worse.
        distill: the weight of the original network's softened outputs in the loss (knowledge
            distillation, ``lightning_modules.classifier.distillation_loss``): the compressed
            network is trained towards what the network it came from says about each image, not
            only towards the labels. 0: the labels alone.
        temperature: the softening of ``distill``.
        anneal: the learning rate falls from its start to 0 along a cosine over the fine-tuning's
            optimizer steps (the Classifier's ``cosine`` schedule, moved every step), so that
            the last steps are small and the result is not the noise of its last batches;
            ``False``: constant.
    """

    epochs: int = 0
    batch_size: Optional[int] = None
    lr_factor: float = 0.1
    lr: Optional[float] = None
    dropout: Optional[float] = 0.0
    distill: float = 0.0
    temperature: float = 4.0
    anneal: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"finetune epochs must be an integer >= 0 (0: no fine-tuning), got {self.epochs!r}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"finetune batch_size must be a positive integer, or null for the training run's, "
                             f"got {self.batch_size!r}")
        if not (isinstance(self.lr_factor, (int, float)) and self.lr_factor > 0):
            raise ValueError(
                f"finetune lr_factor must be > 0 (the training lr is multiplied by it), got {self.lr_factor!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"finetune lr must be > 0, or null to use lr_factor, got {self.lr!r}")
        if self.dropout is not None and not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"finetune dropout must be in [0, 1), or null to keep the network's own, "
                             f"got {self.dropout!r}")
        if not (isinstance(self.distill, (int, float)) and 0 <= self.distill <= 1):
            raise ValueError(f"finetune distill must be in [0, 1] (0: the labels alone), got {self.distill!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"finetune temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.anneal, bool):
            raise ValueError(f"finetune anneal must be true or false, got {self.anneal!r}")


def _training_run(info: dict) -> Optional[dict]:
    """The training run's hyper-parameters in ``info`` (see ``finetune_settings_from_training``)."""
    return info.get("hparams", info if "lr" in info else None)


def carried_hparams(info: dict) -> dict:
    """``{"hparams": ...}``, the training run's hyper-parameters in ``info`` (as in
    ``finetune_settings_from_training``), for ``save_network``'s extra entries; ``{}`` without
    them. A compressed or fine-tuned file that carries them is read back by ``read_checkpoint``
    with ``info["hparams"]``, so compressing it again fine-tunes by the training run's recipe
    (optimizer, rate, weight decay, batch size), not by the plain state dict's default."""
    hparams = _training_run(info)
    return {"hparams": dict(hparams)} if hparams else {}


def finetune_batch_size(info: dict, settings: FinetuneSettings, datamodule: pl.LightningDataModule) -> int:
    """The batch size fine-tuning trains at: ``settings.batch_size``, else the training run's
    (``info`` as in ``finetune_settings_from_training``), else ``datamodule``'s."""
    if settings.batch_size is not None:
        return settings.batch_size
    trained = (_training_run(info) or {}).get("batch_size")
    return int(trained) if trained is not None else int(datamodule.hparams.batch_size)


def finetune_settings_from_training(info: dict, settings: Optional[FinetuneSettings] = None) -> dict:
    """Classifier keyword arguments for fine-tuning, from the training run's hyper-parameters.

    ``info`` is ``models.checkpoints.read_checkpoint``'s info (its ``"hparams"`` are used) or the
    hyper-parameters themselves. The optimizer, momentum and weight decay are the training run's;
    the learning rate is its ``lr * settings.lr_factor``, or ``settings.lr`` when given; the
    schedule is constant, or with ``settings.anneal`` a cosine to 0 over the optimizer steps. When the checkpoint has no hyper-parameters (a plain state dict, the
    paper authors' files), Adam with lr 1e-5 (or ``settings.lr``) and weight decay 1e-4.
    """
    settings = settings or FinetuneSettings()
    hparams = _training_run(info)
    if not hparams or "lr" not in hparams:
        out = dict(DEFAULT_HPARAMS)
        if settings.lr is not None:
            out["lr"] = settings.lr
    else:
        out = {k: hparams.get(k, DEFAULT_HPARAMS[k]) for k in ("optimizer", "momentum", "weight_decay")}
        out["lr"] = settings.lr if settings.lr is not None else float(hparams["lr"]) * settings.lr_factor
    if settings.anneal:
        return {**out, "schedule": "cosine", "schedule_interval": "step"}
    return {**out, "schedule": "constant"}


class RestoreRNG(Callback):
    """Saves the random number generators (torch, CUDA, numpy, random) in every checkpoint
    and restores them on resume, so that a resumed run draws what an uninterrupted one draws
    (shuffling, random crops, dropout). Stored as tensors and numbers only: the checkpoint
    still loads with ``torch.load(weights_only=True)``."""

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": list(random.getstate()),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("rng")
        if not state:
            return
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def finetune(
    network_file: Path,
    spec: NetworkSpec,
    datamodule: pl.LightningDataModule,
    settings: FinetuneSettings,
    train_hparams: dict,
    run_dir: Path,
    trainer_kwargs: dict,
    logger: Optional[Logger] = None,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    teacher: Optional[nn.Module] = None,
    replace_other: bool = False,
) -> tuple[nn.Module, dict]:
    """Fine-tune the compressed network saved at ``network_file`` for ``settings.epochs`` epochs.

    Args:
        network_file: the compressed network (``models.checkpoints.save_network``).
        datamodule: trains on its train split, validates on its val split (in batches of
            ``finetune_batch_size``).
        train_hparams: the training run's hyper-parameters (see ``finetune_settings_from_training``).
        run_dir: everything goes to ``run_dir/finetune`` (see the module doc); an interrupted
            run there is resumed, a finished one is loaded.
        trainer_kwargs: more ``pl.Trainer`` arguments (accelerator, devices, limits, ...).
        logger: default ``TensorBoardLogger(run_dir, name="finetune", version="")``.
        seed: ``pl.seed_everything(seed)`` first, so that the same call gives the same network.
        callbacks: more Trainer callbacks.
        teacher: the network ``settings.distill`` distils from (the original, uncompressed one).
        replace_other: a fine-tuning in ``run_dir/finetune`` that started from other weights is
            deleted and done again for this network (default: refused, with the folder named).
    Returns:
        the network with the last epoch's weights (an ordinary ``nn.Module``, eval mode, on the
        CPU, the layer widths of ``network_file``) and ``{"epochs", "batch_size", "lr",
        "optimizer", "weight_decay", "dropout", "distill", "temperature", "anneal", "val_accuracy",
        "seconds"}`` (``val_accuracy``: of the last epoch's validation, ``None`` without one;
        ``seconds``: of this call's training).
    """
    network_file, run_dir = Path(network_file), Path(run_dir)
    state, _ = read_checkpoint(network_file)
    compressed = network_from_state(state, spec, source=str(network_file))
    hparams = finetune_settings_from_training(train_hparams, settings)
    batch_size = finetune_batch_size(train_hparams, settings, datamodule)
    summary: dict[str, Any] = {"epochs": settings.epochs, "batch_size": batch_size, "lr": hparams["lr"],
                               "optimizer": hparams["optimizer"], "weight_decay": hparams["weight_decay"],
                               "dropout": settings.dropout, "distill": settings.distill,
                               "temperature": settings.temperature, "anneal": settings.anneal,
                               "val_accuracy": None, "seconds": 0.0}
    if settings.epochs == 0:
        return compressed, summary
    if settings.distill > 0 and teacher is None:
        raise ValueError("finetune distill > 0 needs the network to distil from (teacher=)")

    fit_dir = run_dir / "finetune"
    done = fit_dir / DONE_FILE
    # A finished or interrupted fine-tuning in fit_dir is reused only if it started from these
    # weights: another network of the same widths would pass every other check.
    start_file, start = fit_dir / START_FILE, fingerprint(state.items())
    if start_file.is_file() and start_file.read_text().strip() != start:
        if not replace_other:
            raise ValueError(f"{fit_dir} holds the fine-tuning of another network than {network_file} (the "
                             "weights it started from differ); delete that folder to fine-tune this one")
        shutil.rmtree(fit_dir)
    if done.is_file():
        done_state, done_info = read_checkpoint(done)
        previous = done_info.get("finetune", {})
        # runs finished before distillation, annealing and the batch size existed: labels alone, constant
        # rate, the compression's DataModule's batch size
        previous = {"distill": 0.0, "temperature": settings.temperature, "anneal": False,
                    "batch_size": "the compression's DataModule's", **previous}
        changed = {k: (previous.get(k), summary[k]) for k in ("epochs", "batch_size", "lr", "optimizer", "weight_decay",
                                                              "dropout", "distill", "temperature", "anneal")
                   if previous.get(k) != summary[k]}
        if changed:
            differences = ", ".join(f"{k}: {then} then, {now} now" for k, (then, now) in changed.items())
            raise ValueError(f"{done} was fine-tuned with other settings ({differences}); "
                             "delete that folder to fine-tune again")
        network = network_from_state(done_state, spec, source=str(done))
        _check_still_compressed(network, compressed, network_file)
        return network, previous

    reserved = sorted(set(trainer_kwargs) & {"max_epochs", "default_root_dir", "logger", "callbacks"})
    if reserved:
        raise ValueError(f"finetune sets {', '.join(reserved)} itself: leave them out of trainer_kwargs "
                         "(use settings.epochs, run_dir, logger, callbacks)")
    if batch_size != datamodule.hparams.batch_size:
        if not hasattr(datamodule, "with_batch_size"):
            raise ValueError(f"fine-tuning at batch size {batch_size} needs a DataModule with with_batch_size() "
                             f"(datamodules.base.ImageDataModule); {type(datamodule).__name__} has none: set "
                             f"finetune.batch_size to its own, {datamodule.hparams.batch_size}")
        datamodule = datamodule.with_batch_size(batch_size)
    pl.seed_everything(seed, verbose=False)
    module = Classifier(arch=spec.arch, num_classes=spec.num_classes, small_input=spec.small_input,
                        init_checkpoint=str(network_file), save_best=False, distill=settings.distill,
                        temperature=settings.temperature, **hparams)
    if settings.distill > 0:
        module.distill_from(teacher)
    if settings.dropout is not None:
        for layer in module.model.modules():
            if isinstance(layer, nn.Dropout):
                layer.p = float(settings.dropout)
    # Checkpoints only for resuming (with Adam, three times the network), so none for one epoch:
    # it could only resume from its end, where finetuned.pt is written.
    resumable = settings.epochs > 1
    trainer = pl.Trainer(
        **trainer_kwargs,
        max_epochs=settings.epochs,
        default_root_dir=fit_dir,
        logger=logger if logger is not None else TensorBoardLogger(run_dir, name="finetune", version="",
                                                                   default_hp_metric=False),
        # The Classifier's own ModelCheckpoint (last) replaces this one and keeps its folder.
        enable_checkpointing=resumable,
        callbacks=[*([ModelCheckpoint(dirpath=fit_dir / "checkpoints", save_last=True)] if resumable else []),
                   RestoreRNG(), *callbacks],
    )
    last = fit_dir / "checkpoints" / "last.ckpt"
    if trainer.is_global_zero:
        fit_dir.mkdir(parents=True, exist_ok=True)
        start_file.write_text(start + "\n")
    began = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    summary["seconds"] = time.perf_counter() - began
    val_acc = trainer.callback_metrics.get("val/acc")
    summary["val_accuracy"] = float(val_acc) if val_acc is not None else None

    network = module.model.cpu().eval()
    _check_still_compressed(network, compressed, network_file)
    if trainer.is_global_zero:
        tmp = done.with_suffix(".tmp")
        save_network(network, tmp, spec, finetune=summary, **carried_hparams(train_hparams))
        os.replace(tmp, done)  # whole or absent: the marker of a finished run
    return network, summary


def _check_still_compressed(network: nn.Module, compressed: nn.Module, network_file: Path) -> None:
    """Raise unless ``network`` has exactly the layer shapes of ``compressed`` (no neuron came back)."""
    widths, expected = layer_widths(network), layer_widths(compressed)
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    expected_shapes = {k: tuple(v.shape) for k, v in compressed.state_dict().items()}
    if widths != expected or shapes != expected_shapes:
        differ = sorted(k for k in set(shapes) | set(expected_shapes) if shapes.get(k) != expected_shapes.get(k))
        raise RuntimeError(
            f"fine-tuning changed the compressed network of {network_file}: widths {widths} vs {expected}; "
            f"differing tensors: {', '.join(differ[:12])}"
        )


__all__ = ["FinetuneSettings", "RestoreRNG", "carried_hparams", "finetune", "finetune_batch_size",
           "finetune_settings_from_training"]

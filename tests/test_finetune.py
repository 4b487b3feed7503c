"""Recovery fine-tuning of a compressed network (compression/finetune.py) and the Classifier
started from a compressed file; a few CPU batches of the real Fashion-MNIST."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import yaml

from compression.finetune import DONE_FILE, FinetuneSettings, finetune, finetune_settings_from_training
from datamodules.fashion_mnist import FashionMNISTDataModule
from lightning_modules.classifier import Classifier
from models import build_model
from models.registry import NetworkSpec
from models.checkpoints import CheckpointMismatchError, load_network, read_checkpoint, save_network
from models.layers import analyse_layer
from models.profile import linear_widths
from models.surgery import remove_neurons

TRAINER = {"accelerator": "cpu", "limit_train_batches": 3, "limit_val_batches": 2, "enable_progress_bar": False,
           "enable_model_summary": False, "log_every_n_steps": 1}
TRAIN_HPARAMS = {"hparams": {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}}


@pytest.fixture(scope="module")
def compressed_file(tmp_path_factory):
    """AlexNet (untrained) with all but 20 inputs of classifier.6 and 32 of classifier.4 removed,
    and all but 32 input channels of conv3, conv4 and conv5, saved with save_network: small enough
    (0.5 M parameters) that a checkpoint with Adam's state is a few MB, not the 700 MB of the full
    head (the resume test writes five of them)."""
    torch.manual_seed(0)
    small = build_model("alexnet", 10)
    for layer, keep in (("classifier.6", 20), ("classifier.4", 32), ("features.6", 32), ("features.8", 32),
                        ("features.10", 32)):
        weight = small.get_submodule(layer).weight
        V = weight.detach().clone()
        V[:, keep:] = 0
        small = remove_neurons(small, analyse_layer(small, layer), {layer: V.reshape(len(weight), -1)})
    return save_network(small, tmp_path_factory.mktemp("compressed") / "network.pt", NetworkSpec("alexnet", 10))


def datamodule(root: str) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(root=root, train_subset=256, test_subset=128, batch_size=64, num_workers=0)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="epochs must be an integer >= 0"):
        FinetuneSettings(epochs=-1)
    with pytest.raises(ValueError, match="lr_factor must be > 0"):
        FinetuneSettings(epochs=1, lr_factor=0)
    with pytest.raises(ValueError, match="lr must be > 0, or null"):
        FinetuneSettings(epochs=1, lr=-1e-3)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), or null"):
        FinetuneSettings(epochs=1, dropout=1.0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, or null"):
        FinetuneSettings(epochs=1, batch_size=0)
    assert FinetuneSettings().epochs == 0


def test_hyper_parameters_follow_the_training_run():
    settings = FinetuneSettings(epochs=1, lr_factor=0.1)
    sgd = {"hparams": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.8, "weight_decay": 5e-4, "schedule": "cosine"}}
    assert finetune_settings_from_training(sgd, settings) == pytest.approx(
        {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.8, "weight_decay": 5e-4, "schedule": "constant"})
    assert finetune_settings_from_training(sgd["hparams"], FinetuneSettings(epochs=1, lr=0.5))["lr"] == 0.5
    # A plain state dict (no hyper-parameters): Adam, lr 1e-5, weight decay 1e-4.
    default = finetune_settings_from_training({"arch": "alexnet", "num_classes": 10}, settings)
    assert (default["optimizer"], default["lr"], default["weight_decay"]) == ("adam", 1e-5, 1e-4)


def test_classifier_starts_from_a_compressed_network(compressed_file, tmp_path):
    module = Classifier("alexnet", 10, init_checkpoint=str(compressed_file))
    assert linear_widths(module.model) == linear_widths(load_network(compressed_file))
    assert linear_widths(module.model)["classifier.6"] == 20
    assert module.model.training
    foreign = {k.replace("classifier", "head"): v for k, v in read_checkpoint(compressed_file)[0].items()}
    torch.save(foreign, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys.*classifier\.1\.weight") as err:
        Classifier("alexnet", 10, init_checkpoint=str(tmp_path / "foreign.pt"))
    assert "unexpected keys" in str(err.value) and "head.6.weight" in str(err.value)
    with pytest.raises(CheckpointMismatchError, match="classifier.6.weight: 10 outputs vs num_classes 7"):
        Classifier("alexnet", 7, init_checkpoint=str(compressed_file))


def test_finetuning_trains_and_stays_compressed(compressed_file, fashion_root, tmp_path, monkeypatch):
    before = load_network(compressed_file)
    settings = FinetuneSettings(epochs=1, lr_factor=0.1)
    network, summary = finetune(compressed_file, NetworkSpec("alexnet", 10), datamodule(fashion_root), settings, TRAIN_HPARAMS,
                                tmp_path, TRAINER)
    assert not network.training and isinstance(network, torch.nn.Module)
    assert linear_widths(network) == linear_widths(before)
    assert any(not torch.equal(a, b) for a, b in zip(network.state_dict().values(), before.state_dict().values()))
    assert summary["epochs"] == 1 and summary["lr"] == pytest.approx(1e-4) and summary["optimizer"] == "adam"
    assert summary["weight_decay"] == 1e-4 and 0 <= summary["val_accuracy"] <= 1 and summary["seconds"] > 0
    assert (tmp_path / "finetune" / DONE_FILE).is_file()
    # one epoch: nothing to resume, so no checkpoint was written (only the result, with its settings)
    assert not list((tmp_path / "finetune").rglob("*.ckpt"))
    assert read_checkpoint(tmp_path / "finetune" / DONE_FILE)[1]["finetune"]["lr"] == pytest.approx(1e-4)
    assert read_checkpoint(tmp_path / "finetune" / DONE_FILE)[1]["hparams"] == TRAIN_HPARAMS["hparams"]

    # Finished: a second call loads the result instead of training.
    def no_fit(*args, **kwargs):
        raise AssertionError("fine-tuning ran again")

    monkeypatch.setattr(pl.Trainer, "fit", no_fit)
    again, summary_again = finetune(compressed_file, NetworkSpec("alexnet", 10), datamodule(fashion_root), settings,
                                    TRAIN_HPARAMS, tmp_path, TRAINER)
    assert summary_again == summary
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), network.state_dict().values()))

    # Another network of the same widths (one weight changed) does not get that result: refused
    # with the folder named, or, with replace_other, fine-tuned afresh (here: fit is called).
    other = load_network(compressed_file)
    with torch.no_grad():
        other.classifier[6].weight[0, 0] += 0.01
    other_file = save_network(other, tmp_path / "other.pt", NetworkSpec("alexnet", 10))
    with pytest.raises(ValueError, match=f"{tmp_path / 'finetune'} holds the fine-tuning of another network"):
        finetune(other_file, NetworkSpec("alexnet", 10), datamodule(fashion_root), settings, TRAIN_HPARAMS, tmp_path,
                 TRAINER)
    with pytest.raises(AssertionError, match="fine-tuning ran again"):
        finetune(other_file, NetworkSpec("alexnet", 10), datamodule(fashion_root), settings, TRAIN_HPARAMS, tmp_path,
                 TRAINER, replace_other=True)
    assert not (tmp_path / "finetune" / DONE_FILE).exists()


class DropoutSeen(pl.Callback):
    """Records the probability of every Dropout layer of the model being trained."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.p = {m.p for m in pl_module.model.modules() if isinstance(m, torch.nn.Dropout)}


@pytest.mark.parametrize("dropout, expected", [(0.0, {0.0}), (0.2, {0.2}), (None, {0.5})])
def test_dropout_during_finetuning(compressed_file, fashion_root, tmp_path, dropout, expected):
    seen = DropoutSeen()
    trainer = {**TRAINER, "limit_train_batches": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    _, summary = finetune(compressed_file, NetworkSpec("alexnet", 10), datamodule(fashion_root),
                          FinetuneSettings(epochs=1, dropout=dropout), TRAIN_HPARAMS, tmp_path, trainer,
                          callbacks=[seen])
    assert seen.p == expected and summary["dropout"] == dropout
    # A finished run fine-tuned with another dropout is not silently reused.
    with pytest.raises(ValueError, match="fine-tuned with other settings.*dropout"):
        finetune(compressed_file, NetworkSpec("alexnet", 10), datamodule(fashion_root), FinetuneSettings(epochs=1, dropout=0.1),
                 TRAIN_HPARAMS, tmp_path, trainer)


class BatchesSeen(pl.Callback):
    """The size of every training batch."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.append(len(batch[1]))


def test_finetuning_trains_at_the_training_runs_batch_size(compressed_file, fashion_root, tmp_path):
    """The batch size is the training run's (recorded with its hyper-parameters), not the
    compression DataModule's (64 here), unless ``batch_size`` says otherwise; the DataModule
    handed in keeps its own, and a finished run of another batch size is not reused."""
    dm = datamodule(fashion_root)
    dm.setup("fit")  # as a compression's is
    trained_at_32 = {"hparams": {**TRAIN_HPARAMS["hparams"], "batch_size": 32}}
    trainer = {**TRAINER, "limit_train_batches": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    for hparams, settings, expected in ((trained_at_32, FinetuneSettings(epochs=1), 32),
                                        (trained_at_32, FinetuneSettings(epochs=1, batch_size=16), 16),
                                        (TRAIN_HPARAMS, FinetuneSettings(epochs=1), 64)):  # not recorded
        seen = BatchesSeen()
        _, summary = finetune(compressed_file, NetworkSpec("alexnet", 10), dm, settings, hparams,
                              tmp_path / str(expected), trainer, callbacks=[seen])
        assert seen.sizes == [expected, expected] and summary["batch_size"] == expected
        logged = yaml.safe_load((tmp_path / str(expected) / "finetune" / "hparams.yaml").read_text())
        assert logged["batch_size"] == expected  # what the run's TensorBoard folder says it used
        assert dm.hparams.batch_size == 64 and next(iter(dm.train_dataloader()))[1].shape == (64,)
    with pytest.raises(ValueError, match="fine-tuned with other settings.*batch_size: 32 then, 16 now"):
        finetune(compressed_file, NetworkSpec("alexnet", 10), dm, FinetuneSettings(epochs=1, batch_size=16),
                 trained_at_32, tmp_path / "32", trainer)


def test_a_datamodule_in_other_batches_shares_the_data(fashion_root):
    dm = datamodule(fashion_root)
    dm.setup("fit")
    other = dm.with_batch_size(100)
    assert other.val_set is dm.val_set and other.train_set is dm.train_set
    assert [len(y) for _, y in other.train_dataloader()] == [100, 100, 56]
    assert [len(y) for _, y in dm.train_dataloader()] == [64] * 4
    assert other.hparams_initial.batch_size == 100 and dm.hparams_initial.batch_size == 64
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        dm.with_batch_size(0)


class CrashAtEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_resume_ends_where_an_uninterrupted_run_does(compressed_file, fashion_root, tmp_path):
    settings = FinetuneSettings(epochs=2, lr=1e-4)
    args = (compressed_file, NetworkSpec("alexnet", 10))
    trainer = {**TRAINER, "limit_train_batches": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    whole, _ = finetune(*args, datamodule(fashion_root), settings, TRAIN_HPARAMS, tmp_path / "whole", trainer)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(*args, datamodule(fashion_root), settings, TRAIN_HPARAMS, tmp_path / "cut", trainer,
                 callbacks=[CrashAtEpoch(1)])
    assert [p.name for p in (tmp_path / "cut" / "finetune").rglob("*.ckpt")] == ["last.ckpt"]  # no best.ckpt
    assert read_checkpoint(tmp_path / "cut" / "finetune" / "checkpoints" / "last.ckpt")[1]["hparams"]["lr"] == 1e-4
    assert not (tmp_path / "cut" / "finetune" / DONE_FILE).exists()
    resumed, _ = finetune(*args, datamodule(fashion_root), settings, TRAIN_HPARAMS, tmp_path / "cut", trainer)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_no_epochs_returns_the_compressed_network(compressed_file, fashion_root, tmp_path):
    network, summary = finetune(compressed_file, NetworkSpec("alexnet", 10), datamodule(fashion_root), FinetuneSettings(), {},
                                tmp_path, TRAINER)
    assert summary["epochs"] == 0 and summary["val_accuracy"] is None
    assert linear_widths(network)["classifier.6"] == 20 and not (tmp_path / "finetune").exists()


def test_distillation_loss_against_an_explicit_formula():
    """(1 - a) CE + a T^2 KL(softmax(teacher / T) || softmax(logits / T)), written out in numpy."""
    import numpy as np

    from lightning_modules.classifier import distillation_loss

    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    s, t, y = logits.numpy(), teacher.numpy(), labels.numpy()
    ce = -log_softmax(s)[np.arange(6), y].mean()
    for a, T in ((0.0, 4.0), (0.7, 4.0), (1.0, 2.0)):
        p = np.exp(log_softmax(t / T))
        kl = (p * (np.log(p) - log_softmax(s / T))).sum(1).mean()
        assert float(distillation_loss(logits, teacher, labels, a, T)) == pytest.approx((1 - a) * ce + a * T * T * kl,
                                                                                         rel=1e-12)


class LossSeen(pl.Callback):
    """The training loss of the first batch, and the batch and weights it was computed with."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not hasattr(self, "loss"):
            self.loss, self.student = loss.detach(), pl_module.model.state_dict()
            self.student = {k: v.clone() for k, v in self.student.items()}


def test_finetuning_distils_from_the_original(compressed_file, fashion_root, tmp_path):
    """With ``distill``, the loss fine-tuning minimises is ``distillation_loss`` towards the teacher
    given (recomputed here from the batch and the weights of that step), the teacher stays out of
    the result, and the settings are recorded; without a teacher the call says what is missing."""
    from lightning_modules.classifier import distillation_loss

    torch.manual_seed(1)
    teacher = build_model("alexnet", 10).eval()
    seen = LossSeen()
    trainer = {**TRAINER, "limit_train_batches": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    settings = FinetuneSettings(epochs=1, distill=0.6, temperature=3.0)
    network, summary = finetune(compressed_file, NetworkSpec("alexnet", 10), datamodule(fashion_root), settings,
                                TRAIN_HPARAMS, tmp_path, trainer, callbacks=[seen], teacher=teacher)
    images, labels = seen.batch
    student = load_network(compressed_file)
    student.load_state_dict(seen.student)
    with torch.no_grad():
        # eval mode: fine-tuning set dropout to 0, and AlexNet has no BatchNorm
        expected = distillation_loss(student.eval()(images), teacher(images), labels, 0.6, 3.0)
    assert float(seen.loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(seen.loss) != pytest.approx(float(torch.nn.functional.cross_entropy(student(images), labels)), rel=1e-3)
    assert set(network.state_dict()) == set(student.state_dict())
    assert (summary["distill"], summary["temperature"]) == (0.6, 3.0)
    with pytest.raises(ValueError, match="distill > 0 needs the network to distil from"):
        finetune(compressed_file, NetworkSpec("alexnet", 10), datamodule(fashion_root), settings, TRAIN_HPARAMS,
                 tmp_path / "other", trainer)
    with pytest.raises(ValueError, match=r"distill must be in \[0, 1\]"):
        FinetuneSettings(epochs=1, distill=1.5)



class RatesSeen(pl.Callback):
    """The learning rate of every optimizer step, as the optimizer had it for that step."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_annealing_falls_along_a_cosine_to_zero_over_the_steps(compressed_file, fashion_root, tmp_path):
    """``anneal``: step k of N runs at lr (1 + cos(pi k / N)) / 2, across the epochs of the run;
    without it the rate is constant. A finished run is not reused for the other setting."""
    steps_per_epoch, epochs, lr = 3, 2, 1e-3
    trainer = {**TRAINER, "limit_train_batches": steps_per_epoch, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    args = (compressed_file, NetworkSpec("alexnet", 10), datamodule(fashion_root))
    seen = RatesSeen()
    _, summary = finetune(*args, FinetuneSettings(epochs=epochs, lr=lr, anneal=True), TRAIN_HPARAMS, tmp_path / "a",
                          trainer, callbacks=[seen])
    total = steps_per_epoch * epochs
    expected = [lr * (1 + math.cos(math.pi * k / total)) / 2 for k in range(total)]
    assert seen.rates == pytest.approx(expected, rel=1e-9) and summary["anneal"] is True
    flat = RatesSeen()
    finetune(*args, FinetuneSettings(epochs=1, lr=lr), TRAIN_HPARAMS, tmp_path / "c", trainer, callbacks=[flat])
    assert flat.rates == [lr] * steps_per_epoch
    with pytest.raises(ValueError, match="fine-tuned with other settings.*anneal: True then, False now"):
        finetune(*args, FinetuneSettings(epochs=epochs, lr=lr), TRAIN_HPARAMS, tmp_path / "a", trainer)
    with pytest.raises(ValueError, match="anneal must be true or false"):
        FinetuneSettings(epochs=1, anneal="yes")

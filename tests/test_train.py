"""train.py end to end: configs, errors, determinism, resume, DDP, and a real accuracy floor."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli.base import CONFIG_DIR, resolve_config_args
from tests.helpers import REPO, small_train_args
from compress import main as compress_main
from train import main

# A small network where the test is about the training loop, not the architecture.
SMALL_NETWORK = ("--model.init_args.arch", "resnet20", "--data.init_args.preset", "fashion_32")


def _scalars(log_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


ENTRY_POINTS = {"train": main, "compress": compress_main}  # config folder -> the entry point that reads it
OVERRIDES = {"neuron_sharing_none.yaml": "neuron_sharing.yaml", "neuron_sharing_wd.yaml": "neuron_sharing.yaml"}


def _print_config(entry, *args: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        entry([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("folder, config", [(folder, p.name) for folder in ENTRY_POINTS
                                            for p in sorted((CONFIG_DIR / folder).glob("*.yaml"))])
def test_every_shipped_config_parses(folder, config, capsys):
    """Each config resolves by bare name with its folder's entry point and yields a complete
    config (nothing can rot); an override file is parsed on top of its base."""
    base = ["--config", OVERRIDES[config]] if config in OVERRIDES else []
    printed = _print_config(ENTRY_POINTS[folder], *base, "--config", Path(config).stem, capsys=capsys)
    assert "class_path" in printed and "trainer:" in printed
    if config in OVERRIDES:
        assert f"name: {Path(config).stem}" in printed  # the override's values win


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml")))
def test_every_trainer_preset_reaches_the_trainer_config(preset, capsys):
    printed = yaml.safe_load(_print_config(main, "--config", "alexnet_fashion", "--trainer", preset, capsys=capsys))
    values = yaml.safe_load((CONFIG_DIR / "trainer" / f"{preset}.yaml").read_text())
    assert values and {k: printed["trainer"][k] for k in values} == values


def test_bare_config_names_and_group_files_resolve():
    args = resolve_config_args(["--config", "alexnet_fashion", "--trainer", "ddp", "--trainer.max_epochs", "1"], "train")
    assert args[1] == str(CONFIG_DIR / "train" / "alexnet_fashion.yaml")
    assert args[3] == str(CONFIG_DIR / "trainer" / "ddp.yaml")
    assert args[4:] == ["--trainer.max_epochs", "1"]
    assert resolve_config_args(["--config=alexnet_pen"], "compress") == [f"--config={CONFIG_DIR / 'compress' / 'alexnet_pen.yaml'}"]
    with pytest.raises(FileNotFoundError, match="Shipped configs: .*alexnet_cifar10.yaml") as error:
        resolve_config_args(["--config", "alexnet_pen"], "train")  # each entry point looks in its own folder
    assert "alexnet_pen" not in str(error.value).split("Shipped configs:")[1]


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--model.init_args.optimizer", "rmsprop"], "Literal['adam', 'sgd']"),
        (["--data.class_path", "datamodules.mnist.MNISTDataModule"], "Valid data classes: datamodules.cifar10.CIFAR10DataModule"),
        (["--model.class_path", "lightning_modules.resnet.ResNet"], "Valid model classes: lightning_modules.classifier.Classifier"),
    ],
)
def test_bad_config_values_name_the_valid_choices(override, expected, capsys, tmp_path, fashion_root):
    with pytest.raises(SystemExit):
        main(small_train_args(tmp_path, fashion_root, *override))
    assert expected in capsys.readouterr().err


def test_an_unknown_network_names_the_valid_ones(tmp_path, fashion_root):
    with pytest.raises(ValueError, match=r"unknown arch 'resnet7'; valid choices: alexnet, vgg19, resnet20, .*"
                                         r"mobilenet_v2.*class_path"):
        main(small_train_args(tmp_path, fashion_root, "--model.init_args.arch", "resnet7"))


def test_same_seed_same_weights_and_resume_from_last(tmp_path, fashion_root):
    """Two runs with one seed give identical weights; a run resumed from last.ckpt continues it."""
    # constant lr: a cosine schedule over 1 epoch would end at lr 0 and the resumed epoch would not move
    # ResNet-20 (0.27 M parameters): what is tested is the training loop's determinism and resume,
    # and AlexNet's checkpoints with Adam's state are 0.7 GB each
    common = ["--trainer.limit_train_batches", "3", "--test", "false", "--model.init_args.schedule", "constant",
              *SMALL_NETWORK]
    # the second run and the resumed one keep best.ckpt only (save_last false: no resume follows them)
    runs = [main(small_train_args(tmp_path / f"r{i}", fashion_root, *common, *(["--model.init_args.save_last", "false"] * i)))
            for i in range(2)]
    a, b = (r.model.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = Path(runs[0].trainer.checkpoint_callback.dirpath) / "last.ckpt"
    assert last.name == "last.ckpt" and (last.parent / "best.ckpt").is_file()
    # best.ckpt holds the weights and hyper-parameters (for test, compression); last.ckpt also the optimizer
    best, full = (torch.load(last.parent / f, weights_only=False) for f in ("best.ckpt", "last.ckpt"))
    assert "optimizer_states" not in best and best["hyper_parameters"]["arch"] == "resnet20"
    assert full["optimizer_states"] and (last.parent / "best.ckpt").stat().st_size < 0.5 * last.stat().st_size
    resumed = main(small_train_args(tmp_path / "r2", fashion_root, *common, "--trainer.max_epochs", "2",
                                    "--ckpt_path", str(last), "--model.init_args.save_last", "false"))
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 6
    assert not (Path(runs[1].trainer.checkpoint_callback.dirpath) / "last.ckpt").exists()
    assert not torch.equal(resumed.model.model.fc.weight, runs[0].model.model.fc.weight)


def test_the_test_split_reads_best_ckpt_quietly(tmp_path, fashion_root, recwarn, caplog):
    """After fitting, the test split runs on best.ckpt (the best validation accuracy), named by its
    path: Lightning's warning that "best" among several checkpoint callbacks means the first
    one's is not raised, and the test adds no learning-rate monitor to override the fit's."""
    cli = main(small_train_args(tmp_path, fashion_root, "--trainer.limit_train_batches", "2", *SMALL_NETWORK))
    assert Path(cli.trainer.ckpt_path).name == "best.ckpt" and "test/acc" in cli.trainer.callback_metrics
    assert not [str(w.message) for w in recwarn if "multiple `ModelCheckpoint`" in str(w.message)]
    assert "override existing callbacks passed to Trainer: LearningRateMonitor" not in caplog.text


@pytest.mark.slow
def test_short_real_training_beats_accuracy_floor(trained_alexnet):
    """AlexNet on 4,096 real Fashion-MNIST images for 2 epochs (128 steps): test accuracy above
    60% (it reaches 64%; chance is 10%; the full 4-epoch run of the demo reaches 89.6%)."""
    cli = trained_alexnet
    accuracy = float(cli.trainer.callback_metrics["test/acc"])
    assert accuracy > 0.60, accuracy
    scalars = _scalars(Path(cli.trainer.logger.log_dir))
    assert {"train/loss_step", "val/acc", "test/acc"} <= set(scalars)


def test_the_checkpoint_records_what_fine_tuning_reuses(trained_alexnet):
    """``read_checkpoint`` of ``train.py``'s checkpoint: the module's optimizer and learning rate,
    and the DataModule's batch size (``compression.finetune`` trains at it)."""
    from models.checkpoints import read_checkpoint

    cli = trained_alexnet
    _, info = read_checkpoint(cli.trainer.checkpoint_callback.best_model_path)
    assert info["hparams"]["lr"] == cli.model.hparams.lr
    assert info["hparams"]["batch_size"] == cli.datamodule.hparams.batch_size


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_and_logs(tmp_path, fashion_root):
    """``--trainer.strategy ddp --trainer.devices 2`` on the CPU (gloo): both ranks train, rank 0 logs."""
    args = small_train_args(tmp_path, fashion_root, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                            "--trainer.limit_train_batches", "3", "--trainer.logger.init_args.version", "ddp",
                            *SMALL_NETWORK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr and "All distributed processes registered" in result.stderr
    log_dir = tmp_path / "runs" / "alexnet_fashion" / "ddp"
    scalars = _scalars(log_dir)
    assert len(scalars["train/loss_step"]) >= 1 and "val/acc" in scalars and "test/acc" in scalars
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()

"""Train a network with weight decay (or any experiment module) from a YAML config.

    python train.py --config alexnet_fashion.yaml                 # bare names resolve in configs/train/
    python train.py --config alexnet_cifar10.yaml --trainer.max_epochs 1
    python train.py --config alexnet_fashion.yaml --trainer ddp   # configs/trainer/ddp.yaml
    python train.py --config alexnet_fashion.yaml --print_config  # a complete config to edit

Logs, checkpoints (best and last) and the resolved config go to TensorBoard's log
directory, ``runs/<name>/version_<n>/``. Resume with ``--ckpt_path .../last.ckpt``.
"""
from __future__ import annotations

from typing import Sequence

from cli.errors import run_command
from cli.setup import configure_process
from cli.train import TrainCLI


def main(args: Sequence[str] | None = None) -> TrainCLI:
    configure_process()
    cli = TrainCLI(args)
    cli.fit_and_test()
    return cli


if __name__ == "__main__":
    run_command(main)  # bad input: one line and exit status 2 (NARROW_DEBUG=1 shows the traceback)

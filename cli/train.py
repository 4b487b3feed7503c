"""``python train.py --config X.yaml``: LightningCLI for training any LightningModule of the project."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.utilities.model_helpers import is_overridden

from cli.base import ProjectCLI


class TrainCLI(ProjectCLI):
    """``python train.py --config X.yaml``: fit any LightningModule of the project on any
    DataModule (both chosen by ``class_path`` in the config), then test the best checkpoint.

    Extra top-level fields: ``ckpt_path`` (resume, e.g. ``runs/<name>/version_0/checkpoints/last.ckpt``)
    and ``test`` (run the test set after fitting; on by default).
    """

    config_folder = "train"

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(LightningModule, args, subclass_mode_model=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="Resume fitting from this checkpoint.")
        parser.add_argument("--test", type=bool, default=True, help="Run the test set after fitting (best checkpoint).")

    def fit_and_test(self) -> None:
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=self.config.ckpt_path)
        if self.config.test and is_overridden("test_step", self.model) and is_overridden("test_dataloader", self.datamodule):
            # the path itself, not "best": with a best and a last checkpoint callback Lightning warns
            # that "best" means the first callback's, which is this one
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)

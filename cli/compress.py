"""``python compress.py --config alexnet_pen.yaml``: LightningCLI for the compression pipeline.

The config's ``model`` is the ``LassoCompression`` solver settings, ``data`` the image
DataModule whose training split supplies the layer's inputs (and whose validation split
judges accuracy targets), ``convergence`` the stopping rule, ``trainer`` the
devices/strategy (DDP shards the passes over the data) and the ``max_steps`` budget of a
solve, ``target`` and ``finetune`` what the user wants. Top-level fields: ``checkpoint``,
``layers``, ``lambdas`` / ``lambda_ratios``, ``path`` / ``path_ratios``, ``debias``,
``baselines``, ``conv_positions``, ``cache_dir``, ``report``, ``resume``.

How much to compress is said in exactly one way: ``--target.max_accuracy_drop``,
``--target.width``, ``--lambda_ratios`` or ``--lambdas``. One given on the command line
replaces the one the config chose.
"""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.utilities import rank_zero_info

from callbacks.convergence import Convergence
from compression.finetune import FinetuneSettings
from compression.pipeline import CompressionPipeline
from compression.report import format_report, write_report
from compression.settings import Target, TrainerSettings
from cli.base import ProjectCLI
from lightning_modules.lasso import LassoCompression
from models.checkpoints import network_from_state, read_checkpoint


# The ways to say how much to compress; the command line's choice replaces the config's.
AMOUNT_KEYS = ("lambdas", "lambda_ratios", "target")


class CompressCLI(ProjectCLI):
    """Parses the compression config; ``compress()`` runs the pipeline and writes the report."""

    config_folder = "compress"

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs", "max_steps": 10_000})
        given = [arg.split("=", 1)[0] for arg in (sys.argv[1:] if args is None else args) if arg.startswith("--")]
        # e.g. {"lambdas"} or {"target.width"}: how the command line says how much to compress
        self.amount_on_command_line = {arg[2:] for arg in given if arg[2:].split(".")[0] in AMOUNT_KEYS}
        super().__init__(LassoCompression, args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--checkpoint", type=str, required=True,
                            help="Trained network: a Lightning checkpoint of train.py, a plain state dict "
                                 "(torchvision AlexNet) or the authors' VGG-19 file ({'net': state_dict}).")
        parser.add_argument("--arch", type=Optional[str], default=None,
                            help="alexnet or vgg19; read from the checkpoint when not given.")
        parser.add_argument("--layers", type=list[str], default=["last"],
                            help="Layers to compress in this order: short names (first, pen, last; conv2.. for "
                                 "convolutions) or module paths (features.10).")
        parser.add_argument("--lambdas", type=Optional[list[float]], default=None,
                            help="Absolute penalty per layer (one value for all layers, or one per layer).")
        parser.add_argument("--lambda_ratios", type=Optional[list[float]], default=None,
                            help="Penalty per layer as a fraction in (0, 1) of that layer's own lambda_max.")
        parser.add_class_arguments(Target, "target")
        parser.add_argument("--path", type=Optional[list[float]], default=None,
                            help="Also solve a regularisation path over these lambdas (table and plot per layer).")
        parser.add_argument("--path_ratios", type=Optional[list[float]], default=None,
                            help="The same, as fractions of each layer's lambda_max.")
        parser.add_argument("--debias", type=bool, default=False,
                            help="Refit the surviving columns by least squares (no penalty) before surgery.")
        parser.add_argument("--baselines", type=bool, default=False,
                            help="Also measure the baselines (magnitude, activation, refits, Torch-Pruning when "
                                 "installed) at the final width and at every path point's width.")
        parser.add_argument("--conv_positions", type=Optional[int], default=None,
                            help="Output positions sampled per image for a convolution's statistics (null: all).")
        parser.add_class_arguments(FinetuneSettings, "finetune")
        parser.add_argument("--cache_dir", type=Optional[str], default=".cache/passes",
                            help="Where head inputs, layer statistics and evaluations are cached (null: no cache).")
        parser.add_argument("--checkpoint_every", type=int, default=200, help="Solver checkpoint interval (steps).")
        parser.add_argument("--report", type=Optional[str], default=None, help="Also write the report JSON here.")
        parser.add_argument("--resume", type=Optional[str], default=None,
                            help="Log directory of an interrupted run to continue (runs/<name>/version_<n>).")
        parser.add_class_arguments(Convergence, "convergence")

    def amount(self) -> dict[str, Any]:
        """``lambdas``, ``lambda_ratios`` and ``target`` as the run uses them: when the command
        line names one of them, the others the config may have set are dropped."""
        config, named = self.config, self.amount_on_command_line
        target = dict(config.target)
        if not named:
            return {"lambdas": config.lambdas, "lambda_ratios": config.lambda_ratios, "target": Target(**target)}
        if "target" not in named:  # only some target fields were named: the others are the config's
            target = {k: v for k, v in target.items() if f"target.{k}" in named}
        return {"lambdas": config.lambdas if "lambdas" in named else None,
                "lambda_ratios": config.lambda_ratios if "lambda_ratios" in named else None,
                "target": Target(**target)}

    def compress(self) -> dict[str, Any]:
        config = self.config
        state, info = read_checkpoint(config.checkpoint)
        arch = config.arch or info["arch"]
        network = network_from_state(state, arch, info["num_classes"], source=config.checkpoint)
        logger = self.trainer.logger
        run_dir = Path(config.resume) if config.resume else Path(logger.log_dir if logger else "runs/compress")
        pipeline = CompressionPipeline(
            network=network, arch=arch, num_classes=info["num_classes"], datamodule=self.datamodule, run_dir=run_dir,
            make_module=partial(LassoCompression, **dict(config.model)),
            make_convergence=partial(Convergence, **dict(config.convergence)),
            trainer=TrainerSettings.from_config(config.trainer),
            cache_dir=Path(config.cache_dir) if config.cache_dir else None, checkpoint_every=config.checkpoint_every,
            debias=config.debias, logger=logger, finetune=FinetuneSettings(**dict(config.finetune)),
            train_hparams=info.get("hparams") or {}, baselines=config.baselines,
            conv_sampling={} if config.conv_positions is None else {"positions": config.conv_positions,
                                                                    "seed": config.seed_everything or 0},
        )
        report = pipeline.run(list(config.layers), **self.amount(), path=config.path, path_ratios=config.path_ratios)
        report["checkpoint"] = str(config.checkpoint)
        if pipeline.is_global_zero:
            written = write_report(report, run_dir, config.report, logger)
            rank_zero_info("\n" + format_report(report) + "\n\nwritten: " + ", ".join(map(str, written)) +
                           f", {report['network']}")
        return report

"""``python compress.py --config alexnet_pen.yaml``: LightningCLI for the compression pipeline.

The config's ``model`` is the ``LassoCompression`` solver settings, ``data`` the image
DataModule whose training split supplies the layer's inputs, ``convergence`` the stopping
rule and ``trainer`` the devices/strategy (DDP shards the statistics pass) and ``max_steps``
budget. Top-level fields: ``checkpoint``, ``layers``, ``lambdas``, ``path``, ``debias``,
``cache_dir``, ``report``, ``resume``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.utilities import rank_zero_info

from callbacks.convergence import Convergence
from compression.pipeline import CompressionPipeline
from compression.report import format_report, write_report
from lightning_modules.cli import ProjectCLI
from lightning_modules.compression import LassoCompression
from models.checkpoints import network_from_state, read_checkpoint


class CompressCLI(ProjectCLI):
    """Parses the compression config; ``compress()`` runs the pipeline and writes the report."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs", "max_steps": 10_000})
        super().__init__(LassoCompression, args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--checkpoint", type=str, required=True,
                            help="Trained network: a Lightning checkpoint of train.py, a plain state dict "
                                 "(torchvision AlexNet) or the authors' VGG-19 file ({'net': state_dict}).")
        parser.add_argument("--arch", type=Optional[str], default=None,
                            help="alexnet or vgg19; read from the checkpoint when not given.")
        parser.add_argument("--layers", type=list[str], default=["last"],
                            help="Layers to compress in this order: short names (first, pen, last) or module paths.")
        parser.add_argument("--lambdas", type=list[float], default=[0.01],
                            help="Penalty per layer (one value for all layers, or one per layer).")
        parser.add_argument("--path", type=Optional[list[float]], default=None,
                            help="Also solve a regularisation path over these lambdas (table and plot per layer).")
        parser.add_argument("--debias", type=bool, default=False,
                            help="Refit the surviving columns by least squares (no penalty) before surgery.")
        parser.add_argument("--cache_dir", type=Optional[str], default=".cache/passes",
                            help="Where layer statistics and evaluations are cached (null: no cache).")
        parser.add_argument("--checkpoint_every", type=int, default=200, help="Solver checkpoint interval (steps).")
        parser.add_argument("--report", type=Optional[str], default=None, help="Also write the report JSON here.")
        parser.add_argument("--resume", type=Optional[str], default=None,
                            help="Log directory of an interrupted run to continue (runs/<name>/version_<n>).")
        parser.add_class_arguments(Convergence, "convergence")

    def compress(self) -> dict[str, Any]:
        config = self.config
        state, info = read_checkpoint(config.checkpoint)
        arch = config.arch or info["arch"]
        network = network_from_state(state, arch, info["num_classes"], source=config.checkpoint)
        logger = self.trainer.logger
        run_dir = Path(config.resume) if config.resume else Path(logger.log_dir if logger else "runs/compress")
        trainer_settings = {k: config.trainer[k] for k in ("accelerator", "devices", "strategy", "num_nodes",
                                                             "enable_progress_bar", "max_steps")}
        pipeline = CompressionPipeline(
            network=network, arch=arch, num_classes=info["num_classes"],
            datamodule=self.datamodule, run_dir=run_dir, module=dict(config.model), convergence=dict(config.convergence),
            trainer=trainer_settings, cache_dir=Path(config.cache_dir) if config.cache_dir else None,
            checkpoint_every=config.checkpoint_every, debias=config.debias, logger=logger,
        )
        report = pipeline.run(list(config.layers), list(config.lambdas), list(config.path) if config.path else None)
        report["checkpoint"] = str(config.checkpoint)
        if pipeline.is_global_zero:
            written = write_report(report, run_dir, config.report, logger)
            rank_zero_info("\n" + format_report(report) + "\n\nwritten: " + ", ".join(map(str, written)) +
                           f", {report['network']}")
        return report

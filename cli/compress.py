"""``python compress.py --config alexnet_pen.yaml``: LightningCLI for the compression pipeline.

The config's ``model`` is the ``LassoCompression`` solver settings, ``data`` the image
DataModule whose training split supplies the layer's inputs (and whose validation split
judges accuracy targets), ``convergence`` the stopping rule, ``trainer`` the
devices/strategy (DDP shards the passes over the data) and the ``max_steps`` budget of a
solve, ``target`` and ``finetune`` what the user wants. Top-level fields: ``checkpoint``,
``layers``, ``lambdas`` / ``lambda_ratios``, ``path`` / ``path_ratios``, ``debias``, ``round_to``,
``final_refit``, ``baselines``, ``conv_positions``, ``cache_dir``, ``report``, ``resume``.

How much to compress is said in exactly one way: ``--target.max_accuracy_drop``,
``--target.width``, ``--lambda_ratios`` or ``--lambdas``. One given on the command line
replaces the one the config chose.
"""
from __future__ import annotations

import shutil
import signal
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from jsonargparse.typing import PositiveInt
from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from callbacks.convergence import Convergence
from compression import cache
from compression.finetune import FinetuneSettings
from compression.pipeline import CompressionPipeline
from compression.report import format_report, write_report
from compression.settings import Target, TrainerSettings
from cli.base import ProjectCLI
from lightning_modules.lasso import LassoCompression
from models.checkpoints import network_from_state, network_spec, read_checkpoint
from models.layers import format_layer_table, layer_table
from models.profile import count_macs, module_macs
from models.registry import NetworkSpec, default_input_shape


# The ways to say how much to compress; the command line's choice replaces the config's.
AMOUNT_KEYS = ("lambdas", "lambda_ratios", "target")
TARGET_AMOUNTS = ("max_accuracy_drop", "width")  # the target's fields that are amounts (not how they are shared)


class StopRequested(BaseException):
    """A stop signal (SIGTERM, as cluster schedulers send before they kill; SIGINT, Ctrl-C),
    raised where the program is, so that it stops within moments instead of at the end of the
    current solver step. A BaseException, so that no ``except Exception`` swallows it; Lightning
    passes it to the callbacks' ``on_exception`` (the solve's resume hint) and re-raises it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.name = signum, signal.Signals(signum).name


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise ``StopRequested``; the handlers before are restored."""
    def handler(signum: int, frame: Any) -> None:
        raise StopRequested(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cache_limit(cache_dir: Optional[str], max_gb: Optional[float]) -> Optional[int]:
    """``--cache_max_gb`` in bytes; by default half the free space of the cache's disk now."""
    if cache_dir is None:
        return None
    if max_gb is not None:
        if not max_gb > 0:
            raise ValueError(f"--cache_max_gb must be a positive number of gigabytes, got {max_gb}")
        return int(max_gb * cache.GB)
    folder = Path(cache_dir).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free // 2


class CompressCLI(ProjectCLI):
    """Parses the compression config; ``compress()`` runs the pipeline and writes the report."""

    config_folder = "compress"

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs", "max_steps": 10_000})
        self.given_args = [a for a in (sys.argv[1:] if args is None else list(args))]
        given = [arg.split("=", 1)[0] for arg in self.given_args if arg.startswith("--")]
        # e.g. {"lambdas"} or {"target.width"}: how the command line says how much to compress
        self.amount_on_command_line = {arg[2:] for arg in given if arg[2:].split(".")[0] in AMOUNT_KEYS
                                       and (arg[2:] in AMOUNT_KEYS or arg[2:].split(".", 1)[1] in TARGET_AMOUNTS)}
        super().__init__(LassoCompression, args, **kwargs)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """LightningCLI's trainer, model and data sections; data may be left out for ``--list_layers``."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        trainer_defaults = {"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"}
        parser.set_defaults(trainer_defaults)
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data,
                                        required=False)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--checkpoint", type=str, required=True,
                            help="Trained network: a Lightning checkpoint of train.py, a plain state dict "
                                 "(torchvision AlexNet) or the authors' VGG-19 file ({'net': state_dict}).")
        parser.add_argument("--arch", type=Optional[Union[str, dict[str, Any]]], default=None,
                            help="The network, when the checkpoint does not say (a plain state dict of a network "
                                 "other than AlexNet, VGG-19 or a CIFAR ResNet): a short name (resnet56), a "
                                 "torchvision model name (mobilenet_v2) or {class_path: ..., init_args: {...}}.")
        parser.add_argument("--small_input", type=Optional[bool], default=None,
                            help="With --arch: the torchvision network has the 32x32 stem (null: as the file says).")
        parser.add_argument("--layers", type=list[str], default=["last"],
                            help="Layers to compress: short names (first, pen, last; conv2.. for convolutions), "
                                 "module paths (features.10), glob patterns (layer*.*.conv2) or all.")
        parser.add_argument("--list_layers", type=bool, default=False,
                            help="Print every Linear and Conv2d layer: compressible or why not, its input neurons, "
                                 "group size, coupled layers and share of the multiply-adds; then stop.")
        parser.add_argument("--stats_images", type=Optional[int], default=None,
                            help="Layer statistics (and the train loss) from the first this-many training images "
                                 "(null: all).")
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
        parser.add_argument("--round_to", type=PositiveInt, default=1,
                            help="Keep a multiple of this many neurons or channels in every compressed layer (8 or 16 "
                                 "suits the channel blocks of ONNX Runtime's and GPU kernels): each certified support "
                                 "is rounded up by the neurons nearest to entering it, and refit by least squares.")
        parser.add_argument("--final_refit", type=bool, default=False,
                            help="After the last cut, refit every layer downstream of a cut once more, in forward "
                                 "order, by least squares to the original network's outputs from the compressed "
                                 "network's own inputs (one pass over the statistics images per layer); kept only if "
                                 "validation accuracy does not fall.")
        parser.add_argument("--baselines", type=bool, default=False,
                            help="Also measure the baselines (magnitude, activation, refits, Torch-Pruning when "
                                 "installed) at the final width and at every path point's width.")
        parser.add_argument("--conv_positions", type=Optional[int], default=None,
                            help="Output positions sampled per image for a convolution's statistics (null: all).")
        parser.add_class_arguments(FinetuneSettings, "finetune")
        parser.add_argument("--cache_dir", type=Optional[str], default=".cache/passes",
                            help="Where head inputs, layer statistics and evaluations are cached (null: no cache).")
        parser.add_argument("--cache_max_gb", type=Optional[float], default=None,
                            help="The most the cache may hold, least recently used entries evicted first (null: "
                                 "half the disk's free space when the run starts). `python -m compression.cache "
                                 "list|prune|clear` shows and trims it.")
        parser.add_argument("--export", type=Optional[str], default=None,
                            help="onnx, torchscript or onnx,torchscript: also write compressed.onnx (and "
                                 "original.onnx) with a dynamic batch, checked against PyTorch on validation images, "
                                 "and measure ONNX Runtime's latency (pip install -e .[export]).")
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
        if "target" not in named:  # only some amount fields were named: the config's others are dropped
            target = {k: v for k, v in target.items() if f"target.{k}" in named or k not in TARGET_AMOUNTS}
        return {"lambdas": config.lambdas if "lambdas" in named else None,
                "lambda_ratios": config.lambda_ratios if "lambda_ratios" in named else None,
                "target": Target(**target)}

    def network(self) -> tuple[nn.Module, NetworkSpec, dict[str, Any]]:
        """The trained network, how to rebuild it, and what the checkpoint says of its training."""
        config = self.config
        state, info = read_checkpoint(config.checkpoint, arch=config.arch)
        spec = network_spec(info, small_input=config.small_input)
        return network_from_state(state, spec, source=config.checkpoint), spec, info

    def list_layers(self) -> str:
        """The table of ``--list_layers`` for the checkpoint's network."""
        network, spec, _ = self.network()
        if self.datamodule is not None:
            self.datamodule.prepare_data()
            self.datamodule.setup("fit")
            shape = tuple(self.datamodule.test_set[0][0].shape)
        else:
            shape = default_input_shape(spec)
        table = format_layer_table(layer_table(network, macs=module_macs(network, shape)))
        return f"{spec.label} ({'x'.join(map(str, shape))} inputs, {count_macs(network, shape):,} multiply-adds):\n{table}"

    def compress(self) -> dict[str, Any]:
        config = self.config
        if config.list_layers:
            text = self.list_layers()
            rank_zero_info(text)
            return {"layers_table": text}
        if self.datamodule is None:
            raise ValueError("compressing needs data: give a config with a data section (e.g. --config "
                             "alexnet_fashion_compress) or --data.class_path ... (--list_layers alone does not)")
        network, spec, info = self.network()
        logger = self.trainer.logger
        run_dir = Path(config.resume) if config.resume else Path(logger.log_dir if logger else "runs/compress")
        amount = self.amount()
        pipeline = CompressionPipeline(
            network=network, spec=spec, datamodule=self.datamodule, run_dir=run_dir,
            make_module=partial(LassoCompression, **dict(config.model)),
            make_convergence=partial(Convergence, **dict(config.convergence)),
            trainer=TrainerSettings.from_config(config.trainer),
            cache_dir=Path(config.cache_dir) if config.cache_dir else None, checkpoint_every=config.checkpoint_every,
            debias=config.debias, round_to=config.round_to, final_refit=config.final_refit, logger=logger,
            finetune=FinetuneSettings(**dict(config.finetune)),
            train_hparams=info.get("hparams") or {}, baselines=config.baselines,
            conv_sampling={} if config.conv_positions is None else {"positions": config.conv_positions,
                                                                    "seed": config.seed_everything or 0},
            train_limit=config.stats_images, candidate_images=amount["target"].candidate_images,
            margin_se=amount["target"].margin_se, held_out=amount["target"].held_out,
            cache_max_bytes=cache_limit(config.cache_dir, config.cache_max_gb),
            export=tuple(f.strip() for f in config.export.split(",")) if config.export else (),
        )
        started = time.perf_counter()
        try:
            with stop_on_signals():
                report = pipeline.run(list(config.layers), **amount, path=config.path, path_ratios=config.path_ratios)
        except StopRequested as stop:
            # Finished solves, candidates and cached passes are on disk; an unfinished solve resumes
            # from its last checkpoint.
            print(f"stopped by {stop.name} after {time.perf_counter() - started:.0f} s; nothing certified is lost: "
                  f"continue with python compress.py {' '.join(self.given_args)} --resume {run_dir}", file=sys.stderr,
                  flush=True)
            raise SystemExit(128 + stop.signum) from None
        report["checkpoint"] = str(config.checkpoint)
        if pipeline.is_global_zero:
            written = write_report(report, run_dir, config.report, logger)
            rank_zero_info("\n" + format_report(report) + "\n\nwritten: " + ", ".join(map(str, written)) +
                           f", {report['network']}")
        return report

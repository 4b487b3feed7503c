"""What ``train.py`` and ``compress.py`` share: config lookup and the LightningCLI set-up.

``--config alexnet_fashion.yaml`` may name a file anywhere or, as a bare name (with or
without ``.yaml``), a file in the repository's ``configs/`` folder.
"""
from __future__ import annotations

import sys
from pathlib import Path
import importlib
import inspect
import pkgutil
from typing import Any, NoReturn, Optional, Sequence

from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.model_helpers import is_overridden

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(value: str, group: str | None = None) -> str:
    """Map a bare config name to ``configs/[group/]<name>[.yaml]``; paths that exist are kept.

    Raises ``FileNotFoundError`` listing the shipped configs when nothing matches.
    """
    if Path(value).exists():
        return value
    folders = [CONFIG_DIR / group, CONFIG_DIR] if group else [CONFIG_DIR]
    for folder in folders:
        for candidate in (folder / value, folder / f"{value}.yaml"):
            if candidate.is_file():
                return str(candidate)
    shipped = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))
    raise FileNotFoundError(
        f"config {value!r} is neither a file nor a name in {CONFIG_DIR}. Shipped configs: {', '.join(shipped)}"
    )


def resolve_config_args(args: Sequence[str] | None) -> list[str]:
    """Rewrite a command line so that config files may be given by bare name.

    ``--config alexnet_fashion`` -> ``configs/alexnet_fashion.yaml``; a group file such as
    ``--trainer ddp`` -> ``configs/trainer/ddp.yaml``. Anything else passes unchanged.
    """
    args = list(sys.argv[1:] if args is None else args)
    out: list[str] = []
    for i, arg in enumerate(args):
        previous = args[i - 1] if i > 0 else ""
        if previous == "--config":
            arg = resolve_config_path(arg)
        elif arg.startswith("--config="):
            arg = "--config=" + resolve_config_path(arg.split("=", 1)[1])
        elif _is_group_option(previous) and _names_group_file(previous[2:], arg):
            arg = resolve_config_path(arg, group=previous[2:])
        out.append(arg)
    return out


def cli_args(args: Sequence[str] | None) -> list[str] | None:
    """What to hand LightningCLI: ``args`` resolved, or, for a real command line (``None``),
    ``sys.argv`` resolved in place (LightningCLI warns when given both, and DDP's launcher
    re-runs ``sys.argv`` in the other processes)."""
    if args is None:
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
        return None
    return resolve_config_args(args)


def _is_group_option(arg: str) -> bool:
    return arg.startswith("--") and "=" not in arg and "." not in arg and arg != "--config"


def _names_group_file(group: str, value: str) -> bool:
    if value.startswith("-") or Path(value).exists():
        return False
    return any((folder / name).is_file() for folder in (CONFIG_DIR / group, CONFIG_DIR) for name in (value, f"{value}.yaml"))


def available_classes(base: type, package: str) -> list[str]:
    """Import paths of the concrete subclasses of ``base`` defined in ``package``'s modules."""
    found = []
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for name, obj in vars(module).items():
            if (
                isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module.__name__
                and not inspect.isabstract(obj)
            ):
                found.append(f"{module.__name__}.{name}")
    return sorted(found)


class ArgumentParser(LightningArgumentParser):
    """LightningCLI's parser; an unknown ``class_path`` error also lists the valid classes."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        if "class_path" in message or "import path" in message:
            message += (
                "\nValid model classes: " + ", ".join(available_classes(LightningModule, "lightning_modules"))
                + "\nValid data classes: " + ", ".join(available_classes(LightningDataModule, "datamodules"))
            )
        super().error(message, ex)


class ProjectCLI(LightningCLI):
    """What the project's entry points share: bare config names, no subcommand (``run=False``),
    a seed of 0 unless the config says otherwise, the resolved config saved into the log
    directory, and error messages that list the valid classes."""

    def __init__(self, model_class: Any, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
        super().__init__(
            model_class,
            LightningDataModule,
            subclass_mode_data=True,
            run=False,
            args=cli_args(args),
            auto_configure_optimizers=False,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_class=ArgumentParser,
            **kwargs,
        )


class TrainCLI(ProjectCLI):
    """``python train.py --config X.yaml``: fit any LightningModule of the project on any
    DataModule (both chosen by ``class_path`` in the config), then test the best checkpoint.

    Extra top-level fields: ``ckpt_path`` (resume, e.g. ``runs/<name>/version_0/checkpoints/last.ckpt``)
    and ``test`` (run the test set after fitting; on by default).
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(LightningModule, args, subclass_mode_model=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="Resume fitting from this checkpoint.")
        parser.add_argument("--test", type=bool, default=True, help="Run the test set after fitting (best checkpoint).")

    def fit_and_test(self) -> None:
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=self.config.ckpt_path)
        if self.config.test and is_overridden("test_step", self.model) and is_overridden("test_dataloader", self.datamodule):
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)

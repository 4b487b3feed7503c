"""What ``train.py`` and ``compress.py`` share: config lookup and the LightningCLI set-up.

``--config alexnet_fashion.yaml`` may name a file anywhere or, as a bare name (with or
without ``.yaml``), a file in the entry point's folder: ``configs/train/`` for ``train.py``,
``configs/compress/`` for ``compress.py``. ``--trainer ddp`` names ``configs/trainer/ddp.yaml``.
"""
from __future__ import annotations

import sys
from pathlib import Path
import importlib
import inspect
import pkgutil
from typing import Any, NoReturn, Sequence

from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(value: str, folder: str) -> str:
    """Map a bare config name to ``configs/<folder>/<name>[.yaml]``; paths that exist are kept.

    Raises ``FileNotFoundError`` listing the configs of that folder when nothing matches.
    """
    if Path(value).exists():
        return value
    found = _config_in(folder, value)
    if found:
        return str(found)
    shipped = sorted(p.name for p in (CONFIG_DIR / folder).glob("*.yaml"))
    raise FileNotFoundError(
        f"config {value!r} is neither a file nor a name in {CONFIG_DIR / folder}. Shipped configs: {', '.join(shipped)}"
    )


def resolve_config_args(args: Sequence[str] | None, config_folder: str) -> list[str]:
    """Rewrite a command line so that config files may be given by bare name.

    ``--config alexnet_fashion`` -> ``configs/<config_folder>/alexnet_fashion.yaml``; a group
    file such as ``--trainer ddp`` -> ``configs/trainer/ddp.yaml``. Anything else passes unchanged.
    """
    args = list(sys.argv[1:] if args is None else args)
    out: list[str] = []
    for i, arg in enumerate(args):
        previous = args[i - 1] if i > 0 else ""
        if previous == "--config":
            arg = resolve_config_path(arg, config_folder)
        elif arg.startswith("--config="):
            arg = "--config=" + resolve_config_path(arg.split("=", 1)[1], config_folder)
        elif _is_group_option(previous) and _config_in(previous[2:], arg):
            arg = resolve_config_path(arg, previous[2:])
        out.append(arg)
    return out


def cli_args(args: Sequence[str] | None, config_folder: str) -> list[str] | None:
    """What to hand LightningCLI: ``args`` resolved, or, for a real command line (``None``),
    ``sys.argv`` resolved in place (LightningCLI warns when given both, and DDP's launcher
    re-runs ``sys.argv`` in the other processes)."""
    if args is None:
        sys.argv[1:] = resolve_config_args(sys.argv[1:], config_folder)
        return None
    return resolve_config_args(args, config_folder)


def _is_group_option(arg: str) -> bool:
    return arg.startswith("--") and "=" not in arg and "." not in arg and arg != "--config"


def _config_in(folder: str, name: str) -> Path | None:
    """``configs/<folder>/<name>`` or ``configs/<folder>/<name>.yaml`` if either is a file."""
    return next((p for p in (CONFIG_DIR / folder / name, CONFIG_DIR / folder / f"{name}.yaml") if p.is_file()), None)


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
    directory, and error messages that list the valid classes. Bare ``--config`` names are
    looked up in ``configs/<config_folder>/``."""

    config_folder: str = ""

    def __init__(self, model_class: Any, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
        super().__init__(
            model_class,
            LightningDataModule,
            subclass_mode_data=True,
            run=False,
            args=cli_args(args, self.config_folder),
            auto_configure_optimizers=False,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_class=ArgumentParser,
            **kwargs,
        )

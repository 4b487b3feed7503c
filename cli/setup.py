"""Process-wide settings, made once where a program starts (train.py, compress.py, the
experiments' and benchmarks' ``__main__`` entries, the test session), never on import of a
library module."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import matplotlib
import torch


class LightningBanners(logging.Filter):
    """Lightning logs its device banner ("GPU available: ...", "TPU available: ...") and an
    advertising tip every time a Trainer is made; a compression run makes one Trainer per pass
    and per solve, so they came out about twenty times around the report. Let each banner
    through once per process and drop the advertisement; every other message passes."""

    BANNERS = ("GPU available:", "TPU available:", "HPU available:")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("💡 Tip:"):
            return False
        if message.startswith(self.BANNERS):
            if message in self.seen:
                return False
            self.seen.add(message)
        return True


PROJECT = Path(__file__).resolve().parent.parent
_default_formatwarning = warnings.formatwarning


def format_warning(message, category, filename, lineno, line=None) -> str:
    """The project's own warnings as one line a user reads ("warning: ..."), without the path
    and source line of the ``rank_zero_warn`` call that Python's default format adds; other
    libraries' warnings keep that format (their source is what a user would look up)."""
    path = Path(filename)
    if path.is_file() and path.resolve().is_relative_to(PROJECT) and ".venv" not in path.parts:
        return f"warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


def configure_process() -> None:
    """Headless figures, flushed subnormal floats, and Lightning's repeated banners once, for the
    whole process."""
    # Figures are only written to files (PNG, TensorBoard): no display on training machines.
    matplotlib.use("Agg")
    warnings.formatwarning = format_warning
    # Weight decay leaves millions of weights of dead neurons at 1e-30 and below (14 M of the
    # 38 M in AlexNet's classifier.1 after 4 epochs on Fashion-MNIST); their products are
    # subnormal floats, which make CPU matrix products 30 times slower (3.8 s instead of 0.11 s
    # for classifier.1 on 500 images). Flush them to zero. This must happen before the first
    # parallel operation: the CPU threads PyTorch starts then inherit the mode.
    torch.set_flush_denormal(True)
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, LightningBanners) for f in logger.filters):
        logger.addFilter(LightningBanners())
    # Lightning 2.x calls torch.utils._pytree's LeafSpec in a way torch 2.14 deprecates, once per
    # pass over the data; it is Lightning's to change, and says nothing about this run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # A solve's checkpoint must hold the state *after* its last step (the step counter counts
    # finished solver steps, so a resumed solve repeats none and ends where an uninterrupted
    # one ends: tested); Lightning warns, on every solve, that manual optimisation saves that.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")

"""Process-wide settings, made once where a program starts (train.py, compress.py, the
experiments' and benchmarks' ``__main__`` entries, the test session), never on import of a
library module."""
from __future__ import annotations

import matplotlib
import torch


def configure_process() -> None:
    """Headless figures and flushed subnormal floats, for the whole process."""
    # Figures are only written to files (PNG, TensorBoard): no display on training machines.
    matplotlib.use("Agg")
    # Weight decay leaves millions of weights of dead neurons at 1e-30 and below (14 M of the
    # 38 M in AlexNet's classifier.1 after 4 epochs on Fashion-MNIST); their products are
    # subnormal floats, which make CPU matrix products 30 times slower (3.8 s instead of 0.11 s
    # for classifier.1 on 500 images). Flush them to zero. This must happen before the first
    # parallel operation: the CPU threads PyTorch starts then inherit the mode.
    torch.set_flush_denormal(True)

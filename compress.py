"""Compress a trained network layer by layer with the multi-task lasso.

    python compress.py --config alexnet_pen.yaml                       # bare names resolve in configs/compress/
    python compress.py --config alexnet_fashion_compress --checkpoint runs/alexnet_fashion/demo/checkpoints/best.ckpt
    python compress.py --config alexnet_last --lambdas [0.02] --convergence.tol 1e-5
    python compress.py --config alexnet_last --path [0.2,0.1,0.05,0.02,0.01]   # regularisation path + plot
    python compress.py --config alexnet_pen --print_config                     # a complete config to edit

Writes into the run's log directory (``runs/<name>/version_<n>/``): ``compressed.pt`` (the
smaller network; ``models.checkpoints.load_network`` loads it), ``report.json``, path plots,
TensorBoard logs of every solve. Resume an interrupted run with ``--resume <that directory>``.
"""
from __future__ import annotations

from typing import Any, Sequence

from cli.compress import CompressCLI
from cli.errors import run_command
from cli.setup import configure_process


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    configure_process()
    return CompressCLI(args).compress()


if __name__ == "__main__":
    run_command(main)  # bad input: one line and exit status 2 (NARROW_DEBUG=1 shows the traceback)

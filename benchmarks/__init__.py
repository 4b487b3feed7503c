"""Benchmarks: each ``python -m benchmarks.<name>`` prints ratios measured side by side in one run
and writes its numbers to ``benchmarks/results/``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_results(path: Path, empty: Any) -> Any:
    """The results file of an earlier run (a benchmark updates its own part of it), else ``empty``."""
    return json.loads(path.read_text()) if path.is_file() else empty


def write_results(path: Path, results: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"written: {path}")

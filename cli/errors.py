"""Bad input reaches a command-line user as one line and a non-zero exit status.

The project raises ``ValueError`` (layer names, lambdas, targets, checkpoints that do not
fit), ``FileNotFoundError`` (configs, data), ``FloatingPointError`` (a diverging solve, a
batch of non-finite activations) and ``compression.cache.CacheSpaceError`` (not enough disk)
with messages that name the problem and the fix; a traceback adds nothing to them. Set
``NARROW_DEBUG=1`` to see it anyway. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

from compression.cache import CacheSpaceError

BAD_INPUT = (ValueError, FileNotFoundError, FloatingPointError, CacheSpaceError)


def run_command(main: Callable[[], Any]) -> None:
    """Run an entry point's ``main``; on bad input print ``error: <message>`` and exit with 2."""
    try:
        main()
    except BAD_INPUT as error:
        if os.environ.get("NARROW_DEBUG"):
            raise
        print(f"error: {error}\n(set NARROW_DEBUG=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)

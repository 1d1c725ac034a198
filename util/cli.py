"""Entry point of the command-line scripts: a user's mistake ends in one line, not a traceback.

Missing files, unusable checkpoints and bad flag values raise ``FileNotFoundError``,
``CheckpointError`` or ``ValueError`` with a message that says what to do; a script run from the
shell prints that message as ``error: ...`` and exits with status 1. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Any, Callable


def run(main: Callable[..., Any], *args: Any) -> None:
    """Call ``main(*args)`` and exit: its return value when that is an int, else 0."""
    from util.checkpoint import CheckpointError
    try:
        result = main(*args)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    sys.exit(result if isinstance(result, int) else 0)


def check_positive(**values: int) -> None:
    """``ValueError`` naming the first flag given here (``--name``) that is below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")

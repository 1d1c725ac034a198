"""Entry point of the command-line scripts: a user's mistake ends in one line, not a traceback.

Missing files, unusable checkpoints, bad flag values and non-finite results raise
``FileNotFoundError``, ``CheckpointError``, ``ValueError`` or ``FloatingPointError`` with a message
that says what to do; a script run from the shell prints that message as ``error: ...`` and exits
with status 1. Anything else is a bug and keeps its traceback, and so is a ``ValueError`` raised
inside a library (torch, json, ...) rather than by this project's own checks.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
_SITE = ("site-packages", "dist-packages")


def _raised_here(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in this project's code."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return True
    path = Path(frames[-1].filename).resolve()
    return path.is_relative_to(ROOT) and not any(part in _SITE for part in path.parts)


def run(main: Callable[..., Any], *args: Any) -> None:
    """Call ``main(*args)`` and exit: its return value when that is an int, else 0."""
    from util.checkpoint import CheckpointError
    try:
        result = main(*args)
    except (FileNotFoundError, CheckpointError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except ValueError as e:
        if not _raised_here(e):
            raise
        sys.exit(f"error: {e}")
    sys.exit(result if isinstance(result, int) else 0)


def check_positive(**values: int) -> None:
    """``ValueError`` naming the first flag given here (``--name``) that is below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")

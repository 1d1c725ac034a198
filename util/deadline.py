"""A wall-clock deadline that interrupts the work running when it passes (for time-boxed benchmarks).

Why a signal and not a check between pieces of work: a benchmark that must end within a device
window cannot let one long piece (a MAR-H generation can take minutes) start just before the end and
run past it. ``SIGALRM`` raises :class:`DeadlineExceeded` in the main thread at the next Python
bytecode once the time is up, i.e. within one sampler step (each step waits for the device anyway).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


class DeadlineExceeded(BaseException):
    """The deadline passed. A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except
    Exception`` on the way (a per-item error handler, a library's fallback) swallows it."""


def can_interrupt() -> bool:
    """Whether :func:`deadline` can interrupt work here (SIGALRM exists and this is the main thread)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def deadline(at: float) -> Iterator[None]:
    """Raise :class:`DeadlineExceeded` inside the block once ``time.monotonic()`` reaches ``at``.

    Where it cannot interrupt (:func:`can_interrupt` is False) it logs a warning and only the caller's
    own checks of the clock stop the work. The previous SIGALRM handler is restored on exit.
    """
    remaining = at - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded(f"deadline passed {-remaining:.3f} s ago")
    if not can_interrupt():
        logger.warning("deadline: cannot interrupt outside the main thread or without SIGALRM; "
                       "work in progress will run past it")
        yield
        return
    previous = signal.getsignal(signal.SIGALRM)

    def on_alarm(signum: int, frame: object) -> None:
        # Restore first: the raise below may land anywhere, even in the cleanup of the with-block.
        signal.signal(signal.SIGALRM, previous)
        raise DeadlineExceeded(f"deadline reached after {remaining:.3f} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, remaining)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

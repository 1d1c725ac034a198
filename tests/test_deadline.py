"""util.deadline interrupts the work in progress when its time is up, and leaves SIGALRM as it found it."""
from __future__ import annotations

import signal
import time

import pytest

from util.deadline import DeadlineExceeded, can_interrupt, deadline

pytestmark = pytest.mark.skipif(not can_interrupt(), reason="needs SIGALRM in the main thread")


def test_interrupts_work_in_progress():
    before = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        with deadline(start + 0.2):
            time.sleep(30)
    assert time.monotonic() - start < 5
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_work_that_ends_in_time_is_untouched():
    before = signal.getsignal(signal.SIGALRM)
    with deadline(time.monotonic() + 30):
        total = sum(range(1000))
    assert total == 499500
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left to fire later


def test_a_passed_deadline_raises_before_the_block():
    ran = []
    with pytest.raises(DeadlineExceeded, match="passed"):
        with deadline(time.monotonic() - 1):
            ran.append(True)
    assert ran == []


def test_not_swallowed_by_except_exception():
    with pytest.raises(DeadlineExceeded):
        with deadline(time.monotonic() + 0.1):
            try:
                time.sleep(30)
            except Exception:  # noqa: BLE001 - what a per-item error handler does
                pytest.fail("DeadlineExceeded was caught as an Exception")

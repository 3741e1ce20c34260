"""tests/support/deadline.py: the guard fails a block that hangs, and leaves the timer a
test runs under (pytest-timeout's) as it found it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
from tests.support.deadline import Hang, hang_guard


@pytest.fixture
def outer_timer() -> Iterator[None]:
    """A real-time timer set outside the guard, as pytest-timeout sets one per test."""
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    saved, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, saved, interval)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.usefixtures("outer_timer")
def test_the_outer_timer_is_given_back_less_the_time_spent() -> None:
    with hang_guard(10):
        time.sleep(0.2)
    left, _ = signal.getitimer(signal.ITIMER_REAL)
    assert 29 < left < 29.9


@pytest.mark.usefixtures("outer_timer")
def test_a_block_that_hangs_fails() -> None:
    with pytest.raises(Hang), hang_guard(0.2):
        time.sleep(5)
    left, _ = signal.getitimer(signal.ITIMER_REAL)
    assert left > 29

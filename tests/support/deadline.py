"""Fail a call that hangs instead of hanging the test run."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator


class Hang(AssertionError):
    """The guarded code ran past its time: taken to loop for ever."""


@contextlib.contextmanager
def hang_guard(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the guarded block after ``seconds`` (SIGALRM: main thread,
    POSIX only). A timing *bound* this is not: the limit is far above the expected time,
    and only a loop that never ends passes it. Hypothesis's deadline is checked only once
    an example returns, so it cannot report such a loop.

    pytest-timeout (``timeout`` in pyproject.toml) runs on the same real-time timer: the
    time left on it is given back when the block ends, so the test's own limit still
    holds (``signal.alarm(0)`` alone cancelled it for the rest of the test)."""

    def interrupt(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    if outer and outer < seconds:
        signal.setitimer(signal.ITIMER_REAL, outer)  # the test's limit comes first
    began = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            left = max(outer - (time.monotonic() - began), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, interval)

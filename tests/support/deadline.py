"""Fail a call that hangs instead of hanging the test run."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Hang(AssertionError):
    """The guarded code ran past its time: taken to loop for ever."""


@contextlib.contextmanager
def hang_guard(seconds: int) -> Iterator[None]:
    """Raise :class:`Hang` in the guarded block after ``seconds`` (SIGALRM: main thread,
    POSIX only). A timing *bound* this is not: the limit is far above the expected time,
    and only a loop that never ends passes it. Hypothesis's deadline is checked only once
    an example returns, so it cannot report such a loop."""

    def interrupt(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

"""When a facade starts its worker process again, and after how long: pure decisions.

A worker child survives every transient store error by itself and ends on a permanent
one only after telling its parent why (an ``error`` frame: a damaged store, a newer
schema, access denied); starting it again would fail the same way. A child that vanished
*without* saying why (the OOM killer's SIGKILL, a crash in a C extension, an operator's
``kill -9``) is what a supervisor is for. A child stopped from outside on purpose
(SIGTERM, SIGINT, or a clean exit nobody here asked for) stays stopped: somebody meant it.
:class:`~mailstrom.client.process.WorkerProcess` asks :func:`judge_exit` each time its
child's stream ends and waits :class:`RestartBackoff`'s delay before starting another.
"""

from __future__ import annotations

import signal
from enum import StrEnum

FIRST_DELAY = 1.0
"""Seconds before the first restart after a child died."""
MAX_DELAY = 60.0
"""The longest wait between restarts: the delay doubles up to this."""
SETTLED_AFTER = 60.0
"""Seconds a child must have run (since ``ready``) for its death to count as a new
trouble, the delay starting again from :data:`FIRST_DELAY`."""

_OPERATOR_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""Signals that ask a process to stop: whoever sent them meant it."""


class ChildExit(StrEnum):
    """How a worker child's life ended, as far as its parent should act on it."""

    ASKED = "asked"
    """This program stopped it (``stop()``, or a failed ``start()``): nothing to do."""
    FAILED = "failed"
    """It ended on an error it reported itself: permanent, a restart would fail alike."""
    STOPPED_OUTSIDE = "stopped outside"
    """Stopped on purpose by someone else (SIGTERM, SIGINT, exit status 0): not
    restarted, but reported, since nothing delivers any more."""
    DIED = "died"
    """Killed by another signal, or a non-zero exit without a word: start it again."""


def judge_exit(
    returncode: int, *, reported_error: bool, asked: bool, said_stopped: bool = True
) -> ChildExit:
    """What a child's end means, from its ``returncode`` (negative: the signal that
    killed it), whether it sent an ``error`` frame, whether this program asked it to
    stop, and whether it said it stopped (its ``stopped`` frame, which every clean end
    sends last).

    >>> judge_exit(-9, reported_error=False, asked=False)
    <ChildExit.DIED: 'died'>
    >>> judge_exit(1, reported_error=True, asked=False)
    <ChildExit.FAILED: 'failed'>
    """
    if asked:
        return ChildExit.ASKED
    if reported_error:
        return ChildExit.FAILED
    if returncode == 0 and not said_stopped:
        # No clean end (that says so first): a status nobody could read. Where SIGCHLD
        # is ignored the kernel reaps the child, waitpid() fails and Popen says 0.
        return ChildExit.DIED
    if returncode == 0 or -returncode in _OPERATOR_SIGNALS:
        return ChildExit.STOPPED_OUTSIDE
    return ChildExit.DIED


def describe_exit(returncode: int) -> str:
    """``"killed by SIGKILL"``, ``"exited with status 3"``: how a process ended, for a
    person."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"


class RestartBackoff:
    """The wait before each restart: :data:`FIRST_DELAY`, doubling up to
    :data:`MAX_DELAY`, and :data:`FIRST_DELAY` again once a child had been running for
    :data:`SETTLED_AFTER` seconds before it died. Times are a monotonic clock's, passed
    in (no clock of its own, so tests need no sleeps).

    >>> backoff = RestartBackoff()
    >>> [backoff.next_delay(now=0.0) for _ in range(3)]
    [1.0, 2.0, 4.0]
    """

    def __init__(self) -> None:
        self._next = FIRST_DELAY
        self._ready_at: float | None = None

    def child_ready(self, *, now: float) -> None:
        """The current child answered ``ready`` at ``now`` (later answers change
        nothing: it has been running since the first)."""
        if self._ready_at is None:
            self._ready_at = now

    def next_delay(self, *, now: float) -> float:
        """The current child died at ``now``: seconds to wait before the next one."""
        ready_at, self._ready_at = self._ready_at, None
        if ready_at is not None and now - ready_at >= SETTLED_AFTER:
            self._next = FIRST_DELAY
        delay = self._next
        self._next = min(delay * 2, MAX_DELAY)
        return delay

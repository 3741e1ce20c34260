"""The cross-process half of an SQLite store's write lock: ``flock`` on ``<database>-lock``,
waited for until a deadline and no longer.

The lock is a latency device, not a guard: SQLite's own locking (``BEGIN IMMEDIATE``)
keeps writers apart, but its busy handler sleeps 1, 2, 5, 10... ms between looks, where a
writer waiting here finds the lock free within about a tenth of the time it has waited
(0.05 ms at the least): ``send_email``'s latency while a worker process writes every few
milliseconds.

A blocking ``flock`` cannot be given a timeout (nor be interrupted from another thread:
Python retries it on EINTR), and a process that held the lock and stopped (SIGSTOP,
``docker pause``, a debugger, I/O that never ends) held every other process's writes for
as long as it stayed stopped, whatever ``busy_timeout`` said. So the lock is tried without
blocking, first at once (the uncontended path: the one system call it always was), then
after sleeps that grow with the time waited: 0.05 ms while the holder is quick, up to 5 ms
behind a long one.

Measured against the blocking ``flock`` (``benchmarks/e2e.py``, a worker process writing
while ``send_email`` enqueues, 2 CPUs): end-to-end rates and ``send_email``'s p99 within
run-to-run noise. A helper thread blocking in ``flock`` on a description of its own, which
the waiter could abandon, woke waiters sooner but cost a thread and two hand-offs per
contended wait: 15-20 % fewer messages a second there.
"""

from __future__ import annotations

import fcntl
import os
import time

_FIRST_SLEEP = 0.00005
"""Seconds between the first looks: a holder's write takes a fraction of a millisecond
(a lease, a record) to a few (an fsynced enqueue)."""
_LONGEST_SLEEP = 0.005
"""Seconds between looks behind a holder that takes long (or has stopped)."""


class ProcessLock:
    """``flock`` on the file open as ``fd`` (which this object closes), bounded in time.
    Used by one thread at a time (the store's in-process mutex is held around it)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def acquire(self, deadline: float) -> bool:
        """Take the lock; False when another process still held it at ``deadline``
        (``time.monotonic()``): the caller then relies on SQLite's own locking alone."""
        if _try_lock(self._fd):
            return True
        began = time.monotonic()
        while (now := time.monotonic()) < deadline:
            waited = now - began
            time.sleep(min(max(waited / 10, _FIRST_SLEEP), _LONGEST_SLEEP, deadline - now))
            if _try_lock(self._fd):
                return True
        return False

    def release(self) -> None:
        """Give back the lock :meth:`acquire` took."""
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True

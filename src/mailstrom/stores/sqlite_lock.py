"""The cross-process half of an SQLite store's write lock: ``flock`` on ``<database>-lock``,
waited for until a deadline and no longer.

The lock is a latency device, not a guard: SQLite's own locking (``BEGIN IMMEDIATE``)
keeps writers apart, but its busy handler sleeps 1, 2, 5, 10... ms between looks, where a
writer waiting here looks again after a twenty-fifth of the time it has waited (0.02 ms
at the least): ``send_email``'s latency while a worker process writes every few
milliseconds.

A blocking ``flock`` cannot be given a timeout (nor be interrupted from another thread:
Python retries it on EINTR), and a process that held the lock and stopped (SIGSTOP,
``docker pause``, a debugger, I/O that never ends) held every other process's writes for
as long as it stayed stopped, whatever ``busy_timeout`` said. So the lock is tried without
blocking, first at once (the uncontended path: the one system call it always was), then
after sleeps that grow with the time waited, up to 5 ms behind a long holder.

Measured with a holder taking the lock for 1 ms every 3 ms, from the release to the
waiter holding it (p50): a blocking ``flock`` 27-33 µs, polling after a tenth of the time
waited with Linux's default timer slack 77-83 µs, as here 45-49 µs.
``benchmarks/e2e.py`` (a worker process writing while ``send_email`` enqueues, 2 CPUs):
the 1-thread row and ``send_email``'s p99 within run-to-run noise of the blocking
``flock`` (the first polling, at 80 µs, cost that row 5-8 %). A helper thread blocking in
``flock`` on a description of its own, which the waiter could abandon, cost a thread and
two hand-offs per contended wait: 15-20 % fewer messages a second.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("mailstrom.stores.sqlite")

_FIRST_SLEEP = 0.00002
"""Seconds between the first looks: a holder's write takes a fraction of a millisecond
(a lease, a record) to a few (an fsynced enqueue)."""
_GROWTH = 25
"""The sleep between two looks is the time waited so far divided by this (within the
bounds around it): behind a holder of 1 ms, the waiter looks every 40 µs by then."""
_LONGEST_SLEEP = 0.005
"""Seconds between looks behind a holder that takes long (or has stopped)."""


_PR_SET_TIMERSLACK = 29
_PR_GET_TIMERSLACK = 30


class _PreciseSleeps:
    """While a thread polls, its short sleeps last what they ask: Linux lengthens a
    thread's sleep by its timer slack (50 µs by default, so a 20 µs sleep took 70), and
    the waiter would find the lock free that much later. The thread's own slack is put
    back after the wait. Elsewhere (or without libc's ``prctl``) sleeps are as they are."""

    def __init__(self) -> None:
        self._prctl: Any = None
        self._looked = False

    def _find(self) -> Any:
        """libc's ``prctl``, looked up at the first wait (ctypes is not worth importing for
        a store that is never contended)."""
        if sys.platform != "linux":
            self._looked = True
            return None
        try:
            import ctypes

            self._prctl = ctypes.CDLL(None).prctl  # the C library the interpreter runs on
        except OSError:
            # Out of descriptors (EMFILE: the import opens files): looked for again at the
            # next wait. Raised here it was taken for a file system that refuses flock,
            # and the store never took its flock again.
            return None
        except (ImportError, AttributeError):
            self._prctl = None
        self._looked = True
        return self._prctl

    @contextmanager
    def held(self) -> Iterator[None]:
        prctl = self._prctl if self._looked else self._find()
        if prctl is None:
            yield
            return
        slack = prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0)
        prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
        try:
            yield
        finally:
            if slack > 0:
                prctl(_PR_SET_TIMERSLACK, slack, 0, 0, 0)


_PRECISE = _PreciseSleeps()


class ProcessLock:
    """``flock`` on the file open as ``fd`` (which this object closes), bounded in time.
    Used by one thread at a time (the store's in-process mutex is held around it)."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path
        self._refused = False
        """The file system refused ``flock`` on the file: never asked again."""

    def acquire(self, deadline: float) -> bool:
        """Take the lock; False when another process still held it at ``deadline``
        (``time.monotonic()``), or when the file system refuses ``flock`` (ENOLCK on an
        NFS mount without its lock daemon, EOPNOTSUPP on some network and FUSE file
        systems): the caller then relies on SQLite's own locking alone. The lock is a
        latency device, so a refusal must fail no write; it is said once, and the file
        system is not asked again."""
        if self._refused:
            return False
        try:
            return self._wait(deadline)
        except OSError as exc:
            self._refused = True
            log.warning(
                "cannot flock %s (%s): this store's writes wait for other processes' in"
                " SQLite's busy handler, as other programs' do",
                self._path,
                exc.strerror or exc,
            )
            return False

    def _wait(self, deadline: float) -> bool:
        if _try_lock(self._fd):
            return True
        with _PRECISE.held():
            began = time.monotonic()
            while (now := time.monotonic()) < deadline:
                waited = now - began
                pause = min(max(waited / _GROWTH, _FIRST_SLEEP), _LONGEST_SLEEP, deadline - now)
                time.sleep(pause)
                if _try_lock(self._fd):
                    return True
        return False

    def release(self) -> None:
        """Give back the lock :meth:`acquire` took."""
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


def _try_lock(fd: int) -> bool:
    """Whether ``fd`` is now locked; False when another holds it. Any other refusal is
    raised (an OSError)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True

"""The cross-process half of an SQLite store's write lock: ``flock`` on ``<database>-lock``,
waited for until a deadline and no longer.

The lock is a latency device, not a guard: SQLite's own locking (``BEGIN IMMEDIATE``)
keeps writers apart, but its busy handler sleeps 1, 2, 5, 10... ms between looks, where a
writer blocked in ``flock`` wakes the moment the lock is free (``send_email``'s latency
while a worker process writes every few milliseconds).

A blocking ``flock`` cannot be given a timeout, and a process that holds the lock and
stops (SIGSTOP, ``docker pause``, a debugger, I/O that never ends) held every other
process's writes for as long as it stayed stopped, whatever ``busy_timeout`` said. So:

- First a non-blocking attempt on the store's own descriptor: the uncontended path is the
  one system call it always was.
- When another process holds the lock, a helper thread blocks in ``flock`` on an open file
  description of its own (``flock`` locks belong to the open file description, so two of
  them exclude each other even inside one process) and hands the lock to the waiter the
  moment it is granted: the waiter wakes as promptly as it did blocked in ``flock`` itself.
- A waiter whose deadline passes leaves the helper behind. The next waiter of the store
  adopts it instead of starting another, so at most one helper per store is ever blocked;
  a helper granted the lock with nobody waiting closes its description, which releases
  its own lock and never anyone else's.

Only one thread of a process waits here at a time (the store's in-process mutex is held
around :meth:`ProcessLock.acquire` and :meth:`ProcessLock.release`).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from dataclasses import dataclass


@dataclass(eq=False, slots=True, kw_only=True)
class _Helper:
    """A thread blocked in ``flock`` on ``fd``, a description of its own (private, mutable)."""

    fd: int
    pid: int
    """The process that started it: after a fork, the child has the state but no thread."""
    waiter: threading.Event | None = None
    """Set when the lock is granted (or the wait failed); None while nobody waits."""
    granted: bool = False


class ProcessLock:
    """``flock`` on ``path`` (already open as ``fd``, which this object closes), bounded."""

    def __init__(self, path: str, fd: int) -> None:
        self._path = path
        self._fd = fd
        self._mutex = threading.Lock()
        """Orders a helper's grant against its waiter giving up."""
        self._helper: _Helper | None = None

    def acquire(self, deadline: float) -> int | None:
        """Take the lock; the descriptor to hand back to :meth:`release`, or None when it
        was not had by ``deadline`` (``time.monotonic()``) or cannot be waited for (the
        caller then relies on SQLite's own locking alone)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._wait(deadline)
        return self._fd

    def release(self, fd: int) -> None:
        """Give back the lock :meth:`acquire` returned as ``fd``."""
        if fd == self._fd:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            os.close(fd)  # a helper's own description: closing it releases its lock

    def close(self) -> None:
        """Close the store's descriptor; a helper still blocked closes its own when granted."""
        os.close(self._fd)

    def _wait(self, deadline: float) -> int | None:
        granted = threading.Event()
        with self._mutex:
            helper = self._helper
            if helper is None or helper.pid != os.getpid():
                helper = self._start_helper()
                if helper is None:
                    return None
            helper.waiter = granted
        granted.wait(max(deadline - time.monotonic(), 0.0))
        with self._mutex:
            if helper.granted:  # (perhaps at the last moment)
                return helper.fd if helper.fd >= 0 else None
            helper.waiter = None  # left behind, for the next waiter to adopt
        return None

    def _start_helper(self) -> _Helper | None:
        """A new helper thread, blocked in ``flock``; called with ``_mutex`` held."""
        stale = self._helper
        if stale is not None and stale.fd >= 0:
            # A helper of the process this one was forked from: its description is
            # shared with it, and must not stay open (and locked) here.
            os.close(stale.fd)
        self._helper = None
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None  # (the lock file removed by hand) SQLite's locking still holds
        helper = _Helper(fd=fd, pid=os.getpid())
        self._helper = helper
        threading.Thread(
            target=self._block, args=(helper,), name="mailstrom-sqlite-flock", daemon=True
        ).start()
        return helper

    def _block(self, helper: _Helper) -> None:
        """The helper thread: wait for the lock, then hand it over or give it back."""
        try:
            fcntl.flock(helper.fd, fcntl.LOCK_EX)
        except OSError:  # ENOLCK and the like: the waiter goes on without the lock
            os.close(helper.fd)
            helper.fd = -1
        with self._mutex:
            helper.granted = True
            if self._helper is helper:
                self._helper = None  # no longer there to adopt
            waiter = helper.waiter
            if waiter is not None:
                waiter.set()
                return
        if helper.fd >= 0:
            os.close(helper.fd)  # nobody waits any more: release the lock at once

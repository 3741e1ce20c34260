"""A process forked from the application (another thread's ``os.fork()``:
multiprocessing, a pre-forking web server) lets go of the application's worker child
processes without touching them, so that each child still sees its control pipe close
when its real parent dies; and no fork comes while a child's pipes are being made.

Mixed into :class:`~mailstrom.client.process.WorkerProcess`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import weakref
from typing import IO


class ForkForgetting:
    """What a fork does with a worker process; mixed into
    :class:`~mailstrom.client.process.WorkerProcess`."""

    _lock: threading.Lock
    _write_lock: threading.RLock
    _stopping: bool
    _halt: threading.Event
    _supervisor: threading.Thread | None
    _proc: subprocess.Popen[bytes] | None
    _stdin: IO[bytes] | None
    _ready: threading.Event
    _stopped: threading.Event

    def _forget(self) -> None:
        # Only the descriptors are touched, never reading or writing the file objects:
        # the parent's reader thread may have held a buffer's lock at the fork, and it
        # does not exist here (``closed`` and ``fileno()`` take no lock). Pointing them at
        # /dev/null releases this process's ends of the pipes while the descriptor
        # numbers stay valid for whatever later closes the objects. Only the current
        # child's streams still open count: the number of one closed before the fork may
        # be the application's file or pipe now (a stream reads as closed before its
        # number is freed). The same goes for _lock, and no supervisor thread exists here
        # to restart anything. So for _write_lock, which a wake() or stop() of another
        # thread may have held at the fork: this process's own stop() could not send its
        # child "stop" (nor any wake() reach it), and waited for ever. And for the events,
        # whose locks a thread inside set() or wait() holds for a moment (a reader setting
        # "ready", a restart's backoff ending): set or cleared here, this hook hung.
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._stopping = True
        self._halt = _event(True)
        self._supervisor = None
        proc, self._proc, self._stdin = self._proc, None, None
        streams = () if proc is None else (proc.stdin, proc.stdout)
        fds = [s.fileno() for s in streams if s is not None and not s.closed]
        if fds:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.dup2(null, fd)
            finally:
                os.close(null)
        self._ready = _event(False)
        self._stopped = _event(True)


def _event(state: bool) -> threading.Event:
    """A new event, set or not: an inherited one's lock may be held for good."""
    event = threading.Event()
    if state:
        event.set()
    return event


def _forget_after_fork() -> None:
    """In a process forked from this one (a pre-forking web server, say): let go of the
    parent's worker processes without touching them, so that each worker still sees its
    control pipe close when its real parent dies."""
    SPAWNING.release()
    for worker in list(LIVE):
        worker._forget()


LIVE: weakref.WeakSet[ForkForgetting] = weakref.WeakSet()
SPAWNING = threading.Lock()
"""Held from the making of a child's pipes until they are where :meth:`ForkForgetting._forget`
finds them (the child's ends closed here, ours the current child's), and taken by every
fork (another thread's ``os.fork()``: multiprocessing, a pre-forking server), which thus
comes before or after. A fork in between held a copy of each pipe end: of the child's end
of its frames, which kept that pipe open past the child's end (the reader waited for the
fork to exit, and stop() for the reader), and of our end of its control pipe, whose close
the child then did not see when this process died. (A child is started by
``_posixsubprocess``, which runs no fork hook: no thread waits for itself.)"""
os.register_at_fork(
    before=SPAWNING.acquire,
    after_in_parent=SPAWNING.release,
    after_in_child=_forget_after_fork,
)

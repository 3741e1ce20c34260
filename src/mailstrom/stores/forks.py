"""Stores in a process forked from the one that opened them.

A pre-forking server (gunicorn ``--preload``), ``multiprocessing`` with the fork start
method or the application's own ``os.fork()`` hands the child a copy of every open store.
The copy's connections are the parent's: SQLite forbids using a connection across a fork
(it can corrupt the database: https://sqlite.org/howtocorrupt.html, section 2.6), and a
PostgreSQL connection's socket would carry both processes' statements. Its locks are
copies too, held for good where another thread of the parent held them at the fork (a
worker thread in the middle of a write made every ``send_email`` of the child fail).

So each store renews itself in the child (its ``_after_fork``, registered here): fresh
locks, connections made anew on first use, and none of the parent's state that names the
parent's own threads. What it inherited it hands to :func:`keep`: never used, never
closed on purpose (closing could end the parent's session or tidy up files the parent
uses). A store whose driver keeps state per process (SQLite's locks) also waits before the
fork for the statements under way to end (``_before_fork``).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol


class _Renewable(Protocol):
    def _before_fork(self) -> None: ...
    def _after_fork_in_parent(self) -> None: ...
    def _after_fork(self) -> None: ...


_STORES: weakref.WeakSet[_Renewable] = weakref.WeakSet()
_INHERITED: list[object] = []


def renew_after_fork(store: _Renewable) -> None:
    """Have ``store._before_fork()`` called before every fork of this process, then
    ``_after_fork_in_parent()`` here and ``_after_fork()`` in the child."""
    _STORES.add(store)


def keep(*inherited: object) -> None:
    """Hold on to what this forked process inherited, so that collecting it never closes
    the parent's connections or files."""
    _INHERITED.extend(inherited)


class _Socket(Protocol):
    def fileno(self) -> int: ...


_SOCKETS: weakref.WeakSet[_Socket] = weakref.WeakSet()


def not_shared(connection: _Socket) -> None:
    """Have every process forked from this one let go of ``connection``'s socket: it is
    pointed at /dev/null there, so that nothing the fork does with its copy (a statement,
    the goodbye its driver sends when it is collected) reaches the parent's session."""
    _SOCKETS.add(connection)


def _let_go_of_sockets() -> None:
    connections = list(_SOCKETS)
    _SOCKETS.clear()
    if not connections:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for connection in connections:
            fd = _fileno(connection)
            if fd is not None:
                os.dup2(null, fd)
                keep(connection)
    finally:
        os.close(null)


def _fileno(connection: _Socket) -> int | None:
    try:
        return connection.fileno()
    except Exception:  # closed already: nothing of it is left to share
        return None


FORK_WAIT = 2.0
"""Seconds a fork of the process waits for the SQLite statements under way to end (see
:func:`hold_when_idle`)."""


def hold_when_idle(lock: threading.Lock, busy: Callable[[], bool]) -> None:
    """Take ``lock`` once ``busy()``, asked under it, says no statement is under way, or
    after :data:`FORK_WAIT` seconds whatever it says. SQLite keeps the locks of all a
    process's connections to a file in one place per process, which a fork inherits: a
    statement under way at the fork leaves the child believing another of its
    connections holds a lock, for good. The lock, held through the fork, keeps new ones
    from starting."""
    deadline = time.monotonic() + FORK_WAIT
    while True:
        lock.acquire()
        if not busy() or time.monotonic() >= deadline:
            return
        lock.release()
        time.sleep(0.001)


_FORKING: list[_Renewable] = []
"""The stores readied for the fork under way (a store made meanwhile is not in it)."""


def _before() -> None:
    _FORKING[:] = list(_STORES)
    for store in _FORKING:
        store._before_fork()


def _in_parent() -> None:
    for store in _FORKING:
        store._after_fork_in_parent()
    _FORKING.clear()


def _in_child() -> None:
    _let_go_of_sockets()
    forking, _FORKING[:] = list(_FORKING), []
    for store in forking:
        store._after_fork()


os.register_at_fork(before=_before, after_in_parent=_in_parent, after_in_child=_in_child)

"""A pool whose callers do not wait out its backoff once the server is back.

psycopg_pool replaces a connection it lost by attempts that back off (1 s, 2 s, 4 s, ...;
up to half of ``reconnect_timeout`` apart, see
:func:`~mailstrom.stores.postgres.connect.connection_pool`), and a caller that finds no
connection waited for the next of them: a call made once the server was back (a
``send_email``, a worker's lease) failed with StoreUnreachable when the store's timeout
was shorter than that, or waited seconds, although the server answered at once; and a
worker's lease that began to wait during the outage went on waiting after it.

:class:`PromptPool` brings the next attempt forward while callers wait: a caller that
begins to wait and finds one pending has it made at once (or :data:`GAP` after the last
attempt failed, if that is later), and while callers go on waiting the attempts come
:data:`GAP` apart. One attempt is brought forward at a time, however many callers wait:
during an outage a pool that callers wait for tries once a second, no more. With nobody
waiting (no caller began to within the pool's ``timeout``) the pool keeps its backoff. A
connection a caller finds in the pool costs nothing more.

psycopg_pool offers no public hook for a caller beginning to wait: this overrides
``_maybe_grow_pool``, which it calls then (under its lock), and runs the attempts it
schedules itself (its ``AddConnection`` tasks, met in :meth:`PromptPool.schedule_task`),
each once. tests/integration/test_postgres_back_from_outage.py fails when psycopg_pool
changes either.
"""

from __future__ import annotations

import threading
from collections import deque
from time import monotonic
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool
from psycopg_pool.pool import AddConnection, MaintenanceTask

GAP = 1.0
"""Seconds between two attempts brought forward, at least, and between a failed attempt
and the next while callers wait, at most."""


class PromptPool(ConnectionPool[psycopg.Connection[Any]]):
    """A pool whose attempt to reconnect is not left pending while callers wait for a
    connection (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before psycopg_pool's __init__: open=True starts its workers there.
        self._pending: deque[AddConnection] = deque()
        """psycopg_pool's attempts waiting out their backoff, the oldest first."""
        self._forward = False
        """Whether an attempt brought forward is scheduled or running."""
        self._failed_at = 0.0
        self._waited_at = float("-inf")
        self._checking = threading.local()
        super().__init__(*args, **kwargs)

    def check(self) -> None:
        self._checking.now = True  # no caller waits for this one
        try:
            super().check()
        finally:
            self._checking.now = False

    def _maybe_grow_pool(self) -> None:
        # psycopg_pool calls this, under its lock, as a caller begins to wait for a
        # connection (not when one is handed out at once), and from check().
        super()._maybe_grow_pool()
        if not getattr(self._checking, "now", False):
            self._waited_at = monotonic()
            self._bring_forward()

    def schedule_task(self, task: MaintenanceTask, delay: float) -> None:
        if isinstance(task, AddConnection):  # an attempt failed: the next after `delay`
            with self._lock:
                self._failed_at = monotonic()
                self._pending.append(task)
                self._bring_forward()
            task = _Pending(self, task)
        super().schedule_task(task, delay)

    def _bring_forward(self) -> None:
        """Schedule the oldest pending attempt for now, or :data:`GAP` after the last
        failed, when a caller waits (or may still: one began within ``timeout``), unless
        one brought forward is scheduled or running."""
        with self._lock:
            if self._forward or not self._pending:
                return
            if monotonic() - self._waited_at >= self.timeout:
                return
            self._forward = True
            delay = self._failed_at + GAP - monotonic()
        if delay > 0:
            super().schedule_task(_Forward(self), delay)
        else:
            self.run_task(_Forward(self))

    def _take(self, task: AddConnection | None) -> AddConnection | None:
        """``task`` (None: the oldest) taken out of the pending attempts to run now; None
        when it is no longer pending (it ran already)."""
        with self._lock:
            if task is None:
                return self._pending.popleft() if self._pending else None
            try:
                self._pending.remove(task)
            except ValueError:
                return None
            return task

    def _forwarded(self) -> None:
        """The attempt brought forward ran: bring the next forward if callers wait."""
        with self._lock:
            self._forward = False
            self._bring_forward()


class _Pending(MaintenanceTask):
    """A pending attempt at its time (see :meth:`PromptPool.schedule_task`): run unless it
    was brought forward meanwhile."""

    def __init__(self, pool: PromptPool, task: AddConnection) -> None:
        super().__init__(pool)
        self.task = task

    def _run(self, pool: ConnectionPool[Any]) -> None:
        assert isinstance(pool, PromptPool)
        if pool._take(self.task) is not None:
            self.task.run()


class _Forward(MaintenanceTask):
    """The oldest pending attempt, made now (see :meth:`PromptPool._bring_forward`)."""

    def _run(self, pool: ConnectionPool[Any]) -> None:
        assert isinstance(pool, PromptPool)
        try:
            task = pool._take(None)
            if task is not None:
                task.run()
        finally:
            pool._forwarded()

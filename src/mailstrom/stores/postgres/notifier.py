"""The NOTIFY that tells workers about new mail, sent after the enqueue, not inside it.

PostgreSQL serialises the commits of every transaction that issued a NOTIFY, across the
whole server, with the WAL flush inside the serialised part (the notification queue's
lock is held until the commit ends). An enqueue statement that notified itself therefore
capped the queue at one commit per disk flush for all clients together: pgbench on this
project's test machine (fsync on, an INSERT of 1 KB per transaction) did 4,300-4,700
transactions/s with a NOTIFY whether 1, 8 or 32 clients ran, and 5,300 / 11,300 / 13,900
without one.

So the enqueue commits on its own, and a :class:`Notifier` thread sends the NOTIFY from a
connection of its own, in a transaction that does not wait for the disk: at once after a
quiet spell, then at most one every :data:`GAP` for however many enqueues commit
meanwhile. Every enqueue is followed by a NOTIFY that starts after its commit, so a
listening worker never misses mail that was committed before it was told. If the
notifier cannot reach the server, workers find the mail at their next poll
(``Config.poll_interval``), as they do after any lost wake-up.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg
from psycopg import sql

from mailstrom.stores.forks import not_shared
from mailstrom.stores.postgres.connect import bounded, unheard
from mailstrom.stores.postgres.locks import DEFAULT_LOCK_BOUND, LockBound
from mailstrom.stores.postgres.sql import channel_of

log = logging.getLogger(__name__)

GAP = 0.01
"""Seconds between two NOTIFYs at most: a burst of enqueues costs the server one NOTIFY
transaction every 10 ms, not one per enqueue, and a worker hears of the burst's later mail
at most 10 ms late (of the first at once). With 2 ms, single enqueues on the fixture's
server ran 2-16 % below the in-statement NOTIFY they replaced; with 10 ms, 1.5-3.6 %."""


def notify_statement(channel: str, bound: sql.Composable | None) -> sql.Composed:
    """One round trip (no parameters: the simple query protocol takes several statements).
    A wake-up needs no flush to disk, and SET LOCAL ends with the transaction, so nothing
    outlives it on a connection a transaction-pooling proxy hands to another client next.
    The NOTIFY takes a lock at commit that every notifying session takes in turn: one
    another session holds is waited for as long as ``bound`` (a statement from
    :class:`~mailstrom.stores.postgres.locks.LockBound`) says."""
    return sql.SQL("; ").join(
        [
            sql.SQL("BEGIN; SET LOCAL synchronous_commit TO off"),
            *([] if bound is None else [bound]),
            sql.SQL("NOTIFY {}; COMMIT").format(sql.Identifier(channel)),
        ]
    )


class Notifier:
    """Sends a NOTIFY on the queue's work channel after :meth:`poke`, coalescing pokes that come
    while a NOTIFY is under way. The thread and its connection start at the first poke."""

    def __init__(self, url: str, *, lock_bound: LockBound | None = DEFAULT_LOCK_BOUND) -> None:
        self._url = url
        self._lock_bound = lock_bound
        self._statement: sql.Composed | None = None
        """The NOTIFY, made for each new connection (the channel is the queue's schema's)."""
        self._wanted = threading.Event()
        self._pending = False
        self._closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.sent = 0
        """NOTIFYs sent so far (for tests and curiosity)."""
        self.connection: psycopg.Connection[tuple[object, ...]] | None = None
        """The thread's connection, once it has sent a NOTIFY (for tests)."""

    def poke(self) -> None:
        """Some mail was committed: make sure a NOTIFY goes out after this call."""
        if self._thread is None:
            with self._lock:
                if self._closed:
                    return
                if self._thread is None and not self._start():
                    return
        self._pending = True
        self._wanted.set()

    def _start(self) -> bool:
        """Start the thread (under ``_lock``); False when none can be started (a
        container's pids.max reached). The mail is committed already: an error here
        would make a caller that tries again queue it twice. Workers find it at their
        next poll, and the next poke tries again."""
        thread = threading.Thread(target=self._run, name="mailstrom-pg-notify", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:
            log.warning("no NOTIFY after an enqueue (%s): workers find it at their next poll", exc)
            return False
        self._thread = thread
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Send what was asked for, then stop the thread. Idempotent."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wanted.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._pending:
                    # Cleared before the NOTIFY goes: a poke from now on gets another one.
                    self._pending = False
                    self._notify()
                if self._closed and not self._pending:
                    return
                # Pokes in the next few ms share one NOTIFY, sent when the gap ends; the
                # first poke after a quiet spell is sent at once.
                time.sleep(GAP)
        finally:
            if self.connection is not None:
                self.connection.close()

    def _notify(self) -> None:
        """One NOTIFY; a broken connection is replaced once."""
        for attempt in (1, 2):
            try:
                if self.connection is None or self._statement is None:
                    self.connection = psycopg.connect(bounded(self._url), autocommit=True)
                    not_shared(self.connection)
                    unheard(self.connection)  # behind a pooler, it may be handed some
                    bound = self._lock_bound.local_on(self.connection) if self._lock_bound else None
                    self._statement = notify_statement(channel_of(self.connection), bound)
                self.connection.execute(self._statement)
                self.sent += 1
                return
            except psycopg.Error as exc:
                if self.connection is not None:
                    self.connection.close()
                    self.connection = None
                if attempt == 2:
                    log.debug("NOTIFY failed (workers find the mail at their next poll): %s", exc)

"""LISTEN on a dedicated connection in a daemon thread and call back per notification."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import psycopg
from psycopg import sql

from mailstrom.errors import StoreError, StoreUnreachable
from mailstrom.stores.forks import not_shared
from mailstrom.stores.postgres.connect import bounded
from mailstrom.stores.postgres.locks import DEFAULT_LOCK_BOUND, LockBound
from mailstrom.stores.postgres.notifier import notify_statement
from mailstrom.stores.postgres.sql import channel_of, queries, translate_errors

log = logging.getLogger(__name__)

_STOP_POLL = 5.0
"""Seconds between checks of the stop flag should the stop notification be lost; idle
otherwise, so this is no busy loop."""
_RECONNECT_MAX = 30.0


class Listener:
    """Calls ``callback`` with the payload whenever a NOTIFY arrives on the work channel.

    The connection is opened and LISTEN issued before :meth:`start` returns, so nothing
    committed afterwards is missed; when the server cannot be reached just then, the
    thread connects with backoff and calls ``callback`` once with None when it listens.
    :meth:`stop` wakes the thread with a NOTIFY on a channel private to this listener,
    rather than waiting out a poll timeout.
    If the connection breaks, the thread reconnects with backoff and calls ``callback``
    once with None (notifications of any payload may have been lost meanwhile).

    The backoff (0.5 s doubling to :data:`_RECONNECT_MAX`) spares a server that is down,
    but it went on once the server was back: the worker deaf to new mail, found at its
    next poll only, for up to that long. So :meth:`answered` (the store's pool made a
    connection) cuts a wait short: the next attempt is made at once, by the thread as
    always, one at a time.
    """

    def __init__(
        self,
        url: str,
        callback: Callable[[str | None], None],
        *,
        lock_bound: LockBound | None = DEFAULT_LOCK_BOUND,
    ) -> None:
        self._url = url
        self._lock_bound = lock_bound
        self._callback = callback
        self._stop_channel = f"mailstrom_stop_{uuid.uuid4().hex}"
        self._channel = ""
        """The queue's work channel, read from the server at each connect."""
        self._stopping = threading.Event()
        self._woken = threading.Event()
        """Ends a wait between two attempts: set by :meth:`stop` and :meth:`answered`."""
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._thread = threading.Thread(target=self._run, name="mailstrom-pg-listen", daemon=True)

    def start(self) -> None:
        """Connect, LISTEN, and start the thread. A server that cannot be reached now
        (StoreUnreachable: connections exhausted by the role's CONNECTION LIMIT or
        ``max_connections``, a server restarting) is logged, and the thread starts all
        the same, to connect with backoff and call back once it listens: raised, callers
        fell back to polling and never asked again, deaf to new mail for as long as they
        ran. Raises StoreError for any other failure to connect, or when the thread
        cannot start."""
        try:
            with translate_errors("LISTEN"):
                self._conn = self._connect()
        except StoreUnreachable as exc:
            log.warning(
                "%s; listening for new mail from the background once it can (mail is found "
                "by polling meanwhile)",
                exc,
            )
        try:
            self._thread.start()
        except RuntimeError as exc:
            # "can't start new thread" (a container's pids.max, ulimit -u): a StoreError
            # like a connection that cannot be had, which callers fall back from to
            # polling; the connection would otherwise stay open, LISTENing for nobody.
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise StoreError(f"PostgreSQL store: cannot start the LISTEN thread: {exc}") from exc

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and close its connection; waits up to ``timeout`` s. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._woken.set()
        if self._thread.is_alive():
            try:
                url = bounded(self._url, connect_timeout=2)
                # Its NOTIFY waits for the lock another session's NOTIFY holds until
                # that session commits: for lock_timeout at most, then the poll notices.
                with psycopg.connect(url, autocommit=True) as conn:
                    bound = self._lock_bound.local() if self._lock_bound else None
                    conn.execute(notify_statement(self._stop_channel, bound))
            except psycopg.Error:
                log.debug("could not wake the listener; it notices within %ss", _STOP_POLL)
            if threading.current_thread() is not self._thread:  # stop() from the callback
                self._thread.join(timeout)
        elif self._conn is not None:
            self._conn.close()

    def answered(self) -> None:
        """The server answered another connection of this process (the store's pool made
        one): if the thread waits to try again, it tries now. Cheap, from any thread."""
        self._woken.set()

    @property
    def alive(self) -> bool:
        """True while the listening thread runs."""
        return self._thread.is_alive()

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        # LISTEN, unlike NOTIFY, takes no lock another session can hold: no lock_timeout.
        conn = psycopg.connect(bounded(self._url), autocommit=True)
        not_shared(conn)
        try:
            conn.execute(queries()["listen_untimed"])
            self._channel = channel_of(conn)
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._stop_channel)))
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self) -> None:
        backoff = 0.5
        try:
            while not self._stopping.is_set():
                if self._conn is None:
                    # Cleared before the check and the attempt: a stop() or answered()
                    # from now on ends the wait after a failure.
                    self._woken.clear()
                    if self._stopping.is_set():
                        break
                    try:
                        self._conn = self._connect()
                    except psycopg.Error as exc:
                        log.warning("LISTEN reconnect failed (%s); retrying in %.1fs", exc, backoff)
                        self._woken.wait(backoff)
                        backoff = min(backoff * 2, _RECONNECT_MAX)
                        continue
                    backoff = 0.5
                    self._notify(None)  # whatever was announced while we were away
                try:
                    for note in self._conn.notifies(timeout=_STOP_POLL):
                        if self._stopping.is_set():
                            break
                        if note.channel == self._channel:
                            self._notify(note.payload)
                except psycopg.Error as exc:
                    log.warning("LISTEN connection lost: %s", exc)
                    self._conn.close()
                    self._conn = None
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _notify(self, payload: str | None) -> None:
        try:
            self._callback(payload)
        except Exception:
            # A failing callback must not end the wake-ups; the worker's poll still runs.
            log.exception("mailstrom watch callback failed")

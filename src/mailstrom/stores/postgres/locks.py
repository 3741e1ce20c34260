"""How long a statement of the PostgreSQL store waits for a lock: PostgreSQL's
``lock_timeout``, set by mailstrom where nobody else set it.

PostgreSQL waits for a lock without end by default. A session that holds one (an
operator's ``BEGIN; LOCK TABLE recipients ...`` left open in psql, an ``ALTER TABLE``,
``VACUUM FULL`` or ``CREATE INDEX`` without ``CONCURRENTLY``, a stuck migration) held
every ``send_email()`` and every lease, record and lease extension of every worker for
as long as it kept it. With ``lock_timeout`` such a statement fails instead (SQLSTATE
55P03), nothing written, as :class:`~mailstrom.errors.StoreLocked`, which a worker rides
out like any passing store error, as it rides out SQLite's busy timeout.

Where it is set, and why there:

* Straight to the server (a connection's process id is the one the server says it
  has): once per connection, by ``set_config(..., false)`` in the query that already
  sets the pool's connections to UTC. No round trip added, nothing per statement.
* Behind a pooler (PgBouncer and the like hand out a cancel key of their own, so the
  ids differ): a session setting would land on whichever server connection ran it, be
  lost for this client's next transaction and leak to another client's. So each
  statement runs in a transaction of its own that begins with ``set_config(..., true)``
  (which lasts until the transaction ends): ``BEGIN`` and the setting in one round trip,
  the statement, ``COMMIT`` (see :data:`LOCAL_BOUND`). Not in one pipeline, which
  would save two round trips: psycopg ends a pipeline with a Sync and then a Flush, and
  PgBouncer before 1.21 keeps the server connection of a client whose Flush came in
  with the ReadyForQuery (it waits for the client's next message), so that client,
  back idle in our pool, holds one of PgBouncer's few server connections until it is
  used again while the other clients queue for up to ``query_wait_timeout`` (two
  minutes). The explicit transaction's last message, ``COMMIT``, is always answered
  by a ReadyForQuery. A startup ``options=-c lock_timeout``
  would cost nothing at all, but PgBouncer refuses it ("unsupported startup
  parameter") or drops it (``ignore_startup_parameters``), and
  ``set_config`` inside the statement itself comes too late: the statement's table
  locks are taken when the server parses it, before anything in it runs.

An operator's own setting wins over mailstrom's default: one given in the URL's
``options``, ``PGOPTIONS``, ``ALTER ROLE``/``ALTER DATABASE ... SET lock_timeout`` or
the server's configuration (whatever ``pg_settings.source`` says is not the built-in
default). The store URL's ``lock_timeout`` parameter, given, wins over all of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg
from psycopg import pq, sql
from psycopg.abc import Params, Query
from psycopg_pool import ConnectionPool

from mailstrom.message.chars import shorten

DEFAULT_LOCK_TIMEOUT_MS = 30_000
"""Like the SQLite store's busy timeout: long enough for any lock mailstrom's own
statements hold, short enough that a web request gives up rather than hangs."""

_NOT_THE_OPERATORS = "source IN ('default', 'session')"
"""A ``lock_timeout`` whose ``pg_settings.source`` is one of these is no operator's:
the built-in default, or (behind a pooler) a session ``SET`` another client left on
the server connection."""


_Query = LiteralString | bytes | sql.SQL | sql.Composed
"""What Cursor.execute takes from mailstrom (psycopg 3.3 takes t-strings too)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LockBound:
    """What mailstrom sets ``lock_timeout`` to (milliseconds, at least 1), and whether
    the store URL asked for it (it then wins over every other setting)."""

    ms: int = DEFAULT_LOCK_TIMEOUT_MS
    given: bool = False

    def _applies(self) -> sql.Composable:
        return sql.SQL("true" if self.given else _NOT_THE_OPERATORS)

    def session_setup(self, client_pid: int) -> sql.Composed:
        """One statement for a new connection: sets ``lock_timeout`` for the session
        when the connection goes straight to the server and mailstrom's bound applies,
        and says (one row) whether a pooler is in between and whether the bound applies."""
        return sql.SQL(
            "SELECT pg_backend_pid() <> {pid}, {applies},"
            " CASE WHEN pg_backend_pid() = {pid} AND {applies}"
            " THEN set_config('lock_timeout', {ms}, false) END"
            " FROM pg_settings WHERE name = 'lock_timeout'"
        ).format(pid=sql.Literal(client_pid), applies=self._applies(), ms=sql.Literal(str(self.ms)))

    def local(self) -> sql.Composed:
        """A statement setting ``lock_timeout`` until the end of the transaction, where
        mailstrom's bound applies (for the connections outside the pool: migrations and
        NOTIFY, which may go through a pooler and hold a transaction of their own)."""
        return sql.SQL(
            "SELECT set_config('lock_timeout', {ms}, true) FROM pg_settings"
            " WHERE name = 'lock_timeout' AND {applies}"
        ).format(ms=sql.Literal(str(self.ms)), applies=self._applies())

    def local_on(self, conn: psycopg.Connection[Any]) -> sql.Composed | None:
        """:meth:`local` for a connection that sends it often (the notifier's): the
        question whether the bound applies asked once (reading ``pg_settings`` costs the
        server more than the NOTIFY itself), the answer a plain ``SET LOCAL`` or None."""
        if not self.given:
            row = conn.execute(
                sql.SQL("SELECT {} FROM pg_settings WHERE name = 'lock_timeout'").format(
                    self._applies()
                )
            ).fetchone()
            if not (row and row[0]):
                return None
        return sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(str(self.ms)))


DEFAULT_LOCK_BOUND = LockBound()


def bound_session(conn: psycopg.Connection[Any], bound: LockBound, setup: sql.Composable) -> None:
    """Run ``setup`` (statements without parameters) and bound ``conn``'s lock waits,
    in one round trip: for the session, or, behind a pooler, per statement (see the
    module's docstring)."""
    query = sql.SQL("; ").join([setup, bound.session_setup(conn.info.backend_pid)])
    cur = conn.execute(query)  # no parameters: the simple protocol runs them all at once
    while cur.nextset():  # to the last statement's rows
        pass
    row = cur.fetchone()
    behind_pooler, applies = (bool(row[0]), bool(row[1])) if row else (False, False)
    if behind_pooler and applies:
        conn.cursor_factory = locally_bounded_cursor(bound.ms)


LOCAL_BOUND = "SELECT set_config('lock_timeout', '{ms}', true)"
"""Sent before each statement behind a pooler, in the statement's transaction (its own,
or the caller's), which it outlives by nothing."""


@functools.cache
def locally_bounded_cursor(ms: int) -> type[psycopg.Cursor[Any]]:
    """The cursor class of a pooled connection behind a pooler: each ``execute`` and
    ``executemany`` runs in a transaction that :data:`LOCAL_BOUND` begins."""
    statement = LOCAL_BOUND.format(ms=ms).encode()

    class LocallyBoundedCursor(psycopg.Cursor[Any]):
        def execute(  # type: ignore[override,unused-ignore]  # psycopg 3.3: t-strings too
            self,
            query: _Query,
            params: Params | None = None,
            *,
            prepare: bool | None = None,
            binary: bool | None = None,
        ) -> LocallyBoundedCursor:
            with _bounded(self.connection, statement):
                super().execute(query, params, prepare=prepare, binary=binary)
            return self

        def executemany(
            self, query: Query, params_seq: Iterable[Params], *, returning: bool = False
        ) -> None:
            with _bounded(self.connection, statement):
                super().executemany(query, params_seq, returning=returning)

    return LocallyBoundedCursor


@contextmanager
def _bounded(conn: psycopg.Connection[Any], statement: bytes) -> Iterator[None]:
    """Run ``statement`` and then what the block sends in one transaction: the caller's
    if one is open, else one of their own, begun in the same round trip as ``statement``
    (the simple protocol runs both) and committed after the block (see the module
    docstring for why not in a pipeline)."""
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        psycopg.Cursor(conn).execute(statement)
        yield
        return
    # READ COMMITTED whatever the server's default (see connect.read_committed).
    psycopg.Cursor(conn).execute(b"BEGIN ISOLATION LEVEL READ COMMITTED; " + statement)
    try:
        yield
    except BaseException:
        if not conn.closed:
            with suppress(psycopg.Error):  # the error that brought us here is the one to tell
                conn.rollback()
        raise
    conn.commit()


# --- when the timeout fires -------------------------------------------------------------

_HOLDERS = b"""
SELECT current_setting('lock_timeout'),
       (SELECT string_agg(format('pid %s holds %s on %s', pid, mode, relname), ', ')
        FROM (SELECT l.pid, l.mode, c.relname
              FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
              WHERE l.granted AND l.locktype = 'relation' AND l.pid <> pg_backend_pid()
                AND l.database = (SELECT oid FROM pg_database
                                  WHERE datname = current_database())
                AND c.relnamespace <> 'pg_catalog'::regnamespace
                AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock',
                               'AccessExclusiveLock')
              ORDER BY l.mode = 'AccessExclusiveLock' DESC, l.pid
              LIMIT 3) AS strong)
"""
"""The session's ``lock_timeout`` and who holds a lock on a table of this database that
blocks writes (reads wait only for ACCESS EXCLUSIVE): PostgreSQL's message names
neither. Taken after the fact, so a lock released meanwhile is missed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LockWait:
    """What the server says about a lock wait that timed out."""

    timeout: str
    """``lock_timeout`` as PostgreSQL shows it (``30s``, ``500ms``)."""
    holders: str | None
    """``pid 1234 holds AccessExclusiveLock on recipients``, or None when none was found
    (a row lock, or one released since)."""


def lock_wait(conn: psycopg.Connection[Any]) -> LockWait | None:
    """:class:`LockWait` read on ``conn``; None when the server did not answer."""
    try:
        row = conn.execute(_HOLDERS).fetchone()
    except psycopg.Error:
        return None
    return None if row is None else LockWait(timeout=str(row[0]), holders=row[1])


def pool_lock_wait(
    pool: Callable[[], ConnectionPool[psycopg.Connection[Any]]],
) -> Callable[[], LockWait | None]:
    """A :func:`lock_wait` on a connection of ``pool()`` (waiting for one 2 s at most)."""

    def diagnose() -> LockWait | None:
        try:
            with pool().connection(timeout=2.0) as conn:
                return lock_wait(conn)
        except psycopg.Error:  # psycopg_pool's PoolTimeout among them
            return None

    return diagnose


def lock_wait_message(doing: str, exc: psycopg.Error, wait: LockWait | None) -> str:
    """What :class:`~mailstrom.errors.StoreLocked` says: how long, who, where, and that
    trying again is the thing to do."""
    waited = f"waited {wait.timeout}" if wait else "waited its lock_timeout"
    holder = f" ({wait.holders})" if wait and wait.holders else ""
    context = exc.diag.context
    where = f" ({shorten(' '.join(context.split()), 200)})" if context else ""
    return (
        f"PostgreSQL store: {doing} {waited} for a lock held by another session{holder}"
        f"{where}; nothing was written, try again (lock_timeout in the store URL sets the wait)"
    )

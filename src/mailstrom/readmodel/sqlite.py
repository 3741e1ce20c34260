"""The dashboard's queries on a SQLite store, on connections of its own (read-only).

Every page is an index range scan that stops at its limit. A filter is applied one of two
ways, chosen per request from a count that an index answers cheaply (cached a few
seconds): when few recipients match, their messages are collected from that index and
sorted; otherwise the newest-first index of messages is walked and each message probed,
which finds a page quickly precisely because many match. "Few" is whichever costs less:
``n`` matches collected, or the probes a walk makes to find a page among the queue's
messages at that density (:meth:`SQLiteReadModel._driver`), and never past
:data:`SET_LIMIT`. Either way a page costs about the same on a queue of a thousand or a
million messages.
The indexes used are created by migration 0011.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from mailstrom.arguments import check_timeout
from mailstrom.errors import StoreCorrupt, StoreError, UnknownMessage, UnreadableRow
from mailstrom.readmodel.base import (
    BUCKET,
    CLOSED,
    Destination,
    MessageDetail,
    OldestPending,
    Overview,
    QueuePage,
    QueueQuery,
    QueueView,
    SortOrder,
    check_aware,
    check_count,
    check_recipient_page,
    cursor_after,
    fill_buckets,
    id_range,
    queued_before,
    throughput_window,
    with_suspensions,
)
from mailstrom.readmodel.sqlite_message import message_detail, waiting
from mailstrom.readmodel.sqlite_summary import summaries
from mailstrom.readmodel.ttl import TTLCache
from mailstrom.status import DestinationThrottle, RecipientState
from mailstrom.stores.base import reason_class_of
from mailstrom.stores.forks import hold_when_idle, keep, renew_after_fork
from mailstrom.stores.operator import Suspension, comparable, filter_domain
from mailstrom.stores.row_checks import counted_state, shown_text, stored_octets
from mailstrom.stores.sqlite import (
    _MAX_BUSY_MS,
    _file_uri,
    _newer_schema,
    _no_shm,
    _store_error,
    _wal_holds_frames,
    newer_version_behind,
)
from mailstrom.stores.sqlite_operator import active_suspensions
from mailstrom.stores.sqlite_queue import HAS_PENDING_SQL, HELD_WAITING_SQL
from mailstrom.stores.sqlite_schema import (
    decode_text,
    from_us,
    latest_version,
    reply_from,
    shown_time,
    to_us,
)
from mailstrom.stores.sqlite_shaping import throttle_count, throttles
from mailstrom.stores.sqlite_walk import count_upto, walk_bound

log = logging.getLogger(__name__)

SET_LIMIT = 20_000
"""A filter matching more than this many recipients is applied by walking the messages
newest first (a page then needs few probes), never through its index."""

_PENDING = "state IN ('queued', 'deferred')"
_ANY_STATE = "state IN ('queued', 'deferred', 'delivered', 'failed')"
"""Spelled out so that the (state, domain) index serves a lookup by domain."""
_HAS_PENDING = HAS_PENDING_SQL
# The partial index's own condition is repeated: SQLite uses a partial index only for a
# query whose WHERE clause contains it.
_HAS_DEFERRED = (
    "EXISTS (SELECT 1 FROM recipients p WHERE p.message_seq = m.seq"
    " AND p.state IN ('queued', 'deferred') AND p.state = 'deferred')"
)
_HAS_FAILED = (
    "EXISTS (SELECT 1 FROM recipients f WHERE f.message_seq = m.seq AND f.state = 'failed')"
)
_HAS_ANY = "EXISTS (SELECT 1 FROM recipients x WHERE x.message_seq = m.seq)"
# A message's state as derive_message_state() gives it; one with no recipient at all is
# in neither view (see QueueView.FAILED).
_IS_DELIVERED = f"NOT {_HAS_PENDING} AND NOT {_HAS_FAILED} AND {_HAS_ANY}"
_IS_FAILED = f"NOT {_HAS_PENDING} AND {_HAS_FAILED}"


@dataclass(frozen=True, slots=True)
class _Filter:
    """One condition on messages, in its two forms: a probe per message (``exists``), and
    the set of matching messages from an index (``members``, None when there is none
    worth using), with the count that chooses between them."""

    exists: str
    params: tuple[object, ...] = ()
    members: str | None = None
    count: str | None = None
    """The matching rows of an index, one row each (a SELECT that
    :meth:`SQLiteReadModel._count` counts, bounded): never an aggregate, which is one row
    whatever it counts."""


class SQLiteReadModel:
    """A :class:`~mailstrom.readmodel.base.ReadModel` over the SQLite file at ``path``.

    ``cache_seconds`` is how long counts (the overview's, and those choosing a plan) are
    reused. ``busy_timeout`` is how many seconds a read waits for a lock that keeps it
    out (another connection's exclusive lock, a WAL being recovered) before it fails with
    :class:`~mailstrom.errors.StoreLocked`; :func:`open_read_model` passes the store's,
    so that a view waits as the store's own reads do.
    """

    def __init__(
        self, path: str, *, cache_seconds: float = 5.0, busy_timeout: float = 30.0
    ) -> None:
        self._uri = _file_uri(path, "mode=ro")
        self._path = path
        self._busy_timeout = check_timeout(busy_timeout, "busy_timeout")
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._out = 0
        """Connections in use (under ``_lock``)."""
        self._closed = False
        self._counts: TTLCache[int] = TTLCache(cache_seconds)
        renew_after_fork(self)

    def _before_fork(self) -> None:
        hold_when_idle(self._lock, lambda: self._out > 0)

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    def _after_fork(self) -> None:
        """In a process forked from this one: the parent's connections are never used
        here (see :mod:`~mailstrom.stores.forks`)."""
        self._lock = threading.Lock()
        keep(self._idle)
        self._idle, self._out = [], 0

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise StoreError(CLOSED)
            conn = self._idle.pop() if self._idle else None
            self._out += 1
        pool = True
        try:
            if conn is None:
                conn, pool = self._connect()
            # One snapshot per request: the page and its recipients agree.
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        except BaseException as exc:
            with self._lock:
                self._out -= 1
            newer = None if conn is None else _newer_schema_behind(exc, conn, self._path)
            if conn is not None:
                conn.close()  # in an unknown state: never pooled again
            if newer is not None:
                raise newer from exc
            if isinstance(exc, sqlite3.Error):
                # As a read-only store says it: "database is locked" is StoreLocked, with
                # the wait (for a read: no "write lock", no "nothing was written").
                raise _store_error(exc, self._path, self._busy_timeout, reading=True) from exc
            raise
        with self._lock:
            self._out -= 1
            if self._closed or not pool:
                conn.close()
            else:
                self._idle.append(conn)

    def _connect(self) -> tuple[sqlite3.Connection, bool]:
        """A new connection, tried on the schema, and whether it may be pooled.

        A WAL database last closed cleanly (no ``-wal`` file, or an empty one) on a
        read-only mount or a full disk, where SQLite cannot make its ``-shm`` file, is
        read as immutable, as the read-only store reads it (see
        :mod:`mailstrom.stores.sqlite`): exact, since the file holds every commit then.
        ``mode=ro`` alone failed every view with "unable to open database file". Such a
        connection serves one request only: a writer elsewhere (the mount is read-only
        only here) may change the file, and an immutable connection never looks again.
        """
        conn = self._open(self._uri)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            conn.close()
            if not _no_shm(exc) or _wal_holds_frames(self._path):
                raise
            return self._open(_file_uri(self._path, "mode=ro&immutable=1")), False
        return conn, True

    def _open(self, uri: str) -> sqlite3.Connection:
        # The store's wait, not Python's default of 5 s, which no setting changed.
        conn = sqlite3.connect(
            uri,
            uri=True,
            timeout=min(self._busy_timeout, _MAX_BUSY_MS / 1000),
            isolation_level=None,
            check_same_thread=False,
        )
        conn.text_factory = decode_text
        return conn

    def close(self) -> None:
        """Close every idle connection. Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _count(
        self, conn: sqlite3.Connection, sql: str, params: tuple[object, ...], cap: int
    ) -> int:
        """The rows ``sql`` selects, counted up to one past ``cap``
        (:func:`~mailstrom.stores.sqlite_walk.count_upto`), reused a few seconds."""
        return self._counts.get((sql, params, cap + 1), lambda: count_upto(conn, sql, params, cap))

    # --- the overview ---------------------------------------------------------------------

    def overview(self, *, now: datetime, top: int = 10) -> Overview:
        """See :meth:`ReadModel.overview`."""
        check_count(top, "top")
        now = check_aware(now, "now")
        by_state = dict.fromkeys(RecipientState, 0)
        start, starts, end = throughput_window(now)
        with self._read() as conn:
            for state, n in conn.execute("SELECT state, count(*) FROM recipients GROUP BY state"):
                known = counted_state(state, n, log)
                if known is None:
                    continue
                by_state[known] = n
            (messages,) = conn.execute("SELECT count(*) FROM messages").fetchone()
            (held,) = conn.execute(HELD_WAITING_SQL).fetchone()
            # Named: left to itself the planner reads every pending row of the state
            # index (0.2 s at 70,000) instead of this index's first entry.
            row = conn.execute(
                "SELECT id, created_at FROM messages WHERE seq = (SELECT min(message_seq)"
                f" FROM recipients INDEXED BY recipients_pending_message WHERE {_PENDING})"
            ).fetchone()
            oldest = (
                None if row is None else OldestPending(id=row[0], created_at=shown_time(row[1]))
            )
            width = to_us(start + BUCKET) - to_us(start)
            counts = {
                (int(i), outcome): n
                for i, outcome, n in conn.execute(
                    "SELECT (at - ?) / ?, outcome, count(*) FROM attempts"
                    " WHERE at >= ? AND at < ? GROUP BY 1, 2",
                    (to_us(start), width, to_us(start), to_us(end)),
                )
            }
            busiest = conn.execute(
                "SELECT domain, count(*) FROM recipients WHERE state = 'deferred'"
                " GROUP BY domain ORDER BY 2 DESC, 1 LIMIT ?",
                (top,),
            ).fetchall()
            top_deferred = tuple(
                self._destination(conn, domain, deferred=n) for domain, n in busiest
            )
            suspended = tuple(active_suspensions(conn, now))
        return Overview(
            by_state=by_state,
            messages=messages,
            held=held,
            oldest_pending=oldest,
            throughput=fill_buckets(starts, counts),
            top_deferred=top_deferred,
            suspended=suspended,
        )

    @staticmethod
    def _destination(
        conn: sqlite3.Connection,
        domain: str | bytes,
        *,
        deferred: int,
        pending: int | None = None,
    ) -> Destination:
        key: str | bytes
        # A domain read back from a row with octets that are not UTF-8 (see
        # sqlite_schema.decode_text) holds lone surrogates, which the driver cannot bind:
        # such a one is looked up by its octets, and shown with U+FFFD for them. One
        # written as a BLOB by hand is read back as bytes, and matches them as bound.
        match, key = "domain = ?", domain
        if isinstance(domain, str) and not comparable(domain):
            match = "domain = CAST(? AS TEXT)"
            key = domain.encode("utf-8", "surrogateescape")
        shown = _shown(domain) or ""
        if pending is None:
            (pending,) = conn.execute(
                f"SELECT count(*) FROM recipients WHERE {_PENDING} AND {match}", (key,)
            ).fetchone()
        # The newest deferred recipient is the last entry of the (state, domain) index's
        # range: one seek, however many are deferred there.
        last = conn.execute(
            "SELECT reply_code, reply_enhanced, reply_text, error, reason_class,"
            f" last_attempt_at FROM recipients WHERE state = 'deferred' AND {match}"
            " ORDER BY id DESC LIMIT 1",
            (key,),
        ).fetchone()
        if last is None:
            return Destination(domain=shown, pending=int(pending or 0), deferred=deferred)
        # Only shown, as the status read takes them (see row_checks.shown_text): octets
        # that are not UTF-8 read as U+FFFD, not as lone surrogates no page can encode.
        reply = reply_from(last[0], _shown(last[1]), _shown(last[2]))
        return Destination(
            domain=shown,
            pending=int(pending or 0),
            deferred=deferred,
            last_reply=str(reply) if reply is not None else _shown(last[3]),
            reason_class=reason_class_of(last[4]),
            last_attempt_at=shown_time(last[5]),
        )

    def destinations(
        self,
        *,
        limit: int = 100,
        offset: int = 0,
        domain: str | None = None,
        now: datetime | None = None,
    ) -> list[Destination]:
        """See :meth:`ReadModel.destinations`."""
        check_count(limit, "limit")
        check_count(offset, "offset")
        if now is not None:
            now = check_aware(now, "now")
        if domain is not None and not comparable(domain):
            return []  # no stored domain holds a NUL or a lone surrogate
        where, params = _PENDING, list[object]()
        if domain is not None:
            where += " AND domain = ?"
            params.append(filter_domain(domain))
        params += [limit, offset]
        with self._read() as conn:
            rows = conn.execute(
                "SELECT domain, sum(state = 'deferred'), count(*) FROM recipients"
                f" WHERE {where} GROUP BY domain ORDER BY 3 DESC, 1 LIMIT ? OFFSET ?",
                params,
            ).fetchall()
            found = [
                self._destination(conn, d, deferred=int(deferred), pending=int(pending))
                for d, deferred, pending in rows
            ]
            if now is None:
                return found
            return with_suspensions(found, active_suspensions(conn, now))

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        """See :meth:`ReadModel.suspensions`."""
        now = check_aware(now, "now")
        with self._read() as conn:
            return active_suspensions(conn, now)

    def throttles(self, *, now: datetime, limit: int | None = None) -> list[DestinationThrottle]:
        """See :meth:`ReadModel.throttles`."""
        now = check_aware(now, "now")
        if limit is not None:
            check_count(limit, "limit")
        with self._read() as conn:
            return throttles(conn, now=now, limit=limit)

    def throttle_count(self, *, now: datetime) -> int:
        """See :meth:`ReadModel.throttle_count`."""
        now = check_aware(now, "now")
        with self._read() as conn:
            return throttle_count(conn, now=now)

    # --- the queue ------------------------------------------------------------------------

    def queue_page(self, query: QueueQuery, *, now: datetime) -> QueuePage:
        """See :meth:`ReadModel.queue_page`."""
        now = check_aware(now, "now")
        filters = _filters(query)
        conditions: list[str] = []
        params: list[object] = []
        cutoff = queued_before(now, query)
        if cutoff is not None:
            conditions.append("m.created_at < ?")
            params.append(to_us(cutoff))
        newest = query.order is SortOrder.NEWEST
        if query.after is not None:
            conditions.append(f"(m.created_at, m.seq) {'<' if newest else '>'} (?, ?)")
            params += [to_us(query.after.created_at), query.after.seq]
        with self._read() as conn:
            driver = self._driver(conn, filters, query.limit)
            for f in filters:
                if f is driver:
                    assert f.members is not None
                    conditions.append(f.members)
                else:
                    conditions.append(f.exists)
                params += f.params
            # With a small driving set the page is those messages, sorted; otherwise walk
            # the newest-first index (NOT INDEXED keeps the planner from walking the whole
            # index to probe a small set).
            source = "messages m NOT INDEXED" if driver is not None else "messages m"
            direction = "DESC" if newest else "ASC"
            rows = conn.execute(
                f"SELECT m.seq, m.created_at, m.id FROM {source}"
                f" WHERE {' AND '.join(conditions) or '1'}"
                f" ORDER BY m.created_at {direction}, m.seq {direction} LIMIT ?",
                [*params, query.limit + 1],
            ).fetchall()
            more = len(rows) > query.limit
            rows = rows[: query.limit]
            found = summaries(conn, [seq for seq, _, _ in rows])
        cursor = None
        if more:
            seq, created, _ = rows[-1]
            created_at, late = _page_time(created)
            cursor = cursor_after(created_at, seq, late=late, newest=newest)
        # A message whose rows cannot be read is left out (summaries() warns).
        page = tuple(found[seq] for seq, _, _ in rows if seq in found)
        return QueuePage(messages=page, next=cursor)

    def _driver(
        self, conn: sqlite3.Connection, filters: list[_Filter], limit: int
    ) -> _Filter | None:
        """The filter whose index gives the smallest set of messages, if reading it costs
        less than walking the queue: collecting ``n`` matches reads ``n`` rows and sorts
        them, where a walk finds the page's ``limit + 1`` after about ``(limit + 1) *
        messages / n`` probes (the matches spread over the queue). The set alone chose:
        with one failed message in five among 200,000, the Failed page collected and
        sorted 8,000 (100 ms) where the walk probes 250 (10 ms)."""
        if not any(f.members is not None for f in filters):
            return None
        # n * n <= (limit + 1) * messages, so no count needs to go further.
        cap = min(SET_LIMIT, walk_bound(conn, limit))
        best: tuple[int, _Filter] | None = None
        for f in filters:
            if f.members is None:
                continue
            n = 0 if f.count is None else self._count(conn, f.count, f.params, cap)
            if n <= cap and (best is None or n < best[0]):
                best = (n, f)
        return None if best is None else best[1]

    def message_status(
        self, message_id: str, *, attempts: int, after: int = -1, recipients: int | None = None
    ) -> MessageDetail:
        """See :meth:`ReadModel.message_status`."""
        check_count(attempts, "attempts")
        check_recipient_page(after, recipients)
        if not comparable(message_id):  # names nothing stored, as in the memory store
            raise UnknownMessage(message_id)
        with self._read() as conn:
            return message_detail(conn, message_id, attempts, after, recipients)

    def waiting(self, message_id: str, *, at: Collection[str]) -> tuple[int, int]:
        """See :meth:`ReadModel.waiting`."""
        if not comparable(message_id):  # names nothing stored, as in the memory store
            raise UnknownMessage(message_id)
        with self._read() as conn:
            return waiting(conn, message_id, at)

    def message_data(self, message_id: str, *, limit: int | None = None) -> bytes:
        """See :meth:`ReadModel.message_data`."""
        if limit is not None:
            check_count(limit, "limit")
        if not comparable(message_id):  # names nothing stored, as in the memory store
            raise UnknownMessage(message_id)
        with self._read() as conn:
            if limit is None:
                row = conn.execute(
                    "SELECT d.data FROM messages m LEFT JOIN message_data d ON d.seq = m.seq"
                    " WHERE m.id = ?",
                    (message_id,),
                ).fetchone()
                if row is None:
                    raise UnknownMessage(message_id)
                return stored_octets(row[0])
            # substr() would load all of the data (every overflow page) before cutting.
            # A blob handle reads the pages asked for, of a TEXT too (its octets), and
            # knows their number (length() counts a TEXT's characters).
            row = conn.execute(
                "SELECT m.seq, typeof(d.data) FROM messages m"
                " LEFT JOIN message_data d ON d.seq = m.seq WHERE m.id = ?",
                (message_id,),
            ).fetchone()
            if row is None:
                raise UnknownMessage(message_id)
            seq, kind = row
            if kind not in ("blob", "text"):  # which no blob handle opens
                raise UnreadableRow(f"the message data is {kind}, not octets")
            with conn.blobopen("message_data", "data", seq, readonly=True) as blob:
                return blob.read(min(limit, len(blob)))


def _newer_schema_behind(
    exc: BaseException, conn: sqlite3.Connection, path: str
) -> StoreCorrupt | None:
    """StoreCorrupt when ``exc`` is SQLite refusing a view's statement ("no such column")
    because a newer mailstrom migrated the database since: no passing trouble, which the
    dashboard showed as "try again later" for ever. As the store says it."""
    latest = latest_version()
    version = newer_version_behind(exc, conn, latest)
    return (
        None
        if version is None
        else StoreCorrupt(_newer_schema(version, path, latest, while_open=True))
    )


def _shown(value: object) -> str | None:
    """A reply's or error's column as a page can show it (:func:`shown_text`); None for
    one that is no text at all (a row changed by hand), which a summary leaves out."""
    try:
        return shown_text(value, "reply")
    except UnreadableRow:
        return None


def _filters(query: QueueQuery) -> list[_Filter]:
    """The query's conditions on messages (besides age and the cursor)."""
    filters: list[_Filter] = []
    pending_set = f"m.seq IN (SELECT message_seq FROM recipients WHERE {_PENDING}"
    view = query.view
    if view is QueueView.PENDING:
        filters.append(
            _Filter(
                _HAS_PENDING,
                members=pending_set + ")",
                count=f"SELECT 1 FROM recipients WHERE {_PENDING}",
            )
        )
    elif view is QueueView.DEFERRED:
        filters.append(
            _Filter(
                _HAS_DEFERRED,
                members=pending_set + " AND state = 'deferred')",
                count="SELECT 1 FROM recipients WHERE state = 'deferred'",
            )
        )
    elif view is QueueView.QUEUED:
        # A few queued among many deferred or finished: from the (state, domain) index,
        # where walking probed every message of the queue to find none.
        filters.append(
            _Filter(
                f"{_HAS_PENDING} AND NOT {_HAS_DEFERRED}",
                members=f"m.seq IN (SELECT message_seq FROM recipients WHERE state = 'queued')"
                f" AND NOT {_HAS_DEFERRED}",
                count="SELECT 1 FROM recipients WHERE state = 'queued'",
            )
        )
    elif view is QueueView.DELIVERED:
        # Every delivered message has a delivered recipient (one with none is failed).
        filters.append(
            _Filter(
                _IS_DELIVERED,
                members="m.seq IN (SELECT message_seq FROM recipients WHERE state = 'delivered')"
                f" AND NOT {_HAS_PENDING} AND NOT {_HAS_FAILED}",
                count="SELECT 1 FROM recipients WHERE state = 'delivered'",
            )
        )
    elif view is QueueView.FAILED:
        # A few failed among much delivered or pending mail: from the failed index, where
        # walking probed every message of the queue to find none.
        filters.append(
            _Filter(
                _IS_FAILED,
                members="m.seq IN (SELECT message_seq FROM recipients WHERE state = 'failed')"
                f" AND NOT {_HAS_PENDING}",
                count="SELECT 1 FROM recipients WHERE state = 'failed'",
            )
        )
    elif view is QueueView.HELD:
        # Held and still waiting, as the overview (and stats()) count them: a message
        # cancelled or finished while held keeps its flag, and is no mail on hold.
        filters.append(
            _Filter(
                f"m.held = 1 AND {_HAS_PENDING}",
                members=f"m.seq IN (SELECT seq FROM messages WHERE held = 1) AND {_HAS_PENDING}",
                count="SELECT 1 FROM messages WHERE held = 1",
            )
        )
    domains = [d for d in (query.domain, query.search and query.search.domain) if d]
    # A delivered message's recipients are all delivered: in that view the domain's are
    # its delivered range of the (state, domain) index. Counted in every state, a domain
    # with much pending mail and little delivered walked every message of the queue.
    states = "state = 'delivered'" if view is QueueView.DELIVERED else _ANY_STATE
    for domain in domains:
        filters.append(
            _Filter(
                "EXISTS (SELECT 1 FROM recipients d WHERE d.message_seq = m.seq AND d.domain = ?)",
                (domain.lower(),),
                members=f"m.seq IN (SELECT message_seq FROM recipients WHERE {states}"
                " AND domain = ?)",
                count=f"SELECT 1 FROM recipients WHERE {states} AND domain = ?",
            )
        )
    search = query.search
    if search is not None and search.address is not None:
        filters.append(
            _Filter(
                "EXISTS (SELECT 1 FROM recipients a WHERE a.message_seq = m.seq AND a.address = ?)",
                (search.address,),
                members="m.seq IN (SELECT message_seq FROM recipients WHERE address = ?)",
                count="SELECT 1 FROM recipients WHERE address = ?",
            )
        )
    if search is not None and search.id_prefix is not None:
        low, high = id_range(search.id_prefix)
        filters.append(
            _Filter(
                "m.id BETWEEN ? AND ?",
                (low, high),
                members="m.seq IN (SELECT seq FROM messages WHERE id BETWEEN ? AND ?)",
                count="SELECT 1 FROM messages WHERE id BETWEEN ? AND ?",
            )
        )
    return filters


def _page_time(created: object) -> tuple[datetime | None, bool]:
    """A page row's creation time; or None for one that is no time (a row changed by
    hand), and whether SQLite sorts it after every time (text, a blob, a number past
    ``datetime``'s range) or before (a number before it)."""
    try:
        return from_us(created), False  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None, isinstance(created, str | bytes) or (
            isinstance(created, int | float) and created > 0
        )

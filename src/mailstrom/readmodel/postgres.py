"""The dashboard's queries on a PostgreSQL store, on a small connection pool of its own.

Pages walk the index ``messages_newest`` in keyset order and probe each message's
recipients by primary key, stopping at the page's limit; PostgreSQL's planner drives the
page from an index of the matching rows instead when a filter is selective (the held
messages, recipients by state but delivered, delivered recipients by domain: migrations
0021, 0022 and 0024). Counts come from
the partial index of pending recipients.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg

from mailstrom.errors import StoreCorrupt, StoreError, UnknownMessage
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
from mailstrom.readmodel.postgres_message import message_detail, waiting
from mailstrom.readmodel.postgres_summary import summaries
from mailstrom.status import DestinationThrottle, RecipientState, SMTPReply
from mailstrom.stores.base import reason_class_of
from mailstrom.stores.operator import Suspension, comparable, filter_domain
from mailstrom.stores.postgres.connect import ProcessPool, connection_pool
from mailstrom.stores.postgres.locks import pool_lock_wait
from mailstrom.stores.postgres.migrate import latest_known, newer_schema, newer_version_behind
from mailstrom.stores.postgres.rows import ReadableTimes
from mailstrom.stores.postgres.sql import queries, translate_errors
from mailstrom.stores.row_checks import counted_state
from mailstrom.stores.side_rows import pause_of

log = logging.getLogger(__name__)

# Each a semi-join the planner either probes per message (walking messages_newest, when
# many match) or drives from the index recipients_state_seq and sorts (when few do).
_HAS_PENDING = (
    "EXISTS (SELECT 1 FROM recipients p WHERE p.message_id = m.id"
    " AND p.state IN ('queued', 'deferred'))"
)
_HAS_QUEUED = "EXISTS (SELECT 1 FROM recipients p WHERE p.message_id = m.id AND p.state = 'queued')"
_HAS_DEFERRED = (
    "EXISTS (SELECT 1 FROM recipients p WHERE p.message_id = m.id AND p.state = 'deferred')"
)
_HAS_FAILED = "EXISTS (SELECT 1 FROM recipients p WHERE p.message_id = m.id AND p.state = 'failed')"
_HAS_ANY = "EXISTS (SELECT 1 FROM recipients p WHERE p.message_id = m.id)"
_VIEWS = {
    QueueView.ALL: "true",
    QueueView.PENDING: _HAS_PENDING,
    QueueView.DEFERRED: _HAS_DEFERRED,
    # A queued recipient rather than a pending one: the few queued among many deferred
    # are a range of the index, the pending ones are not.
    QueueView.QUEUED: f"{_HAS_QUEUED} AND NOT {_HAS_DEFERRED}",
    # A message with no recipient at all is in neither (see QueueView.FAILED).
    QueueView.DELIVERED: f"NOT {_HAS_PENDING} AND NOT {_HAS_FAILED} AND {_HAS_ANY}",
    QueueView.FAILED: f"NOT {_HAS_PENDING} AND {_HAS_FAILED}",
    # Held and still waiting, as the overview (and stats()) count them: a message
    # cancelled or finished while held keeps its flag, and is no mail on hold.
    QueueView.HELD: f"m.held AND {_HAS_PENDING}",
}
# The states a recipient at a domain filter's domain may have in a message of the view
# (a delivered message's are all delivered, a failed one's finished, any other's in any
# state), each spelled as the partial index holding that state's recipients by domain
# takes it (pending: migration 1, delivered: 24, failed: 25). Without a test of the
# state no index served the lookup: the page walked every message of the queue newest
# first and probed each for a recipient at a domain with little mail.
_PENDING_AT = "d.state IN ('queued', 'deferred')"
_DELIVERED_AT = "d.state = 'delivered'"
_FAILED_AT = "d.state = 'failed'"
_AT_DOMAIN = {
    QueueView.DELIVERED: _DELIVERED_AT,
    QueueView.FAILED: f"({_DELIVERED_AT} OR {_FAILED_AT})",
}
_ANY_AT = f"({_PENDING_AT} OR {_DELIVERED_AT} OR {_FAILED_AT})"
_MAX_INTEGER = 2**31 - 1
"""PostgreSQL's largest ``integer``."""

# The store's own query (the list is short: no paging).
_SUSPENSIONS = queries()["suspensions"].encode()
# The store's own queries, the first few pauses and a count of them: a hostile domain's
# subdomains make thousands, where the page shows a hundred.
_THROTTLES = (queries()["throttles"].rstrip().rstrip(";") + " LIMIT %(limit)s").encode()
_THROTTLE_COUNT = queries()["throttle_count"].encode()


class PostgresReadModel:
    """A :class:`~mailstrom.readmodel.base.ReadModel` over the database at ``url``."""

    def __init__(self, url: str, *, max_size: int = 4, timeout: float = 30.0) -> None:
        self._pools = ProcessPool(
            lambda: connection_pool(
                url, name="mailstrom-readmodel", min_size=1, max_size=max_size, timeout=timeout
            )
        )
        self._lock_wait = pool_lock_wait(lambda: self._pools.pool)
        self._closed = False
        with translate_errors("connecting"):
            self._pools.pool.open(wait=True, timeout=timeout)

    @contextmanager
    def _reading(self, doing: str, *, snapshot: bool = False) -> Iterator[psycopg.Connection[Any]]:
        """A connection of the pool for one view, in one transaction. A time the driver
        cannot hold (infinity, a year past 9999: a row changed by hand) reads as None
        (ReadableTimes), which the view shows as unknown, instead of failing it whole.

        ``snapshot``: every statement of the transaction sees the database as it was at
        the first (REPEATABLE READ, read only), for a view whose numbers are read by
        several statements and must agree; at READ COMMITTED each statement sees what
        was committed when it began."""
        if self._closed:  # as the other read models say it, not as a closed pool's error
            raise StoreError(CLOSED)
        try:
            with (
                translate_errors(doing, diagnose=self._lock_wait),
                self._pools.pool.connection() as conn,
                _isolated(conn, snapshot),
                conn.transaction(),
            ):
                conn.adapters.register_loader("timestamptz", ReadableTimes)
                yield conn
        except StoreError as exc:
            newer = self._newer_schema_behind(exc)
            if newer is None:
                raise
            raise newer from exc

    def _newer_schema_behind(self, exc: StoreError) -> StoreCorrupt | None:
        """StoreCorrupt when ``exc`` is a view's statement missing a table or column
        because a newer mailstrom migrated the database since ("column ... does not
        exist"): no passing trouble, which the dashboard showed as "try again later" for
        ever. As the store says it (see
        :func:`~mailstrom.stores.postgres.migrate.newer_version_behind`)."""
        known = latest_known()
        version = newer_version_behind(exc, self._pools.pool, known)
        return (
            None if version is None else StoreCorrupt(newer_schema(version, known, while_open=True))
        )

    def close(self) -> None:
        """Close the pool. Idempotent."""
        self._closed = True
        self._pools.close()

    def overview(self, *, now: datetime, top: int = 10) -> Overview:
        """See :meth:`ReadModel.overview`."""
        check_count(top, "top")
        now = check_aware(now, "now")
        by_state = dict.fromkeys(RecipientState, 0)
        start, starts, end = throughput_window(now)
        with self._reading("overview", snapshot=True) as conn:
            for state, n in conn.execute(b"SELECT state, count(*) FROM recipients GROUP BY state"):
                known = counted_state(state, n, log)
                if known is not None:
                    by_state[known] = int(n)
            row = conn.execute(
                # Held and still waiting, as the store's stats() counts them.
                b"SELECT count(*), count(*) FILTER (WHERE held AND EXISTS (SELECT 1"
                b" FROM recipients r WHERE r.seq = m.seq"
                b" AND r.state IN ('queued', 'deferred'))) FROM messages m"
            ).fetchone()
            messages, held = (int(row[0]), int(row[1])) if row else (0, 0)
            row = conn.execute(
                b"SELECT m.id, m.created_at FROM messages m WHERE m.id = ("
                b"SELECT message_id FROM recipients"
                b" WHERE state IN ('queued', 'deferred') ORDER BY seq LIMIT 1)"
            ).fetchone()
            oldest = None if row is None else OldestPending(id=row[0], created_at=row[1])
            counts = {
                (int(i), outcome): int(n)
                for i, outcome, n in conn.execute(
                    b"SELECT floor(extract(epoch FROM at - %(start)s) / %(width)s),"
                    b" outcome, count(*) FROM attempts"
                    b" WHERE at >= %(start)s AND at < %(end)s GROUP BY 1, 2",
                    {
                        "start": start,
                        "end": end,
                        "width": BUCKET.total_seconds(),
                    },
                )
            }
            busiest = conn.execute(
                b"SELECT domain, count(*) FROM recipients WHERE state = 'deferred'"
                # Names by code point, whatever the database's collation (see suspensions).
                b' GROUP BY domain ORDER BY 2 DESC, domain COLLATE "C" LIMIT %s',
                (top,),
            ).fetchall()
            top_deferred = tuple(
                self._destination(conn, domain, deferred=int(n)) for domain, n in busiest
            )
            suspended = tuple(self._suspensions(conn, now))
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
        conn: psycopg.Connection[Any], domain: str, *, deferred: int, pending: int | None = None
    ) -> Destination:
        if pending is None:
            row = conn.execute(
                b"SELECT count(*) FROM recipients"
                b" WHERE state IN ('queued', 'deferred') AND domain = %s",
                (domain,),
            ).fetchone()
            pending = int(row[0]) if row else 0
        last = conn.execute(
            b"SELECT reply_code, reply_enhanced, reply_text, error, reason_class,"
            b" last_attempt_at FROM recipients"
            b" WHERE state IN ('queued', 'deferred') AND state = 'deferred' AND domain = %s"
            b" ORDER BY seq DESC, position DESC LIMIT 1",
            (domain,),
        ).fetchone()
        if last is None:
            return Destination(domain=domain, pending=pending, deferred=deferred)
        code, enhanced, text, error, reason, at = last
        reply = (
            None if code is None else str(SMTPReply(code=code, enhanced=enhanced, text=text or ""))
        )
        return Destination(
            domain=domain,
            pending=pending,
            deferred=deferred,
            last_reply=reply if reply is not None else error,
            reason_class=reason_class_of(reason),
            last_attempt_at=at,
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
        # One snapshot: the counts and each destination's last reply are read apart.
        with self._reading("destinations", snapshot=True) as conn:
            rows = conn.execute(
                b"SELECT domain, count(*) FILTER (WHERE state = 'deferred'), count(*)"
                b" FROM recipients WHERE state IN ('queued', 'deferred')"
                b" AND (%(domain)s::text IS NULL OR domain = %(domain)s::text)"
                b' GROUP BY domain ORDER BY 3 DESC, domain COLLATE "C"'
                b" LIMIT %(limit)s OFFSET %(offset)s",
                {
                    "domain": None if domain is None else filter_domain(domain),
                    "limit": limit,
                    "offset": offset,
                },
            ).fetchall()
            found = [
                self._destination(conn, d, deferred=int(deferred), pending=int(pending))
                for d, deferred, pending in rows
            ]
            if now is None:
                return found
            return with_suspensions(found, self._suspensions(conn, now))

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        """See :meth:`ReadModel.suspensions`."""
        now = check_aware(now, "now")
        with self._reading("suspensions") as conn:
            return self._suspensions(conn, now)

    def throttles(self, *, now: datetime, limit: int | None = None) -> list[DestinationThrottle]:
        """See :meth:`ReadModel.throttles`."""
        now = check_aware(now, "now")
        if limit is not None:
            check_count(limit, "limit")
        with self._reading("throttles") as conn:
            # LIMIT NULL is no limit.
            found = conn.execute(_THROTTLES, {"now": now, "limit": limit}).fetchall()
        return [pause for row in found if (pause := pause_of(*row)) is not None]

    def throttle_count(self, *, now: datetime) -> int:
        """See :meth:`ReadModel.throttle_count`."""
        now = check_aware(now, "now")
        with self._reading("throttle_count") as conn:
            row = conn.execute(_THROTTLE_COUNT, {"now": now}).fetchone()
        return int(row[0]) if row is not None else 0

    @staticmethod
    def _suspensions(conn: psycopg.Connection[Any], now: datetime) -> list[Suspension]:
        return [
            Suspension(domain=domain, suspended_at=at, until=until)
            for domain, at, until in conn.execute(_SUSPENSIONS, {"now": now}).fetchall()
        ]

    def queue_page(self, query: QueueQuery, *, now: datetime) -> QueuePage:
        """See :meth:`ReadModel.queue_page`."""
        now = check_aware(now, "now")
        conditions = [_VIEWS[query.view]]
        params: list[Any] = []
        cutoff = queued_before(now, query)
        if cutoff is not None:
            conditions.append("m.created_at < %s")
            params.append(cutoff)
        newest = query.order is SortOrder.NEWEST
        if query.after is not None:
            conditions.append(f"(m.created_at, m.seq) {'<' if newest else '>'} (%s, %s)")
            params += [query.after.created_at, query.after.seq]
        search = query.search
        # The domain's recipients in the states they may have (see _AT_DOMAIN): ranges of
        # the partial indexes by domain, which the planner reads when they are short.
        states = _AT_DOMAIN.get(query.view, _ANY_AT)
        for domain in (query.domain, search and search.domain):
            if domain:
                conditions.append(
                    "EXISTS (SELECT 1 FROM recipients d WHERE d.message_id = m.id"
                    f" AND d.domain = %s AND {states})"
                )
                params.append(domain.lower())
        if search is not None and search.address is not None:
            conditions.append(
                "EXISTS (SELECT 1 FROM recipients a WHERE a.message_id = m.id AND a.address = %s)"
            )
            params.append(search.address)
        if search is not None and search.id_prefix is not None:
            conditions.append("m.id BETWEEN %s AND %s")
            params += list(id_range(search.id_prefix))
        direction = "DESC" if newest else "ASC"
        # One snapshot, as SQLite reads a page: the page is chosen by one SELECT and its
        # messages read by another, and one purged (or changed) between them left a hole.
        with self._reading("queue page", snapshot=True) as conn:
            # A creation time that reads as None (see _reading) leaves its message out
            # with a warning, and `late` tells the page cursor which end it sorts at.
            with conn.cursor() as cur:
                rows = cur.execute(
                    (
                        f"SELECT m.id, m.seq, m.created_at, m.created_at > 'epoch' AS late"
                        f" FROM messages m WHERE {' AND '.join(conditions)}"
                        f" ORDER BY m.created_at {direction}, m.seq {direction} LIMIT %s"
                    ).encode(),
                    [*params, query.limit + 1],
                ).fetchall()
            more = len(rows) > query.limit
            rows = rows[: query.limit]
            ids = [row[0] for row in rows]
            found = summaries(conn, ids)
        cursor = None
        if more:
            _, seq, created, late = rows[-1]
            cursor = cursor_after(created, int(seq), late=bool(late), newest=newest)
        # A message whose rows cannot be read is left out (summaries() warns).
        return QueuePage(messages=tuple(found[mid] for mid in ids if mid in found), next=cursor)

    def message_status(
        self, message_id: str, *, attempts: int, after: int = -1, recipients: int | None = None
    ) -> MessageDetail:
        """See :meth:`ReadModel.message_status`."""
        check_count(attempts, "attempts")
        check_recipient_page(after, recipients)
        if not comparable(message_id):  # names nothing stored, as in the memory store
            raise UnknownMessage(message_id)
        with self._reading("reading a message's status") as conn:
            return message_detail(conn, message_id, attempts, after, recipients)

    def waiting(self, message_id: str, *, at: Collection[str]) -> tuple[int, int]:
        """See :meth:`ReadModel.waiting`."""
        if not comparable(message_id):  # names nothing stored, as in the memory store
            raise UnknownMessage(message_id)
        with self._reading("counting a message's waiting recipients") as conn:
            return waiting(conn, message_id, at)

    def message_data(self, message_id: str, *, limit: int | None = None) -> bytes:
        """See :meth:`ReadModel.message_data`."""
        if limit is not None:
            check_count(limit, "limit")
        if not comparable(message_id):  # names nothing stored, as in the memory store
            raise UnknownMessage(message_id)
        with self._reading("reading a message") as conn:
            if limit is None:
                row = conn.execute(
                    b"SELECT data FROM messages WHERE id = %s", (message_id,)
                ).fetchone()
            else:
                # A TOASTed value is fetched (and decompressed) only as far as the slice.
                # substring() takes an integer count (a bigint one is no such function),
                # and no bytea is longer than an integer counts (1 GB at most).
                row = conn.execute(
                    b"SELECT substring(data FROM 1 FOR %s) FROM messages WHERE id = %s",
                    (min(limit, _MAX_INTEGER), message_id),
                ).fetchone()
        if row is None:
            raise UnknownMessage(message_id)
        return bytes(row[0])


@contextmanager
def _isolated(conn: psycopg.Connection[Any], snapshot: bool) -> Iterator[None]:
    """With ``snapshot``, the transactions ``conn`` begins meanwhile are REPEATABLE READ
    and read only: its first query takes the snapshot. Begun so, not by a ``SET
    TRANSACTION`` after the ``BEGIN``: behind a pooler every statement of a transaction
    is preceded by a ``SELECT`` that bounds its lock wait (see
    :mod:`~mailstrom.stores.postgres.locks`), a query, after which the SET failed ("must
    be called before any query"). The connection's own setting is back afterwards."""
    if not snapshot:
        yield
        return
    isolation, read_only = conn.isolation_level, conn.read_only
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    try:
        yield
    finally:
        if not conn.closed:
            conn.isolation_level, conn.read_only = isolation, read_only

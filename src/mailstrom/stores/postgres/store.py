"""PostgresStore: the Store protocol over psycopg 3 and a connection pool.

Every method is one statement on an autocommit connection (one round trip, one
transaction), so batches cost the same number of round trips as single items.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
import threading
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

from mailstrom.arguments import check_key, check_timeout, row_limit, shown
from mailstrom.errors import (
    InvalidArgument,
    StoreCorrupt,
    StoreError,
    StoreUnreachable,
    UnknownMessage,
    UnreadableRow,
)
from mailstrom.message.chars import shorten
from mailstrom.message.prepared import PreparedMessage
from mailstrom.mtasts.policy import CachedPolicy
from mailstrom.policy.throttle import (
    TokenBucket,
    TokenGrant,
    forget_before,
    next_pause,
    take_tokens,
)
from mailstrom.status import (
    Attempt,
    DeliveryEvent,
    DestinationThrottle,
    DKIMStatus,
    MessageStatus,
    QueueStats,
    RecipientState,
)
from mailstrom.stores import tls_rows
from mailstrom.stores.base import (
    MAX_HISTORY,
    MAX_OWED_MESSAGES,
    MAX_TLS_BROKEN,
    VERP_KEY_SIZE,
    EventBatch,
    Lease,
    OwedNotice,
    QueueFilter,
    RecipientResult,
    RecipientsFound,
    WorkItem,
    ascii_lower,
    bounded_attempt,
    byte_budget,
    check_destination,
    check_pause_times,
    check_report_key,
    check_result_times,
    check_storable,
    check_suppressions,
    check_suspension,
    check_tls_host,
    holder_range,
    lease_token,
    named_recipients,
    new_message_id,
    pause_reply,
    record_then_lease,
    storable_text,
    with_pauses,
    with_throttles,
)
from mailstrom.stores.clock import (
    ClockReading,
    after,
    aware_utc,
    before,
    kept_time,
    reading_between,
)
from mailstrom.stores.dead_holders import HolderInfo
from mailstrom.stores.dkim_column import dkim_to_column
from mailstrom.stores.fairness import DESTINATIONS, Fairness, fairness
from mailstrom.stores.forks import keep, renew_after_fork
from mailstrom.stores.operator import (
    MAX_CANDIDATES,
    PENDING_STATES,
    IdPage,
    ListingKey,
    ShapeRow,
    Suspension,
    age_edges,
    check_examine,
    comparable,
    effective_states,
    foreign_place,
    listed_ids,
    normalize_prefix,
    pick_one,
    prefix_upper_bound,
    shape_rows,
    states_at_domain,
)
from mailstrom.stores.postgres import aside, rows, unanswered
from mailstrom.stores.postgres.connect import (
    ProcessPool,
    check_conninfo,
    connection_pool,
    split_url,
)
from mailstrom.stores.postgres.holders import (
    LIST_AT_MOST,
    STOP_WAIT,
    HolderBeats,
    log_reaped,
)
from mailstrom.stores.postgres.listener import Listener
from mailstrom.stores.postgres.locks import pool_lock_wait
from mailstrom.stores.postgres.migrate import (
    latest_known,
    migrate,
    newer_schema,
    newer_version_behind,
)
from mailstrom.stores.postgres.notifier import Notifier
from mailstrom.stores.postgres.sql import CANCELLED, queries, translate_errors
from mailstrom.stores.postgres.statistics import PlannerStatistics
from mailstrom.stores.row_checks import UNREADABLE, counted_state, made_due
from mailstrom.stores.side_rows import (
    EVENT_SKIPPED,
    broken_until,
    bucket_state,
    pause_of,
    read_events_past_unreadable,
    readable_events,
)
from mailstrom.stores.watchers import Watchers
from mailstrom.suppression import MAX_TARGET, Suppression
from mailstrom.tlsrpt.sessions import TLSSessions

log = logging.getLogger(__name__)


def _wait(timeout: object) -> float:
    """The store's ``timeout``, checked before it reaches the pool: a value no wait can
    be (inf, NaN, a hundred years past) raised OverflowError or ValueError there, and 0
    or less a StoreUnreachable ("pool initialization incomplete after 0 sec") that
    blamed a server nobody had asked."""
    seconds = check_timeout(timeout, "timeout")
    if seconds <= 0:
        raise InvalidArgument(
            f"timeout: expected a positive number of seconds, got {shown(timeout)}",
            argument="timeout",
        )
    return seconds


def _state_values(where: QueueFilter) -> list[str] | None:
    """The states ``where`` admits (its ``states`` narrowed by its ``state``) as the
    text array the queries take: one test of the derived state (``_in_states``)."""
    states = effective_states(where.state, where.states)
    return None if states is None else sorted(s.value for s in states)


def _recorded(found: Sequence[Sequence[Any]], finished: set[str]) -> dict[unanswered.Key, bool]:
    """The keys the ``record`` query's rows name, each with whether it was recorded
    already (replayed); adds to ``finished`` the messages of recipients it made final
    while aside (held, or at a suspended destination), which may have finished held."""
    replayed: dict[unanswered.Key, bool] = {}
    for message_id, address, token, again, finished_aside in found:
        replayed[message_id, address, token] = again
        if finished_aside:
            finished.add(message_id)
    return replayed


_LISTS = ("query", "select_ids", "count")
"""The queries of a queue filter (:meth:`PostgresStore.query`, ``select_ids``, ``count``)."""
_DOMAIN_RANGES: dict[str, tuple[frozenset[RecipientState], str]] = {
    "pending": (PENDING_STATES, "IN ('queued', 'deferred')"),  # recipients_pending_domain
    "delivered": (frozenset({RecipientState.DELIVERED}), "= 'delivered'"),  # migration 24
    "failed": (frozenset({RecipientState.FAILED}), "= 'failed'"),  # migration 25
}
"""The recipients of a domain by the partial index that holds them: its states, and the
test of a recipient's state that reads the domain's range of that index."""


def _at_domain(text: bytes, ranges: Sequence[str]) -> bytes:
    """``text`` (a query of :data:`_LISTS`) led by a condition that holds for every
    message it lists with a recipient at the filter's domain: one in the domain's
    ``ranges`` (of :data:`_DOMAIN_RANGES`). The filter's own test of the domain sits
    inside an OR with its NULL test, which PostgreSQL never makes a join of (it pulls
    sub-selects up before it folds the parameters), so it probed every message of the
    queue, newest first, for its recipients at the domain. This one is a semi-join: the
    planner reads the domain's ranges (a BitmapOr of them), or still walks the queue
    newest first when the domain holds much of it. (A UNION ALL of the ranges would read
    them too, but the planner guesses 200 messages of its result whatever the domain
    holds, and read half the queue for a page of a domain with half of it.)"""
    head, where, tail = text.partition(b"WHERE")
    assert where, "a queue filter's query has a WHERE"
    states = " OR ".join(f"dd.state {_DOMAIN_RANGES[r][1]}" for r in ranges)
    return (
        head
        + where
        + b" EXISTS (SELECT 1 FROM recipients dd WHERE dd.message_id = m.id"
        + f" AND dd.domain = %(at_domain)s::text AND ({states})) AND".encode()
        + tail
    )


def _domain_variants(queries: Mapping[str, bytes]) -> dict[str, bytes]:
    """The variants of :data:`_LISTS` :func:`_listing` may pick, by name: each list led
    by each set of ranges."""
    names = list(_DOMAIN_RANGES)
    subsets = [
        tuple(r for i, r in enumerate(names) if bits >> i & 1) for bits in range(1, 1 << len(names))
    ]
    return {
        f"{name}@{'+'.join(ranges)}": _at_domain(queries[name], ranges)
        for name in _LISTS
        for ranges in subsets
    }


def _listing(name: str, where: QueueFilter, params: dict[str, object]) -> str:
    """The query ``name`` (one of :data:`_LISTS`) for ``where``: with a domain, its
    variant led by the domain's ranges of recipients in the states one there may have
    in a message ``where`` admits (:func:`states_at_domain`). The domain of ``params`` moves
    to that test: the filter's own is left to its NULL test, as it holds for every
    message of those states the variant's holds for (it read every recipient of the
    domain, at each listing, for a hashed sub-plan)."""
    if where.domain is None:
        return name
    possible = states_at_domain(where)
    ranges = [r for r, (held, _) in _DOMAIN_RANGES.items() if held & possible]
    if not ranges:
        return name
    params["at_domain"], params["domain"] = params["domain"], None
    return f"{name}@{'+'.join(ranges)}"


def _filter_params(now: datetime, where: QueueFilter) -> dict[str, object]:
    """The parameters of ``_queue_filter`` (query, select_ids) for ``where`` at ``now``."""
    now = aware_utc(now, "now")  # ages are reckoned from it: a naive one has none
    return {
        "held": where.held,
        "created_before": None if where.older_than is None else before(now, where.older_than),
        "domain": None if where.domain is None else where.domain.lower(),
        "state": None if where.state is None else where.state.value,
        "limit": row_limit(where.limit),
        "tag": where.tag,
        "states": _state_values(where),
    }


def _window(found: Sequence[Any], limit: int, examine: int) -> IdPage:
    """The page ``select_window`` answers with ``found``: the ids it lists, newest first,
    and where the next page starts: the last of them when they fill the page, else the
    oldest message it looked at, when it looked at all it was allowed (None: none is
    left)."""
    listed = sorted((r for r in found if r[0] is not None), key=lambda r: (r[1], r[2]))
    listed.reverse()
    ids = [row[0] for row in listed]
    if ids and len(ids) >= limit:
        return IdPage(ids=ids, last=ListingKey(listed[-1][1], int(listed[-1][2])))
    end = next(r for r in found if r[0] is None)
    if end[1] is None or int(end[3]) < examine or limit <= 0:
        return IdPage(ids=ids, last=None)
    return IdPage(ids=ids, last=ListingKey(end[1], int(end[2])))


class PostgresStore:
    """A durable queue in PostgreSQL, shared by any number of worker processes.

    Opening the store creates or upgrades the schema (see :func:`migrate`). Workers lease
    recipients with ``FOR UPDATE SKIP LOCKED`` and :meth:`watch` wakes them through
    ``LISTEN/NOTIFY`` when any process enqueues or retries mail.

    >>> store = PostgresStore("postgresql://mail@127.0.0.1/mail")  # doctest: +SKIP

    ``min_size``/``max_size`` bound the connection pool; ``timeout`` is how long to wait
    for the database when opening and for a free pooled connection per call.
    """

    in_process = False
    """Every call is a network round trip: the worker makes them in threads."""

    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 30.0
    ) -> None:
        timeout = _wait(timeout)
        self._url = url
        # What libpq gets: the URL less mailstrom's own parameters (see connect.split_url).
        self._conninfo, params = split_url(url)
        check_conninfo(self._conninfo)
        self._sizes = (min_size, max_size)
        self._timeout = timeout
        self._closed = False
        self._known = latest_known()
        """The schema version this mailstrom knows (the database's once opened)."""
        self._newer: str | None = None
        """Why every call fails, once a newer mailstrom migrated the database under this
        store (see :meth:`_schema_moved_on`)."""
        self._lock = threading.Lock()
        # One LISTEN connection for every watch and watch_cancels of this store object,
        # opened by the first and closed with the last: a connection each cost a worker
        # two of the server's max_connections, and each reconnected on its own.
        self._listener: Listener | None = None
        self._watchers = Watchers()
        self._cancel_watchers = Watchers()
        self._watching = 0
        """Callbacks registered in both sets, under ``_lock``."""
        self._events = False
        self._unanswered = unanswered.UnansweredRecords()
        self._unanswered_leases = unanswered.UnansweredLeases()
        self._queries = {name: text.encode() for name, text in queries().items()}
        self._queries.update(_domain_variants(self._queries))
        self._statistics = PlannerStatistics()
        self._turns: dict[str, str] = {}
        """Where each lane's walk of destinations reached (:func:`_advance_turns`)."""
        self._ended_seen = False
        """Whether the last lease saw a timed suspension ended with its recipients still
        aside (:mod:`.aside`): the next one ends it first."""
        self._ends: frozenset[datetime] = frozenset()
        """The ends of the timed suspensions made through this store that no empty lease
        has yet looked past: one that finds nothing at or after such an end asks whether
        it has ended (another process's is seen by next_due or a lease's rows)."""
        self._verp_key: bytes | None = None
        self._lock_bound = params.lock_bound
        self._beats = HolderBeats(params.dead_after)
        self._notifier = Notifier(self._conninfo, lock_bound=params.lock_bound)
        migrate(url, connect_timeout=timeout)
        self._pools = ProcessPool(self._new_pool)
        self._lock_wait = pool_lock_wait(lambda: self._pool)
        try:
            with translate_errors("connecting"):
                self._pool.open(wait=True, timeout=timeout)
        except BaseException:
            self._pools.close()
            raise
        renew_after_fork(self)

    def _new_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        min_size, max_size = self._sizes
        store = weakref.ref(self)  # the pool's threads keep no store nobody closed alive

        def answered() -> None:
            # The server answers again, perhaps after an outage: the listener, waiting
            # out its backoff (up to 30 s), tries now; the worker hears new mail again
            # as soon as its store calls work, not a poll later.
            alive = store()
            listener = None if alive is None else alive._listener
            if listener is not None:
                listener.answered()

        return connection_pool(
            self._url,
            name="mailstrom",
            min_size=min_size,
            max_size=max_size,
            timeout=self._timeout,
            # Back within a beat: before another worker can take this one for dead.
            reconnect_within=self._beats.beat_every,
            on_connect=answered,
        )

    @property
    def _pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        return self._pools.pool

    def _before_fork(self) -> None:
        pass  # the connections are ProcessPool's, and the threads' locks are not held

    def _after_fork_in_parent(self) -> None:
        pass

    def _after_fork(self) -> None:
        """In a process forked from this one (see :mod:`~mailstrom.stores.forks`): its
        pool is a new one (:class:`~.connect.ProcessPool`), and the parent's listener and
        notifier threads do not exist here. Nor are the parent's holders ours: a close()
        here would have said the parent's workers stopped, and their leases would have
        been taken from them while they delivered."""
        self._lock = threading.Lock()
        keep(self._listener, self._notifier)
        self._listener = None
        self._watchers, self._cancel_watchers, self._watching = Watchers(), Watchers(), 0
        self._statistics = PlannerStatistics()
        self._turns = {}
        self._beats = HolderBeats(self._beats.dead_after)
        self._notifier = Notifier(self._conninfo, lock_bound=self._lock_bound)
        # The parent's writes whose answers were lost are the parent's to write again.
        self._unanswered = unanswered.UnansweredRecords()
        self._unanswered_leases = unanswered.UnansweredLeases()

    @property
    def url(self) -> str:
        """The connection URL (it may hold a password)."""
        return self._url

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled, a store is the way to open it again (for a worker in another process).
        min_size, max_size = self._sizes
        reopen = functools.partial(
            PostgresStore, min_size=min_size, max_size=max_size, timeout=self._timeout
        )
        return (reopen, (self._url,))

    # --- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _translating(self, doing: str) -> Iterator[None]:
        """Driver errors as StoreError (see sql.translate_errors); a lock waited for in
        vain names its holder. StoreCorrupt, before anything is sent, once a newer
        mailstrom migrated the database (see :meth:`_schema_moved_on`); and for a
        statement that misses a table or column because it did ("column ... does not
        exist", which read as a passing trouble, retried for ever)."""
        if self._newer is not None:
            raise StoreCorrupt(self._newer)
        try:
            with translate_errors(doing, diagnose=self._lock_wait):
                yield
        except StoreError as exc:
            newer = self._newer_schema_behind(exc)
            if newer is None:
                raise
            raise newer from exc

    def _newer_schema_behind(self, exc: StoreError) -> StoreCorrupt | None:
        """StoreCorrupt when ``exc`` is a statement of this mailstrom missing a table or
        column and the schema is newer than this mailstrom knows (see
        :func:`~mailstrom.stores.postgres.migrate.newer_version_behind`)."""
        version = newer_version_behind(exc, self._pool, self._known)
        return None if version is None else self._schema_moved_on(version)

    def _refuse_newer_schema(self, version: object) -> None:
        """StoreCorrupt when ``version`` (the schema's, read with a holder's beat) is
        newer than this mailstrom knows."""
        if isinstance(version, int) and version > self._known:
            raise self._schema_moved_on(version)

    def _schema_moved_on(self, version: int) -> StoreCorrupt:
        """The error of a store whose database a newer mailstrom migrated (``version``),
        remembered: every later call fails so before it sends a statement written for
        the old schema. A worker leasing and recording on with them could mis-record
        mail; it stops instead, and leaves what it leased to the newer workers (its holder
        is taken for dead after ``dead_after``, and its leases given back)."""
        why = newer_schema(version, self._known, while_open=True)
        self._newer = why
        return StoreCorrupt(why)

    def _fetch(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with self._translating(name), self._pool.connection() as conn:
            return conn.execute(self._queries[name], params).fetchall()

    def _fetch_on(
        self, backends: list[int], name: str, params: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        """:meth:`_fetch`, adding to ``backends`` the server process the statement is
        sent to (the pooler's own id behind a pooler, which names no server process)."""
        with self._translating(name), self._pool.connection() as conn:
            backends.append(conn.info.backend_pid)
            return conn.execute(self._queries[name], params).fetchall()

    def _fetch_side(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of a query of a side table, a time the driver cannot hold read as None
        (rows.ReadableTimes): the caller decides what such a row means (side_rows)."""
        with (
            self._translating(name),
            self._pool.connection() as conn,
            rows.readable_cursor(conn) as cur,
        ):
            return cur.execute(self._queries[name], params).fetchall()

    def _fetch_none(self, name: str, params: dict[str, Any]) -> None:
        """Run a statement that returns no rows."""
        with self._translating(name), self._pool.connection() as conn:
            conn.execute(self._queries[name], params)

    def _fetch_dicts(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows of a query of the operator's views, by column name; a time the driver
        cannot hold reads as None (rows.ReadableTimes), so one bad row does not fail it."""
        with (
            self._translating(name),
            self._pool.connection() as conn,
            rows.readable_cursor(conn, row_factory=dict_row) as cur,
        ):
            return cur.execute(self._queries[name], params).fetchall()

    # --- submission -------------------------------------------------------------------

    def enqueue(self, message: PreparedMessage, *, now: datetime, hold: bool = False) -> str:
        """Store ``message`` (committed before returning) and return its new id."""
        return self._enqueue([message], now=now, held=hold)[0]

    def enqueue_many(self, messages: Sequence[PreparedMessage], *, now: datetime) -> list[str]:
        """Store several messages in one statement; ids in the same order."""
        if not messages:
            return []
        return self._enqueue(messages, now=now, held=False)

    def _enqueue(
        self, messages: Sequence[PreparedMessage], *, now: datetime, held: bool
    ) -> list[str]:
        check_storable(messages, now=now)
        ids = [new_message_id() for _ in messages]
        try:
            ids = self._write(messages, ids, now=now, held=held)
        except StoreUnreachable as exc:
            if isinstance(exc.__cause__, _POOL_ERRORS):
                raise  # no connection to send it on: nothing was written
            # The connection broke during the call, perhaps once the server had the batch:
            # it may be committed, or committing still. Written again under the same ids,
            # it is queued once either way: an id the server holds (or a key it gave one)
            # is not inserted again, and an insert waits for a transaction still writing
            # the same id to end.
            try:
                ids = self._write(messages, ids, now=now, held=held)
            except StoreUnreachable as again:
                raise StoreUnreachable(
                    f"{again}; a connection broke during the first try, and the messages"
                    f" may have been queued then, as {shorten(', '.join(ids))}"
                ) from again
        if not held:
            # After the commit, from the notifier's thread: a NOTIFY in the enqueue's own
            # transaction would serialise every client's commits (see notifier.py).
            self._notifier.poke()
        return ids

    def _write(
        self, messages: Sequence[PreparedMessage], ids: list[str], *, now: datetime, held: bool
    ) -> list[str]:
        """Insert ``messages`` under ``ids`` (those whose id the store holds already are
        left as they are); returns the ids, a message whose key another one holds given
        that one's."""
        if any(m.attributes.idempotency_key is not None for m in messages):
            return self._enqueue_keyed(messages, list(ids), now=now, held=held)
        with self._translating("enqueue"), self._pool.connection() as conn:
            if sum(m.size for m in messages) <= rows.ENQUEUE_CHUNK_BYTES:
                self._insert(conn, messages, ids, now=now, held=held)  # one round trip
            else:
                with conn.transaction():
                    self._insert(conn, messages, ids, now=now, held=held)
        return ids

    def _enqueue_keyed(
        self, messages: Sequence[PreparedMessage], ids: list[str], *, now: datetime, held: bool
    ) -> list[str]:
        """Claim each idempotency key, then insert the messages that got theirs, in one
        transaction; a message whose key another one holds gets that one's id instead.

        The keys are claimed in key order (the caller's among equal keys, so the first of
        them wins): a claim waits for a concurrent batch that claimed the same key to end,
        and two batches claiming shared keys in opposite orders deadlocked, one of them
        failing."""
        keyed = sorted(
            (key, i)
            for i, message in enumerate(messages)
            if (key := message.attributes.idempotency_key) is not None
        )
        taken: set[int] = set()
        with (
            self._translating("enqueue"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            for key, i in keyed:
                claimed = conn.execute(
                    self._queries["claim_key"],
                    {
                        "key": key,
                        "id": ids[i],
                        "until": messages[i].attributes.idempotency_until or now,
                        "now": now,
                    },
                ).fetchone()
                if claimed is None:
                    holder = conn.execute(self._queries["key_holder"], {"key": key}).fetchone()
                    if holder is None:  # cannot happen: the conflict was on this row
                        raise StoreError(f"idempotency key {key!r} vanished while claimed")
                    ids[i] = holder[0]
                    taken.add(i)
            fresh = [m for i, m in enumerate(messages) if i not in taken]
            fresh_ids = [mid for i, mid in enumerate(ids) if i not in taken]
            self._insert(conn, fresh, fresh_ids, now=now, held=held)
        return ids

    def _insert(
        self,
        conn: psycopg.Connection[Any],
        messages: Sequence[PreparedMessage],
        ids: Sequence[str],
        *,
        now: datetime,
        held: bool,
    ) -> None:
        """Insert ``messages`` with ``ids`` on ``conn``, a statement per
        :func:`~.rows.enqueue_chunks` run: one statement's parameters cannot exceed 1 GiB."""
        for chunk, chunk_ids in rows.enqueue_chunks(messages, ids):
            conn.execute(
                self._queries["enqueue"],
                rows.enqueue_params(chunk, chunk_ids, now=now, held=held),
            )

    # --- the worker's side ------------------------------------------------------------

    def lease(
        self,
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        lanes: Sequence[tuple[str, int]] | None = None,
        holder: str | None = None,
        max_bytes: int | None = None,
        busy: Collection[str] = (),
        per_destination: int | None = None,
    ) -> Lease | None:
        """Lease up to ``limit`` due recipients in one statement (see Store.lease), with
        the suppression entries that apply to them; with ``lanes``, one statement for the
        named lanes and, when they had room left and nothing more due, one for the
        others. A timed suspension that has ended brings its recipients back into the due
        indexes (:mod:`.aside`) before a second try of the lease whose rows said so (its
        rows given back first, so that the recipients due longest still come first), or,
        made through this store, of a lease that found nothing; another process's, which
        no lease saw, is brought back by :meth:`next_due` (the worker asks it after each
        empty lease). Fair with ``busy`` and ``per_destination``: the statements of
        queries.sql's _fair_due; a lease that asks no fairness runs the plain ones."""
        if row_limit(limit) == 0:
            return None
        if self._statistics.due():
            self._gather_statistics()
        self._give_back_unanswered_leases(now)
        if self._ended_seen:
            # The last lease saw a timed suspension ended: its recipients come back first.
            self._end_ended(now)
        token = lease_token(holder)
        take = functools.partial(
            self._lease_as,
            token,
            now=now,
            limit=limit,
            lease_for=lease_for,
            lanes=lanes,
            max_bytes=max_bytes,
            fair=fairness(self._turns, busy, per_destination, limit),
        )
        found = take()
        if found is not None and self._ended_seen and not found.failed:
            # Its rows say a timed suspension has ended, its recipients still aside: due
            # since before (perhaps before all of these), they belong in this lease, not
            # the next. Given back, brought back and leased again, once per end.
            try:
                self._fetch("release_tokens", {"tokens": [token]})
            except StoreError:
                return found  # still held: the next lease brings them back first
            self._end_ended(now)
            found = take()
        ends = self._ends
        if found is None and ends and min(ends) <= now.astimezone(UTC):
            # Nothing else was due (so no row said so), and a suspension made here may have
            # ended, its recipients still aside: if so, back in the due index, they are
            # leased now. Asked once per end, not on every empty lease.
            self._ends = frozenset(end for end in ends if end > now.astimezone(UTC))
            if self._fetch("ended_suspensions", {"now": now})[0][0]:
                self._end_ended(now)
                found = take()
        return found

    def _lease_as(
        self,
        token: str,
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        lanes: Sequence[tuple[str, int]] | None,
        max_bytes: int | None,
        fair: Fairness | None,
    ) -> Lease | None:
        """The lease under ``token``: a call that fails leaves it to the next lease's
        give-back."""
        expires_at = after(now, lease_for)
        backends: list[int] = []
        try:
            return self._lease(
                token,
                backends,
                now=now,
                limit=limit,
                lease_for=lease_for,
                lanes=lanes,
                max_bytes=max_bytes,
                fair=fair,
            )
        except BaseException:
            # It may have committed, its answer lost (or a second statement failed after
            # the first leased), or be running still: later leases give back what it holds.
            self._unanswered_leases.failed(token, backends=backends, expires_at=expires_at)
            raise

    def _give_back_unanswered_leases(self, now: datetime) -> None:
        """Give back, due at once, what leases whose call failed may still hold (see
        :mod:`~mailstrom.stores.postgres.unanswered`). A token whose statement may still
        be running on the server (its process is, read before the give-back's snapshot)
        is kept for the next lease's give-back."""
        pending = self._unanswered_leases.pending(now)
        if not pending:
            return
        pids = sorted({pid for backends in pending.values() for pid in backends})
        running = (
            {pid for (pid,) in self._fetch("running_backends", {"pids": pids})} if pids else set()
        )
        self._fetch("release_tokens", {"tokens": list(pending)})
        self._unanswered_leases.given_back(
            token for token, backends in pending.items() if running.isdisjoint(backends)
        )

    def _lease(
        self,
        token: str,
        backends: list[int],
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        lanes: Sequence[tuple[str, int]] | None,
        max_bytes: int | None,
        fair: Fairness | None,
    ) -> Lease | None:
        expires_at = after(now, lease_for)
        max_bytes = byte_budget(max_bytes)
        params: dict[str, Any] = {
            "now": now,
            "limit": limit,
            "token": token,
            "expires_at": expires_at,
            "max_bytes": max_bytes,
            "first_always": True,
        }
        names = ("lease_lanes", "lease_other_lanes")
        if fair is not None:
            names = ("fair_lease_lanes", "fair_lease_other_lanes")
            params.update(_fair_params(fair))
        if lanes is None and fair is None:
            found = rows.lease_rows(self._fetch_on(backends, "lease", params))
        elif lanes is None:
            # Every lane's earliest due, as the plain lease: the lanes none are named of.
            params["lanes"] = []
            found = rows.lease_rows(self._fetch_on(backends, names[1], params))
        else:
            # A lane named twice counts once, with its first number, as in the memory
            # store: the query's lateral read of each array element leased the same rows
            # once per mention (our own row locks skip nothing), one recipient twice over.
            first: dict[str, int] = {}
            for lane, most in lanes:
                first.setdefault(lane, most)
            lanes = list(first.items())
            params["lanes"] = [lane for lane, _ in lanes]
            # No lane takes more than the lease: a share of a huge max_connections (the
            # worker's lane caps grow with it) must not overflow the query's bigint and
            # fail every lease, retried for ever as a passing store error.
            params["lane_limits"] = [min(max(0, most), limit) for _, most in lanes]
            found = rows.lease_rows(self._fetch_on(backends, names[0], params))
            taken = Counter(row.lane for row in found)
            exhausted = len(found) < limit and all(
                most > 0 and taken[lane] < most for lane, most in lanes
            )
            if exhausted and not (found and found[0].cut):
                params["limit"] = limit - len(found)
                if max_bytes is not None and found:
                    # The bytes left, for messages after those (none of them first).
                    sizes = {row.message_id: row.size for row in found}
                    params["max_bytes"] = max_bytes - sum(sizes.values())
                    params["first_always"] = False
                found += rows.lease_rows(self._fetch_on(backends, names[1], params))
        if fair is not None:
            _advance_turns(fair, found)
        if not found:
            return None
        if found[0].ended:
            self._ended_seen = True
        lease, unreadable = rows.lease_from_rows(token, expires_at, found)
        if not unreadable:
            return lease
        failed = self._fail_unreadable(token, unreadable, now=now)
        if not failed:
            return lease
        if lease is None:
            return Lease(
                token=token, expires_at=expires_at, items=(), suppressions={}, failed=failed
            )
        return dataclasses.replace(lease, failed=failed)

    def _fail_unreadable(
        self,
        token: str,
        unreadable: Sequence[tuple[rows.LeaseRow, UnreadableRow]],
        *,
        now: datetime,
    ) -> tuple[RecipientResult, ...]:
        """Fail, for good, the leased recipients whose rows cannot be delivered (see
        :mod:`~mailstrom.stores.row_checks`), with an attempt in their history and, with
        events enabled, their outbox events, in one transaction; the results to report
        (:attr:`Lease.failed`). Should this fail, their lease expires and the next lease
        fails them."""
        params = rows.fail_unreadable_params(token, unreadable, now=now)
        failed: tuple[RecipientResult, ...] = ()
        try:
            with (
                self._translating("fail_unreadable"),
                self._pool.connection() as conn,
                conn.transaction(),
            ):
                done = conn.execute(self._queries["fail_unreadable"], params).fetchall()
                failed = rows.set_aside_results(token, unreadable, {tuple(r) for r in done}, now)
                if self._events and failed:
                    conn.execute(
                        self._queries["append_events"],
                        {
                            "message_ids": [r.message_id for r in failed],
                            "addresses": [r.address for r in failed],
                        },
                    )
        except StoreError as exc:
            # The rest of the lease is good: it goes to the worker all the same.
            log.warning("unreadable rows not failed yet (%s); tried again later", exc)
            failed = ()
        # One line per message (a bad message row fails all its leased recipients).
        per_message = Counter(row.message_id for row, _ in unreadable)
        reasons = {row.message_id: exc for row, exc in unreadable}
        for message_id, count in per_message.items():
            log.error(
                "%d recipient(s) of message %s failed: %s: %s",
                count,
                message_id,
                UNREADABLE,
                reasons[message_id],
            )
        return failed

    def _end_ended(self, now: datetime) -> None:
        """Bring back the recipients of the timed suspensions that have ended by ``now``
        and delete those suspensions, in one transaction (:func:`.aside.end_ended`)."""
        self._ended_seen = False
        with (
            self._translating("end_suspensions"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            aside.end_ended(conn, self._queries, now)

    def _gather_statistics(self) -> None:
        """Analyse the queue's tables if they have no planner statistics yet (a new
        database with a backlog: see :mod:`~mailstrom.stores.postgres.statistics`). A
        failure only means the lease is planned as before."""
        try:
            with self._pool.connection() as conn:
                self._statistics.ensure(conn)
        except psycopg.Error as exc:
            log.debug("planner statistics: %s", exc)

    def record(self, results: Sequence[RecipientResult]) -> list[RecipientResult]:
        """Record results of any leases in one statement; returns those recorded. Results
        a failed call of this object wrote, written again, count as recorded when the store
        holds their very attempt already: that call may have committed, its answer lost
        (see :mod:`~mailstrom.stores.postgres.unanswered`), or be committing still (a
        second statement then looks again at those it did not find)."""
        if not results:
            return []
        check_result_times(results)
        once = rows.once_per_lease(results)
        keys = [(r.message_id, r.address, r.lease_token) for r in once]
        marks = self._unanswered.marks(keys)
        params = rows.record_params(once, marks)
        # A result carrying a DKIM outcome (its message signed anew as it went: rare) has
        # it written in the record's transaction; the others stay one statement.
        finished: set[str] = set()  # messages that may have finished while held
        try:
            if self._events or any(r.dkim is not None for r in once):
                found = self._record_in_transaction(params, keys, [r.dkim for r in once])
            else:
                found = self._fetch("record", params)
            replayed = _recorded(found, finished)
            # A statement of the failed call may have been still running on the server,
            # and committed while this one waited for its row locks: this one's snapshot,
            # taken before, judged its rows not recorded yet. Asked again (nothing is
            # written twice: these rows no longer hold the result's lease), they are.
            unseen = [
                r
                for r, key, mark in zip(once, keys, marks, strict=True)
                if mark and key not in replayed
            ]
            if unseen:
                params = rows.record_params(unseen, [True] * len(unseen))
                replayed.update(_recorded(self._fetch("record", params), finished))
        except BaseException:
            self._unanswered.failed(keys)
            raise
        self._unanswered.answered(keys)
        if finished:  # rare: held while its delivery was in flight
            self._unhold_finished(sorted(finished))
        return [r for r, key in zip(once, keys, strict=True) if key in replayed]

    def _unhold_finished(self, message_ids: list[str]) -> None:
        """Clear the held flag of those of ``message_ids`` that finished while held, once
        their record committed (see ``unhold_finished`` in queries.sql). The results are
        recorded whatever becomes of this: a failure leaves the flag, which is judged
        where it is reported (a flag with nothing pending is not held) and goes with a
        release or the purge, and is only logged."""
        try:
            self._fetch("unhold_finished", {"ids": message_ids})
        except StoreError as exc:
            log.warning("held flag of finished messages left set: %s", exc)

    def _record_in_transaction(
        self,
        params: dict[str, Any],
        keys: list[unanswered.Key],
        dkims: Sequence[DKIMStatus | None],
    ) -> list[tuple[Any, ...]]:
        """Record, then in the same transaction append the outbox rows of what was
        recorded (with events enabled) and write the DKIM outcomes the recorded results
        carry (``dkims``, one per key: a message signed anew as it went). Returns the
        record's rows (see :func:`_recorded`): recorded already, by a call whose
        transaction wrote its outbox row and outcome with it, or now."""
        with (
            self._translating("record"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            resigned = sorted(
                {m for (m, _, _), d in zip(keys, dkims, strict=True) if d is not None}
            )
            if resigned:  # the message rows first, as the operator's actions lock them
                conn.execute(
                    self._queries["lock_messages"], {"message_ids": resigned, "pending": False}
                )
            found = conn.execute(self._queries["record"], params).fetchall()
            replayed = _recorded(found, set())
            written = [replayed.get(key) is False for key in keys]
            if self._events:
                pairs = list(
                    dict.fromkeys((m, a) for (m, a, _), w in zip(keys, written, strict=True) if w)
                )
                if pairs:
                    conn.execute(
                        self._queries["append_events"],
                        {"message_ids": [m for m, _ in pairs], "addresses": [a for _, a in pairs]},
                    )
            outcomes = {
                m: dkim
                for (m, _, _), dkim, w in zip(keys, dkims, written, strict=True)
                if w and dkim is not None
            }
            if outcomes:
                conn.execute(
                    self._queries["set_dkim"],
                    {
                        "message_ids": list(outcomes),
                        "dkims": [dkim_to_column(d) for d in outcomes.values()],
                    },
                )
        return found

    def owed_notices(
        self, *, message_ids: Sequence[str] | None = None, limit: int = MAX_OWED_MESSAGES
    ) -> list[OwedNotice]:
        """The marked recipients of messages done for this pass (see :class:`Store`): one
        statement, on the partial index of the marks."""
        limit = row_limit(limit)  # a negative one is 0, as everywhere
        wanted = None if message_ids is None else list(dict.fromkeys(message_ids))
        found = self._fetch("owed_notices", {"message_ids": wanted, "limit": limit})
        return [
            OwedNotice(message_id=mid, address=address, notice=notice)
            for mid, address, notice in found
        ]

    def queue_notices(
        self,
        owed: Sequence[OwedNotice],
        notices: Mapping[str, Sequence[PreparedMessage]],
        *,
        now: datetime,
    ) -> list[str]:
        """Clear the marks of ``owed`` and queue the notices of the messages whose marks
        were all still there as read, in one transaction. A call that failed (a stop that
        cancelled it, a broken connection) left the marks, or queued the notices and
        cleared them: asked again, nothing is lost, and nothing is queued twice."""
        check_storable([n for listed in notices.values() for n in listed], now=now)
        pairs = {
            "message_ids": [e.message_id for e in owed],
            "addresses": [e.address for e in owed],
        }
        with (
            self._translating("queue_notices"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            now_marked = {
                (mid, address): notice
                for mid, address, notice in conn.execute(self._queries["lock_notices"], pairs)
            }
            gone = {
                e.message_id for e in owed if now_marked.get((e.message_id, e.address)) != e.notice
            }
            kept = [e for e in owed if e.message_id not in gone]
            if kept:
                conn.execute(
                    self._queries["clear_notices"],
                    {
                        "message_ids": [e.message_id for e in kept],
                        "addresses": [e.address for e in kept],
                    },
                )
            wanted = [n for mid, listed in notices.items() if mid not in gone for n in listed]
            ids = [new_message_id() for _ in wanted]
            if wanted:
                self._insert(conn, wanted, ids, now=now, held=False)
        if ids:
            self._notifier.poke()
        return ids

    def record_and_lease(
        self,
        results: Sequence[RecipientResult],
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        lanes: Sequence[tuple[str, int]] | None = None,
        holder: str | None = None,
        max_bytes: int | None = None,
        busy: Collection[str] = (),
        per_destination: int | None = None,
    ) -> tuple[list[RecipientResult], Lease | None]:
        """Record, then lease: two statements, each its own transaction (one round trip each)."""
        return record_then_lease(
            self,
            results,
            now=now,
            limit=limit,
            lease_for=lease_for,
            lanes=lanes,
            holder=holder,
            max_bytes=max_bytes,
            busy=busy,
            per_destination=per_destination,
        )

    def extend(self, lease: Lease, *, until: datetime) -> int:
        """Move the expiry of the lease's unrecorded recipients to ``until``."""
        pairs = [(i.message_id, r.address) for i in lease.items for r in i.recipients]
        if not pairs:
            return 0
        until = kept_time(until, "until")
        [(held,)] = self._fetch(
            "extend",
            {
                "token": lease.token,
                "until": until,
                "message_ids": [m for m, _ in pairs],
                "addresses": [a for _, a in pairs],
            },
        )
        return int(held)

    def release(self, lease: Lease) -> None:
        """Give back the lease's unrecorded recipients, due at once."""
        pairs = [(i.message_id, r.address) for i in lease.items for r in i.recipients]
        if not pairs:
            return
        self._fetch(
            "release",
            {
                "token": lease.token,
                "message_ids": [m for m, _ in pairs],
                "addresses": [a for _, a in pairs],
            },
        )

    def release_holder(self, holder: str) -> int:
        """Give back every recipient leased under a token of ``holder``, due at once:
        one statement, which wakes the workers (NOTIFY) when it gave any back."""
        low, high = holder_range(holder)
        released, _ = self._fetch("release_holder", {"low": low, "high": high})[0]
        return int(released)

    @property
    def reap_every(self) -> float:
        """Seconds between a worker's looks for dead holders (a beat of its own each):
        an eighth of the store URL's ``dead_after``, 15 s at most."""
        return self._beats.beat_every

    @property
    def dead_after(self) -> float | None:
        """How long after its last beat a holder of this store may be taken for dead by
        the other workers' looks: what its row promises, the store URL's ``dead_after``
        (two minutes when it is 0, which turns only this store's judging off), so that
        its worker stops itself in time when cut off (runtime/worker_reaping.py)."""
        return self._beats.promise

    def release_dead_holders(self, alive: str | None = None) -> int:
        """Say that ``alive`` (the caller's holder) lives, then give back, due at once,
        what every holder not seen for the store URL's ``dead_after``, or its own (its
        row's) when longer, still leases
        (:class:`~mailstrom.stores.dead_holders.DeadHolderReaper`), once this store has
        looked without a break for that long (see :mod:`.holders`). Each dead holder's row
        goes with its leases, in one statement. Returns how many recipients."""
        if alive is None:
            [(server_now,)] = self._fetch("server_clock", {})
        else:
            [(server_now, made, version)] = self._fetch("beat_holder", self._beats.identity(alive))
            self._beats.beaten(alive, made=bool(made))
            # A worker's one regular call beside its leases and records: where it learns,
            # within a beat, that a newer mailstrom migrated the database (a lease or
            # record of its own would cost a round trip more).
            self._refuse_newer_schema(version)
        judging = {
            "since": self._beats.looked(server_now),  # None: only stopped holders go
            "run_since": self._beats.run_since,
            "judge": self._beats.dead_after or 0.0,
            "own": alive,
        }
        total = 0
        for holder, host, pid, seen_at, stopped, released, _ in self._fetch(
            "reap_holders", judging
        ):
            log_reaped(holder, host, pid, seen_at, stopped=stopped, released=int(released))
            total += int(released)
        return total

    def live_holders(self, *, leases: bool = True) -> list[HolderInfo]:
        """The holders seen within the store URL's ``dead_after`` (four minutes when it is
        0) or their own when longer, oldest first, at most a thousand, with how many
        recipients each leases (see
        :meth:`~mailstrom.stores.dead_holders.DeadHolderReaper.live_holders`)."""
        found = self._fetch_dicts(
            "live_holders",
            {"within": self._beats.alive_within, "limit": LIST_AT_MOST, "leases": leases},
        )
        return [HolderInfo(**row) for row in found]

    def measure_clock(self, clock: Callable[[], datetime]) -> ClockReading:
        """How far ``clock`` is from the server's (see
        :class:`~mailstrom.stores.clock.ServerClock`): read just before and just after one
        round trip, on a connection already checked out, so that waiting for the pool is
        not counted as skew."""
        with self._translating("server_clock"), self._pool.connection() as conn:
            before = clock()
            row = conn.execute(self._queries["server_clock"]).fetchone()
            after = clock()
            server = f"PostgreSQL server {conn.info.host}:{conn.info.port}"
        if row is None or not isinstance(row[0], datetime):
            raise StoreError(f"the {server} did not tell its time")
        return reading_between(before, row[0], after, server=server)

    # --- reading ----------------------------------------------------------------------

    def status(self, message_id: str) -> MessageStatus:
        """The message's status with every recipient's history."""
        if not comparable(message_id):
            raise UnknownMessage(message_id)
        # One statement: the pauses read apart (at READ COMMITTED) could contradict the
        # recipients, a recipient shown paused with the due time it had before the pause.
        read = self._fetch_dicts("status", {"id": message_id, "now": datetime.now(UTC)})
        found = rows.messages_from_rows(read, strict=True)
        if not found:
            raise UnknownMessage(message_id)
        return with_throttles(found[0], _pauses_in(read).get(message_id, {}))

    def query(self, *, now: datetime, where: QueueFilter | None = None) -> list[MessageStatus]:
        """Messages matching ``where``, newest first, without attempt history."""
        where = where or QueueFilter()
        params = _filter_params(now, where)
        params["now"] = datetime.now(UTC)  # a pause lasts by the clock, as status() reads it
        return _listed(self._fetch_dicts(_listing("query", where, params), params))

    def select_ids(self, *, now: datetime, where: QueueFilter) -> list[str]:
        """The ids :meth:`query` lists for ``where``, in its order (the same conditions),
        without the messages' recipients."""
        return self.select_page(now=now, where=where).ids

    def select_page(
        self,
        *,
        now: datetime,
        where: QueueFilter,
        after: ListingKey | None = None,
        examine: int | None = None,
    ) -> IdPage:
        """The ids :meth:`select_ids` lists for ``where`` after ``after`` on, with where the
        last of them stands (its ``created_at`` and ``seq``); with ``examine``, from no
        more than that many messages, in one statement (``select_window``). A place whose
        time is no datetime (SQLite's) is refused; the memory store's is of this store's
        kind and taken as a place in this store's order."""
        params = _filter_params(now, where)
        if examine is not None:
            params["examine"] = check_examine(examine)
        if after is None:
            params["after_created"] = params["after_seq"] = None
        elif isinstance(after.created, datetime) and type(after.seq) is int:
            params["after_created"], params["after_seq"] = after.created, after.seq
        else:
            raise foreign_place(after)
        if examine is not None:
            return _window(self._fetch("select_window", params), where.limit, examine)
        found = self._fetch(_listing("select_ids", where, params), params)
        last = ListingKey(found[-1][1], int(found[-1][2])) if found else None
        return IdPage(ids=[row[0] for row in found], last=last)

    def recent(self, limit: int = 20) -> list[MessageStatus]:
        """The ``limit`` most recently enqueued messages, newest first."""
        params = {
            "now": datetime.now(UTC),
            "held": None,
            "created_before": None,
            "domain": None,
            "state": None,
            "limit": row_limit(limit),
            "tag": None,
            "states": None,
        }
        return _listed(self._fetch_dicts("query", params))

    def next_due(self, *, now: datetime) -> datetime | None:
        """When the earliest pending, unheld recipient becomes due (lease expiry counts).
        Recipients without a due time (a row changed by hand) are made due now."""
        due, undated, ended = self._fetch("next_due", {"now": now})[0]
        if ended:
            # A timed suspension has ended, its recipients still aside: back, then asked.
            self._end_ended(now)
            due, undated, _ = self._fetch("next_due", {"now": now})[0]
        if undated and self._date_undated(now):
            return now
        return cast("datetime | None", due)

    def _date_undated(self, now: datetime) -> bool:
        """Make the pending recipients without a due time due at ``now``
        (:func:`~mailstrom.stores.row_checks.made_due`)."""

        def update() -> int:
            with self._translating("date_undated"), self._pool.connection() as conn:
                changed: int = conn.execute(self._queries["date_undated"], {"now": now}).rowcount
            return changed

        return made_due(update, log)

    def stats(self) -> QueueStats:
        """Counts of recipients by state and of pending recipients by domain."""
        by_state = dict.fromkeys(RecipientState, 0)
        by_domain: dict[str, int] = {}
        messages = held = 0
        for kind, key, n in self._fetch("stats", {}):
            if kind == "state":
                known = counted_state(key, n, log)
                if known is None:
                    continue
                by_state[known] = int(n)
            elif kind == "domain":
                by_domain[key] = int(n)
            elif kind == "messages":
                messages = int(n)
            else:
                held = int(n)
        return QueueStats(
            by_state=by_state, pending_by_domain=by_domain, messages=messages, held=held
        )

    # --- operator actions -------------------------------------------------------------

    def retry(self, message_id: str, *, now: datetime) -> int:
        """Make the message's pending recipients due at ``now``; returns how many."""
        if not comparable(message_id):
            raise UnknownMessage(message_id)
        found, changed, _ = self._fetch("retry", {"id": message_id, "now": now})[0]
        if not found:
            raise UnknownMessage(message_id)
        return int(changed)

    def retry_deferred(self, *, now: datetime) -> int:
        """Make every DEFERRED recipient due at ``now``; returns how many. They are
        walked by message, :data:`PURGE_SPAN` messages (by seq) per statement, each its
        own transaction, through the index of recipients by state (not every message
        kept: a walk of the messages read the finished ones too). One UPDATE of every
        deferred recipient ran for seconds and, under a server's ``statement_timeout``,
        was cancelled and rolled back whole on every run. A failure keeps the spans
        before it; the call repeated makes them due again with the rest."""
        changed, after = 0, 0
        params: dict[str, Any] = {"now": now, "limit": PURGE_SPAN}
        while True:
            [(last, seen, n, _)] = self._fetch("retry_deferred_span", {**params, "after": after})
            changed += int(n)
            if last is None or int(seen) < PURGE_SPAN:
                return changed
            after = int(last)

    def cancel(self, message_id: str, *, now: datetime) -> int:
        """Fail the message's pending recipients with the reason "cancelled"."""
        if not comparable(message_id):
            raise UnknownMessage(message_id)
        params = {"id": message_id, "now": now, "events": self._events}
        found, _, changed, told = self._cancelling("cancel", params, None)
        if not found:
            raise UnknownMessage(message_id)
        self._told_cancelled(told)
        return int(changed)

    def set_held(self, message_id: str, held: bool) -> None:
        """Hold (not leased) or release a message."""
        if not comparable(message_id):
            raise UnknownMessage(message_id)
        found, _, told = self._hold("set_held", {"id": message_id, "held": held}, [message_id])
        if not found:
            raise UnknownMessage(message_id)
        self._told_cancelled(told)

    def _hold(self, name: str, params: dict[str, Any], ids: Sequence[str]) -> tuple[Any, ...]:
        """The row of ``set_held`` or ``hold_many``; a release first locks the suspensions
        of its destinations, in the same transaction (:func:`.aside.lock_for_release`)."""
        return self._messages_first(name, params, ids, release=not params["held"])

    def _cancelling(
        self, name: str, params: dict[str, Any], ids: Sequence[str] | None
    ) -> tuple[Any, ...]:
        """The first row of the cancel query ``name`` but its last two columns (the
        recipients it cancelled), run after locking the messages ``ids`` (as
        :meth:`_messages_first`; None: ``cancel``, which locks its own), with an outbox
        event for each recipient cancelled when events are on, in the same transaction:
        a listener following a recipient sees its end."""
        with self._translating(name), self._pool.connection() as conn, conn.transaction():
            if ids is not None:
                conn.execute(
                    self._queries["lock_messages"], {"message_ids": sorted(ids), "pending": True}
                )
            row: tuple[Any, ...] = conn.execute(self._queries[name], params).fetchall()[0]
            *counts, message_ids, addresses = row
            if message_ids:
                conn.execute(
                    self._queries["append_cancel_events"],
                    {"message_ids": message_ids, "addresses": addresses},
                )
        return tuple(counts)

    def _messages_first(
        self, name: str, params: dict[str, Any], ids: Sequence[str], *, release: bool = False
    ) -> tuple[Any, ...]:
        """The first row of query ``name``, run after locking those of the messages ``ids``
        with a pending recipient in id order (``lock_messages``), in one transaction:
        set_held's statement locked the recipients first, and cancel_many's the messages
        in the order of their rows."""
        with self._translating(name), self._pool.connection() as conn, conn.transaction():
            if release:
                aside.lock_for_release(conn, self._queries, ids)
            conn.execute(
                self._queries["lock_messages"], {"message_ids": sorted(ids), "pending": True}
            )
            row: tuple[Any, ...] = conn.execute(self._queries[name], params).fetchall()[0]
        return row

    def purge(self, *, finished_before: datetime) -> int:
        """Delete finished messages whose last recipient finished before the cutoff."""
        return self._purge_in_spans("purge", finished_before, None)

    def _purge_in_spans(self, doing: str, before: datetime, state: RecipientState | None) -> int:
        """Delete what :meth:`purge` or :meth:`purge_state` deletes, looking at
        :data:`PURGE_SPAN` messages (in id order) per statement, each its own transaction.
        One DELETE over the whole queue ran for seconds (3.5 s for 200,000 messages, and
        on), held back vacuum, and under a ``statement_timeout`` (as managed servers set)
        was cancelled and rolled back whole, every time: such a queue was never purged.
        What a span deleted stays deleted when a later one fails: the same call again
        goes on from there."""
        deleted, after = 0, ""
        params: dict[str, Any] = {
            "finished_before": before,
            "state": None if state is None else state.value,
            "limit": PURGE_SPAN,
        }
        while True:
            with self._translating(doing), self._pool.connection() as conn:
                query = self._queries["purge_span"]
                [(last, seen, gone)] = conn.execute(query, {**params, "after": after}).fetchall()
            deleted += int(gone)
            if last is None or int(seen) < PURGE_SPAN:
                return deleted
            after = str(last)

    # --- the event outbox -------------------------------------------------------------

    def enable_events(self) -> None:
        """Record results into the outbox too, from now on (same transaction)."""
        self._events = True

    def lease_events(self, *, now: datetime, limit: int, lease_for: timedelta) -> EventBatch | None:
        """Lease up to ``limit`` unacknowledged, unleased events, oldest first."""
        if row_limit(limit) == 0:
            return None
        token = uuid.uuid4().hex
        expires_at = after(now, lease_for)
        params = {"now": now, "limit": limit, "token": token, "expires_at": expires_at}
        while True:
            found = self._fetch_side("lease_events", params)
            if not found:
                return None
            events, unreadable = readable_events(found, rows.event_from_row, EVENT_SKIPPED)
            if unreadable:
                # Marked sent so that the events after them still go (see side_rows).
                self._fetch("skip_events", {"ids": unreadable, "token": token, "now": now})
            if events:
                return EventBatch(token=token, expires_at=expires_at, events=tuple(events))

    def ack_events(self, batch: EventBatch, *, now: datetime) -> int:
        """Mark the batch's events sent (those it still holds)."""
        ids = [event.id for event in batch.events]
        [(count,)] = self._fetch("ack_events", {"token": batch.token, "ids": ids, "now": now})
        return int(count)

    def release_events(self, batch: EventBatch) -> None:
        """Give the batch's unacknowledged events back at once."""
        ids = [event.id for event in batch.events]
        self._fetch("release_events", {"token": batch.token, "ids": ids})

    def read_events(self, *, after: int = 0, limit: int = 100) -> list[DeliveryEvent]:
        """Events with an id above ``after``, oldest first."""

        def fetch(above: int, count: int) -> list[tuple[Any, ...]]:
            return self._fetch_side("read_events", {"after": above, "limit": count})

        return read_events_past_unreadable(fetch, rows.event_from_row, after=after, limit=limit)

    def last_event_id(self) -> int:
        """The highest event id so far (0 when none)."""
        [(last,)] = self._fetch("last_event_id", {})
        return int(last)

    def unsent_events(self) -> int:
        """How many events are not acknowledged yet (the events_unsent index)."""
        [(count,)] = self._fetch("unsent_events", {})
        return int(count)

    def prune_events(self, *, sent_before: datetime, unsent_before: datetime | None = None) -> int:
        """Delete events acknowledged before ``sent_before`` (and, given ``unsent_before``,
        unacknowledged ones attempted before it), walking the table :data:`EVENT_SPAN`
        events (by id) per statement, each its own transaction: one DELETE of them all
        took 0.6 s a million and, under a server's ``statement_timeout``, was cancelled
        and rolled back whole on every run, so the table only grew. What a span deleted
        stays deleted when a later one fails; the call repeated deletes the rest."""
        pruned, after = 0, 0
        params: dict[str, Any] = {
            "sent_before": sent_before,
            "unsent_before": unsent_before,
            "limit": EVENT_SPAN,
        }
        while True:
            [(last, seen, gone)] = self._fetch("prune_events_span", {**params, "after": after})
            pruned += int(gone)
            if last is None or int(seen) < EVENT_SPAN:
                return pruned
            after = int(last)

    # --- MTA-STS policies and TLS session counters (schema version 9) -------------------

    def mta_sts_policy(self, domain: str) -> CachedPolicy | None:
        """The cached MTA-STS policy of ``domain`` (expired or not), or None."""
        if not comparable(domain):
            return None
        found = self._fetch_side("mta_sts_policy", {"domain": domain.lower()})
        return tls_rows.policy_from_row(found[0]) if found else None

    def save_mta_sts_policy(self, cached: CachedPolicy) -> None:
        """Cache ``cached`` for its domain, replacing what was there."""
        domain, policy_id, mode, mx, max_age, text = tls_rows.policy_params(cached)
        self._fetch(
            "save_mta_sts_policy",
            {
                "domain": domain,
                "policy_id": policy_id,
                "mode": mode,
                "mx": mx,
                "max_age": max_age,
                "policy_text": text,
                "fetched_at": cached.fetched_at,
                "expires_at": cached.expires_at,
            },
        )

    def prune_mta_sts_policies(self, *, expired_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` policies expired at or before ``expired_before`` in one
        statement (rows another session holds are left for the next call); how many."""
        return self._prune("prune_mta_sts_policies", expired_before, limit)

    def add_tls_sessions(self, sessions: Sequence[TLSSessions]) -> None:
        """Add ``sessions`` to the day's counters, in one transaction, in key order: a
        counter's row waits for a concurrent add of it to commit, and two workers adding
        the same counters in the orders they met them deadlocked."""
        if not sessions:
            return
        params = [tls_rows.session_params(s) for s in sorted(sessions, key=TLSSessions.key)]
        with (
            self._translating("add_tls_sessions"),
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            cur.executemany(self._queries["add_tls_sessions"], params)

    def tls_sessions(self, day: date) -> list[TLSSessions]:
        """Every counter of ``day``."""
        found = self._fetch("tls_sessions", {"day": day})
        return [s for row in found if (s := tls_rows.session_from_row(row)) is not None]

    def prune_tls_sessions(self, *, before: date) -> int:
        """Delete the counters of days before ``before``; returns how many."""
        [(count,)] = self._fetch("prune_tls_sessions", {"before": before})
        return int(count)

    def claim_tls_report(self, key: str, *, now: datetime, until: datetime) -> bool:
        """Take ``key`` until ``until`` unless another run holds it past ``now`` (schema
        version 18)."""
        check_report_key(key)
        now, until = aware_utc(now, "now"), kept_time(until, "until")
        params = {"key": key, "now": now, "until": until}
        return bool(self._fetch("claim_tls_report", params))

    def hold_tls_report(self, key: str, *, until: datetime) -> None:
        """Hold ``key`` until ``until``."""
        check_report_key(key)
        until = kept_time(until, "until")
        self._fetch_none("hold_tls_report", {"key": key, "until": until})

    # --- remembered broken TLS ----------------------------------------------------------

    def note_tls_broken(self, host: str, *, until: datetime, reason: str, now: datetime) -> None:
        """Remember ``host``'s broken TLS until ``until`` (the later of two is kept)."""
        check_tls_host(host)
        until = kept_time(until, "until")
        params = {"host": host, "until": until, "reason": storable_text(reason), "now": now}
        self._fetch("note_tls_broken", params)

    def tls_broken(self, *, now: datetime, limit: int = MAX_TLS_BROKEN) -> dict[str, datetime]:
        """Hosts whose TLS is remembered broken at ``now``; expired entries are dropped."""
        # A negative limit is none, as in every store (LIMIT -1 is an error here).
        found = self._fetch("tls_broken", {"now": now, "limit": row_limit(limit)})
        known = {host: broken_until(host, until) for host, until in found}
        return {host: until for host, until in known.items() if until is not None}

    # --- wake-ups and lifetime --------------------------------------------------------

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` from a listener thread on every NOTIFY from any process.

        LISTEN is in place when this returns, so work committed afterwards is never
        missed; or, when the server cannot be reached just then, the listener thread
        keeps trying and calls ``callback`` once it listens. Returns a function that
        stops this watcher (idempotent).
        """
        return self._listen(callback, cancels=False)

    def watch_cancels(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` from a listener thread when leased recipients are cancelled
        by any process (a NOTIFY whose payload is ``cancelled``)."""
        return self._listen(callback, cancels=True)

    def _listen(self, callback: Callable[[], None], *, cancels: bool) -> Callable[[], None]:
        watchers = self._cancel_watchers if cancels else self._watchers
        with self._lock:
            if self._closed:
                raise StoreError("PostgreSQL store is closed")
            if self._listener is None:
                listener = Listener(self._conninfo, self._heard, lock_bound=self._lock_bound)
                listener.start()  # LISTEN in place, or on its way (or StoreError)
                self._listener = listener
            remove = watchers.add(callback)
            self._watching += 1
        removed = False

        def unwatch() -> None:
            nonlocal removed
            with self._lock:
                if removed:
                    return
                removed = True
                remove()
                self._watching -= 1
                idle = self._listener if self._watching == 0 else None
                if idle is not None:
                    self._listener = None
            if idle is not None:
                # Outside the lock: stop() waits for the thread, whose callback may be
                # calling watch().
                idle.stop()

        return unwatch

    def _heard(self, payload: str | None) -> None:
        """A NOTIFY on the work channel (None: the listener reconnected, and any may have
        been lost). Every one may mean work for ``watch``, as it always did; a cancel's,
        or a reconnect, is for ``watch_cancels`` too."""
        self._watchers.notify()
        if payload is None or payload == CANCELLED:
            self._cancel_watchers.notify()

    def _told_cancelled(self, told: str | None) -> None:
        """A write that NOTIFYed ``cancelled`` (``told`` not None: leased recipients were
        cancelled or held) tells this object's ``watch_cancels`` callbacks too, before it
        returns, as the memory and SQLite stores do. Left to the NOTIFY, which comes back
        through the listener thread, a worker of this process went on starting
        transactions after ``cancel()`` had returned, the cancelled mail among them."""
        if told is not None:
            self._cancel_watchers.notify()

    def close(self) -> None:
        """Stop every watcher thread and close the pool. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
        self._notifier.close()
        self._stop_holders()
        self._pools.close()

    def _stop_holders(self) -> None:
        """Mark this store's holders stopped (see :mod:`.holders`), best effort and
        briefly: a server that cannot be reached must not hold up the close, and the
        holders are then judged dead after ``dead_after`` instead. Briefly for the
        statement too: it waited for a lock on ``lease_holders`` (a migration's ALTER
        TABLE, an operator's LOCK TABLE) as long as ``lock_timeout`` says, 30 s by
        default and for ever with ``lock_timeout=0``, and a worker asked to stop hung."""
        holders = self._beats.own()
        if not holders:
            return
        brief = f"{round(STOP_WAIT * 1000)}ms"
        try:
            with (
                self._translating("stop_holders"),
                self._pool.connection(timeout=STOP_WAIT) as conn,
                conn.transaction(),
            ):
                conn.execute(
                    "SELECT set_config('lock_timeout', %(brief)s, true),"
                    " set_config('statement_timeout', %(brief)s, true)",
                    {"brief": brief},
                )
                conn.execute(self._queries["stop_holders"], {"holders": holders})
        except (StoreError, psycopg.Error, PoolTimeout) as exc:
            log.debug("could not mark lease holders %s stopped: %s", holders, exc)

    # --- operator tools (schema version 10) -------------------------------------------

    def resolve_id(self, prefix: str) -> str:
        """The one message id starting with ``prefix`` (a range on the primary key)."""
        text = normalize_prefix(prefix)
        found = [
            row[0]
            for row in self._fetch(
                "ids_with_prefix",
                {"prefix": text, "upper": prefix_upper_bound(text), "limit": MAX_CANDIDATES + 1},
            )
        ]
        if text in found:
            return text
        return pick_one(prefix, found)

    def count(self, *, now: datetime, where: QueueFilter, cap: int) -> int:
        """How many messages match ``where``, reading at most ``cap``."""
        now = aware_utc(now, "now")  # ages are reckoned from it: a naive one has none
        states = effective_states(where.state, where.states)
        pending = states == PENDING_STATES
        params: dict[str, object] = {
            "held": where.held,
            "created_before": None if where.older_than is None else before(now, where.older_than),
            "domain": None if where.domain is None else where.domain.lower(),
            "pending": pending,
            "states": None if states is None or pending else sorted(s.value for s in states),
            "tag": where.tag,
            "cap": row_limit(cap, "cap"),  # past a bigint: InvalidArgument, not refused
        }
        [(n,)] = self._fetch(_listing("count", where, params), params)
        return int(n)

    def _in_spans(
        self, ids: list[str], run: Callable[[list[str]], tuple[Any, ...]]
    ) -> Iterator[tuple[Any, ...]]:
        """The row ``run`` returns for each :data:`PURGE_SPAN` of ``ids`` in turn, each
        its own transaction (as SQLite's ``_in_batches``): one statement over the 100,000
        a command lists ran past a server's ``statement_timeout`` and was rolled back
        whole, on every run. Each message is changed whole in one span; a failure leaves
        the spans before it changed, and the same call again changes the rest."""
        for start in range(0, len(ids), PURGE_SPAN):
            yield run(ids[start : start + PURGE_SPAN])

    def retry_many(self, message_ids: Sequence[str], *, now: datetime) -> int:
        """Make the listed messages' pending recipients due at ``now`` (in spans:
        :meth:`_in_spans`)."""
        changed = 0
        for n, _ in self._in_spans(
            listed_ids(message_ids),
            lambda span: self._fetch("retry_many", {"ids": span, "now": now})[0],
        ):
            changed += int(n)
        return changed

    def cancel_many(self, message_ids: Sequence[str], *, now: datetime) -> int:
        """Fail the listed messages' pending recipients as "cancelled" (in spans:
        :meth:`_in_spans`). This object's ``watch_cancels`` callbacks are told of the
        spans that told, even when a later one fails: those cancels are committed."""
        changed, told = 0, None
        try:
            for _, n, span_told in self._in_spans(
                listed_ids(message_ids),
                lambda span: self._cancelling(
                    "cancel_many", {"ids": span, "now": now, "events": self._events}, span
                ),
            ):
                changed += int(n)
                # '' (a NOTIFY sent) is falsy: `told or span_told` kept only the last
                # span's answer, and a cancel in an earlier span was not told here.
                told = span_told if span_told is not None else told
        finally:
            self._told_cancelled(told)
        return changed

    def hold_many(self, message_ids: Sequence[str], held: bool) -> int:
        """Hold or release the listed messages (in spans: :meth:`_in_spans`); returns
        how many changed. Told as :meth:`cancel_many` tells."""
        changed, told = 0, None
        try:
            for n, _, span_told in self._in_spans(
                listed_ids(message_ids),
                lambda span: self._hold("hold_many", {"ids": span, "held": held}, span),
            ):
                changed += int(n)
                # '' (a NOTIFY sent) is falsy: `told or span_told` kept only the last
                # span's answer, and a cancel in an earlier span was not told here.
                told = span_told if span_told is not None else told
        finally:
            self._told_cancelled(told)
        return changed

    def purge_many(
        self,
        message_ids: Sequence[str],
        *,
        finished_before: datetime | None = None,
        state: RecipientState | None = None,
    ) -> int:
        """Delete the listed messages that are final (finished before the cutoff, in
        ``state``), :data:`PURGE_SPAN` per statement, each its own transaction: the
        100,000 a command lists in one DELETE were cancelled whole under a server's
        ``statement_timeout`` on every run, as :meth:`purge` was. A failure keeps what
        was deleted before it; the call repeated deletes the rest."""
        params: dict[str, Any] = {
            "finished_before": finished_before,
            "state": None if state is None else state.value,
        }
        deleted = 0
        for (n,) in self._in_spans(
            listed_ids(message_ids),
            lambda span: self._fetch("purge_many", {**params, "ids": span})[0],
        ):
            deleted += int(n)
        return deleted

    def purge_state(self, *, finished_before: datetime, state: RecipientState) -> int:
        """Delete finished messages in ``state`` finished before the cutoff (in spans, as
        :meth:`purge`)."""
        return self._purge_in_spans("purge_state", finished_before, state)

    def shape(self, *, now: datetime, edges: Sequence[timedelta]) -> list[ShapeRow]:
        """Pending recipients per domain and message age, in one aggregate query."""
        seconds = [edge.total_seconds() for edge in age_edges(edges)]
        found = self._fetch("shape", {"now": now, "edges": seconds})
        counts = {(domain, int(bucket)): int(n) for domain, bucket, n in found}
        return shape_rows(counts, len(edges) + 1)

    def message_data(self, message_id: str) -> bytes:
        """The message as stored."""
        if not comparable(message_id):
            raise UnknownMessage(message_id)
        found = self._fetch("message_data", {"id": message_id})
        if not found:
            raise UnknownMessage(message_id)
        return bytes(found[0][0])

    def suspend(self, domain: str, *, now: datetime, until: datetime | None = None) -> None:
        """Stop delivery to ``domain`` until ``until`` or resume; a worker that leased
        some of its recipients is told (NOTIFY), as of a cancel."""
        until = check_suspension(domain, now, until)
        [(_, _, told)] = self._fetch("suspend", {"domain": domain, "now": now, "until": until})
        self._told_cancelled(told)
        if until is not None:
            self._ends |= {until}

    def resume(self, domain: str, *, now: datetime) -> bool:
        """End the suspension of ``domain``; False when none was in force at ``now``;
        wakes workers (NOTIFY)."""
        if not comparable(domain):
            return False
        with self._translating("resume"), self._pool.connection() as conn, conn.transaction():
            return aside.resume(conn, self._queries, domain, now)

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        """The suspensions in force at ``now``, by domain."""
        return [
            Suspension(domain=row["domain"], suspended_at=row["suspended_at"], until=row["until"])
            for row in self._fetch_dicts("suspensions", {"now": now})
        ]

    # --- traffic shaping --------------------------------------------------------------

    def throttle(
        self,
        destination: str,
        *,
        now: datetime,
        reply: str,
        first: timedelta,
        maximum: timedelta,
        recipients: Sequence[tuple[str, str]] = (),
    ) -> DestinationThrottle:
        """Pause ``destination`` (see :class:`Store`): one transaction under an advisory
        lock on the destination, so workers reporting at once count one throttle."""
        now = check_pause_times(destination, now, first, maximum)
        reply = pause_reply(reply)
        recipients = named_recipients(recipients)
        q = self._queries
        with (
            self._translating("throttle"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            if recipients:
                conn.execute(
                    q["mark_throttled"],
                    {
                        "destination": destination,
                        "message_ids": [m for m, _ in recipients],
                        "addresses": [a for _, a in recipients],
                    },
                )
            conn.execute(q["shaping_lock"], {"key": destination})
            before = forget_before(now, maximum, _FORGET_THROTTLES)
            conn.execute(q["forget_throttles"], {"before": before})
            with rows.readable_cursor(conn) as cur:
                row = cur.execute(q["get_throttle"], {"destination": destination}).fetchone()
            previous = _throttle(row) if row is not None else None
            pause = next_pause(
                previous,
                destination=destination,
                now=now,
                first=first,
                maximum=maximum,
                reply=reply,
            )
            if pause is not previous:
                conn.execute(
                    q["put_throttle"],
                    {
                        "destination": destination,
                        "until": pause.until,
                        "strikes": pause.strikes,
                        "reply": pause.reply,
                        "since": pause.since,
                    },
                )
        return pause

    def throttles(self, *, now: datetime) -> list[DestinationThrottle]:
        """The destinations paused at ``now``, soonest end first."""
        found = self._fetch_side("throttles", {"now": now})
        return [pause for row in found if (pause := _throttle(row)) is not None]

    def postpone(
        self, items: Sequence[WorkItem], *, until: datetime, destination: str | None = None
    ) -> int:
        """Give back the items' still-held recipients, due at ``until``, no attempt counted."""
        triples = [(i.message_id, r.address, i.lease_token) for i in items for r in i.recipients]
        if not triples:
            return 0
        until = kept_time(until, "until")
        check_destination(destination)
        [(count,)] = self._fetch(
            "postpone",
            {
                "until": until,
                "destination": destination,
                "message_ids": [m for m, _, _ in triples],
                "addresses": [a for _, a, _ in triples],
                "tokens": [t for _, _, t in triples],
            },
        )
        return int(count)

    def take_tokens(
        self, buckets: Sequence[TokenBucket], *, want: int, now: datetime
    ) -> TokenGrant:
        """Take up to ``want`` tokens from every bucket at once: one transaction holding an
        advisory lock per bucket (taken in key order, so two workers never deadlock)."""
        # A naive one less a bucket's time was a TypeError; one past the times a store
        # keeps stamped the bucket then, and it never refilled at the real time.
        now = kept_time(now, "now")
        q = self._queries
        keys = sorted({b.key for b in buckets})
        with (
            self._translating("take_tokens"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            for key in keys:
                conn.execute(q["shaping_lock"], {"key": key})
            with rows.readable_cursor(conn) as cur:
                found = cur.execute(q["get_buckets"], {"keys": keys}).fetchall()
            states = {
                key: state
                for key, tokens, at in found
                if (state := bucket_state(key, tokens, at)) is not None
            }
            grant, new = take_tokens(buckets, states, want=want, now=now)
            conn.execute(
                q["put_buckets"],
                {
                    "keys": list(new),
                    "tokens": [s.tokens for s in new.values()],
                    "ats": [s.at for s in new.values()],
                },
            )
        return grant

    # --- the suppression list -----------------------------------------------------------

    def suppress(self, entries: Sequence[Suppression], *, keep_longer: bool = False) -> int:
        """Add or replace entries in one transaction, one statement per
        :data:`SUPPRESS_CHUNK` of them, in target order; returns how many were given.
        With ``keep_longer`` (see Store.suppress) the statement leaves a row that lasts as
        long as it is, decided on the row it locked (so on the latest committed entry),
        and of duplicates in ``entries`` the one that stands against the others is
        written (:func:`~mailstrom.stores.postgres.rows.longest_per_target`).

        An entry's row waits for a concurrent write of its target to commit: written in
        the callers' orders, two imports sharing targets locked them in different orders,
        statement by statement, and deadlocked. Sorted (stably: the newest of duplicates
        still comes last, and wins), every write locks in the order of the primary key."""
        if not entries:
            return 0
        check_suppressions(entries)
        given = len(entries)
        if keep_longer:
            entries = rows.longest_per_target(entries)
        entries = sorted(entries, key=lambda e: e.target)
        with (
            self._translating("suppress"),
            self._pool.connection() as conn,
            conn.transaction(),  # the pool's connections autocommit each statement
        ):
            for start in range(0, len(entries), SUPPRESS_CHUNK):
                chunk = entries[start : start + SUPPRESS_CHUNK]
                conn.execute(
                    self._queries["suppress"],
                    {**rows.suppression_arrays(chunk), "keep_longer": keep_longer},
                )
        return given

    def unsuppress(self, targets: Sequence[str]) -> int:
        """Remove the entries of ``targets``; returns how many existed."""
        targets = [t for t in targets if comparable(t)]
        if not targets:
            return 0
        [(count,)] = self._fetch("unsuppress", {"targets": list(set(targets))})
        return int(count)

    def suppressions_for(self, targets: Sequence[str], *, now: datetime) -> dict[str, Suppression]:
        """The entries of ``targets`` that apply at ``now`` (one primary-key lookup)."""
        targets = [t for t in targets if comparable(t)]
        if not targets:
            return {}
        found = self._fetch("suppressions_for", {"targets": list(targets), "now": now})
        return {row[0]: rows.suppression_from_row(row) for row in found}

    def list_suppressions(
        self, *, now: datetime | None = None, after: str = "", limit: int = 100
    ) -> list[Suppression]:
        """Entries after ``after`` in target order (only active ones with ``now``)."""
        check_key(after, "after", limit=MAX_TARGET)
        found = self._fetch(
            "list_suppressions", {"after": after, "now": now, "limit": row_limit(limit)}
        )
        return [rows.suppression_from_row(row) for row in found]

    def prune_suppressions(self, *, expired_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` entries expired at or before ``expired_before`` in one
        statement (rows another session holds are left for the next call); how many."""
        return self._prune("prune_suppressions", expired_before, limit)

    def _prune(self, query: str, expired_before: datetime, limit: int) -> int:
        """Run ``query``, a prune of rows expired at or before ``expired_before``, at
        most ``limit`` of them; how many it deleted."""
        params = {
            "expired_before": aware_utc(expired_before, "expired_before"),
            "limit": row_limit(limit),
        }
        [(count,)] = self._fetch(query, params)
        return int(count)

    def fail_late(self, message_id: str, address: str, attempt: Attempt) -> bool:
        """Mark a recipient FAILED after the fact (see Store.fail_late); one transaction
        (two statements with events enabled)."""
        kept_time(attempt.at, "attempt.at")  # as a result's: SQLite could not read it back
        if not comparable(message_id):
            raise UnknownMessage(message_id)
        if not comparable(address):
            self.status(message_id)  # UnknownMessage for an unknown message
            return False  # a known message has no such recipient
        a = bounded_attempt(attempt)
        reply = a.reply
        params = {
            "message_id": message_id,
            "address": address,
            "at": a.at,
            "outcome": a.outcome.value,
            "duration": a.duration,
            "mx_host": a.mx_host,
            "ip": a.ip,
            "port": a.port,
            "tls_version": a.tls_version,
            "tls_cipher": a.tls_cipher,
            "reply_code": reply.code if reply else None,
            "reply_enhanced": reply.enhanced if reply else None,
            "reply_text": reply.text if reply else None,
            "error": a.error,
            "uncertain": a.uncertain,
            "reason_class": a.reason_class.value if a.reason_class is not None else None,
            "tls_policy": a.tls_policy,
            "max_history": MAX_HISTORY,
        }
        with (
            self._translating("fail_late"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            row = conn.execute(self._queries["fail_late"], params).fetchone()
            found, changed = row if row is not None else (0, 0)
            if changed and self._events:
                conn.execute(
                    self._queries["append_events"],
                    {"message_ids": [message_id], "addresses": [address]},
                )
        if not found:
            raise UnknownMessage(message_id)
        return bool(changed)

    def verp_key(self) -> bytes:
        """The store's VERP key (see Store.verp_key), made on first use; kept once read,
        since it never changes."""
        if self._verp_key is None:
            # Twice: a key another process inserts at the same moment is seen by neither
            # half of the first statement (see the query), and by the second.
            for _ in range(2):
                found = self._fetch("verp_key", {"key": secrets.token_bytes(VERP_KEY_SIZE)})
                if found:
                    self._verp_key = bytes(found[0][0])
                    break
            else:
                raise StoreError("the store's VERP key could not be read")
        return self._verp_key

    def recipients_by_address(
        self, message_id: str, addresses: Sequence[str] | None
    ) -> RecipientsFound:
        """The recipients of ``message_id`` named by ``addresses`` (see
        Store.recipients_by_address), without history: one statement, which seeks each
        name folded, in the key and in recipients_folded (a name found as written may
        have other cases stored beside it, which the contract returns too)."""
        if not comparable(message_id):
            raise UnknownMessage(message_id)
        if addresses is None:
            return self._recipients_found(message_id, None)
        wanted = {ascii_lower(a) for a in addresses if comparable(a)}
        return self._recipients_found(message_id, sorted(wanted))

    def _recipients_found(self, message_id: str, addresses: list[str] | None) -> RecipientsFound:
        read = self._fetch_dicts(
            "recipients_by_address", {"id": message_id, "addresses": addresses}
        )
        found = rows.messages_from_rows(read, strict=True)
        if not found:
            raise UnknownMessage(message_id)
        return RecipientsFound(message=found[0], single=bool(read[0]["r_single"]))

    def message_ids_for_header(self, header_message_id: str, *, limit: int = 10) -> list[str]:
        """Ids of the messages with this Message-ID header, newest first (indexed)."""
        if not comparable(header_message_id):
            return []
        found = self._fetch(
            "message_ids_for_header",
            {"header_message_id": header_message_id, "limit": row_limit(limit)},
        )
        return [row[0] for row in found]

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_VISITS = DESTINATIONS * 4
"""Destinations a fair lease's walk looks at per lane, those with nothing due included."""


def _fair_params(fair: Fairness) -> dict[str, Any]:
    """The parameters queries.sql's _fair_due binds for ``fair``."""
    turns = sorted(fair.turns.items())
    return {
        "busy": sorted(fair.busy),
        "share": fair.share,
        "turn_lanes": [lane for lane, _ in turns],
        "turn_after": [after for _, after in turns],
        "destinations": DESTINATIONS,
        "visits": _VISITS,
    }


def _advance_turns(fair: Fairness, found: Sequence[rows.LeaseRow]) -> None:
    """Move each lane's turn (:attr:`Fairness.turns`) to the last domain a fair lease
    took in it, in the walk's order from where the turn stood: the next lease's walk
    starts after it. Advisory: the statement does not say where its walk stopped, so a
    walk that took nothing leaves the turn where it was, and the domains the first read
    took count as reached (the database's collation may also order names otherwise)."""
    taken: dict[str, set[str]] = {}
    for row in found:
        taken.setdefault(row.lane, set()).add(row.domain)
    for lane, domains in taken.items():
        start = fair.turns.get(lane, "")
        ahead = [domain for domain in domains if domain > start]
        fair.turns[lane] = max(ahead or domains)


_POOL_ERRORS = (PoolTimeout, PoolClosed, TooManyRequests)
"""What the pool raises instead of handing out a connection: no statement was sent."""

SUPPRESS_CHUNK = 10_000
"""Entries per statement of :meth:`PostgresStore.suppress`. An import of a million
entries (``mailstrom suppress import``) in one statement would hold six million-element
arrays, about 200 MB, in this process; in chunks, a few MB, and no slower (a later chunk
replaces an entry of an earlier one, so the newest still wins)."""

PURGE_SPAN = 500
"""Messages one statement of :meth:`PostgresStore.purge` looks at (and deletes at most),
and of ``retry_deferred``, and listed ids one statement of ``purge_many``, ``retry_many``,
``cancel_many`` or ``hold_many`` takes, as SQLite's ``PURGE_BATCH`` and ``BULK_BATCH``: a few
milliseconds each, far inside any ``statement_timeout`` a server sets, and a pending
queue of millions is walked in as many short reads."""

EVENT_SPAN = 5_000
"""Events one statement of :meth:`PostgresStore.prune_events` looks at (and deletes at
most): a few milliseconds, far inside any ``statement_timeout``. An event's delete costs
far less than a message's (0.6 s a million, against 1.7 s for 100,000 messages), so
:data:`PURGE_SPAN` would only multiply round trips."""

_FORGET_THROTTLES = timedelta(days=1)
"""A pause that ended this long ago, and longer ago than the maximum pause, is deleted
(it no longer makes the next one longer: :func:`~mailstrom.policy.throttle.forget_before`)."""


def pauses_by_message(found: Sequence[Sequence[Any]]) -> dict[str, dict[str, DestinationThrottle]]:
    """Message id → address → pause, from the rows of the ``paused_in`` query."""
    paused: dict[str, dict[str, DestinationThrottle]] = {}
    for row in found:
        if (pause := _throttle(row[2:])) is not None:
            paused.setdefault(row[0], {})[row[1]] = pause
    return paused


def _pauses_in(found: Sequence[dict[str, Any]]) -> dict[str, dict[str, DestinationThrottle]]:
    """Message id → address → pause, from the ``t_*`` columns of the rows of the
    ``status`` or ``query`` query (each recipient's first row: ``status`` repeats them on
    every row of its history)."""
    paused: dict[str, dict[str, DestinationThrottle]] = {}
    last: tuple[str, str] | None = None
    for row in found:
        if row["t_destination"] is None or (row["id"], row["address"]) == last:
            continue
        last = row["id"], row["address"]
        pause = pause_of(
            row["t_destination"], row["t_until"], row["t_strikes"], row["t_reply"], row["t_since"]
        )
        if pause is not None:
            paused.setdefault(row["id"], {})[row["address"]] = pause
    return paused


def _listed(found: list[dict[str, Any]]) -> list[MessageStatus]:
    """The messages of the rows of the ``query`` query, each pending recipient with its
    destination's pause, read in the same statement (see :meth:`PostgresStore.status`)."""
    return with_pauses(rows.messages_from_rows(found), _pauses_in(found))


def _throttle(row: Sequence[Any]) -> DestinationThrottle | None:
    """The pause of ``row``; None for one that cannot be read (see side_rows.pause_of)."""
    destination, until, strikes, reply, since = row
    return pause_of(destination, until, strikes, reply, since)

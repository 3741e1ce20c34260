"""What one dashboard page costs on SQLite, counted as work (VM steps), never timed: a page
reads an index range as long as the page, whatever the queue holds."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

from mailstrom.message.prepared import PreparedMessage
from mailstrom.readmodel import (
    MessageSummary,
    PageCursor,
    QueueQuery,
    QueueView,
    Search,
    SortOrder,
    open_read_model,
)
from mailstrom.readmodel import sqlite as sqlite_model
from mailstrom.readmodel.postgres import PostgresReadModel
from mailstrom.readmodel.sqlite import SQLiteReadModel
from mailstrom.status import Attempt, DestinationThrottle, RecipientState, RecipientStatus
from mailstrom.stores import MemoryStore, Store
from mailstrom.stores.postgres import PostgresStore
from mailstrom.stores.sqlite import SQLiteStore
from mailstrom.web import create_app
from mailstrom.web.app import MAX_SHOWN_ATTEMPTS, MAX_SHOWN_THROTTLES, SHOWN_RECIPIENTS
from tests.fixtures.postgres import ThrowawayPostgres
from tests.support.pg_plans import analyzed, rows_touched, statements_run

from ..contract.support import results_for

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
BACKLOG = 10_000
"""Messages of two recipients each: 20,000 pending recipients."""
ALL = QueueQuery(view=QueueView.ALL)


def _messages(start: int, count: int) -> list[PreparedMessage]:
    return [
        PreparedMessage(
            data=b"Subject: x\r\n\r\nx\r\n",
            envelope_from="app@sender.test",
            recipients=(f"a{i}@bulk.test", f"b{i}@bulk.test"),
        )
        for i in range(start, start + count)
    ]


class _Counting(SQLiteReadModel):
    """A read model counting the thousands of VM steps its statements take."""

    steps = 0

    def _connect(self) -> tuple[sqlite3.Connection, bool]:
        conn, pool = super()._connect()

        def step() -> int:
            self.steps += 1
            return 0

        conn.set_progress_handler(step, 1000)
        return conn, pool


class _CountingStore(SQLiteStore):
    """A store counting the thousands of VM steps its statements take."""

    def __init__(self, path: Path) -> None:
        self.steps = 0
        super().__init__(path)

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()

        def step() -> int:
            self.steps += 1
            return 0

        conn.set_progress_handler(step, 1000)
        return conn


def _costs(path: Path, messages: int, query: QueueQuery = ALL) -> tuple[int, int]:
    """(steps of the dashboard's page for ``query``, steps of the store's list of the
    newest 50) with ``messages`` pending messages queued."""
    store = _CountingStore(path)
    model = _Counting(str(path), cache_seconds=0)
    try:
        for start in range(0, messages, 2500):
            store.enqueue_many(_messages(start, min(2500, messages - start)), now=T0)
        newest = store.enqueue(_messages(messages, 1)[0], now=T0 + timedelta(seconds=1))
        page = model.queue_page(query, now=T0)
        assert page.messages[0].id == newest
        page_steps = model.steps
        before = store.steps
        assert store.recent(50)[0].id == newest
        return page_steps, store.steps - before
    finally:
        model.close()
        store.close()


def test_a_page_costs_the_same_whatever_is_pending(tmp_path: Path) -> None:
    """The destination pauses a page (the dashboard's, or the store's list) shows were
    looked up from the index of recipients by state: every pending recipient in the queue
    was read for each page, 100,000 steps at 20,000 recipients, where the page's own take
    a few thousand."""
    small = _costs(tmp_path / "small.db", 100)
    big = _costs(tmp_path / "big.db", BACKLOG)
    assert big[0] <= small[0] + 5, (small, big)
    assert big[1] <= small[1] + 5, (small, big)


@pytest.mark.parametrize("view", [QueueView.PENDING, QueueView.QUEUED])
def test_choosing_a_plan_counts_no_further_than_it_must(
    view: QueueView, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a filter is applied through its index or by walking the messages depends
    only on whether more than SET_LIMIT rows match; every page counted all of them (a
    million index entries for the pending page of a million pending recipients). A count
    that reads one row for any number (a ``count(*)`` inside the bounded count) sent a
    view of a million queued recipients through its index, every one of them read."""
    monkeypatch.setattr(sqlite_model, "SET_LIMIT", 1000)
    query = QueueQuery(view=view)
    just_over = _costs(tmp_path / "small.db", 1000, query)
    big = _costs(tmp_path / "big.db", BACKLOG, query)
    assert big[0] <= just_over[0] + 5, (just_over, big)


def _finish(store: Store, state: RecipientState) -> None:
    """Every recipient of the queue leased and recorded ``state``."""
    while (lease := store.lease(now=T0, limit=1000, lease_for=timedelta(minutes=5))) is not None:
        store.record(results_for(lease, state, at=T0, next_attempt_at=T0 + timedelta(days=1)))


def _view_steps(path: Path, messages: int, view: QueueView, bulk: RecipientState | None) -> int:
    """Steps of the first page of ``view`` (which lists nothing) with ``messages`` messages
    queued and, unless ``bulk`` is None, each recipient recorded so."""
    store = SQLiteStore(path)
    model = _Counting(str(path), cache_seconds=0)
    try:
        for start in range(0, messages, 2500):
            store.enqueue_many(_messages(start, min(2500, messages - start)), now=T0)
        if bulk is not None:
            _finish(store, bulk)
        assert model.queue_page(QueueQuery(view=view), now=T0).messages == ()
        return model.steps
    finally:
        model.close()
        store.close()


@pytest.mark.parametrize(
    ("view", "bulk"),
    [
        (QueueView.DELIVERED, None),
        (QueueView.QUEUED, RecipientState.DEFERRED),
        (QueueView.QUEUED, RecipientState.DELIVERED),
        (QueueView.FAILED, None),
        (QueueView.FAILED, RecipientState.DELIVERED),
    ],
)
def test_a_view_matching_few_messages_is_read_from_an_index(
    tmp_path: Path, view: QueueView, bulk: RecipientState | None
) -> None:
    """The queued, delivered and failed views walked every message of the queue newest
    first and probed each: with nothing delivered or failed yet, or nothing queued or
    failed among deferred or finished mail, a page that lists nothing read all of them."""
    small = _view_steps(tmp_path / "small.db", 100, view, bulk)
    big = _view_steps(tmp_path / "big.db", BACKLOG // 2, view, bulk)
    assert big <= small + 5, (small, big)


def _fifth_failed(store: Store) -> None:
    """Every recipient of the queue leased and recorded: those of every fifth message
    failed, the others delivered."""
    while (lease := store.lease(now=T0, limit=1000, lease_for=timedelta(minutes=5))) is not None:
        failing = [r.address for item in lease.items[::5] for r in item.recipients]
        rest = [r.address for item in lease.items for r in item.recipients]
        store.record(
            results_for(lease, RecipientState.FAILED, at=T0, only=failing)
            + results_for(lease, RecipientState.DELIVERED, at=T0, only=set(rest) - set(failing))
        )


def _failed_page_steps(path: Path, messages: int) -> int:
    store = SQLiteStore(path)
    model = _Counting(str(path), cache_seconds=0)
    try:
        for start in range(0, messages, 2500):
            store.enqueue_many(_messages(start, min(2500, messages - start)), now=T0)
        _fifth_failed(store)
        assert len(model.queue_page(QueueQuery(view=QueueView.FAILED), now=T0).messages) == 50
        return model.steps
    finally:
        model.close()
        store.close()


def test_a_view_matching_many_messages_walks_them(tmp_path: Path) -> None:
    """A view was read from its index whenever at most SET_LIMIT recipients matched,
    every one of them counted, collected and sorted, though walking the queue finds a
    page after a few probes when that many match: with one failed message in five, the
    Failed page took 59,000 VM steps at 5,000 messages against 18,000 at 1,000 (at
    200,000 messages, 3 % failed, 100 ms where the walk takes 10). The index is used
    now when it is the cheaper of the two, and the count goes no further than that
    decision needs."""
    small = _failed_page_steps(tmp_path / "small.db", 1000)
    big = _failed_page_steps(tmp_path / "big.db", 5000)
    assert big <= small + 5, (small, big)


def _page_rows(
    url: str,
    messages: int,
    monkeypatch: pytest.MonkeyPatch,
    query: QueueQuery,
    setup: Callable[[PostgresStore], set[str]],
) -> int:
    """Rows PostgreSQL's plan of ``query``'s page touched, with ``messages`` messages
    queued and then ``setup`` run (which returns the ids the page must list)."""
    with PostgresStore(url, max_size=2) as store:
        for start in range(0, messages, 2500):
            store.enqueue_many(_messages(start, min(2500, messages - start)), now=T0)
        expected = setup(store)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(b"ANALYZE")
    with statements_run(monkeypatch, _a_page) as seen:
        model = PostgresReadModel(url)
        try:
            page = model.queue_page(query, now=T0)
        finally:
            model.close()
    assert {m.id for m in page.messages} == expected
    ((sql, params),) = seen
    return rows_touched(analyzed(url, sql, params)[0]["Plan"])


def _a_page(text: bytes, params: Any) -> bool:
    """The read model's statement of a queue page."""
    return text.startswith(b"SELECT m.id, m.seq")


def _hold_first(held: int) -> Callable[[PostgresStore], set[str]]:
    def setup(store: PostgresStore) -> set[str]:
        listed = store.recent(held)
        assert store.hold_many([s.id for s in listed], True) == held
        return {s.id for s in listed}

    return setup


@pytest.mark.postgres
def test_postgres_reads_the_held_view_from_an_index(
    postgres_server: ThrowawayPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No index had the held flag: the Held view's page read every message of the
    queue to list the few held ones."""
    held = QueueQuery(view=QueueView.HELD)
    small = _page_rows(postgres_server.create_database(), 100, monkeypatch, held, _hold_first(3))
    big = _page_rows(postgres_server.create_database(), BACKLOG, monkeypatch, held, _hold_first(3))
    assert big <= small + 50, (small, big)


def _newest_alone(
    state: RecipientState, rest: RecipientState | None
) -> Callable[[PostgresStore], set[str]]:
    """The newest message's recipients recorded ``state`` (or left queued), every other
    message's ``rest`` (or left queued)."""

    def setup(store: PostgresStore) -> set[str]:
        (newest, *others) = [s.id for s in store.recent(100_000)]
        if state is not RecipientState.QUEUED:
            store.hold_many(others, True)  # out of the leases
            _finish(store, state)
            store.hold_many(others, False)
        if rest is not None:
            store.hold_many([newest], True)
            _finish(store, rest)
            store.hold_many([newest], False)
        return {newest}

    return setup


_FEW = {
    # A few queued among deferred, or among finished mail.
    "queued-among-deferred": (QueueView.QUEUED, RecipientState.QUEUED, RecipientState.DEFERRED),
    "queued-among-delivered": (QueueView.QUEUED, RecipientState.QUEUED, RecipientState.DELIVERED),
    "pending-among-delivered": (
        QueueView.PENDING,
        RecipientState.DEFERRED,
        RecipientState.DELIVERED,
    ),
    # A few deferred among queued mail; a few failed among delivered or queued mail.
    "deferred-among-queued": (QueueView.DEFERRED, RecipientState.DEFERRED, None),
    "failed-among-delivered": (QueueView.FAILED, RecipientState.FAILED, RecipientState.DELIVERED),
    "failed-among-queued": (QueueView.FAILED, RecipientState.FAILED, None),
}


@pytest.mark.postgres
@pytest.mark.parametrize("case", list(_FEW))
def test_postgres_reads_a_view_matching_few_messages_from_an_index(
    postgres_server: ThrowawayPostgres, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """The Queued, Deferred and Failed views walked every message of the queue newest
    first and probed each (or read all of them at once): with one message queued among
    deferred mail, deferred among queued mail or failed among delivered or queued mail,
    the page listing it read the whole queue. Each reads the few from the index of
    recipients by state now, the way the Pending view already could."""
    view, state, rest = _FEW[case]
    query = QueueQuery(view=view)
    small = _page_rows(
        postgres_server.create_database(), 100, monkeypatch, query, _newest_alone(state, rest)
    )
    big = _page_rows(
        postgres_server.create_database(),
        BACKLOG // 2,
        monkeypatch,
        query,
        _newest_alone(state, rest),
    )
    assert big <= small + 50, (small, big)


def _one_at_a_rare_domain(
    state: RecipientState | None,
) -> Callable[[PostgresStore], set[str]]:
    """One message more, to z@rare.test, the queue's only one at that domain; with
    ``state``, every recipient of the queue recorded so."""

    def setup(store: PostgresStore) -> set[str]:
        rare = PreparedMessage(
            data=b"Subject: x\r\n\r\nx\r\n",
            envelope_from="app@sender.test",
            recipients=("z@rare.test",),
        )
        found = store.enqueue(rare, now=T0)
        if state is not None:
            _finish(store, state)
        return {found}

    return setup


_RARE = {
    "all": (QueueQuery(view=QueueView.ALL, domain="rare.test"), None),
    "pending": (QueueQuery(view=QueueView.PENDING, domain="rare.test"), None),
    "searched": (QueueQuery(view=QueueView.ALL, search=Search(domain="rare.test")), None),
    "all-failed": (QueueQuery(view=QueueView.ALL, domain="rare.test"), RecipientState.FAILED),
}


@pytest.mark.postgres
@pytest.mark.parametrize("case", list(_RARE))
def test_postgres_reads_a_domain_with_little_mail_from_its_index(
    postgres_server: ThrowawayPostgres, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A page of the Pending or All view for a domain (the filter or a search) tested its
    recipients in any state, which no index of recipients by domain holds (each holds
    one state's): it walked every message of the queue newest first and probed each,
    10,006 rows at 5,000 messages for the one message at the domain. The domain's
    recipients are now read from those indexes' ranges."""
    query, state = _RARE[case]
    small = _page_rows(
        postgres_server.create_database(), 100, monkeypatch, query, _one_at_a_rare_domain(state)
    )
    big = _page_rows(
        postgres_server.create_database(),
        BACKLOG // 2,
        monkeypatch,
        query,
        _one_at_a_rare_domain(state),
    )
    assert big <= small + 50, (small, big)


_SPREAD = (7, 400, 401, 1200, 1999)
"""The messages a view lists among 2,000, spread so that pages and their cursors fall
between the others."""
_MIXES = {
    QueueView.FAILED: (RecipientState.FAILED, RecipientState.DELIVERED),
    QueueView.QUEUED: (RecipientState.QUEUED, RecipientState.DEFERRED),
    QueueView.DEFERRED: (RecipientState.DEFERRED, None),
}


def _spread_store(kind: str, tmp_path: Path, postgres_server: ThrowawayPostgres) -> Store:
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "spread.db")
    return PostgresStore(postgres_server.create_database(), max_size=2)


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@pytest.mark.parametrize("view", list(_MIXES))
def test_pages_read_from_an_index_keep_the_order_and_the_cursor(
    kind: str,
    view: QueueView,
    tmp_path: Path,
    postgres_server: ThrowawayPostgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A view matching a few messages among many is read from an index and sorted (not
    walked): its pages, two messages each, newest or oldest first, list exactly those,
    in the order of the whole queue, though all of them were queued at one instant
    (the cursor's seq decides); on SQLite the walk's pages (a set too large for the
    index) list them alike."""
    state, rest = _MIXES[view]
    store = _spread_store(kind, tmp_path, postgres_server)
    try:
        ids = store.enqueue_many(_messages(0, 2000), now=T0)
        chosen = [ids[i] for i in _SPREAD]
        others = [mid for mid in ids if mid not in set(chosen)]
        if state is not RecipientState.QUEUED:
            store.hold_many(others, True)
            _finish(store, state)
            store.hold_many(others, False)
        if rest is not None:
            store.hold_many(chosen, True)
            _finish(store, rest)
            store.hold_many(chosen, False)
        if isinstance(store, PostgresStore):
            with psycopg.connect(store.url, autocommit=True) as conn:
                conn.execute(b"ANALYZE")
            model: Any = PostgresReadModel(store.url)
        else:
            model = SQLiteReadModel(str(tmp_path / "spread.db"), cache_seconds=0)
        try:
            for walk in (False, True) if kind == "sqlite" else (False,):
                if walk:
                    monkeypatch.setattr(sqlite_model, "SET_LIMIT", -1)
                for order in SortOrder:
                    expected = chosen if order is SortOrder.OLDEST else chosen[::-1]
                    assert _paged(model, view, order) == expected, (order, walk)
        finally:
            model.close()
    finally:
        store.close()


def _paged(model: Any, view: QueueView, order: SortOrder) -> list[str]:
    """The ids of every page of ``view``, two a page, each from the last one's cursor."""
    seen: list[str] = []
    after: PageCursor | None = None
    while True:
        page = model.queue_page(QueueQuery(view=view, order=order, limit=2, after=after), now=T0)
        seen += [m.id for m in page.messages]
        if page.next is None:
            return seen
        after = PageCursor.decode(page.next.encode())


def _delivered_at_domain_steps(path: Path, messages: int) -> int:
    """Steps of the first Delivered page of bulk.test (which lists nothing) with
    ``messages`` delivered messages elsewhere and as many pending at bulk.test."""
    store = SQLiteStore(path)
    model = _Counting(str(path), cache_seconds=0)
    elsewhere = [
        PreparedMessage(
            data=b"Subject: x\r\n\r\nx\r\n",
            envelope_from="app@sender.test",
            recipients=(f"a{i}@other.test", f"b{i}@other.test"),
        )
        for i in range(messages)
    ]
    try:
        store.enqueue_many(elsewhere, now=T0)
        _finish(store, RecipientState.DELIVERED)
        for start in range(0, messages, 2500):
            store.enqueue_many(_messages(start, min(2500, messages - start)), now=T0)
        query = QueueQuery(view=QueueView.DELIVERED, domain="bulk.test")
        assert model.queue_page(query, now=T0).messages == ()
        return model.steps
    finally:
        model.close()
        store.close()


def test_the_delivered_mail_of_a_busy_domain_is_read_from_an_index(tmp_path: Path) -> None:
    """The Delivered view of a domain counted the domain's recipients in every state to
    choose its plan: a domain with much pending mail and little delivered walked every
    message of the queue newest first and probed each, when the domain's delivered
    recipients (none here) are a range of the (state, domain) index."""
    small = _delivered_at_domain_steps(tmp_path / "small.db", 100)
    big = _delivered_at_domain_steps(tmp_path / "big.db", BACKLOG // 2)
    assert big <= small + 5, (small, big)


def _wide_store(kind: str, tmp_path: Path, postgres_server: ThrowawayPostgres) -> Store:
    if kind == "memory":
        return MemoryStore()
    return _spread_store(kind, tmp_path, postgres_server)


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
def test_a_page_makes_no_status_per_recipient(
    kind: str,
    tmp_path: Path,
    postgres_server: ThrowawayPostgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The queue page read every recipient of every message it listed, though it shows
    one address, a count and one reason per message: a page of 100 messages of 1,000
    recipients each made 100,000 recipient statuses (2.6 s on SQLite, 2.0 s in memory).
    It reads a summary per message now, none of them."""
    store = _wide_store(kind, tmp_path, postgres_server)
    try:
        store.enqueue_many(
            [
                PreparedMessage(
                    data=b"Subject: x\r\n\r\nx\r\n",
                    envelope_from="app@sender.test",
                    recipients=tuple(f"r{j}@d{j % 7}.wide.test" for j in range(1000)),
                )
                for _ in range(100)
            ],
            now=T0,
        )
        model = open_read_model(store, cache_seconds=0)
        made = 0
        make = RecipientStatus.__init__

        def counted(self: RecipientStatus, **fields: Any) -> None:
            nonlocal made
            made += 1
            make(self, **fields)

        monkeypatch.setattr(RecipientStatus, "__init__", counted)
        try:
            page = model.queue_page(QueueQuery(view=QueueView.ALL, limit=100), now=T0)
        finally:
            model.close()
        assert (len(page.messages), made) == (100, 0)
        monkeypatch.undo()
        newest = page.messages[0]
        assert newest == MessageSummary.of(store.status(newest.id))
        assert (newest.recipients, newest.first_recipient) == (1000, "r0@d0.wide.test")
    finally:
        store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
def test_a_message_page_makes_statuses_for_the_recipients_it_lists(
    kind: str,
    tmp_path: Path,
    postgres_server: ThrowawayPostgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page of a message listed every recipient, and a message may have any number:
    one to 1,000 made a status for each of the 1,000 and a page of 819 KB. It reads and
    lists 200, a next link leading on to the rest."""
    store = _wide_store(kind, tmp_path, postgres_server)
    recipients = tuple(f"r{i}@d{i % 7}.wide.test" for i in range(1000))
    try:
        mid = store.enqueue(
            PreparedMessage(
                data=b"Subject: x\r\n\r\nx\r\n",
                envelope_from="app@sender.test",
                recipients=recipients,
            ),
            now=T0,
        )
        made: list[str] = []
        make = RecipientStatus.__init__

        def counted(self: RecipientStatus, **fields: Any) -> None:
            made.append(fields["address"])
            make(self, **fields)

        app = create_app(store, clock=lambda: T0)
        with TestClient(app, base_url="http://127.0.0.1:8025") as client:
            monkeypatch.setattr(RecipientStatus, "__init__", counted)
            page = client.get(f"/message/{mid}")
            monkeypatch.undo()
    finally:
        store.close()
    assert page.status_code == 200, page.text
    # Each one made once as read, once more with its history (dataclasses.replace).
    assert (len(set(made)), len(made) <= 2 * SHOWN_RECIPIENTS) == (SHOWN_RECIPIENTS, True)
    assert page.text.count("@d") == SHOWN_RECIPIENTS * 2  # in the table and the attempts
    assert "Recipients (1,000)" in page.text
    assert f"/message/{mid}?after={SHOWN_RECIPIENTS - 1}" in page.text


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_message_page_reads_only_the_attempts_it_shows(
    kind: str,
    tmp_path: Path,
    postgres_server: ThrowawayPostgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page of a message read the store's status, every attempt of every recipient,
    to show 500 of them: 30,000 attempts made for 1,000 recipients tried 30 times each
    (0.9 s on SQLite). It reads each recipient's latest, as many as its share of the
    page's, and how many there are; the page shows what it showed."""
    store = _spread_store(kind, tmp_path, postgres_server)
    recipients = tuple(f"r{i}@d{i % 7}.tried.test" for i in range(1000))
    tries = 30
    try:
        mid = store.enqueue(
            PreparedMessage(
                data=b"Subject: x\r\n\r\nx\r\n",
                envelope_from="app@sender.test",
                recipients=recipients,
            ),
            now=T0,
        )
        for k in range(tries):
            at = T0 + timedelta(hours=k)
            lease = store.lease(now=at, limit=len(recipients), lease_for=timedelta(minutes=5))
            assert lease is not None
            store.record(
                results_for(
                    lease,
                    RecipientState.DEFERRED,
                    at=at,
                    next_attempt_at=at + timedelta(minutes=30),
                )
            )
        made = 0
        make = Attempt.__init__

        def counted(self: Attempt, **fields: Any) -> None:
            nonlocal made
            made += 1
            make(self, **fields)

        app = create_app(store, clock=lambda: T0 + timedelta(days=2))
        with TestClient(app, base_url="http://127.0.0.1:8025") as client:
            monkeypatch.setattr(Attempt, "__init__", counted)
            page = client.get(f"/message/{mid}")
            monkeypatch.undo()
    finally:
        store.close()
    assert page.status_code == 200, page.text
    assert made == MAX_SHOWN_ATTEMPTS
    table, _, attempts = page.text.partition("<h2>Attempts</h2>")
    # A page of the recipients, the attempts shared among them: 500 over 200 is 3 for
    # the first 100, 2 for the others.
    assert table.count(f'<td class="num">{tries}</td>') == SHOWN_RECIPIENTS
    last = (T0 + timedelta(hours=tries - 1)).strftime("%Y-%m-%d %H:%M:%S")
    assert attempts.count(f"<td>{last}</td>") == SHOWN_RECIPIENTS  # each one's latest
    assert attempts.count(f"{tries - 3} earlier attempts not shown") == 100
    assert attempts.count(f"{tries - 2} earlier attempts not shown") == 100


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_destinations_page_reads_only_the_pauses_it_shows(
    kind: str,
    tmp_path: Path,
    postgres_server: ThrowawayPostgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The destinations page read every running pause to list the first hundred: a
    pause per subdomain of a hostile domain, 20,000 of them, was 20,000 rows read for
    each view of the page. It reads the ones it lists and counts the rest."""
    store = _spread_store(kind, tmp_path, postgres_server)
    count = MAX_SHOWN_THROTTLES * 10
    try:
        for i in range(count):
            store.throttle(
                f"a{i:04}.evil.test",
                now=T0 + timedelta(seconds=i),
                reply="421 4.7.28 rate limited",
                first=timedelta(hours=1),
                maximum=timedelta(hours=4),
            )
        made = 0
        make = DestinationThrottle.__init__

        def counted(self: DestinationThrottle, **fields: Any) -> None:
            nonlocal made
            made += 1
            make(self, **fields)

        app = create_app(store, clock=lambda: T0 + timedelta(minutes=30))
        with TestClient(app, base_url="http://127.0.0.1:8025") as client:
            monkeypatch.setattr(DestinationThrottle, "__init__", counted)
            page = client.get("/destinations")
            monkeypatch.undo()
    finally:
        store.close()
    assert page.status_code == 200, page.text
    assert made == MAX_SHOWN_THROTTLES
    assert page.text.count('class="tag throttled"') == MAX_SHOWN_THROTTLES
    assert "<strong>a0000.evil.test</strong>" in page.text  # the soonest end
    assert f"<strong>a{MAX_SHOWN_THROTTLES:04}.evil.test</strong>" not in page.text
    assert f"And {count - MAX_SHOWN_THROTTLES:,} more" in page.text

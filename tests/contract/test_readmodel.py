"""Contract: the dashboard's read model answers the same over every store."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest

from mailstrom.errors import StoreError, UnknownMessage
from mailstrom.message.attributes import QueueAttributes
from mailstrom.readmodel import (
    InvalidQuery,
    MessageSummary,
    PageCursor,
    QueueQuery,
    QueueView,
    ReadModel,
    Search,
    SortOrder,
    open_read_model,
)
from mailstrom.readmodel.base import MAX_SEQ
from mailstrom.status import MessageStatus, ReasonClass, RecipientState
from mailstrom.stores import MemoryStore, Store

from .conftest import Backend
from .support import NOW, SECOND, lease_all, message, results_for

START = NOW - timedelta(minutes=10)
ATTEMPTED = NOW - timedelta(minutes=5)


@dataclass
class Queue:
    """Five messages, one in each situation the dashboard shows (oldest first)."""

    deferred: str  # a@one delivered, b@two deferred
    delivered: str  # c@one
    failed: str  # d@two
    queued: str  # e@three, never attempted
    held: str  # f@two, queued and held
    data: bytes


@pytest.fixture
def model(store: Store) -> Iterator[ReadModel]:
    read = open_read_model(store, cache_seconds=0)
    try:
        yield read
    finally:
        read.close()


@pytest.fixture
def queue(store: Store) -> Queue:
    first = message("a@one.example", "b@two.example")
    m1 = store.enqueue(first, now=START)
    m2 = store.enqueue(message("c@one.example"), now=START + SECOND)
    m3 = store.enqueue(message("d@two.example"), now=START + 2 * SECOND)
    lease = lease_all(store, now=START + 3 * SECOND)
    at = ATTEMPTED
    store.record(
        results_for(lease, RecipientState.DELIVERED, at=at, only=["a@one.example", "c@one.example"])
    )
    store.record(
        results_for(
            lease,
            RecipientState.DEFERRED,
            at=at,
            next_attempt_at=NOW + timedelta(hours=1),
            only=["b@two.example"],
        )
    )
    store.record(results_for(lease, RecipientState.FAILED, at=at, only=["d@two.example"]))
    m4 = store.enqueue(message("e@three.example"), now=START + 3 * SECOND)
    m5 = store.enqueue(message("f@two.example"), now=START + 4 * SECOND, hold=True)
    return Queue(deferred=m1, delivered=m2, failed=m3, queued=m4, held=m5, data=first.data)


def _ids(model: ReadModel, **query: object) -> list[str]:
    page = model.queue_page(QueueQuery(**query), now=NOW)  # type: ignore[arg-type]
    return [m.id for m in page.messages]


def test_overview_counts_states_and_the_oldest_pending(model: ReadModel, queue: Queue) -> None:
    view = model.overview(now=NOW)
    assert dict(view.by_state) == {
        RecipientState.QUEUED: 2,
        RecipientState.DEFERRED: 1,
        RecipientState.DELIVERED: 2,
        RecipientState.FAILED: 1,
    }
    assert (view.messages, view.held) == (5, 1)
    assert view.oldest_pending is not None
    assert view.oldest_pending.id == queue.deferred
    assert view.oldest_pending.created_at == START


def test_overview_counts_the_last_hours_attempts_per_minute(model: ReadModel, queue: Queue) -> None:
    buckets = model.overview(now=NOW).throughput
    assert len(buckets) == 60
    assert buckets[-1].start == NOW.replace(second=0, microsecond=0)
    busy = [b for b in buckets if b.total]
    assert len(busy) == 1
    assert busy[0].start == ATTEMPTED.replace(second=0, microsecond=0)
    assert (busy[0].delivered, busy[0].deferred, busy[0].failed) == (2, 1, 1)
    # An hour later they have left the window.
    assert sum(b.total for b in model.overview(now=NOW + timedelta(hours=1)).throughput) == 0


def test_overview_names_the_most_deferred_destinations_with_their_last_reply(
    model: ReadModel, queue: Queue
) -> None:
    [top] = model.overview(now=NOW).top_deferred
    assert (top.domain, top.pending, top.deferred) == ("two.example", 2, 1)
    assert top.last_reply == "451 4.0.0 line one\nline two"
    assert top.reason_class is ReasonClass.GREYLISTED
    assert top.last_attempt_at == ATTEMPTED


def test_an_empty_queue_has_an_empty_overview(model: ReadModel) -> None:
    view = model.overview(now=NOW)
    assert view.messages == 0
    assert view.oldest_pending is None
    assert view.top_deferred == ()
    assert sum(view.by_state.values()) == 0


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        (QueueView.PENDING, ["held", "queued", "deferred"]),
        (QueueView.ALL, ["held", "queued", "failed", "delivered", "deferred"]),
        (QueueView.QUEUED, ["held", "queued"]),
        (QueueView.DEFERRED, ["deferred"]),
        (QueueView.DELIVERED, ["delivered"]),
        (QueueView.FAILED, ["failed"]),
        (QueueView.HELD, ["held"]),
    ],
)
def test_queue_views_select_by_derived_state(
    model: ReadModel, queue: Queue, view: QueueView, expected: list[str]
) -> None:
    assert _ids(model, view=view) == [getattr(queue, name) for name in expected]


def test_the_queue_sorts_oldest_first_on_request(model: ReadModel, queue: Queue) -> None:
    assert _ids(model, view=QueueView.ALL, order=SortOrder.OLDEST) == [
        queue.deferred,
        queue.delivered,
        queue.failed,
        queue.queued,
        queue.held,
    ]


@pytest.mark.parametrize("order", list(SortOrder))
def test_keyset_pages_cover_the_queue_once(
    model: ReadModel, queue: Queue, order: SortOrder
) -> None:
    seen: list[str] = []
    after: PageCursor | None = None
    pages = 0
    while True:
        page = model.queue_page(
            QueueQuery(view=QueueView.ALL, order=order, limit=2, after=after), now=NOW
        )
        seen += [m.id for m in page.messages]
        pages += 1
        if page.next is None:
            break
        after = PageCursor.decode(page.next.encode())  # through the URL form
    assert pages == 3
    assert seen == _ids(model, view=QueueView.ALL, order=order)


def test_queue_filters_by_domain_and_age(model: ReadModel, queue: Queue) -> None:
    assert _ids(model, view=QueueView.ALL, domain="TWO.example") == [
        queue.held,
        queue.failed,
        queue.deferred,
    ]
    older = NOW - (START + SECOND + SECOND / 2)
    assert _ids(model, view=QueueView.ALL, older_than=older) == [queue.delivered, queue.deferred]


def test_queue_search_by_address_id_or_domain(model: ReadModel, queue: Queue) -> None:
    def found(term: str) -> list[str]:
        return _ids(model, view=QueueView.ALL, search=Search.parse(term))

    assert found("b@two.example") == [queue.deferred]
    assert found("nobody@two.example") == []
    assert found(queue.failed) == [queue.failed]
    assert queue.failed in found(queue.failed[:8])
    assert found("one.example") == [queue.delivered, queue.deferred]


def test_queue_search_takes_a_domain_as_typed(model: ReadModel, store: Store) -> None:
    """Recipients' domains are stored in lower case, U-labels as A-labels (as prepare()
    writes them); the domain filter found them typed either way, the search did not."""
    stored = store.enqueue(message("Bob@xn--bcher-kva.example"), now=START)

    def found(term: str) -> list[str]:
        return _ids(model, view=QueueView.ALL, search=Search.parse(term))

    for term in (
        "bücher.example",
        "BÜCHER.Example",
        "Bob@Bücher.Example",
        "Bob@XN--BCHER-KVA.example",
    ):
        assert found(term) == [stored], term
    assert found("bob@bücher.example") == []  # a local part is what it was typed as


def test_the_domain_filters_take_a_domain_as_typed(model: ReadModel, store: Store) -> None:
    """Search.parse() and the store's QueueFilter look for a domain as recipients' are
    stored (lower case, U-labels as A-labels, no trailing dot), but QueueQuery(domain=),
    destinations(domain=) and a Search made directly only lower-cased it: a page of
    "bücher.example" was empty although the queue held its mail."""
    stored = store.enqueue(message("Bob@xn--bcher-kva.example"), now=START)
    for term in ("bücher.example", "BÜCHER.Example", "xn--bcher-kva.example."):
        assert _ids(model, view=QueueView.ALL, domain=term) == [stored], term
        assert _ids(model, view=QueueView.ALL, search=Search(domain=term)) == [stored], term
        address = Search(address="Bob@" + term)
        assert _ids(model, view=QueueView.ALL, search=address) == [stored], term
        assert [d.domain for d in model.destinations(domain=term)] == ["xn--bcher-kva.example"]


def test_destinations_list_pending_mail_per_domain(model: ReadModel, queue: Queue) -> None:
    found = model.destinations()
    assert [(d.domain, d.pending, d.deferred) for d in found] == [
        ("two.example", 2, 1),
        ("three.example", 1, 0),
    ]
    assert found[0].last_reply == "451 4.0.0 line one\nline two"
    assert found[1].last_reply is None
    assert [d.domain for d in model.destinations(domain="Three.example")] == ["three.example"]
    assert [d.domain for d in model.destinations(limit=1, offset=1)] == ["three.example"]


def test_destinations_carry_the_suspension_in_force(
    store: Store, model: ReadModel, queue: Queue
) -> None:
    store.suspend("two.example", now=NOW)
    store.suspend("three.example", now=NOW, until=NOW + timedelta(hours=1))
    store.suspend("idle.example", now=NOW, until=NOW + timedelta(hours=2))
    found = {d.domain: d for d in model.destinations(now=NOW)}
    assert found["two.example"].suspended and found["two.example"].suspension is not None
    assert found["two.example"].suspension.until is None
    three = found["three.example"].suspension
    assert three is not None and three.until == NOW + timedelta(hours=1)
    assert "idle.example" not in found  # nothing pending there: listed as a suspension
    assert [s.domain for s in model.suspensions(now=NOW)] == [
        "idle.example",
        "three.example",
        "two.example",
    ]
    assert [s.domain for s in model.overview(now=NOW).suspended] == [
        "idle.example",
        "three.example",
        "two.example",
    ]
    # The timed one has ended an hour and a bit later; without now nothing is looked up.
    later = {d.domain: d.suspended for d in model.destinations(now=NOW + timedelta(minutes=61))}
    assert later == {"two.example": True, "three.example": False}
    assert not any(d.suspended for d in model.destinations())
    assert store.resume("two.example", now=NOW)
    assert not any(d.suspended for d in model.destinations(now=NOW + timedelta(minutes=61)))


def test_message_data_is_the_stored_message(model: ReadModel, queue: Queue) -> None:
    assert model.message_data(queue.deferred) == queue.data
    with pytest.raises(UnknownMessage):
        model.message_data("0" * 32)


def test_message_data_reads_only_the_first_octets_asked_for(model: ReadModel, queue: Queue) -> None:
    """A page shows the headers and a bounded part of a message: it read the whole of
    it, tens of megabytes for a large one, on every view."""
    for limit in (0, 1, 10, len(queue.data), len(queue.data) + 5):
        assert model.message_data(queue.deferred, limit=limit) == queue.data[:limit]
    with pytest.raises(UnknownMessage):
        model.message_data("0" * 32, limit=10)


@pytest.mark.parametrize(
    "limit", [-5, 2.5, True, MAX_SEQ + 1], ids=["negative", "float", "bool", "past-bigint"]
)
def test_a_data_limit_no_store_can_take_is_refused(
    model: ReadModel, queue: Queue, limit: object
) -> None:
    """message_data(limit=-5) gave all but the last five octets on the memory store and
    none on SQLite and PostgreSQL; 2.5 or True was a bare TypeError, a slice or a
    StoreError ("function substring(bytea, integer, double precision) does not exist").
    Each is an InvalidQuery, as the protocol says of a limit."""
    with pytest.raises(InvalidQuery):
        model.message_data(queue.deferred, limit=limit)  # type: ignore[arg-type]


def test_a_data_limit_past_a_postgres_integer_reads_the_whole_message(
    model: ReadModel, queue: Queue
) -> None:
    """PostgreSQL's substring() takes a 32-bit count: a limit of 2**31 or more failed
    with a StoreError there, where the other stores gave the whole message."""
    for limit in (2**31, 2**40, MAX_SEQ):
        assert model.message_data(queue.deferred, limit=limit) == queue.data


@pytest.mark.parametrize("odd", ["\x00", "\ud800"], ids=["nul", "lone-surrogate"])
def test_text_no_store_can_hold_finds_nothing(model: ReadModel, queue: Queue, odd: str) -> None:
    """An id or domain with a NUL or a lone surrogate names nothing any store holds: the
    memory store said so, PostgreSQL raised StoreRefusedData and SQLite a bare
    UnicodeEncodeError (no StoreError at all). A search for one is refused, as a control
    character already was."""
    for bad in (odd, queue.deferred + odd):
        with pytest.raises(UnknownMessage):
            model.message_data(bad)
    assert model.destinations(domain="two.example" + odd) == []
    assert model.destinations(domain="two.example" + odd, now=NOW) == []
    for fields in (
        {"domain": "two.example" + odd},
        {"search": Search(domain="two.example" + odd)},
        {"search": Search(address="b@two.example" + odd)},
        {"search": Search(id_prefix=queue.deferred[:8] + odd)},
    ):
        with pytest.raises(InvalidQuery):
            model.queue_page(QueueQuery(view=QueueView.ALL, **fields), now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("number", [-1, MAX_SEQ + 1], ids=["negative", "past-bigint"])
def test_counts_no_store_can_take_are_refused(model: ReadModel, queue: Queue, number: int) -> None:
    """destinations(limit=-1) listed all but the last destination on the memory store,
    every one on SQLite, and raised StoreRefusedData on PostgreSQL (an offset of -1 and
    overview(top=-1) as well); past a bigint, SQLite raised a bare OverflowError. Each is
    an InvalidQuery now, as a QueueQuery's bad limit is."""
    for call in (
        lambda: model.destinations(limit=number),
        lambda: model.destinations(offset=number),
        lambda: model.overview(now=NOW, top=number),
        lambda: model.throttles(now=NOW, limit=number),
    ):
        with pytest.raises(InvalidQuery):
            call()
    assert model.destinations(limit=0) == []
    assert model.overview(now=NOW, top=0).top_deferred == ()
    assert model.destinations(offset=MAX_SEQ) == []
    assert [d.domain for d in model.overview(now=NOW, top=MAX_SEQ).top_deferred] == ["two.example"]


@pytest.mark.parametrize(
    "age", [timedelta(days=10**6), timedelta.max, -SECOND], ids=["huge", "max", "negative"]
)
def test_an_age_no_clock_can_reach_is_refused(
    model: ReadModel, queue: Queue, age: timedelta
) -> None:
    """A page older than a million days raised a bare OverflowError from ``now -
    older_than`` on every store; a negative age (queued in the future) was taken. Each is
    an InvalidQuery, as QueueFilter refuses it for the command line's queue."""
    with pytest.raises(InvalidQuery):
        model.queue_page(QueueQuery(view=QueueView.ALL, older_than=age), now=NOW)
    assert _ids(model, view=QueueView.ALL, older_than=timedelta(days=36525)) == []
    assert len(_ids(model, view=QueueView.ALL, older_than=timedelta(0))) == 5


@pytest.mark.parametrize(
    "now",
    [datetime(1, 1, 1, 0, 30, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 30, tzinfo=UTC)],
    ids=["first-hour", "last-minute"],
)
def test_a_now_no_view_can_reckon_from_is_refused(
    model: ReadModel, queue: Queue, now: datetime
) -> None:
    """The overview's hour of throughput before a ``now`` in year 1, or its minute ending
    past 9999, and a page's age before a ``now`` in year 1, were a bare OverflowError on
    every store. Each is an InvalidQuery, as a naive ``now`` is."""
    with pytest.raises(InvalidQuery):
        model.overview(now=now)
    with pytest.raises(InvalidQuery):
        model.queue_page(
            QueueQuery(view=QueueView.ALL, older_than=timedelta(days=1)),
            now=datetime(1, 1, 1, 12, tzinfo=UTC),
        )
    assert model.overview(now=datetime(1, 1, 1, 1, tzinfo=UTC)).messages == 5
    assert model.overview(now=datetime(9999, 12, 31, 23, 58, tzinfo=UTC)).messages == 5


def test_a_page_lists_each_message_as_its_status_says_attributes_included(
    store: Store, model: ReadModel
) -> None:
    attributes = QueueAttributes(
        tags=("welcome", "eu"),
        metadata={"user": "42"},
        priority="high",
        send_at=NOW - timedelta(minutes=1),
        expires_at=NOW + timedelta(days=2),
        idempotency_key="signup-42",
        idempotency_until=NOW + timedelta(hours=1),
    )
    mid = store.enqueue(replace(message("ann@example.org"), attributes=attributes), now=NOW)
    page = model.queue_page(QueueQuery(view=QueueView.ALL), now=NOW)
    assert page.messages == (MessageSummary.of(store.status(mid)),)


def test_the_read_model_sees_changes_made_through_the_store(
    store: Store, model: ReadModel, queue: Queue
) -> None:
    store.set_held(queue.held, False)
    store.cancel(queue.queued, now=NOW)
    assert _ids(model, view=QueueView.HELD) == []
    assert _ids(model, view=QueueView.FAILED) == [queue.queued, queue.failed]


def test_sqlite_answers_the_same_through_either_plan(
    store: Store, model: ReadModel, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite applies a filter through its index when few rows match, else by walking the
    messages: both must find the same messages."""
    from mailstrom.readmodel import sqlite as sqlite_model

    if not isinstance(model, sqlite_model.SQLiteReadModel):
        pytest.skip("the plan choice is SQLite's")
    queries = [
        QueueQuery(view=view, domain=domain, search=search, limit=2, order=order)
        for view in QueueView
        for domain in (None, "two.example")
        for search in (None, Search.parse("b@two.example"), Search.parse(queue.held[:6]))
        for order in SortOrder
    ]
    through_index = [model.queue_page(q, now=NOW) for q in queries]
    monkeypatch.setattr(sqlite_model, "SET_LIMIT", -1)
    walked = [model.queue_page(q, now=NOW) for q in queries]
    assert walked == through_index


@pytest.mark.parametrize("order", list(SortOrder))
def test_pages_split_a_batch_queued_at_one_instant(
    store: Store, model: ReadModel, order: SortOrder
) -> None:
    ids = store.enqueue_many([message(f"r{i}@batch.example") for i in range(5)], now=NOW)
    seen: list[str] = []
    after: PageCursor | None = None
    while True:
        page = model.queue_page(
            QueueQuery(view=QueueView.ALL, order=order, limit=2, after=after), now=NOW
        )
        seen += [m.id for m in page.messages]
        if page.next is None:
            break
        after = page.next
    assert seen == (ids[::-1] if order is SortOrder.NEWEST else ids)


def test_a_page_summarises_each_message_as_its_status_does(
    store: Store, model: ReadModel, queue: Queue
) -> None:
    """A page lists each message's summary (its recipients counted, the first address,
    the reason for its state), which every store reads without a status per recipient
    and which must be the summary of the message's whole status."""
    page = model.queue_page(QueueQuery(view=QueueView.ALL), now=NOW)
    assert len(page.messages) == 5
    for shown in page.messages:
        assert shown == MessageSummary.of(store.status(shown.id))
    [deferred] = [m for m in page.messages if m.id == queue.deferred]
    # The pending recipient's reply explains the state, not the delivered one's "250".
    assert deferred.reason is not None and not deferred.reason.startswith("250")
    assert (deferred.recipients, deferred.first_recipient) == (2, "a@one.example")


@pytest.mark.parametrize("term", [".", "..", " . "])
def test_a_search_for_no_domain_finds_nothing(model: ReadModel, queue: Queue, term: str) -> None:
    """Was: a search for "." was a domain search for "" (what is left of "." once the
    trailing dot goes), which no store applied: the search listed the whole queue."""
    search = Search.parse(term)
    assert search is not None
    assert _ids(model, view=QueueView.ALL, search=search) == []


@pytest.mark.parametrize("limit", [2.5, True], ids=["fraction", "bool"])
def test_a_page_size_that_is_no_whole_number_is_refused(limit: object) -> None:
    """Was: QueueQuery(limit=2.5) was taken, and the stores then failed each its own way
    (a bare TypeError slicing the memory store's rows, "datatype mismatch" from SQLite);
    True was a page of one. check_count() already refused both for destinations()."""
    with pytest.raises(InvalidQuery):
        QueueQuery(limit=limit)  # type: ignore[arg-type]


def test_a_view_and_order_given_by_name_list_as_the_members_do(
    model: ReadModel, queue: Queue
) -> None:
    """QueueQuery(view="held") raised AttributeError on the memory store where SQLite and
    PostgreSQL took it, and order="newest" was no SortOrder.NEWEST to any store, so it
    listed the oldest first. A name is taken as its member, as the dashboard's URL gives
    it."""
    for view, order in itertools.product(QueueView, SortOrder):
        assert _ids(model, view=view.value, order=order.value) == _ids(
            model, view=view, order=order
        ), (view, order)


@pytest.mark.parametrize(
    "fields",
    [{"view": "bogus"}, {"view": 3}, {"order": "sideways"}, {"order": None}],
    ids=["unknown-view", "view-number", "unknown-order", "no-order"],
)
def test_a_view_or_order_no_store_knows_is_refused(
    model: ReadModel, queue: Queue, fields: dict[str, object]
) -> None:
    """An unknown view was a KeyError on PostgreSQL, an AttributeError on the memory store
    and no filter at all on SQLite (every message of the queue listed as "bogus"); an
    unknown order listed the oldest first everywhere. Each is an InvalidQuery."""
    with pytest.raises(InvalidQuery):
        model.queue_page(QueueQuery(**fields), now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("seq", [-1, MAX_SEQ + 1], ids=["negative", "past-bigint"])
def test_a_cursor_no_store_can_compare_is_refused(model: ReadModel, queue: Queue, seq: int) -> None:
    """Was: a PageCursor made directly (decode() checks its text) with a seq past a
    bigint raised a bare OverflowError on SQLite; a negative one was taken everywhere."""
    with pytest.raises(InvalidQuery):
        model.queue_page(
            QueueQuery(view=QueueView.ALL, after=PageCursor(created_at=NOW, seq=seq)), now=NOW
        )


def test_a_naive_time_is_refused(model: ReadModel, queue: Queue) -> None:
    """Was: a naive ``now`` (or cursor time) raised a bare ValueError on SQLite and a
    TypeError on the memory store, and PostgreSQL read it in the session's time zone."""
    naive = NOW.replace(tzinfo=None)
    for call in (
        lambda: model.overview(now=naive),
        lambda: model.queue_page(QueueQuery(view=QueueView.ALL, older_than=SECOND), now=naive),
        lambda: model.destinations(now=naive),
        lambda: model.suspensions(now=naive),
        lambda: model.throttles(now=naive),
        lambda: model.throttle_count(now=naive),
        lambda: model.queue_page(
            QueueQuery(view=QueueView.ALL, after=PageCursor(created_at=naive, seq=1)), now=NOW
        ),
    ):
        with pytest.raises(InvalidQuery):
            call()


def test_a_search_takes_sql_pattern_characters_as_themselves(
    model: ReadModel, store: Store, queue: Queue
) -> None:
    """A search compares whole values (no LIKE): ``%``, ``_`` and a backslash are
    characters like any other on every store, and a local part's case counts."""
    odd = store.enqueue(message("b%_\\@t_o.example"), now=NOW)
    for term in (
        "%",
        "_",
        "\\",
        "%@two.example",
        "_@two.example",
        "b%@two.example",
        "b\\@two.example",
        "tw_.example",
        "%.example",
        "B@two.example",
        "B%_\\@t_o.example",
    ):
        search = Search.parse(term)
        assert search is not None
        assert _ids(model, view=QueueView.ALL, search=search) == [], term
    for term in ("b%_\\@T_O.example", "T_O.example"):
        assert _ids(model, view=QueueView.ALL, search=Search.parse(term)) == [odd], term


def test_times_in_a_zone_with_summer_time_are_reckoned_in_utc(
    model: ReadModel, store: Store
) -> None:
    """Was: ``now`` in a zone with summer time (``ZoneInfo``) had ages and the chart's
    minutes subtracted on its wall clock. An hour after clocks went forward, "older than
    1h" was older than nothing (03:10 CEST less an hour is 02:10, which does not exist
    and reads as 01:10 UTC: now itself), and the chart's hour began after it ended."""
    from zoneinfo import ZoneInfo

    now = datetime(2026, 3, 29, 3, 10, tzinfo=ZoneInfo("Europe/Berlin"))  # 01:10 UTC
    queued = now.astimezone(UTC) - timedelta(minutes=30)
    mid = store.enqueue(message("a@one.example"), now=queued)
    lease = lease_all(store, now=queued)
    store.record(results_for(lease, RecipientState.DELIVERED, at=queued + SECOND))
    assert _ids_at(model, now, view=QueueView.ALL, older_than=timedelta(hours=1)) == []
    assert _ids_at(model, now, view=QueueView.ALL, older_than=timedelta(minutes=20)) == [mid]
    throughput = model.overview(now=now).throughput
    assert sum(b.delivered for b in throughput) == 1
    starts = [b.start.astimezone(UTC) for b in throughput]
    assert starts[0] == datetime(2026, 3, 29, 0, 11, tzinfo=UTC)
    assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(starts))
    # Nor is a time with no UTC equivalent a bare OverflowError.
    east = timezone(timedelta(hours=14))
    with pytest.raises(InvalidQuery):
        model.overview(now=datetime.min.replace(tzinfo=east))
    with pytest.raises(InvalidQuery):
        PageCursor(created_at=datetime.min.replace(tzinfo=east), seq=1)


def _ids_at(model: ReadModel, now: datetime, **query: object) -> list[str]:
    page = model.queue_page(QueueQuery(**query), now=now)  # type: ignore[arg-type]
    return [m.id for m in page.messages]


def _without_recipients(backend: Backend, store: Store, message_id: str) -> None:
    """Take every recipient row of ``message_id`` away, as a store written before
    enqueue refused a message naming none may hold it."""
    if isinstance(store, MemoryStore):
        held = store._messages[message_id]
        held.recipients.clear()
        held.counts = dict.fromkeys(RecipientState, 0)  # as a message stored so has them
    elif backend.name == "sqlite":
        with closing(sqlite3.connect(backend.url.removeprefix("sqlite://"))) as conn, conn:
            conn.execute(
                "DELETE FROM recipients WHERE message_seq ="
                " (SELECT seq FROM messages WHERE id = ?)",
                (message_id,),
            )
    else:
        with psycopg.connect(backend.url, autocommit=True) as pg:
            pg.execute("DELETE FROM recipients WHERE message_id = %s", (message_id,))


def test_a_message_with_no_recipients_is_listed_under_all_only(
    model: ReadModel, store_backend: Backend, store: Store, queue: Queue
) -> None:
    """A message stored with no recipient is failed (derive_message_state: not every
    recipient was delivered), as its status says on every store; the SQLite and
    PostgreSQL pages listed it under Delivered (no recipient pending and none failed).
    It is in no view of a state: the Failed view reads its messages from the index of
    failed recipients, which holds none of it (see QueueView.FAILED). (Enqueue refuses
    such a message now; a store may still hold one queued before.)"""
    empty = store.enqueue(message(), now=NOW)
    _without_recipients(store_backend, store, empty)
    assert store.status(empty).state is RecipientState.FAILED
    shown = model.message_status(empty, attempts=10)
    assert (shown.status, shown.kept) == (store.status(empty), ())
    assert _ids(model, view=QueueView.DELIVERED) == [queue.delivered]
    assert _ids(model, view=QueueView.FAILED) == [queue.failed]
    assert empty in _ids(model, view=QueueView.ALL)
    for view in (QueueView.PENDING, QueueView.QUEUED, QueueView.DEFERRED, QueueView.HELD):
        assert empty not in _ids(model, view=view), view


def test_a_closed_read_model_refuses_every_view_with_a_store_error(
    store: Store, queue: Queue
) -> None:
    """After close() the SQLite read model raised StoreError, the PostgreSQL one a
    StoreUnreachable naming a pool and the memory one went on answering (a read model
    closed by the dashboard's shutdown read on). Each raises the StoreError a closed
    store raises now, for every view."""
    model = open_read_model(store, cache_seconds=0)
    model.close()
    model.close()  # idempotent
    for call in (
        lambda: model.overview(now=NOW),
        lambda: model.queue_page(QueueQuery(view=QueueView.ALL), now=NOW),
        lambda: model.destinations(),
        lambda: model.suspensions(now=NOW),
        lambda: model.throttles(now=NOW),
        lambda: model.throttle_count(now=NOW),
        lambda: model.message_data(queue.deferred),
        lambda: model.message_status(queue.deferred, attempts=10),
    ):
        with pytest.raises(StoreError, match="closed") as raised:
            call()
        assert type(raised.value) is StoreError


def test_the_overview_counts_only_held_messages_still_waiting(
    model: ReadModel, store: Store, queue: Queue
) -> None:
    """As stats(): a held message cancelled since is no mail on hold."""
    assert model.overview(now=NOW).held == 1
    store.cancel(queue.held, now=NOW)
    assert model.overview(now=NOW).held == 0


def test_the_held_view_lists_the_held_messages_the_overview_counts(
    model: ReadModel, store: Store, queue: Queue
) -> None:
    """The overview counts held messages still waiting (as stats() does), but the Held
    view listed every message with the flag: one held after it finished, or cancelled
    while held, was listed as on hold while the count beside it said none were."""
    store.set_held(queue.delivered, True)  # held after it finished
    assert model.overview(now=NOW).held == 1
    assert _ids(model, view=QueueView.HELD) == [queue.held]
    store.cancel(queue.held, now=NOW)
    assert model.overview(now=NOW).held == 0
    assert _ids(model, view=QueueView.HELD) == []
    # Listed under its derived state still, flag and all.
    assert queue.held in _ids(model, view=QueueView.FAILED)


def test_an_address_literal_is_found_as_typed(model: ReadModel, store: Store) -> None:
    """prepare() stores ``bob@[IPv6:::1]`` with its domain in lower case, as every domain;
    status.recipient() and the search looked for the literal's tag as typed ("IPv6"):
    KeyError, and an empty page, for the address the mail was sent to."""
    from mailstrom.message.preparation import prepare

    raw = b"From: a@example.org\r\nTo: bob@[IPv6:::1]\r\nSubject: Hi\r\n\r\nHi\r\n"
    stored = store.enqueue(prepare(raw, now=START), now=START)
    status = store.status(stored)
    for typed in ("bob@[IPv6:::1]", "bob@[ipv6:::1]", "bob@[IPV6:0::1]"):
        assert status.recipient(typed) is status.recipients[0], typed
        found = _ids(model, view=QueueView.ALL, search=Search.parse(typed))
        assert found == [stored], typed
        assert _ids(model, view=QueueView.ALL, search=Search(address=typed)) == [stored]
    with pytest.raises(KeyError):
        status.recipient("Bob@[IPv6:::1]")  # a local part is what it was typed as


@pytest.mark.parametrize("order", list(SortOrder))
@pytest.mark.parametrize("view", list(QueueView))
def test_an_empty_queue_lists_nothing_in_any_view(
    model: ReadModel, view: QueueView, order: SortOrder
) -> None:
    page = model.queue_page(QueueQuery(view=view, order=order), now=NOW)
    assert (page.messages, page.next) == ((), None)
    assert model.destinations(now=NOW) == []


@pytest.mark.parametrize("order", list(SortOrder))
def test_a_page_that_ends_the_queue_exactly_is_the_last(
    model: ReadModel, queue: Queue, order: SortOrder
) -> None:
    """Five messages: a page of five is the only one, and a page of four is followed by
    one of one with no page after it (never by an empty page)."""
    whole = model.queue_page(QueueQuery(view=QueueView.ALL, order=order, limit=5), now=NOW)
    assert (len(whole.messages), whole.next) == (5, None)
    first = model.queue_page(QueueQuery(view=QueueView.ALL, order=order, limit=4), now=NOW)
    assert len(first.messages) == 4 and first.next is not None
    rest = model.queue_page(
        QueueQuery(view=QueueView.ALL, order=order, limit=4, after=first.next), now=NOW
    )
    assert (len(rest.messages), rest.next) == (1, None)
    assert [m.id for m in first.messages + rest.messages] == [m.id for m in whole.messages]


def test_a_message_changing_state_between_pages_moves_no_other(
    model: ReadModel, store: Store, queue: Queue
) -> None:
    """The cursor is a message's creation time and insertion number, which no delivery
    changes: a message delivered between two pages leaves the pending view without
    another one being skipped or shown twice, and stays in its place in the whole queue."""
    first = model.queue_page(QueueQuery(view=QueueView.PENDING, limit=2), now=NOW)
    assert [m.id for m in first.messages] == [queue.held, queue.queued]
    whole = model.queue_page(QueueQuery(view=QueueView.ALL, limit=2), now=NOW)
    later = NOW + timedelta(hours=2)
    lease = lease_all(store, now=later)  # the deferred one is due again, the queued one too
    store.record(results_for(lease, RecipientState.DELIVERED, at=later, only=["b@two.example"]))
    rest = model.queue_page(QueueQuery(view=QueueView.PENDING, limit=2, after=first.next), now=NOW)
    assert (rest.messages, rest.next) == ((), None)
    seen = [m.id for m in whole.messages]
    after = whole.next
    while after is not None:
        page = model.queue_page(QueueQuery(view=QueueView.ALL, limit=2, after=after), now=NOW)
        seen += [m.id for m in page.messages]
        after = page.next
    assert seen == [queue.held, queue.queued, queue.failed, queue.delivered, queue.deferred]
    assert _ids(model, view=QueueView.DELIVERED) == [queue.delivered, queue.deferred]


def _tried(store: Store, tries: dict[str, int]) -> str:
    """A message to each address of ``tries``, deferred that many times (an hour apart)."""
    mid = store.enqueue(message(*tries), now=START)
    for k in range(max(tries.values())):
        at = START + timedelta(hours=k)
        lease = lease_all(store, now=at)
        wanted = [a for a, n in tries.items() if n > k]
        store.record(
            results_for(
                lease,
                RecipientState.DEFERRED,
                at=at,
                next_attempt_at=at + timedelta(minutes=30),
                only=wanted,
            )
        )
    return mid


def _without_history(status: MessageStatus) -> MessageStatus:
    return replace(status, recipients=tuple(replace(r, history=()) for r in status.recipients))


@pytest.mark.parametrize(
    ("budget", "shares"),
    [
        (0, (0, 0, 0, 0)),
        (1, (1, 0, 0, 0)),
        (4, (1, 1, 1, 1)),
        (6, (2, 2, 1, 1)),
        (9, (3, 2, 2, 2)),
        (100, (25, 25, 25, 25)),
    ],
)
def test_a_message_status_holds_each_recipients_share_of_its_latest_attempts(
    model: ReadModel, store: Store, budget: int, shares: tuple[int, ...]
) -> None:
    """The dashboard's page of a message read every attempt of every recipient (the
    store's status) to show a few hundred: 30,000 for 1,000 recipients tried 30 times
    each. The read model's status is the store's with each recipient's latest attempts,
    as many as its share of the page's (the first ones take what does not divide), and
    how many its history holds."""
    tries = {"a@one.example": 0, "b@two.example": 2, "c@one.example": 7, "d@two.example": 3}
    mid = _tried(store, tries)
    whole = store.status(mid)
    found = model.message_status(mid, attempts=budget)
    assert _without_history(found.status) == _without_history(whole)
    assert found.kept == tuple(len(r.history) for r in whole.recipients) == (0, 2, 7, 3)
    for r, full, share in zip(found.status.recipients, whole.recipients, shares, strict=True):
        assert r.history == full.history[max(0, len(full.history) - share) :]
        assert len(r.history) == min(share, len(full.history))
    assert sum(len(r.history) for r in found.status.recipients) <= budget


def test_a_message_status_of_a_message_not_stored_is_unknown(
    model: ReadModel, queue: Queue
) -> None:
    for mid in ("0" * 32, "a\x00b", "\ud800"):
        with pytest.raises(UnknownMessage):
            model.message_status(mid, attempts=10)
    with pytest.raises(InvalidQuery):
        model.message_status(queue.deferred, attempts=-1)


def test_a_message_status_reads_its_recipients_a_page_at_a_time(
    model: ReadModel, store: Store
) -> None:
    """The dashboard's page of a message listed every recipient, and a message may have
    any number: 1,000 made a page of 819 KB. The read model reads a page of them by
    position, says where the next starts, and none after the last (a last page that is
    exactly full included)."""
    addresses = [f"r{i}@d{i % 3}.example" for i in range(5)]
    mid = store.enqueue(message(*addresses), now=START)
    whole = store.status(mid).recipients
    for size, sizes in ((2, [2, 2, 1]), (5, [5]), (1, [1] * 5), (6, [5])):
        seen: list[str] = []
        after, pages = -1, []
        while True:
            found = model.message_status(mid, attempts=10, after=after, recipients=size)
            assert found.recipients == 5
            assert len(found.kept) == len(found.status.recipients)
            seen += [r.address for r in found.status.recipients]
            pages.append(len(found.status.recipients))
            if found.next_after is None:
                break
            after = found.next_after
        assert (seen, pages) == (addresses, sizes)
    everyone = model.message_status(mid, attempts=10)
    assert (everyone.status.recipients, everyone.next_after) == (whole, None)
    past = model.message_status(mid, attempts=10, after=4, recipients=2)
    assert (past.status.recipients, past.next_after, past.recipients) == ((), None, 5)


def test_a_page_of_recipients_keeps_the_whole_messages_state_and_hold(
    model: ReadModel, store: Store
) -> None:
    """A page holding only delivered recipients, while a later one is still deferred:
    the message's state and its hold (what the actions offer) are the whole message's,
    not the page's, and its recipients are counted by state over all of them."""
    mid = store.enqueue(message("a@one.example", "b@one.example", "c@two.example"), now=START)
    lease = lease_all(store, now=START)
    store.record(
        results_for(
            lease, RecipientState.DELIVERED, at=ATTEMPTED, only=["a@one.example", "b@one.example"]
        )
    )
    store.record(
        results_for(
            lease,
            RecipientState.DEFERRED,
            at=ATTEMPTED,
            next_attempt_at=NOW + timedelta(hours=1),
            only=["c@two.example"],
        )
    )
    store.set_held(mid, True)
    whole = store.status(mid)
    assert (whole.state, whole.held) == (RecipientState.DEFERRED, True)
    found = model.message_status(mid, attempts=10, recipients=2)
    assert [r.state for r in found.status.recipients] == [RecipientState.DELIVERED] * 2
    assert (found.status.state, found.status.held) == (whole.state, whole.held)
    assert found.by_state == {RecipientState.DELIVERED: 2, RecipientState.DEFERRED: 1}
    assert (found.recipients, found.next_after) == (3, 1)
    found_rest = model.message_status(mid, attempts=10, after=1, recipients=2)
    rest = replace(whole, recipients=whole.recipients[2:])
    assert _without_history(found_rest.status) == _without_history(rest)
    assert found_rest.next_after is None


@pytest.mark.parametrize(("after", "size"), [(-2, 2), (MAX_SEQ + 1, 2), (0, 0), (0, -1)])
def test_a_page_of_recipients_no_store_can_read_is_refused(
    model: ReadModel, queue: Queue, after: int, size: int
) -> None:
    with pytest.raises(InvalidQuery):
        model.message_status(queue.deferred, attempts=10, after=after, recipients=size)


def test_the_first_running_pauses_and_how_many_run(model: ReadModel, store: Store) -> None:
    """The destinations page lists the first pauses, soonest end first, and says how many
    more run: the read model gives the first ``limit`` of the store's list and a count of
    it, an ended pause (or one started ahead of a clock set back) in neither."""
    for i, (start, pause) in enumerate([(-30, 1), (-20, 1), (-10, 5), (-5, 2), (-120, 1), (90, 1)]):
        store.throttle(
            f"d{i}.example",
            now=NOW + timedelta(minutes=start),
            reply="421 4.7.28 rate limited",
            first=timedelta(minutes=pause) * 60,
            maximum=timedelta(hours=6),
        )
    running = store.throttles(now=NOW)
    assert [t.destination for t in running] == [
        "d0.example",
        "d1.example",
        "d3.example",
        "d2.example",
    ]
    assert model.throttles(now=NOW) == running
    assert model.throttles(now=NOW, limit=2) == running[:2]
    assert model.throttles(now=NOW, limit=0) == []
    assert model.throttles(now=NOW, limit=MAX_SEQ) == running
    assert model.throttle_count(now=NOW) == len(running)
    assert model.throttle_count(now=NOW + timedelta(days=1)) == 0


def test_waiting_counts_a_messages_recipients_at_suspended_and_paused_destinations(
    model: ReadModel, store: Store
) -> None:
    """What a retry says of a message, counted in the store as its status shows it: its
    pending recipients at a suspended domain, and of the others those waiting for a
    running pause of their destination (not one its worker deferred for itself)."""
    # Pauses are read by the real clock, as message_status() reads them.
    now = datetime.now(UTC)
    addresses = ("a@one.example", "b@two.example", "c@three.example", "d@five.example")
    mid = store.enqueue(message(*addresses, "e@Four.example"), now=now)
    other = store.enqueue(message("f@three.example"), now=now)
    lease = lease_all(store, now=now)
    pause = store.throttle(
        "three.example",
        now=now,
        reply="421 4.7.28 slow down",
        first=timedelta(hours=1),
        maximum=timedelta(hours=4),
    )
    at_three = [i for i in lease.items if i.domain == "three.example"]
    store.postpone(at_three, until=pause.until, destination="three.example")
    store.record(results_for(lease, RecipientState.DELIVERED, at=now, only=["a@one.example"]))
    store.record(
        results_for(
            lease,
            RecipientState.DEFERRED,
            at=now,
            next_attempt_at=pause.until + timedelta(hours=1),
            only=["b@two.example", "d@five.example"],
        )
    )
    shown = model.message_status(mid, attempts=0).status.recipients
    assert [r.throttle is not None for r in shown] == [False, False, True, False, False]
    assert model.waiting(mid, at=set()) == (0, 1)
    assert model.waiting(mid, at={"two.example", "four.example"}) == (2, 1)
    assert model.waiting(mid, at={"one.example", "three.example", "five.example"}) == (2, 0)
    assert model.waiting(other, at={"two.example"}) == (0, 1)
    for unknown in ("0" * 32, "a\x00b"):
        with pytest.raises(UnknownMessage):
            model.waiting(unknown, at=set())

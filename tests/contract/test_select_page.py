"""Contract: :meth:`Store.select_page` walks what ``select_ids`` lists in pages, each
going on below the last message of the one before: every message once, in the same
order, however many share an enqueue time and whatever was deleted meanwhile."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from mailstrom.errors import InvalidArgument
from mailstrom.status import RecipientState
from mailstrom.stores import QueueFilter, Store
from mailstrom.stores.operator import PENDING_STATES, ListingKey

from .conftest import Backend
from .support import NOW, lease_all, message, results_for

SECOND = timedelta(seconds=1)
LATER = NOW + timedelta(hours=1)
DELIVERED = frozenset({RecipientState.DELIVERED})


def walked(store: Store, where: QueueFilter) -> list[str]:
    """Every id ``select_page`` lists for ``where``, page after page."""
    ids: list[str] = []
    after: ListingKey | None = None
    for _ in range(100):  # only catches a walk that goes round for ever
        page = store.select_page(now=LATER, where=where, after=after)
        ids += page.ids
        if len(page.ids) < where.limit:
            return ids
        assert page.last is not None
        after = page.last
    raise AssertionError("the walk never ended")


def fill(store: Store) -> None:
    """Delivered and pending mail at two domains, five messages sharing one enqueue
    time, and one stamped before the message queued ahead of it (a clock that went
    back)."""
    store.enqueue(message("a@example.org"), now=NOW + 2 * SECOND)
    store.enqueue(message("b@other.org"), now=NOW)
    store.enqueue_many(
        [message(f"c{i}@example.org" if i % 2 else f"c{i}@other.org") for i in range(5)],
        now=NOW + SECOND,
    )
    lease = lease_all(store, now=NOW + 3 * SECOND)
    store.record(
        results_for(
            lease,
            RecipientState.DELIVERED,
            at=NOW + 3 * SECOND,
            only=["a@example.org", "c0@other.org", "c1@example.org", "c2@other.org"],
        )
    )
    store.enqueue_many([message(f"d{i}@example.org") for i in range(3)], now=NOW + 4 * SECOND)


@pytest.mark.parametrize(
    "where",
    [
        QueueFilter(limit=2),
        QueueFilter(limit=3, states=PENDING_STATES),
        QueueFilter(limit=2, domain="example.org"),
        QueueFilter(limit=2, states=DELIVERED, older_than=30 * timedelta(minutes=1)),
        QueueFilter(limit=1, states=DELIVERED, domain="other.org"),
    ],
    ids=["all", "pending", "domain", "purge candidates", "domain delivered"],
)
def test_pages_list_every_message_once_in_the_order_of_select_ids(
    store: Store, where: QueueFilter
) -> None:
    fill(store)
    whole = store.select_ids(now=LATER, where=dataclasses.replace(where, limit=1000))
    assert whole, "the filter matches some mail"
    assert walked(store, where) == whole


def test_a_page_goes_on_after_its_last_message_is_deleted(store: Store) -> None:
    """A purge deletes the messages of the page before: the next page starts below the
    last of them all the same, and lists none twice."""
    fill(store)
    where = QueueFilter(limit=2, states=DELIVERED)
    first = store.select_page(now=LATER, where=where)
    assert len(first.ids) == 2
    assert store.purge_many(first.ids) == 2
    rest = store.select_page(now=LATER, where=where, after=first.last)
    assert rest.ids and not set(rest.ids) & set(first.ids)
    assert rest.ids == store.select_ids(now=LATER, where=where)


def test_an_empty_page_has_no_last_place(store: Store) -> None:
    page = store.select_page(now=LATER, where=QueueFilter())
    assert page.ids == [] and page.last is None


def test_a_place_no_store_gave_is_refused(store: Store) -> None:
    fill(store)
    with pytest.raises(InvalidArgument):
        store.select_page(now=LATER, where=QueueFilter(), after=ListingKey(object(), 1))


@pytest.mark.parametrize(
    "place",
    [ListingKey(NOW.replace(tzinfo=None), 1), ListingKey(NOW, "1")],  # type: ignore[arg-type]
    ids=["naive time", "text seq"],
)
def test_a_place_of_a_kind_no_store_gives_is_refused(store: Store, place: ListingKey) -> None:
    """Was: the memory store compared such a place with its own and raised a bare
    TypeError ("can't compare offset-naive and offset-aware datetimes", "'<' not
    supported between instances of 'int' and 'str'") where the others refuse it."""
    fill(store)
    with pytest.raises(InvalidArgument):
        store.select_page(now=LATER, where=QueueFilter(), after=place)


def test_a_walk_with_examine_steps_over_kept_mail_in_bounded_pages(
    store_backend: Backend,
) -> None:
    """Three delivered messages behind 40 older than the cutoff that are pending (kept):
    asked with ``examine``, each page looks at no more than that many messages, so the
    first pages list nothing yet say where the next starts, and the walk still ends
    with the three. Was: one call looked at every kept message until it found a page
    of matches, and on PostgreSQL a statement_timeout cancelled it at each try."""
    store = store_backend.open()
    old = [
        store.enqueue(message(f"old{i}@example.org"), now=NOW - timedelta(hours=2, seconds=i))
        for i in range(3)
    ]
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    store.enqueue_many([message(f"k{i}@example.org") for i in range(40)], now=NOW)
    where = QueueFilter(limit=2, states=DELIVERED, older_than=timedelta(minutes=30))
    pages: list[list[str]] = []
    after: ListingKey | None = None
    for _ in range(100):  # only catches a walk that goes round for ever
        page = store.select_page(now=LATER, where=where, after=after, examine=5)
        pages.append(page.ids)
        if page.last is None:
            break
        after = page.last
    else:
        raise AssertionError("the walk never ended")
    assert [mid for ids in pages for mid in ids] == old
    if store_backend.name != "sqlite":  # SQLite fills its pages: no statement time limit
        assert pages[0] == [] and len(pages) >= 40 // 5
    with pytest.raises(InvalidArgument):
        store.select_page(now=LATER, where=where, examine=0)


def test_postgres_tells_a_message_state_from_a_few_recipients(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retention walk's page (states set, ``examine``) looks at each message's state
    by index probes, not by reading every recipient of it. Was: 6 delivered messages of
    400 recipients, ``examine=3``, read 1,200 recipient rows; counted here (EXPLAIN
    ANALYZE), not timed."""
    import psycopg

    from mailstrom.stores.postgres import PostgresStore
    from tests.support.pg_plans import analyzed, statements_run

    store = PostgresStore(postgres_url)
    try:
        # Newest first: 2 deferred, 2 failed, 6 delivered, all queued before the cutoff.
        outcomes = [RecipientState.DEFERRED] * 2 + [RecipientState.FAILED] * 2
        outcomes += [RecipientState.DELIVERED] * 6
        for n, outcome in enumerate(outcomes):
            many = [f"u{n}-{i}@example.org" for i in range(400)]
            store.enqueue(message(*many), now=NOW - timedelta(hours=2, seconds=n))
            while (lease := store.lease(now=NOW, limit=1000, lease_for=60 * SECOND)) is not None:
                later = LATER if outcome is RecipientState.DEFERRED else None
                store.record(results_for(lease, outcome, next_attempt_at=later))
        # Older, many messages of one recipient in each state, as a queue holds.
        small = [message(f"s{n}@example.org") for n in range(600)]
        store.enqueue_many(small, now=NOW - timedelta(hours=3))
        for outcome in (RecipientState.DEFERRED, RecipientState.FAILED):
            lease = store.lease(now=NOW, limit=200, lease_for=60 * SECOND)
            assert lease is not None
            later = LATER if outcome is RecipientState.DEFERRED else None
            store.record(results_for(lease, outcome, next_attempt_at=later))
        where = QueueFilter(limit=2, states=DELIVERED, older_than=timedelta(minutes=30))
        with statements_run(monkeypatch, lambda text, _: b"examined AS" in text) as seen:
            page = store.select_page(now=LATER, where=where, examine=6)
        assert len(page.ids) == 2
    finally:
        store.close()
    [(sql, params)] = seen
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("ANALYZE recipients")  # as autovacuum would have
    plan = analyzed(postgres_url, sql, params)

    def recipient_rows(node: dict[str, Any]) -> int:
        own = 0
        if node.get("Relation Name") == "recipients" or "recipients" in node.get("Index Name", ""):
            loops = node.get("Actual Loops", 1)
            own = (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * loops
        return own + sum(recipient_rows(n) for n in node.get("Plans", ()))

    assert recipient_rows(plan[0]["Plan"]) <= 3 * 6, plan

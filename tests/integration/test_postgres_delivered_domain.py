"""The delivered mail of one domain on PostgreSQL (``mailstrom queue --state delivered
--domain d``, the dashboard's Delivered view with a domain) is read from an index of
delivered recipients by domain (migration 24): no index had it, and the store's list,
select and count probed every message of the queue newest first (1.1 s at 200,000
delivered recipients for three messages), the dashboard's page read every recipient."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.readmodel import QueueQuery, QueueView
from mailstrom.readmodel.postgres import PostgresReadModel
from mailstrom.status import RecipientState
from mailstrom.stores import QueueFilter
from mailstrom.stores.postgres import PostgresStore
from tests.support.pg_plans import analyzed, listing_of, rows_touched, statements_run

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
BULK = 20_000
"""Delivered messages at fifty other domains, one recipient each."""
RARE = 3
"""Delivered messages at the domain listed."""
FILTER = QueueFilter(states=frozenset({RecipientState.DELIVERED}), domain="rare.test")

LISTINGS: dict[str, Callable[[PostgresStore, str], set[str]]] = {
    "query": lambda store, _: {s.id for s in store.query(now=T0 + timedelta(days=1), where=FILTER)},
    "select_ids": lambda store, _: set(store.select_ids(now=T0 + timedelta(days=1), where=FILTER)),
    "count": lambda store, _: {str(store.count(now=T0, where=FILTER, cap=1000))},
    "state": lambda store, _: set(
        store.select_ids(
            now=T0, where=QueueFilter(state=RecipientState.DELIVERED, domain="rare.test")
        )
    ),
    "dashboard": lambda _, url: _page_ids(url),
}


def _page_ids(url: str) -> set[str]:
    model = PostgresReadModel(url)
    try:
        query = QueueQuery(view=QueueView.DELIVERED, domain="rare.test")
        return {m.id for m in model.queue_page(query, now=T0 + timedelta(days=1)).messages}
    finally:
        model.close()


def _message(i: int, domain: str) -> PreparedMessage:
    return PreparedMessage(
        data=b"Subject: x\r\n\r\nx\r\n",
        envelope_from="app@sender.test",
        recipients=(f"u{i}@{domain}",),
    )


@pytest.fixture(scope="module")
def delivered(postgres_server: Any) -> tuple[str, set[str]]:
    """A database of BULK + RARE delivered messages; the ids of the RARE."""
    url = postgres_server.create_database()
    with PostgresStore(url, max_size=2) as store:
        rare = store.enqueue_many([_message(i, "rare.test") for i in range(RARE)], now=T0)
        for start in range(0, BULK, 5000):
            batch = [_message(i, f"d{i % 50}.test") for i in range(start, start + 5000)]
            store.enqueue_many(batch, now=T0 + timedelta(seconds=start))
    with psycopg.connect(url, autocommit=True) as conn:
        # Setup, not under test: every recipient delivered at once, as by many leases.
        conn.execute(
            "UPDATE recipients SET state = 'delivered', attempts = 1, finished_at = %s,"
            " last_attempt_at = %s, next_attempt_at = NULL",
            (T0, T0),
        )
        conn.execute("VACUUM ANALYZE")
    return url, set(rare)


@pytest.mark.parametrize("name", list(LISTINGS))
def test_the_delivered_mail_of_a_domain_is_read_from_an_index(
    name: str, delivered: tuple[str, set[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, rare = delivered
    with (
        PostgresStore(url, max_size=2) as store,
        statements_run(monkeypatch, listing_of("rare.test")) as seen,
    ):
        found = LISTINGS[name](store, url)
    assert found == ({str(RARE)} if name == "count" else rare)
    ((sql, params),) = seen
    plan = analyzed(url, sql, params)
    text = repr(plan)
    assert "recipients_delivered_domain" in text, text
    assert rows_touched(plan[0]["Plan"]) < 100, text

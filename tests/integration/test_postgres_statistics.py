"""A new PostgreSQL database with a backlog: the store analyses the queue's tables before
it leases, once, instead of planning the lease query blind until autovacuum comes by
(mailstrom/stores/postgres/statistics.py). Autovacuum is turned off for the tables here,
so that what the tests see is the store's doing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores.postgres import PostgresStore
from mailstrom.stores.postgres.statistics import MIN_BYTES, PlannerStatistics
from tests.support.pg_tables import analysed, without_autovacuum

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
BACKLOG = 1500
"""Messages of about 1 KB, one recipient each: both tables over MIN_BYTES."""


def messages(count: int) -> list[PreparedMessage]:
    body = b"x" * 1000
    return [
        PreparedMessage(
            data=b"From: a@example.com\r\nSubject: hi\r\n\r\n" + body + b"\r\n",
            envelope_from="a@example.com",
            recipients=(f"r{i}@example.org",),
            subject="hi",
        )
        for i in range(count)
    ]


def fill(store: PostgresStore, count: int) -> None:
    batch = messages(count)
    for start in range(0, count, 500):
        store.enqueue_many(batch[start : start + 500], now=T0)


def sizes(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_relation_size(relid) FROM pg_stat_user_tables"
            " WHERE relname IN ('recipients', 'messages')"
        ).fetchall()
    return [size for (size,) in rows]


@pytest.fixture
def url(postgres_url: str) -> str:
    """A migrated database whose queue tables autovacuum leaves alone."""
    PostgresStore(postgres_url).close()
    without_autovacuum(postgres_url)
    return postgres_url


@pytest.fixture
def store(url: str) -> Iterator[PostgresStore]:
    with PostgresStore(url, max_size=4) as s:
        yield s


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_backlog_in_a_new_database_is_analysed_before_the_first_lease(
    url: str, store: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    fill(store, BACKLOG)
    assert min(sizes(url)) >= MIN_BYTES
    assert analysed(url) == {"recipients": False, "messages": False}

    with caplog.at_level(logging.INFO, logger="mailstrom.stores.postgres.statistics"):
        lease = store.lease(now=T0, limit=150, lease_for=LEASE)

    assert lease is not None and sum(len(i.recipients) for i in lease.items) == 150
    assert analysed(url) == {"recipients": True, "messages": True}
    assert any("no planner statistics yet" in r.getMessage() for r in caplog.records)


def test_it_is_done_once_a_table_is_large_enough_and_then_never_again(url: str) -> None:
    clock = Clock()
    statistics = PlannerStatistics(check_every=2.0, clock=clock)
    with PostgresStore(url) as store, psycopg.connect(url, autocommit=True) as conn:
        # Empty tables: nothing to gain, look again later.
        assert statistics.ensure(conn) == ()
        assert not statistics.settled and not statistics.due()

        fill(store, BACKLOG)
        assert statistics.ensure(conn) == ()  # not yet time for another look
        clock.now = 2.0
        assert sorted(statistics.ensure(conn)) == ["messages", "recipients"]
        assert statistics.settled

        clock.now = 100.0
        assert not statistics.due()
        assert statistics.ensure(conn) == ()


def test_tables_with_statistics_are_left_to_autovacuum(url: str) -> None:
    with PostgresStore(url) as store, psycopg.connect(url, autocommit=True) as conn:
        fill(store, BACKLOG)
        conn.execute("ANALYZE recipients, messages")
        statistics = PlannerStatistics()
        assert statistics.ensure(conn) == ()
        assert statistics.settled


def test_the_large_table_first_the_other_once_it_grows(url: str) -> None:
    """Messages outgrow recipients (their bodies): the one analysed first does not settle
    the look for the other."""
    clock = Clock()
    statistics = PlannerStatistics(check_every=2.0, clock=clock)
    with PostgresStore(url) as store, psycopg.connect(url, autocommit=True) as conn:
        fill(store, 100)
        recipients_size, messages_size = (
            conn.execute(f"SELECT pg_relation_size('{t}')").fetchone()[0]  # type: ignore[index]
            for t in ("recipients", "messages")
        )
        assert recipients_size < MIN_BYTES <= messages_size
        assert statistics.ensure(conn) == ("messages",)
        assert not statistics.settled

        fill(store, BACKLOG)
        clock.now = 2.0
        assert statistics.ensure(conn) == ("recipients",)
        assert statistics.settled

"""What ``next_due`` and ``lease`` cost with a big destination suspended (and, on
PostgreSQL, with messages held): counted as work (SQLite VM steps, rows PostgreSQL's plan
touched), never timed.

Both read the due index in due order and filter suspended domains (and held messages)
out row by row: a suspended backlog due now sits at the front of that order, so every
call walks all of it before it reaches the first row it may use. An idle worker asks
``next_due`` after each empty lease and every poll; each lease walks it again."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores.postgres import PostgresStore
from mailstrom.stores.postgres.sql import queries
from mailstrom.stores.sqlite import SQLiteStore
from mailstrom.stores.sqlite_schema import _statements, migrations
from tests.support.pg_plans import rows_touched

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
BACKLOG = 10_000
"""Messages of two recipients each at the destination set aside: 20,000 recipients."""


def backlog(domain: str, count: int = BACKLOG) -> list[PreparedMessage]:
    return [
        PreparedMessage(
            data=b"Subject: x\r\n\r\nx\r\n",
            envelope_from="app@sender.test",
            recipients=(f"a{i}@{domain}", f"b{i}@{domain}"),
        )
        for i in range(count)
    ]


def ready() -> PreparedMessage:
    """One message to a destination nobody set aside, queued after the backlog: its
    recipient is due with the backlog's, and behind it in the index."""
    return PreparedMessage(
        data=b"Subject: y\r\n\r\ny\r\n", envelope_from="app@sender.test", recipients=("x@ok.test",)
    )


class _CountingStore(SQLiteStore):
    """An SQLite store counting the thousands of VM steps its statements take."""

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

    def cost(self, call: Any) -> tuple[Any, int]:
        before = self.steps
        result = call()
        return result, self.steps - before


def _sqlite_costs(path: Path, *, suspended: bool) -> tuple[int, int]:
    """(steps of next_due, steps of a lease) with a backlog at big.test, suspended or
    not there at all."""
    store = _CountingStore(path)
    try:
        if suspended:
            store.suspend("big.test", now=T0)
            for start in range(0, BACKLOG, 2500):
                store.enqueue_many(backlog("big.test")[start : start + 2500], now=T0)
        store.enqueue(ready(), now=T0)
        due, next_due_steps = store.cost(lambda: store.next_due(now=T0))
        assert due == T0
        lease, lease_steps = store.cost(lambda: store.lease(now=T0, limit=10, lease_for=LEASE))
        assert lease is not None
        assert [r.address for item in lease.items for r in item.recipients] == ["x@ok.test"]
        return next_due_steps, lease_steps
    finally:
        store.close()


def test_sqlite_next_due_and_lease_cost_the_same_whatever_is_suspended(tmp_path: Path) -> None:
    empty = _sqlite_costs(tmp_path / "empty.db", suspended=False)
    full = _sqlite_costs(tmp_path / "full.db", suspended=True)
    # Thousands of steps. Walking 20,000 suspended rows takes hundreds of thousands.
    assert full[0] <= empty[0] + 5, (empty, full)
    assert full[1] <= empty[1] + 5, (empty, full)


def _pg_costs(url: str) -> tuple[int, int]:
    """(rows next_due's plan touched, rows a lease's plan touched); the lease is rolled
    back."""
    params = {
        "now": T0 + timedelta(seconds=1),
        "limit": 10,
        "token": "t",
        "expires_at": T0 + LEASE,
        "max_bytes": 256 * 1024 * 1024,
        "first_always": True,
    }
    costs = []
    with psycopg.connect(url) as conn:
        for name in ("next_due", "lease"):
            sql = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries()[name]
            ((plan,),) = conn.execute(sql.encode(), params).fetchall()
            costs.append(rows_touched(plan[0]["Plan"]))
            conn.rollback()
    return costs[0], costs[1]


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url, max_size=4) as store:
        yield store


@pytest.mark.postgres
@pytest.mark.parametrize("aside", ["suspended", "held"])
def test_postgres_next_due_and_lease_cost_the_same_whatever_is_set_aside(
    postgres_url: str, pg_store: PostgresStore, aside: str
) -> None:
    pg_store.enqueue(ready(), now=T0)
    empty = _pg_costs(postgres_url)
    if aside == "suspended":
        pg_store.suspend("big.test", now=T0)
    ids: list[str] = []
    for start in range(0, BACKLOG, 2500):
        ids += pg_store.enqueue_many(backlog("big.test")[start : start + 2500], now=T0)
    if aside == "held":
        pg_store.hold_many(ids, True)
    # The ready recipient was queued first here: set it behind the backlog in due order.
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE recipients SET next_attempt_at = %s WHERE domain = 'ok.test'",
            (T0 + timedelta(seconds=1),),
        )
        conn.execute("ANALYZE recipients")
        conn.execute("ANALYZE messages")
    assert pg_store.next_due(now=T0) == T0 + timedelta(seconds=1)
    full = _pg_costs(postgres_url)
    assert full[0] <= empty[0] + 100, (empty, full)
    assert full[1] <= empty[1] + 100, (empty, full)


@pytest.mark.postgres
def test_postgres_a_suspension_leaves_leasing_to_walk_the_due_index(
    postgres_url: str, pg_store: PostgresStore
) -> None:
    """Any suspension in force made the planner turn the suspensions filter into a hash
    anti join: every lease and next_due then read and sorted every due recipient (20,000
    here; some 0.5 s a lease at 50,000) instead of reading the due index's first entries,
    though no recipient was at the suspended destination."""
    for start in range(0, BACKLOG, 2500):
        pg_store.enqueue_many(backlog("ok.test")[start : start + 2500], now=T0)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("ANALYZE")
    free = _pg_costs(postgres_url)
    pg_store.suspend("quiet.test", now=T0)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("ANALYZE")
    suspended = _pg_costs(postgres_url)
    assert suspended[0] <= free[0] + 100, (free, suspended)
    assert suspended[1] <= free[1] + 100, (free, suspended)


def test_an_upgraded_sqlite_queue_sets_its_suspended_backlog_aside(tmp_path: Path) -> None:
    """Schema 16 keeps a suspended destination's recipients out of the due index; a
    queue suspended under 15 has them in it, and the upgrade takes them out."""
    path = tmp_path / "q.db"
    store = _CountingStore(path)
    store.suspend("big.test", now=T0)
    store.enqueue_many(backlog("big.test", 100), now=T0)
    held = store.enqueue(ready(), now=T0)
    store.set_held(held, True)
    store.close()
    conn = sqlite3.connect(path)
    with conn:  # as schema 15 left it: bit 2 unknown
        conn.execute("UPDATE recipients SET held = held & 1")
        # Then the upgrade to 16, as opening such a database runs it: run here by itself,
        # since winding the schema version back would run again later migrations that
        # are not repeatable (a CREATE TABLE).
        [script] = [script for number, script in migrations() if number == 16]
        for statement in _statements(script):
            conn.execute(statement)
    conn.close()
    store = _CountingStore(path)
    try:
        with closing(sqlite3.connect(path)) as check:
            (aside,) = check.execute("SELECT count(*) FROM recipients WHERE held & 2").fetchone()
        assert aside == 200  # the backlog's, not the held message's at ok.test
        assert store.next_due(now=T0) is None
        assert store.resume("big.test", now=T0) is True
        lease = store.lease(now=T0, limit=1000, lease_for=LEASE)
        assert lease is not None
        assert sum(len(item.recipients) for item in lease.items) == 200
        store.set_held(held, False)
        assert store.next_due(now=T0) == T0
    finally:
        store.close()

"""PostgreSQL keeps the recipients of a suspended destination and of a held message out of
its due indexes (``recipients.aside``, schema 20). Setting the flag too seldom only costs
speed; clearing it too seldom leaves a recipient waiting for good. Here: an enqueue or a
release racing the end of a suspension (resume, or a timed one found ended) ends with
nothing aside, whichever goes first, on two real connections held at the point where
one waits for the other's lock; and a queue an older mailstrom suspended and held is set
aside by the upgrade."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores.postgres import PostgresStore, aside, rows
from mailstrom.stores.postgres.sql import queries
from tests.support.pg_tables import schema_at

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
LEASE = timedelta(minutes=5)
QUERIES = {name: text.encode() for name, text in queries().items()}


def message(*recipients: str) -> PreparedMessage:
    return PreparedMessage(
        data=b"Subject: x\r\n\r\nx\r\n", envelope_from="app@sender.test", recipients=recipients
    )


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url, max_size=4) as s:
        yield s


def lock_waiters(url: str) -> None:
    """Wait until a session of ``url``'s database waits for a lock."""
    with psycopg.connect(url, autocommit=True) as look:
        for _ in range(1000):
            (waiting,) = look.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone() or (0,)
            if waiting:
                return
            time.sleep(0.01)
    raise AssertionError("no session waits for a lock")


def aside_count(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM recipients WHERE aside AND state IN ('queued', 'deferred')"
        ).fetchone() or (0,)
    return int(n)


def leased(store: PostgresStore, now: datetime) -> list[str]:
    lease = store.lease(now=now, limit=100, lease_for=LEASE)
    return [] if lease is None else [r.address for i in lease.items for r in i.recipients]


def ender(store: PostgresStore, how: str) -> tuple[datetime, Callable[[], object]]:
    """Suspend big.test; the time then, and the call that ends the suspension: resume,
    or (a suspension that ran out) the next_due that finds it ended."""
    if how == "resume":
        store.suspend("big.test", now=T0)
        return T0, lambda: store.resume("big.test", now=T0)
    store.suspend("big.test", now=T0, until=T0 + HOUR)
    return T0 + HOUR, lambda: store.next_due(now=T0 + HOUR)


@pytest.mark.parametrize("how", ["resume", "ended"])
def test_an_end_waits_for_an_enqueue_that_set_its_rows_aside_and_brings_them_back(
    store: PostgresStore, postgres_url: str, how: str
) -> None:
    """The enqueue read the suspension (FOR KEY SHARE) and set its rows aside; the end,
    begun before it committed, waits for it and then brings them back. Ended in one
    statement, the end's snapshot would predate those rows, and they would stay aside
    with no suspension left to end."""
    now, end = ender(store, how)
    mid = uuid.uuid4().hex
    with psycopg.connect(postgres_url) as enqueuing, ThreadPoolExecutor(1) as pool:
        params = rows.enqueue_params([message("a@big.test")], [mid], now=T0, held=False)
        enqueuing.execute(QUERIES["enqueue"], params)
        ending = pool.submit(end)
        lock_waiters(postgres_url)
        enqueuing.commit()
        ending.result(timeout=10)
    assert aside_count(postgres_url) == 0
    assert leased(store, now) == ["a@big.test"]


@pytest.mark.parametrize("how", ["resume", "ended"])
def test_an_enqueue_waits_for_an_end_under_way_and_sets_nothing_aside(
    store: PostgresStore, postgres_url: str, how: str
) -> None:
    now, _ = ender(store, how)
    with psycopg.connect(postgres_url) as ending, ThreadPoolExecutor(1) as pool:
        if how == "resume":
            assert aside.resume(ending, QUERIES, "big.test", now) is True
        else:
            aside.end_ended(ending, QUERIES, now)
        enqueuing = pool.submit(lambda: store.enqueue(message("a@big.test"), now=T0))
        lock_waiters(postgres_url)
        ending.commit()
        enqueuing.result(timeout=10)
    assert aside_count(postgres_url) == 0
    assert leased(store, now) == ["a@big.test"]


@pytest.mark.parametrize("how", ["resume", "ended"])
@pytest.mark.parametrize("method", ["set_held", "hold_many"])
def test_a_release_and_an_end_racing_leave_nothing_aside(
    store: PostgresStore, postgres_url: str, how: str, method: str
) -> None:
    """Each takes the suspension's lock before any recipient's: the release
    (FOR KEY SHARE) first, the end waits for it, then sees the message released and its
    rows aside; the end first, the release waits, then finds no suspension."""
    now, end = ender(store, how)
    mid = store.enqueue(message("a@big.test"), now=T0, hold=True)
    params: dict[str, object] = {"id": mid, "ids": [mid], "held": False}
    with psycopg.connect(postgres_url) as releasing, ThreadPoolExecutor(1) as pool:
        aside.lock_for_release(releasing, QUERIES, [mid])
        releasing.execute(QUERIES[method], params)
        ending = pool.submit(end)
        lock_waiters(postgres_url)
        releasing.commit()
        ending.result(timeout=10)
    assert aside_count(postgres_url) == 0
    assert leased(store, now) == ["a@big.test"]

    second = store.enqueue(message("b@big.test"), now=T0, hold=True)
    now, _ = ender(store, how)
    release = {
        "set_held": lambda: store.set_held(second, False),
        "hold_many": lambda: store.hold_many([second], False),
    }[method]
    with psycopg.connect(postgres_url) as ending, ThreadPoolExecutor(1) as pool:
        if how == "resume":
            assert aside.resume(ending, QUERIES, "big.test", now) is True
        else:
            aside.end_ended(ending, QUERIES, now)
        releasing_ = pool.submit(release)
        lock_waiters(postgres_url)
        ending.commit()
        releasing_.result(timeout=10)
    assert aside_count(postgres_url) == 0
    assert leased(store, now) == ["b@big.test"]


def test_an_upgraded_postgres_queue_sets_its_suspended_and_held_backlog_aside(
    postgres_url: str,
) -> None:
    """Schema 20 keeps the recipients of a suspended destination and of a held message out
    of the due indexes; a queue suspended and held under 19 has them in, and the upgrade
    takes them out (and only those)."""
    schema_at(postgres_url, 19)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO suspensions (domain, suspended_at) VALUES ('big.test', %s)", (T0,)
        )
        for mid, held, addresses in [
            ("m1", False, ["a@big.test", "b@ok.test"]),
            ("m2", True, ["c@ok.test"]),
            ("m3", False, ["d@ok.test"]),
        ]:
            conn.execute(
                "INSERT INTO messages (id, data, envelope_from, created_at, held, size)"
                " VALUES (%s, 'x', 'app@sender.test', %s, %s, 1)",
                (mid, T0, held),
            )
            for position, address in enumerate(addresses):
                conn.execute(
                    "INSERT INTO recipients (message_id, address, seq, position, domain, state,"
                    " next_attempt_at) SELECT %s, %s, seq, %s, %s, 'queued', %s"
                    " FROM messages WHERE id = %s",
                    (mid, address, position, address.split("@")[1], T0, mid),
                )
    with PostgresStore(postgres_url, max_size=2) as store:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            found = conn.execute(
                "SELECT address FROM recipients WHERE aside ORDER BY address"
            ).fetchall()
        assert [a for (a,) in found] == ["a@big.test", "c@ok.test"]
        assert sorted(leased(store, T0)) == ["b@ok.test", "d@ok.test"]
        assert store.next_due(now=T0) == T0 + LEASE  # the lease's end: nothing else due
        assert store.resume("big.test", now=T0) is True
        store.set_held("m2", False)
        assert sorted(leased(store, T0)) == ["a@big.test", "c@ok.test"]


def test_a_lease_whose_rows_say_a_suspension_ended_brings_it_back_and_leases_again(
    store: PostgresStore, postgres_url: str
) -> None:
    """This store knows the end of no suspension it did not make: a lease whose rows say
    one has ended gives them back, brings its recipients back and leases again, so that
    those due longest come first (was: they waited for the next lease)."""
    store.suspend("big.test", now=T0, until=T0 + HOUR)
    store.suspend("late.test", now=T0, until=T0 + HOUR)
    for address in ("a@big.test", "b@ok.test", "c@ok.test", "d@late.test"):
        store.enqueue(message(address), now=T0)
    later = T0 + HOUR
    with PostgresStore(postgres_url, max_size=2) as other:
        first = other.lease(now=later, limit=1, lease_for=LEASE)
        assert first is not None
        assert [r.address for i in first.items for r in i.recipients] == ["a@big.test"]
        assert leased(other, later) == ["b@ok.test", "c@ok.test", "d@late.test"]
    assert aside_count(postgres_url) == 0


def test_with_nothing_else_due_next_due_brings_back_what_another_process_suspended(
    store: PostgresStore, postgres_url: str
) -> None:
    """An empty lease asks only after the ends of the suspensions its own store made;
    next_due, which the worker asks after each empty lease, finds any."""
    store.suspend("big.test", now=T0, until=T0 + HOUR)
    store.enqueue(message("a@big.test"), now=T0)
    later = T0 + HOUR
    with PostgresStore(postgres_url, max_size=2) as other:
        assert leased(other, later) == []
        assert other.next_due(now=later) == T0
        assert leased(other, later) == ["a@big.test"]
    assert aside_count(postgres_url) == 0

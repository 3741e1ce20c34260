"""A statement of the PostgreSQL store waits for another session's lock for
``lock_timeout`` at most (stores/postgres/locks.py): an operator's ``LOCK TABLE`` left
open held ``enqueue`` (a web request's ``send_email()``) and the worker's leases and
records for as long as it was held. The timeouts here are short (the store URL's
``lock_timeout``) so that the tests stay fast."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from mailstrom import Email, Mailstrom, MessageStatus, RecipientState
from mailstrom.errors import StoreLocked
from mailstrom.message import prepare
from mailstrom.readmodel.base import Overview, QueuePage, QueueQuery, QueueView
from mailstrom.readmodel.postgres import PostgresReadModel
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.pgbouncer import ThrowawayPgBouncer
from tests.fixtures.postgres import ThrowawayPostgres
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import Results, loopback_config
from tests.support.pg_tables import small_message

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
RELEASE_AFTER = 8.0
"""A held lock is let go after this long whatever happens: without a bound (the old
code), the blocked call returns then instead of hanging the test run."""


@contextlib.contextmanager
def table_locked(url: str, table: str) -> Iterator[int]:
    """Another session holds ACCESS EXCLUSIVE on ``table`` (its pid yielded) until the
    block ends, or :data:`RELEASE_AFTER` at the latest."""
    holder = psycopg.connect(url.partition("?")[0])
    holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    release = threading.Timer(RELEASE_AFTER, holder.rollback)  # psycopg locks the connection
    release.daemon = True
    release.start()
    try:
        yield holder.info.backend_pid
    finally:
        release.cancel()
        holder.close()


def blocked_for(call: Callable[[], object]) -> tuple[float, BaseException | None]:
    began = time.monotonic()
    try:
        call()
    except Exception as exc:
        return time.monotonic() - began, exc
    return time.monotonic() - began, None


def message_count(url: str) -> int:
    with psycopg.connect(url.partition("?")[0]) as conn:
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("table", ["recipients", "messages"])
def test_enqueue_gives_up_on_a_held_table_lock_and_goes_on_after(
    postgres_url: str, table: str
) -> None:
    with PostgresStore(postgres_url + "?lock_timeout=1s", max_size=2) as store:
        with table_locked(postgres_url, table) as pid:
            took, exc = blocked_for(lambda: store.enqueue(small_message("a@example.org"), now=T0))
        assert isinstance(exc, StoreLocked), exc
        assert 0.9 < took < 3, took
        assert "enqueue waited 1s for a lock held by another session" in str(exc)
        assert f"pid {pid} holds AccessExclusiveLock on {table}" in str(exc)
        assert "try again" in str(exc)
        assert message_count(postgres_url) == 0  # nothing half-written
        mid = store.enqueue(small_message("a@example.org"), now=T0)
        assert store.status(mid).recipients[0].state is RecipientState.QUEUED
    assert message_count(postgres_url) == 1


def test_the_worker_side_calls_give_up_too(postgres_url: str) -> None:
    with PostgresStore(postgres_url + "?lock_timeout=300ms", max_size=2) as store:
        store.enqueue(small_message("a@example.org"), now=T0)
        lease_for = timedelta(minutes=5)
        lease = store.lease(now=T0, limit=5, lease_for=lease_for)
        assert lease is not None
        with table_locked(postgres_url, "recipients"):
            for call in (
                lambda: store.lease(now=T0, limit=5, lease_for=lease_for),
                lambda: store.extend(lease, until=T0 + lease_for),
                lambda: store.release(lease),
            ):
                took, exc = blocked_for(call)
                assert isinstance(exc, StoreLocked), exc
                assert took < 2, took


@pytest.mark.parametrize(
    ("setting", "suffix"),
    [
        (None, "?options=-c%20lock_timeout%3D400"),  # the URL's own libpq options
        ("400ms", ""),  # ALTER DATABASE ... SET lock_timeout: the operator's, not ours
        ("20s", "?lock_timeout=400ms"),  # the store URL's parameter wins over the database's
    ],
)
def test_the_operators_own_lock_timeout_wins_over_the_default(
    postgres_server: ThrowawayPostgres, postgres_url: str, setting: str | None, suffix: str
) -> None:
    if setting is not None:
        dbname = postgres_url.rsplit("/", 1)[1]
        with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {dbname} SET lock_timeout = '{setting}'")
    with (
        PostgresStore(postgres_url + suffix, max_size=1) as store,
        table_locked(postgres_url, "recipients"),
    ):
        took, exc = blocked_for(lambda: store.enqueue(small_message("a@example.org"), now=T0))
    assert isinstance(exc, StoreLocked), exc
    assert "waited 400ms" in str(exc)
    assert took < 2, took  # not mailstrom's 30 s, nor the database's 20 s


def test_a_worker_rides_out_a_held_lock(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, postgres_url: str
) -> None:
    """Leases, records and heartbeats fail while another session holds the recipients
    table; the worker keeps its results, says so in its status, and finishes by itself
    once the lock is gone: every recipient delivered once and recorded once."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    count = 60
    with PostgresStore(postgres_url + "?lock_timeout=200ms") as store:
        ids = [
            store.enqueue(
                prepare(Email(from_="a@sender.test", to=[f"u{i}@example.org"], text=f"{i}")),
                now=datetime.now(UTC),
            )
            for i in range(count)
        ]
        results = Results()
        config = loopback_config(dns_server, mx.port, lease_batch=5, max_connections=2)
        with Mailstrom(config, store=store, on_result=results, worker="thread") as ms:
            mx.wait_for_messages(1, timeout=10)
            with table_locked(postgres_url, "recipients"):
                assert wait_until(lambda: "lock" in (ms.worker_status.store_error or ""), 10)
                time.sleep(1.5)  # hold the lock many lock timeouts over, as an operator would
                assert ms.worker_status.running
            results.wait_count(count, timeout=30)
            assert wait_until(lambda: ms.worker_status.store_error is None, 10)
            assert wait_until(lambda: ms.worker_status.unrecorded == 0, 10)
        statuses = [store.status(i).recipients[0] for i in ids]
    assert [(s.state, s.attempts) for s in statuses] == [(RecipientState.DELIVERED, 1)] * count
    assert sorted(m.rcpt_tos[0] for m in mx.messages) == sorted(
        f"u{i}@example.org" for i in range(count)
    )


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)  # polling a status snapshot; nothing to wait on
    return predicate()


# --- behind PgBouncer in transaction pooling --------------------------------------------


@pytest.fixture
def bouncer(postgres_server: ThrowawayPostgres, postgres_url: str) -> Iterator[str]:
    """The URL of ``postgres_url``'s database through PgBouncer (migrated directly)."""
    PostgresStore(postgres_url).close()
    pooler = ThrowawayPgBouncer(
        server_port=postgres_server.port, dbname=postgres_url.rsplit("/", 1)[1]
    )
    try:
        pooler.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)  # a silently skipped test hides breakage
    try:
        yield pooler.url
    finally:
        pooler.stop()


def server_lock_timeouts(url: str) -> set[str]:
    """``lock_timeout`` on each of PgBouncer's two server connections, as a client that
    set nothing sees it: two transactions open at once hold one each."""
    with psycopg.connect(url) as first, psycopg.connect(url) as second:
        return {
            str(conn.execute("SHOW lock_timeout").fetchone()[0])  # type: ignore[index]
            for conn in (first, second)
        }


def test_behind_pgbouncer_the_bound_holds_and_leaks_to_no_other_client(
    bouncer: str, postgres_url: str
) -> None:
    url = bouncer + "?prepare_threshold=none&lock_timeout=500ms"
    with PostgresStore(url, max_size=2) as store:
        for i in range(10):  # on both server connections, in turn
            store.enqueue(small_message(f"r{i}@example.org"), now=T0)
        assert server_lock_timeouts(bouncer) == {"0"}
        with table_locked(postgres_url, "recipients") as pid:
            took, exc = blocked_for(lambda: store.enqueue(small_message("a@example.org"), now=T0))
        assert isinstance(exc, StoreLocked), exc
        assert took < 2, took
        assert f"waited 500ms for a lock held by another session (pid {pid}" in str(exc)
        store.enqueue(small_message("b@example.org"), now=T0)
        assert server_lock_timeouts(bouncer) == {"0"}
    assert message_count(postgres_url) == 11


# --- the dashboard's overview ------------------------------------------------------------


def test_the_dashboards_overview_reads_one_snapshot(postgres_url: str) -> None:
    """The overview is several SELECTs in one transaction, but at READ COMMITTED each saw
    the queue as it was when that SELECT began: a result committed between two of them
    showed numbers that never held together (a recipient counted queued and no oldest
    pending message). Here the overview waits on a lock after its first read, and a
    worker's result is committed meanwhile; its numbers must agree with each other."""
    with PostgresStore(postgres_url) as store:
        store.enqueue(small_message("a@example.org"), now=T0)
        model = PostgresReadModel(postgres_url)
        holder = psycopg.connect(postgres_url.partition("?")[0])
        watcher = psycopg.connect(postgres_url.partition("?")[0], autocommit=True)
        seen: list[Overview] = []
        try:
            holder.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            reading = threading.Thread(target=lambda: seen.append(model.overview(now=T0)))
            reading.start()
            waits = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass"
            assert wait_until(lambda: watcher.execute(waits, ("messages",)).fetchone() == (1,), 10)
            holder.execute("UPDATE recipients SET state = 'delivered', finished_at = %s", (T0,))
            holder.commit()
            reading.join(30)
        finally:
            holder.close()
            watcher.close()
            model.close()
    [overview] = seen
    queued = overview.by_state[RecipientState.QUEUED]
    assert (queued, overview.oldest_pending is not None) in {(1, True), (0, False)}, overview


def test_a_dashboard_page_and_its_messages_are_read_from_one_snapshot(
    postgres_url: str,
) -> None:
    """A page is chosen by one SELECT and its messages read by another, at READ COMMITTED
    each seeing what was committed when it began: a message purged between the two left
    a hole in the page (here an empty page with a cursor to the next one), where SQLite
    reads the page and its messages in one snapshot. Here the second SELECT waits on a
    lock of the recipients table, which the first does not read, while the page's only
    message is purged."""
    with PostgresStore(postgres_url) as store:
        store.enqueue(small_message("a@example.org"), now=T0)
        newest = store.enqueue(small_message("b@example.org"), now=T0 + timedelta(seconds=1))
        model = PostgresReadModel(postgres_url)
        holder = psycopg.connect(postgres_url.partition("?")[0])
        watcher = psycopg.connect(postgres_url.partition("?")[0], autocommit=True)
        seen: list[QueuePage] = []
        query = QueueQuery(view=QueueView.ALL, limit=1)
        try:
            holder.execute("LOCK TABLE recipients IN ACCESS EXCLUSIVE MODE")
            reading = threading.Thread(target=lambda: seen.append(model.queue_page(query, now=T0)))
            reading.start()
            waits = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass"
            blocked = ("recipients",)
            assert wait_until(lambda: watcher.execute(waits, blocked).fetchone() == (1,), 10)
            holder.execute("DELETE FROM recipients WHERE message_id = %s", (newest,))
            holder.execute("DELETE FROM messages WHERE id = %s", (newest,))
            holder.commit()
            reading.join(30)
        finally:
            holder.close()
            watcher.close()
            model.close()
    [page] = seen
    assert [m.id for m in page.messages] == [newest], page
    assert page.next is not None


# --- a message's status and its destination's pause ---------------------------------------


@pytest.mark.parametrize("reader", ["status", "recent"])
def test_a_status_and_its_destinations_pause_are_read_from_one_snapshot(
    postgres_url: str, reader: str
) -> None:
    """``status()`` (and ``query()``/``recent()``) read the recipients by one SELECT and
    their destinations' pauses by another, each at READ COMMITTED: a throttle committed
    between the two showed the recipient paused with the due time it had before the
    pause (and a resume, due at the pause's end and paused by nothing). Here the second
    SELECT waits on a lock of ``destination_throttles``, which the first does not read,
    while a worker's throttle is committed."""
    due = datetime.now(UTC).replace(microsecond=0)
    until = due + timedelta(hours=1)
    with PostgresStore(postgres_url) as store:
        mid = store.enqueue(small_message("a@example.org"), now=due)
        holder = psycopg.connect(postgres_url.partition("?")[0])
        watcher = psycopg.connect(postgres_url.partition("?")[0], autocommit=True)
        seen: list[object] = []
        read = (lambda: store.status(mid)) if reader == "status" else (lambda: store.recent()[0])
        try:
            holder.execute("LOCK TABLE destination_throttles IN ACCESS EXCLUSIVE MODE")
            reading = threading.Thread(target=lambda: seen.append(read()))
            reading.start()
            waits = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass"
            blocked = ("destination_throttles",)
            assert wait_until(lambda: watcher.execute(waits, blocked).fetchone() == (1,), 10)
            holder.execute(
                "INSERT INTO destination_throttles (destination, until, strikes, reply, since)"
                " VALUES ('example.org', %s, 1, '421 slow down', %s)",
                (until, due),
            )
            holder.execute(
                "UPDATE recipients SET state = 'deferred', next_attempt_at = %s,"
                " throttled_by = 'example.org'",
                (until,),
            )
            holder.commit()
            reading.join(30)
        finally:
            holder.close()
            watcher.close()
    [status] = seen
    assert isinstance(status, MessageStatus)
    [r] = status.recipients
    assert (r.state, r.next_attempt_at, r.throttle is not None) in {
        (RecipientState.QUEUED, due, False),
        (RecipientState.DEFERRED, until, True),
    }, r

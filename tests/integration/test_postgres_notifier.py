"""The NOTIFY after an enqueue comes from the store's notifier thread, after the commit
(stores/postgres/notifier.py): no committed mail is left without a wake-up that follows
it, bursts share NOTIFYs, and the enqueue transaction itself no longer notifies (which
serialised every client's commits)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from mailstrom.stores.postgres import PostgresStore
from mailstrom.stores.postgres.sql import CHANNEL
from tests.fixtures.postgres import ThrowawayPostgres
from tests.support.pg_tables import small_message

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
THREADS = 8
EACH = 50


def queued(store: PostgresStore) -> int:
    return sum(store.stats().by_state.values())


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url, max_size=THREADS + 2) as s:
        yield s


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_the_last_wake_up_comes_after_the_last_commit_and_bursts_share_them(
    postgres_url: str, store: PostgresStore
) -> None:
    # A worker's view: on each wake-up, how much mail is committed.
    seen: list[int] = []
    with PostgresStore(postgres_url) as watcher_store:
        stop = watcher_store.watch(lambda: seen.append(queued(watcher_store)))
        try:
            start = threading.Barrier(THREADS)

            def send(t: int) -> None:
                start.wait(10)
                for i in range(EACH):
                    store.enqueue(small_message(f"r{t}-{i}@example.org"), now=T0)

            threads = [threading.Thread(target=send, args=(t,)) for t in range(THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            total = THREADS * EACH
            assert queued(store) == total
            # Whatever came before, a wake-up followed the last commit and saw it all.
            assert wait_for(lambda: bool(seen) and seen[-1] == total), seen[-5:]
        finally:
            stop()
    assert wait_for(lambda: store._notifier.sent >= 1)
    assert store._notifier.sent < total  # enqueues close together shared a NOTIFY


def test_the_enqueue_transaction_itself_sends_no_notify(
    postgres_url: str, store: PostgresStore
) -> None:
    # Held mail wakes nobody, and the statement that queues it never notified: only the
    # notifier does, so a held message leaves the notifier idle and the channel silent.
    with psycopg.connect(postgres_url, autocommit=True) as listen:
        listen.execute(f"LISTEN {CHANNEL}")
        store.enqueue(small_message("held@example.org"), now=T0, hold=True)
        assert list(listen.notifies(timeout=0.5)) == []
        assert store._notifier.sent == 0
        store.enqueue(small_message("ready@example.org"), now=T0)
        # Counted once the NOTIFY statement returned, which can be after it was delivered.
        assert wait_for(lambda: store._notifier.sent == 1)
        # Exactly the notifier's one: a NOTIFY in the enqueue's own transaction (a separate
        # transaction, so not folded into it) would arrive as a second.
        assert [n.channel for n in listen.notifies(timeout=1.0)] == [CHANNEL]


def test_the_notify_leaves_no_setting_on_its_connection(postgres_url: str) -> None:
    """Behind a transaction-pooling proxy (PgBouncer), a session setting would stay on the
    server connection and govern the next client's transactions: here, make its commits
    skip the flush. The wake-up's own setting ends with its transaction."""
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        dbname = postgres_url.rsplit("/", 1)[1]
        admin.execute(f"ALTER DATABASE {dbname} SET synchronous_commit = on")
    with PostgresStore(postgres_url) as store:
        store.enqueue(small_message("a@example.org"), now=T0)
        assert wait_for(lambda: store._notifier.sent == 1)
        conn = store._notifier.connection
        assert conn is not None
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_the_notifier_reconnects_after_a_server_restart() -> None:
    with ThrowawayPostgres() as server:
        url = server.create_database()
        with PostgresStore(url) as store, PostgresStore(url) as watcher_store:
            woken = threading.Event()
            stop = watcher_store.watch(woken.set)
            try:
                store.enqueue(small_message("before@example.org"), now=T0)
                assert woken.wait(10)
                server.restart(down_for=0.5)
                # The pool and the listener reconnect on their own; so does the notifier,
                # whose connection died with the server.
                woken.clear()
                assert wait_for(lambda: _enqueued(store), timeout=20)
                assert woken.wait(20)
            finally:
                stop()
        assert wait_for(lambda: store._notifier.sent >= 2)


def _enqueued(store: PostgresStore) -> bool:
    try:
        store.enqueue(small_message("after@example.org"), now=T0)
    except Exception:
        return False
    return True


def test_close_stops_the_thread(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    store.enqueue(small_message("a@example.org"), now=T0)
    thread = store._notifier._thread
    store.close()
    assert thread is not None and not thread.is_alive()

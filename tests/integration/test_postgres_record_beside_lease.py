"""On PostgreSQL a result is written while a lease is still running (issue #8's window).

PostgreSQL records and leases in transactions of their own (``record_then_lease``), run
in a thread. The worker used to make them one call, so a result that came back while a
lease ran waited for that lease to end before its own write began. A held-up lease (a
loaded server, a lock) so kept delivered recipients unrecorded, the window in which a
killed worker's mail goes out again, for as long as it took: in one run of the chaos
test, leases took up to 35 ms and results waited up to 38 ms for their commit (p99 29
ms; on SQLite 15 ms, p99 11 ms). Here a lock held on ``suppressions``, which every lease
reads and no record or enqueue touches (an enqueue reads ``suspensions``), holds the
lease for as long as the test likes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import psycopg
import pytest

from mailstrom import Mailstrom, RecipientState
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import Results, loopback_config
from tests.support.pg_tables import small_message

pytestmark = pytest.mark.postgres

HOLD_AT_MOST = 30.0
"""The lock is let go after this long whatever happens, so that no run hangs."""


@contextmanager
def leases_held(url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Another session holds ``suppressions`` (read by every lease, by no record or
    enqueue) until the block ends; the yielded connection watches the server."""
    holder = psycopg.connect(url)
    holder.execute("LOCK TABLE suppressions IN ACCESS EXCLUSIVE MODE")
    release = threading.Timer(HOLD_AT_MOST, holder.rollback)
    release.daemon = True
    release.start()
    try:
        with psycopg.connect(url, autocommit=True) as watcher:
            yield watcher
    finally:
        release.cancel()
        holder.close()


def settled(url: str) -> None:
    """Wait until no other session runs a statement: the worker's look for more work
    after a@'s lease has ended, and nothing else wakes it before b@ is queued."""
    with psycopg.connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + 10
        while True:
            (busy,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                " AND pid <> pg_backend_pid() AND datname = current_database()"
            ).fetchone() or (0,)
            if not busy:
                return
            assert time.monotonic() < deadline, f"{busy} statements still running"
            time.sleep(0.01)  # polling the server's view; nothing to wait on


LEASES = ("-- Lock due recipients", "-- The lease of")
"""How the lease statements begin (stores/sql/postgres/queries.sql): the server shows
only their first kilobyte."""


def lease_waits(watcher: psycopg.Connection[tuple[object, ...]]) -> bool:
    return any(query.startswith(LEASES) for query in waiting(watcher))


def waiting(watcher: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    """The statements waiting for the lock on ``suppressions``."""
    found = watcher.execute(
        "SELECT a.query FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE NOT l.granted AND l.relation = 'suppressions'::regclass"
    ).fetchall()
    return [str(query) for (query,) in found]


def test_a_result_is_recorded_while_a_lease_waits(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, postgres_url: str
) -> None:
    mx = smtp_server(starttls=False)
    mx.stall_on = "dot"  # the final reply comes when the test says (it drops the connection)
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    results = Results()
    with PostgresStore(postgres_url + "?lock_timeout=60s") as store:
        first = store.enqueue(small_message("a@example.org"), now=datetime.now(UTC))
        # No poll: only the wake-up below leases while the lock is held.
        config = loopback_config(dns_server, mx.port, poll_interval=60.0)
        with Mailstrom(config, store=store, on_result=results, worker="thread") as ms:
            mx.wait_for_received(1)  # a@ is on the wire: its content sent, no reply yet
            settled(postgres_url)
            with leases_held(postgres_url) as watcher:
                store.enqueue(small_message("b@example.org"), now=datetime.now(UTC))
                deadline = time.monotonic() + 10
                while not lease_waits(watcher):
                    # The wake-up's lease waits for the lock.
                    assert time.monotonic() < deadline, waiting(watcher)
                    time.sleep(0.01)  # polling the server's view; nothing to wait on
                mx.stop()  # a@'s transaction ends (no reply: deferred) while the lease waits
                [result] = results.wait_count(1, timeout=15)
                # Recorded beside the lease, not after it:
                assert lease_waits(watcher)
            assert result.address == "a@example.org"
            recipient = store.status(first).recipients[0]
            assert (recipient.state, recipient.attempts) == (RecipientState.DEFERRED, 1)
            assert ms.worker_status.running

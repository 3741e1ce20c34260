"""Behind PgBouncer in transaction pooling, clients take turns on the server's connections,
so what a client prepares on one is missing on the next, or is another client's statement
under the same name. ``?prepare_threshold=none`` in the store URL keeps every statement
unprepared (stores/postgres/connect.py); the URL is otherwise the pooler's own."""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from mailstrom.readmodel import open_read_model
from mailstrom.status import RecipientState
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.pgbouncer import ThrowawayPgBouncer
from tests.fixtures.postgres import ThrowawayPostgres
from tests.fixtures.tcp_proxy import TCPProxy
from tests.support.pg_tables import small_message

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)


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


def prepared(conn: psycopg.Connection[object]) -> int:
    row = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
    return int(row[0]) if row else 0


def test_none_prepares_nothing_on_the_server(postgres_url: str) -> None:
    with PostgresStore(postgres_url + "?prepare_threshold=none", max_size=1) as store:
        for i in range(10):
            store.enqueue(small_message(f"r{i}@example.org"), now=T0)
        with store._pool.connection() as conn:
            assert prepared(conn) == 0
    with PostgresStore(postgres_url, max_size=1) as store:  # psycopg's default: the 5th
        for i in range(10):
            store.enqueue(small_message(f"s{i}@example.org"), now=T0)
        with store._pool.connection() as conn:
            assert prepared(conn) >= 1


def test_clients_taking_turns_through_pgbouncer_queue_lease_and_record(bouncer: str) -> None:
    errors: list[BaseException] = []
    ids: list[str] = []
    with PostgresStore(bouncer + "?prepare_threshold=none", max_size=4) as store:

        def work(t: int) -> None:
            try:
                for i in range(30):
                    ids.append(store.enqueue(small_message(f"r{t}-{i}@example.org"), now=T0))
                    store.lease(now=T0, limit=3, lease_for=LEASE)
                    store.stats()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert len(set(ids)) == 120
        status = store.status(ids[0])
        assert status.recipients[0].state is RecipientState.QUEUED


_UNTYPED = {80877103, 80877104}
"""SSLRequest and GSSENCRequest: a client's first message may be one of these, then the
startup message; all three carry no type byte."""


def frontend_messages(sent: bytes) -> list[str]:
    """The types of the typed messages a PostgreSQL client sent (protocol 3), in order."""
    pos, types = 0, []
    while pos + 8 <= len(sent):  # the untyped ones: length, then a code or the version
        length, code = struct.unpack_from("!ii", sent, pos)
        pos += length
        if code not in _UNTYPED:
            break  # that was the startup message
    while pos + 5 <= len(sent):
        types.append(chr(sent[pos]))
        pos += 1 + struct.unpack_from("!i", sent, pos + 1)[0]
    return types


def test_behind_pgbouncer_no_transaction_ends_on_a_flush(
    bouncer: str,
) -> None:
    # PgBouncer before 1.21 keeps a client's server connection when a Flush arrives with
    # the server's ReadyForQuery, and waits for the client's next message: a store
    # connection idle in the pool then held one of the pooler's few server connections,
    # and every other client queued for it up to query_wait_timeout (two minutes). That
    # is how psycopg's pipelines end (Sync, then Flush), so nothing here may use one.
    host, port = bouncer.split("@", 1)[1].split("/", 1)[0].split(":")
    with contextlib.closing(TCPProxy((host, int(port)), record=True)) as proxy:
        url = bouncer.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
        with PostgresStore(url + "?prepare_threshold=none", max_size=1) as store:
            mid = store.enqueue(small_message("r@example.org"), now=T0)
            lease = store.lease(now=T0, limit=3, lease_for=LEASE)
            assert lease is not None and len(lease.items) == 1
            store.stats()
            assert store.status(mid).recipients[0].state is RecipientState.QUEUED
        sent = [frontend_messages(bytes(data)) for data in proxy.upstream]
    assert any("S" in types for types in sent)  # the calls went through the proxy
    assert all("H" not in types for types in sent), sent


def test_behind_pgbouncer_pooled_connections_keep_no_notifications(
    bouncer: str, postgres_url: str
) -> None:
    # A LISTEN through transaction pooling stays on the server connection that ran it
    # (a worker pointed at the pooler: its watch hears nothing, as the guide says), and
    # every later client of that server connection is handed the queue's NOTIFYs. psycopg
    # keeps those nobody reads, without bound: each pooled connection of every mailstrom
    # process behind the pooler grew by one per wake-up for as long as it lived.
    with PostgresStore(bouncer + "?prepare_threshold=none", max_size=1) as store:
        unwatch = store.watch(lambda: None)
        try:
            with PostgresStore(postgres_url) as direct:
                for i in range(20):
                    direct.enqueue(small_message(f"r{i}@example.org"), now=T0)
                    store.stats()  # on the server connection that LISTENed, in turn
            store.stats()
            with store._pool.connection() as conn:
                # What psycopg keeps for a notifies() that never comes (psycopg 3.2.4 on;
                # before, it dropped them): read without notifies(), which would take them.
                kept = list(getattr(conn, "_notifies_backlog", None) or ())
        finally:
            unwatch()
    assert kept == []


def test_behind_pgbouncer_the_dashboard_overview_reads_one_snapshot(bouncer: str) -> None:
    """The read model's overview reads its numbers in one REPEATABLE READ transaction,
    begun with ``SET TRANSACTION``; behind a pooler every statement of a transaction
    first bounds its lock wait with a SELECT, which takes the snapshot, and the SET then
    failed ("must be called before any query"): the dashboard's overview never showed
    through PgBouncer. The transaction now begins at that isolation."""
    with PostgresStore(bouncer + "?prepare_threshold=none") as store:
        store.enqueue(small_message("a@example.org"), now=T0)
        model = open_read_model(store, cache_seconds=0)
        try:
            overview = model.overview(now=T0)
            assert model.destinations()  # a view of one statement, before and after
        finally:
            model.close()
    assert (overview.messages, overview.by_state[RecipientState.QUEUED]) == (1, 1)

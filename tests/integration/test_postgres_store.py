"""PostgreSQL specifics of PostgresStore (the generic behaviour is in tests/contract):
migrations, SKIP LOCKED leasing across store objects, lease tokens, LISTEN/NOTIFY, driver
errors, and the listener thread's lifetime."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from mailstrom.errors import StoreCorrupt, StoreError, StoreUnreachable, UnknownMessage
from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.prepared import PreparedMessage
from mailstrom.readmodel import open_read_model
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores.base import RecipientResult, Store
from mailstrom.stores.postgres import PostgresStore, migrate
from mailstrom.stores.postgres.sql import migrations
from tests.contract.test_held_finished import FINISHES
from tests.fixtures.postgres import ThrowawayPostgres, _free_port
from tests.fixtures.tcp_proxy import TCPProxy

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)


def message(*recipients: str) -> PreparedMessage:
    return PreparedMessage(
        data=b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n",
        envelope_from="a@example.com",
        recipients=recipients,
        subject="hi",
    )


def delivered(message_id: str, address: str, at: datetime, token: str) -> RecipientResult:
    return RecipientResult(
        message_id=message_id,
        address=address,
        lease_token=token,
        state=RecipientState.DELIVERED,
        attempt=Attempt(
            at=at, outcome=AttemptOutcome.DELIVERED, reply=SMTPReply(code=250, text="ok")
        ),
    )


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url, max_size=4) as s:
        yield s


def listener_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mailstrom-pg-listen"]


# --- migrations ----------------------------------------------------------------------


def schema_versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY 1")]


def test_migrate_creates_schema_once(postgres_url: str) -> None:
    latest = migrations()[-1].version
    every = [m.version for m in migrations()]
    assert migrate(postgres_url) == latest
    assert migrate(postgres_url) == latest
    assert schema_versions(postgres_url) == every
    with PostgresStore(postgres_url) as s:  # opening migrates again: a no-op
        assert isinstance(s, Store)
    assert schema_versions(postgres_url) == every


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
def test_concurrent_opens_migrate_exactly_once(postgres_url: str, isolation: str) -> None:
    """At REPEATABLE READ by default, an opener that waited for the migration lock read
    the applied versions from a snapshot taken before it waited, and applied them again
    ("relation messages already exists")."""
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            f"ALTER DATABASE {admin.info.dbname} SET default_transaction_isolation = '{isolation}'"
        )
    start = threading.Barrier(6)

    def open_and_enqueue(_: int) -> str:
        start.wait(timeout=30)
        with PostgresStore(postgres_url, max_size=2) as s:
            return s.enqueue(message("x@example.org"), now=T0)

    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(open_and_enqueue, range(6)))
    assert len(set(ids)) == 6
    assert schema_versions(postgres_url) == [m.version for m in migrations()]


def test_newer_schema_than_known_is_refused(postgres_url: str) -> None:
    """StoreCorrupt, as for SQLite: a worker starting over it must not wait (it was a
    plain StoreError, and a worker process would have retried it for ever)."""
    migrate(postgres_url)
    with psycopg.connect(postgres_url) as conn:
        conn.execute("INSERT INTO schema_version (version, name) VALUES (99, 'future')")
    with pytest.raises(StoreCorrupt, match="newer"):
        PostgresStore(postgres_url)


@pytest.mark.parametrize("versions", [["1", "1.1"], ["1", "2"]])
def test_another_tools_schema_version_table_is_refused(
    postgres_url: str, versions: list[str]
) -> None:
    """A database whose ``schema_version`` table is another tool's (Flyway before 5 keeps
    its history under that name, its versions text): "1.1" escaped the store as a
    ValueError, and "1", "2" were taken for mailstrom's versions, the migrations from 3
    on then failing with a passing StoreError retried for ever. StoreCorrupt, saying
    whose table is in the way, the database left as it was."""
    with psycopg.connect(postgres_url) as conn:
        conn.execute(
            "CREATE TABLE schema_version (installed_rank integer PRIMARY KEY,"
            " version varchar(50), description varchar(200), script varchar(1000))"
        )
        for rank, version in enumerate(versions):
            conn.execute(
                "INSERT INTO schema_version VALUES (%s, %s, 'x', 'V.sql')", (rank, version)
            )
    with pytest.raises(StoreCorrupt, match="another program's") as raised:
        PostgresStore(postgres_url, timeout=5)
    assert "search_path" in str(raised.value)
    with pytest.raises(StoreCorrupt, match="another program's"):
        migrate(postgres_url)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass('messages')").fetchone() == (None,)


def test_another_programs_table_of_the_same_name_is_refused(postgres_url: str) -> None:
    """An application's own ``messages`` table in the schema mailstrom would create its
    tables in: migrating failed with "relation messages already exists", a plain
    StoreError that a starting worker retried for ever. StoreCorrupt, naming the table."""
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE messages (id serial PRIMARY KEY, body text)")
    with pytest.raises(StoreCorrupt, match="messages") as raised:
        PostgresStore(postgres_url, timeout=5)
    assert "search_path" in str(raised.value)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,)


def test_a_newer_schema_advises_a_restart_as_well_as_an_upgrade(
    postgres_url: str, store: PostgresStore
) -> None:
    """It said only "upgrade mailstrom": a process running while another one migrated the
    database runs the code it started with, and the mailstrom installed may be the new
    one already (a restart is what it needs). At open, as under a store already open,
    this mailstrom cannot tell which: it says both."""
    store.enqueue(message("a@example.org"), now=T0)
    migrated_by_a_newer_mailstrom(postgres_url)
    with pytest.raises(StoreCorrupt, match="newer") as raised:
        store.release_dead_holders("h1")
    with pytest.raises(StoreCorrupt, match="while this one had it open") as again:
        store.enqueue(message("b@example.org"), now=T0)
    with pytest.raises(StoreCorrupt, match="newer") as at_open:
        PostgresStore(postgres_url)
    for error in (raised.value, again.value, at_open.value):
        assert "upgrade mailstrom" in str(error)
        assert "restart this process" in str(error)


def migrated_by_a_newer_mailstrom(url: str, *statements: str) -> None:
    """What a newer mailstrom's migration does, from another session: ``statements``, then
    its version row."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        for statement in statements:
            conn.execute(statement.encode())
        conn.execute("INSERT INTO schema_version (version, name) VALUES (9999, 'newer')")


def test_a_beat_finds_a_schema_a_newer_mailstrom_migrated_to_meanwhile(
    postgres_url: str, store: PostgresStore
) -> None:
    """A store open before the migration went on with statements written for the schema
    it knows; a holder's beat now reads the version, and every later call fails for good
    before it sends anything."""
    store.enqueue(message("a@example.org"), now=T0)
    held = store.lease(now=T0, limit=10, lease_for=LEASE)
    assert held is not None
    migrated_by_a_newer_mailstrom(postgres_url)
    with pytest.raises(StoreCorrupt, match="at version 9999, newer than this mailstrom knows"):
        store.release_dead_holders("h1")
    with pytest.raises(StoreCorrupt, match="migrated it while this one had it open"):
        store.release(held)
    with pytest.raises(StoreCorrupt, match="newer"):
        store.enqueue(message("b@example.org"), now=T0)
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT address, lease_token IS NOT NULL FROM recipients")
        assert rows.fetchall() == [("a@example.org", True)]  # left to the newer workers


def test_a_statement_a_newer_schema_broke_is_no_passing_trouble(
    postgres_url: str, store: PostgresStore
) -> None:
    """ "column s.until does not exist" read as a passing StoreError, retried for ever."""
    store.enqueue(message("a@example.org"), now=T0)
    migrated_by_a_newer_mailstrom(
        postgres_url, "ALTER TABLE suspensions RENAME COLUMN until TO ends_at"
    )
    with pytest.raises(StoreCorrupt, match="at version 9999, newer"):
        store.lease(now=T0, limit=10, lease_for=LEASE)
    with pytest.raises(StoreCorrupt, match="newer"):
        store.stats()


def test_a_broken_statement_on_a_known_schema_stays_a_passing_trouble(
    postgres_url: str, store: PostgresStore
) -> None:
    """Only a newer schema makes a missing column permanent."""
    store.enqueue(message("a@example.org"), now=T0)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE suspensions RENAME COLUMN until TO ends_at")
    with pytest.raises(StoreError, match="does not exist") as raised:
        store.lease(now=T0, limit=10, lease_for=LEASE)
    assert not isinstance(raised.value, StoreCorrupt)


# --- leasing -------------------------------------------------------------------------


def test_skip_locked_leasing_from_four_store_objects(
    postgres_url: str, store: PostgresStore
) -> None:
    batch = [message(*(f"r{i}-{j}@d{j % 3}.example" for j in range(10))) for i in range(200)]
    ids = store.enqueue_many(batch, now=T0)
    expected = {(mid, a) for mid, m in zip(ids, batch, strict=True) for a in m.recipients}
    assert len(expected) == 2000

    start = threading.Barrier(4)

    def drain(_: int) -> list[tuple[str, str]]:
        got: list[tuple[str, str]] = []
        with PostgresStore(postgres_url, max_size=1) as own:
            start.wait(timeout=30)
            while (lease := own.lease(now=T0, limit=37, lease_for=LEASE)) is not None:
                got.extend((i.message_id, r.address) for i in lease.items for r in i.recipients)
        return got

    with ThreadPoolExecutor(4) as pool:
        per_thread = list(pool.map(drain, range(4)))
    everything = [pair for got in per_thread for pair in got]
    assert len(everything) == len(set(everything)), "a recipient was leased twice"
    assert set(everything) == expected
    assert store.lease(now=T0, limit=10, lease_for=LEASE) is None


def test_lease_groups_by_message_and_domain_and_sends_bytes(store: PostgresStore) -> None:
    mid = store.enqueue(message("a@One.example", "b@two.example", "c@one.example"), now=T0)
    lease = store.lease(now=T0, limit=10, lease_for=LEASE)
    assert lease is not None
    assert lease.expires_at == T0 + LEASE
    by_domain = {i.domain: i for i in lease.items}
    assert set(by_domain) == {"one.example", "two.example"}
    assert [r.address for r in by_domain["one.example"].recipients] == [
        "a@One.example",
        "c@one.example",
    ]
    for item in lease.items:
        assert item.message_id == mid
        assert item.data == message().data
        assert item.recipients[0].created_at == T0


def test_record_under_a_stale_token_is_ignored(postgres_url: str, store: PostgresStore) -> None:
    mid = store.enqueue(message("r@example.org"), now=T0)
    old = store.lease(now=T0, limit=10, lease_for=LEASE)
    assert old is not None
    with PostgresStore(postgres_url, max_size=1) as other:
        later = T0 + LEASE + timedelta(seconds=1)
        new = other.lease(now=later, limit=10, lease_for=LEASE)
        assert new is not None
        assert new.token != old.token
        assert len(other.record([delivered(mid, "r@example.org", later, new.token)])) == 1

    late = RecipientResult(
        message_id=mid,
        address="r@example.org",
        lease_token=old.token,
        state=RecipientState.FAILED,
        attempt=Attempt(at=T0 + LEASE * 3, outcome=AttemptOutcome.PERMANENT, error="late"),
    )
    assert len(store.record([late])) == 0
    assert len(store.record([late])) == 0  # already recorded: its lease is gone too
    status = store.status(mid).recipient("r@example.org")
    assert status.state is RecipientState.DELIVERED
    assert status.attempts == 1
    assert [a.outcome for a in status.history] == [AttemptOutcome.DELIVERED]


def test_record_batches_many_recipients_in_one_call(store: PostgresStore) -> None:
    addresses = [f"r{i}@example.org" for i in range(300)]
    mid = store.enqueue(message(*addresses), now=T0)
    lease = store.lease(now=T0, limit=1000, lease_for=LEASE)
    assert lease is not None
    assert len(store.record([delivered(mid, a, T0, lease.token) for a in addresses])) == 300
    assert store.status(mid).state is RecipientState.DELIVERED


def test_times_are_utc_whatever_the_server_timezone(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        dbname = postgres_url.rsplit("/", 1)[1]
        conn.execute(f"ALTER DATABASE {dbname} SET TimeZone = 'America/New_York'")
    with PostgresStore(postgres_url) as s:
        created = s.status(s.enqueue(message("r@example.org"), now=T0)).created_at
    assert created == T0
    assert created.utcoffset() == timedelta(0)


def test_domains_are_listed_in_code_point_order_whatever_the_collation(
    postgres_server: ThrowawayPostgres,
) -> None:
    """A database whose collation ignores punctuation (as glibc's en_US.UTF-8 does; an ICU
    locale with alternate=shifted here, since the test machine has only the C locales)
    listed suspended, throttled and most deferred destinations as mail-relay after
    mailgun, where the memory store and SQLite list them by code point."""
    name = f"icu_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 LOCALE 'C.utf8'"
            " LOCALE_PROVIDER icu ICU_LOCALE 'en-US-u-ka-shifted'"
        )
    domains = ["a-c.example", "ab.example", "mail-relay.example", "mailgun.example"]
    try:
        with PostgresStore(postgres_server.url(name)) as s:
            s.enqueue(message(*(f"x@{d}" for d in reversed(domains))), now=T0)
            lease = s.lease(now=T0, limit=10, lease_for=LEASE)
            assert lease is not None
            s.record(
                [
                    replace(
                        delivered(item.message_id, r.address, T0, lease.token),
                        state=RecipientState.DEFERRED,
                        next_attempt_at=T0 + LEASE,
                    )
                    for item in lease.items
                    for r in item.recipients
                ]
            )
            for d in reversed(domains):
                s.suspend(d, now=T0)
                s.throttle(d, now=T0, reply="421", first=LEASE, maximum=LEASE)
            assert [x.domain for x in s.suspensions(now=T0)] == domains
            assert [t.destination for t in s.throttles(now=T0)] == domains
            model = open_read_model(s, cache_seconds=0)
            try:
                assert [d.domain for d in model.destinations()] == domains
                assert [d.domain for d in model.overview(now=T0).top_deferred] == domains
                assert [x.domain for x in model.suspensions(now=T0)] == domains
            finally:
                model.close()
    finally:
        postgres_server.drop_database(name)


# --- LISTEN/NOTIFY -------------------------------------------------------------------


def test_notify_from_one_store_object_wakes_a_watcher_on_another(
    postgres_url: str, store: PostgresStore
) -> None:
    woken = threading.Event()
    stop = store.watch(woken.set)
    try:
        with PostgresStore(postgres_url, max_size=1) as other:
            mid = other.enqueue(message("r@example.org"), now=T0, hold=True)
            other.set_held(mid, False)
            assert woken.wait(10), "no wake-up after set_held(False) on another store"
            woken.clear()
            other.enqueue(message("s@example.org"), now=T0)
            assert woken.wait(10), "no wake-up after enqueue on another store"
            woken.clear()
            other.retry(mid, now=T0)
            assert woken.wait(10), "no wake-up after retry on another store"
    finally:
        stop()


def test_watcher_thread_stops_on_unwatch_and_close(postgres_url: str) -> None:
    """Every watcher of a store object shares one listener thread; it ends with the last
    watcher and at close."""
    before = set(listener_threads())
    s = PostgresStore(postgres_url, max_size=1)
    stop_one = s.watch(lambda: None)
    s.watch(lambda: None)
    ours = set(listener_threads()) - before
    assert len(ours) == 1
    assert all(t.daemon for t in ours)
    stop_one()
    stop_one()  # idempotent
    assert len(set(listener_threads()) & ours) == 1
    s.close()
    s.close()  # idempotent
    assert not set(listener_threads()) & ours
    with pytest.raises(StoreError):
        s.watch(lambda: None)


def listening_backends(url: str) -> int:
    """Sessions of the database whose last statement was a LISTEN: the listeners'."""
    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN %%'",
            (dbname,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_watch_and_watch_cancels_share_one_listen_connection(postgres_url: str) -> None:
    """A worker watches for new mail and for cancels: each opened a LISTEN connection of
    its own, two of the server's max_connections per worker where one serves both. One
    connection now tells each its own notices, and goes with the last watcher."""
    s = PostgresStore(postgres_url, max_size=1)
    work, cancels = threading.Event(), threading.Event()
    try:
        stop_work = s.watch(work.set)
        stop_cancels = s.watch_cancels(cancels.set)
        assert listening_backends(postgres_url) == 1
        with PostgresStore(postgres_url, max_size=1) as other:
            mid = other.enqueue(message("a@example.org"), now=T0)
            assert work.wait(10)
            assert not cancels.wait(0.5)  # new mail is no cancel
            assert s.lease(now=T0, limit=10, lease_for=LEASE) is not None
            work.clear()
            assert other.cancel(mid, now=T0) == 1
            assert cancels.wait(10)
            assert work.wait(10)  # watch hears every notice, as it always did
        stop_work()
        assert listening_backends(postgres_url) == 1  # still watching cancels
        stop_cancels()
        deadline = time.monotonic() + 10
        while listening_backends(postgres_url) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listening_backends(postgres_url) == 0
    finally:
        s.close()


def test_the_shared_listener_tells_both_after_a_server_restart() -> None:
    """After the LISTEN connection is lost, notices may have been missed: the listener
    reconnects and tells both kinds of watcher, then carries cancels again."""
    with ThrowawayPostgres() as server:
        url = server.create_database()
        with PostgresStore(url) as s, PostgresStore(url) as other:
            work, cancels = threading.Event(), threading.Event()
            stop_work = s.watch(work.set)
            stop_cancels = s.watch_cancels(cancels.set)
            try:
                mid = other.enqueue(message("a@example.org"), now=T0)
                assert work.wait(10)
                assert s.lease(now=T0, limit=10, lease_for=LEASE) is not None
                work.clear()
                server.restart(down_for=0.5)
                assert work.wait(30) and cancels.wait(30)  # the reconnect's call
                cancels.clear()
                deadline = time.monotonic() + 20
                while True:  # the pool reconnects on its own, maybe after a failure
                    try:
                        assert other.cancel(mid, now=T0) == 1
                        break
                    except StoreError:
                        assert time.monotonic() < deadline
                        time.sleep(0.2)
                assert cancels.wait(10)
                assert listening_backends(url) == 1
            finally:
                stop_work()
                stop_cancels()


def test_failing_callback_does_not_end_wakeups(store: PostgresStore) -> None:
    calls: list[int] = []
    first, second = threading.Event(), threading.Event()

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            first.set()
            raise RuntimeError("boom")
        second.set()

    stop = store.watch(flaky)
    try:
        store.enqueue(message("a@example.org"), now=T0)
        # One at a time: enqueues committed while a NOTIFY is on its way share it.
        assert first.wait(10)
        store.enqueue(message("b@example.org"), now=T0)
        assert second.wait(10)
    finally:
        stop()


# --- errors --------------------------------------------------------------------------


def test_unreachable_server_is_a_store_error() -> None:
    url = f"postgresql://postgres@127.0.0.1:{_free_port()}/nothing"
    with pytest.raises(StoreError) as info:
        PostgresStore(url, timeout=2)
    assert isinstance(info.value.__cause__, psycopg.Error)


def test_use_after_close_is_a_store_error(postgres_url: str) -> None:
    s = PostgresStore(postgres_url, max_size=1)
    s.close()
    with pytest.raises(StoreError) as info:
        s.enqueue(message("r@example.org"), now=T0)
    assert isinstance(info.value.__cause__, psycopg.Error)


def test_unknown_ids(store: PostgresStore) -> None:
    for call in (
        lambda: store.status("nope"),
        lambda: store.retry("nope", now=T0),
        lambda: store.cancel("nope", now=T0),
        lambda: store.set_held("nope", True),
    ):
        with pytest.raises(UnknownMessage):
            call()


def test_server_going_away_is_a_store_error(postgres_server: ThrowawayPostgres) -> None:
    name = "gone_" + format(threading.get_ident(), "x")
    url = postgres_server.create_database(name)
    s = PostgresStore(url, max_size=1, timeout=2)
    try:
        postgres_server.drop_database(name)  # FORCE kills the pool's connection
        with pytest.raises(StoreError):
            s.enqueue(message("r@example.org"), now=T0)
    finally:
        s.close()


def _backends_of_others(conn: psycopg.Connection[tuple[object, ...]]) -> set[object]:
    query = (
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return {pid for (pid,) in conn.execute(query)}


def test_pooled_connections_the_server_closed_are_not_handed_to_a_call(
    postgres_url: str,
) -> None:
    """The server closed the pool's idle connections (a restart or failover, an operator's
    pg_terminate_backend, idle_session_timeout): the next calls failed with
    StoreUnreachable, one per dead connection, although the server answered, and an
    application's send_email raised for mail it could have queued."""
    with PostgresStore(postgres_url, min_size=3, max_size=3, timeout=5) as store:
        with ThreadPoolExecutor(3) as pool:  # three connections in use, then idle
            list(pool.map(lambda _: store.stats(), range(9)))
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            pids = _backends_of_others(admin)
            assert len(pids) >= 3
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (list(pids),)
            )
            for _ in range(1000):  # until they have gone (each said why before it went)
                if not pids & _backends_of_others(admin):
                    break
                admin.execute("SELECT pg_sleep(0.01)")
        mids = [store.enqueue(message(f"r{i}@example.org"), now=T0) for i in range(4)]
        assert [store.status(mid).id for mid in mids] == mids


def test_a_batch_of_more_than_a_gigabyte_is_queued(store: PostgresStore) -> None:
    """A batch went as one statement, and a statement's parameters travel as one protocol
    message, which libpq and the server cap at 1 GiB; its messages' data went as hex
    text, twice its size. Sixteen messages of the default max_message_size (35 MiB) could
    never be queued: the server closed the connection, and send_emails raised
    StoreUnreachable, "try again", for a batch no retry would ever queue (SQLite queues
    it). The data now goes in binary, and a batch in statements of a bounded size, in one
    transaction: thirty-one such messages, over 1 GiB, are queued."""
    data = b"Subject: big\r\n\r\n" + (b"a" * 998 + b"\r\n") * (35 * 1024)
    batch = [replace(message(f"r{i}@example.org"), data=data, subject="big") for i in range(31)]
    ids = store.enqueue_many(batch, now=T0)
    assert len(set(ids)) == 31
    assert store.stats().messages == 31
    assert [m.id for m in store.recent(limit=31)] == ids[::-1]
    assert store.message_data(ids[-1]) == data


def test_an_enqueue_committed_is_never_an_error_for_want_of_a_notify_thread(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The NOTIFY after an enqueue starts its thread at the first one: where no thread
    could be started (a container's pids.max reached: "can't start new thread"), the
    RuntimeError reached send_email after the COMMIT, and a caller that tried again
    queued the message twice. Workers find it at their next poll instead."""
    start = threading.Thread.start

    def no_notify_thread(thread: threading.Thread) -> None:
        if thread.name == "mailstrom-pg-notify":
            raise RuntimeError("can't start new thread")
        start(thread)

    with PostgresStore(postgres_url, max_size=2) as store:
        monkeypatch.setattr(threading.Thread, "start", no_notify_thread)
        mid = store.enqueue(message("a@example.org"), now=T0)
        monkeypatch.setattr(threading.Thread, "start", start)
        other = store.enqueue(message("b@example.org"), now=T0)  # the thread starts now
        assert store.stats().messages == 2
        assert {store.status(mid).id, store.status(other).id} == {mid, other}


def test_the_lane_lease_reads_each_lane_from_its_index(postgres_url: str) -> None:
    """EXPLAIN of the statement a lease by lanes runs: each lane's rows come from
    recipients_lane_due (sequential scans are priced out, as on a large table)."""
    import dataclasses

    from mailstrom.message.attributes import QueueAttributes
    from mailstrom.stores.postgres.sql import queries

    with PostgresStore(postgres_url) as store:
        for lane in ("transactional", "bulk"):
            prepared = dataclasses.replace(
                message("x@example.org"), attributes=QueueAttributes(priority=lane)
            )
            store.enqueue(prepared, now=T0)
    params = {
        "now": T0,
        "limit": 10,
        "token": "t",
        "expires_at": T0 + LEASE,
        "lanes": ["transactional", "bulk"],
        "lane_limits": [10, 10],
        "max_bytes": 256 * 1024 * 1024,
        "first_always": True,
    }
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            row[0] for row in conn.execute(b"EXPLAIN " + queries()["lease_lanes"].encode(), params)
        )
    assert "recipients_lane_due" in plan, plan


@pytest.mark.parametrize(
    ("name", "params"), [("forget_throttles", {"before": T0}), ("throttles", {"now": T0})]
)
def test_pauses_are_found_by_their_end_not_by_reading_them_all(
    postgres_url: str, name: str, params: dict[str, object]
) -> None:
    """Was: each throttle's cleanup and each worker's refresh read every pause kept (a
    day after it ended): O(N^2) for N pauses of distinct destinations. EXPLAIN of both
    (sequential scans priced out, as on a large table) seeks destination_throttles_until."""
    from mailstrom.stores.postgres.sql import queries

    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("SET enable_seqscan = off")
        text = queries()[name].encode()
        plan = "\n".join(row[0] for row in conn.execute(b"EXPLAIN " + text, params))
        conn.rollback()
    assert "destination_throttles_until" in plan, plan


@pytest.mark.parametrize("name", ["fair_lease_lanes", "fair_lease_other_lanes"])
def test_a_fair_lease_seeks_other_destinations_in_their_index(postgres_url: str, name: str) -> None:
    """A fair lease past a busy backlog (rolled back): the other destination's mail is
    leased, and EXPLAIN ANALYZE shows the walk and the seeks in recipients_destination_due."""
    from mailstrom.stores.fairness import fairness
    from mailstrom.stores.postgres.sql import queries
    from mailstrom.stores.postgres.store import _fair_params

    with PostgresStore(postgres_url) as store:
        store.enqueue_many([message(f"r{i}@big.example") for i in range(200)], now=T0)
        store.enqueue(message("me@small.example"), now=T0 + timedelta(seconds=1))
    fair = fairness({}, ["big.example"], 6, 10)
    assert fair is not None
    params = {
        "now": T0 + timedelta(seconds=2),
        "limit": 10,
        "token": "t",
        "expires_at": T0 + LEASE,
        "lanes": [""] if name == "fair_lease_lanes" else [],
        "lane_limits": [10],
        "max_bytes": None,
        "first_always": True,
        **_fair_params(fair),
    }
    with psycopg.connect(postgres_url) as conn:
        conn.execute("SET enable_seqscan = off")
        text = queries()[name].encode()
        leased = [row[2] for row in conn.execute(text, params)]
        conn.rollback()
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in conn.execute(b"EXPLAIN ANALYZE " + text, params))
        conn.rollback()
    assert "recipients_destination_due" in plan, plan
    assert leased == ["me@small.example"]


@pytest.mark.parametrize(
    ("events", "marker", "attempted"),
    [
        (False, b"SET state = res.state", True),
        (True, b"COMMIT", True),
        # A deferral that was no attempt (this host's shortage) has no history row to
        # tell it recorded by: its state and time do.
        (False, b"SET state = res.state", False),
    ],
    ids=str,
)
def test_a_record_whose_answer_was_lost_after_its_commit_is_recorded_when_written_again(
    postgres_server: ThrowawayPostgres,
    postgres_url: str,
    events: bool,
    marker: bytes,
    attempted: bool,
) -> None:
    """The connection broke after the server committed a record and before its answer
    came back (a network cut, a failover): the record raised StoreUnreachable, and the
    worker wrote the batch again, as it must. The store found those recipients recorded,
    under no lease, and read the results as taken over: no on_result, no bounce notice,
    "2 of 2 results ignored". Written again after a call that failed, a result the store
    already holds to the attempt counts as recorded, written once, its outbox event too."""
    direct = f"127.0.0.1:{postgres_server.port}/"
    assert direct in postgres_url
    with contextlib.closing(TCPProxy(("127.0.0.1", postgres_server.port))) as proxy:
        url = postgres_url.replace(direct, f"127.0.0.1:{proxy.port}/")
        with PostgresStore(url, timeout=5) as store:
            if events:
                store.enable_events()
            mid = store.enqueue(message("a@example.org", "b@example.org"), now=T0)
            lease = store.lease(now=T0, limit=10, lease_for=LEASE)
            assert lease is not None
            at = T0 + timedelta(seconds=1)
            results = [
                delivered(item.message_id, r.address, at, lease.token)
                for item in lease.items
                for r in item.recipients
            ]
            state = RecipientState.DELIVERED
            if not attempted:
                state = RecipientState.DEFERRED
                short = Attempt(at=at, outcome=AttemptOutcome.TEMPORARY, error="shortage")
                results = [
                    replace(
                        r, state=state, attempt=short, next_attempt_at=at + LEASE, attempted=False
                    )
                    for r in results
                ]
            # The enqueue's NOTIFY ("...; COMMIT") goes from a thread of its own: sent
            # after the marker is set, its answer was the one lost, not the record's.
            deadline = time.monotonic() + 10
            while store._notifier.sent < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert store._notifier.sent == 1
            proxy.lose_reply_to(marker)
            with pytest.raises(StoreUnreachable):
                store.record(results)
            assert store.record(results) == results
            recipients = store.status(mid).recipients
            assert [(r.state, r.attempts) for r in recipients] == [(state, int(attempted))] * 2
    with psycopg.connect(postgres_url) as conn:
        (attempts,) = conn.execute("SELECT count(*) FROM attempts").fetchone() or (None,)
        (outbox,) = conn.execute("SELECT count(*) FROM events").fetchone() or (None,)
    assert attempts == (2 if attempted else 0)
    assert outbox == (2 if events else 0)


@pytest.mark.parametrize(
    ("keyed", "marker"),
    [(False, b"lost-answer-marker"), (True, b"lost-answer-marker"), (True, b"COMMIT")],
    ids=["plain", "keyed-insert", "keyed-commit"],
)
def test_an_enqueue_whose_answer_was_lost_is_queued_once_and_its_id_returned(
    postgres_server: ThrowawayPostgres, postgres_url: str, keyed: bool, marker: bytes
) -> None:
    """The connection broke after the server had the enqueue and before its answer came
    back (a network cut, a failover): send_email raised StoreUnreachable although the
    message was queued (committed, for the plain one), and the caller's retry, as the
    error invites, queued it a second time. The store writes the batch again under the
    same ids, which the server tells apart from new ones: the message is queued once,
    and its id returned."""
    direct = f"127.0.0.1:{postgres_server.port}/"
    assert direct in postgres_url
    prepared = replace(message("a@example.org"), data=b"Subject: hi\r\n\r\nlost-answer-marker\r\n")
    if keyed:
        prepared = replace(prepared, attributes=QueueAttributes(idempotency_key="order-42"))
    with contextlib.closing(TCPProxy(("127.0.0.1", postgres_server.port))) as proxy:
        url = postgres_url.replace(direct, f"127.0.0.1:{proxy.port}/")
        with PostgresStore(url, timeout=5) as store:
            proxy.lose_reply_to(marker)
            mid = store.enqueue(prepared, now=T0)
            assert store.message_data(mid) == prepared.data
    with psycopg.connect(postgres_url) as conn:
        found = conn.execute("SELECT id FROM messages").fetchall()
        (recipients,) = conn.execute("SELECT count(*) FROM recipients").fetchone() or (None,)
    assert found == [(mid,)]
    assert recipients == 1


def test_a_lease_whose_answer_was_lost_is_given_back_by_the_next_lease(
    postgres_server: ThrowawayPostgres, postgres_url: str
) -> None:
    """The connection broke after the server committed a lease and before its answer
    came back: the lease raised StoreUnreachable, and its recipients stayed leased under
    a token nobody knew, waiting out lease_for (15 minutes by default) while the worker
    that leased them lived on (the holder's look gives back only a dead worker's). The
    next lease gives them back first, and leases them."""
    direct = f"127.0.0.1:{postgres_server.port}/"
    assert direct in postgres_url
    with contextlib.closing(TCPProxy(("127.0.0.1", postgres_server.port))) as proxy:
        url = postgres_url.replace(direct, f"127.0.0.1:{proxy.port}/")
        with PostgresStore(url, timeout=5) as store:
            store.enqueue(message("a@example.org", "b@example.org"), now=T0)
            proxy.lose_reply_to(b"WITH due AS MATERIALIZED")
            with pytest.raises(StoreUnreachable):
                store.lease(now=T0, limit=10, lease_for=LEASE, holder="0123abcd5e")
            lease = store.lease(now=T0, limit=10, lease_for=LEASE, holder="0123abcd5e")
            assert lease is not None
            leased = sorted(r.address for item in lease.items for r in item.recipients)
            assert leased == ["a@example.org", "b@example.org"]


@pytest.mark.parametrize("method", ["cancel", "cancel_many", "set_held", "hold_many"])
def test_a_cancel_that_waited_for_a_lease_to_commit_tells_the_worker(
    store: PostgresStore, postgres_url: str, method: str
) -> None:
    """A cancel whose statement began while a worker's lease of the message was being
    committed waited for its row locks, then cancelled the leased rows; but it judged
    whether any was leased from its snapshot, taken before the lease committed, so it
    sent no 'cancelled' NOTIFY. The worker, never told, sent the cancelled message (its
    result then ignored) until its next heartbeat. The lease is judged from the rows
    as locked. A hold likewise."""
    mid = store.enqueue(message("a@example.org"), now=T0)
    told = threading.Event()
    unwatch = store.watch_cancels(told.set)
    try:
        with psycopg.connect(postgres_url) as worker:
            # A worker's lease, between its statement and its commit.
            worker.execute(
                "UPDATE recipients SET lease_token = 'w1', lease_expires_at = %s"
                " WHERE message_id = %s",
                (T0 + LEASE, mid),
            )
            with ThreadPoolExecutor(1) as pool:
                calls = {
                    "cancel": lambda: store.cancel(mid, now=T0),
                    "cancel_many": lambda: store.cancel_many([mid], now=T0),
                    "set_held": lambda: store.set_held(mid, True) or 1,
                    "hold_many": lambda: store.hold_many([mid], True),
                }
                cancelling = pool.submit(calls[method])
                # The cancel waits for the lease's row lock.
                with psycopg.connect(postgres_url, autocommit=True) as look:
                    for _ in range(500):
                        (waiting,) = look.execute(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                        ).fetchone()
                        if waiting:
                            break
                        time.sleep(0.01)
                    assert waiting
                worker.commit()
                assert cancelling.result(timeout=10) == 1
        assert told.wait(10)
    finally:
        unwatch()
    status = store.status(mid)
    if method.startswith("cancel"):
        assert status.recipients[0].error == "cancelled"
    else:
        assert status.held


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
@pytest.mark.parametrize("lanes", [None, [("", 10)], [("bulk", 10)]])
@pytest.mark.parametrize("method", ["set_held", "hold_many"])
def test_a_hold_committed_while_a_lease_read_the_queue_is_not_leased(
    postgres_url: str, method: str, lanes: list[tuple[str, int]] | None, isolation: str
) -> None:
    """A lease reads which messages are held from its statement's snapshot and then locks
    the recipients' rows; a hold that commits in between locks those rows and finds no
    lease (so tells no worker), and the lease, locking rows the hold only locked, leased
    the held message anyway: it was sent. The lease pauses here between its snapshot and
    its row locks: a row security policy on messages (for a role that is no superuser)
    waits on an advisory lock the test holds. With lanes, the lease of the lanes named
    and (the message's lane not named) of the others. The same whatever the database's
    default isolation (see test_a_server_defaulting_to_repeatable_read_changes_nothing):
    at REPEATABLE READ the lease failed with a serialization error."""
    from tests.integration.test_postgres_roles import role_on

    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            f"ALTER DATABASE {admin.info.dbname} SET default_transaction_isolation = '{isolation}'"
        )
    with PostgresStore(postgres_url) as owner:
        mid = owner.enqueue(message("a@example.org"), now=T0)
        with (
            role_on(postgres_url) as role_url,
            psycopg.connect(postgres_url, autocommit=True) as admin,
        ):
            admin.execute(
                "CREATE FUNCTION pause_here() RETURNS boolean LANGUAGE plpgsql AS"
                " $$ BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN true; END $$"
            )
            admin.execute("ALTER TABLE messages ENABLE ROW LEVEL SECURITY")
            admin.execute("CREATE POLICY paused ON messages USING (pause_here())")
            with PostgresStore(role_url) as worker, ThreadPoolExecutor(1) as pool:
                admin.execute("SELECT pg_advisory_lock(4242)")
                leasing = pool.submit(
                    lambda: worker.lease(
                        now=T0, limit=10, lease_for=LEASE, lanes=lanes, holder="0123abcd5e"
                    )
                )
                for _ in range(500):
                    (waiting,) = admin.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
                        " AND datname = current_database()"
                    ).fetchone()
                    if waiting:
                        break
                    time.sleep(0.01)
                assert waiting
                if method == "set_held":
                    owner.set_held(mid, True)
                else:
                    owner.hold_many([mid], True)
                admin.execute("SELECT pg_advisory_unlock(4242)")
                lease = leasing.result(timeout=10)
            admin.execute("DROP POLICY paused ON messages")
            admin.execute("ALTER TABLE messages DISABLE ROW LEVEL SECURITY")
        assert lease is None or not lease.items
        assert owner.status(mid).held


def _lock_waiters(url: str, count: int) -> None:
    """Wait until ``count`` sessions of ``url``'s database wait for a lock."""
    with psycopg.connect(url, autocommit=True) as look:
        for _ in range(500):
            (waiting,) = look.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone() or (0,)
            if waiting >= count:
                return
            time.sleep(0.01)
    raise AssertionError(f"{count} lock waiters expected, {waiting} seen")


@pytest.mark.parametrize("events", [False, True], ids=["plain", "events"])
def test_a_record_still_running_when_written_again_counts_as_recorded(
    postgres_server: ThrowawayPostgres, postgres_url: str, events: bool
) -> None:
    """A record whose connection broke while its statement waited for a row lock goes on
    on the server, and commits once the lock is free; the worker writes the batch again
    meanwhile, and that statement waits behind it. Its UPDATE then found the rows
    recorded under no lease (rechecked as locked), but whether they were recorded
    already was judged from its snapshot, taken before the first one committed: the
    results read as taken over, their on_result and bounce notices lost, though the
    store holds them. (With events the failed call's transaction, whose COMMIT never
    came, rolls back: recorded once all the same.)"""
    direct = f"127.0.0.1:{postgres_server.port}/"
    with contextlib.closing(TCPProxy(("127.0.0.1", postgres_server.port))) as proxy:
        url = postgres_url.replace(direct, f"127.0.0.1:{proxy.port}/")
        with PostgresStore(url, timeout=5) as store:
            if events:
                store.enable_events()
            mid = store.enqueue(message("a@example.org", "b@example.org"), now=T0)
            lease = store.lease(now=T0, limit=10, lease_for=LEASE)
            assert lease is not None
            at = T0 + timedelta(seconds=1)
            results = [
                delivered(item.message_id, r.address, at, lease.token)
                for item in lease.items
                for r in item.recipients
            ]
            with (
                psycopg.connect(postgres_url) as blocker,
                ThreadPoolExecutor(1) as pool,
            ):
                blocker.execute("SELECT 1 FROM recipients FOR UPDATE")
                first = pool.submit(store.record, results)
                _lock_waiters(postgres_url, 1)
                proxy.cut()
                with pytest.raises(StoreUnreachable):
                    first.result(timeout=10)
                proxy.restore()
                again = pool.submit(store.record, results)
                _lock_waiters(postgres_url, 2)  # the first statement waits on
                blocker.rollback()
                assert again.result(timeout=10) == results
            recipients = store.status(mid).recipients
            assert [(r.state, r.attempts) for r in recipients] == [
                (RecipientState.DELIVERED, 1),
                (RecipientState.DELIVERED, 1),
            ]
    with psycopg.connect(postgres_url) as conn:
        (attempts,) = conn.execute("SELECT count(*) FROM attempts").fetchone() or (None,)
        (outbox,) = conn.execute("SELECT count(*) FROM events").fetchone() or (None,)
    assert attempts == 2
    assert outbox == (2 if events else 0)


def test_a_server_defaulting_to_repeatable_read_changes_nothing(postgres_url: str) -> None:
    """The store's statements and transactions are written for READ COMMITTED, each
    statement seeing what committed before it began: a database (or role, or server)
    whose default_transaction_isolation is REPEATABLE READ froze a transaction's view at
    its first statement, before it waited for a lock. Two workers throttling one
    destination at once: the second, let in once the first committed its pause, read
    no pause from its older snapshot and failed with a serialization error (40001)
    writing its own over the first's; READ COMMITTED, it finds the first's pause and
    keeps it (one throttle, as the docstring says)."""
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        dbname = admin.info.dbname
        admin.execute(
            f"ALTER DATABASE {dbname} SET default_transaction_isolation = 'repeatable read'"
        )
    key = "example.org"
    with (
        PostgresStore(postgres_url, max_size=4) as store,
        psycopg.connect(postgres_url) as blocker,
        psycopg.connect(postgres_url, autocommit=True) as watcher,
        ThreadPoolExecutor(2) as pool,
    ):
        blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))", (key,))
        calls = [
            pool.submit(
                store.throttle,
                key,
                now=T0,
                reply="421 slow down",
                first=timedelta(minutes=1),
                maximum=timedelta(hours=1),
            )
            for _ in range(2)
        ]
        for _ in range(500):
            (waiting,) = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
                " AND datname = current_database()"
            ).fetchone() or (0,)
            if waiting >= 2:
                break
            time.sleep(0.01)
        assert waiting >= 2
        blocker.rollback()
        first, second = (call.result(timeout=10) for call in calls)
        assert first == second
        assert [p.strikes for p in store.throttles(now=T0)] == [1]


def test_a_lease_still_running_when_its_answer_was_lost_is_given_back_later(
    postgres_server: ThrowawayPostgres, postgres_url: str
) -> None:
    """A lease whose connection broke while its statement still ran on the server (here
    paused, as a lease waiting for a table's lock is) goes on there and commits later.
    The next lease of the store gave back what that token held before it committed:
    nothing, and the token was forgotten, its recipients then leased under it until
    lease_for ran out (15 minutes by default) while the worker lived on. The token is
    kept until the statement's server process is seen to have finished it. A row security
    policy pauses the first lease alone (the others find its advisory lock taken)."""
    from tests.integration.test_postgres_roles import role_on

    direct = f"127.0.0.1:{postgres_server.port}/"
    with (
        PostgresStore(postgres_url) as owner,
        role_on(postgres_url) as role_url,
        psycopg.connect(postgres_url, autocommit=True) as admin,
        contextlib.closing(TCPProxy(("127.0.0.1", postgres_server.port))) as proxy,
    ):
        owner.enqueue(message("a@example.org"), now=T0)
        admin.execute(
            "CREATE FUNCTION pause_here() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN"
            " IF pg_try_advisory_xact_lock(4243) THEN"
            " PERFORM pg_advisory_xact_lock_shared(4242); END IF; RETURN true; END $$"
        )
        admin.execute("ALTER TABLE messages ENABLE ROW LEVEL SECURITY")
        admin.execute("CREATE POLICY paused ON messages USING (pause_here())")
        assert direct in role_url
        url = role_url.replace(direct, f"127.0.0.1:{proxy.port}/")
        try:
            with PostgresStore(url, timeout=5) as worker, ThreadPoolExecutor(1) as pool:
                admin.execute("SELECT pg_advisory_lock(4242)")
                first = pool.submit(
                    worker.lease, now=T0, limit=10, lease_for=LEASE, holder="0123abcd5e"
                )
                for _ in range(500):
                    (waiting,) = admin.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
                        " AND datname = current_database()"
                    ).fetchone() or (0,)
                    if waiting:
                        break
                    time.sleep(0.01)
                assert waiting
                proxy.cut()
                with pytest.raises(StoreUnreachable):
                    first.result(timeout=10)
                proxy.restore()
                # The next lease (nothing due yet) gives back what the first holds: nothing.
                early = T0 - timedelta(hours=1)
                assert worker.lease(now=early, limit=10, lease_for=LEASE) is None
                admin.execute("SELECT pg_advisory_unlock(4242)")
                for _ in range(500):
                    (leased,) = admin.execute(
                        "SELECT count(*) FROM recipients WHERE lease_token IS NOT NULL"
                    ).fetchone() or (0,)
                    if leased:
                        break
                    time.sleep(0.01)
                assert leased  # the first lease committed, its answer lost
                lease = worker.lease(now=T0, limit=10, lease_for=LEASE, holder="0123abcd5e")
        finally:
            admin.execute("DROP POLICY paused ON messages")
            admin.execute("ALTER TABLE messages DISABLE ROW LEVEL SECURITY")
        assert lease is not None
        assert [r.address for item in lease.items for r in item.recipients] == ["a@example.org"]


def test_a_database_in_sql_ascii_reads_as_text(postgres_server: ThrowawayPostgres) -> None:
    """A database created with ENCODING 'SQL_ASCII' (initdb's default under the C locale)
    tells the client to take text as it is: psycopg handed back bytes for every text
    column, and the store answered wrongly without an error (no messages in stats or
    recent, a lease whose ids, domains and addresses were bytes). The store asks for
    UTF-8, which is what it writes."""
    name = f"ascii_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'SQL_ASCII' LOCALE 'C'")
    try:
        with PostgresStore(postgres_server.url(name)) as s:
            mid = s.enqueue(message("ä@example.org"), now=T0)
            assert s.stats().messages == 1
            assert [m.id for m in s.recent()] == [mid]
            assert s.status(mid).recipients[0].address == "ä@example.org"
            lease = s.lease(now=T0, limit=10, lease_for=LEASE)
            assert lease is not None
            [item] = lease.items
            assert (item.message_id, item.domain) == (mid, "example.org")
            assert [r.address for r in item.recipients] == ["ä@example.org"]
    finally:
        postgres_server.drop_database(name)


def test_the_store_s_connections_compile_nothing_with_jit(store: PostgresStore) -> None:
    """A lease's estimated cost passes PostgreSQL's jit_above_cost on a deep backlog
    (a fair lease's at about 250,000 due recipients), and compiling it took 7 to 12 s for
    a statement that runs in 2 ms: the store's sessions have JIT off."""
    with store._pool.connection() as conn:
        assert conn.execute("SHOW jit").fetchone() == ("off",)


def _cancelled_in_bulk(store: Store, mid: str) -> None:
    store.set_held(mid, True)
    assert store.cancel_many([mid], now=T0) == 2


def _released_with_events(store: Store, mid: str) -> None:
    """Delivered in flight, recorded in the transaction that writes the outbox rows."""
    assert isinstance(store, PostgresStore)
    store.enable_events()
    FINISHES["delivered in flight"](store, mid)


@pytest.mark.parametrize(
    "finish",
    [*FINISHES.values(), _cancelled_in_bulk, _released_with_events],
    ids=[*FINISHES.keys(), "cancelled in bulk", "delivered in flight, events on"],
)
def test_a_message_that_finished_while_held_leaves_the_held_index(
    postgres_url: str,
    store: PostgresStore,
    finish: Callable[[Store, str], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A message held while its delivery was in flight, or held and then cancelled, kept
    its flag once every recipient was final, and with it its entry in messages_held
    (schema version 21) until purged: the dashboard's Held view and every held count read
    and stepped over it. The flag goes as the message finishes; a held message still
    pending keeps it."""
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=T0)
    waiting = store.enqueue(message("c@example.org"), now=T0, hold=True)
    with caplog.at_level(logging.WARNING, logger="mailstrom"):
        finish(store, mid)
    assert store.status(mid).state.is_final
    assert store.status(waiting).held
    with psycopg.connect(postgres_url) as conn:
        held = conn.execute("SELECT id FROM messages WHERE held").fetchall()
    assert held == [(waiting,)]
    assert not caplog.records  # cleared as it should be, not by a statement that failed


def test_an_upgrade_takes_the_messages_that_finished_while_held_out_of_the_held_index(
    postgres_url: str,
) -> None:
    """Schema version 26: those that finished while held before this mailstrom (their
    flag left set) lose it; a held message still pending keeps it."""
    with PostgresStore(postgres_url) as store:
        done = store.enqueue(message("a@example.org", "b@example.org"), now=T0)
        waiting = store.enqueue(message("c@example.org"), now=T0, hold=True)
        assert store.cancel(done, now=T0) == 2
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE messages SET held = true")  # as an older mailstrom left it
        conn.execute("DELETE FROM schema_version WHERE version = 26")
    migrate(postgres_url)
    with psycopg.connect(postgres_url) as conn:
        held = conn.execute("SELECT id FROM messages WHERE held").fetchall()
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone() == (29,)
    assert held == [(waiting,)]

"""A database role that may only read and write mailstrom's tables (the least privilege an
application or a worker needs) opens a store whose schema its owner migrated, and does
what a store does; what it may not do fails with an error that says who may (migrate) or
is skipped (analyse)."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from mailstrom import Email, Mailstrom
from mailstrom.errors import StoreAccessDenied
from mailstrom.message.prepared import PreparedMessage
from mailstrom.runtime.store_opening import worth_waiting
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores.base import RecipientResult
from mailstrom.stores.postgres import PostgresStore
from mailstrom.stores.postgres.migrate import migrate
from mailstrom.stores.postgres.sql import migrations
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import Results, loopback_config
from tests.support.pg_tables import analysed, schema_at, small_message, without_autovacuum

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)


def message(i: int) -> PreparedMessage:
    return small_message(f"r{i}@example.org", body=b"x" * 1000)


@pytest.fixture
def owner_url(postgres_url: str) -> str:
    """A database whose schema its owner (the fixture's superuser) migrated."""
    PostgresStore(postgres_url).close()
    return postgres_url


@contextlib.contextmanager
def role_on(owner_url: str, *, granted: bool = True) -> Iterator[str]:
    """The URL of a new role on ``owner_url``'s database, granted what the docs ask for
    (the rows, not the schema) or nothing; dropped on leaving."""
    role = f"mailer_{uuid.uuid4().hex[:12]}"  # roles belong to the whole cluster
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        if granted:
            conn.execute(
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
            )
            conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    rest = owner_url.partition("://")[2].partition("@")[2]
    try:
        yield f"postgresql://{role}@{rest}"
    finally:
        with psycopg.connect(owner_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def _role_of(url: str) -> str:
    return url.partition("://")[2].partition("@")[0]


@pytest.fixture
def role_url(owner_url: str) -> Iterator[str]:
    """The URL of a role granted what the docs ask for: the rows, not the schema."""
    with role_on(owner_url) as url:
        yield url


def test_a_read_write_role_queues_leases_and_records(role_url: str) -> None:
    with PostgresStore(role_url) as store:
        mid = store.enqueue(message(0), now=T0)
        lease = store.lease(now=T0, limit=10, lease_for=LEASE)
        assert lease is not None
        assert [i.message_id for i in lease.items] == [mid]
        result = RecipientResult(
            message_id=mid,
            address="r0@example.org",
            lease_token=lease.token,
            state=RecipientState.DELIVERED,
            attempt=Attempt(
                at=T0, outcome=AttemptOutcome.DELIVERED, reply=SMTPReply(code=250, text="ok")
            ),
        )
        assert store.record([result]) == [result]
        assert store.status(mid).recipients[0].state is RecipientState.DELIVERED


def test_a_schema_behind_is_a_clear_error_for_a_role_that_cannot_migrate(
    owner_url: str, role_url: str
) -> None:
    latest = migrations()[-1]
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute("DELETE FROM schema_version WHERE version = %s", (latest.version,))
    # StoreAccessDenied: a worker starting over it must not wait for an owner's migrate.
    with pytest.raises(StoreAccessDenied, match=r"mailstrom db migrate.* owns") as raised:
        PostgresStore(role_url)
    assert f"needs version {latest.version}" in str(raised.value)


def test_a_role_granted_nothing_is_refused_not_waited_for(owner_url: str) -> None:
    # Its first statement (reading schema_version) got "permission denied": a plain
    # StoreError, so a starting worker waited for it for ever instead of exiting 78.
    with role_on(owner_url, granted=False) as url:
        with pytest.raises(StoreAccessDenied, match="permission denied") as raised:
            PostgresStore(url, timeout=5)
        assert not worth_waiting(raised.value)
        assert "GRANT" in str(raised.value)


def test_a_search_path_naming_no_schema_is_refused_not_waited_for(postgres_url: str) -> None:
    """A store URL whose ``options=-c search_path=...`` names a schema that does not exist
    (a typo, one not made yet) left nowhere to create the tables in: a plain StoreError,
    so a starting worker waited for it for ever, where a database that does not exist
    exits 78. Nothing is created anywhere else meanwhile."""
    url = postgres_url + "?options=-c%20search_path%3Dno_such_schema"
    with pytest.raises(StoreAccessDenied, match="no_such_schema") as raised:
        PostgresStore(url, timeout=5)
    assert not worth_waiting(raised.value)
    assert "CREATE SCHEMA" in str(raised.value)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass('public.schema_version')").fetchone() == (None,)


def test_a_role_that_may_only_read_is_refused_its_writes(owner_url: str) -> None:
    with role_on(owner_url, granted=False) as url:
        with psycopg.connect(owner_url, autocommit=True) as conn:
            conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {_role_of(url)}")
        with PostgresStore(url, timeout=5) as store:
            assert store.stats().messages == 0
            with pytest.raises(StoreAccessDenied, match="permission denied"):
                store.enqueue(message(0), now=T0)


def test_a_role_that_may_not_analyse_still_leases_from_a_new_backlog(
    owner_url: str, role_url: str
) -> None:
    without_autovacuum(owner_url)
    with PostgresStore(owner_url) as owner:
        owner.enqueue_many([message(i) for i in range(1500)], now=T0)
    with PostgresStore(role_url) as store:
        first = store.lease(now=T0, limit=10, lease_for=LEASE)
        second = store.lease(now=T0, limit=10, lease_for=LEASE)
    assert first is not None and second is not None
    # The server skipped the tables, with a warning: only their owner may analyse them.
    assert analysed(owner_url) == {"recipients": False, "messages": False}


def test_an_upgrade_that_adds_a_table_grants_it_to_whoever_may_use_the_queue(
    postgres_url: str,
) -> None:
    # Version 13 added lease_holders, which a worker writes at every look: before, its
    # beats failed with "permission denied" until the operator granted the table again.
    schema_at(postgres_url, 12)
    with (
        role_on(postgres_url) as mailer_url,
        role_on(postgres_url, granted=False) as stranger_url,
        psycopg.connect(postgres_url, autocommit=True) as owner,
    ):
        mailer, stranger = (_role_of(url) for url in (mailer_url, stranger_url))
        owner.execute(f"GRANT SELECT ON messages TO {mailer} WITH GRANT OPTION")
        owner.execute("GRANT SELECT ON messages TO PUBLIC")
        migrate(postgres_url)  # as the owner
        with PostgresStore(mailer_url) as store:
            assert store.release_dead_holders("0123abcd0123abcd") == 0
            assert [h.holder for h in store.live_holders()] == ["0123abcd0123abcd"]

        def may(role: str, privilege: str) -> bool:
            row = owner.execute(
                "SELECT has_table_privilege(%s, 'lease_holders', %s)", (role, privilege)
            ).fetchone()
            assert row is not None
            return bool(row[0])

        assert may(mailer, "SELECT WITH GRANT OPTION")
        assert not may(mailer, "INSERT WITH GRANT OPTION") and may(mailer, "INSERT")
        # Only what PUBLIC holds on messages: a role granted nothing may read, not write.
        assert may(stranger, "SELECT") and not may(stranger, "INSERT")


def test_a_worker_starts_and_polls_when_no_listen_connection_can_be_had(
    owner_url: str, smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """Connections exhausted (the role's CONNECTION LIMIT, max_connections): the pool
    had its connection, and the worker's LISTEN connection could not be made. The
    StoreUnreachable this raised failed the worker's start (WorkerError), where the
    store works and LISTEN is only the fast way to hear of mail: polling finds it."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    with role_on(owner_url) as url:
        store = PostgresStore(url, min_size=1, max_size=1, timeout=5)
        try:
            with psycopg.connect(owner_url, autocommit=True) as conn:
                conn.execute(f"ALTER ROLE {_role_of(url)} CONNECTION LIMIT 1")
            results = Results()
            cfg = loopback_config(dns_server, mx.port, poll_interval=0.2)
            with Mailstrom(cfg, store=store, worker="thread", on_result=results) as ms:
                mid = ms.send_email(
                    Email(from_="a@sender.test", to=["bob@example.org"], subject="x", text="y")
                )
                (result,) = results.wait_count(1)
                assert result.state is RecipientState.DELIVERED
                assert ms.query_status(mid).state is RecipientState.DELIVERED
        finally:
            store.close()


def test_a_watch_set_up_while_no_listen_connection_can_be_had_listens_once_one_can(
    owner_url: str,
) -> None:
    """Connections exhausted when a worker started: its watch() raised StoreUnreachable,
    the worker fell back to polling (above), and never asked again: for the rest of its
    life it heard of no mail, however soon connections were free again. The watch now
    keeps trying in its thread, and says so once it listens (anything committed before
    may be due: the callback is called), then calls back on every NOTIFY as always."""
    with role_on(owner_url) as url:
        store = PostgresStore(url, min_size=1, max_size=1, timeout=5)
        woken = threading.Event()
        try:
            with psycopg.connect(owner_url, autocommit=True) as conn:
                conn.execute(f"ALTER ROLE {_role_of(url)} CONNECTION LIMIT 1")
            unwatch = store.watch(woken.set)  # the pool holds the one connection
            assert not woken.is_set()
            with psycopg.connect(owner_url, autocommit=True) as conn:
                conn.execute(f"ALTER ROLE {_role_of(url)} CONNECTION LIMIT -1")
            assert woken.wait(30)  # listening now: told to look
            woken.clear()
            with PostgresStore(owner_url) as other:
                other.enqueue(small_message("r@example.org"), now=T0)
            assert woken.wait(10)  # and hears of new mail
            unwatch()
        finally:
            store.close()


def test_a_worker_starts_and_polls_when_no_listen_thread_can_be_started(
    owner_url: str,
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The LISTEN connection was made but its thread could not be started (a
    container's pids.max reached: "can't start new thread"): the RuntimeError failed the
    worker's start (WorkerError), where a LISTEN connection that cannot be had is a
    logged fallback to polling, and the connection stayed open, held by nobody."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    start = threading.Thread.start

    def no_listen_thread(thread: threading.Thread) -> None:
        if thread.name == "mailstrom-pg-listen":
            raise RuntimeError("can't start new thread")
        start(thread)

    with role_on(owner_url) as url:
        store = PostgresStore(url, min_size=1, max_size=1, timeout=5)
        try:
            monkeypatch.setattr(threading.Thread, "start", no_listen_thread)
            results = Results()
            cfg = loopback_config(dns_server, mx.port, poll_interval=0.2)
            with Mailstrom(cfg, store=store, worker="thread", on_result=results) as ms:
                ms.send_email(
                    Email(from_="a@sender.test", to=["bob@example.org"], subject="x", text="y")
                )
                (result,) = results.wait_count(1)
                assert result.state is RecipientState.DELIVERED
                with psycopg.connect(owner_url, autocommit=True) as admin:
                    listening = admin.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE usename = %s AND query LIKE 'LISTEN%%'",
                        (_role_of(url),),
                    ).fetchone()
                assert listening == (0,)
        finally:
            store.close()

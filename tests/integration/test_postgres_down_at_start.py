"""A worker process of the facade that starts while PostgreSQL is down waits for it and
delivers once it is up (issue #8); one the database refuses (a role that may not log in,
that does not exist) fails at once with its own error. ``mailstrom worker``:
tests/cli/test_worker_store_down.py.

These tests stop a server: one of the module's own (``own_postgres``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import psycopg
import pytest

from mailstrom import (
    AsyncMailstrom,
    Email,
    Mailstrom,
    MessageStatus,
    RecipientState,
    StoreAccessDenied,
)
from mailstrom.client import process
from mailstrom.client.process import WorkerProcess
from mailstrom.errors import WorkerError
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.postgres import ThrowawayPostgres
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import Results, loopback_config

pytestmark = pytest.mark.postgres


@pytest.fixture
def mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> Any:
    receiver = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", receiver.host)
    return receiver


def hello(to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject="Hi", text="Hello")


def test_a_worker_process_waits_for_postgresql_and_delivers(
    own_postgres: ThrowawayPostgres,
    mx: Any,
    dns_server: LoopbackDNS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL down as the facade starts its worker process: start() raised
    WorkerError (the child could not open its store). Now it returns, the status says
    the worker waits for the store, each try is logged once (backoff apart), and the mail
    queued before goes out once the server is back."""
    store = PostgresStore(own_postgres.create_database(), timeout=2)
    results = Results()
    ms = Mailstrom(
        loopback_config(dns_server, mx.port), store=store, on_result=results, worker="process"
    )
    try:
        ms.send_email(hello("u@example.org"))
        own_postgres.take_down()
        ms.start()
        status = ms.worker_status
        assert status.running and not status.dead
        assert status.store_error is not None and "opening the store" in status.store_error
        time.sleep(2.0)  # the outage under test, not synchronisation
        own_postgres.bring_up()
        [result] = results.wait_count(1, timeout=6)
        assert result.state is RecipientState.DELIVERED
        assert len(mx.messages) == 1
        assert ms.worker_status.store_error is None
        tries = [r for r in caplog.records if "store cannot be opened" in r.getMessage()]
        # 0.05 s doubling: tries at 0, 0.05, 0.15, 0.35, 0.75, 1.55 (and 3.15) s.
        assert 5 <= len(tries) <= 8, [r.getMessage() for r in tries]
    finally:
        ms.stop(timeout=2)
        store.close()


def test_stopping_a_worker_process_that_waits_for_postgresql_is_prompt(
    own_postgres: ThrowawayPostgres, dns_server: LoopbackDNS
) -> None:
    store = PostgresStore(own_postgres.create_database(), timeout=2)
    ms = Mailstrom(loopback_config(dns_server, 25), store=store, worker="process")
    try:
        own_postgres.take_down()
        ms.start()
        began = time.monotonic()
        ms.stop(timeout=5)
        assert time.monotonic() - began < 2
        assert not ms.worker_status.running and not ms.worker_status.dead
    finally:
        store.close()


def test_a_worker_process_the_database_refuses_fails_to_start(
    own_postgres: ThrowawayPostgres, dns_server: LoopbackDNS
) -> None:
    """A role that may no longer log in is no outage to wait out: start() raises from
    StoreAccessDenied, at once."""
    url = own_postgres.create_database()
    with psycopg.connect(own_postgres.admin_url, autocommit=True) as conn:
        conn.execute("CREATE ROLE refused LOGIN SUPERUSER")
    try:
        store = PostgresStore(url.replace("postgres@", "refused@"), timeout=2)
        ms = Mailstrom(loopback_config(dns_server, 25), store=store, worker="process")
        with psycopg.connect(own_postgres.admin_url, autocommit=True) as conn:
            conn.execute("ALTER ROLE refused NOLOGIN")
        try:
            began = time.monotonic()
            with pytest.raises(WorkerError, match="not permitted to log in") as raised:
                ms.start()
            assert time.monotonic() - began < 5
            assert isinstance(raised.value.__cause__, StoreAccessDenied)
        finally:
            store.close()
    finally:
        own_postgres.drop_database(url.rsplit("/", 1)[1])  # the tables the role owns
        with psycopg.connect(own_postgres.admin_url, autocommit=True) as conn:
            conn.execute("DROP ROLE refused")


def test_an_unknown_role_is_store_access_denied(own_postgres: ThrowawayPostgres) -> None:
    url = own_postgres.create_database().replace("postgres@", "nobody@")
    with pytest.raises(StoreAccessDenied, match='role "nobody" does not exist'):
        PostgresStore(url, timeout=2)


def test_waiting_for_a_message_rides_out_a_postgresql_outage(
    own_postgres: ThrowawayPostgres, dns_server: LoopbackDNS
) -> None:
    """``wait(mid, timeout)`` raised StoreUnreachable at its first look while the server
    was down (a restart, a failover), long before its timeout, where the worker it waits
    for rides the outage out. It looks again until its time is up, and so sees the
    message settle once the server is back."""
    # Room for the reconnect after the outage (an attempt a second while a call waits,
    # reconnect.py) and for PostgreSQL's start-up on a loaded host.
    store = PostgresStore(own_postgres.create_database(), timeout=10)
    ms = Mailstrom(loopback_config(dns_server, 25), store=store, worker=None)
    outcome: list[object] = []

    def waiting() -> None:
        try:
            outcome.append(ms.wait(mid, timeout=60))
        except Exception as exc:
            outcome.append(exc)

    try:
        mid = ms.send_email(hello("u@example.org"))
        own_postgres.take_down()
        waiter = threading.Thread(target=waiting)
        waiter.start()
        time.sleep(1.0)  # the outage under test, not synchronisation
        own_postgres.bring_up()
        assert ms.cancel(mid) == 1
        waiter.join(30)
        [status] = outcome
        assert isinstance(status, MessageStatus), status
        assert status.state is RecipientState.FAILED
    finally:
        ms.stop(timeout=2)
        store.close()


async def test_an_async_wait_rides_out_a_postgresql_outage(
    own_postgres: ThrowawayPostgres, dns_server: LoopbackDNS
) -> None:
    """The same for AsyncMailstrom.wait."""
    # Room for the reconnect after the outage (an attempt a second while a call waits,
    # reconnect.py) and for PostgreSQL's start-up on a loaded host.
    store = PostgresStore(own_postgres.create_database(), timeout=10)
    ms = AsyncMailstrom(loopback_config(dns_server, 25), store=store, worker=None)
    try:
        mid = await ms.send_email(hello("u@example.org"))
        own_postgres.take_down()
        waiting = asyncio.ensure_future(ms.wait(mid, timeout=60))
        await asyncio.sleep(1.0)  # the outage under test, not synchronisation
        own_postgres.bring_up()
        assert await ms.cancel(mid) == 1
        status = await asyncio.wait_for(waiting, 30)
        assert status.state is RecipientState.FAILED
    finally:
        await ms.stop(timeout=2)
        store.close()


def test_a_worker_process_stopped_while_postgresql_is_down_ends_within_its_grace(
    own_postgres: ThrowawayPostgres, dns_server: LoopbackDNS
) -> None:
    """PostgreSQL going down under a running worker process, then ``stop(timeout=1)``:
    the worker stopped at once, but its process lived on while the store calls it had
    left waiting for a pooled connection (a lease every poll) waited out the store's
    timeout (30 s), which the event loop's end and the interpreter's exit wait for;
    stop() took 41 s, not the ``timeout + STOP_GRACE`` (11 s) it promises. The child
    closes its store once the worker stops, which ends those waits."""
    store = PostgresStore(own_postgres.create_database())
    ms = Mailstrom(
        loopback_config(dns_server, 25, poll_interval=0.2), store=store, worker="process"
    )
    try:
        ms.start()
        own_postgres.take_down()
        time.sleep(0.5)  # the outage under test: a lease waits for a connection
        began = time.monotonic()
        ms.stop(timeout=1)
        took = time.monotonic() - began
        assert not ms.worker_status.running
        assert took < 11, f"stop() took {took:.1f} s"
    finally:
        store.close()


def test_a_worker_process_killed_at_stop_while_postgresql_is_down_ends_in_time(
    own_postgres: ThrowawayPostgres, dns_server: LoopbackDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process that does not end within ``timeout + STOP_GRACE`` (here frozen)
    is killed, and stop() gives back what it leased, a store call in this process. With
    PostgreSQL down that call waited for a pooled connection for the store's timeout
    (30 s), past the bound stop() promises. The give-back is waited for briefly; its
    leases otherwise come back when they expire, as a dead worker's do."""
    monkeypatch.setattr(process, "STOP_GRACE", 0.3)
    store = PostgresStore(own_postgres.create_database())
    ms = Mailstrom(loopback_config(dns_server, 25), store=store, worker="process")
    try:
        ms.start()
        child = ms.worker
        assert isinstance(child, WorkerProcess) and child.pid is not None
        own_postgres.take_down()
        os.kill(child.pid, signal.SIGSTOP)  # a child that does not stop
        began = time.monotonic()
        ms.stop(timeout=0.1)
        took = time.monotonic() - began
        assert not ms.worker_status.running
        assert took < 5, f"stop() took {took:.1f} s"
    finally:
        store.close()

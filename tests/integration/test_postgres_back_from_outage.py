"""After a PostgreSQL outage, a call made once the server is back is served at once: the
pool's reconnection attempts back off (1 s, 2 s, 4 s ...), and a call waited for the next
one, failing with StoreUnreachable when the store's timeout was shorter, although the
server answered (stores/postgres/connect.py, :class:`LivePool`).

These tests stop a server: one of the module's own (``own_postgres``); those of the pool
alone point it at a port nobody listens on.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool, PoolTimeout

from mailstrom import Email, Mailstrom, RecipientState
from mailstrom.errors import StoreUnreachable
from mailstrom.stores.postgres import PostgresStore, reconnect
from mailstrom.stores.postgres.connect import LivePool, connection_pool
from mailstrom.stores.postgres.listener import Listener
from tests.contract.support import NOW, message
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.postgres import ThrowawayPostgres, _free_port
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import Results, loopback_config

pytestmark = pytest.mark.postgres

OUTAGE = 8.0
"""Long enough for the pool's attempts to back off to 4 s and more apart."""


def _fail_for(store: PostgresStore, mid: str, seconds: float) -> None:
    """Call ``store`` while the server is down for ``seconds``: each call fails."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        with pytest.raises(StoreUnreachable):
            store.status(mid)


def test_a_call_right_after_the_server_is_back_is_served_at_once(
    own_postgres: ThrowawayPostgres,
) -> None:
    store = PostgresStore(own_postgres.create_database(), timeout=2)
    try:
        mid = store.enqueue(message("a@example.org"), now=NOW)
        own_postgres.take_down()
        _fail_for(store, mid, OUTAGE)
        own_postgres.bring_up()
        # Within its 2 s, not at the pool's next attempt, seconds away.
        assert store.status(mid).id == mid
    finally:
        store.close()


def test_a_worker_waiting_for_a_connection_resumes_soon_after_the_server_is_back(
    own_postgres: ThrowawayPostgres, smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """The worker's lease that began waiting for a connection during the outage (the
    store's timeout, 30 s, outlasts it) is served within about a second of the server's
    return, not at the pool's next attempt, seconds later; the mail queued then (by
    another process) goes out at the worker's next poll."""
    receiver: Any = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", receiver.host)
    url = own_postgres.create_database()
    config = loopback_config(dns_server, receiver.port)  # polls every 0.5 s
    store = PostgresStore(url)
    results = Results()
    ms = Mailstrom(config, store=store, on_result=results, worker="thread")
    try:
        ms.start()
        own_postgres.take_down()
        time.sleep(OUTAGE)  # the outage under test, not synchronisation
        own_postgres.bring_up()
        other = PostgresStore(url)
        try:
            Mailstrom(config, store=other, worker=None).send_email(
                Email(from_="app@sender.test", to=["u@example.org"], subject="Hi", text="Hi")
            )
        finally:
            other.close()
        [result] = results.wait_count(1, timeout=4)
        assert result.state is RecipientState.DELIVERED
    finally:
        ms.stop(timeout=2)
        store.close()


def _refused_pool(timeout: float) -> LivePool:
    """An open pool of one connection to a port nobody listens on, its first attempt
    failed: the next waits out its backoff (about 1 s)."""
    pool = connection_pool(
        f"postgresql://postgres@127.0.0.1:{_free_port()}/nothing",
        name="refused",
        min_size=1,
        max_size=1,
        timeout=timeout,
    )
    assert isinstance(pool, LivePool)
    pool.open(wait=False)
    until = time.monotonic() + 10
    while not _attempts(pool):
        assert time.monotonic() < until, "the pool made no attempt"
        time.sleep(0.01)
    return pool


def _attempts(pool: ConnectionPool[Any]) -> int:
    return pool.get_stats().get("connections_errors", 0)


def test_a_caller_beginning_to_wait_gets_an_attempt_before_the_backoff_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pins what PromptPool relies on in psycopg_pool: that it calls _maybe_grow_pool as
    a caller begins to wait, and schedules its attempts' retries by schedule_task (with
    AddConnection tasks): psycopg_pool changing either fails this test, not quietly
    every call after an outage."""
    assert callable(vars(ConnectionPool).get("_maybe_grow_pool")), "psycopg_pool changed"
    monkeypatch.setattr(reconnect, "GAP", 0.1)
    pool = _refused_pool(timeout=0.5)
    try:
        made = _attempts(pool)
        with pytest.raises(PoolTimeout):
            pool.getconn()  # 0.5 s, less than the backoff's 0.9 s at least
        assert _attempts(pool) > made
    finally:
        pool.close()


def test_callers_waiting_at_once_share_one_attempt_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twenty callers waiting 1 s during an outage: the attempts come GAP apart at most
    often, not one per caller; and once nobody waits the pool keeps its backoff."""
    monkeypatch.setattr(reconnect, "GAP", 0.2)
    pool = _refused_pool(timeout=1.0)
    failures: list[BaseException] = []

    def wait() -> None:
        try:
            pool.getconn()
        except PoolTimeout as exc:
            failures.append(exc)

    try:
        made = _attempts(pool)
        callers = [threading.Thread(target=wait) for _ in range(20)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(10)
        assert len(failures) == 20
        during = _attempts(pool) - made
        assert 2 <= during <= 1.0 / 0.2 + 2, during
        time.sleep(1.2)  # the last wait's timeout: the pool keeps its backoff after it
        made = _attempts(pool)
        time.sleep(1.5)  # the backoff under test, not synchronisation
        assert _attempts(pool) - made <= 1
    finally:
        pool.close()


LISTEN_OUTAGE = 9.0
"""Long enough for the listener's attempts to back off to 8 s apart: 0.5 s doubling from
the connection's loss, the attempt at 7.5 s fails and the next is due at 15.5 s."""


class _IdleStore(PostgresStore):
    """Sets ``idle`` once the worker has asked when work comes due: its store loop then
    waits for a wake-up (or its poll). A lease the outage failed would be retried within
    seconds of the server's return, and find the mail without the listener's help."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.idle = threading.Event()

    def next_due(self, *, now: datetime) -> datetime | None:
        due = super().next_due(now=now)
        self.idle.set()
        return due


def test_a_worker_hears_new_mail_soon_after_a_long_outage(
    own_postgres: ThrowawayPostgres, smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """Mail queued by another process once the server is back goes out within about a
    second, though the worker polls once a minute: the worker's store reaching the server
    again (its look for dead workers waits through the outage, as one does through any
    outage longer than a beat; ``dead_after=40s``: a beat every 5 s) brings the LISTEN
    connection's next attempt forward. The worker waited out the listener's backoff
    instead (8 s here, up to 30 s after a longer outage), deaf to the NOTIFY."""
    receiver: Any = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", receiver.host)
    url = own_postgres.create_database() + "?dead_after=40s"
    config = loopback_config(dns_server, receiver.port, poll_interval=60)
    store, other = _IdleStore(url), PostgresStore(url)
    results = Results()
    ms = Mailstrom(config, store=store, on_result=results, worker="thread")
    try:
        ms.start()
        assert store.idle.wait(10)
        own_postgres.take_down()
        time.sleep(LISTEN_OUTAGE)  # the outage under test, not synchronisation
        own_postgres.bring_up()
        Mailstrom(config, store=other, worker=None).send_email(
            Email(from_="app@sender.test", to=["u@example.org"], subject="Hi", text="Hi")
        )
        [result] = results.wait_count(1, timeout=3)
        assert result.state is RecipientState.DELIVERED
    finally:
        ms.stop(timeout=2)
        store.close()
        other.close()


class _CountedListener(Listener):
    """A listener that counts its failed attempts to connect."""

    def __init__(self, url: str) -> None:
        super().__init__(url, lambda _: None)
        self.failures = 0
        self._failed = threading.Condition()

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        try:
            return super()._connect()
        except psycopg.Error:
            with self._failed:
                self.failures += 1
                self._failed.notify_all()
            raise

    def wait_failures(self, count: int, timeout: float) -> bool:
        with self._failed:
            return self._failed.wait_for(lambda: self.failures >= count, timeout)


def test_the_listener_tries_at_once_when_told_the_server_answers_and_stops_at_once() -> None:
    """Backing off 4 s after a failure, the listener tries again as soon as it hears that
    the server answers (``answered``: the store's pool made a connection), once; and
    backing off 8 s after that, its thread ends as soon as it is stopped: one attempt at
    a time, from its own thread, none left behind."""
    listener = _CountedListener(f"postgresql://postgres@127.0.0.1:{_free_port()}/nothing")
    listener.start()  # the first failure; then its thread's at 0, 0.5, 1.5 and 3.5 s
    try:
        assert listener.wait_failures(5, timeout=10)
        listener.answered()
        assert listener.wait_failures(6, timeout=2)  # not at the backoff's 4 s
        assert listener.failures == 6
    finally:
        listener.stop(timeout=2)
    assert not listener.alive

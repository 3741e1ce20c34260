"""The operator's methods on both facades (issue 14 §1: facade parity and ``wait``).

``wait`` returns as soon as the outcome is known: every recipient final, or the next
retry falls after the timeout; a real worker delivers to a loopback receiver.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailstrom import (
    AmbiguousMessageId,
    AsyncMailstrom,
    Config,
    Email,
    InvalidArgument,
    Mailstrom,
    RecipientState,
    StoreError,
    StoreUnreachable,
    UnknownMessage,
)
from mailstrom.stores import MemoryStore, QueueFilter, SQLiteStore, open_store
from mailstrom.stores.operator import PENDING_STATES
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import loopback_config


def hello(to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject="Hi", text="Hello")


@pytest.fixture
def mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> Any:
    server = smtp_server()
    for domain in ("example.org", "other.org"):
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


def config(dns: LoopbackDNS, port: int) -> Config:
    return loopback_config(dns, port, poll_interval=30)  # only wake-ups explain speed


def test_wait_returns_once_delivered_or_deferred_past_the_timeout(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    mx.rcpt_replies["grey@example.org"] = ["451 4.7.1 Greylisted"]
    with Mailstrom(config(dns_server, mx.port), store=MemoryStore(), worker="thread") as ms:
        started = time.monotonic()
        delivered = ms.wait(ms.send_email(hello("bob@example.org")), timeout=60)
        assert delivered.state is RecipientState.DELIVERED
        grey = ms.send_email(hello("grey@example.org"))
        status = ms.wait(grey[:24], timeout=60)  # a prefix works too
        assert status.state is RecipientState.DEFERRED
        # The retry is minutes away: no reason to sit out the 60 seconds.
        assert time.monotonic() - started < 20
        # With a timeout past the next retry, the wait is not over yet: it times out.
        mx.rcpt_replies["slow@example.org"] = ["451 4.7.1 Greylisted"]
        slow = ms.send_email(hello("slow@example.org"))
        ms.wait(slow, timeout=10)
        before = time.monotonic()
        # The next retry is minutes away: returned at once, not when the timeout is up
        # (the room below it is a loaded host's).
        assert ms.wait(slow, timeout=5.0).state is RecipientState.DEFERRED
        assert time.monotonic() - before < 4.0
        with pytest.raises(UnknownMessage):
            ms.wait("0" * 32, timeout=1)


async def test_async_wait(mx: Any, dns_server: LoopbackDNS) -> None:
    async with AsyncMailstrom(config(dns_server, mx.port), store=MemoryStore()) as ms:
        assert ms.worker_mode == "task"
        started = time.monotonic()
        mid = await ms.send_email(hello("bob@example.org"))
        status = await ms.wait(mid, timeout=60)
        assert status.state is RecipientState.DELIVERED
        assert time.monotonic() - started < 20


def test_wait_with_a_worker_process(mx: Any, dns_server: LoopbackDNS, tmp_path: Any) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store) as ms:
        assert ms.worker_mode == "process"
        mid = ms.send_email(hello("bob@example.org"))
        assert ms.wait(mid, timeout=60).state is RecipientState.DELIVERED
    store.close()


def test_operator_methods_on_the_sync_facade() -> None:
    with Mailstrom(Config(helo_name="client.test"), store=MemoryStore(), worker=None) as ms:
        a = ms.send_email(hello("a@example.org"))
        b = ms.send_email(hello("b@other.org"))
        assert ms.resolve_id(a[:24]) == a
        with pytest.raises(AmbiguousMessageId):
            ms.resolve_id(a[:4])
        assert ms.query_status(b[:24]).id == b

        assert ms.hold([a[:24], b]) == 2
        assert ms.stats().held == 2
        assert ms.release(QueueFilter(domain="other.org")) == 1
        assert ms.hold(b) == 1 and ms.release(b) == 1
        assert ms.retry_many(QueueFilter(states=PENDING_STATES)) == 2
        assert ms.count(QueueFilter(states=PENDING_STATES)) == 2
        assert [m.id for m in ms.query(QueueFilter(held=True))] == [a]
        assert [(r.domain, r.total) for r in ms.shape()] == [("example.org", 1), ("other.org", 1)]
        assert b"Hello" in ms.message_data(a[:24])

        ms.suspend("Example.org.", for_=timedelta(hours=1))
        [suspension] = ms.suspensions()
        assert suspension.domain == "example.org" and suspension.until is not None
        assert ms.resume("example.org") is True
        assert ms.suspensions() == []

        assert ms.cancel_many([a, b]) == 2
        assert ms.purge(timedelta(0), state=RecipientState.DELIVERED) == 0
        assert ms.purge(timedelta(hours=1), messages=[a]) == 0  # cancelled just now
        assert ms.purge(timedelta(seconds=-1), state=RecipientState.FAILED) == 2
        assert ms.stats().messages == 0


def test_resume_of_a_suspension_that_has_ended_is_false() -> None:
    """resume() was True for a suspension whose end had passed, one suspensions() no
    longer listed; it says False for a domain that is not suspended."""
    with Mailstrom(Config(helo_name="client.test"), store=MemoryStore(), worker=None) as ms:
        ms.suspend("example.org", until=datetime.now(UTC) - timedelta(minutes=1))
        assert ms.suspensions() == []
        assert ms.resume("example.org") is False


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_suspension_end_past_a_hundred_years_is_refused(kind: str, tmp_path: Any) -> None:
    """suspend(until=...) took any aware time, where for_ is bounded to 100 years: one in
    year 9999 was kept, and SQLite (PostgreSQL alike) read it back as no time, listing the
    suspension as "until resumed" while the memory store showed its end."""
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "q.db")
    with Mailstrom(Config(helo_name="client.test"), store=store, worker=None) as ms:
        now = datetime.now(UTC)
        for until in (datetime(9999, 1, 1, tzinfo=UTC), now + timedelta(days=36526)):
            with pytest.raises(InvalidArgument) as caught:
                ms.suspend("example.org", until=until)
            assert caught.value.argument == "until"
        assert ms.suspensions() == []
        far = now + timedelta(days=36000)
        ms.suspend("example.org", until=far)
        [suspension] = ms.suspensions()
        assert suspension.until == far
    store.close()


def test_purge_of_listed_messages_heeds_the_state() -> None:
    """purge(messages=..., state=DELIVERED) deleted failed messages too: the state was
    heeded only without ``messages``."""
    with Mailstrom(Config(helo_name="client.test"), store=MemoryStore(), worker=None) as ms:
        cancelled = ms.send_email(hello("a@example.org"))
        ms.cancel_many(cancelled)
        everything = QueueFilter(states=None)
        ago = timedelta(seconds=-1)
        for messages in ([cancelled], everything):
            assert ms.purge(ago, state=RecipientState.DELIVERED, messages=messages) == 0
        assert ms.query_status(cancelled).state is RecipientState.FAILED
        assert ms.purge(ago, state=RecipientState.FAILED, messages=everything) == 1


def test_purge_by_a_filter_reaches_past_its_limit_of_mail_it_cannot_delete() -> None:
    """A filter's newest ``limit`` messages were selected, then those purge could delete
    kept: newer pending mail, or mail finished too recently, hid the older mail."""
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    store = MemoryStore()
    with Mailstrom(Config(helo_name="client.test"), store=store, clock=lambda: now[0]) as ms:
        old = ms.send_email(hello("a@example.org"))
        ms.cancel_many(old)
        now[0] += timedelta(days=2)
        recent = ms.send_email(hello("b@example.org"))
        ms.cancel_many(recent)
        ms.send_email(hello("c@example.org"))  # pending
        newest = QueueFilter(limit=1)
        assert ms.purge(timedelta(days=1), messages=newest) == 1
        assert [m.id for m in ms.query(QueueFilter(states=None))][1:] == [recent]
        assert ms.purge(timedelta(seconds=-1), state=RecipientState.FAILED, messages=newest) == 1


async def test_operator_methods_on_the_async_facade() -> None:
    ms = AsyncMailstrom(Config(helo_name="client.test"), store=MemoryStore(), worker=None)
    async with ms:
        a = await ms.send_email(hello("a@example.org"))
        assert await ms.resolve_id(a[:24]) == a
        assert await ms.hold(a[:24]) == 1
        assert await ms.release([a]) == 1
        assert await ms.retry_many(a) == 1
        assert await ms.count() == 1
        assert [m.id for m in await ms.query()] == [a]
        assert (await ms.stats()).messages == 1
        assert [r.domain for r in await ms.shape()] == ["example.org"]
        assert b"Hello" in await ms.message_data(a)
        await ms.suspend("example.org")
        assert [s.domain for s in await ms.suspensions()] == ["example.org"]
        assert await ms.resume("example.org") is True
        assert await ms.cancel_many(QueueFilter()) == 1
        assert await ms.purge(timedelta(seconds=-1)) == 1
        held = await ms.send_email(hello("b@example.org"))
        await ms.hold(held)
        assert (await ms.wait(held, timeout=30)).held  # a held message cannot change


def test_waits_share_one_store_watch_until_stop(tmp_path: Any) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    wake_dir = tmp_path / "q.db-wake"
    ms = Mailstrom(Config(helo_name="client.test"), store=store, worker=None)
    with ms:
        mid = ms.send_email(hello("a@example.org"))
        ms.hold(mid)
        for _ in range(3):
            assert ms.wait(mid, timeout=5).held
        assert len(list(wake_dir.glob("*.sock"))) == 1  # one listener, not one per wait
    assert list(wake_dir.glob("*.sock")) == []
    store.close()


@pytest.mark.parametrize("facade", ["sync", "async"])
def test_a_facade_dropped_without_stop_leaves_no_store_watch(tmp_path: Any, facade: str) -> None:
    """A facade made for one request (the store shared, worker=None, never stopped, as
    the README's web app has it) kept the watch its first wait() started for good: a
    thread and a socket each (a LISTEN connection with PostgreSQL), long after the
    facade was gone."""
    store = SQLiteStore(tmp_path / "q.db")
    wake_dir = tmp_path / "q.db-wake"
    config = Config(helo_name="client.test")

    async def request_async() -> None:
        ams = AsyncMailstrom(config, store=store, worker=None)
        mid = await ams.send_email(hello("a@example.org"))
        await ams.hold(mid)
        assert (await ams.wait(mid, timeout=5)).held

    def request() -> None:
        if facade == "async":
            asyncio.run(request_async())
            return
        ms = Mailstrom(config, store=store, worker=None)
        mid = ms.send_email(hello("a@example.org"))
        ms.hold(mid)
        assert ms.wait(mid, timeout=5).held

    try:
        for _ in range(3):
            request()
        gc.collect()
        assert list(wake_dir.glob("*.sock")) == []
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["memory", "sqlite", "postgres"])
def test_an_id_of_full_length_that_is_no_id_is_an_unknown_message(
    backend: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """A 32-character string skipped the check a prefix gets: one with a lone surrogate
    (or a NUL, on PostgreSQL) reached the store's query, and SQLite and PostgreSQL raised
    StoreRefusedData where the memory store said UnknownMessage."""
    url = {"memory": "memory:", "sqlite": f"sqlite:///{tmp_path / 'q.db'}"}.get(backend)
    store = url or request.getfixturevalue("postgres_url")
    bad_ids = ("0" * 31 + "\ud800", "\x00" * 32, "g" * 32, "İ" * 32)
    with Mailstrom(Config(helo_name="client.test"), store=store, worker=None) as ms:
        mid = ms.send_email(hello("a@example.org"))
        assert ms.query_status(mid.upper()).id == mid  # a full id, in any case
        for bad in bad_ids:
            for call in (ms.query_status, ms.retry, ms.cancel, ms.message_data, ms.hold):
                with pytest.raises(UnknownMessage):
                    call(bad)
            with pytest.raises(UnknownMessage):
                ms.wait(bad, timeout=0)


@pytest.mark.parametrize("backend", ["memory", "sqlite", "postgres"])
async def test_bulk_methods_raise_unknown_message_for_a_full_id_not_stored(
    backend: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """``hold``, ``release``, ``retry_many``, ``cancel_many`` and ``purge(messages=)``
    raise UnknownMessage for an id that is not stored, as the guide says and as
    ``mailstrom hold`` does, before anything changes. A prefix was looked up, but a full
    id was taken as it was: one purged meanwhile, or mistyped in one digit, was skipped
    in silence ("0 changed"), and the others of the list were changed all the same."""
    url = {"memory": "memory:", "sqlite": f"sqlite:///{tmp_path / 'q.db'}"}.get(backend)
    store = url or request.getfixturevalue("postgres_url")
    gone = "0" * 32
    with Mailstrom(Config(helo_name="client.test"), store=store, worker=None) as ms:
        mid = ms.send_email(hello("a@example.org"))
        calls = (
            ms.hold,
            ms.release,
            ms.retry_many,
            ms.cancel_many,
            lambda m: ms.purge(timedelta(0), messages=m),
        )
        for call in calls:
            for given in (gone, [mid, gone], [mid, gone.upper()]):
                with pytest.raises(UnknownMessage):
                    call(given)
        status = ms.query_status(mid)
        assert not status.held
        assert status.recipients[0].state is RecipientState.QUEUED
        async with AsyncMailstrom(
            Config(helo_name="client.test"), store=ms.store, worker=None
        ) as ams:
            for acall in (ams.hold, ams.release, ams.retry_many, ams.cancel_many):
                with pytest.raises(UnknownMessage):
                    await acall([mid, gone])
            with pytest.raises(UnknownMessage):
                await ams.purge(timedelta(0), messages=gone)
        assert not ms.query_status(mid).held
        assert ms.hold(mid.upper()) == 1  # a full id in any case is still one


def test_purge_with_a_clock_in_a_zone_with_summer_time_reckons_in_utc() -> None:
    """Was: a clock in a zone with summer time (``ZoneInfo``) had purge's age subtracted
    on its wall clock. An hour after clocks went forward, 03:10 CEST less an hour is
    02:10, which does not exist and reads as 01:10 UTC (now itself), so "finished more
    than an hour ago" deleted mail cancelled 30 minutes before."""
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")
    now = [datetime(2026, 3, 29, 1, 40, tzinfo=berlin)]  # 00:40 UTC
    store = MemoryStore()
    with Mailstrom(Config(helo_name="client.test"), store=store, clock=lambda: now[0]) as ms:
        cancelled = ms.send_email(hello("a@example.org"))
        ms.cancel_many(cancelled)
        now[0] = datetime(2026, 3, 29, 3, 10, tzinfo=berlin)  # 01:10 UTC, 30 minutes on
        assert ms.purge(timedelta(hours=1)) == 0
        assert ms.purge(timedelta(hours=1), messages=QueueFilter(states=None)) == 0
        assert ms.query_status(cancelled).state is RecipientState.FAILED
        assert ms.purge(timedelta(minutes=20)) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_wait_on_a_closed_store_ends_at_once(
    backend: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """A wait looks again after a passing trouble (an unreachable server, a lock held)
    until its time is up, and ends at once on any other error, a closed store among them
    (an application closing its store at shutdown while a request waits). A closed
    PostgreSQL store said StoreUnreachable ("the pool is already closed"), as a server
    out of reach: the wait looked again every quarter second for its whole timeout, an
    hour here. It says StoreError, the store is closed, as SQLite does."""
    url = f"sqlite:///{tmp_path / 'q.db'}" if backend == "sqlite" else None
    store = open_store(url or request.getfixturevalue("postgres_url"))
    with Mailstrom(Config(helo_name="client.test"), store=store, worker=None) as ms:
        mid = ms.send_email(hello("a@example.org"))
        ms.wait(mid, timeout=0)  # the facade's watch of the store, kept for later waits
        store.close()
        outcome: list[BaseException | None] = []
        done = threading.Event()

        def wait() -> None:
            try:
                ms.wait(mid, timeout=3600)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        assert done.wait(30), "the wait went on after the store was closed"
        [error] = outcome
        assert isinstance(error, StoreError)
        assert not isinstance(error, StoreUnreachable)
        assert "closed" in str(error)

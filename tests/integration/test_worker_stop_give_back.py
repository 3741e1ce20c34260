"""What a stopping worker gives back (worker_stopping.py), against a real SQLite store
whose write lock another process holds, and a loopback SMTP server that stalls."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom.errors import StoreLocked
from mailstrom.message import prepare
from mailstrom.runtime.worker import Worker
from mailstrom.status import RecipientState
from mailstrom.stores import SQLiteStore
from mailstrom.stores.base import Lease, RecipientResult
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.integration.test_engine import FAST, hello, write_lock_held
from tests.integration.test_worker_store_error import PATIENT
from tests.support.delivery import loopback_config

LEASES = 5
BUSY = 1.0
"""The store's busy timeout: how long each write waits for the lock held elsewhere."""


async def _until(check: object, timeout: float) -> bool:
    """Poll ``check`` (a snapshot of the store: nothing to wait on) until it holds."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return False


async def test_stop_gives_up_giving_back_once_the_store_fails(
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker holds five leases (one recipient each) on a server that stalls when it
    stops: another process holds the database's write lock. Each give-back waited the
    whole busy timeout and failed, one lease after the other, so stopping took five busy
    timeouts (a minute per lease with the default 30 s under ``mailstrom worker``'s
    SIGTERM). Once one fails the worker gives up the rest, which its leases bring back
    when they expire, as for a worker that died: the stop takes one busy timeout."""
    mx = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    path = tmp_path / "q.db"
    store = SQLiteStore(path, busy_timeout=BUSY)
    try:
        now = datetime.now(UTC)
        for i in range(LEASES):
            store.enqueue(prepare(hello(f"u{i}@example.org", i)), now=now)
        config = loopback_config(dns_server, mx.port, timeouts=FAST, lease_batch=1)
        worker = Worker(config, store)
        run = asyncio.create_task(worker.run())

        def leased() -> int:
            return sum(holder.leased for holder in store.live_holders())

        assert await _until(lambda: leased() == LEASES and mx.received, 10), leased()
        with write_lock_held(path):
            began = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="mailstrom.worker"):
                worker.request_stop(drain_timeout=0.1)
                await asyncio.wait_for(run, 60)
            took = time.monotonic() - began
    finally:
        store.close()
    assert took < 2.5 * BUSY, took
    assert "could not give back" in caplog.text


class LeaseWaits(SQLiteStore):
    """A SQLite store called in threads, as PostgreSQL is (its leases then run beside the
    records), whose leases of new work wait for the test's word once it is armed."""

    in_process = False

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.armed = threading.Event()
        self.leasing = threading.Event()
        self.go = threading.Event()

    def record_and_lease(self, results: Any, **kwargs: Any) -> Any:
        if kwargs.get("limit") and self.armed.is_set():
            self.leasing.set()
            self.go.wait(10)
        return super().record_and_lease(results, **kwargs)


async def test_a_lease_that_ends_after_the_stop_is_given_back_not_started(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A lease still running when the stop was asked for (beside the records: a store
    called in a thread) had its work started when it came back during the drain: a
    stopping worker sent new mail for as long as the drain allowed, and what it cut off
    at the drain's end (its final dot sent, the reply not yet in) went out again. Its
    work is given back at once now, due at once, as what a stop finds leased and never
    attempted is."""
    stalled = smtp_server(stall_on="dot")
    mx = smtp_server(host="127.0.0.2", port=stalled.port)
    dns_server.mx("stalled.example", [(10, "mx.stalled.test")])
    dns_server.a("mx.stalled.test", stalled.host)
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    store = LeaseWaits(tmp_path / "q.db")
    try:
        now = datetime.now(UTC)
        store.enqueue(prepare(hello("slow@stalled.example")), now=now)
        worker = Worker(loopback_config(dns_server, stalled.port, timeouts=FAST), store)
        run = asyncio.create_task(worker.run())
        assert await _until(lambda: stalled.received, 10)  # in flight: the drain waits
        store.armed.set()
        mid = store.enqueue(prepare(hello("u@example.org")), now=now)
        worker.wake()
        assert await asyncio.to_thread(store.leasing.wait, 10)
        worker.request_stop(drain_timeout=1.5)
        await asyncio.sleep(0.05)  # the stop is heard before the lease comes back
        store.go.set()
        await asyncio.wait_for(run, 30)
        assert not store.status(mid).is_final
        assert not mx.received
        assert sum(holder.leased for holder in store.live_holders()) == 0  # given back
    finally:
        store.close()


class ExtendsSeen(SQLiteStore):
    """A SQLite store that notes each extension the worker asks for: its lease's token,
    and whether it failed."""

    def __init__(self, path: Path, *, busy_timeout: float) -> None:
        super().__init__(path, busy_timeout=busy_timeout)
        self.extends: list[tuple[str, bool]] = []

    def extend(self, lease: Lease, *, until: datetime) -> int:
        try:
            held = super().extend(lease, until=until)
        except StoreLocked:
            self.extends.append((lease.token, False))
            raise
        self.extends.append((lease.token, True))
        return held


async def test_a_beat_stops_extending_once_the_store_is_locked(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The worker holds five leases on a server that stalls, and another process holds
    the database's write lock. Each beat tried every lease in turn, each extension waiting
    the whole busy timeout on the worker's loop before it failed as surely as the one
    before: the loop stood still five busy timeouts a beat (ten minutes for twenty
    leases with the default 30 s), its sessions unread. Once one extension finds the
    store locked, the beat leaves the rest to the next one (their leases count as not
    extended, which fencing judges), as a stop's give-back does."""
    mx = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    path = tmp_path / "q.db"
    store = ExtendsSeen(path, busy_timeout=0.3)
    try:
        now = datetime.now(UTC)
        for i in range(LEASES):
            store.enqueue(prepare(hello(f"u{i}@example.org", i)), now=now)
        config = loopback_config(
            dns_server, mx.port, timeouts=PATIENT, lease_batch=1, lease_for=timedelta(seconds=3)
        )
        worker = Worker(config, store)
        run = asyncio.create_task(worker.run())

        def leased() -> int:
            return sum(holder.leased for holder in store.live_holders())

        assert await _until(lambda: leased() == LEASES and mx.received, 10), leased()
        assert await _until(lambda: len(store.extends) >= LEASES, 10)  # a beat that worked
        with write_lock_held(path):
            seen = len(store.extends)
            assert await _until(lambda: any(not ok for _, ok in store.extends[seen:]), 10)
            await asyncio.sleep(0.5)  # a beat's worth of extensions, had it gone on
        worker.request_stop(drain_timeout=0)
        await asyncio.wait_for(run, 30)
    finally:
        store.close()
    order = [token for token, _ in store.extends[:LEASES]]  # a beat's, lease by lease
    assert sorted(order) == sorted(set(order)), order
    during = store.extends[seen:]
    first = next(i for i, (_, ok) in enumerate(during) if not ok)
    # After a failure the next call is the first lease's, at the next beat: not the
    # next lease's of the same beat.
    after = [token for token, _ in during[first + 1 :]]
    assert not after or after[0] == order[0], (order, during)


@pytest.mark.parametrize("retry_uncertain", [True, False], ids=["retried", "counted-delivered"])
async def test_a_transaction_cut_off_after_its_final_dot_is_uncertain_not_given_back(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path, retry_uncertain: bool
) -> None:
    """The drain ends while the server has the whole message and its reply to the final
    dot is not in (it may well have taken the message): as after a connection lost there,
    the recipient is uncertain (RFC 5321 §4.5.3.2.6), deferred with the retry policy's
    backoff (or counted delivered with ``retry_uncertain=False``). It was given back due
    at once, as if never sent, and the next worker sent it a second time at once. Its
    reason said "connection lost" where the worker had dropped the connection itself."""
    mx = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    store = SQLiteStore(tmp_path / "q.db")
    try:
        mid = store.enqueue(prepare(hello("u@example.org")), now=datetime.now(UTC))
        config = loopback_config(
            dns_server, mx.port, timeouts=FAST, retry_uncertain=retry_uncertain
        )
        worker = Worker(config, store)
        run = asyncio.create_task(worker.run())
        assert await _until(lambda: mx.received, 10)  # the content is in, no reply yet
        worker.request_stop(drain_timeout=0.1)
        await asyncio.wait_for(run, 30)
        [r] = store.status(mid).recipients
        assert r.uncertain and r.attempts == 1, r
        # Said as what happened: the worker stopped (not "connection lost", which sends an
        # operator looking at the network or the server).
        assert r.error is not None and "worker stopped" in r.error, r
        if retry_uncertain:
            assert r.state is RecipientState.DEFERRED, r
            assert r.next_attempt_at is not None and r.next_attempt_at > datetime.now(UTC)
        else:
            assert r.state is RecipientState.DELIVERED, r
        assert store.lease(now=datetime.now(UTC), limit=10, lease_for=timedelta(minutes=5)) is None
    finally:
        store.close()


class RecordWaits(SQLiteStore):
    """A SQLite store called in threads, as PostgreSQL is, that tells when a write of
    results has begun (it then waits for the lock another process holds)."""

    in_process = False

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.recording = threading.Event()

    def record_and_lease(self, results: Any, **kwargs: Any) -> Any:
        if results:
            self.recording.set()
        return super().record_and_lease(results, **kwargs)


async def test_a_stop_at_once_waits_for_the_write_under_way(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A delivered result is being written (in a thread, as for PostgreSQL; the write
    waits for a lock held elsewhere) when the worker is told to stop at once
    (``drain_timeout=0``: a stop() with no time to drain). The stop cancelled the
    write at once and ``run`` returned with the result unrecorded: the process then
    exits, its write dies with it, and the delivered recipient, still leased, went out a
    second time when its lease expired. What the worker holds is written before it ends,
    for a few seconds at most whatever the drain timeout."""
    mx = smtp_server()
    # The content is in; the reply comes once the lock is held (room for a loaded host:
    # the lock must be taken before the reply lets the worker write).
    mx.data_delay = 1.5  # (PATIENT: the worker waits for it)
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    path = tmp_path / "q.db"
    store = RecordWaits(path, busy_timeout=10)
    recorded: list[RecipientResult] = []
    try:
        mid = store.enqueue(prepare(hello("u@example.org")), now=datetime.now(UTC))
        config = loopback_config(dns_server, mx.port, timeouts=PATIENT)
        worker = Worker(config, store, on_result=recorded.append)
        run = asyncio.create_task(worker.run())
        assert await _until(lambda: mx.received, 10)
        with write_lock_held(path):
            assert await _until(store.recording.is_set, 10)
            worker.request_stop(drain_timeout=0)
            await asyncio.sleep(0.3)  # the stop runs; the write still waits for the lock
        await asyncio.wait_for(run, 30)
        assert [r.address for r in recorded] == ["u@example.org"], recorded
        assert worker.status.unrecorded == 0
        [r] = store.status(mid).recipients
        assert r.state is RecipientState.DELIVERED and r.attempts == 1, r
        assert len(mx.messages) == 1
    finally:
        store.close()


@pytest.mark.postgres
async def test_a_stop_at_once_waits_for_the_write_under_way_on_postgres(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, postgres_url: str
) -> None:
    """The same on PostgreSQL: the write of the delivered result waits for a lock another
    session holds on ``recipients`` when the worker is told to stop at once."""
    import psycopg

    from mailstrom.stores.postgres import PostgresStore
    from tests.support.pg_tables import small_message

    mx = smtp_server(starttls=False)
    # The content is in; the reply comes once the lock is held (room for a loaded host:
    # the lock must be taken before the reply lets the worker write).
    mx.data_delay = 1.5  # (PATIENT: the worker waits for it)
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    recorded: list[RecipientResult] = []
    with (
        PostgresStore(postgres_url + "?lock_timeout=60s") as store,
        psycopg.connect(postgres_url, autocommit=True) as watcher,
    ):
        mid = store.enqueue(small_message("a@example.org"), now=datetime.now(UTC))
        config = loopback_config(dns_server, mx.port, poll_interval=60.0, timeouts=PATIENT)
        worker = Worker(config, store, on_result=recorded.append)
        holder = psycopg.connect(postgres_url)  # connected before: only the LOCK is timed
        run = asyncio.create_task(worker.run())
        assert await _until(lambda: mx.received, 10)
        try:
            holder.execute("LOCK TABLE recipients IN EXCLUSIVE MODE")

            def write_waits() -> bool:
                # The record's write, not another statement that waits for the lock (the
                # worker's look for dead holders' leases, say): stopped at once before
                # the reply came, the delivery was given back, not recorded. Known by the
                # start of its text (queries.sql's comment on it): the server keeps the
                # first 1 KiB of a statement's text only.
                return bool(
                    watcher.execute(
                        "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                        " WHERE NOT l.granted AND l.relation = 'recipients'::regclass"
                        " AND a.query LIKE '-- Results of any number of leases,%'"
                    ).fetchall()
                )

            assert await _until(write_waits, 10)
            worker.request_stop(drain_timeout=0)
            await asyncio.sleep(0.3)  # the stop runs; the write still waits for the lock
        finally:
            holder.close()
        await asyncio.wait_for(run, 30)
        assert [r.address for r in recorded] == ["a@example.org"], recorded
        [r] = store.status(mid).recipients
        assert r.state is RecipientState.DELIVERED and r.attempts == 1, r

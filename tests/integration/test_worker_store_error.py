"""``worker_status.store_error`` says the store fails while it fails, and no longer once it
answers again: also for the calls the worker makes beside its writes of results (the
heartbeat's extensions of its leases), which alone run while a delivery takes long."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from mailstrom import Mailstrom, Timeouts
from mailstrom.errors import StoreError, StoreLocked
from mailstrom.policy.shaping import ShapingConfig
from mailstrom.runtime import worker_destinations
from mailstrom.status import DestinationThrottle
from mailstrom.stores import SQLiteStore
from mailstrom.stores.base import MAX_TLS_BROKEN, Lease
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.integration.test_worker_modes import _wait_until, config, hello

PATIENT = Timeouts(connect=5, greeting=5, command=5, data_init=5, data_block=5, data_end=120)
"""The worker waits for the final reply well past the test's own waits."""


class ExtendFailsOnce(SQLiteStore):
    """A SQLite store whose first extension of a lease fails as a write lock held
    elsewhere past busy_timeout makes it fail; counts the extensions that worked after."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failed = threading.Event()
        self.extended_after = 0

    def extend(self, lease: Lease, *, until: datetime) -> int:
        if not self.failed.is_set():
            self.failed.set()
            raise StoreLocked("database is locked (another process holds its write lock)")
        held = super().extend(lease, until=until)
        self.extended_after += 1
        return held


def test_an_extension_that_works_again_clears_the_store_error(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The heartbeat set store_error when an extension failed and never cleared it:
    while a delivery took long (no result to write) the status said the store failed,
    for as long as the delivery lasted, although every extension since had worked."""
    mx = smtp_server(stall_on="dot")  # takes the message, then does not answer
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    store = ExtendFailsOnce(tmp_path / "q.db")
    cfg = config(dns_server, mx.port, timeouts=PATIENT, lease_for=timedelta(seconds=1.5))
    ms = Mailstrom(cfg, store=store, worker="thread")
    ms.start()
    try:
        ms.send_email(hello("u@example.org"))
        assert _wait_until(lambda: len(mx.received) >= 1, 10)  # in flight from now on
        assert store.failed.wait(10)
        assert _wait_until(lambda: store.extended_after >= 2, 10)
        status = ms.worker_status
        assert status.running and status.unrecorded == 0
        assert status.store_error is None, status.store_error
    finally:
        ms.stop(timeout=0)
        store.close()


class ThrottlesFailOnce(SQLiteStore):
    """A SQLite store whose fifth read of the destination pauses fails (a read the
    database refused for a moment), well after the worker's first lease; counts the
    reads that worked after it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads = 0
        self.failed = threading.Event()
        self.read_after = 0

    def throttles(self, *, now: datetime) -> list[DestinationThrottle]:
        self.reads += 1
        if self.reads == 5:
            self.failed.set()
            raise StoreError("disk I/O error")
        found = super().throttles(now=now)
        if self.failed.is_set():
            self.read_after += 1
        return found


def test_a_read_of_pauses_that_works_again_clears_the_store_error(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The pauses loop set store_error when its read failed and never cleared it: an
    idle worker said the store failed until its next poll, a busy one until its next
    write of results, although every read since had worked."""
    mx = smtp_server()
    store = ThrottlesFailOnce(tmp_path / "q.db")
    cfg = config(dns_server, mx.port, poll_interval=120, shaping=ShapingConfig(refresh=0.05))
    ms = Mailstrom(cfg, store=store, worker="thread")
    ms.start()
    try:
        assert store.failed.wait(10)
        assert _wait_until(lambda: store.read_after >= 2, 10)
        status = ms.worker_status
        assert status.running
        assert status.store_error is None, status.store_error
    finally:
        ms.stop(timeout=0)
        store.close()


class TLSMemoryFailsOnce(SQLiteStore):
    """A SQLite store whose third read of the hosts with broken TLS fails; counts the
    reads that worked after it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads = 0
        self.failed = threading.Event()
        self.read_after = 0

    def tls_broken(self, *, now: datetime, limit: int = MAX_TLS_BROKEN) -> dict[str, datetime]:
        self.reads += 1
        if self.reads == 3:
            self.failed.set()
            raise StoreError("disk I/O error")
        found = super().tls_broken(now=now, limit=limit)
        if self.failed.is_set():
            self.read_after += 1
        return found


def test_a_read_of_broken_tls_hosts_that_works_again_clears_the_store_error(
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As for the pauses: the read of the hosts every worker found with broken TLS
    (each minute) set store_error and never cleared it."""
    monkeypatch.setattr(worker_destinations, "_TLS_REFRESH", 0.05)
    mx = smtp_server()
    store = TLSMemoryFailsOnce(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port, poll_interval=120), store=store, worker="thread")
    ms.start()
    try:
        assert store.failed.wait(10)
        assert _wait_until(lambda: store.read_after >= 2, 10)
        status = ms.worker_status
        assert status.running
        assert status.store_error is None, status.store_error
    finally:
        ms.stop(timeout=0)
        store.close()


class ExtendCrashes(SQLiteStore):
    """A SQLite store whose extensions raise what no store error is (a bug below the
    store, or "can't start new thread" from the thread a PostgreSQL call runs in)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.crashed = threading.Event()

    def extend(self, lease: Lease, *, until: datetime) -> int:
        self.crashed.set()
        raise RuntimeError("a bug in extend")


def test_a_heartbeat_that_crashes_ends_the_worker_and_says_why(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A heartbeat that raised anything but a StoreError ended silently: the worker went
    on, its status running and without an error, while no lease of it was extended any
    more (another worker took them over at their expiry and sent them again). Like a
    failing lease or record, the bug ends the worker, and its status says so."""
    mx = smtp_server(stall_on="dot")  # takes the message, then does not answer
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    store = ExtendCrashes(tmp_path / "q.db")
    cfg = config(dns_server, mx.port, timeouts=PATIENT, lease_for=timedelta(seconds=1.5))
    ms = Mailstrom(cfg, store=store, worker="thread")
    ms.start()
    try:
        ms.send_email(hello("u@example.org"))
        assert store.crashed.wait(10)
        assert ms.worker.wait_stopped(timeout=10)
        status = ms.worker_status
        assert status.dead and "a bug in extend" in (status.error or ""), status
    finally:
        ms.stop(timeout=0)
        store.close()

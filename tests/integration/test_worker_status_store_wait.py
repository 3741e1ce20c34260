"""``worker_status`` while the worker's event loop waits in a store call (a SQLite write
lock held by another process, for up to ``busy_timeout``): the status says since when,
in a worker thread and in a worker process, whose snapshots come from that very loop."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailstrom import Mailstrom
from mailstrom.status import WorkerStatus
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.integration.test_engine import hello, write_lock_held
from tests.integration.test_worker_store_error import PATIENT
from tests.support.delivery import loopback_config

BUSY = 8.0
"""The store's busy timeout: longer than the parent's pings of a worker process are
apart (5 s), so that one comes while the loop waits."""


def _until(ms: Mailstrom, check: object, timeout: float) -> WorkerStatus:
    """Poll ``ms.worker_status`` (a snapshot: nothing to wait on) until ``check`` holds."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while True:
        status = ms.worker_status
        if check(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_the_status_says_since_when_the_worker_waits_for_the_store(
    mode: str, smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A delivery in flight (the server holds the final dot), its lease extended every
    second; another process takes the write lock. The worker's loop waits in the
    extension for the whole busy timeout: a worker process sent no snapshot meanwhile,
    and its status went stale saying nothing of it."""
    mx = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    path = tmp_path / "q.db"
    store = SQLiteStore(path, busy_timeout=BUSY)
    config = loopback_config(dns_server, mx.port, timeouts=PATIENT, lease_for=timedelta(seconds=3))
    ms = Mailstrom(config, store=store, worker=mode)  # type: ignore[arg-type]
    try:
        ms.start()
        ms.send_email(hello("u@example.org"))
        deadline = time.monotonic() + 10
        while not mx.received and time.monotonic() < deadline:
            time.sleep(0.02)  # a snapshot of the server: nothing to wait on
        assert mx.received
        assert ms.worker_status.store_wait_since is None
        with write_lock_held(path):
            locked = datetime.now(UTC)
            status = _until(ms, lambda s: s.store_wait_since is not None, BUSY)
            assert status.store_wait_since is not None, status
            assert locked - timedelta(seconds=1) <= status.store_wait_since <= datetime.now(UTC)
            assert status.running
        # The wait ends with the lock; the next snapshot says so.
        status = _until(ms, lambda s: s.store_wait_since is None, BUSY + 5)
        assert status.store_wait_since is None
    finally:
        ms.stop(0)
        store.close()

"""A worker delivering to a loopback server while the disk of its SQLite store fills up
(tests/support/disk_full.py): it keeps the results it cannot record, says so in its
status, does not stop, and records them all once space is freed."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailstrom import Mailstrom, RecipientState
from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores import SQLiteStore
from mailstrom.testing.smtp import ReceivedMessage, ReceivingServer
from tests.contract.support import message
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import Results, loopback_config
from tests.support.disk_full import DiskFull

RECIPIENTS = [f"u{i:02}@example.org" for i in range(40)]
REPLY = "250 2.0.0 queued as " + "Q" * 400
"""The server's reply, kept with every recipient and its attempt: the results of one
transaction to 40 recipients are then far more than the room a full disk leaves in the
pages the file has (its records cannot succeed by luck)."""


def fill_as_it_receives(mx: ReceivingServer, disk: DiskFull) -> None:
    """The disk fills as the server takes the message, before it replies: the worker
    holds a delivered message's results when its store can no longer write them."""
    received = mx.record

    def record(taken: ReceivedMessage, *, accepted: bool) -> None:
        disk.fill()
        received(taken, accepted=accepted)

    mx.record = record  # type: ignore[method-assign]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)  # polling a status snapshot; nothing to wait on
    return predicate()


def forty_recipients() -> PreparedMessage:
    return message(*RECIPIENTS)


def test_a_worker_keeps_its_results_while_the_disk_is_full(
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    disk = DiskFull.patch(monkeypatch)
    mx = smtp_server()
    mx.data_reply = REPLY
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    store = SQLiteStore(tmp_path / "queue.db")
    mid = store.enqueue(forty_recipients(), now=datetime.now(UTC))
    fill_as_it_receives(mx, disk)
    results = Results()
    config = loopback_config(dns_server, mx.port)
    with Mailstrom(config, store=store, on_result=results, worker="thread") as ms:
        # Three failed writes: the worker retries, with backoff (0.05 s, 0.1 s, 0.2 s...).
        assert wait_until(lambda: ms.worker_status.metrics.store_errors >= 3)
        troubled = ms.worker_status
        assert troubled.running and troubled.error is None
        assert troubled.store_error is not None
        assert "disk" in troubled.store_error and "full" in troubled.store_error
        assert troubled.unrecorded == len(RECIPIENTS)
        assert results.all == []
        assert [r.state for r in store.status(mid).recipients] == [RecipientState.QUEUED] * 40
        disk.free()
        results.wait_count(len(RECIPIENTS), timeout=5)
        assert wait_until(lambda: ms.worker_status.store_error is None)
        assert ms.worker_status.unrecorded == 0
        assert ms.worker_status.running
    recipients = store.status(mid).recipients
    store.close()
    [received] = mx.messages  # delivered once: the worker did not send it again
    assert sorted(received.rcpt_tos) == RECIPIENTS
    assert {(r.state, r.attempts) for r in recipients} == {(RecipientState.DELIVERED, 1)}
    assert {r.reply.text if r.reply else None for r in recipients} == {REPLY[10:]}

"""A worker holds at most ``Config.max_leased_bytes`` of message data (plus one message),
against a real SQLite store and a loopback aiosmtpd server.

Leases were counted in recipients alone and read every message's data: a queue of large
messages made one lease hold ``lease_batch`` of them (500 of 35 MiB: 17 GiB), and a lease
kept all its messages' data until its last recipient was recorded, so one slow recipient
per lease piled up more. The OOM killer stopped the worker, again at every restart."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailstrom.message import prepare
from mailstrom.message.prepared import PreparedMessage
from mailstrom.runtime.worker import Worker
from mailstrom.status import RecipientState
from mailstrom.stores import Lease, RecipientResult, SQLiteStore
from mailstrom.testing.smtp import ReceivingServer
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import FAST, Results, loopback_config

SIZE = 100_000
"""Octets of each message, about."""


class HeldCounting(SQLiteStore):
    """A SQLite store that counts, from its own side, the bytes of message data its leases
    handed out whose recipients have not all come back as results: what the worker must
    hold in memory meanwhile. Nothing else changes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.left: dict[tuple[str, str], int] = {}
        self.sizes: dict[tuple[str, str], int] = {}
        self.held = 0
        self.peak = 0

    def record_and_lease(
        self, results: Sequence[RecipientResult], **kwargs: Any
    ) -> tuple[list[RecipientResult], Lease | None]:
        recorded, lease = super().record_and_lease(results, **kwargs)
        for result in results:
            key = (result.lease_token, result.message_id)
            self.left[key] -= 1
            if not self.left[key]:
                self.held -= self.sizes[key]
        for item in lease.items if lease is not None else ():
            key = (lease.token, item.message_id) if lease is not None else ("", "")
            if key not in self.sizes:
                self.sizes[key] = len(item.data)
                self.left[key] = 0
                self.held += len(item.data)
            self.left[key] += len(item.recipients)
        self.peak = max(self.peak, self.held)
        return recorded, lease


def _message(n: int, *to: str, size: int = SIZE) -> PreparedMessage:
    line = b"x" * 76 + b"\r\n"
    head = (
        f"From: app@sender.test\r\nTo: {', '.join(to)}\r\nSubject: n{n}\r\n"
        f"Message-ID: <n{n}@sender.test>\r\nDate: Mon, 5 Jan 2026 12:00:00 +0000\r\n\r\n"
    ).encode()
    return prepare(head + line * (size // len(line)))


def _mx(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, domain: str, host: str, port: int = 0
) -> ReceivingServer:
    server = smtp_server(host=host, port=port)
    dns_server.mx(domain, [(10, f"mx.{domain}")])
    dns_server.a(f"mx.{domain}", server.host)
    return server


async def test_a_queue_of_large_messages_is_delivered_within_the_byte_budget(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Forty messages of 100 kB and one of 600 kB, larger than the budget of 500 kB: each
    lease reads only what fits in what is left of the budget (the large one alone), and
    every message is delivered."""
    mx = _mx(smtp_server, dns_server, "example.org", "127.0.0.1")
    store = HeldCounting(tmp_path / "q.db")
    budget = 500_000
    try:
        now = datetime.now(UTC)
        messages = [_message(n, f"u{n}@example.org") for n in range(40)]
        messages.insert(20, _message(99, "big@example.org", size=600_000))
        store.enqueue_many(messages, now=now)
        largest = max(m.size for m in messages)
        config = loopback_config(dns_server, mx.port, max_leased_bytes=budget)
        worker = Worker(config, store)
        await worker.run(once=True)
        status = worker.status
        stats = store.stats()
    finally:
        store.close()
    assert len(mx.messages) == len(messages)
    assert stats.by_state[RecipientState.DELIVERED] == len(messages)
    assert 0 < store.peak <= budget + largest, store.peak
    # The worker's own count agrees with the store's, and lets go of everything.
    assert status.leased_bytes_peak == store.peak
    assert status.leased_bytes == 0
    assert store.held == 0


async def test_a_slow_recipient_holds_only_its_own_message(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The first message has a recipient whose server stops answering at RCPT. Its lease
    kept every other message of the lease in memory until then, and under a budget it
    kept the budget: nothing more was leased while the stall lasted. Each message is let
    go once its own recipients are recorded: the rest are delivered meanwhile."""
    mx = _mx(smtp_server, dns_server, "example.org", "127.0.0.1")
    slow = _mx(smtp_server, dns_server, "slow.test", "127.0.0.2", mx.port)
    slow.stall_rcpts.add("stuck@slow.test")
    store = HeldCounting(tmp_path / "q.db")
    budget = 3 * SIZE
    results = Results()
    try:
        now = datetime.now(UTC)
        first = _message(0, "a0@example.org", "stuck@slow.test")
        store.enqueue_many(
            [first] + [_message(n, f"u{n}@example.org") for n in range(1, 20)], now=now
        )
        # The stall outlasts the test: only the stop ends it.
        timeouts = dataclasses.replace(FAST, command=120)
        config = loopback_config(dns_server, slow.port, max_leased_bytes=budget, timeouts=timeouts)
        worker = Worker(config, store, on_result=results)
        run = asyncio.create_task(worker.run())
        try:
            await asyncio.to_thread(results.wait_count, 20, 30)
            status = worker.status
        finally:
            worker.request_stop(drain_timeout=0.1)
            await run
    finally:
        store.close()
    assert {r.address for r in results.all} == {"a0@example.org"} | {
        f"u{n}@example.org" for n in range(1, 20)
    }
    # Only the stalled message is held now.
    assert status.leased_bytes == first.size
    assert status.leased_bytes_peak <= budget + first.size
    assert len(mx.messages) == 20

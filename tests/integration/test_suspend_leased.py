"""Suspending a destination whose mail a worker has leased but not started sending: the
suspension must stop that mail too, not only the next lease (a real worker delivering
to a scripted loopback peer that holds its reply to the first message)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailstrom import AsyncMailstrom, RecipientState, Timeouts
from mailstrom.runtime.dispatch import _DEPTH
from mailstrom.stores import MemoryStore, Store, open_store
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_engine import hello
from tests.integration.test_hostile_peers import Handler, peer
from tests.support.delivery import loopback_config
from tests.support.waiting import logged

SLOW = Timeouts(connect=30, greeting=30, command=30, data_init=30, data_block=30, data_end=30)
MESSAGES = 20


def holding_first(rcpts: list[bytes], first_dot: asyncio.Event, go_on: asyncio.Event) -> Handler:
    """A peer without PIPELINING (one transaction on the wire at a time) that keeps every
    RCPT line in ``rcpts``, sets ``first_dot`` once the first message's data has arrived,
    and answers it only once ``go_on`` is set."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250 slow.test\r\n")
            elif verb == b"RCPT":
                rcpts.append(line)
                writer.write(b"250 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                first_dot.set()
                await go_on.wait()
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    return handle


@contextmanager
def stores(kind: str, tmp_path: Path, postgres_url: str | None) -> Iterator[tuple[Store, Store]]:
    """The worker's store, and the one the operator suspends through: the same object, or
    (``elsewhere``) another one on the same queue, as ``mailstrom destinations suspend``
    in another process."""
    if kind == "memory":
        store: Store = MemoryStore()
        yield store, store
        return
    url = postgres_url if kind.startswith("postgres") else f"sqlite:///{tmp_path / 'queue.db'}"
    assert url is not None
    store = open_store(url)
    other = open_store(url) if kind.endswith("elsewhere") else store
    try:
        yield store, other
    finally:
        if other is not store:
            other.close()
        store.close()


async def _suspend_while_leased(
    dns: LoopbackDNS, caplog: pytest.LogCaptureFixture, store: Store, operator: Store
) -> None:
    """Twenty messages to one destination, one connection, in one lease; the destination
    suspended while the first is on the wire."""
    first_dot, go_on = asyncio.Event(), asyncio.Event()
    caplog.set_level(logging.WARNING, logger="mailstrom")
    rcpts: list[bytes] = []
    dns.mx("slow.example", [(10, "mx.slow.test")])
    dns.a("mx.slow.test", "127.0.0.1")
    async with peer(holding_first(rcpts, first_dot, go_on)) as port:
        config = loopback_config(
            dns,
            port,
            timeouts=SLOW,
            max_per_destination=1,
            poll_interval=30,
        )
        ms = AsyncMailstrom(config, store=store, worker=None)
        ids = [await ms.send_email(hello(f"u{i}@slow.example", i)) for i in range(MESSAGES)]
        async with AsyncMailstrom(config, store=store, worker="task") as running:
            await asyncio.wait_for(first_dot.wait(), 20)
            leased = await asyncio.to_thread(store.status, ids[1])
            assert leased.recipients[0].leased  # the rest waits in this worker's lease
            await asyncio.to_thread(operator.suspend, "slow.example", now=datetime.now(UTC))
            # The worker gives back what it leased and has not started (told at once in
            # this process, by a datagram or a NOTIFY from elsewhere).
            assert await logged(caplog, "not yet started given back", 10)
            go_on.set()
            for _ in range(2000):  # the status is a snapshot: only a hang waits this out
                if not running.worker_status.in_flight:
                    break
                await asyncio.sleep(0.01)
            assert not running.worker_status.in_flight
            # What had started goes on and reads as the server said: the first, on the
            # wire, and at most the transactions submitted behind it on its connection.
            assert 1 <= len(rcpts) <= _DEPTH, (
                f"{len(rcpts) - 1} of {MESSAGES - 1} waiting in the lease sent after the suspension"
            )
            sent = b"".join(rcpts)
            waiting = [m for i, m in enumerate(ids) if f"<u{i}@".encode() not in sent]
            for mid in ids:
                if mid not in waiting:
                    status = await running.wait(mid, timeout=20)
                    assert status.state is RecipientState.DELIVERED, status
            # Given back (a write of the worker's own), unattempted, due once the
            # suspension is over.
            for _ in range(2000):  # only a hang waits this out
                statuses = [(await running.query_status(m)).recipients[0] for m in waiting]
                if not any(r.leased for r in statuses):
                    break
                await asyncio.sleep(0.01)
            for r in statuses:
                assert (r.state, r.attempts, r.leased) == (RecipientState.QUEUED, 0, False), r
            # Resumed, the rest goes, each once.
            assert await asyncio.to_thread(operator.resume, "slow.example", now=datetime.now(UTC))
            for mid in waiting:
                status = await running.wait(mid, timeout=20)
                assert status.state is RecipientState.DELIVERED
    assert sorted(rcpts) == sorted({*rcpts}) and len(rcpts) == MESSAGES, rcpts


@pytest.mark.parametrize("kind", ["memory", "sqlite", "sqlite-elsewhere"])
async def test_a_suspended_destination_leased_but_not_started_is_not_sent(
    dns_server: LoopbackDNS, caplog: pytest.LogCaptureFixture, tmp_path: Path, kind: str
) -> None:
    """Was: the suspension reached only the next lease; the worker sent the other 19
    messages of its lease to the suspended destination once the first was done (with
    the default lease_for, the heartbeat that would have found it comes every five
    minutes)."""
    with stores(kind, tmp_path, None) as (store, operator):
        await _suspend_while_leased(dns_server, caplog, store, operator)


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["postgres", "postgres-elsewhere"])
async def test_postgres_a_suspended_destination_leased_but_not_started_is_not_sent(
    dns_server: LoopbackDNS,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    postgres_url: str,
    kind: str,
) -> None:
    """As above on PostgreSQL, suspended through the worker's store object or another
    one (the worker hears it through NOTIFY)."""
    with stores(kind, tmp_path, postgres_url) as (store, operator):
        await _suspend_while_leased(dns_server, caplog, store, operator)

"""A worker whose host was suspended (a laptop's lid, a VM paused and resumed): the wall
clock jumped on while the monotonic clock, which Linux stops during a suspend, did not.

The suspend is the worker's clock (a :class:`FakeClock`) moved on while the loop's own
clock stands; the peer is a raw asyncio SMTP server on 127.0.0.1 that holds its reply to
the first message until the suspend is over, and the other worker that takes the lease
over meanwhile is a store call made as that worker's would be."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import psycopg
import pytest

from mailstrom.config import Config
from mailstrom.message import prepare
from mailstrom.runtime.worker import Worker
from mailstrom.stores import MemoryStore, Store
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_engine import hello
from tests.integration.test_hostile_peers import peer
from tests.support.delivery import FakeClock, loopback_config

TakeOver = Callable[[Store, Worker, FakeClock, Config], None]
"""What happens while the host is suspended: the clock moves on, another worker takes
the lease over."""


async def _sent_after_suspend(dns: LoopbackDNS, store: Store, take_over: TakeOver) -> int:
    """Two messages to one domain in one lease, one per connection; the host suspended
    while the first waits for its reply. Returns how many transactions the worker began."""
    first_dot = asyncio.Event()
    go_on = asyncio.Event()
    mails: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 s.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250 s.test\r\n")
            elif verb == b"MAIL":
                mails.append(line)
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
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    dns.mx("example.org", [(10, "mx.test")])
    dns.a("mx.test", "127.0.0.1")
    clock = FakeClock()
    store.enqueue_many([prepare(hello(f"u{i}@example.org", i)) for i in range(2)], now=clock())
    async with peer(handle) as port:
        config = loopback_config(dns, port, max_messages_per_connection=1)
        worker = Worker(config, store, clock=clock)
        run = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(first_dot.wait(), 10)
            take_over(store, worker, clock, config)
            go_on.set()
            for _ in range(500):  # the worker's status is a snapshot: nothing to wait on
                if not worker.status.in_flight:
                    break
                await asyncio.sleep(0.02)
            assert not worker.status.in_flight
        finally:
            worker.request_stop(drain_timeout=1)
            await asyncio.wait_for(run, 10)
    return len(mails)


def _lease_all(store: Store, clock: FakeClock, config: Config) -> None:
    """The other worker's lease: it takes both recipients."""
    other = store.lease(now=clock(), limit=10, lease_for=config.lease_for)
    assert other is not None
    assert sorted(r.address for i in other.items for r in i.recipients) == [
        "u0@example.org",
        "u1@example.org",
    ]


async def test_a_lease_outlived_during_a_suspend_starts_no_transaction(
    dns_server: LoopbackDNS,
) -> None:
    """The suspend outlasts the lease, and another worker leases its recipients (expired
    by every clock). On resume the loop's clock said the lease still had its whole time,
    so the session opened its next connection and sent the second message too: twice, as
    the other worker sends it. The wall clock tells the lease ran out: its unstarted work
    is given back instead."""

    def suspend(store: Store, worker: Worker, clock: FakeClock, config: Config) -> None:
        clock.advance(config.lease_for + timedelta(minutes=1))
        _lease_all(store, clock, config)

    assert await _sent_after_suspend(dns_server, MemoryStore(), suspend) == 1


@pytest.mark.postgres
async def test_a_worker_taken_for_dead_during_a_suspend_starts_no_transaction(
    dns_server: LoopbackDNS, postgres_url: str
) -> None:
    """On PostgreSQL the suspend need only outlast the store's ``dead_after`` (two
    minutes; far less than the lease): the other workers' looks take the silent worker
    for dead, give back what it leased, and one leases it. On resume its last beat looked
    seconds old by the loop's clock, and the second message went out twice."""

    def suspend(store: Store, worker: Worker, clock: FakeClock, config: Config) -> None:
        assert isinstance(store, PostgresStore) and store.dead_after is not None
        clock.advance(timedelta(seconds=store.dead_after + 1))
        # The other worker's look (release_holder) and its lease, in one statement: a
        # lease of this worker's own already under way in a thread would otherwise take
        # them back between the two, which is no takeover.
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            taken = conn.execute(
                "UPDATE recipients SET lease_token = %s, lease_expires_at = %s"
                " WHERE lease_token LIKE %s",
                ("0" * 16 + "." + "0" * 32, clock() + config.lease_for, f"{worker.holder}.%"),
            ).rowcount
        assert taken == 2

    with PostgresStore(postgres_url) as store:
        assert store.dead_after is not None and store.dead_after < 600
        assert await _sent_after_suspend(dns_server, store, suspend) == 1

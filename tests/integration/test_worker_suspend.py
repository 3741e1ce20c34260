"""A worker whose host was suspended (a laptop's lid, a VM paused and resumed): the wall
clock jumped on while the monotonic clock, which Linux stops during a suspend, did not.

The suspend is the worker's clock (a :class:`FakeClock`) moved past the lease while the
loop's own clock stands; the peer is a raw asyncio SMTP server on 127.0.0.1, and the
other worker that takes the lease over is a lease of the same store."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from mailstrom.message import prepare
from mailstrom.runtime.worker import Worker
from mailstrom.stores import MemoryStore
from mailstrom.stores.base import RecipientResult
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_engine import hello
from tests.integration.test_hostile_peers import peer
from tests.support.delivery import FakeClock, loopback_config


async def test_a_lease_outlived_during_a_suspend_starts_no_transaction(
    dns_server: LoopbackDNS,
) -> None:
    """Two messages to one domain in one lease, one per connection; the host is
    suspended, for longer than the lease, while the first waits for its reply. Another
    worker took the lease over meanwhile (it was expired by every clock). On resume the
    loop's clock said the lease still had its whole time, so the session opened its next
    connection and sent the second message too: twice, as the other worker sends it.
    The wall clock tells the lease ran out: its unstarted work is given back instead."""
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

    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", "127.0.0.1")
    clock = FakeClock()
    store = MemoryStore()
    for i in range(2):
        store.enqueue(prepare(hello(f"u{i}@example.org", i)), now=clock())
    heard: list[RecipientResult] = []
    async with peer(handle) as port:
        config = loopback_config(dns_server, port, max_messages_per_connection=1)
        worker = Worker(config, store, clock=clock, on_result=heard.append)
        run = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(first_dot.wait(), 10)
            clock.advance(config.lease_for + timedelta(minutes=1))  # the suspend
            other = store.lease(now=clock(), limit=10, lease_for=config.lease_for)
            assert other is not None  # expired: another worker took it over
            assert sorted(r.address for i in other.items for r in i.recipients) == [
                "u0@example.org",
                "u1@example.org",
            ]
            go_on.set()
            for _ in range(500):  # the worker's status is a snapshot: nothing to wait on
                if not worker.status.in_flight:
                    break
                await asyncio.sleep(0.02)
            assert not worker.status.in_flight
        finally:
            worker.request_stop(drain_timeout=1)
            await asyncio.wait_for(run, 10)
    assert len(mails) == 1, mails

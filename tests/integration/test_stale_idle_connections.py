"""Idle connections kept for reuse that the server has given up on meanwhile.

``Config.mx_session_limit`` bounds the SMTP sessions one delivery attempt *opens*
(Postfix's ``smtp_mx_session_limit``). A connection taken from the idle cache was opened
for earlier mail; when the server has dropped it (its own idle timeout, a restart, a
middlebox forgetting the flow) the item it was to carry is tried again on a new one. The
peer is a raw asyncio server on 127.0.0.1; the dispatcher is the worker's own.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from mailstrom.status import RecipientState
from mailstrom.stores.base import WorkItem
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.scripted import scripted_dispatcher, work_item


def item(n: int) -> WorkItem:
    return work_item(n, "stale.example")


async def test_stale_idle_connections_do_not_use_up_the_session_limit(
    dns_server: LoopbackDNS,
) -> None:
    """Two sessions deliver a burst and leave two idle connections; then the server drops
    every connection that comes back from idle (it hangs up on the RSET that reuse
    starts with). The next message still goes, on a new connection. Before, each dropped
    idle connection counted as one of its two sessions: it was deferred without a new
    connection ever being tried."""
    stale = asyncio.Event()
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(b"220 stale.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"RSET" and stale.is_set():
                return  # this connection was forgotten while it sat idle
            if verb == b"EHLO":
                writer.write(b"250-stale.test\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    async with scripted_dispatcher(
        dns_server, handle, "stale.example", mx_session_limit=2, connection_idle=60.0
    ) as (dispatcher, done):
        for n in range(8):  # enough queued for a second session to start
            dispatcher.submit(item(n))
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
        assert [r.state for r in done] == [RecipientState.DELIVERED] * 8
        assert dispatcher.idle_connections >= 2
        before = connections
        stale.set()
        dispatcher.submit(item(8))
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
    last = done[-1]
    assert last.address == "r8@stale.example"
    assert last.state is RecipientState.DELIVERED
    assert connections - before == 1  # one new connection, after the stale ones


async def test_a_message_refused_before_the_wire_does_not_spend_the_reset(
    dns_server: LoopbackDNS,
) -> None:
    """A connection taken from the idle cache starts with RSET, which finds out whether
    the server still holds it: a ``421`` to it (the server's idle timeout) sends the work
    to a new connection, unattempted. When the first message for it was refused before
    anything was sent (over the server's SIZE), the next one went without that RSET, and
    the server's ``421`` to its MAIL deferred its recipient as if it had been tried."""
    stale = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stale.test ESMTP\r\n")
        idle = False  # past its idle time: the next command gets 421
        while line := await reader.readline():
            verb = line[:4].upper()
            if idle:
                # Exim's words when its idle timeout strikes.
                writer.write(b"421 stale.test: SMTP command timeout - closing connection\r\n")
                await writer.drain()
                return
            if verb == b"EHLO":
                writer.write(b"250-stale.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 queued\r\n")
                idle = stale.is_set()
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    too_big = replace(item(1), data=b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n")
    async with scripted_dispatcher(dns_server, handle, "stale.example", connection_idle=60.0) as (
        dispatcher,
        done,
    ):
        stale.set()  # the connection goes stale once it has taken this message
        dispatcher.submit(item(0))
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
        assert dispatcher.idle_connections == 1
        dispatcher.submit(too_big)
        dispatcher.submit(item(2))
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
    states = {r.address: r.state for r in done}
    assert states == {
        "r0@stale.example": RecipientState.DELIVERED,
        "r1@stale.example": RecipientState.FAILED,  # 552 5.3.4, over SIZE
        "r2@stale.example": RecipientState.DELIVERED,
    }

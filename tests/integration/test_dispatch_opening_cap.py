"""The cap on connections being opened to one address, over every domain it serves
(runtime/dispatch.py's ``_park_at``), against a shaping rule's connection rate: a session
that parks at the cap opens no connection, so it must not use up one of the rate's tokens
(each token is a connection the receiver allows)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from mailstrom import DestinationRule, RecipientState
from mailstrom.policy.throttle import TokenBucket, TokenGrant
from mailstrom.routing import Router
from mailstrom.runtime.dispatch import Dispatcher
from mailstrom.runtime.outcomes import Outcomes
from mailstrom.runtime.shaper import Shaper
from mailstrom.stores import MemoryStore
from mailstrom.stores.base import RecipientResult
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_hostile_peers import peer
from tests.integration.test_shaping import shaping
from tests.support.delivery import loopback_config
from tests.support.scripted import work_item
from tests.support.skew import eventually


async def _threaded(method: Any, *args: Any, **kwargs: Any) -> Any:
    """Each store call on a thread of its own, as the worker makes it: the loop goes on
    meanwhile (other sessions get as far as asking for a token too)."""
    return await asyncio.to_thread(method, *args, **kwargs)


class CountingStore(MemoryStore):
    """Counts the connection-rate tokens the store grants."""

    def __init__(self) -> None:
        super().__init__()
        self.connect_tokens = 0

    def take_tokens(
        self, buckets: Sequence[TokenBucket], *, want: int, now: datetime
    ) -> TokenGrant:
        grant = super().take_tokens(buckets, want=want, now=now)
        if any("connections/minute" in bucket.key for bucket in buckets):
            self.connect_tokens += grant.granted
        return grant


@pytest.mark.parametrize("when", ["before the rate", "while it waited for the rate"])
async def test_a_session_parked_at_the_opening_cap_takes_no_connection_token(
    dns_server: LoopbackDNS, when: str
) -> None:
    # a.example and b.example share one MX address; max_per_destination=1 lets one
    # connection be opened to it at once. One connection waits for its greeting; the other
    # domain's session finds the cap reached and parks, then opens its own once the first
    # is made. It found the cap before asking for a token, or (a rate of one connection a
    # second, both sessions at once) after it waited a second for one: it keeps that one.
    waits = when != "before the rate"
    rule = DestinationRule(match="*.shared.example", connections_per_minute=60 if waits else 6000)
    store = CountingStore()
    greet = asyncio.Event()
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await greet.wait()
        writer.write(b"220 mx.shared.example ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-mx.shared.example\r\n250 PIPELINING\r\n")
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

    for domain in ("a.example", "b.example"):
        dns_server.mx(domain, [(10, "mx.shared.example")], ttl=60)
    dns_server.a("mx.shared.example", "127.0.0.1")
    done: list[RecipientResult] = []
    clock = lambda: datetime.now(UTC)  # noqa: E731 - the rate's tokens refill in real time
    async with peer(handle) as port:
        config = loopback_config(dns_server, port, shaping=shaping(rule), max_per_destination=1)
        shaper = Shaper(config, store, store_call=_threaded, clock=clock)
        dispatcher = Dispatcher(
            config,
            router=Router(config.dns, allow_loopback=True),
            outcomes=Outcomes(config, clock=clock, rng=random.Random(1)),
            on_done=done.extend,
            shaper=shaper,
        )
        try:
            dispatcher.submit(work_item(0, "a.example"))
            if not waits:
                await eventually(lambda: connections == 1, "a to connect")
            dispatcher.submit(work_item(1, "b.example"))
            await eventually(lambda: dispatcher.sessions == 1, "one to park", timeout=5)
            greet.set()
            await asyncio.wait_for(dispatcher.idle.wait(), 10)
        finally:
            await dispatcher.close()
    assert {r.address: r.state for r in done} == {
        "r0@a.example": RecipientState.DELIVERED,
        "r1@b.example": RecipientState.DELIVERED,
    }
    assert connections == 2
    assert store.connect_tokens == connections  # one token per connection opened

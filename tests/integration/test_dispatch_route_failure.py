"""A route that cannot be found (the DNS server fails, SERVFAIL or a timeout) defers the
destination's queue, as Postfix defers the queue of a nexthop it cannot look up — unless
another session of the destination is connected: its route is still good, and it carries
the queue (runtime/dispatch.py, as after a connection that cannot be made)."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from typing import Any

from mailstrom import RecipientState
from mailstrom.routing import Router
from mailstrom.runtime.dispatch import Dispatcher
from mailstrom.runtime.outcomes import Outcomes
from mailstrom.stores.base import RecipientResult
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import loopback_config
from tests.support.scripted import NOW, work_item
from tests.support.skew import eventually

MIN = timedelta(minutes=5)
"""The retry policy's first delay (``RetryPolicy.min_delay``, ±20 % jitter)."""


async def test_a_route_failure_leaves_the_queue_to_a_connected_session(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    # Was: a session started while another was connected (the queue had grown) looked the
    # route up again, its cache expired; the DNS server failing that once, every item of
    # the queue was deferred with the DNS error, an attempt counted each, although the
    # connected session, whose route was good, would have taken them a moment later.
    mx = smtp_server()
    mx.data_delay = 0.5  # the first message holds its session while the others arrive
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(dns_server, mx.port, max_per_destination=2)
    router = Router(config.dns, allow_loopback=True)
    done: list[RecipientResult] = []
    dispatcher = Dispatcher(
        config,
        router=router,
        outcomes=Outcomes(config, clock=lambda: NOW, rng=random.Random(1)),
        on_done=done.extend,
    )
    try:
        dispatcher.submit(work_item(0, "example.org"))
        await asyncio.to_thread(mx.wait_for_received, 1, 10)
        # The route's cache runs out, and the DNS server fails the next lookup.
        router.forget("example.org")
        dns_server.servfail("example.org")
        for n in range(1, 5):
            dispatcher.submit(work_item(n, "example.org"))
        await eventually(lambda: dispatcher.sessions == 2, "a second session", timeout=5)
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
    finally:
        await dispatcher.close()
    assert {r.address: r.state for r in done} == {
        f"r{n}@example.org": RecipientState.DELIVERED for n in range(5)
    }
    assert mx.connections == 1


async def test_a_route_failure_of_the_only_session_defers_the_queue(
    dns_server: LoopbackDNS,
) -> None:
    # The destination's one session: the queue is deferred with the DNS error (4.4.3), an
    # attempt each, due after a backoff of its own (jittered), as Postfix defers a nexthop
    # it cannot look up.
    dns_server.servfail("example.org")
    config = loopback_config(dns_server, 9, max_per_destination=2)
    done: list[RecipientResult] = []
    dispatcher = Dispatcher(
        config,
        router=Router(config.dns, allow_loopback=True),
        outcomes=Outcomes(config, clock=lambda: NOW, rng=random.Random(1)),
        on_done=done.extend,
    )
    try:
        for n in range(8):
            dispatcher.submit(work_item(n, "example.org"))
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
    finally:
        await dispatcher.close()
    assert len(done) == 8
    for result in done:
        assert result.state is RecipientState.DEFERRED, result
        assert result.attempt.error is not None or result.attempt.reply is not None
    due = [r.next_attempt_at for r in done]
    assert all(d is not None and NOW + MIN <= d <= NOW + MIN * 1.2 for d in due), due
    assert len(set(due)) > 1  # each its own jitter (none drawn below min_delay)

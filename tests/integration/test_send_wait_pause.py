"""``mailstrom send --wait``'s worker (``deliver_and_wait``) and a destination's pause."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from mailstrom.cli.send import deliver_and_wait
from mailstrom.message import Email
from mailstrom.message.preparation import prepare
from mailstrom.status import RecipientState
from mailstrom.stores import MemoryStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import loopback_config


async def test_a_recipient_postponed_past_the_wait_ends_it(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """Was: a recipient the worker postponed for its destination's pause (no attempt, so
    no result) kept the command waiting its whole --timeout, though its next attempt, the
    end of the pause, fell after it: the wait reported it had run out, not settled."""
    server = smtp_server()
    dns_server.a("mx.test", server.host)
    dns_server.mx("paused.test", [(10, "mx.test")])
    store = MemoryStore()
    now = datetime.now(UTC)
    hour = timedelta(hours=1)
    pause = store.throttle("paused.test", now=now, reply="421 4.7.0 slow", first=hour, maximum=hour)
    email = Email(from_="app@client.test", to=["bob@paused.test"], subject="Hi", text="x")
    mid = store.enqueue(prepare(email, now=now), now=now)

    settled = await deliver_and_wait(
        loopback_config(dns_server, server.port), store, mid, wait_for=30.0
    )

    assert settled is True  # known before the wait's end: not run out
    [bob] = store.status(mid).recipients
    assert (bob.state, bob.attempts, bob.throttle) == (RecipientState.QUEUED, 0, pause)
    assert server.messages == []

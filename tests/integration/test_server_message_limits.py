"""A server that takes only so many messages per connection (Exim's
``smtp_accept_max_per_connection``): once it has ended a connection that took messages,
the rest of the queue goes on a new connection to the same address, instead of being
deferred with an error of a connection it never used.

The server is aiosmtpd (``mailstrom.testing``'s receiver with ``messages_per_connection``)
on loopback, the only address of its domain.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from mailstrom import Email, RecipientState
from mailstrom.client import Mailstrom
from mailstrom.stores import MemoryStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import Results, loopback_config

LIMIT = 3
COUNT = 12


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "stepwise"])
@pytest.mark.parametrize("reply", ["421", None], ids=["421", "silent close"])
def test_the_queue_goes_on_after_a_server_ends_a_connection_at_its_limit(
    smtp_server: Any, dns_server: LoopbackDNS, pipelining: bool, reply: str | None
) -> None:
    mx = smtp_server(pipelining=pipelining)
    mx.messages_per_connection = LIMIT
    if reply is None:
        mx.over_limit_reply = None  # the next MAIL gets no answer: the server just closes
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(dns_server, mx.port, max_per_destination=1)
    store = MemoryStore()
    results = Results()
    with Mailstrom(config, store=store, worker=None) as queue_only:
        ids = queue_only.send_emails(
            [
                Email(from_="a@sender.test", to=[f"u{i}@example.org"], subject="Hi", text="Hi")
                for i in range(COUNT)
            ]
        )
    with Mailstrom(config, store=store, on_result=results) as ms:
        results.wait_count(COUNT)
        statuses = [ms.query_status(i).recipients[0] for i in ids]

    states = Counter(s.state for s in statuses)
    delivered = states[RecipientState.DELIVERED]
    assert len(mx.messages) == delivered
    # Every recipient not delivered was refused by the server itself, at its own MAIL:
    # none was deferred with the error of a connection it never went on.
    for status in statuses:
        if status.state is not RecipientState.DELIVERED:
            assert status.state is RecipientState.DEFERRED, status
            assert status.reply is not None and status.reply.code == 421, status
    if reply is None:
        # A MAIL the server never answered is tried again on the next connection.
        assert delivered == COUNT, states
        assert mx.connections == COUNT // LIMIT
    else:
        # The 421 to MAIL defers its own message (a reply after the transaction began).
        assert delivered == COUNT - COUNT // (LIMIT + 1), states
        assert mx.connections == COUNT // (LIMIT + 1)

"""Work of a lease the worker lost (another worker took it over) must not start a new
transaction here: the dispatcher gives it back instead (``Dispatcher.withdraw``).

The peer is a raw asyncio server on 127.0.0.1 scripted per test; the dispatcher is the
worker's own, with a router asking the loopback DNS server.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import pytest

from mailstrom.routing import Router
from mailstrom.runtime.dispatch import Dispatcher
from mailstrom.runtime.outcomes import Outcomes
from mailstrom.stores.base import LeasedRecipient, RecipientResult, WorkItem
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_hostile_peers import peer
from tests.support.delivery import loopback_config

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def item(*recipients: str) -> WorkItem:
    return WorkItem(
        message_id="m1",
        lease_token="lease-1",
        domain="lost.example",
        envelope_from="a@sender.test",
        recipients=tuple(
            LeasedRecipient(address=a, attempts=0, first_attempt_at=None, created_at=NOW)
            for a in recipients
        ),
        data=b"Subject: hi\r\n\r\nhello\r\n",
        smtputf8=False,
        eightbit=False,
    )


@pytest.mark.parametrize("lost_after", [0, 64], ids=["alone", "then-64-more"])
async def test_recipients_over_the_limit_of_a_lost_lease_are_given_back(
    dns_server: LoopbackDNS, lost_after: int
) -> None:
    """The server takes one recipient per transaction (452 4.5.3 for the other). The
    lease is withdrawn while that transaction is on the wire: the recipient over the
    limit, which the dispatcher would send in a next transaction, goes back to the store
    instead. Sent here, it would go out twice: the worker that took the lease over
    delivers it too.

    ``then-64-more``: 64 more leases are lost while the transaction is on the wire (a
    worker cut off from its store fences every lease it holds at once, and holds up to
    ``4 * max_connections`` of them). The dispatcher remembered only the 64 newest lost
    leases: the first was forgotten, and the recipient over the limit went out a second
    time here."""
    envelope_in = asyncio.Event()
    go_on = asyncio.Event()
    mails: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 lost.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-lost.test\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                mails.append(line)
                rcpts = 0
                while (line := await reader.readline())[:4].upper() == b"RCPT":
                    rcpts += 1
                envelope_in.set()
                await go_on.wait()
                replies = [b"250 ok\r\n", b"250 ok\r\n"]
                replies += [b"452 4.5.3 too many recipients\r\n"] * (rcpts - 1)
                writer.write(b"".join(replies) + b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    dns_server.mx("lost.example", [(10, "mx.lost.test")])
    dns_server.a("mx.lost.test", "127.0.0.1")
    done: list[RecipientResult] = []
    given_back: list[WorkItem] = []
    async with peer(handle) as port:
        config = loopback_config(dns_server, port)
        dispatcher = Dispatcher(
            config,
            router=Router(config.dns, allow_loopback=True),
            outcomes=Outcomes(config, clock=lambda: NOW, rng=random.Random(1)),
            on_done=done.extend,
            on_postpone=lambda items, when, destination: given_back.extend(items),
        )
        try:
            dispatcher.submit(item("one@lost.example", "two@lost.example"))
            await asyncio.wait_for(envelope_in.wait(), 10)
            dispatcher.withdraw("lease-1")  # taken over by another worker meanwhile
            for i in range(lost_after):  # and so were other leases of this worker
                dispatcher.withdraw(f"lease-other-{i}")
            go_on.set()
            await asyncio.wait_for(dispatcher.idle.wait(), 10)
        finally:
            await dispatcher.close()
    assert [r.address for r in done] == ["one@lost.example"]
    assert len(mails) == 1, mails
    assert [r.address for i in given_back for r in i.recipients] == ["two@lost.example"]

"""Work of a lease the worker lost (another worker took it over) must not start a new
transaction here: the dispatcher gives it back instead (``Dispatcher.withdraw``).

The peer is a raw asyncio server on 127.0.0.1 scripted per test; the dispatcher is the
worker's own, with a router asking the loopback DNS server
(``tests.support.scripted``).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from mailstrom.runtime.outcomes import Outcomes
from mailstrom.status import RecipientState
from mailstrom.stores.base import LeasedRecipient, RecipientResult, WorkItem
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.scripted import NOW, scripted_dispatcher


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

    given_back: list[WorkItem] = []
    async with scripted_dispatcher(
        dns_server,
        handle,
        "lost.example",
        on_postpone=lambda items, when, destination: given_back.extend(items),
    ) as (dispatcher, done):
        dispatcher.submit(item("one@lost.example", "two@lost.example"))
        await asyncio.wait_for(envelope_in.wait(), 10)
        dispatcher.withdraw("lease-1")  # taken over by another worker meanwhile
        for i in range(lost_after):  # and so were other leases of this worker
            dispatcher.withdraw(f"lease-other-{i}")
        go_on.set()
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
    assert [r.address for r in done] == ["one@lost.example"]
    assert len(mails) == 1, mails
    assert [r.address for i in given_back for r in i.recipients] == ["two@lost.example"]


class Buggy(Outcomes):
    """Outcomes with a bug: reading the replies of message ``m1`` raises."""

    def from_transaction(self, item: WorkItem, *args: Any) -> list[RecipientResult]:
        if item.message_id == "m1":
            raise RuntimeError("a bug in reading the replies")
        return super().from_transaction(item, *args)


async def test_a_bug_in_one_transactions_outcome_loses_none_in_flight_beside_it(
    dns_server: LoopbackDNS,
) -> None:
    """A bug while the session reads one transaction's replies ends the session; the
    dispatcher defers its queue with the internal error. The transactions in flight on
    its connection were in neither: they got no result and were never given back, so
    their recipients stayed leased for as long as the worker ran (each beat extended the
    lease) and the dispatcher was never idle. Now the one the bug struck is deferred with
    the internal error, and the one beside it gets its own outcome."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 bug.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-bug.test\r\n250 PIPELINING\r\n")
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

    async with scripted_dispatcher(dns_server, handle, "lost.example", Buggy) as (
        dispatcher,
        done,
    ):
        dispatcher.submit(item("one@lost.example"))
        dispatcher.submit(replace(item("two@lost.example"), message_id="m2"))
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
    by_address = {r.address: r for r in done}
    assert sorted(by_address) == ["one@lost.example", "two@lost.example"], done
    one = by_address["one@lost.example"]
    assert one.state is RecipientState.DEFERRED
    assert "internal error" in (one.attempt.error or ""), one
    # The other one's own outcome (delivered, or uncertain when the bug came before its
    # reply), or the internal error when it was cut before its content went.
    assert by_address["two@lost.example"].state is not RecipientState.FAILED


async def test_a_bug_in_deciding_a_cut_transaction_loses_none_of_it(
    dns_server: LoopbackDNS,
) -> None:
    """A 421 to the second RCPT cuts the transaction; the first recipient's refusal is
    decided by its own reply, and there the bug strikes: the transaction was out of the
    session's hands already, and its recipients were never deferred nor given back."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 bug.test ESMTP\r\n")
        rcpts = 0
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-bug.test\r\n250 PIPELINING\r\n")
            elif verb == b"RCPT":
                rcpts += 1
                if rcpts == 2:
                    writer.write(b"421 4.3.2 closing\r\n")
                    await writer.drain()
                    return
                writer.write(b"550 5.1.1 no such user\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    async with scripted_dispatcher(dns_server, handle, "lost.example", Buggy) as (
        dispatcher,
        done,
    ):
        dispatcher.submit(item("one@lost.example", "two@lost.example"))
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
    assert sorted(r.address for r in done) == ["one@lost.example", "two@lost.example"], done
    assert all(r.state is RecipientState.DEFERRED for r in done), done
    assert all("internal error" in (r.attempt.error or "") for r in done), done

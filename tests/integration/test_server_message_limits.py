"""A server that takes only so many messages per connection (Exim's
``smtp_accept_max_per_connection``): once it has ended a connection that took messages,
the rest of the queue goes on a new connection to the same address, instead of being
deferred with an error of a connection it never used.

The server is aiosmtpd (``mailstrom.testing``'s receiver with ``messages_per_connection``)
on loopback, the only address of its domain.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

from mailstrom import Email, RecipientState, RetryPolicy
from mailstrom.client import Mailstrom
from mailstrom.status import SMTPReply
from mailstrom.stores import MemoryStore
from mailstrom.stores.base import WorkItem
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import Results, loopback_config
from tests.support.scripted import scripted_dispatcher, work_item

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
    # A MAIL the server never answered, or answered with a 421 that closes a connection
    # which took messages, is tried again on the next connection (RFC 5321 §3.8: the
    # server closes the channel; it did not refuse the message). Was, for the 421: the
    # message was deferred with an attempt counted, one in every LIMIT + 1.
    assert delivered == COUNT, states
    assert mx.connections == COUNT // LIMIT


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "stepwise"])
def test_recipients_over_a_servers_limit_go_in_later_transactions_uncounted(
    smtp_server: Any, dns_server: LoopbackDNS, pipelining: bool
) -> None:
    # RFC 5321 §4.5.3.1.10: a server with a recipient limit answers 452 beyond it, and the
    # client sends the rest in a later transaction. They were not tried: no attempt is
    # counted, or max_attempts would fail them although nothing refused them.
    mx = smtp_server(pipelining=pipelining)
    mx.rcpt_limit = 4
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(
        dns_server, mx.port, retry=RetryPolicy(max_attempts=1), max_per_destination=1
    )
    to = [f"u{i}@example.org" for i in range(10)]
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(Email(from_="a@sender.test", to=to, subject="Hi", text="Hi"))
        results.wait_final(set(to))
        status = ms.query_status(mid)
    assert status.state is RecipientState.DELIVERED, status
    assert all(r.attempts == 1 for r in status.recipients)
    assert [len(m.rcpt_tos) for m in mx.messages] == [4, 4, 2]
    assert sorted(a for m in mx.messages for a in m.rcpt_tos) == sorted(to)
    assert mx.connections == 1  # the next transactions went on the same connection


def test_a_452_to_every_recipient_is_an_ordinary_refusal(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    # Nothing accepted: no later transaction would do better, so it counts as a try.
    mx = smtp_server()
    mx.rcpt_limit = 0
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(dns_server, mx.port, retry=RetryPolicy(max_attempts=1))
    to = ["a@example.org", "b@example.org"]
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(Email(from_="a@sender.test", to=to, subject="Hi", text="Hi"))
        results.wait_final(set(to))
        status = ms.query_status(mid)
    assert status.state is RecipientState.FAILED
    assert {r.reply.enhanced for r in status.recipients if r.reply} == {"4.5.3"}
    assert mx.messages == []


def test_a_bare_552_to_rcpt_is_the_recipient_limit_of_an_older_server(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    # RFC 5321 §4.5.3.1.10: RFC 821 listed 552 for "too many recipients", and a server
    # without enhanced codes says no more. Was: the recipient was deferred with an attempt
    # counted, so max_attempts=1 failed it although it was never tried.
    mx = smtp_server(enhancedstatuscodes=False)
    mx.rcpt_replies["c@example.org"] = ["552 Too many recipients", "250 OK"]
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(dns_server, mx.port, retry=RetryPolicy(max_attempts=1))
    to = ["a@example.org", "b@example.org", "c@example.org"]
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(Email(from_="a@sender.test", to=to, subject="Hi", text="Hi"))
        results.wait_final(set(to))
        status = ms.query_status(mid)
    assert [r.state for r in status.recipients] == [RecipientState.DELIVERED] * 3, status
    assert [m.rcpt_tos for m in mx.messages] == [
        ("a@example.org", "b@example.org"),
        ("c@example.org",),
    ]


def test_exims_message_limit_reply_does_not_pause_the_destination(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    # Exim answers MAIL past smtp_accept_max_per_connection with "421 too many messages in
    # this connection" (SES and others say the same). Was: the text heuristics classed it
    # rate_limited, so it paused the whole destination for shaping.pause_first (doubling
    # on each repeat) and the queue behind it went back to the store, instead of going on
    # over a new connection.
    mx = smtp_server()
    mx.messages_per_connection = LIMIT
    mx.over_limit_reply = "421 too many messages in this connection"
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(dns_server, mx.port, max_per_destination=1)
    store = MemoryStore()
    results = Results()
    with Mailstrom(config, store=store, worker=None) as queue_only:
        queue_only.send_emails(
            [
                Email(from_="a@sender.test", to=[f"u{i}@example.org"], subject="Hi", text="Hi")
                for i in range(COUNT)
            ]
        )
    with Mailstrom(config, store=store, on_result=results) as ms:
        results.wait_count(COUNT)
        paused = ms.throttled_destinations()
    assert paused == []
    assert len(mx.messages) == COUNT
    assert mx.connections == COUNT // LIMIT


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "stepwise"])
@pytest.mark.parametrize(
    "over_limit_reply",
    [
        "421 too many messages in this connection",
        "421 4.3.2 Service shutting down, closing transmission channel",
        "421 4.7.0 Message limit of this connection reached, closing",
    ],
    ids=["exim", "generic", "unknown-limit"],
)
def test_a_message_refused_at_the_servers_limit_goes_on_the_next_connection_uncounted(
    smtp_server: Any, dns_server: LoopbackDNS, pipelining: bool, over_limit_reply: str
) -> None:
    # Was: the message whose MAIL got Exim's "421 too many messages in this connection"
    # was deferred with an attempt counted (a backoff of 5 minutes; with max_attempts=1
    # it failed, never tried), where one the server closed on without a word went on the
    # next connection. The reply asks for a new connection, nothing more (reasons.toml).
    # So does any 421 to MAIL on a connection that took messages (RFC 5321 §3.8: the
    # server closes the channel): was, one the reasons do not name (a shutdown, a limit
    # in other words) failed its message, never tried, with max_attempts=1.
    mx = smtp_server(pipelining=pipelining)
    mx.messages_per_connection = LIMIT
    mx.over_limit_reply = over_limit_reply
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(
        dns_server, mx.port, retry=RetryPolicy(max_attempts=1), max_per_destination=1
    )
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
    assert Counter(s.state for s in statuses) == {RecipientState.DELIVERED: COUNT}
    assert all(s.attempts == 1 for s in statuses)
    assert len(mx.messages) == COUNT
    assert mx.connections == COUNT // LIMIT


def test_a_421_to_the_first_mail_of_a_new_connection_counts_as_an_attempt(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    # A 421 to MAIL goes on the next connection uncounted only on a connection that took
    # messages (or was reused): the first MAIL of a new one refused refuses the
    # connection, and with no other address the queue is deferred, an attempt each (see
    # below), or a server that says 421 to every MAIL would be connected to without end.
    mx = smtp_server()
    mx.mail_reply = "421 4.3.2 Service shutting down, closing transmission channel"
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(
        dns_server, mx.port, retry=RetryPolicy(max_attempts=1), max_per_destination=1
    )
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(Email(from_="a@sender.test", to=["u@example.org"], text="Hi"))
        results.wait_final({"u@example.org"})
        status = ms.query_status(mid).recipients[0]
    assert status.state is RecipientState.FAILED, status
    assert status.attempts == 1
    assert status.reply is not None and status.reply.code == 421
    assert mx.connections == 1


def test_a_throttling_421_to_mail_still_defers_its_message(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    # A throttle (Yahoo's TSS04) is no connection's end: the message it refused is
    # deferred (and, with shaping, its destination paused), not sent again at once.
    mx = smtp_server()
    mx.messages_per_connection = LIMIT
    mx.over_limit_reply = "421 4.7.0 [TSS04] Messages from 127.0.0.1 deferred for now"
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(dns_server, mx.port, max_per_destination=1)
    store = MemoryStore()
    results = Results()
    with Mailstrom(config, store=store, worker=None) as queue_only:
        queue_only.send_emails(
            [
                Email(from_="a@sender.test", to=[f"u{i}@example.org"], subject="Hi", text="Hi")
                for i in range(COUNT)
            ]
        )
    with Mailstrom(config, store=store, on_result=results):
        first = results.wait_count(LIMIT + 1)[: LIMIT + 1]
    assert [r.state for r in first] == [RecipientState.DELIVERED] * LIMIT + [
        RecipientState.DEFERRED
    ]
    assert first[-1].attempt.reply is not None and first[-1].attempt.reply.code == 421


def _queue(config: Any, store: MemoryStore) -> list[str]:
    with Mailstrom(config, store=store, worker=None) as queue_only:
        return queue_only.send_emails(
            [
                Email(from_="a@sender.test", to=[f"u{i}@example.org"], subject="Hi", text="Hi")
                for i in range(COUNT)
            ]
        )


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "stepwise"])
@pytest.mark.parametrize("where", ["mail", "greeting", "rcpt", "dot"])
def test_a_server_refusing_its_first_mail_with_421_is_a_refused_connection(
    smtp_server: Any, dns_server: LoopbackDNS, pipelining: bool, where: str
) -> None:
    # Was: a 421 to the first MAIL of a new connection deferred that one message, and the
    # rest of the queue, never sent, went back to the store due at once: leased again,
    # a new connection, the next message deferred... a server refusing every MAIL was
    # connected to once per message queued (12 here), the work handed back each time.
    # It refuses the connection (RFC 5321 §3.8), as a 421 greeting does: one connection,
    # and the queue deferred with its reply, one attempt each, the same as the greeting.
    # So does a 421 to the first RCPT or final dot of a new connection (Postfix: a site
    # failure, which defers the destination): was one connection per message too.
    reply = "421 4.3.2 Service shutting down, closing transmission channel"
    if where == "greeting":
        mx = smtp_server(pipelining=pipelining, greeting=reply)
    else:
        mx = smtp_server(pipelining=pipelining)
        if where == "mail":
            mx.mail_reply = reply
        elif where == "rcpt":
            mx.rcpt_replies.update({f"u{i}@example.org": reply for i in range(COUNT)})
        else:
            mx.data_reply = reply
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(dns_server, mx.port, max_per_destination=1)
    store = MemoryStore()
    ids = _queue(config, store)
    results = Results()
    with Mailstrom(config, store=store, on_result=results) as ms:
        results.wait_count(COUNT)
        statuses = [ms.query_status(i).recipients[0] for i in ids]
    assert mx.connections == 1
    for status in statuses:
        assert status.state is RecipientState.DEFERRED, status
        assert status.attempts == 1, status
        assert status.reply is not None and str(status.reply) == reply, status


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "stepwise"])
async def test_a_421_to_the_data_command_of_a_new_connection_refuses_the_connection(
    dns_server: LoopbackDNS, pipelining: bool
) -> None:
    # aiosmtpd answers DATA itself, so the server here is a raw one: it takes MAIL and
    # RCPT, and closes with a 421 to DATA. Was: the first message was deferred, and the
    # four queued behind it, never sent, went back to the store due at once, to be leased
    # again and refused on a new connection each, one connection per message.
    reply = b"421 4.3.2 Service shutting down, closing transmission channel"
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(b"220 busy.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-busy.test\r\n250 PIPELINING\r\n" if pipelining else b"250 x\r\n")
            elif verb == b"DATA":
                writer.write(reply + b"\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    postponed: list[WorkItem] = []

    def postpone(items: list[WorkItem], until: datetime, destination: str | None) -> None:
        postponed.extend(items)

    async with scripted_dispatcher(
        dns_server, handle, "busy.example", on_postpone=postpone, max_per_destination=1
    ) as (dispatcher, done):
        for n in range(5):
            dispatcher.submit(work_item(n, "busy.example"))
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
    assert connections == 1
    assert postponed == []  # none handed back to be tried again at once
    assert sorted(r.address for r in done) == [f"r{n}@busy.example" for n in range(5)]
    for result in done:
        assert result.state is RecipientState.DEFERRED, result
        assert result.attempt.reply == SMTPReply(
            code=421, enhanced="4.3.2", text="Service shutting down, closing transmission channel"
        ), result


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "stepwise"])
@pytest.mark.parametrize("where", ["mail", "rcpt", "dot"])
def test_work_refused_at_the_first_mail_goes_on_to_the_next_mx_host(
    smtp_server: Any, dns_server: LoopbackDNS, pipelining: bool, where: str
) -> None:
    # Was: the message whose MAIL got the 421 was deferred at the first host, never tried
    # at the second, which took the rest (Postfix too keeps a soft MAIL refusal's
    # recipients for the next server, smtp_trouble.c). So for a 421 to its RCPT or its
    # final dot: the rest of the queue went back to the store, each message to be
    # refused once by the first host on a connection of its own.
    refusing = smtp_server(pipelining=pipelining)
    reply = "421 4.3.2 Service shutting down, closing transmission channel"
    if where == "mail":
        refusing.mail_reply = reply
    elif where == "rcpt":
        refusing.rcpt_replies.update({f"u{i}@example.org": reply for i in range(COUNT)})
    else:
        refusing.data_reply = reply
    backup = smtp_server(host="127.0.0.21", port=refusing.port, pipelining=pipelining)
    dns_server.mx("example.org", [(10, "mx1.test"), (20, "mx2.test")])
    dns_server.a("mx1.test", refusing.host)
    dns_server.a("mx2.test", backup.host)
    config = loopback_config(dns_server, refusing.port, max_per_destination=1)
    store = MemoryStore()
    ids = _queue(config, store)
    results = Results()
    with Mailstrom(config, store=store, on_result=results) as ms:
        results.wait_count(COUNT)
        statuses = [ms.query_status(i).recipients[0] for i in ids]
    assert Counter(s.state for s in statuses) == {RecipientState.DELIVERED: COUNT}
    assert all(s.attempts == 1 for s in statuses)
    assert len(backup.messages) == COUNT
    assert refusing.connections == 1


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "stepwise"])
def test_a_connection_keeps_the_recipient_limit_its_server_showed(
    smtp_server: Any, dns_server: LoopbackDNS, pipelining: bool
) -> None:
    # A server that takes one recipient a transaction (rcpt_limit = 1) answers 452 4.5.3
    # to the others. Was: each later transaction named every recipient still left, to be
    # refused again, so that 100 recipients cost 5,050 RCPT commands. The destination
    # keeps the number the server took, and no later transaction names more: one RCPT a
    # recipient, once the limit is known.
    mx = smtp_server(pipelining=pipelining)
    mx.rcpt_limit = 1
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(
        dns_server, mx.port, retry=RetryPolicy(max_attempts=1), max_per_destination=1
    )
    to = [f"u{i}@example.org" for i in range(100)]
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(Email(from_="a@sender.test", to=to, subject="Hi", text="Hi"))
        results.wait_final(set(to))
        status = ms.query_status(mid)
    assert status.state is RecipientState.DELIVERED, status
    assert all(r.attempts == 1 for r in status.recipients)
    assert sorted(a for m in mx.messages for a in m.rcpt_tos) == sorted(to)
    assert mx.connections == 1
    # The first transaction names all 100 (99 refused for the limit), then one each.
    assert mx.commands.count("RCPT") == len(to) + len(to) - 1


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "stepwise"])
def test_a_bare_452_to_the_last_recipient_is_no_recipient_limit(
    smtp_server: Any, dns_server: LoopbackDNS, pipelining: bool
) -> None:
    # RFC 5321 has 452 for "insufficient system storage" too: a server that refuses the
    # last recipient of a transaction that way, with no enhanced code, shows no limit of
    # recipients. Was: the destination kept a limit of one recipient (what was taken
    # before the 452), so that the later 20-recipient messages went one recipient a
    # transaction (84 MAIL commands for the 122 recipients here instead of 8). Only "too
    # many recipients" (X.5.3, RFC 3463) is kept as a limit.
    mx = smtp_server(pipelining=pipelining)
    mx.rcpt_replies = {"full@example.org": "452 Insufficient system storage"}
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(
        dns_server, mx.port, retry=RetryPolicy(max_attempts=1), max_per_destination=1
    )
    first = ["a@example.org", "full@example.org"]
    later = [[f"u{k}_{i}@example.org" for i in range(20)] for k in range(6)]
    store = MemoryStore()
    with Mailstrom(config, store=store, worker=None) as queue_only:
        queue_only.send_emails(
            [Email(from_="a@sender.test", to=to, subject="Hi", text="Hi") for to in [first, *later]]
        )
    results = Results()
    with Mailstrom(config, store=store, on_result=results):
        results.wait_final({*first, *(a for to in later for a in to)})
    assert results.states()["full@example.org"] is RecipientState.FAILED
    # "a" alone, then "full" alone (put off from the first transaction, as it may have
    # been refused for a limit), then each later message in one transaction.
    assert sorted(len(m.rcpt_tos) for m in mx.messages) == [1] + [20] * len(later)
    assert mx.commands.count("MAIL") == 2 + len(later)

"""The whole path — send_email → store → worker → DNS → SMTP → status — against real peers:
aiosmtpd (with trustme TLS) and a dnslib DNS server, both on loopback ephemeral ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom import (
    Config,
    Email,
    InvalidAddress,
    InvalidMessage,
    ReasonClass,
    RecipientState,
    RetryPolicy,
    Timeouts,
    TLSPolicy,
)
from mailstrom.client import AsyncMailstrom, Mailstrom
from mailstrom.config import EventLoop, RelayConfig, RelayTLS
from mailstrom.errors import StoreError, UnknownMessage, WorkerError
from mailstrom.message import PreparedMessage, prepare
from mailstrom.policy import advice_for
from mailstrom.routing import Route, Router
from mailstrom.runtime.worker import Worker
from mailstrom.status import SMTPReply
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.base import Lease, Store
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.tcp_proxy import TCPProxy
from tests.support.delivery import LOOPS, FakeClock, Results

DELIVERED = RecipientState.DELIVERED
DEFERRED = RecipientState.DEFERRED
FAILED = RecipientState.FAILED

FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=2, data_end=2)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def results() -> Results:
    return Results()


@pytest.fixture
def mx(smtp_server: Any, dns_server: LoopbackDNS) -> Any:
    """One receiving server for example.org (MX mx.test → 127.0.0.1)."""
    server = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


MakeMailstrom = Callable[..., Mailstrom]


@pytest.fixture
def worker_loop() -> EventLoop:
    """The loop the worker runs on; a test parametrized over LOOPS runs on each."""
    return EventLoop.AUTO


@pytest.fixture
def mailstrom(
    dns_server: LoopbackDNS, mx: Any, clock: FakeClock, results: Results, worker_loop: EventLoop
) -> Iterator[MakeMailstrom]:
    """Start a Mailstrom pointed at the loopback DNS and the receiver's port."""
    started: list[Mailstrom] = []

    def make(store: Store | None = None, **overrides: Any) -> Mailstrom:
        options: dict[str, Any] = {
            "helo_name": "client.test",
            "smtp_port": mx.port,
            "dns": dns_server.dns_config,
            "allow_loopback": True,  # the receiver is on 127.0.0.1
            "timeouts": FAST,
            "poll_interval": 0.5,
            "event_loop": worker_loop,
        }
        options.update(overrides)
        ms = Mailstrom(
            Config(**options),
            store=store if store is not None else MemoryStore(),
            clock=clock,
            on_result=results,
        )
        ms.start()
        started.append(ms)
        return ms

    yield make
    for ms in started:
        ms.stop(timeout=5)
        ms.store.close()  # a store passed in is the caller's (the test's) to close


def hello(*to: str, **kwargs: Any) -> Email:
    return Email(from_="App <app@sender.test>", to=list(to), subject="Hi", text="Hello", **kwargs)


RAW = (
    b"From: App <app@sender.test>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: exact bytes\r\n"
    b"Date: Mon, 05 Jan 2026 12:00:00 +0000\r\n"
    b"Message-ID: <exact@sender.test>\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line that must be dot-stuffed\r\n"
    b".\r\n"
    b"last line\r\n"
)


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_delivers_over_starttls_byte_exact(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    ms = mailstrom()
    mid = ms.send_email(RAW)
    results.wait_final({"bob@example.org"})

    [received] = mx.wait_for_messages(1)
    assert received.tls
    assert received.mail_from == "app@sender.test"
    assert list(received.rcpt_tos) == ["bob@example.org"]
    assert received.content == RAW
    status = ms.query_status(mid)
    assert status.state is DELIVERED
    bob = status.recipient("bob@example.org")
    assert bob.reply is not None and bob.reply.code == 250
    assert bob.mx_host == "mx.test" and bob.ip == "127.0.0.1" and bob.tls
    assert bob.attempts == 1
    [attempt] = bob.history
    assert attempt.tls_version is not None and attempt.tls_cipher


def test_delivers_without_tls_when_not_offered(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results
) -> None:
    plain = smtp_server(host="127.0.0.2", starttls=False)
    dns_server.mx("plain.test", [(10, "mx.plain.test")])
    dns_server.a("mx.plain.test", "127.0.0.2")
    ms = mailstrom(smtp_port=plain.port)
    mid = ms.send_email(hello("ann@plain.test"))
    results.wait_final({"ann@plain.test"})
    [received] = plain.wait_for_messages(1)
    assert not received.tls
    ann = ms.query_status(mid).recipient("ann@plain.test")
    assert ann.state is DELIVERED and not ann.tls


def test_bcc_in_envelope_never_in_bytes(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    ms = mailstrom()
    ms.send_email(hello("bob@example.org", bcc=["hidden@example.org"]))
    results.wait_final({"bob@example.org", "hidden@example.org"})
    [received] = mx.wait_for_messages(1)
    assert sorted(received.rcpt_tos) == ["bob@example.org", "hidden@example.org"]
    assert b"hidden@example.org" not in received.content
    assert b"\nBcc:" not in received.content


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_one_transaction_with_per_recipient_outcomes(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    mx.rcpt_replies["later@example.org"] = "451 4.2.1 Mailbox busy"
    mx.rcpt_replies["nobody@example.org"] = "550 5.1.1 No such user"
    ms = mailstrom()
    mid = ms.send_email(hello("ok@example.org", "later@example.org", "nobody@example.org"))
    results.wait_final({"ok@example.org", "later@example.org", "nobody@example.org"})

    [received] = mx.wait_for_messages(1)
    assert list(received.rcpt_tos) == ["ok@example.org"]
    assert mx.commands.count("MAIL") == 1  # one transaction for the whole domain
    assert mx.pipelined > 0
    status = ms.query_status(mid)
    assert status.recipient("ok@example.org").state is DELIVERED
    later = status.recipient("later@example.org")
    assert later.state is DEFERRED
    assert later.reply is not None and later.reply.code == 451
    assert later.reply.enhanced == "4.2.1"
    assert later.next_attempt_at is not None
    nobody = status.recipient("nobody@example.org")
    assert nobody.state is FAILED
    assert nobody.reply is not None and nobody.reply.code == 550
    assert status.state is DEFERRED


GMAIL_UNAUTHENTICATED = (
    "550 5.7.26 This mail is unauthenticated: Gmail wants SPF or DKIM to pass. a1si2 - gsmtp"
)


def test_a_failed_reply_is_classified_in_status_and_in_the_attempt_log(
    mailstrom: MakeMailstrom, mx: Any, results: Results, caplog: pytest.LogCaptureFixture
) -> None:
    mx.rcpt_replies["unauth@example.org"] = GMAIL_UNAUTHENTICATED
    mx.rcpt_replies["grey@example.org"] = "451 4.7.1 Greylisted, try again later"
    everyone = {"ok@example.org", "unauth@example.org", "grey@example.org"}
    with caplog.at_level(logging.INFO, logger="mailstrom.attempts"):
        ms = mailstrom()
        mid = ms.send_email(hello(*sorted(everyone)))
        results.wait_final(everyone)

    status = ms.query_status(mid)
    unauth = status.recipient("unauth@example.org")
    assert unauth.state is FAILED  # the class explains; the 5xx decided
    assert unauth.reason_class is ReasonClass.AUTHENTICATION
    assert [a.reason_class for a in unauth.history] == [ReasonClass.AUTHENTICATION]
    grey = status.recipient("grey@example.org")
    assert grey.state is DEFERRED
    assert grey.reason_class is ReasonClass.GREYLISTED
    ok = status.recipient("ok@example.org")
    assert ok.state is DELIVERED and ok.reason_class is None
    assert [a.reason_class for a in ok.history] == [None]
    found = advice_for(unauth)
    assert found is not None and found.provider == "Google"
    assert found.help == "https://support.google.com/mail/answer/81126"

    fields = {
        r.fields["rcpt"]: r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "mailstrom.attempts"
    }
    assert fields["unauth@example.org"]["reason_class"] == "authentication"
    assert fields["unauth@example.org"]["help"] == "https://support.google.com/mail/answer/81126"
    assert fields["grey@example.org"]["reason_class"] == "greylisted"
    assert fields["grey@example.org"]["help"] is None  # no provider rule: no link
    assert fields["ok@example.org"]["reason_class"] is None


def test_local_failures_are_classified_too(
    mailstrom: MakeMailstrom, dns_server: LoopbackDNS, results: Results
) -> None:
    dns_server.mx("refused.test", [(10, "mx.refused.test")])
    dns_server.a("mx.refused.test", "127.0.0.2")  # nothing listens there
    ms = mailstrom()
    refused = ms.send_email(hello("ann@refused.test"))
    missing = ms.send_email(hello("bob@nowhere.test"))  # NXDOMAIN
    results.wait_final({"ann@refused.test", "bob@nowhere.test"})
    ann = ms.query_status(refused).recipient("ann@refused.test")
    assert ann.reply is None and ann.error
    assert ann.reason_class is ReasonClass.CONNECTION
    bob = ms.query_status(missing).recipient("bob@nowhere.test")
    assert bob.state is FAILED and bob.reason_class is ReasonClass.DNS


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_first_mx_down_backup_used(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    backup = smtp_server(host="127.0.0.3", port=mx.port)
    dns_server.mx("backup.test", [(10, "mx1.test"), (20, "mx2.test")])
    dns_server.a("mx1.test", "127.0.0.2")  # nothing listens there
    dns_server.a("mx2.test", "127.0.0.3")
    ms = mailstrom()
    mid = ms.send_email(hello("carol@backup.test"))
    results.wait_final({"carol@backup.test"})
    carol = ms.query_status(mid).recipient("carol@backup.test")
    assert carol.state is DELIVERED
    assert carol.mx_host == "mx2.test" and carol.ip == "127.0.0.3"
    backup.wait_for_messages(1)
    assert len(backup.messages) == 1


@pytest.mark.parametrize("remember", [timedelta(minutes=5), timedelta(0)])
@pytest.mark.parametrize("worker_loop", LOOPS)
def test_a_first_mx_that_never_greets_is_waited_for_once(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    mailstrom: MakeMailstrom,
    results: Results,
    mx: Any,
    remember: timedelta,
) -> None:
    # Each message after the first starts a new session. Without the memory each one
    # waits out the first host's greeting timeout again before the backup gets it.
    silent = smtp_server(host="127.0.0.2", port=mx.port, stall_on="greeting")
    backup = smtp_server(host="127.0.0.3", port=mx.port)
    dns_server.mx("backup.test", [(10, "mx1.test"), (20, "mx2.test")])
    dns_server.a("mx1.test", silent.host)
    dns_server.a("mx2.test", backup.host)
    ms = mailstrom(
        timeouts=replace(FAST, greeting=0.5), connection_idle=0, remember_unreachable=remember
    )
    for n in range(3):
        ms.send_email(hello(f"u{n}@backup.test"))
        results.wait_final({f"u{n}@backup.test"})
    backup.wait_for_messages(3)
    assert len(backup.messages) == 3
    assert silent.connections == (1 if remember else 3)


def test_an_address_two_mx_hosts_share_is_tried_once_and_counted_once(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    # mx1 and mx2 are one machine that never greets: waiting for it under a second name
    # costs a second timeout, and counting it twice toward mx_address_limit (2) left the
    # backup, mx3, out of the route.
    silent = smtp_server(host="127.0.0.2", port=mx.port, stall_on="greeting")
    backup = smtp_server(host="127.0.0.3", port=mx.port)
    dns_server.mx("shared.test", [(10, "mx1.test"), (20, "mx2.test"), (30, "mx3.test")])
    dns_server.a("mx1.test", silent.host)
    dns_server.a("mx2.test", silent.host)
    dns_server.a("mx3.test", backup.host)
    ms = mailstrom(timeouts=replace(FAST, greeting=0.5), mx_address_limit=2)
    mid = ms.send_email(hello("dave@shared.test"))
    results.wait_final({"dave@shared.test"})
    dave = ms.query_status(mid).recipient("dave@shared.test")
    assert (dave.state, dave.mx_host) == (DELIVERED, "mx3.test")
    assert silent.connections == 1


@pytest.mark.parametrize("remember", [timedelta(minutes=5), timedelta(0)])
def test_an_unreachable_address_is_not_tried_again_under_another_mx_name(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    mailstrom: MakeMailstrom,
    results: Results,
    mx: Any,
    remember: timedelta,
) -> None:
    silent = smtp_server(host="127.0.0.2", port=mx.port, stall_on="greeting")
    dns_server.mx("shared.test", [(10, "mx1.test"), (20, "mx2.test")])
    dns_server.a("mx1.test", silent.host)
    dns_server.a("mx2.test", silent.host)
    ms = mailstrom(timeouts=replace(FAST, greeting=0.5), remember_unreachable=remember)
    mid = ms.send_email(hello("erin@shared.test"))
    results.wait_final({"erin@shared.test"})
    assert ms.query_status(mid).recipient("erin@shared.test").state is DEFERRED
    assert silent.connections == 1


def test_a_host_that_never_greets_for_many_domains_leaves_room_for_others(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    """Was: each domain is its own destination, so one MX host that accepts connections
    and never greets (a hosting provider's, for many customer domains) took a session of
    every domain it serves until max_connections were all waiting for its greeting, and
    mail to every healthy host waited for the greeting timeout (300 s by default)."""
    silent = smtp_server(host="127.0.0.2", port=mx.port, stall_on="greeting")
    domains = [f"hosted{n}.test" for n in range(4)]
    for domain in domains:
        dns_server.mx(domain, [(10, "shared-mx.test")])
    dns_server.a("shared-mx.test", silent.host)
    ms = mailstrom(timeouts=replace(FAST, greeting=120), max_connections=4, max_per_destination=2)
    for domain in domains:
        ms.send_email(hello(f"user@{domain}"))
    deadline = time.monotonic() + 10
    while silent.connections < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert silent.connections >= 2
    mid = ms.send_email(hello("bob@example.org"))
    results.wait_final({"bob@example.org"})
    assert ms.query_status(mid).recipient("bob@example.org").state is DELIVERED
    # Still waiting for the greeting: no more connections to it at once than one
    # destination may have.
    assert silent.connections == 2
    assert not {f"user@{domain}" for domain in domains} & set(results.states())


def test_implicit_mx(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    direct = smtp_server(host="127.0.0.4", port=mx.port)
    dns_server.a("direct.test", "127.0.0.4")  # no MX record at all
    ms = mailstrom()
    mid = ms.send_email(hello("dan@direct.test"))
    results.wait_final({"dan@direct.test"})
    assert ms.query_status(mid).recipient("dan@direct.test").state is DELIVERED
    direct.wait_for_messages(1)
    assert len(direct.messages) == 1


def test_null_mx_and_nxdomain_fail_at_once(
    dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results
) -> None:
    dns_server.null_mx("nomail.test")
    ms = mailstrom()
    mid = ms.send_email(hello("eve@nomail.test", "fay@does-not-exist.test"))
    results.wait_final({"eve@nomail.test", "fay@does-not-exist.test"})
    status = ms.query_status(mid)
    eve = status.recipient("eve@nomail.test")
    assert eve.state is FAILED and "null MX" in eve.reason
    fay = status.recipient("fay@does-not-exist.test")
    assert fay.state is FAILED and fay.attempts == 1
    assert status.state is FAILED


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_servfail_defers(
    dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results
) -> None:
    dns_server.servfail("broken-dns.test")
    ms = mailstrom()
    mid = ms.send_email(hello("gus@broken-dns.test"))
    results.wait_final({"gus@broken-dns.test"})
    assert ms.query_status(mid).recipient("gus@broken-dns.test").state is DEFERRED


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_greylisting_retried_with_controllable_clock(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    mx.rcpt_replies["grey@example.org"] = ["451 4.7.1 Greylisted, try again", "250 2.1.5 OK"]
    ms = mailstrom()
    mid = ms.send_email(hello("grey@example.org"))
    results.wait_count(1)
    first = ms.query_status(mid).recipient("grey@example.org")
    assert first.state is DEFERRED
    assert first.next_attempt_at is not None
    wait = first.next_attempt_at - clock()
    assert timedelta(minutes=4) <= wait <= timedelta(minutes=6)  # default: ~5 min, jittered

    clock.advance(wait + timedelta(seconds=1))
    ms.wake()
    results.wait_count(2)
    second = ms.query_status(mid).recipient("grey@example.org")
    assert second.state is DELIVERED
    assert second.attempts == 2
    assert [a.outcome for a in second.history] == ["temporary", "delivered"]


def test_gives_up_after_max_age(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    mx.rcpt_replies["stuck@example.org"] = "451 4.3.0 Not today"
    policy = RetryPolicy(min_delay=timedelta(minutes=5), max_age=timedelta(minutes=12))
    ms = mailstrom(retry=policy)
    mid = ms.send_email(hello("stuck@example.org"))
    for n in range(1, 10):
        results.wait_count(n)
        r = ms.query_status(mid).recipient("stuck@example.org")
        if r.state is FAILED:
            break
        assert r.state is DEFERRED and r.next_attempt_at is not None
        clock.advance(r.next_attempt_at - clock())
        ms.wake()
    assert r.state is FAILED
    assert r.reply is not None and r.reply.code == 451  # the last reason is kept
    assert 2 <= r.attempts <= 3


def test_the_last_retry_comes_at_max_age_not_a_backoff_before_it(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    """A backoff that would pass ``max_age`` brings the last attempt to it: with 30 minutes
    to retry, attempts at 0, 5, 15 and 30 minutes. Given up at the third (the next backoff,
    20 minutes, ended past it), the recipient failed with half its window unused."""
    mx.rcpt_replies["stuck@example.org"] = "451 4.3.0 Not today"
    policy = RetryPolicy(min_delay=timedelta(minutes=5), jitter=0.0, max_age=timedelta(minutes=30))
    ms = mailstrom(retry=policy)
    queued = clock()
    mid = ms.send_email(hello("stuck@example.org"))
    for n in range(1, 10):
        results.wait_count(n)
        r = ms.query_status(mid).recipient("stuck@example.org")
        if r.state is FAILED:
            break
        assert r.state is DEFERRED and r.next_attempt_at is not None
        clock.advance(r.next_attempt_at - clock())
        ms.wake()
    assert r.state is FAILED
    assert r.reply is not None and r.reply.code == 451  # the last reason is kept
    assert [a.at - queued for a in r.history] == [timedelta(minutes=m) for m in (0, 5, 15, 30)]


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_tls_handshake_failure_opportunistic_falls_back_to_plaintext(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    broken = smtp_server(host="127.0.0.5", port=mx.port, tls_broken=True)
    dns_server.mx("badtls.test", [(10, "mx.badtls.test")])
    dns_server.a("mx.badtls.test", "127.0.0.5")
    ms = mailstrom()
    mid = ms.send_email(hello("hal@badtls.test"))
    results.wait_final({"hal@badtls.test"})
    hal = ms.query_status(mid).recipient("hal@badtls.test")
    assert hal.state is DELIVERED and not hal.tls
    [received] = broken.wait_for_messages(1)
    assert not received.tls


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_tls_handshake_failure_required_defers(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    broken = smtp_server(host="127.0.0.5", port=mx.port, tls_broken=True)
    plain = smtp_server(host="127.0.0.6", port=mx.port, starttls=False)
    dns_server.mx("badtls.test", [(10, "mx.badtls.test")])
    dns_server.a("mx.badtls.test", "127.0.0.5")
    dns_server.mx("notls.test", [(10, "mx.notls.test")])
    dns_server.a("mx.notls.test", "127.0.0.6")
    ms = mailstrom(tls=TLSPolicy.REQUIRED)
    mid = ms.send_email(hello("ian@badtls.test", "jo@notls.test"))
    results.wait_final({"ian@badtls.test", "jo@notls.test"})
    status = ms.query_status(mid)
    assert status.recipient("ian@badtls.test").state is DEFERRED
    jo = status.recipient("jo@notls.test")
    assert jo.state is DEFERRED and "TLS" in jo.reason
    assert broken.messages == [] and plain.messages == []


def test_verify_policy_checks_certificate(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    mailstrom: MakeMailstrom,
    results: Results,
    mx: Any,
    client_tls_context: ssl.SSLContext,
) -> None:
    dns_server.mx("wronghost.test", [(10, "unlisted-name.example")])
    dns_server.a("unlisted-name.example", "127.0.0.1")
    ms = mailstrom(tls=TLSPolicy.VERIFY, tls_context=client_tls_context)
    mid = ms.send_email(hello("kim@example.org", "lee@wronghost.test"))
    results.wait_final({"kim@example.org", "lee@wronghost.test"})
    status = ms.query_status(mid)
    assert status.recipient("kim@example.org").state is DELIVERED
    assert status.recipient("lee@wronghost.test").state is DEFERRED
    assert len(mx.messages) == 1


def test_smtputf8_needed_but_not_offered_fails(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    smtp_server(host="127.0.0.7", port=mx.port, smtputf8=False)
    dns_server.mx("ascii.test", [(10, "mx.ascii.test")])
    dns_server.a("mx.ascii.test", "127.0.0.7")
    ms = mailstrom()
    mid = ms.send_email(hello("jos\u00e9@ascii.test"))
    results.wait_count(1)
    [r] = ms.query_status(mid).recipients
    assert r.state is FAILED
    assert "SMTPUTF8" in r.reason


def test_smtputf8_only_for_the_transactions_that_need_it(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    """A UTF-8 address in Bcc (or an explicit envelope) makes only its own transaction
    need SMTPUTF8 (RFC 6531 §3.4): the message itself is ASCII, so the other recipients
    go to a server without SMTPUTF8 as usual."""
    ascii_mx = smtp_server(host="127.0.0.7", port=mx.port, smtputf8=False)
    for domain in ("ascii.test", "other.test"):
        dns_server.mx(domain, [(10, "mx.ascii.test")])
    dns_server.a("mx.ascii.test", "127.0.0.7")
    ms = mailstrom()
    mid = ms.send_email(
        Email(
            from_="app@sender.test",
            to=["ann@ascii.test"],
            bcc=["jos\u00e9@other.test"],
            subject="Hi",
            text="Hello",
        )
    )
    results.wait_final({"ann@ascii.test", "jos\u00e9@other.test"})
    status = ms.query_status(mid)
    assert status.recipient("ann@ascii.test").state is DELIVERED
    assert status.recipient("jos\u00e9@other.test").state is FAILED
    [received] = ascii_mx.wait_for_messages(1)
    assert list(received.rcpt_tos) == ["ann@ascii.test"]
    assert "SMTPUTF8" not in received.mail_options


def test_a_utf8_bcc_does_not_fail_its_ascii_co_recipients_of_one_domain(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    """The UTF-8 Bcc address in the same domain as the others shares their transaction:
    at a server without SMTPUTF8 it alone needs it, and alone fails (553 5.6.7). The
    others' envelope and header fields are ASCII: they go without SMTPUTF8 (before, all
    of them failed for good with "message needs SMTPUTF8")."""
    ascii_mx = smtp_server(host="127.0.0.7", port=mx.port, smtputf8=False)
    dns_server.mx("ascii.test", [(10, "mx.ascii.test")])
    dns_server.a("mx.ascii.test", "127.0.0.7")
    ms = mailstrom()
    mid = ms.send_email(
        Email(
            from_="app@sender.test",
            to=["ann@ascii.test", "bea@ascii.test"],
            bcc=["jos\u00e9@ascii.test"],
            subject="Hi",
            text="Hello",
        )
    )
    everyone = {"ann@ascii.test", "bea@ascii.test", "jos\u00e9@ascii.test"}
    results.wait_final(everyone)
    status = ms.query_status(mid)
    assert {r.address: r.state for r in status.recipients} == {
        "ann@ascii.test": DELIVERED,
        "bea@ascii.test": DELIVERED,
        "jos\u00e9@ascii.test": FAILED,
    }
    jose = status.recipient("jos\u00e9@ascii.test")
    assert jose.reply is not None and jose.reply.enhanced == "5.6.7"
    [received] = ascii_mx.wait_for_messages(1)
    assert list(received.rcpt_tos) == ["ann@ascii.test", "bea@ascii.test"]
    assert "SMTPUTF8" not in received.mail_options


def test_a_utf8_bcc_does_not_make_an_8bit_body_need_smtputf8(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    """An 8-bit body needs 8BITMIME, not SMTPUTF8: with a UTF-8 Bcc address marking the
    message, the other transactions failed at a server without SMTPUTF8 ("message needs
    SMTPUTF8") though their envelope and header fields are ASCII."""
    ascii_mx = smtp_server(host="127.0.0.7", port=mx.port, smtputf8=False)
    for domain in ("ascii.test", "other.test"):
        dns_server.mx(domain, [(10, "mx.ascii.test")])
    dns_server.a("mx.ascii.test", "127.0.0.7")
    ms = mailstrom()
    raw = (
        "From: app@sender.test\r\nTo: ann@ascii.test\r\nBcc: jos\u00e9@other.test\r\n"
        "Subject: Hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGr\u00fc\u00dfe\r\n"
    ).encode()
    mid = ms.send_email(raw)
    results.wait_final({"ann@ascii.test", "jos\u00e9@other.test"})
    status = ms.query_status(mid)
    assert status.recipient("jos\u00e9@other.test").state is FAILED
    ann = status.recipient("ann@ascii.test")
    assert ann.state is DELIVERED, ann.reason
    [received] = ascii_mx.wait_for_messages(1)
    assert list(received.rcpt_tos) == ["ann@ascii.test"]
    assert "SMTPUTF8" not in received.mail_options
    assert "Gr\u00fc\u00dfe".encode() in received.content


def test_a_stored_message_is_not_judged_again_by_newer_input_rules(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    mailstrom: MakeMailstrom,
    results: Results,
    mx: Any,
    clock: FakeClock,
) -> None:
    """The SMTPUTF8 need of a queued message marked for it (a UTF-8 Bcc address) is read
    from its 8-bit header octets alone: one queued by an older version with a line of only
    white space in a part's header section, which prepare() now refuses, went only to
    servers with SMTPUTF8 ("message needs SMTPUTF8" elsewhere), as dispatch took the
    refusal of its whole structure check to mean a UTF-8 part header."""
    ascii_mx = smtp_server(host="127.0.0.7", port=mx.port, smtputf8=False)
    for domain in ("ascii.test", "other.test"):
        dns_server.mx(domain, [(10, "mx.ascii.test")])
    dns_server.a("mx.ascii.test", "127.0.0.7")
    data = (
        "From: app@sender.test\r\nTo: ann@ascii.test\r\nSubject: Hi\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        "Content-Type: text/plain; charset=utf-8\r\n \r\nContent-Transfer-Encoding: 8bit\r\n"
        "\r\nGr\u00fc\u00dfe\r\n--b--\r\n"
    ).encode()
    with pytest.raises(InvalidMessage, match="only white space"):
        prepare(data)
    store = MemoryStore()
    queued = PreparedMessage(  # as an older version queued it
        data=data,
        envelope_from="app@sender.test",
        recipients=("ann@ascii.test", "jos\u00e9@other.test"),
        smtputf8=True,
        eightbit=True,
    )
    mid = store.enqueue(queued, now=clock())
    mailstrom(store=store)
    results.wait_final({"ann@ascii.test", "jos\u00e9@other.test"})
    status = store.status(mid)
    assert status.recipient("jos\u00e9@other.test").state is FAILED
    ann = status.recipient("ann@ascii.test")
    assert ann.state is DELIVERED, ann.reason
    [received] = ascii_mx.wait_for_messages(1)
    assert list(received.rcpt_tos) == ["ann@ascii.test"]
    assert "SMTPUTF8" not in received.mail_options
    assert b"charset=utf-8\r\n \r\nContent-Transfer-Encoding" in received.content
    assert "Gr\u00fc\u00dfe".encode() in received.content


def test_message_over_server_size_fails_without_sending(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    small = smtp_server(host="127.0.0.8", port=mx.port, size_limit=1000)
    dns_server.mx("small.test", [(10, "mx.small.test")])
    dns_server.a("mx.small.test", "127.0.0.8")
    ms = mailstrom()
    mid = ms.send_email(
        Email(from_="app@sender.test", to=["max@small.test"], subject="big", text="x" * 5000)
    )
    results.wait_count(1)
    r = ms.query_status(mid).recipient("max@small.test")
    assert r.state is FAILED
    assert r.reply is not None and r.reply.code == 552
    assert "MAIL" not in small.commands


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_stalling_server_times_out_and_defers(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    mx.stall_on = "data"
    ms = mailstrom(timeouts=Timeouts(connect=1, greeting=1, command=0.5, data_init=0.5))
    mid = ms.send_email(hello("slow@example.org"))
    results.wait_count(1, timeout=10)
    r = ms.query_status(mid).recipient("slow@example.org")
    assert r.state is DEFERRED
    assert "within" in r.reason


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_connection_dropped_mid_data_defers(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    mx.drop_on_data = True
    ms = mailstrom()
    mid = ms.send_email(hello("drop@example.org"))
    results.wait_count(1)
    r = ms.query_status(mid).recipient("drop@example.org")
    assert r.state is DEFERRED
    assert not r.uncertain


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_connection_lost_after_dot_is_uncertain_and_retried(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    mx.drop_after_dot = True
    ms = mailstrom()
    mid = ms.send_email(hello("maybe@example.org"))
    results.wait_count(1)
    r = ms.query_status(mid).recipient("maybe@example.org")
    assert r.state is DEFERRED
    assert r.uncertain and r.history[-1].uncertain


def test_uncertain_not_retried_when_configured(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    mx.drop_after_dot = True
    ms = mailstrom(retry_uncertain=False)
    mid = ms.send_email(hello("maybe@example.org"))
    results.wait_count(1)
    r = ms.query_status(mid).recipient("maybe@example.org")
    assert r.state is DELIVERED and r.uncertain


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_connections_are_reused(mailstrom: MakeMailstrom, mx: Any, results: Results) -> None:
    ms = mailstrom(max_per_destination=1)
    for i in range(5):
        ms.send_email(hello(f"user{i}@example.org"))
    results.wait_count(5)
    mx.wait_for_messages(5)
    assert len(mx.messages) == 5
    assert mx.connections == 1
    # Back-to-back transactions need no RSET between them (RFC 5321 §4.1.1.4).
    assert mx.commands.count("RSET") == 0


def test_eight_bit_message_downgraded_for_server_without_8bitmime(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    old = smtp_server(host="127.0.0.9", port=mx.port, eightbitmime=False)
    dns_server.mx("old.test", [(10, "mx.old.test")])
    dns_server.a("mx.old.test", "127.0.0.9")
    raw = (
        "From: app@sender.test\r\nTo: ned@old.test\r\nSubject: 8bit\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGr\u00fc\u00dfe\r\n"
    ).encode()
    ms = mailstrom()
    mid = ms.send_email(raw)
    results.wait_count(1)
    assert ms.query_status(mid).state is DELIVERED
    [received] = old.wait_for_messages(1)
    assert max(received.content) < 128
    assert "BODY=8BITMIME" not in received.mail_options


def test_relay_mode_with_auth(smtp_server: Any, mailstrom: MakeMailstrom, results: Results) -> None:
    relay = smtp_server(host="127.0.0.10", starttls=False, auth=("user", "secret"))
    ms = mailstrom(
        relay=RelayConfig(
            host="127.0.0.10",
            port=relay.port,
            tls=RelayTLS.NONE,
            username="user",
            password="secret",
            allow_plaintext_auth=True,  # loopback test relay without TLS
        )
    )
    mid = ms.send_email(hello("anyone@anywhere.test", "other@elsewhere.test"))
    results.wait_count(2)
    assert ms.query_status(mid).state is DELIVERED
    relay.wait_for_messages(2)
    assert len(relay.messages) == 2


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_restart_over_same_sqlite_file_resumes_deferred_mail(
    tmp_path: Path,
    mailstrom: MakeMailstrom,
    mx: Any,
    results: Results,
    clock: FakeClock,
) -> None:
    path = tmp_path / "queue.db"
    mx.rcpt_replies["resume@example.org"] = ["451 4.3.2 System not accepting", "250 2.1.5 OK"]
    first = mailstrom(store=SQLiteStore(path))
    mid = first.send_email(hello("resume@example.org"))
    results.wait_count(1)
    first.stop(timeout=5)
    first.store.close()
    assert mx.messages == []

    clock.advance(timedelta(hours=1))
    second = mailstrom(store=SQLiteStore(path))
    results.wait_count(2)
    r = second.query_status(mid).recipient("resume@example.org")
    assert r.state is DELIVERED and r.attempts == 2
    mx.wait_for_messages(1)
    assert len(mx.messages) == 1


def test_unknown_id_raises_typed_error(mailstrom: MakeMailstrom) -> None:
    ms = mailstrom()
    with pytest.raises(UnknownMessage):
        ms.query_status("no-such-id")


def test_send_email_does_not_wait_on_the_network(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    mx.stall_on = "greeting"
    ms = mailstrom(timeouts=Timeouts(connect=1, greeting=1))
    ids = [ms.send_email(hello(f"q{i}@example.org")) for i in range(3)]
    # Returned while the server stalls: every message is queued, none final yet.
    assert all(not ms.query_status(i).is_final for i in ids)
    results.wait_count(3, timeout=10)


def test_start_error_is_raised_in_the_callers_thread() -> None:
    class BrokenStore(MemoryStore):
        def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
            raise RuntimeError("cannot listen")

    ms = Mailstrom(Config(helo_name="client.test"), store=BrokenStore())
    with pytest.raises(WorkerError, match="cannot listen"):
        ms.start()
    assert not ms.worker_status.running


def test_worker_status_reports_a_dead_worker(clock: FakeClock) -> None:
    class DyingStore(MemoryStore):
        def lease(self, **kwargs: Any) -> Any:
            raise RuntimeError("disk on fire")

    ms = Mailstrom(Config(helo_name="client.test"), store=DyingStore(), clock=clock)
    ms.start()
    try:
        assert ms.worker.wait_stopped(timeout=5)
        status = ms.worker_status
        assert status.dead and "disk on fire" in (status.error or "")
    finally:
        ms.stop()


async def test_async_facade_delivers(
    dns_server: LoopbackDNS, mx: Any, clock: FakeClock, results: Results
) -> None:
    config = Config(
        helo_name="client.test",
        smtp_port=mx.port,
        dns=dns_server.dns_config,
        allow_loopback=True,
        timeouts=FAST,
    )
    async with AsyncMailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = await ms.send_email(hello("async@example.org"))
        await asyncio.to_thread(results.wait_count, 1)
        status = await ms.query_status(mid)
        assert status.state is DELIVERED
        await mx.await_messages(1)
        assert len(mx.messages) == 1
        assert ms.worker_status.running
    assert not ms.worker_status.running


async def test_async_facade_start_error() -> None:
    class BrokenStore(MemoryStore):
        def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
            raise RuntimeError("cannot listen")

    ms = AsyncMailstrom(Config(helo_name="client.test"), store=BrokenStore())
    with pytest.raises(WorkerError, match="cannot listen"):
        await ms.start()


def test_an_address_smtp_cannot_carry_fails_alone(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    """Hardening #5: one address the SMTP layer cannot encode fails that recipient alone,
    permanently and with a clear reason; the others of its domain are delivered."""
    store = MemoryStore()
    bad = PreparedMessage(  # bypasses prepare(), which refuses such an address today
        data=b"From: a@sender.test\r\n\r\nx\r\n",
        envelope_from="a@sender.test",
        recipients=('"x>y"@example.org', "good@example.org"),
    )
    mid = store.enqueue(bad, now=clock())
    mailstrom(store=store)
    results.wait_count(2)
    status = store.status(mid)
    refused = status.recipient('"x>y"@example.org')
    assert refused.state is FAILED
    assert "cannot be sent" in refused.reason and "x>y" in refused.reason
    assert status.recipient("good@example.org").state is DELIVERED
    [received] = mx.wait_for_messages(1)
    assert received.rcpt_tos == ("good@example.org",)


def test_a_crash_in_delivery_is_recorded_not_lost(
    dns_server: LoopbackDNS, mx: Any, results: Results, clock: FakeClock
) -> None:
    class CrashingRouter(Router):
        async def route(self, domain: str) -> Route:
            raise RuntimeError("a bug in routing")

    store = MemoryStore()
    config = Config(helo_name="client.test", smtp_port=mx.port, dns=dns_server.dns_config)
    with Mailstrom(
        config,
        store=store,
        router=CrashingRouter(config.dns),
        clock=clock,
        on_result=results,
    ) as ms:
        mid = ms.send_email(hello("crash@example.org"))
        results.wait_count(1)
        [r] = store.status(mid).recipients
        assert ms.worker_status.running
    assert r.state is DEFERRED
    assert "internal error" in (r.error or "") and "a bug in routing" in (r.error or "")
    assert mx.messages == []


def test_send_emails_is_all_or_nothing(mailstrom: MakeMailstrom, mx: Any, results: Results) -> None:
    ms = mailstrom()
    with pytest.raises(InvalidAddress):
        ms.send_emails([hello("ok@example.org"), hello("not an address")])
    assert ms.query_recent() == []
    ids = ms.send_emails([hello(f"batch{i}@example.org") for i in range(3)])
    results.wait_count(3)
    assert [ms.query_status(i).state for i in ids] == [DELIVERED] * 3


class ExtendWatchingStore(MemoryStore):
    """A MemoryStore that signals each lease extension, so a test can wait on it."""

    def __init__(self) -> None:
        super().__init__()
        self.extended = threading.Event()

    def extend(self, lease: Lease, *, until: datetime) -> int:
        held = super().extend(lease, until=until)
        self.extended.set()
        return held


def test_heartbeat_keeps_a_slow_delivery_from_being_taken_over(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    lease_for = timedelta(milliseconds=300)
    mx.stall_on = "data"
    store = ExtendWatchingStore()
    mailstrom(store=store, lease_for=lease_for, timeouts=Timeouts(data_init=2))
    mid = store.enqueue(prepare(hello("slow@example.org")), now=clock())
    assert store.extended.wait(5)
    clock.advance(lease_for - timedelta(milliseconds=50))
    for _ in range(2):  # the second extension was surely computed after the advance
        store.extended.clear()
        assert store.extended.wait(5)
    # Another worker looking now, past the first lease's expiry, finds nothing to take.
    assert (
        store.lease(now=clock() + timedelta(milliseconds=100), limit=10, lease_for=lease_for)
        is None
    )
    results.wait_count(1)
    assert store.status(mid).recipient("slow@example.org").state is DEFERRED


QUEUED = [f"queued{i}@example.org" for i in range(10)]
SHORT_LEASE = timedelta(milliseconds=300)


def slow_queue(
    mailstrom: MakeMailstrom, mx: Any, clock: FakeClock, store: MemoryStore
) -> tuple[Mailstrom, list[str]]:
    """:data:`QUEUED` in ``store`` (their message ids returned), then a worker with a
    :data:`SHORT_LEASE` leasing them all on one connection to ``mx``, answered 0.5 s after
    each dot: three transactions handed to the connection (the second's envelope written
    with the first's content, the third's nothing yet), the other seven queued behind
    them. Returns once the first one's content arrived."""
    mx.data_delay = 0.5
    ids = store.enqueue_many([prepare(hello(to)) for to in QUEUED], now=clock())
    ms = mailstrom(store=store, lease_for=SHORT_LEASE, max_connections=1, max_per_destination=1)
    mx.wait_for_received(1)
    return ms, ids


def test_work_of_a_lease_taken_over_is_not_sent_again(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    # The worker's lease expires (its process or the store stalled) and another worker
    # takes its recipients over: what it has not started yet is the other's to send.
    # Before, extend told the heartbeat so and the worker went on to send them all, twice.
    store = MemoryStore()
    ms, _ = slow_queue(mailstrom, mx, clock, store)
    queued = QUEUED
    # The other worker, whose clock is past this worker's leases, takes every recipient.
    other = store.lease(now=clock() + 10 * SHORT_LEASE, limit=100, lease_for=timedelta(hours=1))
    assert other is not None
    assert sorted(r.address for item in other.items for r in item.recipients) == sorted(queued)
    # Mail queued later is this worker's own, and goes out behind what it had started.
    mid = ms.send_email(hello("later@example.org"))
    results.wait_final({"later@example.org"})
    received = [to for m in mx.received for to in m.rcpt_tos]
    # Only the two whose commands went: the third, handed to the connection with none of
    # it written, is taken back there too.
    assert received[:-1] == queued[:2] and received[-1] == "later@example.org", received
    assert store.status(mid).recipient("later@example.org").state is DELIVERED
    # The other worker's lease still holds the rest: nothing was given back under it.
    assert store.lease(now=clock() + 20 * SHORT_LEASE, limit=100, lease_for=SHORT_LEASE) is None


def test_work_of_a_lease_taken_over_is_not_tried_again_when_its_connection_breaks(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    mailstrom: MakeMailstrom,
    mx: Any,
    results: Results,
    clock: FakeClock,
) -> None:
    # As above, and the connection then breaks under the transactions in flight: they
    # would go to the next MX host, and out twice.
    backup = smtp_server(host="127.0.0.2", port=mx.port)
    dns_server.mx("example.org", [(10, "mx.test"), (20, "mx2.test")])
    dns_server.a("mx2.test", backup.host)
    queued = QUEUED
    mx.drop_after_dot_rcpts = {queued[1]}
    store = MemoryStore()
    ms, _ = slow_queue(mailstrom, mx, clock, store)
    other = store.lease(now=clock() + 10 * SHORT_LEASE, limit=100, lease_for=timedelta(hours=1))
    assert other is not None
    ms.send_email(hello("later@example.org"))
    results.wait_final({"later@example.org"})
    # queued0 answered, queued1 cut off after its content, queued2 not sent (no 354 came
    # before the cut) on either host. The connection had taken a message before it broke,
    # so the mail queued later goes on a new connection to the same host.
    assert [to for m in mx.received for to in m.rcpt_tos] == [*queued[:2], "later@example.org"]
    assert backup.received == []
    assert results.all[-1].state is DELIVERED


def test_a_message_cancelled_while_its_lease_waits_is_not_sent(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    # Cancelling a leased message ends its lease in the store; the worker's next beat
    # finds the lease short and gives back what it had not started: the cancelled
    # message stays unsent, the others are leased again and go out once.
    store = MemoryStore()
    ms, ids = slow_queue(mailstrom, mx, clock, store)
    queued = QUEUED
    assert ms.cancel(ids[8]) == 1
    mx.data_delay = 0
    rest = set(queued) - {queued[8]}
    results.wait_final(rest)
    assert sorted(to for m in mx.received for to in m.rcpt_tos) == sorted(rest)
    assert store.status(ids[8]).recipient(queued[8]).state is FAILED


class CommitsBeforeCounted(MemoryStore):
    """A MemoryStore called in threads, as PostgreSQL is, whose first write of results
    returns only after an extend has read the lease it committed to: the worker then
    learns of the commit after its heartbeat did."""

    def __init__(self) -> None:
        super().__init__()
        self.in_process = False
        self.extended = threading.Event()
        self.held: list[int] = []
        self._waited = False

    def record_and_lease(self, results: Any, **kwargs: Any) -> Any:
        out = super().record_and_lease(results, **kwargs)
        if results and not self._waited:
            self._waited = True
            self.extended.clear()
            assert self.extended.wait(10), "no extend while the write was under way"
        return out

    def extend(self, lease: Lease, *, until: datetime) -> int:
        held = super().extend(lease, until=until)
        self.held.append(held)
        self.extended.set()
        return held


def test_a_write_the_heartbeat_sees_first_is_no_lease_taken_over(
    mailstrom: MakeMailstrom,
    mx: Any,
    results: Results,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The first result is committed, and the beat reads the lease one short before the
    # worker has counted that result: nothing was taken over, and nothing may be given
    # back (before, the seven recipients not yet started were, and leased again).
    store = CommitsBeforeCounted()
    with caplog.at_level(logging.WARNING, logger="mailstrom.worker"):
        ms, _ = slow_queue(mailstrom, mx, clock, store)
        results.wait_count(1)
        assert len(QUEUED) - 1 in store.held
        mx.data_delay = 0
        results.wait_final(set(QUEUED))
    assert [to for m in mx.received for to in m.rcpt_tos] == QUEUED
    assert not [r.message for r in caplog.records if "given back" in r.message]
    assert ms.worker_status.metrics.ignored_results == 0


class CutOffStore(MemoryStore):
    """A MemoryStore whose worker's writes fail (``hang=False``), or wait (``hang=True``,
    called in threads as PostgreSQL is), while it is cut off: a database the worker
    cannot reach, or that stopped answering."""

    def __init__(self, *, hang: bool) -> None:
        super().__init__()
        self.in_process = not hang
        self._hang = hang
        self.reachable = threading.Event()
        self.reachable.set()

    def _through(self) -> None:
        if self.reachable.is_set():
            return
        if not self._hang:
            raise StoreError("the database cannot be reached")
        assert self.reachable.wait(20), "never reachable again"

    def extend(self, lease: Lease, *, until: datetime) -> int:
        self._through()
        return super().extend(lease, until=until)

    def record_and_lease(self, results: Any, **kwargs: Any) -> Any:
        self._through()
        return super().record_and_lease(results, **kwargs)

    def record(self, results: Any) -> Any:
        self._through()
        return super().record(results)

    def postpone(self, items: Any, **kwargs: Any) -> int:
        self._through()
        return super().postpone(items, **kwargs)


@pytest.mark.parametrize("hang", [False, True], ids=["failing", "hanging"])
def test_a_worker_cut_off_from_its_store_starts_none_of_its_leased_work(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock, hang: bool
) -> None:
    # Cut off from its store for 7/12 of lease_for, a worker's lease may soon be taken
    # over by a worker whose clock is ahead: what it has not started must wait for the
    # store, or it could go out twice. Before, it went on delivering all of it; with calls
    # that hang, the heartbeat waits in its first extend, and fencing must not wait too.
    store = CutOffStore(hang=hang)
    ms, _ = slow_queue(mailstrom, mx, clock, store)
    queued = QUEUED
    store.reachable.clear()
    # Nothing in flight any more: the two transactions whose commands went done (their
    # results held in memory), the other eight given back (the third of the connection's
    # too, none of it written).
    deadline = time.monotonic() + 10
    while (ms.worker_status.in_flight or len(mx.messages) < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ms.worker_status.in_flight == 0
    assert [to for m in mx.received for to in m.rcpt_tos] == queued[:2]
    mx.data_delay = 0
    store.reachable.set()
    # Given back once the store answers, leased again, and each delivered once.
    results.wait_final(set(queued))
    assert sorted(to for m in mx.received for to in m.rcpt_tos) == sorted(queued)
    assert {r.address for r in results.all if r.state is DELIVERED} == set(queued)


class IdleSignallingStore(MemoryStore):
    """Counts lease calls and signals when the worker asks when work is next due, which it
    does right before it goes to sleep with nothing in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.leases = 0
        self.idle = threading.Event()

    def lease(self, **kwargs: Any) -> Any:
        self.leases += 1
        return super().lease(**kwargs)

    def next_due(self, *, now: datetime) -> datetime | None:
        due = super().next_due(now=now)
        self.idle.set()
        return due


def test_a_clock_that_lags_does_not_stop_the_poll(
    mailstrom: MakeMailstrom, mx: Any, clock: FakeClock, results: Results
) -> None:
    # The worker sleeps until the next due time it read, at most poll_interval, and slept
    # on while the clock had not reached that time (meant for timers that fire a
    # millisecond early). A clock that lags the loop's (stepped back; a test's frozen
    # one) kept it asleep past every poll, and work given back meanwhile without a
    # wake-up waited: with the frozen clock, for ever.
    store = IdleSignallingStore()
    store.enqueue(prepare(hello("given@example.org")), now=clock())
    # Another worker holds it for 200 ms by the clock, which stands still.
    other = store.lease(now=clock(), limit=10, lease_for=timedelta(milliseconds=200))
    assert other is not None
    mailstrom(store=store, poll_interval=0.5)
    assert store.idle.wait(5)  # it read the lease's expiry as the next due time
    time.sleep(0.3)
    store.postpone(list(other.items), until=clock())  # given back, due now, no wake-up
    results.wait_final({"given@example.org"}, timeout=5)


def test_new_mail_wakes_an_idle_worker_without_polling(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    store = IdleSignallingStore()
    # With an hour between polls, only the wake-up from the store explains delivery.
    ms = mailstrom(store=store, poll_interval=3600)
    for n in range(1, 4):
        assert store.idle.wait(5)  # the worker has found nothing and is going to sleep
        store.idle.clear()
        ms.send_email(hello(f"wake{n}@example.org"))
        results.wait_count(n, timeout=10)
    # Per message: the lease that finds it, and a look after the delivery ends and after its
    # result is recorded (either may have made work due), depending on how those interleave.
    # A loop spinning while idle would have leased thousands of times.
    assert store.leases <= 20


@pytest.mark.parametrize("worker_loop", LOOPS)
def test_relay_with_starttls_verified_and_auth(
    smtp_server: Any,
    mailstrom: MakeMailstrom,
    results: Results,
    client_tls_context: ssl.SSLContext,
) -> None:
    relay = smtp_server(host="127.0.0.1", auth=("user", "secret"))
    ms = mailstrom(
        relay=RelayConfig(
            host="127.0.0.1",
            port=relay.port,
            tls=RelayTLS.STARTTLS,
            username="user",
            password="secret",
        ),
        tls_context=client_tls_context,
    )
    mid = ms.send_email(hello("someone@far-away.test"))
    results.wait_count(1)
    r = ms.query_status(mid).recipient("someone@far-away.test")
    assert r.state is DELIVERED
    assert r.tls
    [received] = relay.wait_for_messages(1)
    assert received.tls


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no verify"])
@pytest.mark.parametrize("worker_loop", LOOPS)
def test_relay_with_implicit_tls_heeds_verify(
    smtp_server: Any,
    mailstrom: MakeMailstrom,
    results: Results,
    verify: bool,
) -> None:
    """``relay.verify = false`` leaves the certificate unchecked on port 465 as it does
    with STARTTLS: the implicit relay's certificate was checked whatever it said, so a
    relay with a private CA could not be used at all. ``verify = true`` still checks it."""
    # The system's CAs only (no tls_context): the test CA's certificate does not verify.
    relay = smtp_server(host="127.0.0.1", implicit_tls=True, starttls=False)
    ms = mailstrom(
        relay=RelayConfig(host="127.0.0.1", port=relay.port, tls=RelayTLS.IMPLICIT, verify=verify)
    )
    mid = ms.send_email(hello("someone@far-away.test"))
    results.wait_count(1)
    r = ms.query_status(mid).recipient("someone@far-away.test")
    if verify:
        assert r.state is DEFERRED
        assert r.reason_class is ReasonClass.TLS
        assert relay.messages == []
    else:
        assert r.state is DELIVERED
        assert r.tls
        [received] = relay.wait_for_messages(1)
        assert received.tls


def test_relay_with_wrong_password_defers(
    smtp_server: Any, mailstrom: MakeMailstrom, results: Results
) -> None:
    relay = smtp_server(host="127.0.0.1", starttls=False, auth=("user", "secret"))
    ms = mailstrom(
        relay=RelayConfig(
            host="127.0.0.1",
            port=relay.port,
            tls=RelayTLS.NONE,
            username="user",
            password="no",
            allow_plaintext_auth=True,  # loopback test relay without TLS
        )
    )
    mid = ms.send_email(hello("someone@far-away.test"))
    results.wait_count(1)
    r = ms.query_status(mid).recipient("someone@far-away.test")
    assert r.state is DEFERRED
    assert r.reply is not None
    assert r.reply.code == 535
    assert relay.messages == []


def test_refusing_greetings_move_on_then_defer(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    smtp_server(host="127.0.0.11", port=mx.port, greeting="554 5.7.1 No SMTP service here")
    smtp_server(host="127.0.0.12", port=mx.port, greeting="421 4.3.2 Too busy")
    dns_server.mx("refusing.test", [(10, "mx1.refusing.test"), (20, "mx2.refusing.test")])
    dns_server.a("mx1.refusing.test", "127.0.0.11")
    dns_server.a("mx2.refusing.test", "127.0.0.12")
    dns_server.mx("partly.test", [(10, "mx1.refusing.test"), (20, "mx.test")])
    dns_server.mx("only554.test", [(10, "mx1.refusing.test")])
    ms = mailstrom()
    mid = ms.send_email(hello("ann@refusing.test", "bea@partly.test", "cat@only554.test"))
    results.wait_count(3)
    status = ms.query_status(mid)
    ann = status.recipient("ann@refusing.test")
    assert ann.state is DEFERRED  # every host refused: try again later, not a bounce
    assert ann.reply is not None
    assert ann.reply.code == 421
    # Where the last attempt went: the address too, not only the host's name.
    assert (ann.mx_host, ann.ip) == ("mx2.refusing.test", "127.0.0.12")
    bea = status.recipient("bea@partly.test")
    assert bea.state is DELIVERED  # the 554 greeting moved on to the next host
    assert bea.mx_host == "mx.test"
    cat = status.recipient("cat@only554.test")
    assert cat.state is DEFERRED  # a refused connection never bounces the recipient
    assert cat.reply is not None
    assert cat.reply.code == 554
    assert (cat.mx_host, cat.ip) == ("mx1.refusing.test", "127.0.0.11")


def test_a_backup_that_cannot_be_reached_keeps_the_primary_s_reply(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    """The primary MX host refuses with its greeting, the backup cannot be reached (no
    listener there): the recipient is deferred with what the primary said, the one
    thing a server said about this mail. Was: "cannot connect to 127.0.0.15 port N:
    Connection refused", the backup's, which hid the primary's block-list reply from
    the status, the logs and any bounce that followed."""
    smtp_server(host="127.0.0.14", port=mx.port, greeting="554 5.7.1 Listed at a DNSBL")
    dns_server.mx("backup-down.test", [(10, "mx1.backup-down.test"), (20, "mx2.backup-down.test")])
    dns_server.a("mx1.backup-down.test", "127.0.0.14")
    dns_server.a("mx2.backup-down.test", "127.0.0.15")  # nothing listens there
    ms = mailstrom()
    mid = ms.send_email(hello("ann@backup-down.test"))
    results.wait_count(1)
    ann = ms.query_status(mid).recipient("ann@backup-down.test")
    assert ann.state is DEFERRED
    assert ann.attempts == 1
    assert ann.reply == SMTPReply(code=554, enhanced="5.7.1", text="Listed at a DNSBL"), ann
    assert (ann.mx_host, ann.ip) == ("mx1.backup-down.test", "127.0.0.14")


def test_a_connection_limit_421_is_not_the_reason_when_the_reconnect_fails(
    dns_server: LoopbackDNS,
    mailstrom: MakeMailstrom,
    results: Results,
    mx: Any,
    clock: FakeClock,
) -> None:
    """The server takes two messages on a connection, answers the third's MAIL with its
    421 for that limit and closes; it no longer listens (the proxy in front of it takes
    one connection only), and the new connection for the third is refused. The third is
    deferred with "cannot connect": the 421 said nothing against it. Was: deferred with
    "421 4.7.0 Message limit of this connection reached", a reply given after other
    mail went, in the status and any bounce."""
    mx.messages_per_connection = 2
    with contextlib.closing(TCPProxy((mx.host, mx.port), "127.0.0.16", accept=1)) as proxy:
        dns_server.mx("limit-down.test", [(10, "mx1.limit-down.test")])
        dns_server.a("mx1.limit-down.test", proxy.host)
        store = MemoryStore()
        to = [f"u{i}@limit-down.test" for i in range(3)]
        with Mailstrom(
            Config(helo_name="client.test", dns=dns_server.dns_config),
            store=store,
            clock=clock,
            worker=None,
        ) as queue_only:
            ids = queue_only.send_emails([hello(address) for address in to])
        ms = mailstrom(store, smtp_port=proxy.port, max_per_destination=1)
        results.wait_count(len(to))
        statuses = [ms.query_status(mid).recipients[0] for mid in ids]
    [third] = [s for s in statuses if s.state is not DELIVERED]
    assert third.state is DEFERRED and third.attempts == 1, third
    assert third.reply is None, third
    assert third.error is not None and "cannot connect" in third.error, third
    assert len(mx.messages) == 2


def test_a_refusal_is_recorded_as_the_server_s_reply(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    """Was: a refusal that ends the session (a greeting, a 421 to RCPT) was recorded as a
    reply whose text was mailstrom's own sentence around the server's reply: "mx.test
    refused RCPT TO:<bea@...>: 421 4.7.0 ...", in the status of every recipient (naming
    another one) and as the Diagnostic-Code of bounces; and the reply classes read the
    host's name as the server's words (a Barracuda-hosted MX made a busy greeting a
    block-list refusal)."""
    smtp_server(host="127.0.0.13", port=mx.port, greeting="421 Too busy")
    dns_server.mx("hosted.test", [(10, "d1.ess.barracudanetworks.test")])
    dns_server.a("d1.ess.barracudanetworks.test", "127.0.0.13")
    mx.rcpt_replies["bea@example.org"] = "421 4.7.0 Too many errors, closing"
    ms = mailstrom()
    busy = ms.send_email(hello("ann@hosted.test"))
    closing = ms.send_email(hello("abe@example.org", "bea@example.org"))
    results.wait_count(3)
    ann = ms.query_status(busy).recipient("ann@hosted.test")
    assert ann.state is DEFERRED
    assert ann.reply == SMTPReply(code=421, text="Too busy")
    assert ann.reason_class is ReasonClass.SYSTEM
    for r in ms.query_status(closing).recipients:
        assert r.state is DEFERRED
        assert r.reply == SMTPReply(code=421, enhanced="4.7.0", text="Too many errors, closing")
        assert r.mx_host == "mx.test"


def test_recipients_answered_before_a_421_to_rcpt_keep_their_answers(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results, mx: Any
) -> None:
    """Was: a 421 to one RCPT ("closing") deferred every recipient of the transaction with
    it, those the server had already refused too: abe's 550 5.1.1 was lost, so he was
    retried for days instead of failing at once and being suppressed. The recipients not
    answered yet still go on to the next host at once."""
    backup = smtp_server(host="127.0.0.14", port=mx.port)
    dns_server.mx("cut.test", [(10, "mx.test"), (20, "mx2.cut.test")])
    dns_server.a("mx2.cut.test", backup.host)
    mx.rcpt_replies["abe@cut.test"] = "550 5.1.1 No such user"
    mx.rcpt_replies["bea@cut.test"] = "421 4.7.0 Too many errors, closing"
    ms = mailstrom()
    mid = ms.send_email(hello("abe@cut.test", "bea@cut.test", "cal@cut.test"))
    results.wait_count(3)
    status = ms.query_status(mid)
    abe = status.recipient("abe@cut.test")
    assert abe.state is FAILED
    assert abe.reply == SMTPReply(code=550, enhanced="5.1.1", text="No such user")
    assert ms.suppressed("abe@cut.test") is not None
    assert {status.recipient(a).state for a in ("bea@cut.test", "cal@cut.test")} == {DELIVERED}
    [message] = backup.wait_for_messages(1)
    assert message.rcpt_tos == ("bea@cut.test", "cal@cut.test")


def test_work_of_a_lease_taken_over_while_the_worker_stalled_is_not_sent(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    # The worker stalls past its lease (a stopped process, a blocked loop: here a sleep on
    # its loop), and another worker takes the lease over meanwhile. When it resumes, the
    # replies that came in the stall let its session start the next transaction before
    # the heartbeat (a timer, run after them) finds the lease taken: it went out twice.
    store = MemoryStore()
    ms, _ = slow_queue(mailstrom, mx, clock, store)
    loop = ms.worker._loop
    assert loop is not None
    stalled = threading.Event()

    def stall() -> None:
        stalled.set()
        time.sleep(10 * SHORT_LEASE.total_seconds())  # blocks the worker's loop

    loop.call_soon_threadsafe(stall)
    assert stalled.wait(5)
    other = store.lease(now=clock() + 10 * SHORT_LEASE, limit=100, lease_for=timedelta(hours=1))
    assert other is not None
    taken = {r.address for item in other.items for r in item.recipients}
    assert taken == set(QUEUED)
    mid = ms.send_email(hello("later@example.org"))
    results.wait_final({"later@example.org"})
    received = [to for m in mx.received for to in m.rcpt_tos]
    # The three transactions on the wire before the stall, then only the later mail.
    assert received[:-1] == QUEUED[:3] and received[-1] == "later@example.org", received
    assert store.status(mid).recipient("later@example.org").state is DELIVERED
    assert store.lease(now=clock() + 20 * SHORT_LEASE, limit=100, lease_for=SHORT_LEASE) is None


def test_a_stall_short_of_the_lease_starts_nothing_a_worker_ahead_may_have_taken(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    # Another worker whose clock is ahead of this one's, by less than the skew that stops
    # it leasing (lease_for / 3), takes a lease over that much before this worker's own
    # account of it runs out: fencing allows for that, the check after a stall did not.
    # A worker that stalled into that margin resumed and started the lease's next
    # transactions from the replies that came meanwhile: they went out twice.
    lease_for = timedelta(milliseconds=600)
    ahead = 0.7 * lease_for.total_seconds() / 3  # within the tolerated skew
    store = MemoryStore()
    store.enqueue_many([prepare(hello(to)) for to in QUEUED], now=clock())
    mx.data_delay = 0.15  # the first reply comes in during the stall
    ms = mailstrom(store=store, lease_for=lease_for, max_connections=1, max_per_destination=1)
    worker = ms.worker
    assert isinstance(worker, Worker)
    loop = worker._loop
    assert loop is not None
    resumed = threading.Event()
    taken: set[str] = set()

    def stall() -> None:
        [state] = worker._leases.values()
        expires = state.held_until  # loop time, by its last confirmed extension
        time.sleep(max(0.0, expires - ahead - loop.time()))
        # The other worker's clock reads past the lease now: it takes it over.
        other = store.lease(
            now=clock() + lease_for + timedelta(milliseconds=1),
            limit=100,
            lease_for=timedelta(hours=1),
        )
        assert other is not None
        taken.update(r.address for item in other.items for r in item.recipients)
        time.sleep(max(0.0, expires - 0.02 - loop.time()))  # resumes short of it
        resumed.set()

    mx.wait_for_received(1)
    loop.call_soon_threadsafe(stall)
    assert resumed.wait(5)
    assert taken and taken <= set(QUEUED)
    mid = ms.send_email(hello("later@example.org"))
    results.wait_final({"later@example.org"})
    received = [to for m in mx.received for to in m.rcpt_tos]
    # What was on the wire at the stall, then only the later mail.
    assert received[-1] == "later@example.org"
    assert not set(received[3:-1]) & taken, received
    assert store.status(mid).recipient("later@example.org").state is DELIVERED

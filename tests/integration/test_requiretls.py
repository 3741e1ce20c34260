"""REQUIRETLS and ``TLS-Required: No`` (RFC 8689) end to end, against aiosmtpd receivers
(trustme and self-signed certificates) and the loopback DNS server."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailstrom import DSN, Config, Email, RecipientState, Return
from mailstrom.client import Mailstrom
from mailstrom.status import ReasonClass
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.base import Store
from mailstrom.testing.smtp import ReceivingServer, start_receiving_server
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.certs import self_signed, server_context, spki_sha256
from tests.support.delivery import FAST, FakeClock, Results

MakeMailstrom = Callable[..., Mailstrom]


@pytest.fixture
def results() -> Results:
    return Results()


@pytest.fixture
def receivers() -> Iterator[Callable[..., ReceivingServer]]:
    started: list[ReceivingServer] = []

    def start(context: ssl.SSLContext, **options: Any) -> ReceivingServer:
        server = start_receiving_server(context, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def mailstrom(
    dns_server: LoopbackDNS, results: Results, client_tls_context: ssl.SSLContext
) -> Iterator[MakeMailstrom]:
    started: list[Mailstrom] = []

    def make(port: int, store: Store | None = None, **overrides: Any) -> Mailstrom:
        options: dict[str, Any] = {
            "helo_name": "client.test",
            "smtp_port": port,
            # Trusted to validate: REQUIRETLS takes only an MX host that DNSSEC (or
            # MTA-STS) vouches for (RFC 8689 §4.2.1).
            "dns": dataclasses.replace(dns_server.dns_config, dnssec=True),
            "allow_loopback": True,
            "timeouts": FAST,
            "poll_interval": 0.5,
            "tls_context": client_tls_context,
        }
        ms = Mailstrom(
            Config(**(options | overrides)),
            store=store if store is not None else MemoryStore(),
            clock=FakeClock(),
            on_result=results,
        )
        ms.start()
        started.append(ms)
        return ms

    yield make
    for ms in started:
        ms.stop(timeout=5)
        ms.store.close()  # a store passed in is the caller's (the test's) to close


def secured(to: str, **kwargs: Any) -> Email:
    return Email(
        from_="a@sender.test", to=[to], subject="Hi", text="Hello", require_tls=True, **kwargs
    )


@pytest.fixture
def route(dns_server: LoopbackDNS) -> Callable[[str], None]:
    def set_route(ip: str) -> None:
        dns_server.mx("example.org", [(10, "mx.test")])
        dns_server.a("mx.test", ip)
        dns_server.authenticated(everything=True)

    return set_route


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_requiretls_honoured_sends_the_parameter_over_verified_tls(
    smtp_server: Any,
    route: Any,
    mailstrom: MakeMailstrom,
    results: Results,
    tmp_path: Path,
    kind: str,
) -> None:
    mx = smtp_server(requiretls=True)
    route(mx.host)
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "q.db")
    ms = mailstrom(mx.port, store=store)  # default policy: opportunistic
    mid = ms.send_email(secured("bob@example.org"))
    results.wait_final({"bob@example.org"})
    bob = ms.query_status(mid).recipient("bob@example.org")
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "verify"  # upgraded for REQUIRETLS
    [received] = mx.wait_for_messages(1)
    assert received.tls and "REQUIRETLS" in received.mail_options


def test_requiretls_not_offered_fails_with_5_7_30(
    smtp_server: Any, route: Any, mailstrom: MakeMailstrom, results: Results
) -> None:
    mx = smtp_server()  # TLS with a valid certificate, but no REQUIRETLS
    route(mx.host)
    ms = mailstrom(mx.port)
    mid = ms.send_email(secured("bob@example.org"))
    plain = ms.send_email(Email(from_="a@sender.test", to=["ann@example.org"], text="x"))
    results.wait_final({"bob@example.org", "ann@example.org"})
    bob = ms.query_status(mid).recipient("bob@example.org")
    assert bob.state is RecipientState.FAILED
    assert bob.reply is not None and bob.reply.enhanced == "5.7.30"
    assert bob.reason_class is ReasonClass.TLS
    ann = ms.query_status(plain).recipient("ann@example.org")
    assert ann.state is RecipientState.DELIVERED
    [received] = mx.wait_for_messages(1)
    assert list(received.rcpt_tos) == ["ann@example.org"]


def test_requiretls_not_offered_by_the_first_mx_goes_to_the_next(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results
) -> None:
    """RFC 8689 §4.2.1: a host without REQUIRETLS is passed over, not the message failed;
    it fails with 5.7.30 only when no MX host offers it (the test above)."""
    primary = smtp_server()  # TLS with a valid certificate, but no REQUIRETLS
    backup = smtp_server(host="127.0.0.2", port=primary.port, requiretls=True)
    dns_server.mx("example.org", [(10, "mx1.test"), (20, "mx2.test")])
    dns_server.a("mx1.test", primary.host)
    dns_server.a("mx2.test", backup.host)
    dns_server.authenticated(everything=True)
    ms = mailstrom(primary.port)
    mid = ms.send_email(secured("bob@example.org"))
    plain = ms.send_email(Email(from_="a@sender.test", to=["ann@example.org"], text="x"))
    results.wait_final({"bob@example.org", "ann@example.org"})
    bob = ms.query_status(mid).recipient("bob@example.org")
    assert bob.state is RecipientState.DELIVERED, bob
    [received] = backup.wait_for_messages(1)
    assert received.tls and "REQUIRETLS" in received.mail_options
    assert ms.query_status(plain).recipient("ann@example.org").state is RecipientState.DELIVERED
    assert [list(m.rcpt_tos) for m in primary.messages] == [["ann@example.org"]]


def test_a_host_without_requiretls_between_keeps_the_first_host_s_reply(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results
) -> None:
    """The first MX host answers its greeting with a 451, the second offers no
    REQUIRETLS (no reply to go by), the third cannot be reached: the message is deferred
    with the 451, the one thing a server said against it. Was: "cannot connect", as the
    second host's failure, having no reply, let the third's replace the 451."""
    first = smtp_server(host="127.0.0.31", greeting="451 4.3.2 Try again later")
    second = smtp_server(host="127.0.0.32", port=first.port)  # no REQUIRETLS
    dns_server.mx("example.org", [(10, "mx1.test"), (20, "mx2.test"), (30, "mx3.test")])
    dns_server.a("mx1.test", first.host)
    dns_server.a("mx2.test", second.host)
    dns_server.a("mx3.test", "127.0.0.33")  # nothing listens there
    dns_server.authenticated(everything=True)
    ms = mailstrom(first.port)
    mid = ms.send_email(secured("bob@example.org"))
    results.wait_count(1)
    bob = ms.query_status(mid).recipient("bob@example.org")
    assert bob.state is RecipientState.DEFERRED, bob
    assert bob.reply is not None and (bob.reply.code, bob.reply.enhanced) == (451, "4.3.2"), bob
    assert (bob.mx_host, bob.ip) == ("mx1.test", first.host)
    assert second.connections == 1 and second.messages == []


def test_requiretls_to_a_domain_whose_policy_is_none_fails_with_5_7_30(
    smtp_server: Any, route: Any, mailstrom: MakeMailstrom, results: Results
) -> None:
    mx = smtp_server(requiretls=True)
    route(mx.host)
    ms = mailstrom(mx.port, tls_domains={"example.org": "none"})
    mid = ms.send_email(secured("bob@example.org"))
    results.wait_final({"bob@example.org"})
    bob = ms.query_status(mid).recipient("bob@example.org")
    assert bob.state is RecipientState.FAILED
    assert bob.reply is not None and bob.reply.enhanced == "5.7.30"
    assert mx.connections == 0


def test_requiretls_with_an_unverifiable_certificate_is_not_sent(
    smtp_server: Any, route: Any, mailstrom: MakeMailstrom, results: Results
) -> None:
    mx = smtp_server(requiretls=True)
    route(mx.host)
    ms = mailstrom(mx.port, tls_context=ssl.create_default_context())  # trustme unknown
    mid = ms.send_email(secured("bob@example.org"))
    results.wait_final({"bob@example.org"})
    bob = ms.query_status(mid).recipient("bob@example.org")
    assert bob.state is RecipientState.DEFERRED and bob.reason_class is ReasonClass.TLS
    assert mx.messages == []


@pytest.mark.parametrize("level", ["opportunistic", "dane"])
def test_tls_required_no_delivers_where_dane_would_defer(
    dns_server: LoopbackDNS,
    receivers: Any,
    mailstrom: MakeMailstrom,
    results: Results,
    tmp_path: Path,
    level: str,
) -> None:
    cert, key = self_signed("mx.test")
    other, _ = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    dns_server.tlsa("_25._tcp.mx.test", (3, 1, 1, spki_sha256(other)))  # no match
    dns_server.authenticated(everything=True)
    ms = mailstrom(mx.port, tls=level)
    relaxed = ms.send_email(
        Email(
            from_="a@sender.test",
            to=["bob@example.org"],
            text="x",
            headers={"TLS-Required": "No"},
        )
    )
    strict = ms.send_email(Email(from_="a@sender.test", to=["ann@example.org"], text="x"))
    results.wait_final({"bob@example.org", "ann@example.org"})
    bob = ms.query_status(relaxed).recipient("bob@example.org")
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "opportunistic"
    ann = ms.query_status(strict).recipient("ann@example.org")
    assert ann.state is RecipientState.DEFERRED and ann.history[-1].tls_policy == "dane"
    [received] = mx.wait_for_messages(1)
    assert list(received.rcpt_tos) == ["bob@example.org"]


def test_the_bounce_of_a_requiretls_message_requires_tls_and_returns_headers_only(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results
) -> None:
    """RFC 8689 §5: a notice about a REQUIRETLS message carries its headers, so it is
    sent with REQUIRETLS as well, and as if RET=HDRS was asked for even with RET=FULL."""
    mx = smtp_server(requiretls=True)
    mx.rcpt_replies["nobody@example.org"] = "550 5.1.1 No such user"
    dns_server.a("mx.test", mx.host)
    for domain in ("example.org", "sender.test"):
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.authenticated(everything=True)
    ms = mailstrom(mx.port)
    ms.send_email(secured("nobody@example.org", dsn=DSN(ret=Return.FULL)))
    results.wait_final({"nobody@example.org", "a@sender.test"})
    [notice] = mx.wait_for_messages(1)
    assert notice.mail_from == "<>" and list(notice.rcpt_tos) == ["a@sender.test"]
    assert notice.tls and "REQUIRETLS" in notice.mail_options
    assert b"text/rfc822-headers" in notice.content
    assert b"Hello" not in notice.content  # the body stays out


def test_requiretls_is_deferred_when_an_mx_host_that_may_offer_it_was_unreachable(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results
) -> None:
    """RFC 8689 §4.2.1: the message fails with 5.7.30 when no MX host offers REQUIRETLS.
    A primary that could not be reached this time said nothing about it: the recipient
    waits for it, however the last host tried answered."""
    backup = smtp_server()  # TLS with a valid certificate, but no REQUIRETLS
    dns_server.mx("example.org", [(10, "mx1.test"), (20, "mx2.test")])
    dns_server.a("mx1.test", "127.0.0.3")  # nobody listens there: connection refused
    dns_server.a("mx2.test", backup.host)
    dns_server.authenticated(everything=True)
    ms = mailstrom(backup.port)
    mid = ms.send_email(secured("bob@example.org"))
    results.wait_final({"bob@example.org"})
    bob = ms.query_status(mid).recipient("bob@example.org")
    assert bob.state is RecipientState.DEFERRED, bob
    assert backup.messages == []

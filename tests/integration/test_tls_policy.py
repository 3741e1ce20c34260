"""Per-destination TLS policy end to end: the per-domain table and remembered broken TLS,
against aiosmtpd (trustme certificates) and the loopback DNS server."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from mailstrom import Config, Email, RecipientState, TLSPolicy
from mailstrom.client import Mailstrom
from mailstrom.status import ReasonClass
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.base import Store
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import FAST, FakeClock, Results

MakeMailstrom = Callable[..., Mailstrom]


@pytest.fixture
def results() -> Results:
    return Results()


@pytest.fixture
def mailstrom(
    dns_server: LoopbackDNS, results: Results, client_tls_context: ssl.SSLContext
) -> Iterator[MakeMailstrom]:
    started: list[Mailstrom] = []

    def make(port: int, store: Store | None = None, **overrides: Any) -> Mailstrom:
        options: dict[str, Any] = {
            "helo_name": "client.test",
            "smtp_port": port,
            "dns": dns_server.dns_config,
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


def hello(to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject="Hi", text="Hello")


def route(dns: LoopbackDNS, domain: str, host: str, ip: str) -> None:
    dns.mx(domain, [(10, host)])
    dns.a(host, ip)


def test_a_table_entry_none_sends_in_plaintext_despite_a_verify_default(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results
) -> None:
    mx = smtp_server()
    route(dns_server, "legacy.example", "mx.test", mx.host)
    ms = mailstrom(mx.port, tls=TLSPolicy.VERIFY, tls_domains={"legacy.example": "none"})
    mid = ms.send_email(hello("bob@legacy.example"))
    results.wait_final({"bob@legacy.example"})
    [received] = mx.wait_for_messages(1)
    assert not received.tls
    bob = ms.query_status(mid).recipient("bob@legacy.example")
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "none"


def test_a_table_entry_verify_defers_a_certificate_for_another_name(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results
) -> None:
    mx = smtp_server()
    # The certificate names *.test; this MX is called mx.example.net.
    route(dns_server, "bank.example", "mx.example.net", mx.host)
    route(dns_server, "other.example", "mx.example.net", mx.host)
    ms = mailstrom(mx.port, tls_domains={"*.example": "opportunistic", "bank.example": "verify"})
    strict = ms.send_email(hello("ann@bank.example"))
    loose = ms.send_email(hello("bob@other.example"))
    results.wait_final({"ann@bank.example", "bob@other.example"})
    ann = ms.query_status(strict).recipient("ann@bank.example")
    assert ann.state is RecipientState.DEFERRED
    assert ann.reason_class is ReasonClass.TLS
    assert "certificate" in ann.reason
    assert ann.history[-1].tls_policy == "verify"
    bob = ms.query_status(loose).recipient("bob@other.example")
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "opportunistic"
    [received] = mx.wait_for_messages(1)
    assert list(received.rcpt_tos) == ["bob@other.example"]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_broken_tls_is_remembered_one_connection_per_attempt_after_the_first(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    mailstrom: MakeMailstrom,
    results: Results,
    tmp_path: Any,
    kind: str,
) -> None:
    mx = smtp_server(tls_broken=True)
    route(dns_server, "example.org", "mx.test", mx.host)
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "q.db")
    # One message per connection: every message opens its own.
    ms = mailstrom(mx.port, store=store, max_messages_per_connection=1)
    first = ms.send_email(hello("a@example.org"))
    results.wait_final({"a@example.org"})
    assert mx.connections == 2  # TLS failed, then plaintext on a new connection
    assert "mx.test" in store.tls_broken(now=FakeClock()())
    second = ms.send_email(hello("b@example.org"))
    results.wait_final({"b@example.org"})
    assert mx.connections == 3  # straight to plaintext
    a = ms.query_status(first).recipient("a@example.org")
    b = ms.query_status(second).recipient("b@example.org")
    assert a.state is b.state is RecipientState.DELIVERED
    assert not a.tls and not b.tls
    assert b.history[-1].tls_policy == "none"


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_broken_tls_noted_by_a_clock_since_set_back_is_not_kept_for_the_step(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    mailstrom: MakeMailstrom,
    results: Results,
    tmp_path: Any,
    kind: str,
) -> None:
    """A host's broken TLS noted while the clock was a day ahead (an hour's memory, the
    default) ends a day and an hour after the clock was set right: every worker sharing
    the store sent the host's mail in plaintext for that day, although it offers
    STARTTLS."""
    mx = smtp_server()
    route(dns_server, "example.org", "mx.test", mx.host)
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "q.db")
    ahead = FakeClock()() + timedelta(days=1)
    store.note_tls_broken("mx.test", until=ahead + timedelta(hours=1), reason="x", now=ahead)
    ms = mailstrom(mx.port, store=store)
    mid = ms.send_email(hello("a@example.org"))
    results.wait_final({"a@example.org"})
    [received] = mx.wait_for_messages(1)
    assert received.tls
    assert ms.query_status(mid).recipient("a@example.org").history[-1].tls_policy != "none"


def test_broken_tls_is_never_remembered_into_plaintext_under_verify(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results
) -> None:
    mx = smtp_server(tls_broken=True)
    route(dns_server, "example.org", "mx.test", mx.host)
    store = MemoryStore()
    ms = mailstrom(mx.port, store=store, tls=TLSPolicy.VERIFY)
    mid = ms.send_email(hello("a@example.org"))
    results.wait_final({"a@example.org"})
    assert ms.query_status(mid).recipient("a@example.org").state is RecipientState.DEFERRED
    assert store.tls_broken(now=FakeClock()()) == {}
    assert mx.messages == []


def test_a_server_demanding_starttls_defers_the_plaintext_after_a_failed_handshake(
    smtp_server: Any, dns_server: LoopbackDNS, mailstrom: MakeMailstrom, results: Results
) -> None:
    """The opportunistic fallback to plaintext met "530 Must issue a STARTTLS command
    first" (RFC 3207 §4): that refuses this session, not the mail, which the server takes
    over TLS. It bounced, and so did every message to the host while its TLS was
    remembered broken (one handshake that timed out made it so for an hour)."""
    mx = smtp_server(tls_broken=True, require_starttls=True)
    route(dns_server, "example.org", "mx.test", mx.host)
    ms = mailstrom(mx.port, max_messages_per_connection=1)
    first = ms.send_email(hello("a@example.org"))
    results.wait_final({"a@example.org"})
    # The host is now remembered broken: this one goes in plaintext at once.
    second = ms.send_email(hello("b@example.org"))
    results.wait_final({"b@example.org"})
    for mid, address in ((first, "a@example.org"), (second, "b@example.org")):
        status = ms.query_status(mid).recipient(address)
        assert status.state is RecipientState.DEFERRED, status.reason
        assert status.reply is not None and status.reply.code == 530
    assert mx.messages == []

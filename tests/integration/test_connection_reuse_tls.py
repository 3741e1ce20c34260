"""Which idle connection the mail of a second recipient domain may reuse, end to end: the
MX records of ``example.org`` and ``example.net`` name one aiosmtpd receiver (through the
loopback DNS server), ``example.org`` takes what TLS the receiver gives, and
``example.net``'s policy asks for more. The connection left idle by ``example.org`` must
not carry ``example.net``'s mail: a new one is opened under its policy, and refused."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailstrom import Config, Email, RecipientState
from mailstrom.client import Mailstrom
from mailstrom.status import RecipientStatus
from mailstrom.stores import MemoryStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import FAST, FakeClock, Results

Send = Callable[[str], RecipientStatus]


@pytest.fixture
def worker(
    dns_server: LoopbackDNS, client_tls_context: ssl.SSLContext
) -> Iterator[Callable[..., Send]]:
    """Start a worker delivering to ``port`` whose connections stay idle long enough for
    the next message; the function it returns sends one message and returns the
    recipient's status once final, so that messages go one after the other."""
    started: list[Mailstrom] = []

    def start(port: int, **overrides: Any) -> Send:
        results = Results()
        options: dict[str, Any] = {
            "helo_name": "client.test",
            "smtp_port": port,
            "dns": dataclasses.replace(dns_server.dns_config, dnssec=True),
            "allow_loopback": True,
            "timeouts": FAST,
            "poll_interval": 0.5,
            "tls_context": client_tls_context,
            "connection_idle": 60.0,
        }
        ms = Mailstrom(
            Config(**(options | overrides)),
            store=MemoryStore(),
            clock=FakeClock(),
            on_result=results,
        )
        ms.start()
        started.append(ms)

        def send(to: str) -> RecipientStatus:
            mid = ms.send_email(Email(from_="a@sender.test", to=[to], subject="Hi", text="Hi"))
            results.wait_final({to})
            return ms.query_status(mid).recipient(to)

        return send

    yield start
    for ms in started:
        ms.stop(timeout=5)


def one_mx(dns: LoopbackDNS, name: str, ip: str) -> None:
    """Both domains → MX ``name`` → ``ip``."""
    for domain in ("example.org", "example.net"):
        dns.mx(domain, [(10, name)])
    dns.a(name, ip)


def second_domain_refused(send: Send, mx: Any) -> RecipientStatus:
    assert send("bob@example.org").state is RecipientState.DELIVERED
    opened = mx.connections
    carol = send("carol@example.net")
    assert carol.state is RecipientState.DEFERRED
    assert mx.connections == opened + 1  # its own connection, not example.org's idle one
    assert [m.envelope_to for m in mx.messages] == [["bob@example.org"]]
    return carol


def test_a_plaintext_connection_does_not_carry_a_verify_domains_mail(
    smtp_server: Any, dns_server: LoopbackDNS, worker: Any
) -> None:
    mx = smtp_server(starttls=False)
    one_mx(dns_server, "mx.test", mx.host)
    carol = second_domain_refused(worker(mx.port, tls_domains={"example.net": "verify"}), mx)
    assert "STARTTLS" in carol.reason


def test_a_connection_after_a_failed_handshake_does_not_carry_a_required_domains_mail(
    smtp_server: Any, dns_server: LoopbackDNS, worker: Any
) -> None:
    # example.org's mail went in plaintext after the handshake failed (opportunistic).
    mx = smtp_server(tls_broken=True)
    one_mx(dns_server, "mx.test", mx.host)
    second_domain_refused(worker(mx.port, tls_domains={"example.net": "required"}), mx)


def test_an_unverified_tls_connection_does_not_carry_a_verify_domains_mail(
    smtp_server: Any, dns_server: LoopbackDNS, worker: Any
) -> None:
    # The receiver's certificate does not name other.test: fine for opportunistic TLS.
    mx = smtp_server()
    one_mx(dns_server, "other.test", mx.host)
    carol = second_domain_refused(worker(mx.port, tls_domains={"example.net": "verify"}), mx)
    assert "not valid for 'other.test'" in carol.reason

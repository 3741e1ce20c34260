"""``max_connections`` bounds every open socket, against a real aiosmtpd peer that counts
the connections it holds open: those being opened, in use, kept idle for reuse and closing
(QUIT sent, its reply slow to come) alike — over the worker and per shaping rule."""

from __future__ import annotations

from typing import Any

from mailstrom import DestinationRule, Email, Mailstrom, ShapingConfig
from mailstrom.stores import MemoryStore
from mailstrom.testing.smtp import ReceivingServer
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import Results, loopback_config

QUIT_DELAY = 0.1
"""Seconds the peer takes to answer QUIT: each close keeps its socket open that long."""


def hello(to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject="Hi", text="Hello")


def slow_closing_server(smtp_server: Any, host: str) -> ReceivingServer:
    # Plaintext: the server counts a connection closed when it closes it after the 221;
    # a TLS close would wait for the client's close_notify, a moment after the client
    # counted it closed and may have opened the next one.
    mx: ReceivingServer = smtp_server(host=host, starttls=False)
    mx.quit_delay = QUIT_DELAY
    return mx


def destinations(dns: LoopbackDNS, mx: ReceivingServer, count: int, suffix: str) -> list[str]:
    """``count`` recipient domains, each with an MX host of its own name (so that no
    connection kept for one is reused by another) on ``mx``."""
    domains = [f"d{i}.{suffix}" for i in range(count)]
    for i, domain in enumerate(domains):
        dns.mx(domain, [(10, f"mx{i}.{suffix}")])
        dns.a(f"mx{i}.{suffix}", mx.host)
    return domains


def deliver(config: Any, mx: ReceivingServer, emails: list[Email]) -> None:
    ms = Mailstrom(config, store=MemoryStore(), on_result=Results(), worker="thread")
    ms.start()
    try:
        ms.send_emails(emails)
        mx.wait_for_messages(len(emails), timeout=20)
    finally:
        ms.stop(timeout=5)


def test_idle_and_closing_connections_count_against_max_connections(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    mx = slow_closing_server(smtp_server, "127.0.0.41")
    domains = destinations(dns_server, mx, 6, "limit.test")
    # Two messages a connection: connections close (slowly) while others are still wanted.
    config = loopback_config(dns_server, mx.port, max_connections=2, max_messages_per_connection=2)
    deliver(config, mx, [hello(f"r{i}@{d}") for d in domains for i in range(4)])
    assert mx.peak_connections <= 2
    assert len(mx.messages) == 24


def test_idle_and_closing_connections_count_against_a_rule(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    mx = slow_closing_server(smtp_server, "127.0.0.42")
    domains = destinations(dns_server, mx, 4, "rule.test")
    rule = DestinationRule(match="*.rule.test", max_connections=1, messages_per_connection=2)
    shaping = ShapingConfig(rules=(rule,), provider_defaults=False, refresh=0.2)
    config = loopback_config(dns_server, mx.port, max_connections=10, shaping=shaping)
    deliver(config, mx, [hello(f"r{i}@{d}") for d in domains for i in range(3)])
    assert mx.peak_connections <= 1
    assert len(mx.messages) == 12

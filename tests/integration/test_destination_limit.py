"""``max_per_destination`` bounds the sessions to a recipient domain as a whole: its mail
that asks for REQUIRETLS, or carries ``TLS-Required: No`` (RFC 8689), travels in queues of
its own, and those share the domain's sessions, taking turns. A server that limits
connections per client address (Gmail, Outlook, Postfix's
``smtpd_client_connection_count_limit``) sees no more than the limit."""

from __future__ import annotations

import dataclasses
import ssl
from typing import Any

from mailstrom import Config, Email, Mailstrom, RecipientState
from mailstrom.stores import MemoryStore
from mailstrom.testing.smtp import ReceivingServer
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import Results, loopback_config


def _mail(to: str, kind: str) -> Email:
    extra: dict[str, Any] = {}
    if kind == "requiretls":
        extra["require_tls"] = True
    elif kind == "tls-optional":
        extra["headers"] = {"TLS-Required": "No"}
    return Email(from_="a@sender.test", to=[to], subject=kind, text="x", **extra)


def _slow_domain(
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    client_tls_context: ssl.SSLContext,
    **overrides: Any,
) -> tuple[ReceivingServer, Config]:
    """example.org's MX, taking a while over each message (so that sessions overlap),
    and a Config delivering there."""
    mx = smtp_server(requiretls=True)
    mx.data_delay = 0.05
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    # REQUIRETLS takes an MX host that DNSSEC vouches for (RFC 8689 §4.2.1); under
    # "verify" every kind of mail goes over the same kind of connection.
    dns_server.authenticated(everything=True)
    config = loopback_config(
        dns_server,
        mx.port,
        dns=dataclasses.replace(dns_server.dns_config, dnssec=True),
        tls="verify",
        tls_context=client_tls_context,
        max_connections=20,
        **overrides,
    )
    return mx, config


def test_the_tls_variants_of_one_domain_share_its_sessions(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, client_tls_context: ssl.SSLContext
) -> None:
    # With this much mail queued at once, every queue of the domain wants two sessions.
    mx, config = _slow_domain(smtp_server, dns_server, client_tls_context, max_per_destination=2)
    per_kind = 8
    kinds = ("plain", "requiretls", "tls-optional")
    addresses = {f"{kind}{n}@example.org" for kind in kinds for n in range(per_kind)}
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        ms.send_emails(
            _mail(f"{kind}{n}@example.org", kind) for n in range(per_kind) for kind in kinds
        )
        results.wait_final(addresses, timeout=30)
    assert {r.address for r in results.all if r.state is RecipientState.DELIVERED} == addresses
    received = mx.wait_for_messages(len(addresses))
    assert sum("REQUIRETLS" in m.mail_options for m in received) == per_kind
    assert mx.peak_connections <= 2, f"{mx.peak_connections} connections open at once"


def test_a_backlog_lets_the_domains_other_queue_have_its_turn(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, client_tls_context: ssl.SSLContext
) -> None:
    # One session for the domain, busy with a backlog: a REQUIRETLS message (a password
    # reset) gets it once the session's connection has carried its messages, not once
    # the whole backlog is delivered.
    mx, config = _slow_domain(
        smtp_server,
        dns_server,
        client_tls_context,
        max_per_destination=1,
        max_messages_per_connection=3,
    )
    backlog = 40
    results = Results()

    def delivered(prefix: str) -> int:
        return sum(
            r.state is RecipientState.DELIVERED and r.address.startswith(prefix)
            for r in results.all
        )

    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        ms.send_emails(_mail(f"news{n}@example.org", "plain") for n in range(backlog))
        results.wait_for(lambda _: delivered("news") >= 2)  # the session is at it
        ms.send_email(_mail("reset@example.org", "requiretls"))
        results.wait_final({"reset@example.org"}, timeout=30)
        behind = backlog - delivered("news")
        results.wait_count(backlog + 1, timeout=30)
    assert delivered("reset") == 1
    assert behind > 10, f"the reset waited for the backlog ({behind} messages left)"
    mx.wait_for_messages(backlog + 1)
    assert len(mx.messages) == backlog + 1

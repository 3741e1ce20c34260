"""DANE-TA(2) name checks against the next-hop domain (RFC 7672 §3.2.2) end to end, and
which idle connections another recipient domain may reuse: validated MX records of
``example.org`` (and ``example.net``) name ``mx.test`` on the loopback DNS server, an
aiosmtpd receiver presents a chosen certificate, the whole worker runs in between."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from typing import Any

import pytest
import trustme

from mailstrom import RecipientState
from mailstrom.routing import Route, Router
from mailstrom.status import ReasonClass
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.certs import chain_with_anchor, der, self_signed, spki_sha256

MX = "mx.test"
TLSA_OWNER = f"_25._tcp.{MX}"
DOMAINS = ("example.org", "example.net")


@pytest.fixture
def worker(dnssec_worker: Any) -> Any:
    """``dnssec_worker`` whose connections stay idle long enough for the next message."""
    return lambda port: dnssec_worker(port, connection_idle=60.0)


def signed_zone(dns: LoopbackDNS, host_ip: str, *tlsa: tuple[int, int, int, bytes]) -> None:
    """Both domains → MX mx.test → host_ip, with TLSA records, all validated (AD)."""
    for domain in DOMAINS:
        dns.mx(domain, [(10, MX)])
    dns.a(MX, host_ip)
    dns.tlsa(TLSA_OWNER, *tlsa)
    dns.authenticated(*DOMAINS, MX, TLSA_OWNER)


def dane_ta(ca: trustme.CA) -> tuple[int, int, int, bytes]:
    """A ``2 0 1`` record for ``ca``'s certificate."""
    return (2, 0, 1, hashlib.sha256(der(ca.cert_pem.bytes())).digest())


@pytest.fixture
def dane_ta_receiver(dns_server: LoopbackDNS, cert_receiver: Any) -> Any:
    """A receiver whose certificate names ``names``, issued by a CA that a validated
    ``2 0 1`` record of mx.test pins; the zone of :func:`signed_zone` around it."""

    def start(*names: str, sni: list[str | None] | None = None) -> Any:
        ca = trustme.CA()
        mx = cert_receiver(*chain_with_anchor(ca, *names), sni=sni)
        signed_zone(dns_server, mx.host, dane_ta(ca))
        return mx

    return start


def test_dane_ta_takes_a_certificate_for_the_recipient_domain(
    dane_ta_receiver: Any, worker: Any
) -> None:
    sni: list[str | None] = []
    mx = dane_ta_receiver("example.org", sni=sni)
    bob = worker(mx.port)("bob@example.org")
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "dane"
    # The SNI still names the TLSA base domain, not the recipient domain.
    assert sni == [MX]


def test_dane_ta_refuses_a_certificate_for_another_recipient_domain(
    dane_ta_receiver: Any, worker: Any
) -> None:
    mx = dane_ta_receiver("example.com", "elsewhere.test")
    bob = worker(mx.port)("bob@example.org")
    assert bob.state is RecipientState.DEFERRED
    assert bob.reason_class is ReasonClass.TLS
    assert "not valid for mx.test or example.org" in bob.reason
    assert mx.messages == []


def test_a_connection_accepted_for_one_domains_name_is_not_reused_for_another(
    dane_ta_receiver: Any, worker: Any
) -> None:
    mx = dane_ta_receiver("example.org")
    send = worker(mx.port)
    assert send("bob@example.org").state is RecipientState.DELIVERED
    carol = send("carol@example.net")
    # Mail for example.net needs a certificate naming mx.test or example.net: a new
    # connection is opened and refused, example.org's idle one is left alone.
    assert carol.state is RecipientState.DEFERRED
    assert carol.reason_class is ReasonClass.TLS
    assert "not valid for mx.test or example.net" in carol.reason
    assert mx.connections == 2
    assert [m.envelope_to for m in mx.messages] == [["bob@example.org"]]


def test_a_dane_ta_connection_accepted_for_the_hosts_name_serves_every_domain(
    dane_ta_receiver: Any, worker: Any
) -> None:
    mx = dane_ta_receiver(MX)  # the usual case: names the MX host
    send = worker(mx.port)
    assert send("bob@example.org").state is RecipientState.DELIVERED
    assert send("carol@example.net").state is RecipientState.DELIVERED
    assert mx.connections == 1
    assert len(mx.messages) == 2


def test_a_connection_accepted_for_a_domains_name_serves_that_domain_again(
    dane_ta_receiver: Any, worker: Any
) -> None:
    mx = dane_ta_receiver("example.org")
    send = worker(mx.port)
    assert send("bob@example.org").state is RecipientState.DELIVERED
    assert send("alice@example.org").state is RecipientState.DELIVERED
    assert mx.connections == 1


def test_dane_ee_connections_are_reused_across_domains_sharing_the_mx(
    dns_server: LoopbackDNS, cert_receiver: Any, worker: Any
) -> None:
    cert, key = self_signed("example.org")  # names are not checked for DANE-EE
    mx = cert_receiver(cert, key)
    signed_zone(dns_server, mx.host, (3, 1, 1, spki_sha256(cert)))
    send = worker(mx.port)
    assert send("bob@example.org").state is RecipientState.DELIVERED
    assert send("carol@example.net").state is RecipientState.DELIVERED
    assert mx.connections == 1
    assert len(mx.messages) == 2


# --- a recipient domain that is itself an alias (RFC 7672 §3.2.2) -------------------------

ALIAS = "alias.example"  # CNAME example.org, whose validated MX records name mx.test


def test_dane_ta_takes_a_certificate_for_the_expansion_of_an_aliased_domain(
    dns_server: LoopbackDNS, dane_ta_receiver: Any, worker: Any
) -> None:
    sni: list[str | None] = []
    mx = dane_ta_receiver("example.org", sni=sni)
    dns_server.cname(ALIAS, "example.org")
    dns_server.authenticated(ALIAS)
    send = worker(mx.port)
    bob = send(f"bob@{ALIAS}")
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "dane"
    assert sni == [MX]  # still the TLSA base domain
    # Accepted through the alias's expansion alone, the connection serves the alias only:
    # mail addressed to example.org itself is checked on a connection of its own.
    assert send("alice@example.org").state is RecipientState.DELIVERED
    assert mx.connections == 2
    assert send(f"carol@{ALIAS}").state is RecipientState.DELIVERED
    assert mx.connections == 2


def test_an_aliased_domain_refuses_a_certificate_naming_neither_of_its_names(
    dns_server: LoopbackDNS, dane_ta_receiver: Any, worker: Any
) -> None:
    mx = dane_ta_receiver("elsewhere.test")
    dns_server.cname(ALIAS, "example.org")
    dns_server.authenticated(ALIAS)
    bob = worker(mx.port)(f"bob@{ALIAS}")
    assert bob.state is RecipientState.DEFERRED
    assert bob.reason_class is ReasonClass.TLS
    assert "not valid for mx.test or alias.example or example.org" in bob.reason
    assert mx.messages == []


def test_the_router_reports_the_expansion_of_an_aliased_domain(
    dns_server: LoopbackDNS,
) -> None:
    signed_zone(dns_server, "127.0.0.1")
    dns_server.cname(ALIAS, "example.org")
    dns_server.authenticated(ALIAS)
    router = Router(dataclasses.replace(dns_server.dns_config, dnssec=True), allow_loopback=True)

    async def routes() -> list[Route]:
        return [await router.route(domain) for domain in (ALIAS, "example.org")]

    aliased, plain = asyncio.run(routes())
    assert (aliased.domain, aliased.canonical, aliased.secure) == (ALIAS, "example.org", True)
    assert aliased.next_hops == (ALIAS, "example.org")
    assert plain.canonical is None and plain.next_hops == ("example.org",)

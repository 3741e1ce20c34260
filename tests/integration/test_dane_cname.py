"""DANE for an MX host that is an alias (RFC 7672 §2.2.3) end to end: the MX host
``mx.example.test`` is a CNAME of ``real.hosting.test`` on the loopback DNS server, which
sets the AD bit per name as a validating resolver would, and an aiosmtpd receiver presents
a chosen certificate; the whole worker runs in between."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import trustme

from mailstrom import RecipientState
from mailstrom.routing import Router
from mailstrom.status import ReasonClass, RecipientStatus
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.certs import chain_with_anchor, der, self_signed, spki_sha256

MX = "mx.example.test"
TARGET = "real.hosting.test"
AT_MX = f"_25._tcp.{MX}"
AT_TARGET = f"_25._tcp.{TARGET}"
TO = "bob@example.org"


@pytest.fixture
def deliver(dnssec_worker: Any) -> Callable[[int], RecipientStatus]:
    """Send one message to bob@example.org through a DNSSEC-trusting worker and return
    bob's status once the attempt is recorded."""
    return lambda port: dnssec_worker(port)(TO)


def aliased_zone(dns: LoopbackDNS, host_ip: str, *, chain_secure: bool = True) -> None:
    """example.org → MX mx.example.test → CNAME real.hosting.test → host_ip. The MX records
    and the alias validate; the target (so the chain as a whole) only if ``chain_secure``.
    """
    dns.mx("example.org", [(10, MX)])
    dns.cname(MX, TARGET)
    dns.a(TARGET, host_ip)
    dns.authenticated("example.org", MX, AT_MX, AT_TARGET)
    if chain_secure:
        dns.authenticated(TARGET)


def ee(cert: bytes) -> tuple[int, int, int, bytes]:
    """A DANE-EE SPKI SHA-256 record for ``cert``."""
    return (3, 1, 1, spki_sha256(cert))


def test_the_router_reports_the_expansion_of_an_alias(dns_server: LoopbackDNS) -> None:
    aliased_zone(dns_server, "127.0.0.1")
    dns_server.mx("plain.example", [(10, "mx.plain.example")])
    dns_server.a("mx.plain.example", "127.0.0.1")
    dns_server.authenticated("plain.example", "mx.plain.example")
    dns_server.cname("implicit.example", TARGET)  # no MX: the domain itself, an alias
    dns_server.authenticated("implicit.example")
    router = Router(dataclasses.replace(dns_server.dns_config, dnssec=True), allow_loopback=True)

    async def hosts() -> list[Any]:
        return [
            (await router.route(domain)).hosts[0]
            for domain in ("example.org", "plain.example", "implicit.example")
        ]

    aliased, plain, implicit = asyncio.run(hosts())
    assert (aliased.name, aliased.canonical, aliased.secure) == (MX, TARGET, True)
    assert (plain.name, plain.canonical, plain.secure) == ("mx.plain.example", None, True)
    assert (implicit.name, implicit.canonical) == ("implicit.example", TARGET)


# --- 1. a validated chain: the expanded name's TLSA records first ------------------------


def test_tlsa_only_at_the_expanded_name_authenticates_the_host(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any
) -> None:
    cert, key = self_signed(TARGET, expired=True)  # DANE-EE: only the key counts
    mx = cert_receiver(cert, key)
    aliased_zone(dns_server, mx.host)
    dns_server.tlsa(AT_TARGET, ee(cert))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.tls and bob.history[-1].tls_policy == "dane"
    assert dns_server.queries(AT_TARGET, "TLSA") == 1
    assert dns_server.queries(AT_MX, "TLSA") == 0  # found at the first base domain
    assert mx.wait_for_messages(1)[0].tls


def test_a_mismatch_with_the_expanded_names_records_defers(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any
) -> None:
    cert, key = self_signed(TARGET)
    other, _ = self_signed(TARGET)
    mx = cert_receiver(cert, key)
    aliased_zone(dns_server, mx.host)
    dns_server.tlsa(AT_TARGET, ee(other))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert bob.reason_class is ReasonClass.TLS
    assert "DANE" in bob.reason and "TLSA" in bob.reason
    assert bob.history[-1].tls_policy == "dane"
    assert mx.messages == []


def test_the_expanded_names_records_win_over_the_original_names(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any
) -> None:
    cert, key = self_signed(TARGET)
    other, _ = self_signed(MX)
    mx = cert_receiver(cert, key)
    aliased_zone(dns_server, mx.host)
    dns_server.tlsa(AT_TARGET, ee(cert))
    dns_server.tlsa(AT_MX, ee(other))  # would not match: never looked at
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "dane"


@pytest.mark.parametrize("leaf_name", [TARGET, MX])
def test_dane_ta_takes_a_certificate_for_the_expansion_or_the_mx_name(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any, leaf_name: str
) -> None:
    ca = trustme.CA()
    chain, key = chain_with_anchor(ca, leaf_name)
    mx = cert_receiver(chain, key)
    aliased_zone(dns_server, mx.host)
    dns_server.tlsa(AT_TARGET, (2, 0, 1, hashlib.sha256(der(ca.cert_pem.bytes())).digest()))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "dane"


def test_dane_ta_refuses_a_certificate_for_another_name(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any
) -> None:
    ca = trustme.CA()
    chain, key = chain_with_anchor(ca, "elsewhere.example")
    mx = cert_receiver(chain, key)
    aliased_zone(dns_server, mx.host)
    dns_server.tlsa(AT_TARGET, (2, 0, 1, hashlib.sha256(der(ca.cert_pem.bytes())).digest()))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert "DANE" in bob.reason and TARGET in bob.reason
    assert mx.messages == []


@pytest.mark.parametrize(("owner", "base"), [(AT_TARGET, TARGET), (AT_MX, MX)])
def test_sni_names_the_tlsa_base_domain(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any, owner: str, base: str
) -> None:
    cert, key = self_signed(TARGET)
    sni: list[str | None] = []
    mx = cert_receiver(cert, key, sni)
    aliased_zone(dns_server, mx.host)
    dns_server.tlsa(owner, ee(cert))
    assert deliver(mx.port).state is RecipientState.DELIVERED
    assert sni == [base]  # RFC 7672 §8.1


# --- 2. a validated chain, TLSA records only at the original name -------------------------


@pytest.mark.parametrize("matching", [True, False])
def test_without_records_at_the_expansion_the_original_names_apply(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any, matching: bool
) -> None:
    cert, key = self_signed(MX)
    other, _ = self_signed(MX)
    mx = cert_receiver(cert, key)
    aliased_zone(dns_server, mx.host)
    dns_server.tlsa(AT_MX, ee(cert if matching else other))
    bob = deliver(mx.port)
    assert bob.history[-1].tls_policy == "dane"
    if matching:
        assert bob.state is RecipientState.DELIVERED
    else:
        assert bob.state is RecipientState.DEFERRED
        assert "DANE" in bob.reason
        assert mx.messages == []
    assert dns_server.queries(AT_TARGET, "TLSA") == 1  # asked first, validated absence
    assert dns_server.queries(AT_MX, "TLSA") == 1


def test_a_failed_lookup_at_the_expansion_defers_without_trying_the_original(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any
) -> None:
    cert, key = self_signed(MX)
    mx = cert_receiver(cert, key)
    aliased_zone(dns_server, mx.host)
    dns_server.tlsa(AT_MX, ee(cert))
    dns_server.servfail(AT_TARGET)  # not "no records": the host must not be used now
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert "TLSA lookup" in bob.reason and TARGET in bob.reason
    assert mx.connections == 0
    assert dns_server.queries(AT_MX, "TLSA") == 0


# --- 3. the chain does not validate: the expansion's records are never used ---------------


def test_an_insecure_expansion_ignores_the_expanded_names_records(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any
) -> None:
    cert, key = self_signed(TARGET)
    other, _ = self_signed(TARGET)
    mx = cert_receiver(cert, key)
    aliased_zone(dns_server, mx.host, chain_secure=False)
    dns_server.tlsa(AT_TARGET, ee(other))  # would defer if used
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "opportunistic"
    assert dns_server.queries(AT_TARGET, "TLSA") == 0


@pytest.mark.parametrize("matching", [True, False])
def test_an_insecure_expansion_of_a_validated_alias_uses_the_original_names_records(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any, matching: bool
) -> None:
    cert, key = self_signed(MX)
    other, _ = self_signed(MX)
    mx = cert_receiver(cert, key)
    aliased_zone(dns_server, mx.host, chain_secure=False)
    dns_server.tlsa(AT_TARGET, ee(cert))  # would match, but the expansion is not trusted
    dns_server.tlsa(AT_MX, ee(cert if matching else other))
    bob = deliver(mx.port)
    assert bob.history[-1].tls_policy == "dane"
    if matching:
        assert bob.state is RecipientState.DELIVERED
    else:
        assert bob.state is RecipientState.DEFERRED
        assert mx.messages == []
    assert dns_server.queries(MX, "CNAME") == 1  # the alias's own record, asked once
    assert dns_server.queries(AT_TARGET, "TLSA") == 0


def test_an_alias_that_does_not_validate_means_no_dane(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any
) -> None:
    cert, key = self_signed(MX)
    other, _ = self_signed(MX)
    mx = cert_receiver(cert, key)
    aliased_zone(dns_server, mx.host, chain_secure=False)
    dns_server.unauthenticated(MX)
    dns_server.tlsa(AT_MX, ee(other))
    dns_server.tlsa(AT_TARGET, ee(other))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "opportunistic"
    assert dns_server.queries(AT_MX, "TLSA") == 0
    assert dns_server.queries(AT_TARGET, "TLSA") == 0


def test_a_failed_lookup_of_the_aliass_own_record_defers_instead_of_dropping_dane(
    dns_server: LoopbackDNS, cert_receiver: Any, deliver: Any
) -> None:
    """The chain does not validate, so whether DANE applies hangs on the alias's own CNAME
    record; when that query fails, the attempt waits (as a failed TLSA lookup does) instead
    of going on as if the alias were insecure, which would send without DANE."""
    cert, key = self_signed(MX)
    other, _ = self_signed(MX)
    mx = cert_receiver(cert, key)
    aliased_zone(dns_server, mx.host, chain_secure=False)
    dns_server.tlsa(AT_MX, ee(other))  # DANE would refuse this server's certificate
    dns_server.servfail(MX, "CNAME")  # the address queries, which follow it, still work
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert MX in bob.reason
    assert mx.connections == 0
    assert mx.messages == []
    assert dns_server.queries(MX, "CNAME") >= 1

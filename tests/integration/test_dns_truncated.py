"""An answer truncated over TCP too (the TC bit) whose records are some of them at most,
in every lookup the product makes, against the loopback DNS server (its ``truncate``:
a broken server or middlebox that cuts an answer short and says so).

dnspython asks again over TCP after a truncated UDP answer, and hands on a TCP answer
that is truncated too as it came: with no records it is NoAnswer, which every lookup
reads as a failed one (``unanswered``); with some of them it is an answer, which was
used as the whole set. A route to one of a domain's MX hosts, a TLSA set missing the
record the server's certificate matches (or holding only some of a rollover's), an
MTA-STS or TLS-RPT record read from part of the TXT set: each fails here as for
SERVFAIL, to be asked again later (RFC 2181 §9: a truncated answer is not to be cached
or used as the whole)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest

from mailstrom.doctor.lookup import DNSResolver, Outcome
from mailstrom.errors import TemporaryFailure
from mailstrom.mtasts import https
from mailstrom.mtasts.fetch import DNSTrouble, txt_records
from mailstrom.routing import Router, make_resolver
from mailstrom.routing.policy import RoutePolicy
from mailstrom.tls.dane import lookup_tlsa
from tests.fixtures.dns_server import LoopbackDNS


async def test_a_truncated_mx_or_address_set_is_a_failed_route(dns_server: LoopbackDNS) -> None:
    dns_server.mx("example.org", [(10, "mx1.example.org"), (20, "mx2.example.org")])
    dns_server.a("mx1.example.org", "127.0.0.1")
    dns_server.a("mx2.example.org", "127.0.0.2")
    dns_server.truncate("example.org", "MX")
    router = Router(dns_server.dns_config, allow_loopback=True, rng=random.Random(0))
    with pytest.raises(TemporaryFailure, match="truncated") as info:
        await router.route("example.org")
    assert info.value.enhanced == "4.4.3"
    assert dns_server.queries("example.org", "MX") == 2  # over UDP, then over TCP
    dns_server.a("mx.example.net", "127.0.0.3", "127.0.0.4")
    dns_server.mx("example.net", [(10, "mx.example.net")])
    dns_server.truncate("mx.example.net", "A")
    with pytest.raises(TemporaryFailure, match="truncated"):
        await router.route("example.net")


async def test_a_truncated_tlsa_set_is_a_failed_lookup(dns_server: LoopbackDNS) -> None:
    dns_server.a("mx.test", "192.0.2.25")
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(3)]
    dns_server.tlsa("_25._tcp.mx.test", *((3, 1, 1, digest) for digest in digests))
    dns_server.truncate("_25._tcp.mx.test", "TLSA")
    with pytest.raises(TemporaryFailure, match="truncated"):
        await lookup_tlsa(make_resolver(dns_server.dns_config), "mx.test")


async def test_a_truncated_mta_sts_or_tls_rpt_txt_set_is_a_failed_lookup(
    dns_server: LoopbackDNS,
) -> None:
    # The server cut off the MTA-STS record, and kept another TXT record of the name.
    dns_server.txt("_mta-sts.example.org", "not a policy record", "v=STSv1; id=1")
    dns_server.truncate("_mta-sts.example.org", "TXT")
    with pytest.raises(DNSTrouble, match="truncated"):
        await txt_records(make_resolver(dns_server.dns_config), "_mta-sts.example.org")


async def test_a_truncated_address_set_of_a_policy_host_is_a_failed_lookup(
    dns_server: LoopbackDNS,
) -> None:
    dns_server.a("mta-sts.example.org", "192.0.2.1", "192.0.2.2")
    dns_server.truncate("mta-sts.example.org", "A")
    with pytest.raises(https.NoUsableAddress, match="truncated"):
        await https.usable_addresses(
            make_resolver(dns_server.dns_config), "mta-sts.example.org", RoutePolicy()
        )


def test_a_truncated_txt_set_is_an_error_to_the_doctor(dns_server: LoopbackDNS) -> None:
    # The SPF record cut off: read as "no SPF record" the doctor would say so.
    dns_server.txt("example.org", "google-site-verification=x", "v=spf1 -all")
    dns_server.truncate("example.org", "TXT")
    answer = DNSResolver(dns_server.dns_config).lookup("example.org", "TXT")
    assert answer.outcome is Outcome.ERROR and "truncated" in (answer.error or "")


async def test_a_truncated_tlsa_set_asked_again_leniently_is_a_failed_lookup(
    dns_server: LoopbackDNS,
) -> None:
    """dnspython refuses the answer for a malformed record in it, and DANE asks again
    itself, reading the answer without that record: truncated over TCP too, its records
    were the whole set there as well."""
    malformed = (3, 1, 1, b"\x01" * 31)  # a SHA-256 digest of 31 octets
    good = [(3, 1, 1, hashlib.sha256(str(i).encode()).digest()) for i in range(3)]
    dns_server.a("mx.test", "192.0.2.25")
    dns_server.tlsa("_25._tcp.mx.test", malformed, *good)
    dns_server.truncate("_25._tcp.mx.test", "TLSA", keep=2)
    resolver = make_resolver(replace(dns_server.dns_config, timeout=0.4))
    with pytest.raises(TemporaryFailure, match="truncated"):
        await lookup_tlsa(resolver, "mx.test")

"""DANE (RFC 7672) end to end: TLSA records and the AD bit from the loopback DNS server,
aiosmtpd receivers presenting chosen certificates, the whole worker in between."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailstrom import RecipientState
from mailstrom.errors import TemporaryFailure
from mailstrom.routing import make_resolver
from mailstrom.status import ReasonClass, RecipientStatus
from mailstrom.testing.smtp import ReceivingServer, start_receiving_server
from mailstrom.tls.dane import DaneSource, lookup_alias_secure, lookup_tlsa
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.certs import (
    COMPRESSED_POINT_CERTIFICATE,
    COMPRESSED_POINT_KEY,
    COMPRESSED_POINT_SPKI,
    SM2_CERTIFICATE,
    chain_with_anchor,
    der,
    self_signed,
    server_context,
    spki_sha256,
)

TLSA_OWNER = "_25._tcp.mx.test"
TO = "bob@example.org"


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
def deliver(dnssec_worker: Any) -> Callable[..., RecipientStatus]:
    """Send one message to bob@example.org through a DNSSEC-trusting worker (``overrides``
    replace Config fields) and return bob's status once the attempt is recorded."""
    return lambda port, **overrides: dnssec_worker(port, **overrides)(TO)


def signed_zone(dns: LoopbackDNS, host_ip: str, *tlsa: tuple[int, int, int, bytes]) -> None:
    """example.org → MX mx.test → host_ip, with TLSA records, all validated (AD)."""
    dns.mx("example.org", [(10, "mx.test")])
    dns.a("mx.test", host_ip)
    if tlsa:
        dns.tlsa(TLSA_OWNER, *tlsa)
    dns.authenticated("example.org", "mx.test", TLSA_OWNER)


def test_dane_ee_spki_match_delivers_despite_an_expired_self_signed_certificate(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test", expired=True)
    mx = receivers(server_context(tmp_path, cert, key))
    signed_zone(dns_server, mx.host, (3, 1, 1, spki_sha256(cert)))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.tls and bob.history[-1].tls_policy == "dane"
    [received] = mx.wait_for_messages(1)
    assert received.tls


@pytest.mark.parametrize(("selector", "matching"), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)])
def test_dane_ee_every_selector_and_matching_type(
    dns_server: LoopbackDNS,
    receivers: Any,
    deliver: Any,
    tmp_path: Path,
    selector: int,
    matching: int,
) -> None:
    cert, key = self_signed("other.name.example")  # names are not checked for DANE-EE
    mx = receivers(server_context(tmp_path, cert, key))
    data = der(cert)
    if selector == 1:
        data = (
            x509.load_pem_x509_certificate(cert)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    if matching == 1:
        data = hashlib.sha256(data).digest()
    elif matching == 2:
        data = hashlib.sha512(data).digest()
    signed_zone(dns_server, mx.host, (3, selector, matching, data))
    assert deliver(mx.port).state is RecipientState.DELIVERED


@pytest.mark.parametrize("usage", [3, 2])
def test_spki_records_match_the_key_as_the_certificate_encodes_it(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path, usage: int
) -> None:
    # RFC 6698 §2.1.2: selector 1 is the certificate's own SubjectPublicKeyInfo, which is
    # what other tools hash (OpenSSL, Postfix, hash-slinger); a key written another way
    # than cryptography writes it (here a compressed EC point) must match as sent.
    certificate = COMPRESSED_POINT_CERTIFICATE
    assert COMPRESSED_POINT_SPKI in der(certificate)
    if usage == 2:  # the same self-signed certificate sent again above the leaf
        certificate += COMPRESSED_POINT_CERTIFICATE
    mx = receivers(server_context(tmp_path, certificate, COMPRESSED_POINT_KEY))
    signed_zone(dns_server, mx.host, (usage, 1, 1, hashlib.sha256(COMPRESSED_POINT_SPKI).digest()))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED, bob.reason
    assert bob.history[-1].tls_policy == "dane"


def test_dane_mismatch_defers_and_sends_nothing(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    other, _ = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    signed_zone(dns_server, mx.host, (3, 1, 1, spki_sha256(other)))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert bob.reason_class is ReasonClass.TLS
    assert "DANE" in bob.reason and "TLSA" in bob.reason
    assert bob.history[-1].tls_policy == "dane"
    assert mx.messages == []


def test_a_usable_tlsa_record_behind_many_unusable_ones_is_still_checked(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    """Only the first MAX_RECORDS records of an RRset were read, unusable ones (PKIX
    usages, RFC 7672 §3.1.3) counted: a usable record behind them was never seen, and
    the host was taken for one with "none usable", delivered to over unauthenticated
    TLS whatever certificate it showed. Usable records are now read first."""
    from mailstrom.tls.dane import MAX_RECORDS

    cert, key = self_signed("mx.test")
    other, _ = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    unusable = [(1, 1, 1, bytes([n]) * 32) for n in range(MAX_RECORDS + 1)]
    signed_zone(dns_server, mx.host, *unusable, (3, 1, 1, spki_sha256(other)))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert "DANE" in bob.reason and "TLSA" in bob.reason
    assert mx.messages == []


def test_tlsa_present_and_starttls_not_offered_defers(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key), starttls=False)
    signed_zone(dns_server, mx.host, (3, 1, 1, spki_sha256(cert)))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert "STARTTLS" in bob.reason
    assert mx.messages == []


def test_tlsa_present_and_a_failing_handshake_never_falls_back_to_plaintext(
    dns_server: LoopbackDNS, receivers: Any, dnssec_worker: Any, tmp_path: Path
) -> None:
    # RFC 7672 §2.2: STARTTLS offered, then the handshake breaks: the host is not used,
    # never retried in plaintext on a new connection (the opportunistic fallback).
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key), tls_broken=True)
    signed_zone(dns_server, mx.host, (3, 1, 1, spki_sha256(cert)))
    bob = dnssec_worker(mx.port)(TO)
    assert bob.state is RecipientState.DEFERRED
    assert bob.reason_class is ReasonClass.TLS
    assert bob.history[-1].tls_policy == "dane"
    assert mx.connections == 1 and mx.messages == []


def test_without_the_ad_bit_dane_is_not_applied(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    other, _ = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    signed_zone(dns_server, mx.host, (3, 1, 1, spki_sha256(other)))  # would not match
    dns_server.unauthenticated()
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "opportunistic"
    assert dns_server.queries(TLSA_OWNER, "TLSA") == 0  # insecure MX: not even asked


def test_tlsa_lookup_servfail_defers(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    signed_zone(dns_server, mx.host)
    dns_server.servfail(TLSA_OWNER)
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert "TLSA lookup" in bob.reason
    assert mx.messages == [] and mx.connections == 0


def test_a_tlsa_lookup_answered_with_a_referral_defers(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    """A server that does not resolve recursively answers with a referral (NOERROR, no
    records, NS records in the authority section), which says nothing of whether TLSA
    records exist: read as "no TLSA records", the host was used without DANE. It is a
    failed lookup, as SERVFAIL is."""
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    signed_zone(dns_server, mx.host)
    dns_server.referral(TLSA_OWNER)
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert "TLSA lookup" in bob.reason and "referral" in bob.reason, bob.reason
    assert mx.messages == [] and mx.connections == 0


async def test_a_referral_for_a_tlsa_or_the_aliass_own_record_is_a_failed_lookup(
    dns_server: LoopbackDNS,
) -> None:
    """Whether an alias's CNAME validated decides whether DANE applies to it: a referral
    is no answer, so the lookup fails (TemporaryFailure) instead of calling the alias
    insecure, which would send without DANE."""
    dns_server.a("mx.test", "192.0.2.25")
    dns_server.referral("mx.test")
    dns_server.referral(TLSA_OWNER)
    resolver = make_resolver(dns_server.dns_config)
    with pytest.raises(TemporaryFailure, match="referral"):
        await lookup_alias_secure(resolver, "mx.test")
    with pytest.raises(TemporaryFailure, match="referral"):
        await lookup_tlsa(resolver, "mx.test")


async def test_a_tlsa_answer_truncated_over_tcp_too_is_a_failed_lookup(
    dns_server: LoopbackDNS,
) -> None:
    """A TLSA answer longer than a TCP message holds comes truncated (TC bit) over TCP
    too, without its records: read as "no TLSA records", the host was used without DANE.
    It is a failed lookup, and the host is not used."""
    dns_server.a("mx.test", "192.0.2.25")
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(2000)]
    dns_server.tlsa(TLSA_OWNER, *((3, 1, 1, digest) for digest in digests))
    with pytest.raises(TemporaryFailure, match="truncated"):
        await lookup_tlsa(make_resolver(dns_server.dns_config), "mx.test")
    assert dns_server.queries(TLSA_OWNER, "TLSA") == 2  # over UDP, then over TCP


def test_validated_absence_of_tlsa_leaves_the_default(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test", expired=True)
    mx = receivers(server_context(tmp_path, cert, key))
    signed_zone(dns_server, mx.host)
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "opportunistic"


def test_pkix_usages_alone_mean_tls_required_unauthenticated(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    # Usage 1 (PKIX-EE) is not usable for SMTP (RFC 7672 §3.1.3), even when it matches.
    signed_zone(dns_server, mx.host, (1, 1, 1, spki_sha256(cert)))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "required"


def test_unusable_tlsa_records_never_lower_a_global_verify_policy(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    # Records that are all unusable make DANE ask for TLS without authentication (RFC
    # 7672 §2.2): a floor, which must not lower the operator's own tls = "verify" to it.
    cert, key = self_signed("mx.test")  # trusted by no CA
    mx = receivers(server_context(tmp_path, cert, key))
    signed_zone(dns_server, mx.host, (1, 1, 1, spki_sha256(cert)))
    bob = deliver(mx.port, tls="verify")
    assert bob.state is RecipientState.DEFERRED
    assert bob.reason_class is ReasonClass.TLS
    assert bob.history[-1].tls_policy == "verify"
    assert mx.messages == []


def test_tlsa_records_of_unknown_parameters_alone_mean_tls_required(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    # An unknown usage, selector or matching type makes a record unusable (RFC 7672
    # §2.2); an RRset of nothing else asks for TLS, unauthenticated, never plaintext.
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    digest = spki_sha256(cert)
    signed_zone(dns_server, mx.host, (4, 1, 1, digest), (3, 2, 1, digest), (3, 1, 3, digest))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "required"
    [received] = mx.wait_for_messages(1)
    assert received.tls


def test_dane_ta_trust_anchor_in_the_chain_delivers(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    ca = trustme.CA()
    chain, key = chain_with_anchor(ca, "mx.test")
    mx = receivers(server_context(tmp_path, chain, key))
    anchor = hashlib.sha256(der(ca.cert_pem.bytes())).digest()
    signed_zone(dns_server, mx.host, (2, 0, 1, anchor))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "dane"


def test_a_key_matching_only_the_weaker_digest_defers(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    # RFC 7671 §9: beside a "3 1 2" record, a "3 1 1" one is not used; a server whose key
    # matches only the SHA-256 record (one forged against a broken SHA-256, say) is not
    # the host the domain vouches for. It was delivered to.
    cert, key = self_signed("mx.test")
    other, _ = self_signed("mx.test")
    spki = (
        x509.load_pem_x509_certificate(other)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    mx = receivers(server_context(tmp_path, cert, key))
    signed_zone(
        dns_server,
        mx.host,
        (3, 1, 1, spki_sha256(cert)),
        (3, 1, 2, hashlib.sha512(spki).digest()),
    )
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert "matches none of its TLSA records (3 1 2)" in bob.reason
    assert mx.messages == []


def test_dane_ta_with_a_leaf_for_another_name_defers(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    ca = trustme.CA()
    chain, key = chain_with_anchor(ca, "elsewhere.example")
    mx = receivers(server_context(tmp_path, chain, key))
    anchor = hashlib.sha256(der(ca.cert_pem.bytes())).digest()
    signed_zone(dns_server, mx.host, (2, 0, 1, anchor))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert "DANE" in bob.reason
    assert mx.messages == []


def test_dane_ta_anchor_not_sent_defers(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.test")
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)  # no CA certificate
    mx = receivers(server_context(tmp_path, chain, leaf.private_key_pem.bytes()))
    anchor = hashlib.sha256(der(ca.cert_pem.bytes())).digest()
    signed_zone(dns_server, mx.host, (2, 0, 1, anchor))
    assert deliver(mx.port).state is RecipientState.DEFERRED


def test_a_dane_only_table_entry_defers_a_host_without_tlsa(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    signed_zone(dns_server, mx.host)  # validated, but no TLSA records
    bob = deliver(mx.port, tls_domains={"*.org": "dane-only"})
    assert bob.state is RecipientState.DEFERRED
    assert "dane-only" in bob.reason and "*.org" in bob.reason
    assert mx.connections == 0


def test_a_dane_only_table_entry_defers_a_host_with_only_unusable_tlsa_records(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    # PKIX-EE (1) is unusable for SMTP (RFC 7672 §3.1.3): dane-only wants usable records.
    signed_zone(dns_server, mx.host, (1, 1, 1, spki_sha256(cert)))
    bob = deliver(mx.port, tls_domains={"*.org": "dane-only"})
    assert bob.state is RecipientState.DEFERRED
    assert "dane-only" in bob.reason and "none usable" in bob.reason
    assert mx.connections == 0 and mx.messages == []


# A SHA-256 "digest" of 31 octets: dnspython refuses it, and with it the whole answer.
MALFORMED = (3, 1, 1, b"\x01" * 31)
SHORT_DNS = 0.4
"""DNS lifetime for these tests: the first try gives up after half of it, when dnspython
waited in vain for an answer it could parse (then the lookup asks again)."""


def test_a_malformed_tlsa_record_beside_a_good_one_is_ignored(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    signed_zone(dns_server, mx.host, MALFORMED, (3, 1, 1, spki_sha256(cert)))
    bob = deliver(mx.port, dns_timeout=SHORT_DNS)
    # RFC 7672 §2.2: the malformed record is unusable; the good one is used.
    assert bob.state is RecipientState.DELIVERED
    assert bob.tls and bob.history[-1].tls_policy == "dane"
    [received] = mx.wait_for_messages(1)
    assert received.tls


def test_a_malformed_tlsa_record_never_matches(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    other, _ = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    # The good record is for another key; the malformed one is the first 31 octets of
    # the right digest.
    signed_zone(
        dns_server, mx.host, (3, 1, 1, spki_sha256(cert)[:31]), (3, 1, 1, spki_sha256(other))
    )
    bob = deliver(mx.port, dns_timeout=SHORT_DNS)
    assert bob.state is RecipientState.DEFERRED
    assert "DANE" in bob.reason and bob.history[-1].tls_policy == "dane"
    assert mx.messages == []


def test_only_malformed_tlsa_records_mean_tls_required_unauthenticated(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    signed_zone(dns_server, mx.host, MALFORMED, (2, 0, 2, b"\x02" * 63))
    bob = deliver(mx.port, dns_timeout=SHORT_DNS)
    # RFC 7672 §2.2: a validated RRset with no usable record is not "no TLSA records":
    # TLS is still mandatory, only not authenticated (as for PKIX-only records above).
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "required"
    [received] = mx.wait_for_messages(1)
    assert received.tls


def test_only_malformed_tlsa_records_never_allow_plaintext(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key), starttls=False)
    signed_zone(dns_server, mx.host, MALFORMED)
    bob = deliver(mx.port, dns_timeout=SHORT_DNS)
    assert bob.state is RecipientState.DEFERRED
    assert "STARTTLS" in bob.reason
    assert bob.history[-1].tls_policy == "required"
    assert mx.messages == []


def test_dane_ta_for_a_host_name_the_chain_check_cannot_take_defers(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    # An underscore is no host name character (RFC 5321 §4.1.2), yet DNS serves such a
    # name and a wildcard certificate covers it: the chain check refuses it, with a reason.
    ca = trustme.CA()
    chain, key = chain_with_anchor(ca, "*.test")
    mx = receivers(server_context(tmp_path, chain, key))
    dns_server.mx("example.org", [(10, "mx_1.test")])
    dns_server.a("mx_1.test", mx.host)
    anchor = hashlib.sha256(der(ca.cert_pem.bytes())).digest()
    dns_server.tlsa("_25._tcp.mx_1.test", (2, 0, 1, anchor))
    dns_server.authenticated("example.org", "mx_1.test", "_25._tcp.mx_1.test")
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert bob.reason_class is ReasonClass.TLS
    assert "DANE" in bob.reason and "internal error" not in bob.reason
    assert mx.messages == []


def test_dane_ta_chain_sent_in_another_order_delivers(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    # TLS 1.3 lets a server send the certificates after the leaf in any order (RFC 8446
    # §4.4.2): here the anchor (the root) before the intermediate CA that issued the leaf.
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("mx.test")
    leaf_pem, intermediate_pem = (blob.bytes() for blob in leaf.cert_chain_pems)
    chain = leaf_pem + root.cert_pem.bytes() + intermediate_pem
    mx = receivers(server_context(tmp_path, chain, leaf.private_key_pem.bytes()))
    anchor = hashlib.sha256(der(root.cert_pem.bytes())).digest()
    signed_zone(dns_server, mx.host, (2, 0, 1, anchor))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED
    assert bob.history[-1].tls_policy == "dane"


def test_dane_ta_a_chain_with_a_key_cryptography_cannot_read_defers(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    # Certificates after the leaf are not checked by the handshake: a hostile server (or
    # one in the middle) may send one whose key cannot be read. It matches no record.
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.test")
    chain = leaf.cert_chain_pems[0].bytes() + SM2_CERTIFICATE
    mx = receivers(server_context(tmp_path, chain, leaf.private_key_pem.bytes()))
    signed_zone(dns_server, mx.host, (2, 1, 1, spki_sha256(ca.cert_pem.bytes())))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DEFERRED
    assert bob.reason_class is ReasonClass.TLS
    assert "DANE" in bob.reason and "internal error" not in bob.reason
    assert mx.messages == []


async def test_tlsa_records_reached_through_a_cname_are_kept_no_longer_than_the_cname(
    dns_server: LoopbackDNS,
) -> None:
    """A hosting provider's TLSA records, named by a CNAME at the MX host's TLSA name
    (RFC 7671 §7): the answer is good for as long as its shortest TTL, the CNAME's, and a
    moved CNAME (the provider's key rollover) is seen once it has run out. The TTL was the
    TLSA records' own, so the old records kept being matched for up to an hour."""

    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

    old, new = (3, 1, 1, bytes([1]) * 32), (3, 1, 1, bytes([2]) * 32)
    dns_server.cname(TLSA_OWNER, "_25._tcp.old.provider.test", ttl=60)
    dns_server.tlsa("_25._tcp.old.provider.test", old, ttl=3600)
    dns_server.tlsa("_25._tcp.new.provider.test", new, ttl=3600)
    dns_server.authenticated(everything=True)
    clock = Clock()
    source = DaneSource(make_resolver(dns_server.dns_config), clock=clock)
    first = await source.lookup("mx.test")
    assert [r.data for r in first.records] == [old[3]]
    assert first.ttl == 60
    dns_server.cname(TLSA_OWNER, "_25._tcp.new.provider.test", ttl=60)
    clock.now += 59
    assert (await source.lookup("mx.test")) == first
    clock.now += 2
    assert [r.data for r in (await source.lookup("mx.test")).records] == [new[3]]


def test_an_mx_host_too_long_for_a_tlsa_name_is_not_held_back_by_dane(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    """A validated MX host of 245 to 253 octets has no TLSA name: ``_25._tcp.`` before it
    makes a name over DNS's 255 octets, so no records can be published (RFC 7672 §2.2:
    DANE does not apply). The lookup took the name error for a failed query, and mail to
    the host was deferred for good."""
    host = ".".join(["m" * 60, "x" * 60, "y" * 60, "z" * 60]) + ".test"  # 248 octets
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    dns_server.mx("example.org", [(10, host)])
    dns_server.a(host, mx.host)
    dns_server.authenticated(everything=True)
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED, bob.reason
    assert bob.history[-1].tls_policy == "opportunistic"
    mx.wait_for_messages(1)
    assert len(mx.messages) == 1


def test_only_full_data_records_that_hold_no_der_mean_tls_required_unauthenticated(
    dns_server: LoopbackDNS, receivers: Any, deliver: Any, tmp_path: Path
) -> None:
    """Full(0) records whose data is no DER certificate or key (cut short by a copy, the
    PEM text instead of its DER, nothing at all) are malformed: unusable (RFC 7672 §2.2),
    as a digest of the wrong size is. Used as records that authenticate, they had the
    host deferred on every attempt, whatever certificate it showed."""
    cert, key = self_signed("mx.test")
    mx = receivers(server_context(tmp_path, cert, key))
    spki = x509.load_pem_x509_certificate(cert).public_key()
    spki_der = spki.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem_text = b"".join(cert.splitlines()[1:-1])  # the base64 of the certificate
    signed_zone(dns_server, mx.host, (3, 1, 0, spki_der[:-4]), (2, 0, 0, pem_text))
    bob = deliver(mx.port)
    assert bob.state is RecipientState.DELIVERED, bob.reason
    assert bob.history[-1].tls_policy == "required"
    [received] = mx.wait_for_messages(1)
    assert received.tls

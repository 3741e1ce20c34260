"""Which idle connections a requirement may reuse: the opener's cache key. Pure logic (no
connection is opened)."""

from __future__ import annotations

from mailstrom import Config
from mailstrom.runtime.opener import Opener
from mailstrom.tls.requirement import PolicySource, TLSARecord, TLSMode, TLSRequirement

EE = TLSARecord(usage=3, selector=1, matching=1, data=b"e" * 32)
TA = TLSARecord(usage=2, selector=1, matching=1, data=b"t" * 32)
PKIX_TA = TLSARecord(usage=0, selector=1, matching=1, data=b"p" * 32)
HOST, IP = "mx.test", "192.0.2.1"


def dane(*tlsa: TLSARecord, domain: str) -> TLSRequirement:
    return TLSRequirement(
        mode=TLSMode.DANE, source=PolicySource.DANE, tlsa=tlsa, dane_names=(HOST, domain)
    )


def keys_for_two_domains(*tlsa: TLSARecord) -> tuple[object, object]:
    opener = Opener(Config(helo_name="client.test"))
    return (
        opener.key(HOST, IP, dane(*tlsa, domain="example.org")),
        opener.key(HOST, IP, dane(*tlsa, domain="example.net")),
    )


def test_dane_ee_connections_are_shared_by_domains_with_the_same_mx() -> None:
    org, net = keys_for_two_domains(EE)
    assert org == net


def test_a_pkix_usage_checks_no_name_either() -> None:
    # Usages 0 and 1 are never usable for SMTP (RFC 7672 §3.1.3): only EE decides here.
    org, net = keys_for_two_domains(EE, PKIX_TA)
    assert org == net


def test_dane_ta_connections_are_kept_apart_by_the_reference_names() -> None:
    org, net = keys_for_two_domains(TA)
    assert org != net
    org, net = keys_for_two_domains(EE, TA)  # the certificate may have matched either
    assert org != net


def test_the_same_names_share_a_dane_ta_connection() -> None:
    opener = Opener(Config(helo_name="client.test"))
    need = dane(TA, domain="example.org")
    assert opener.key(HOST, IP, need) == opener.key(HOST, IP, dane(TA, domain="example.org"))

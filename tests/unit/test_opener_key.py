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
        mode=TLSMode.DANE,
        source=PolicySource.DANE,
        tlsa=tlsa,
        dane_names=(HOST,),
        dane_next_hops=(domain,),
    )


def keys_for_two_domains(*tlsa: TLSARecord, via_next_hop: bool = False) -> tuple[object, object]:
    opener = Opener(Config(helo_name="client.test"))
    return (
        opener.key(HOST, IP, dane(*tlsa, domain="example.org"), via_next_hop=via_next_hop),
        opener.key(HOST, IP, dane(*tlsa, domain="example.net"), via_next_hop=via_next_hop),
    )


def test_dane_ee_connections_are_shared_by_domains_with_the_same_mx() -> None:
    assert len(set(keys_for_two_domains(EE))) == 1
    # Whatever the connection says: DANE-EE checked no name.
    assert len(set(keys_for_two_domains(EE, via_next_hop=True))) == 1


def test_a_pkix_usage_checks_no_name_either() -> None:
    # Usages 0 and 1 are never usable for SMTP (RFC 7672 §3.1.3): only EE decides here.
    assert len(set(keys_for_two_domains(EE, PKIX_TA))) == 1


def test_dane_ta_accepted_for_the_hosts_names_is_shared_by_the_domains() -> None:
    assert len(set(keys_for_two_domains(TA))) == 1
    assert len(set(keys_for_two_domains(EE, TA))) == 1


def test_dane_ta_accepted_for_the_next_hop_alone_serves_that_domain_only() -> None:
    org, net = keys_for_two_domains(TA, via_next_hop=True)
    assert org != net
    mixed_org, mixed_net = keys_for_two_domains(EE, TA, via_next_hop=True)  # TA matched
    assert mixed_org != mixed_net
    opener = Opener(Config(helo_name="client.test"))
    shared = opener.key(HOST, IP, dane(TA, domain="example.org"))
    assert org != shared  # never found by a lookup for the host's own names
    again = opener.key(HOST, IP, dane(TA, domain="example.org"), via_next_hop=True)
    assert again == org

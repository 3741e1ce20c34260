"""DANE for an MX host that is an alias (RFC 7672 §2.2.3, §3.2.2): which TLSA base domains
are tried, in which order, and which names a DANE-TA certificate may carry. Pure logic."""

from __future__ import annotations

import hashlib

import pytest
import trustme
from tests.support.certs import der

from mailstrom.tls.dane import TLSALookup, reference_names, requirement_for, tlsa_base_domains
from mailstrom.tls.danematch import DaneMatch, DaneMismatch, check_chain, match_chain
from mailstrom.tls.requirement import TLSARecord, TLSMode

HOST = "mx.example.test"
TARGET = "real.hosting.test"


@pytest.mark.parametrize(
    ("canonical", "chain_secure", "alias_secure", "bases"),
    [
        # No alias: the host itself, when its address records validated.
        (None, True, False, (HOST,)),
        (None, False, True, ()),
        (HOST, True, False, (HOST,)),  # "expanded" to itself: no alias
        # A validated chain: the expanded name first, then the original name.
        (TARGET, True, False, (TARGET, HOST)),
        (TARGET, True, True, (TARGET, HOST)),
        # The chain did not validate: the expanded name is never trusted; the original
        # name only when its own CNAME record validated.
        (TARGET, False, True, (HOST,)),
        (TARGET, False, False, ()),
    ],
)
def test_tlsa_base_domains(
    canonical: str | None, chain_secure: bool, alias_secure: bool, bases: tuple[str, ...]
) -> None:
    assert (
        tlsa_base_domains(HOST, canonical, chain_secure=chain_secure, alias_secure=alias_secure)
        == bases
    )


NEXT_HOP = "example.test"


@pytest.mark.parametrize(
    ("base", "canonical", "chain_secure", "names"),
    [
        (HOST, None, True, (HOST,)),
        (TARGET, TARGET, True, (TARGET, HOST)),
        (HOST, TARGET, True, (HOST, TARGET)),
        (HOST, TARGET, False, (HOST,)),  # an unvalidated expansion names nothing
    ],
)
def test_reference_names(
    base: str, canonical: str | None, chain_secure: bool, names: tuple[str, ...]
) -> None:
    assert reference_names(base, HOST, canonical, chain_secure=chain_secure) == names


def dane_ee_lookup() -> TLSALookup:
    record = TLSARecord(usage=3, selector=1, matching=1, data=b"x" * 32)
    return TLSALookup(host=TARGET, records=(record,), secure=True, exists=True)


def test_the_requirement_carries_the_next_hop_beside_the_hosts_names() -> None:
    # Validated MX records: the domain they belong to is acceptable too, kept apart from
    # the host's names (which come first: the first is the SNI name).
    need = requirement_for(dane_ee_lookup(), names=(TARGET, HOST), next_hops=(NEXT_HOP,))
    assert need is not None
    assert need.dane_names == (TARGET, HOST)
    assert need.dane_next_hops == (NEXT_HOP,)


def test_the_requirement_carries_the_next_hops_expansion_after_the_domain() -> None:
    # The recipient domain is an alias whose validated chain led to the MX records: its
    # expansion is a next-hop name too (RFC 7672 §3.2.2), after the name as addressed.
    expanded = "mail.provider.test"
    need = requirement_for(dane_ee_lookup(), names=(TARGET, HOST), next_hops=(NEXT_HOP, expanded))
    assert need is not None
    assert need.dane_next_hops == (NEXT_HOP, expanded)
    # An expansion that is the MX host's own name is among the host's names already.
    need = requirement_for(dane_ee_lookup(), names=(TARGET, HOST), next_hops=(NEXT_HOP, HOST))
    assert need is not None and need.dane_next_hops == (NEXT_HOP,)


def test_an_implicit_mx_or_a_next_hop_among_the_names_adds_nothing() -> None:
    # No MX records: the worker gives no next-hop domain, and the host is the domain.
    need = requirement_for(dane_ee_lookup(), names=(NEXT_HOP,), next_hops=())
    assert need is not None and need.dane_next_hops == ()
    # MX records naming the domain itself: no name twice.
    need = requirement_for(dane_ee_lookup(), names=(NEXT_HOP,), next_hops=(NEXT_HOP,))
    assert need is not None and need.dane_next_hops == ()


def test_the_requirement_names_the_base_domain_and_carries_the_reference_names() -> None:
    record = TLSARecord(usage=3, selector=1, matching=1, data=b"x" * 32)
    found = TLSALookup(host=TARGET, records=(record,), secure=True, exists=True)
    need = requirement_for(found, names=(TARGET, HOST))
    assert need is not None and need.mode is TLSMode.DANE
    assert f"_25._tcp.{TARGET}." in need.reason
    assert need.dane_names == (TARGET, HOST)


def test_dane_ta_accepts_a_leaf_for_any_reference_name_and_only_those() -> None:
    ca = trustme.CA()
    anchor = der(ca.cert_pem.bytes())
    tlsa = [TLSARecord(usage=2, selector=0, matching=1, data=hashlib.sha256(anchor).digest())]
    for_target = der(ca.issue_cert(TARGET).cert_chain_pems[0].bytes())
    names = (TARGET, HOST)
    assert check_chain([for_target, anchor], tlsa, host=HOST, names=names).startswith("DANE-TA")
    # Without the expansion among the names, the MX host name alone is checked.
    with pytest.raises(DaneMismatch, match=f"not valid for {HOST} "):
        check_chain([for_target, anchor], tlsa, host=HOST)
    for_next_hop = der(ca.issue_cert(NEXT_HOP).cert_chain_pems[0].bytes())
    with_next_hop = (*names, NEXT_HOP)
    assert check_chain([for_next_hop, anchor], tlsa, host=HOST, names=with_next_hop)
    with pytest.raises(DaneMismatch, match=f"not valid for {TARGET} or {HOST} "):
        check_chain([for_next_hop, anchor], tlsa, host=HOST, names=names)
    elsewhere = der(ca.issue_cert("elsewhere.example").cert_chain_pems[0].bytes())
    with pytest.raises(DaneMismatch, match=f"not valid for {TARGET} or {HOST}"):
        check_chain([elsewhere, anchor], tlsa, host=HOST, names=names)


def test_a_dane_ta_match_names_the_first_reference_name_the_leaf_is_valid_for() -> None:
    ca = trustme.CA()
    anchor = der(ca.cert_pem.bytes())
    tlsa = [TLSARecord(usage=2, selector=0, matching=1, data=hashlib.sha256(anchor).digest())]
    names = (HOST, NEXT_HOP)
    for_both = der(ca.issue_cert(NEXT_HOP, HOST).cert_chain_pems[0].bytes())
    assert match_chain([for_both, anchor], tlsa, host=HOST, names=names).name == HOST
    for_next_hop = der(ca.issue_cert(NEXT_HOP).cert_chain_pems[0].bytes())
    match = match_chain([for_next_hop, anchor], tlsa, host=HOST, names=names)
    assert match == DaneMatch("DANE-TA 0 1", NEXT_HOP)
    ee = TLSARecord(usage=3, selector=0, matching=1, data=hashlib.sha256(for_next_hop).digest())
    assert match_chain([for_next_hop], [ee], host=HOST, names=names) == DaneMatch("DANE-EE 0 1")

"""Counting malformed TLSA records in a DNS message: exactly what dnspython refuses."""

from __future__ import annotations

import struct

import dns.message
import dns.rdatatype
import dns.version
import pytest

from mailstrom.tls.tlsa_lenient import Malformed, malformed_tlsa

NAME = "_25._tcp.mx.example.test."


def answer_with(*rdatas: tuple[int, bytes], ttls: tuple[int, ...] = ()) -> bytes:
    """A response to a TLSA query whose answer section holds these raw records (type,
    data; TTL 300 unless ``ttls`` says), the owner a pointer to the question name; no
    other section."""
    query = dns.message.make_query(NAME, dns.rdatatype.TLSA, use_edns=False)
    wire = bytearray(dns.message.make_response(query).to_wire())
    for i, (rdtype, rdata) in enumerate(rdatas):
        ttl = ttls[i] if i < len(ttls) else 300
        wire += struct.pack("!HHHIH", 0xC00C, rdtype, 1, ttl, len(rdata)) + rdata
    wire[6:8] = struct.pack("!H", len(rdatas))
    return bytes(wire)


def tlsa(usage: int, selector: int, matching: int, data: bytes) -> tuple[int, bytes]:
    return dns.rdatatype.TLSA, bytes((usage, selector, matching)) + data


GOOD = [
    tlsa(3, 1, 1, bytes(32)),
    tlsa(2, 0, 2, bytes(64)),
    tlsa(3, 0, 0, b"\x30"),
    tlsa(3, 1, 7, b""),
]
SHORT = [(52, b"\x03\x01"), (52, b"")]
"""Shorter than the three fields: refused by every dnspython."""
WRONG_SIZE = [tlsa(3, 1, 1, bytes(31)), tlsa(3, 1, 1, b""), tlsa(2, 1, 2, bytes(65))]
"""A digest that does not fit its matching type: refused from dnspython 2.9.1 on (earlier
versions read it, and the DANE lookup sets it aside)."""
REFUSES_WRONG_SIZES = (dns.version.MAJOR, dns.version.MINOR, dns.version.MICRO) >= (2, 9, 1)
BAD = SHORT + WRONG_SIZE
REFUSED = SHORT + WRONG_SIZE if REFUSES_WRONG_SIZES else SHORT


@pytest.mark.parametrize(
    "records", [GOOD, BAD, GOOD + BAD, WRONG_SIZE[:1] + GOOD[:1], SHORT[:1] + GOOD[:1]]
)
def test_the_count_is_what_dnspython_refuses(records: list[tuple[int, bytes]]) -> None:
    wire = answer_with(*records)
    refused = dns.message.from_wire(wire, continue_on_error=True).errors
    found = malformed_tlsa(wire)
    assert found.count == len(refused) == sum(r in REFUSED for r in records)
    assert found.ttl == (300 if found.count else None)


def test_the_smallest_ttl_of_the_malformed_records() -> None:
    wire = answer_with(SHORT[0], GOOD[0], SHORT[1], ttls=(60, 10, 30))
    assert malformed_tlsa(wire) == Malformed(count=2, ttl=30)


def test_other_record_types_are_not_counted() -> None:
    # An A record of three octets is broken too, but not a TLSA record: the caller then
    # sees more errors than malformed TLSA records and believes nothing.
    wire = answer_with(tlsa(3, 1, 1, bytes(32)), (dns.rdatatype.A, b"\x01\x02\x03"))
    assert malformed_tlsa(wire).count == 0
    assert len(dns.message.from_wire(wire, continue_on_error=True).errors) == 1


@pytest.mark.parametrize("cut", [5, 20, -1])
def test_a_message_that_cannot_be_walked_is_an_error(cut: int) -> None:
    with pytest.raises(ValueError, match="unreadable DNS message"):
        malformed_tlsa(answer_with(*GOOD)[:cut])

"""Asking for TLSA records again when dnspython refused the answer: the failure path of
:func:`~mailstrom.tls.dane.lookup_tlsa`.

dnspython refuses a whole DNS response when one TLSA record's data does not fit its
matching type (a SHA-256 digest that is not 32 octets, a SHA-512 one that is not 64: RFC
6698 §2.1.3) or is shorter than its three fields. Its resolver then drops the response
(UDP) and waits for another until its lifetime ends, or gives up on the server (TCP), so a
zone publishing one such record next to good ones made the host unusable for good. RFC
7672 §2.2 (and RFC 7671) would have that record *unusable* and the others used, as
Postfix does (it drops a "malformed digest" record with a warning).

:func:`ask_leniently` asks the resolver's nameservers once more, itself, with the
resolver's own query flags (RD, AD, EDNS with DO), and reads the answer with
``dns.message.from_wire(..., continue_on_error=True)``: dnspython then leaves out the
records it cannot parse and lists them in ``message.errors``. The answer is believed only
when those errors are exactly the malformed TLSA records of its answer section, counted
here from the wire (:func:`malformed_tlsa`); anything else wrong with it raises, and the
lookup fails as it did before. Everything is bounded: one datagram of at most 64 KiB (or
one TCP message, whose length prefix allows no more), and the caller's deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.wire

__all__ = ["Malformed", "ask_leniently", "malformed_tlsa"]

_HEADER = 12


@dataclass(frozen=True, slots=True, kw_only=True)
class Malformed:
    """The TLSA records of an answer section that dnspython cannot parse."""

    count: int = 0
    ttl: int | None = None
    """The smallest TTL among them (None when there are none)."""


def _is_malformed(rdata: bytes) -> bool:
    """Whether the installed dnspython refuses this TLSA record data, in its own words:
    every version refuses data shorter than the three fields; from 2.9.1 on it also
    refuses a digest whose size does not fit its matching type (RFC 6698 §2.1.3), which
    earlier versions read (:func:`mailstrom.tls.dane.lookup_tlsa` sets those aside)."""
    try:
        dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.TLSA, rdata, 0, len(rdata))
    except dns.exception.FormError:
        return True
    return False


def _skip_name(parser: dns.wire.Parser) -> None:
    """Read past one owner name, compression pointers followed. Not ``parser.get_name``:
    before dnspython 2.9 it has no ``decompress`` argument, and from 2.9 on it refuses
    pointers unless given ``decompress=True``; ``from_wire_parser`` follows them in both."""
    dns.name.from_wire_parser(parser)


def malformed_tlsa(wire: bytes) -> Malformed:
    """The malformed TLSA records in the answer section of DNS message ``wire``.

    Raises ValueError when the message cannot be walked record by record (then nothing
    in it can be believed)."""
    parser = dns.wire.Parser(wire)
    try:
        _id, _flags, questions, answers, _ns, _ar = parser.get_struct("!HHHHHH")
        for _ in range(questions):
            _skip_name(parser)
            parser.get_struct("!HH")
        count, ttl = 0, None
        for _ in range(answers):
            _skip_name(parser)
            rdtype, _rdclass, rr_ttl, rdlen = parser.get_struct("!HHIH")
            rdata = parser.get_bytes(rdlen)
            if rdtype == dns.rdatatype.TLSA and _is_malformed(rdata):
                count += 1
                ttl = rr_ttl if ttl is None else min(ttl, rr_ttl)
    except (dns.exception.DNSException, struct.error) as exc:
        raise ValueError(f"unreadable DNS message: {exc}") from exc
    return Malformed(count=count, ttl=ttl)


def _query(resolver: dns.resolver.BaseResolver, qname: dns.name.Name) -> dns.message.Message:
    """The query the resolver itself would send (``dns.resolver._Resolution``)."""
    query = dns.message.make_query(qname, dns.rdatatype.TLSA)
    query.use_edns(
        resolver.edns, resolver.ednsflags, resolver.payload, options=resolver.ednsoptions
    )
    if resolver.flags is not None:
        query.flags = dns.flags.Flag(resolver.flags)
    return query


def _servers(resolver: dns.resolver.BaseResolver) -> list[tuple[str, int]]:
    """The resolver's plain-DNS nameservers as (address, port)."""
    servers = []
    for server in resolver.nameservers:
        if isinstance(server, dns.nameserver.Do53Nameserver):
            servers.append((server.address, server.port))
        elif isinstance(server, str):
            try:
                ipaddress.ip_address(server)
            except ValueError:
                continue  # a DNS-over-HTTPS URL: not asked again here
            servers.append((server, resolver.nameserver_ports.get(server, resolver.port)))
    return servers


class _Datagrams(asyncio.DatagramProtocol):
    """Hands the datagrams of a connected UDP socket (only its peer's reach it) to a
    queue, and an ICMP error (nobody listening there) as an OSError."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes | OSError] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.received.put_nowait(exc if isinstance(exc, OSError) else OSError(str(exc)))


def _lenient(wire: bytes) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(wire, continue_on_error=True)
    except dns.exception.FormError:
        return None  # shorter than a header: not a DNS message


async def _udp(query: dns.message.Message, address: str, port: int) -> bytes:
    """The first datagram from ``address``:``port`` that answers ``query`` (any other is
    ignored, as dnspython does)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _Datagrams, remote_addr=(address, port)
    )
    try:
        transport.sendto(query.to_wire())
        while True:
            data = await protocol.received.get()
            if isinstance(data, OSError):
                raise data
            response = _lenient(data)
            if response is not None and query.is_response(response):
                return data
    finally:
        transport.close()


async def _tcp(query: dns.message.Message, address: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(address, port)
    try:
        wire = query.to_wire()
        writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(size)
    finally:
        writer.close()


async def _exchange(query: dns.message.Message, address: str, port: int) -> bytes:
    """``query``'s answer from one server: UDP, then TCP when the answer is truncated."""
    wire = await _udp(query, address, port)
    if len(wire) >= _HEADER and wire[2] & (dns.flags.TC >> 8):
        wire = await _tcp(query, address, port)
    return wire


def _believed(
    query: dns.message.Message, wire: bytes
) -> tuple[dns.message.QueryMessage, Malformed]:
    response = _lenient(wire)
    if not isinstance(response, dns.message.QueryMessage) or not query.is_response(response):
        raise ValueError("the TLSA answer does not answer the query")
    malformed = malformed_tlsa(wire)
    errors = len(response.errors)
    if errors != malformed.count:
        # Something else is wrong with this message: nothing in it is believed.
        raise ValueError(
            f"the TLSA answer has {errors} unreadable record(s), "
            f"{malformed.count} of them malformed TLSA records"
        )
    return response, malformed


async def ask_leniently(
    resolver: dns.resolver.BaseResolver, qname: dns.name.Name, deadline: float
) -> tuple[dns.message.QueryMessage, Malformed]:
    """Ask ``resolver``'s nameservers for ``qname``'s TLSA records until one answers or
    the event loop's clock reaches ``deadline``; return the answer, its malformed TLSA
    records left out, and what was left out.

    Raises TimeoutError at the deadline, OSError when no server could be reached, and
    ValueError for an answer that is broken otherwise."""
    query = _query(resolver, qname)
    servers = _servers(resolver)
    if not servers:
        raise OSError("the resolver has no nameserver to ask")
    loop = asyncio.get_running_loop()
    failure: OSError = TimeoutError("no time left to ask again")
    for tried, (address, port) in enumerate(servers):
        # An equal share of what is left to each server not yet asked.
        share = (deadline - loop.time()) / (len(servers) - tried)
        if share <= 0:
            break
        try:
            async with asyncio.timeout(share):
                wire = await _exchange(query, address, port)
        except TimeoutError:
            failure = TimeoutError(f"{address}:{port} did not answer within {share:.2f} s")
            continue
        except (OSError, asyncio.IncompleteReadError) as exc:
            failure = OSError(f"{address}:{port}: {exc}")
            continue
        return _believed(query, wire)
    raise failure

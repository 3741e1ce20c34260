"""Asking again for TLSA records over real sockets: a truncated UDP answer is asked for
over TCP, and an answer broken otherwise than by malformed TLSA records is not believed."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import dns.asyncresolver
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import pytest

from mailstrom.tls.tlsa_lenient import ask_leniently

NAME = dns.name.from_text("_25._tcp.mx.example.test.")
GOOD = b"\x03\x01\x01" + bytes(32)
MALFORMED = b"\x03\x01"
"""Shorter than a TLSA record's three fields: every dnspython refuses it."""


def reply(query: bytes, *rdatas: tuple[int, bytes], truncated: bool = False) -> bytes:
    """An answer to ``query`` holding these raw records (type, data), AD set."""
    response = dns.message.make_response(dns.message.from_wire(query))
    response.flags |= dns.flags.AD | (dns.flags.TC if truncated else 0)
    response.use_edns(False)
    wire = bytearray(response.to_wire())
    for rdtype, rdata in rdatas:
        wire += struct.pack("!HHHIH", 0xC00C, rdtype, 1, 300, len(rdata)) + rdata
    wire[6:8] = struct.pack("!H", len(rdatas))
    return bytes(wire)


class Server(asyncio.DatagramProtocol):
    """UDP and TCP on one loopback port: UDP answers truncated, TCP in full."""

    def __init__(self, *rdatas: tuple[int, bytes]) -> None:
        self.rdatas = rdatas
        self.tcp_queries = 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(reply(data, truncated=True), addr)

    async def stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        self.tcp_queries += 1
        answer = reply(await reader.readexactly(size), *self.rdatas)
        writer.write(struct.pack("!H", len(answer)) + answer)
        await writer.drain()
        writer.close()


Started = tuple[Server, dns.asyncresolver.Resolver]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Started]]]:
    """Start a server answering with these records; a resolver naming it."""
    closers: list[Callable[[], None]] = []

    async def start(*rdatas: tuple[int, bytes]) -> Started:
        server = Server(*rdatas)
        tcp = await asyncio.start_server(server.stream, "127.0.0.1", 0)
        port = tcp.sockets[0].getsockname()[1]
        udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: server, local_addr=("127.0.0.1", port)
        )
        closers.extend([tcp.close, udp.close])
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = port
        return server, resolver

    yield start
    for close in closers:
        close()


async def test_a_truncated_answer_is_asked_for_over_tcp(serve: Any) -> None:
    server, resolver = await serve((dns.rdatatype.TLSA, GOOD), (dns.rdatatype.TLSA, MALFORMED))
    deadline = asyncio.get_running_loop().time() + 2.0
    response, malformed = await ask_leniently(resolver, NAME, deadline)
    assert server.tcp_queries == 1
    assert response.flags & dns.flags.AD
    [rrset] = response.answer
    assert [rdata.cert for rdata in rrset] == [bytes(32)]
    assert malformed.count == 1


async def test_an_answer_broken_otherwise_is_not_believed(serve: Any) -> None:
    # An A record of three octets beside the TLSA records: not a malformed TLSA record.
    _, resolver = await serve((dns.rdatatype.TLSA, GOOD), (dns.rdatatype.A, b"\x01\x02\x03"))
    deadline = asyncio.get_running_loop().time() + 2.0
    with pytest.raises(ValueError, match="1 unreadable record"):
        await ask_leniently(resolver, NAME, deadline)


async def test_nobody_listening_is_an_os_error_before_the_deadline() -> None:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = 9  # discard: nothing listens on loopback
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(OSError, match=r"refused|unreachable"):
        await ask_leniently(resolver, NAME, started + 0.5)
    assert loop.time() - started < 0.6

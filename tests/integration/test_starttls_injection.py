"""Hardening #1: STARTTLS response injection (RFC 3207 §4.2; CVE-2011-0411, client side).

A hostile server (or a man in the middle) answers STARTTLS with ``220`` and, in the same
segment or right behind it, plaintext replies that a vulnerable client would read as if
they had come over TLS. The peer here is a raw asyncio server scripted to do exactly that;
no SMTP library would misbehave this way on purpose.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme

from mailstrom.config import EventLoop, Timeouts
from mailstrom.errors import DeliveryError, SMTPProtocolError
from mailstrom.runtime.connection import SMTPConnection, StartTLS
from mailstrom.runtime.loops import run
from tests.support.delivery import LOOPS

FAST = Timeouts(connect=5, greeting=5, command=5, data_init=5, data_block=5, data_end=5)
FORGED = (
    b"250-mx.evil\r\n250 PIPELINING\r\n"  # the "EHLO over TLS" reply
    b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 go\r\n250 2.0.0 FORGED\r\n"
)


def starttls_reply(size: int) -> bytes:
    """A 220 reply to STARTTLS of exactly ``size`` octets, multi-line when long (every
    line stays under the client's 64 KiB line limit)."""
    lines: list[bytes] = []
    remaining = size
    while remaining > 1000:
        line = b"220-" + b"x" * (1000 - 6) + b"\r\n"
        lines.append(line)
        remaining -= len(line)
    last = b"220 " + b"y" * (remaining - 6) + b"\r\n"
    assert len(last) == remaining and remaining >= 6
    reply = b"".join([*lines, last])
    assert len(reply) == size
    return reply


Script = Callable[[asyncio.StreamWriter, bytes], Awaitable[None]]


async def hostile_server(script: Script, tls: ssl.SSLContext) -> AsyncIterator[int]:
    """Greets, offers STARTTLS, runs ``script`` to answer it, then completes a genuine TLS
    handshake with a certificate the client trusts (as a man in the middle relaying the
    real server would) and takes whatever comes over TLS without answering: a fooled
    client finds its replies already waiting in its buffers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 mx.evil ESMTP\r\n")
            await reader.readline()  # EHLO
            writer.write(b"250-mx.evil\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            await reader.readline()  # STARTTLS
            await script(writer, b"")
            await writer.drain()
            await writer.start_tls(tls)
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


def same_write(size: int) -> Script:
    async def script(writer: asyncio.StreamWriter, _: bytes) -> None:
        writer.write(starttls_reply(size) + FORGED)

    return script


def split_writes(size: int, pause: float) -> Script:
    async def script(writer: asyncio.StreamWriter, _: bytes) -> None:
        writer.write(starttls_reply(size))
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)  # the forged replies come in a later segment
        writer.write(FORGED)

    return script


def split_inside_reply(size: int, cut: int) -> Script:
    async def script(writer: asyncio.StreamWriter, _: bytes) -> None:
        wire = starttls_reply(size) + FORGED
        writer.write(wire[:cut])
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(wire[cut:])

    return script


SCRIPTS = {
    "small reply, same write": same_write(40),
    "64 KiB reply, same write": same_write(65536),
    "128 KiB reply, same write": same_write(131072),
    "128 KiB + 1 reply, same write": same_write(131073),
    "256 KiB reply, same write": same_write(262144),
    "small reply, next segment at once": split_writes(40, 0),
    "128 KiB reply, next segment at once": split_writes(131072, 0),
    "small reply, next segment later": split_writes(40, 0.05),
    "cut just before the reply's end": split_inside_reply(131072, 131071),
    "cut just after the reply's end": split_inside_reply(131072, 131073),
}


@pytest.mark.parametrize("mode", [StartTLS.VERIFY, StartTLS.REQUIRED, StartTLS.OPPORTUNISTIC])
@pytest.mark.parametrize("name", list(SCRIPTS))
async def test_octets_after_the_starttls_reply_abort_the_connection(
    name: str,
    mode: StartTLS,
    client_tls_context: ssl.SSLContext,
    server_tls_context: ssl.SSLContext,
) -> None:
    """Hardening #1: any octet after the 220 to STARTTLS, however it is split into segments,
    ends the connection; nothing forged is ever taken for a reply over TLS."""
    async for port in hostile_server(SCRIPTS[name], server_tls_context):
        with pytest.raises(DeliveryError) as caught:
            await open_and_send(port, mode, client_tls_context)
        assert "FORGED" not in str(caught.value)


async def open_and_send(port: int, mode: StartTLS, context: ssl.SSLContext) -> None:
    conn = await SMTPConnection.open(
        host="mx.test",
        ip="127.0.0.1",
        port=port,
        helo_name="client.test",
        timeouts=FAST,
        starttls=mode,
        tls_context=context,
    )
    try:
        result = await conn.send(
            envelope_from="a@a.test",
            recipients=["b@b.test"],
            data=b"Subject: x\r\n\r\nx\r\n",
            smtputf8=False,
            eightbit=False,
        )
    finally:
        await conn.close()
    pytest.fail(f"the connection went on after an injected reply: {result}")


async def handshake_then_talk(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: ssl.SSLContext
) -> None:
    """The server's side of a TLS handshake over memory BIOs, with ``250 early`` sent
    over TLS in the same segment as the handshake's last flight: before any EHLO."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = tls.wrap_bio(incoming, outgoing, server_side=True)
    while True:
        try:
            tls_object.do_handshake()
            break
        except ssl.SSLWantReadError:
            writer.write(outgoing.read())
            await writer.drain()
            data = await reader.read(65536)
            if not data:
                return
            incoming.write(data)
    tls_object.write(b"250 early\r\n")
    writer.write(outgoing.read())
    await writer.drain()
    await reader.read(65536)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reply_over_tls_before_ehlo_is_a_protocol_error(
    loop: EventLoop, tls_ca: trustme.CA, client_tls_context: ssl.SSLContext
) -> None:
    """A reply that comes with the server's last TLS handshake flight (TLS 1.2, where the
    server finishes the handshake) reaches the session before ``start_tls`` returns: it
    answers no command, and is a protocol error like any unsolicited line, not a local
    error of a session that was closed under the client's feet.

    On uvloop it reached the session only after ``start_tls`` returned, in a later turn of
    the loop, by which time EHLO was on the wire: "250 early" was taken for the reply to
    EHLO, and every reply after it was paired with the command before its own (a refusal
    of one recipient recorded for the next)."""
    tls12 = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    tls_ca.issue_cert("mx.test").configure_cert(tls12)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 mx.evil ESMTP\r\n")
            await reader.readline()  # EHLO
            writer.write(b"250-mx.evil\r\n250 STARTTLS\r\n")
            await reader.readline()  # STARTTLS
            writer.write(b"220 go ahead\r\n")
            await handshake_then_talk(reader, writer, tls12)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            for mode in (StartTLS.VERIFY, StartTLS.OPPORTUNISTIC):
                with pytest.raises(SMTPProtocolError, match="unsolicited reply: 250 early"):
                    await open_and_send(port, mode, client_tls_context)

    run(main(), loop)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_greeting_again_over_tls_is_a_protocol_error_not_the_reply_to_ehlo(
    loop: EventLoop,
    version: ssl.TLSVersion,
    tls_ca: trustme.CA,
    client_tls_context: ssl.SSLContext,
) -> None:
    """A server that greets again once TLS is up ("220 ... ESMTP", which RFC 3207 §4.2
    does not have it send) is otherwise a working server. Under TLS 1.3 the greeting
    comes after the client's EHLO has left, and "220" was taken for the reply to EHLO
    (any 2xx was): every later reply answered the command before its own, and a
    recipient was refused with the reply to the one before it ("550 5.1.1 r1 unknown"
    recorded for r2). RFC 5321 §4.1.1.1 answers EHLO and HELO with 250; anything else
    positive is a protocol error, before any transaction."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.minimum_version = server_context.maximum_version = version
    tls_ca.issue_cert("mx.test").configure_cert(server_context)
    recipients: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 mx.test ESMTP\r\n")
            await reader.readline()  # EHLO
            writer.write(b"250-mx.test\r\n250 STARTTLS\r\n")
            await reader.readline()  # STARTTLS
            writer.write(b"220 go ahead\r\n")
            await writer.drain()
            await writer.start_tls(server_context)
            writer.write(b"220 mx.test ESMTP again\r\n")
            while line := await reader.readline():
                if line.startswith(b"EHLO"):
                    writer.write(b"250-mx.test\r\n250 8BITMIME\r\n")
                elif line.startswith(b"RCPT"):
                    recipients.append(line)
                    refused = line.startswith(b"RCPT TO:<r1@")
                    writer.write(b"550 5.1.1 r1 unknown\r\n" if refused else b"250 ok\r\n")
                elif line.startswith(b"DATA"):
                    writer.write(b"354 go\r\n")
                    while await reader.readline() not in (b".\r\n", b""):
                        pass
                    writer.write(b"250 queued\r\n")
                elif line.startswith(b"QUIT"):
                    writer.write(b"221 bye\r\n")
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(SMTPProtocolError, match=r"220 mx\.test ESMTP again"):
                await SMTPConnection.open(
                    host="mx.test",
                    ip="127.0.0.1",
                    port=port,
                    helo_name="client.test",
                    timeouts=FAST,
                    starttls=StartTLS.OPPORTUNISTIC,
                    tls_context=client_tls_context,
                )

    run(main(), loop)
    assert recipients == []

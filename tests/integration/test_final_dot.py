"""When a session ends between the content and the reply to it: did the final dot leave?

A connection lost after the final dot left this process is *uncertain* (the server may have
taken the message, RFC 5321 §4.5.3.2.6); one lost before it left has delivered nothing and
is tried again at once. With ``retry_uncertain=False`` an uncertain result counts as
delivered, so calling a dot "sent" that never left would lose the message.

The peers are scripted on plain blocking sockets in a thread of their own, so that what the
peer does (reset, read nothing, read everything) happens whatever the client's event loop
is doing; each test runs on asyncio's loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import replace
from typing import Any

import pytest

from mailstrom.config import Timeouts, uvloop_available
from mailstrom.errors import DeliveryError, SMTPConnectError, SMTPProtocolError, SMTPTimeout
from mailstrom.runtime.connection import SMTPConnection, StartTLS, TransactionResult

LOOPS = [
    "asyncio",
    # Skipped before the peer starts: a peer thread never connected to fails its test.
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(not uvloop_available(), reason="uvloop is not installed"),
    ),
]
WAIT = 10.0  # bound on every wait of the peer thread
BIG = 16 * 1024 * 1024  # more than the kernel buffers of both ends hold for a peer not reading

Script = Callable[["Peer"], None]


def run(loop: str, coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro())
    else:
        asyncio.run(coro())


class Peer:
    """One SMTP peer connection, driven line by line by a test's script in a thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | ssl.SSLSocket = sock
        self.sock.settimeout(WAIT)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, marker: bytes, size: int = 1 << 20, pause: float = 0.0) -> bytes:
        while marker not in self.pending:
            chunk = self.sock.recv(size)
            if not chunk:
                raise ConnectionError("client went away")
            self.pending += chunk
            time.sleep(pause)
        head, _, self.pending = self.pending.partition(marker)
        return head + marker

    def hello(self, extensions: bytes = b"PIPELINING") -> None:
        self.send(b"220 peer.test\r\n")
        self.read_until(b"\r\n")  # EHLO
        self.send(b"250-peer.test\r\n250 " + extensions + b"\r\n")

    def envelope(self) -> None:
        """Take pipelined MAIL, RCPT and DATA; accept both commands and ask for content."""
        self.read_until(b"DATA\r\n")
        self.send(b"250 ok\r\n250 ok\r\n354 go\r\n")

    def starttls(self, context: ssl.SSLContext) -> None:
        self.send(b"220 peer.test\r\n")
        self.read_until(b"\r\n")  # EHLO
        self.send(b"250-peer.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
        self.read_until(b"STARTTLS\r\n")
        self.send(b"220 go ahead\r\n")
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.sock.settimeout(WAIT)
        self.read_until(b"\r\n")  # EHLO again
        self.send(b"250-peer.test\r\n250 PIPELINING\r\n")

    def reset(self) -> None:
        """Close with an RST: nothing more is read from the client."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class ThreadPeer:
    def __init__(self, script: Script) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        # Small kernel buffers (inherited by the accepted socket): a slow reader then
        # drains the client's own write buffer in small steps.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self.port = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script: Script) -> None:
        self.listener.settimeout(WAIT)
        try:
            sock, _ = self.listener.accept()
            with sock:
                talk = Peer(sock)
                try:
                    script(talk)
                finally:
                    talk.sock.close()  # the TLS socket, once wrapped
        except (OSError, ssl.SSLError):
            pass  # the client hung up as the test expected, or the test fails on its side
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        assert not self.errors, self.errors


@pytest.fixture
def peer() -> Iterator[Callable[[Script], ThreadPeer]]:
    started: list[ThreadPeer] = []

    def start(script: Script) -> ThreadPeer:
        started.append(ThreadPeer(script))
        return started[-1]

    yield start
    for one in started:
        one.close()


TIMEOUTS = Timeouts(connect=5, greeting=5, command=5, data_init=5, data_block=5, data_end=5)


async def open_to(
    port: int, starttls: StartTLS = StartTLS.NEVER, timeouts: Timeouts = TIMEOUTS
) -> SMTPConnection:
    return await SMTPConnection.open(
        host="peer.test",
        ip="127.0.0.1",
        port=port,
        helo_name="client.test",
        timeouts=timeouts,
        starttls=starttls,
    )


def submit(conn: SMTPConnection, size: int = 100) -> Awaitable[TransactionResult]:
    body = b"Subject: hi\r\n\r\n" + (b"x" * 70 + b"\r\n") * (size // 72 + 1)
    return conn.submit(
        envelope_from="a@a.test",
        recipients=["b@b.test"],
        data=body,
        smtputf8=False,
        eightbit=False,
    )


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reset_before_the_content_is_written_sent_nothing(
    loop: str, peer: Callable[[Script], ThreadPeer]
) -> None:
    """The peer answers 354 and resets before the client gets to write the content: the
    write fails, the transport empties its buffer, and the session must say "nothing was
    sent" (an error), not "uncertain"."""
    envelope_in = threading.Event()
    reset_done = threading.Event()

    def script(p: Peer) -> None:
        p.hello()
        p.read_until(b"DATA\r\n")
        envelope_in.set()
        p.send(b"250 ok\r\n250 ok\r\n354 go\r\n")
        p.reset()
        reset_done.set()

    server = peer(script)

    async def client() -> None:
        conn = await open_to(server.port)
        pending = submit(conn)  # the pipelined envelope is written here
        # Keep the loop from reading the replies until the reset has arrived, so the
        # content's write meets a connection the peer has already reset.
        assert envelope_in.wait(WAIT) and reset_done.wait(WAIT)
        time.sleep(0.05)  # noqa: ASYNC251 - blocking the loop is the point
        with pytest.raises(SMTPConnectError):
            await pending
        await conn.close()

    run(loop, client)


@pytest.mark.parametrize("loop", LOOPS)
def test_under_tls_content_the_peer_never_read_was_not_sent(
    loop: str,
    peer: Callable[[Script], ThreadPeer],
    server_tls_context: ssl.SSLContext,
) -> None:
    """Over TLS the content waits below the TLS layer, where the TLS transport does not
    count it: a peer that reads none of it and resets got nothing, not "maybe all"."""

    def script(p: Peer) -> None:
        p.starttls(server_tls_context)
        p.envelope()
        time.sleep(0.5)  # the client writes what the buffers take, and waits
        p.reset()

    server = peer(script)

    async def client() -> None:
        conn = await open_to(server.port, StartTLS.OPPORTUNISTIC)
        assert conn.tls_version is not None
        with pytest.raises(SMTPConnectError):
            await submit(conn, BIG)
        await conn.close()

    run(loop, client)


@pytest.mark.parametrize("loop", LOOPS)
def test_under_implicit_tls_content_the_peer_never_read_was_not_sent(
    loop: str,
    peer: Callable[[Script], ThreadPeer],
    server_tls_context: ssl.SSLContext,
) -> None:
    """The same with TLS from the first octet (RFC 8314, a relay on port 465): the
    ciphertext below the TLS layer was taken for sent, so a message the peer never read
    was "maybe delivered" (delivered, with ``retry_uncertain=False``)."""

    def script(p: Peer) -> None:
        p.sock = server_tls_context.wrap_socket(p.sock, server_side=True)
        p.sock.settimeout(WAIT)
        p.hello()
        p.envelope()
        time.sleep(0.5)  # the client writes what the buffers take, and waits
        p.reset()

    server = peer(script)

    async def client() -> None:
        conn = await SMTPConnection.open(
            host="peer.test",
            ip="127.0.0.1",
            port=server.port,
            helo_name="client.test",
            timeouts=TIMEOUTS,
            starttls=StartTLS.OPPORTUNISTIC,
            implicit_tls=True,
        )
        assert conn.tls_version is not None
        with pytest.raises(SMTPConnectError):
            await submit(conn, BIG)
        await conn.close()

    run(loop, client)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_that_read_the_whole_content_and_hung_up_leaves_it_uncertain(
    loop: str,
    tls: bool,
    peer: Callable[[Script], ThreadPeer],
    server_tls_context: ssl.SSLContext,
) -> None:
    """The content was larger than the write buffer's high-water mark, so the transport
    paused the writer and resumed it with part of it still buffered. The peer read it to
    the final dot and hung up without a reply: the dot had left, so the result is
    uncertain (it may have been delivered), not an error that re-sends at once."""

    def script(p: Peer) -> None:
        if tls:
            p.starttls(server_tls_context)
        else:
            p.hello()
        p.envelope()
        time.sleep(0.2)  # the client's buffer fills past its high-water mark
        p.read_until(b"\r\n.\r\n", size=2000, pause=0.0002)
        if tls:
            time.sleep(0.1)  # the TLS layer may learn of the hang-up in its own order
        p.sock.close()

    server = peer(script)

    async def client() -> None:
        conn = await open_to(server.port, StartTLS.OPPORTUNISTIC if tls else StartTLS.NEVER)
        sock = conn._transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        result = await submit(conn, 400 * 1024)
        assert result.uncertain
        assert result.final is None
        assert isinstance(result.cause, SMTPConnectError)
        await conn.close()

    run(loop, client)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_3xx_other_than_354_to_data_ends_the_session(
    loop: str, peer: Callable[[Script], ThreadPeer]
) -> None:
    """A 3xx to DATA that is not 354 leaves the server in an unknown state (waiting for
    content, perhaps): the transaction fails as a protocol error, no content goes, and the
    connection is not used again, so no other message meets a session that cannot start a
    transaction."""

    def script(p: Peer) -> None:
        p.hello()
        p.read_until(b"DATA\r\n")
        p.send(b"250 ok\r\n250 ok\r\n334 what now\r\n")
        p.read_until(b"\r\n")  # whatever comes next, if anything

    server = peer(script)

    async def client() -> None:
        conn = await open_to(server.port)
        with pytest.raises(SMTPProtocolError, match="unexpected reply to DATA: 334 what now"):
            await submit(conn)
        assert not conn.usable
        await conn.close()

    run(loop, client)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_new_transaction_does_not_extend_the_wait_for_the_last_reply(
    loop: str, peer: Callable[[Script], ThreadPeer]
) -> None:
    """Each reply has its own deadline (RFC 5321 §4.5.3.2): submitting another message
    while the reply to a final dot is awaited must not restart that reply's clock."""
    data_end = 2.0

    def script(p: Peer) -> None:
        p.hello()
        p.envelope()
        p.read_until(b"\r\n.\r\n")
        time.sleep(WAIT / 2)  # never answers the final dot

    server = peer(script)

    async def client() -> None:
        conn = await open_to(server.port, timeouts=replace(TIMEOUTS, data_end=data_end))
        started = time.monotonic()
        first = asyncio.ensure_future(submit(conn))
        await asyncio.sleep(data_end * 0.6)
        second = asyncio.ensure_future(submit(conn))
        result = await first
        waited = time.monotonic() - started
        assert result.uncertain and isinstance(result.cause, SMTPTimeout)
        # Restarted, it would end 1.6 data_ends after the start; on time, after 1.0.
        assert waited < data_end * 1.4, waited
        with pytest.raises(DeliveryError):
            await second
        await conn.close()

    run(loop, client)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_that_reads_none_of_the_content_gets_the_data_block_timeout(
    loop: str, peer: Callable[[Script], ThreadPeer]
) -> None:
    """RFC 5321 §4.5.3.2: the content's writes each get ``data_block`` (3 minutes) to be
    taken, the reply ``data_end`` (10 minutes) once the final dot has gone. Was: content
    under the write buffer's high-water mark never paused the writer, so the deadline was
    ``data_end`` at once, with the content's tail and final dot still in this process: a
    peer that answered 354 and read nothing held the session for ``data_end``, which then
    named a reply to a dot the peer never got."""
    ended = threading.Event()

    def script(p: Peer) -> None:
        p.hello()
        p.envelope()
        ended.wait(WAIT)  # reads nothing more

    server = peer(script)

    async def client() -> None:
        conn = await open_to(server.port, timeouts=replace(TIMEOUTS, data_block=0.3, data_end=5))
        transport = conn._transport
        assert transport is not None
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        # More than the kernel buffers of both ends take, less than the high-water mark.
        pending = asyncio.ensure_future(submit(conn, 60 * 1024))
        try:
            for _ in range(int(WAIT / 0.001)):
                if transport.get_write_buffer_size():
                    break
                await asyncio.sleep(0.001)
            assert not conn._write_paused
            with pytest.raises(SMTPTimeout, match=r"did not take the message within 0\.3s"):
                await asyncio.wait_for(pending, WAIT)
        finally:
            ended.set()
            await conn.close()

    run(loop, client)


def test_a_peer_that_stops_reading_the_contents_tail_gets_the_data_block_timeout(
    peer: Callable[[Script], ThreadPeer],
) -> None:
    """As above, once the transport resumed the writer (its buffer under the low-water
    mark) with the tail of the content still in it: the deadline became ``data_end``
    there, and a peer that stopped reading held the session that long. (asyncio's loop
    alone: uvloop resumes the writer with its buffer empty.)"""
    stop = threading.Event()
    ended = threading.Event()

    def script(p: Peer) -> None:
        p.hello()
        p.envelope()
        time.sleep(0.2)  # the client's buffer fills past its high-water mark
        while not stop.is_set():  # a slow reader, until the client's writer is resumed
            if not p.sock.recv(2000):
                raise ConnectionError("client went away")
            time.sleep(0.005)
        ended.wait(WAIT)  # reads nothing more

    server = peer(script)

    async def client() -> None:
        conn = await open_to(server.port, timeouts=replace(TIMEOUTS, data_block=0.3, data_end=5))
        transport = conn._transport
        assert transport is not None
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        pending = asyncio.ensure_future(submit(conn, 200 * 1024))
        try:
            paused = False
            for _ in range(int(WAIT / 0.001)):
                paused = paused or conn._write_paused
                if paused and not conn._write_paused and transport.get_write_buffer_size() > 8192:
                    break  # resumed, with the tail and its final dot still here
                await asyncio.sleep(0.001)
            else:
                raise AssertionError("the writer was never resumed with content left to write")
            stop.set()
            with pytest.raises(SMTPTimeout, match=r"did not take the message within 0\.3s"):
                await asyncio.wait_for(pending, WAIT)
        finally:
            stop.set()
            ended.set()
            await conn.close()

    run("asyncio", client)

"""SMTP peers that misbehave on purpose: replies dripped a byte at a time, lines nobody asked
for, absurd EHLO parameters, nonsense after the final dot.

The hostile peer is a raw asyncio server scripted per test (no SMTP library misbehaves
like this); the healthy MX beside it, where one is needed, is aiosmtpd on 127.0.0.1 with
the hostile one on 127.0.0.2, same port. Timeouts are fractions of a second, and the
tests measure that each wait ends within about its timeout, not later.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from mailstrom import AsyncMailstrom, Config, Email, RecipientState, Timeouts, TLSPolicy
from mailstrom.errors import (
    DeliveryError,
    PermanentFailure,
    RequireTLSFailure,
    SMTPConnectError,
    SMTPProtocolError,
    SMTPTimeout,
    TemporaryFailure,
    TLSRequiredError,
)
from mailstrom.runtime import connection
from mailstrom.runtime.connection import SMTPConnection, StartTLS, TransactionResult
from mailstrom.runtime.outcomes import Outcomes, Where, _uncertain_reason
from mailstrom.runtime.transactions import answered_before
from mailstrom.smtp import replies
from mailstrom.status import MessageStatus, ReasonClass
from mailstrom.stores import MemoryStore
from mailstrom.stores.base import LeasedRecipient, WorkItem
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import Results, loopback_config
from tests.support.skew import eventually

TIMEOUT = 0.5
QUICK = Timeouts(
    connect=2,
    greeting=TIMEOUT,
    command=TIMEOUT,
    data_init=TIMEOUT,
    data_block=TIMEOUT,
    data_end=TIMEOUT,
)
# Well past any timeout here, far short of what a dripping peer could hold us for.
WITHIN = TIMEOUT + 0.6
GIVE_UP = 10.0
GAP = 0.05  # between two dripped octets: ten of them inside one timeout
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def peer(
    handle: Handler, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None
) -> AsyncIterator[int]:
    """Run ``handle`` for every connection to ``host``; yields the port. Handlers still
    running (a peer dripping forever) are cancelled at the end."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handle(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    if sock is None:
        server = await asyncio.start_server(run, host, port)
    else:
        server = await asyncio.start_server(run, sock=sock)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class HangUp:
    """What a scripted peer does instead of a reply: sends ``last`` (if any), then hangs up."""

    last: bytes = b""


PIPELINING = b"250-hostile.test\r\n250 PIPELINING\r\n"


def scripted(
    answer: Callable[[bytes], bytes | HangUp | None], *, ehlo: bytes = PIPELINING
) -> Handler:
    """A peer that greets, answers EHLO with ``ehlo`` and every other line with what
    ``answer`` gives for it: a reply, :class:`HangUp`, or None for "250 ok"."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hostile.test ESMTP\r\n")
        while line := await reader.readline():
            reply = ehlo if line[:4].upper() == b"EHLO" else answer(line)
            if isinstance(reply, HangUp):
                writer.write(reply.last)
                await writer.drain()
                return
            writer.write(b"250 ok\r\n" if reply is None else reply)
            await writer.drain()

    return handle


def ehlo_for(pipelining: bool) -> bytes:
    return PIPELINING if pipelining else b"250 x\r\n"


async def drip_forever(writer: asyncio.StreamWriter, code: bytes) -> None:
    """An endless multi-line reply ``code``-..., one octet every ``GAP`` seconds."""
    while True:
        for octet in code + b"-still thinking\r\n":
            writer.write(bytes([octet]))
            await writer.drain()
            await asyncio.sleep(GAP)


def session(
    *,
    greeting: bytes = b"220 hostile.test ESMTP\r\n",
    ehlo: bytes = b"250-hostile.test\r\n250 PIPELINING\r\n",
    after_dot: Callable[[asyncio.StreamWriter], Awaitable[None]] | None = None,
    on_quit: Callable[[asyncio.StreamWriter], Awaitable[None]] | None = None,
) -> Handler:
    """A peer that says ``greeting``, answers EHLO with ``ehlo`` and accepts everything,
    except that ``after_dot`` answers the final dot and ``on_quit`` answers QUIT."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(ehlo)
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                if after_dot is None:
                    writer.write(b"250 2.0.0 queued\r\n")
                else:
                    await after_dot(writer)
            elif verb == b"QUIT":
                if on_quit is None:
                    writer.write(b"221 bye\r\n")
                else:
                    await on_quit(writer)
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    return handle


async def open_to(
    port: int,
    timeouts: Timeouts = QUICK,
    *,
    starttls: StartTLS = StartTLS.OPPORTUNISTIC,
    auth: tuple[str, str] | None = None,
    plaintext_auth: bool = False,
) -> SMTPConnection:
    return await SMTPConnection.open(
        host="hostile.test",
        ip="127.0.0.1",
        port=port,
        helo_name="client.test",
        timeouts=timeouts,
        starttls=starttls,
        auth=auth,
        plaintext_auth=plaintext_auth,
    )


async def send(
    conn: SMTPConnection, recipients: tuple[str, ...] = ("b@b.test",)
) -> connection.TransactionResult:
    return await conn.send(
        envelope_from="a@a.test",
        recipients=list(recipients),
        data=b"Subject: hi\r\n\r\nhello\r\n",
        smtputf8=False,
        eightbit=False,
    )


def hello(to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject="hi", text="Hello")


# --- each reply within its own timeout -----------------------------------------------------


BOB = "bob@hostile.example"


async def status_through(
    dns_server: LoopbackDNS, handler: Handler, email: Email | None = None
) -> MessageStatus:
    """The status of ``email`` (default: one to :data:`BOB`) sent by a facade to
    hostile.example, whose one MX is ``handler``, once each recipient has a result."""
    email = email or hello(BOB)
    dns_server.mx("hostile.example", [(10, "mx.hostile.test")])
    dns_server.a("mx.hostile.test", "127.0.0.1")
    results = Results()
    async with peer(handler) as port:
        config = loopback_config(dns_server, port)
        async with AsyncMailstrom(config, store=MemoryStore(), on_result=results) as ms:
            mid = await ms.send_email(email)
            await asyncio.to_thread(results.wait_count, len(email.to))
            return await ms.query_status(mid)


async def test_a_dripped_greeting_times_out_after_the_greeting_timeout() -> None:
    """RFC 5321 §4.5.3.2: the greeting must be complete within its timeout; octets of a
    multi-line greeting arriving all along do not restart it."""
    slow = Timeouts(connect=2, greeting=TIMEOUT, command=GIVE_UP)  # not the command's

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await drip_forever(writer, b"220")

    async with peer(handle) as port:
        started = time.monotonic()
        with pytest.raises(SMTPTimeout, match=r"greeting within 0\.5s"):
            async with asyncio.timeout(GIVE_UP):
                await open_to(port, slow)
        assert time.monotonic() - started < WITHIN


async def test_a_dripped_reply_to_the_final_dot_is_uncertain_after_data_end() -> None:
    async with peer(session(after_dot=lambda w: drip_forever(w, b"250"))) as port:
        conn = await open_to(port)
        started = time.monotonic()
        async with asyncio.timeout(GIVE_UP):
            result = await send(conn)
        elapsed = time.monotonic() - started
        await conn.close()
    assert result.uncertain
    assert result.final is None
    assert isinstance(result.cause, SMTPTimeout)
    assert "end of data within 0.5s" in result.cause.text
    assert elapsed < WITHIN


async def test_pipelined_replies_each_get_their_own_timeout() -> None:
    """The replies to MAIL, RCPT and DATA come one by one, each within the timeout but
    all together taking longer than one: the deadline starts again at each complete one."""
    gap = TIMEOUT * 0.6

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.test\r\n")
        await reader.readline()
        writer.write(b"250-slow.test\r\n250 PIPELINING\r\n")
        for _ in range(3):  # MAIL, RCPT, DATA, in one write
            await reader.readline()
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            await asyncio.sleep(gap)
            writer.write(reply)
        while await reader.readline() != b".\r\n":
            pass
        writer.write(b"250 2.0.0 queued\r\n")
        await reader.readline()
        writer.write(b"221 bye\r\n")

    async with peer(handle) as port:
        conn = await open_to(port)
        result = await send(conn)
        await conn.close()
    assert result.final is not None
    assert result.final.code == 250


# --- QUIT and stop() ---------------------------------------------------------------------


async def test_close_is_bounded_when_the_quit_reply_drips() -> None:
    async with peer(session(on_quit=lambda w: drip_forever(w, b"221"))) as port:
        conn = await open_to(port)
        await send(conn)
        started = time.monotonic()
        async with asyncio.timeout(GIVE_UP):
            await conn.close()
        assert time.monotonic() - started < WITHIN
        assert conn._transport is not None and conn._transport.is_closing()


async def test_one_octet_of_the_quit_reply_does_not_lift_the_quit_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QUIT waits min(command, the QUIT cap); the first octet of its reply must not turn
    that into the (much longer) command timeout."""
    monkeypatch.setattr(connection, "_QUIT_TIMEOUT", TIMEOUT)
    patient = Timeouts(connect=2, greeting=2, command=GIVE_UP, data_init=2, data_end=2)

    async def one_octet(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(GAP)
        writer.write(b"2")
        await writer.drain()
        await asyncio.sleep(GIVE_UP * 2)

    async with peer(session(on_quit=one_octet)) as port:
        conn = await open_to(port, patient)
        await send(conn)
        started = time.monotonic()
        await conn.close()
        assert time.monotonic() - started < WITHIN


async def test_stop_is_not_held_by_a_dripped_quit_reply(
    dns_server: LoopbackDNS,
) -> None:
    dns_server.mx("hostile.example", [(10, "mx.hostile.test")])
    dns_server.a("mx.hostile.test", "127.0.0.1")
    results = Results()
    async with peer(session(on_quit=lambda w: drip_forever(w, b"221"))) as port:
        config = loopback_config(dns_server, port, timeouts=QUICK)
        ms = AsyncMailstrom(config, store=MemoryStore(), on_result=results)
        await ms.start()
        try:
            await ms.send_email(hello("bob@hostile.example"))
            [result] = await asyncio.to_thread(results.wait_count, 1)
            assert result.state is RecipientState.DELIVERED
        finally:
            started = time.monotonic()
            async with asyncio.timeout(GIVE_UP):
                await ms.stop(timeout=0.2)
            assert time.monotonic() - started < WITHIN + 0.5


# --- unsolicited lines while the session is set up ----------------------------------------

EARLY_TALKERS = {
    "after the greeting": session(greeting=b"220 hostile.test ESMTP\r\n250 I talk first\r\n"),
    "after EHLO offering STARTTLS": session(
        ehlo=b"250-hostile.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n250 one too many\r\n"
    ),
    "after EHLO, before any command": session(
        ehlo=b"250-hostile.test\r\n250 PIPELINING\r\n250 ok\r\n250 ok\r\n354 go\r\n"
    ),
}


@pytest.mark.parametrize("when", list(EARLY_TALKERS))
async def test_an_unsolicited_line_during_setup_is_a_protocol_error(when: str) -> None:
    async with peer(EARLY_TALKERS[when]) as port:
        with pytest.raises(SMTPProtocolError, match="unsolicited reply"):
            await open_to(port)


@pytest.mark.parametrize("when", list(EARLY_TALKERS))
async def test_an_early_talker_gives_way_to_the_next_mx(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, when: str
) -> None:
    healthy = smtp_server(starttls=False)
    dns_server.mx("two.example", [(10, "mx1.test"), (20, "mx2.test")])
    dns_server.a("mx1.test", "127.0.0.2")
    dns_server.a("mx2.test", healthy.host)
    results = Results()
    async with peer(EARLY_TALKERS[when], host="127.0.0.2", port=healthy.port):
        config = loopback_config(dns_server, healthy.port)
        async with AsyncMailstrom(config, store=MemoryStore(), on_result=results) as ms:
            await ms.send_email(hello("bob@two.example"))
            [result] = await asyncio.to_thread(results.wait_count, 1)
    assert result.state is RecipientState.DELIVERED
    assert len(healthy.messages) == 1


async def test_an_early_talker_alone_is_deferred_naming_the_protocol_error(
    dns_server: LoopbackDNS,
) -> None:
    status = (
        await status_through(dns_server, EARLY_TALKERS["after EHLO, before any command"])
    ).recipient(BOB)
    assert status.state is RecipientState.DEFERRED
    assert status.reason_class is ReasonClass.PROTOCOL
    assert "unsolicited reply" in status.reason


# --- replies to commands not yet sent ----------------------------------------------------


def answering_twice(first: bytes) -> Handler:
    """A peer without PIPELINING that answers the command starting with ``first`` twice
    (the second time before the next command is sent), every other once: RCPT for
    ``bob`` is accepted, RCPT for ``nobody`` refused."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hostile.test ESMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"EHLO"):
                reply = b"250-hostile.test\r\n250 8BITMIME\r\n"
            elif line.startswith(b"RCPT"):
                reply = b"550 5.1.1 no such user\r\n" if b"nobody" in line else b"250 ok\r\n"
            elif line.startswith(b"DATA"):
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                reply = b"250 2.0.0 queued\r\n"
            elif line.startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                return
            else:
                reply = b"250 ok\r\n"
            writer.write(reply * 2 if line.startswith(first) else reply)
            await writer.drain()

    return handle


async def test_a_reply_that_came_before_its_command_was_sent_is_a_protocol_error() -> None:
    """Octets read before a command was written cannot answer it: the second reply to MAIL
    would be taken for bob's, bob's for nobody's, and nobody's refusal for the reply to
    DATA, refusing both (bob at DATA, though the server accepted him)."""
    async with peer(answering_twice(b"MAIL")) as port:
        conn = await open_to(port)
        with pytest.raises(SMTPProtocolError, match="before its command was sent"):
            await send(conn, ("bob@b.test", "nobody@b.test"))
        await conn.close()


def answering_early(reply: bytes) -> Handler:
    """A peer with PIPELINING that answers the first line of the content with ``reply``, as
    if it were the final dot, then reads the rest as commands (and refuses them)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hostile.test ESMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"EHLO"):
                writer.write(b"250-hostile.test\r\n250 PIPELINING\r\n")
            elif line.startswith(b"DATA"):
                writer.write(b"354 go\r\n")
                await reader.readline()
                writer.write(reply)
                await writer.drain()
                await asyncio.sleep(0.2)  # the client reads the reply meanwhile
                while line := await reader.readline():
                    writer.write(b"500 5.5.2 what?\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    return handle


async def answered_early(reply: bytes) -> tuple[TransactionResult, BaseException | None]:
    """The result of a big message whose content ``answering_early(reply)`` answers before
    its end (slow readers on both sides: most of it stays in the transport's buffer), and
    what became of a second transaction submitted behind it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader
    listener.bind(("127.0.0.1", 0))
    async with peer(answering_early(reply), sock=listener) as port:
        conn = await open_to(port)
        # Small kernel buffers on both sides: most of the content stays in the transport's.
        assert conn._transport is not None
        conn._transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        content = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 20_000
        first = conn.submit(
            envelope_from="a@a.test",
            recipients=["b@b.test"],
            data=content,
            smtputf8=False,
            eightbit=False,
        )
        second = conn.submit(
            envelope_from="a@a.test",
            recipients=["c@b.test"],
            data=b"Subject: hi\r\n\r\nhello\r\n",
            smtputf8=False,
            eightbit=False,
        )
        result = await first
        [outcome] = await asyncio.gather(second, return_exceptions=True)
        await conn.close()
    return result, outcome if isinstance(outcome, BaseException) else None


async def test_a_reply_to_the_final_dot_before_it_was_sent_ends_the_session() -> None:
    """A server that refuses the content before its end and then reads the rest as commands
    (RFC 5321 §4.1.1.4: the reply comes after the final dot): its refusal stands, but the
    session cannot go on, or the next transaction's envelope gets the replies to lines of
    the content, and its recipients fail on a "500" to MAIL that never answered it."""
    result, second = await answered_early(b"552 5.3.4 too big\r\n")
    assert result.final is not None and result.final.code == 552
    assert not result.uncertain
    assert isinstance(second, SMTPProtocolError)
    assert "before the end of the message" in str(second)


async def test_a_2xx_before_the_final_dot_was_sent_delivers_nothing_known() -> None:
    """A 250 while the final dot is still in this process accepts no message the client
    sent (the server has not read its end): not a delivery, but an uncertain one, retried
    as one whose reply to the dot was lost (RFC 5321 §4.5.3.2.6). Before, the recipient
    was DELIVERED on it."""
    result, second = await answered_early(b"250 2.0.0 queued early\r\n")
    assert result.final is None
    assert result.uncertain
    assert isinstance(result.cause, SMTPProtocolError)
    assert "before the end of the message" in result.cause.text
    assert isinstance(second, SMTPProtocolError)
    item = WorkItem(
        message_id="m1",
        lease_token="lease",
        domain="b.test",
        envelope_from="a@a.test",
        recipients=(
            LeasedRecipient(address="b@b.test", attempts=0, first_attempt_at=None, created_at=NOW),
        ),
        data=b"x",
        smtputf8=False,
        eightbit=False,
    )
    outcomes = Outcomes(Config(helo_name="client.test"), clock=lambda: NOW, rng=random.Random(1))
    [decided] = outcomes.from_transaction(item, result, 0.0, Where(host="hostile.test"))
    assert decided.state is RecipientState.DEFERRED
    assert decided.attempt.uncertain


# --- EHLO SIZE ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["²", "٣", "abc", "9" * 21, "9" * 5000])
async def test_a_size_that_is_not_ascii_digits_sets_no_limit(value: str) -> None:
    """RFC 1870's size is 1 to 20 ASCII digits. 5000 of them made int() raise ValueError
    inside data_received: asyncio's "Fatal error", and the address taken for unreachable."""
    ehlo = b"250-hostile.test\r\n250-SIZE " + value.encode() + b"\r\n250 PIPELINING\r\n"
    async with peer(session(ehlo=ehlo)) as port:
        conn = await open_to(port)
        assert conn._session.max_size is None
        if value.isascii() and len(f"SIZE {value}") <= replies.MAX_EHLO_LINE:
            assert conn.extensions["SIZE"] == value
        else:  # an ehlo-line is ASCII (RFC 5321 §4.1.1.1) and one reply line (§4.5.3.1.5):
            assert "SIZE" not in conn.extensions  # any other is skipped whole
        result = await send(conn)
        await conn.close()
    assert result.final is not None
    assert result.final.code == 250


# --- a bad reply to the final dot ------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "named"),
    [
        (b"2500 delivered\r\n", "2500 delivered"),
        (b"354 again\r\n", "unexpected reply to BODY: 354 again"),
        (b"250-a\r\n251 b\r\n", "250 then 251"),
    ],
)
async def test_a_bad_reply_to_the_final_dot_is_named_and_uncertain(
    dns_server: LoopbackDNS, reply: bytes, named: str
) -> None:
    async def bad(writer: asyncio.StreamWriter) -> None:
        writer.write(reply)

    status = (await status_through(dns_server, session(after_dot=bad))).recipient(BOB)
    assert status.state is RecipientState.DEFERRED
    assert status.uncertain
    assert status.reason_class is ReasonClass.PROTOCOL
    assert named in status.reason
    assert status.reason.endswith("delivery uncertain")


async def test_a_long_bad_reply_to_the_final_dot_is_cut_short() -> None:
    async def bad(writer: asyncio.StreamWriter) -> None:
        writer.write(b"354 " + b"\x1b[31m" * 2000 + b"\r\n")

    async with peer(session(after_dot=bad)) as port:
        conn = await open_to(port)
        result = await send(conn)
        await conn.close()
    assert result.uncertain
    assert isinstance(result.cause, SMTPProtocolError)
    reason, why = _uncertain_reason(result.cause)
    assert why is ReasonClass.PROTOCOL
    assert len(reason) < 400
    assert "\x1b" not in reason
    assert "more characters" in reason


# --- AUTH that never ends ---------------------------------------------------------------


async def test_a_server_that_asks_on_after_auth_was_cancelled_is_a_protocol_error() -> None:
    """RFC 4954 §4: the client's "*" cancels the exchange and the server answers 501. One
    that sends a 334 challenge to every line, each well within the command timeout,
    held the connection for as long as it liked."""
    lines: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hostile.test ESMTP\r\n")
        while line := await reader.readline():
            lines.append(line)
            if line[:4].upper() == b"EHLO":
                writer.write(b"250-hostile.test\r\n250 AUTH PLAIN\r\n")
            elif line[:4].upper() == b"QUIT":
                writer.write(b"221 bye\r\n")
            else:
                writer.write(b"334 \r\n")  # and again, and again
            await writer.drain()

    async with peer(handle) as port:
        started = time.monotonic()
        with pytest.raises(SMTPProtocolError, match="after AUTH was cancelled"):
            await open_to(
                port, starttls=StartTLS.NEVER, auth=("user", "secret"), plaintext_auth=True
            )
        assert time.monotonic() - started < WITHIN
    assert [x.split()[0] for x in lines[1:3]] == [b"AUTH", b"*"]


@pytest.mark.parametrize(
    ("ehlo", "starttls"),
    [
        (b"250-hostile.test\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n", b"454 4.7.0 no\r\n"),
        (b"250-hostile.test\r\n250 AUTH PLAIN LOGIN\r\n", b"502 5.5.1 what?\r\n"),
    ],
    ids=["starttls refused", "starttls not offered"],
)
async def test_opportunistic_tls_never_sends_the_password_in_cleartext(
    ehlo: bytes, starttls: bytes
) -> None:
    """With opportunistic TLS and credentials, a server that refuses STARTTLS (or does not
    offer it) got AUTH PLAIN with the password in base64 over plaintext. Credentials go
    in cleartext only when the caller says so (``plaintext_auth``, the relay's
    ``allow_plaintext_auth``): the opening fails before AUTH."""
    lines: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hostile.test ESMTP\r\n")
        while line := await reader.readline():
            lines.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(ehlo)
            elif verb == b"STAR":
                writer.write(starttls)
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
            else:
                writer.write(b"235 2.7.0 ok\r\n")
            await writer.drain()

    async with peer(handle) as port:
        with pytest.raises(TLSRequiredError, match="cleartext"):
            await open_to(port, starttls=StartTLS.OPPORTUNISTIC, auth=("user", "secret"))
        assert not [line for line in lines if line[:4].upper() == b"AUTH"], lines
        # Said explicitly, it is allowed.
        conn = await open_to(
            port, starttls=StartTLS.OPPORTUNISTIC, auth=("user", "secret"), plaintext_auth=True
        )
        await conn.close()
    assert [line for line in lines if line[:4].upper() == b"AUTH"]


async def test_a_requiretls_transaction_never_goes_over_plaintext() -> None:
    """RFC 8689: a REQUIRETLS message travels over TLS on every hop. A server that
    advertises REQUIRETLS without offering STARTTLS got ``MAIL FROM:<...> REQUIRETLS`` and
    the message in cleartext, as only the keyword was checked. The transaction now fails
    (550 5.7.30) before MAIL is sent."""
    lines: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hostile.test ESMTP\r\n")
        while line := await reader.readline():
            lines.append(line)
            if line[:4].upper() == b"EHLO":
                writer.write(b"250-hostile.test\r\n250 REQUIRETLS\r\n")
            elif line[:4].upper() == b"QUIT":
                writer.write(b"221 bye\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    async with peer(handle) as port:
        conn = await open_to(port)
        try:
            assert "REQUIRETLS" in conn.extensions and not conn.encrypted
            with pytest.raises(RequireTLSFailure) as caught:
                conn.submit(
                    envelope_from="a@a.test",
                    recipients=["b@b.test"],
                    data=b"Subject: hi\r\n\r\nhello\r\n",
                    smtputf8=False,
                    eightbit=False,
                    requiretls=True,
                )
            assert (caught.value.code, caught.value.enhanced) == (550, "5.7.30")
        finally:
            await conn.close()
    assert not [line for line in lines if line[:4].upper() == b"MAIL"], lines


async def test_a_peer_that_hangs_up_instead_of_answering_is_named_in_plain_words() -> None:
    """The reason reads "closed the connection (waiting for it to reply to DATA)": it read
    "before replying to reply to DATA" once the deadline's own words were put in."""

    hang_up_at_data = scripted(
        lambda line: HangUp() if line[:4].upper() == b"DATA" else None,
        ehlo=b"250-hostile.test\r\n250 8BITMIME\r\n",
    )
    async with peer(hang_up_at_data) as port:
        conn = await open_to(port)
        with pytest.raises(SMTPConnectError) as info:
            await send(conn)
        await conn.close()
    assert str(info.value) == "hostile.test closed the connection (waiting for it to reply to DATA)"


# --- a reply of the wrong class ---------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "wrong"),
    [
        (b"DATA", b"250 2.0.0 ok"),
        (b"RCPT", b"354 go ahead"),
        (b"DATA", b"334 what now"),
        (b"DATA", b"355 go on"),
    ],
)
async def test_a_reply_of_a_class_the_command_cannot_get_is_not_recorded_as_a_reply(
    dns_server: LoopbackDNS, command: bytes, wrong: bytes
) -> None:
    """A 250 to DATA or a 354 to RCPT breaks the protocol: the recipient is deferred with
    the protocol error in mailstrom's words, not with a reply of that code as if the
    server had sent it for the recipient (a "250" on a deferred recipient, quoting its
    own sentence as the server's text)."""

    def answer(line: bytes) -> bytes | HangUp | None:
        if line.startswith(command):
            return wrong + b"\r\n"
        return HangUp(b"221 bye\r\n") if line.startswith(b"QUIT") else None

    handle = scripted(answer, ehlo=b"250 hostile.test\r\n")
    status = (await status_through(dns_server, handle)).recipient(BOB)
    assert status.state is RecipientState.DEFERRED
    assert status.reason_class is ReasonClass.PROTOCOL
    assert status.reply is None, status.reply
    assert status.error is not None and wrong.decode() in status.error


# --- a refusal, then a hang-up ----------------------------------------------------------


async def test_a_refused_ehlo_then_a_hang_up_is_the_refusal_not_an_unreachable_host() -> None:
    """A server that answers EHLO with a 5xx and hangs up (a block list's "554 5.7.1
    Client host rejected") has given its reply: the session fails with it, as a refused
    greeting does. The HELO that RFC 5321 §3.2 has the client try next found the
    connection gone, and the failure was "closed the connection (waiting for it to reply
    to HELO)": a host that could not be reached (noted as such, and tried last for
    minutes), without the server's reply or code."""

    async def refuse_and_hang_up(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"220 hostile.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"554 5.7.1 Client host rejected: listed\r\n")
        await writer.drain()

    async with peer(refuse_and_hang_up) as port:
        with pytest.raises(PermanentFailure) as info:
            await open_to(port, starttls=StartTLS.NEVER)
    assert not isinstance(info.value, SMTPConnectError)
    assert (info.value.code, info.value.enhanced) == (554, "5.7.1")
    assert info.value.reply is not None
    assert info.value.reply.text == "Client host rejected: listed"


async def test_a_refused_ehlo_then_silence_is_the_refusal_not_a_timeout() -> None:
    """The same server, but one that keeps the connection open and answers nothing more
    (it ignores every command after its refusal, until it drops the client): its refusal
    was its last word all the same. The HELO's timeout was the failure, "did not reply to
    HELO": the address noted as unreachable, the recipients' reason a timeout without the
    server's reply or code."""

    async def refuse_then_ignore(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"220 hostile.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"554 5.7.1 Client host rejected: listed\r\n")
        await writer.drain()
        while await reader.readline():
            pass  # HELO, QUIT: no answer

    async with peer(refuse_then_ignore) as port:
        started = time.monotonic()
        with pytest.raises(DeliveryError) as info:
            await open_to(port, starttls=StartTLS.NEVER)
    assert time.monotonic() - started < WITHIN + QUICK.command  # HELO's wait, then QUIT's
    assert isinstance(info.value, PermanentFailure), repr(info.value)
    assert (info.value.code, info.value.enhanced) == (554, "5.7.1")
    assert info.value.reply is not None
    assert info.value.reply.text == "Client host rejected: listed"


def refusing_then_hanging_up(pipelining: bool, at: bytes) -> Handler:
    """A peer that refuses the sender (``at`` MAIL) or the recipient (``at`` RCPT) and
    hangs up at once, without answering what was pipelined after it."""

    return scripted(
        lambda line: HangUp(b"550 5.7.1 Go away\r\n") if line[:4].upper() == at else None,
        ehlo=ehlo_for(pipelining),
    )


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize("at", [b"MAIL", b"RCPT"])
async def test_a_refusal_then_a_hang_up_decides_the_transaction_with_or_without_pipelining(
    pipelining: bool, at: bytes
) -> None:
    """A 550 to MAIL, or to the only RCPT, decides the transaction whatever the server does
    next: without PIPELINING the result came before the hang-up, but with it the replies
    still owed for the rest of the batch (RCPT, DATA) never came, and the transaction
    failed as a lost connection: its recipients were tried again and again instead of
    failing on the server's refusal."""
    async with peer(refusing_then_hanging_up(pipelining, at)) as port:
        conn = await open_to(port, starttls=StartTLS.NEVER)
        try:
            result = await send(conn)
        finally:
            await conn.close()
    assert result.final is None and not result.accepted and not result.uncertain
    refusal = result.mail if at == b"MAIL" else result.rcpt[0][1]
    assert refusal is not None
    assert (refusal.code, refusal.enhanced, refusal.text) == (550, "5.7.1", "Go away")


async def test_a_refused_mail_stands_when_the_pipelined_rcpt_gets_a_421() -> None:
    """A 421 to RCPT keeps the replies that came before it (RFC 5321 §3.8): so does a 550
    to the MAIL pipelined before it. The transaction is decided by that refusal, as
    without PIPELINING (where no RCPT follows a refused MAIL) or with a hang-up instead
    of the 421; it failed as cut short, and its recipients were tried again."""

    replies: dict[bytes, bytes | HangUp] = {
        b"MAIL": b"550 5.7.1 Sender rejected\r\n",
        b"RCPT": HangUp(b"421 4.7.0 Closing\r\n"),
    }
    async with peer(scripted(lambda line: replies.get(line[:4].upper()))) as port:
        conn = await open_to(port, starttls=StartTLS.NEVER)
        try:
            result = await send(conn)
        finally:
            await conn.close()
    assert result.mail is not None
    assert (result.mail.code, result.mail.enhanced) == (550, "5.7.1")
    assert result.final is None and not result.accepted


def refusing_one_then_hanging_up(pipelining: bool) -> Handler:
    """A peer that refuses the first recipient (550), accepts the other and hangs up at
    DATA, without a reply to it."""

    def answer(line: bytes) -> bytes | HangUp | None:
        verb = line[:4].upper()
        if verb == b"RCPT" and b"<nobody@" in line:
            return b"550 5.1.1 No such user\r\n"
        if verb == b"DATA":
            return HangUp()
        return HangUp(b"221 bye\r\n") if verb == b"QUIT" else None

    return scripted(answer, ehlo=ehlo_for(pipelining))


@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_recipient_refused_before_a_hang_up_fails_with_its_refusal(
    dns_server: LoopbackDNS, pipelining: bool
) -> None:
    """RCPT a got "550 5.1.1", RCPT b "250", then the server hung up before its reply to
    DATA: a is failed with its own reply (as when a 421 cuts the envelope, or when the
    server answers DATA), b is deferred as the lost connection says. The 550 was lost, and
    a was tried again and again with b, deferred as a lost connection."""
    email = Email(
        from_="App <app@sender.test>",
        to=["nobody@hostile.example", BOB],
        subject="hi",
        text="Hello",
    )
    status = await status_through(dns_server, refusing_one_then_hanging_up(pipelining), email)
    refused = status.recipient("nobody@hostile.example")
    other = status.recipient("bob@hostile.example")
    assert refused.state is RecipientState.FAILED
    assert refused.reply is not None
    assert (refused.reply.code, refused.reply.enhanced) == (550, "5.1.1")
    assert other.state is RecipientState.DEFERRED
    assert other.reason_class is ReasonClass.CONNECTION
    assert other.reply is None
    assert other.error == "mx.hostile.test closed the connection (waiting for it to reply to DATA)"


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize("silent", [False, True])
async def test_rcpt_replies_are_kept_when_the_session_ends_before_the_content(
    pipelining: bool, silent: bool
) -> None:
    """The replies to RCPT stay with the transaction's error when the server hangs up or
    falls silent before its reply to DATA, as they do when a 421 to RCPT cuts the envelope
    (EnvelopeCut): the error is still the lost connection or the timeout, in its words."""
    refuse = refusing_one_then_hanging_up(pipelining)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await refuse(reader, writer)
        if silent:
            await reader.read()  # no reply to DATA, nor a close: the client gives up

    async with peer(handle) as port:
        conn = await open_to(port, starttls=StartTLS.NEVER)
        try:
            with pytest.raises(SMTPTimeout if silent else SMTPConnectError) as info:
                await send(conn, ("nobody@b.test", "bob@b.test"))
        finally:
            await conn.close()
    assert conn.error is not None and str(info.value) == str(conn.error)
    answered = answered_before(info.value)
    assert answered is not None
    assert [(a, r.code, r.enhanced) for a, r in answered.rcpt] == [
        ("nobody@b.test", 550, "5.1.1"),
        ("bob@b.test", 250, None),
    ]
    assert answered.final is None and not answered.uncertain


refusing_tls_and_hanging_up = scripted(
    lambda line: (
        HangUp(b"454 4.7.0 TLS not available\r\n") if line[:8].upper() == b"STARTTLS" else None
    ),
    ehlo=b"250-hostile.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n",
)
"""A peer that offers STARTTLS, refuses it when asked and hangs up."""


async def test_a_refused_starttls_then_a_hang_up_is_the_refusal(dns_server: LoopbackDNS) -> None:
    """Under opportunistic TLS a server that answers STARTTLS with "454 4.7.0" and hangs up
    has said its last word: the recipient is deferred with that reply. The connection
    came back from opening as if usable, then was gone, and the reason recorded was "the
    connection to ... ended", without the reply."""
    status = (await status_through(dns_server, refusing_tls_and_hanging_up)).recipient(BOB)
    assert status.state is RecipientState.DEFERRED
    assert status.reply is not None, status.error
    assert (status.reply.code, status.reply.enhanced) == (454, "4.7.0")
    assert status.reply.text == "TLS not available"


async def refusing_tls_and_falling_silent(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A peer that offers STARTTLS, refuses it when asked, then answers nothing more
    (until the client hangs up)."""
    writer.write(b"220 hostile.test ESMTP\r\n")
    while line := await reader.readline():
        if line[:8].upper() == b"STARTTLS":
            writer.write(b"454 4.7.0 TLS not available\r\n")
            await writer.drain()
            await reader.read()
            return
        writer.write(b"250-hostile.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
        await writer.drain()


async def test_a_refused_starttls_then_silence_keeps_the_refusal(dns_server: LoopbackDNS) -> None:
    """Under opportunistic TLS a server that answers STARTTLS with "454 4.7.0" and then
    answers nothing, as one that hangs up there: the recipient is deferred with that
    reply, and the silence that followed said. The reason was only "did not reply to
    MAIL within 2s", the refusal lost."""
    status = (await status_through(dns_server, refusing_tls_and_falling_silent)).recipient(BOB)
    assert status.state is RecipientState.DEFERRED
    assert status.reply is not None, status.error
    assert (status.reply.code, status.reply.enhanced) == (454, "4.7.0")
    assert status.reply.text == "TLS not available"
    assert status.reason_class is ReasonClass.CONNECTION  # the silence ended it


async def test_a_connection_silent_after_its_starttls_was_refused_says_both() -> None:
    """The timeout names the refusal before it and carries its reply (it said only "did
    not reply to MAIL", the reply gone)."""
    async with peer(refusing_tls_and_falling_silent) as port:
        conn = await open_to(port)
        try:
            with pytest.raises(SMTPTimeout) as info:
                async with asyncio.timeout(GIVE_UP):
                    await send(conn)
        finally:
            await conn.close()
    assert str(info.value) == (
        "hostile.test refused STARTTLS (454 4.7.0 TLS not available), "
        "then did not reply to MAIL within 0.5s"
    )
    reply = info.value.reply
    assert reply is not None and (reply.code, reply.enhanced) == (454, "4.7.0")


async def test_a_refused_starttls_then_silence_fails_the_connection_under_required_tls(
    dns_server: LoopbackDNS,
) -> None:
    """Under required TLS the refusal ends the session at once, with the reply and the
    policy: no command waits for the silence."""
    dns_server.mx("hostile.example", [(10, "mx.hostile.test")])
    dns_server.a("mx.hostile.test", "127.0.0.1")
    results = Results()
    async with peer(refusing_tls_and_falling_silent) as port:
        config = loopback_config(dns_server, port, tls=TLSPolicy.REQUIRED)
        async with AsyncMailstrom(config, store=MemoryStore(), on_result=results) as ms:
            mid = await ms.send_email(hello(BOB))
            await asyncio.to_thread(results.wait_count, 1)
            status = (await ms.query_status(mid)).recipient(BOB)
    assert status.state is RecipientState.DEFERRED
    assert status.reply is not None, status.error
    assert (status.reply.code, status.reply.enhanced) == (454, "4.7.0")
    assert status.reason is not None and "refused STARTTLS" in status.reason, status.reason
    assert "did not reply" not in status.reason


async def test_a_connection_whose_starttls_was_refused_before_a_hang_up_says_so() -> None:
    """Opening fails with the refusal when the hang-up is read before it ends; else the
    connection it returns is gone, and its error is the refusal (it was None: a peer
    that went away while no reply was due left no reason at all)."""
    async with peer(refusing_tls_and_hanging_up) as port:
        try:
            conn = await open_to(port)
        except DeliveryError as exc:
            error: DeliveryError | None = exc
        else:
            try:
                # The hang-up is read after open() ended.
                await eventually(lambda: not conn.usable, "the hang-up")
                error = conn.error
            finally:
                await conn.close()
    assert isinstance(error, TemporaryFailure), error
    assert not isinstance(error, SMTPConnectError)
    assert str(error) == (
        "hostile.test refused STARTTLS and closed the connection: 454 4.7.0 TLS not available"
    )
    assert error.reply is not None and (error.reply.code, error.reply.enhanced) == (454, "4.7.0")


# --- how much of a reply is kept ------------------------------------------------------------


async def test_huge_replies_to_pipelined_rcpts_are_each_kept_short() -> None:
    """Every RCPT reply of a transaction stays with it until the transaction ends, and the
    parser takes replies of up to a megabyte (lines of 64 KiB are legal to it): a server
    answering each of a pipelined group's RCPTs (up to ``max_recipients``, 1000) with a
    megabyte had the worker hold a gigabyte. The session hands out replies.MAX_TEXT
    characters of a reply's text (stores keep 2,048 octets of it); the rest is dropped."""
    line = b"x" * (60 * 1024)
    huge = b"".join(b"450-4.2.1 " + line + b"\r\n" for _ in range(16)) + b"450 4.2.1 busy\r\n"
    recipients = [f"r{i}@b.test" for i in range(8)]

    def answer(command: bytes) -> bytes | HangUp | None:
        if command[:4].upper() == b"RCPT":
            return huge
        if command[:4].upper() == b"DATA":
            return b"554 5.5.1 no valid recipients\r\n"  # RFC 2920 §3.1, not a 250
        if command[:4].upper() == b"QUIT":
            return HangUp(b"221 bye\r\n")
        return None

    async with peer(scripted(answer)) as port:
        conn = await open_to(port, starttls=StartTLS.NEVER)
        try:
            result = await conn.send(
                envelope_from="a@a.test",
                recipients=recipients,
                data=b"Subject: hi\r\n\r\nhello\r\n",
                smtputf8=False,
                eightbit=False,
            )
        finally:
            await conn.close()
    assert [address for address, _ in result.rcpt] == recipients
    for _, reply in result.rcpt:
        assert (reply.code, reply.enhanced) == (450, "4.2.1")
        assert len(reply.text) <= replies.MAX_TEXT, len(reply.text)
        assert reply.text.startswith("x" * 100)


async def test_a_huge_ehlo_reply_leaves_the_connection_holding_little() -> None:
    """A connection keeps the server's EHLO keywords for as long as it lives, idle in the
    cache included, and the parser takes an EHLO reply of up to a megabyte: kept whole,
    every connection to a server announcing thousands of long keywords held more than a
    megabyte (each of ``max_connections`` of them). What a server announces is read from
    its first replies.MAX_EHLO_KEYWORDS keywords, each of lines no longer than an RFC 5321
    reply line; the keywords read still count, in whatever order they come."""
    junk = b"".join(b"250-X%05d %s\r\n" % (i, b"v" * 200) for i in range(4000))
    ehlo = b"250-hostile.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n" + junk + b"250 8BITMIME\r\n"

    async with peer(session(ehlo=ehlo)) as port:
        conn = await open_to(port, starttls=StartTLS.NEVER)
        try:
            extensions = dict(conn.extensions)
            result = await send(conn)
        finally:
            await conn.close()
    assert result.final is not None and result.final.code == 250
    held = sum(len(keyword) + len(params) for keyword, params in extensions.items())
    assert held < len(ehlo) // 10, held
    assert extensions["PIPELINING"] == "" and extensions["SIZE"] == "1000"


# --- more replies than commands ---------------------------------------------------------


def answering_the_dot_twice(second: bytes) -> Handler:
    """A peer with PIPELINING that refuses RCPT for ``nobody`` and answers the final dot
    twice, ``second`` the second time (as an LMTP server answers it once per recipient)."""

    def answer(line: bytes) -> bytes | HangUp | None:
        if line.startswith(b"RCPT") and b"<nobody@" in line:
            return b"550 5.1.1 no such user\r\n"
        return None

    async def after_dot(writer: asyncio.StreamWriter) -> None:
        writer.write(b"250 2.0.0 queued\r\n" + second)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hostile.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(PIPELINING)
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                await after_dot(writer)
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                reply = answer(line)
                writer.write(b"250 ok\r\n" if reply is None else reply)
            await writer.drain()

    return handle


@pytest.mark.parametrize("second", [b"250 2.0.0 queued again\r\n", b"550 5.1.1 user unknown\r\n"])
async def test_a_surplus_reply_to_the_dot_decides_no_recipient_of_the_next_message(
    second: bytes,
) -> None:
    """The next transaction's envelope leaves with the content before the reply to the
    dot: a second reply to the dot was read as the reply to its MAIL, and every reply
    after it one command early. Its bob, whom the server accepted, was refused with the
    550 meant for nobody (or the whole message with a 550 to MAIL that was the dot's),
    and failed for good. The shift shows at DATA (it got a 250); nothing the batch was
    told before it is the server's word, so nothing of it is kept, and its recipients
    are tried again."""
    async with peer(answering_the_dot_twice(second)) as port:
        conn = await open_to(port, starttls=StartTLS.NEVER)
        submitted = [
            conn.submit(
                envelope_from="a@a.test",
                recipients=recipients,
                data=b"Subject: hi\r\n\r\nhello\r\n",
                smtputf8=False,
                eightbit=False,
            )
            for recipients in (["b@b.test"], ["nobody@b.test", "bob@b.test"])
        ]
        first, outcome = await asyncio.gather(*submitted, return_exceptions=True)
        await conn.close()
    assert isinstance(first, TransactionResult)
    assert first.final is not None and first.final.code == 250
    assert isinstance(outcome, SMTPProtocolError), outcome
    assert answered_before(outcome) is None, answered_before(outcome)


def answering_the_dot_and_a_half() -> Handler:
    """A peer with PIPELINING that refuses RCPT for ``nobody`` and answers the final dot
    with its reply and the start of a second one, whose end it sends with its reply to
    the next command."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hostile.test ESMTP\r\n")
        rest = b""
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(PIPELINING)
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 queued\r\n250 2.0.0 que")
                rest = b"ued again\r\n"
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                refused = verb == b"RCPT" and b"<nobody@" in line
                writer.write(rest + (b"550 5.1.1 no such user\r\n" if refused else b"250 ok\r\n"))
                rest = b""
            await writer.drain()

    return handle


async def test_the_start_of_a_reply_nobody_asked_for_ends_the_session() -> None:
    """Octets left over once every reply owed is read are a reply too many, split across
    reads: kept, they completed with the next read and answered the next message's MAIL,
    every reply after it one command early, so that bob, accepted by the server, was
    refused at DATA with the 550 meant for nobody. The session now ends there: the
    connection is not used again, and the next message takes another."""
    async with peer(answering_the_dot_and_a_half()) as port:
        conn = await open_to(port, starttls=StartTLS.NEVER)
        first = await send(conn)
        assert first.final is not None and first.final.code == 250
        await eventually(lambda: not conn.usable, "the session to end")
        assert isinstance(conn.error, SMTPProtocolError)
        assert "no command outstanding" in str(conn.error)
        with pytest.raises(DeliveryError, match="not usable"):
            await send(conn, ("bob@b.test", "nobody@b.test"))
        await conn.close()

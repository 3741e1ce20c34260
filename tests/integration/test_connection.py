"""SMTPConnection against real aiosmtpd servers on loopback (tests/fixtures/smtp_server.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import time
from typing import Any

import pytest

from mailstrom.config import Timeouts
from mailstrom.errors import (
    PermanentFailure,
    SMTPConnectError,
    SMTPTimeout,
    TemporaryFailure,
    TLSRequiredError,
)
from mailstrom.runtime.connection import (
    SMTPConnection,
    StartTLS,
    TLSHandshakeError,
    TLSVerifyError,
    TransactionResult,
)
from mailstrom.runtime.transactions import was_written
from mailstrom.smtp import LocalProtocolError
from tests.fixtures.smtp_server import ReceivingServer, ServerFactory, free_loopback_port

FAST = Timeouts(connect=5, greeting=5, command=5, data_init=5, data_block=5, data_end=5)
STALL = Timeouts(connect=5, greeting=0.3, command=0.3, data_init=0.3, data_block=5, data_end=0.3)
CONTENT = b"From: a@a.test\r\nTo: b@b.test\r\nSubject: hi\r\n\r\nHello\r\n"


async def connect(
    server: ReceivingServer, starttls: StartTLS = StartTLS.OPPORTUNISTIC, **kwargs: Any
) -> SMTPConnection:
    options: dict[str, Any] = {
        "host": "mx.test",
        "ip": server.host,
        "port": server.port,
        "helo_name": "client.test",
        "timeouts": FAST,
        "starttls": starttls,
    } | kwargs
    return await SMTPConnection.open(**options)


async def send(
    conn: SMTPConnection,
    recipients: tuple[str, ...] = ("b@b.test",),
    data: bytes = CONTENT,
    *,
    sender: str = "a@a.test",
    smtputf8: bool = False,
    eightbit: bool = False,
) -> TransactionResult:
    return await conn.send(
        envelope_from=sender,
        recipients=recipients,
        data=data,
        smtputf8=smtputf8,
        eightbit=eightbit,
    )


async def test_plaintext_delivery(smtp_server: ServerFactory) -> None:
    mx = smtp_server(starttls=False)
    conn = await connect(mx)
    try:
        assert conn.tls_version is None
        assert "PIPELINING" in conn.extensions
        result = await send(conn)
    finally:
        await conn.close()
    assert result.final is not None
    assert result.final.code == 250
    assert result.final.enhanced == "2.0.0"
    assert result.accepted == ("b@b.test",)
    assert not result.uncertain
    [message] = mx.messages
    assert message.content == CONTENT
    assert message.mail_from == "a@a.test"
    assert message.rcpt_tos == ("b@b.test",)
    assert not message.tls
    assert message.helo == "client.test"
    assert mx.commands == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


async def test_starttls_delivery_records_tls(smtp_server: ServerFactory) -> None:
    mx = smtp_server()
    conn = await connect(mx)
    try:
        assert conn.tls_version is not None
        assert conn.tls_version.startswith("TLS")
        assert conn.tls_cipher
        assert "STARTTLS" not in conn.extensions  # the second EHLO, over TLS
        await send(conn)
    finally:
        await conn.close()
    [message] = mx.messages
    assert message.tls
    assert message.tls_version == conn.tls_version
    assert mx.commands[:3] == ["EHLO", "STARTTLS", "EHLO"]


async def test_never_stays_in_plaintext(smtp_server: ServerFactory) -> None:
    mx = smtp_server()
    conn = await connect(mx, StartTLS.NEVER)
    try:
        assert conn.tls_version is None
        assert "STARTTLS" in conn.extensions
    finally:
        await conn.close()


async def test_content_is_byte_exact_with_dots_and_missing_final_crlf(
    smtp_server: ServerFactory,
) -> None:
    mx = smtp_server()
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nmiddle . dot\r\nlast line"
    conn = await connect(mx)
    try:
        result = await send(conn, data=body)
    finally:
        await conn.close()
    assert result.final is not None
    assert result.final.code == 250
    [message] = mx.messages
    assert message.content == body + b"\r\n"


async def test_size_8bitmime_and_smtputf8_parameters(smtp_server: ServerFactory) -> None:
    mx = smtp_server(size_limit=10_000)
    body = "Subject: ünïcode\r\n\r\nGrüße\r\n".encode()
    conn = await connect(mx)
    try:
        result = await send(conn, ("δοκιμή@b.test",), body, sender="ü@a.test", smtputf8=True,
                            eightbit=True)  # fmt: skip
    finally:
        await conn.close()
    assert result.final is not None
    assert result.final.code == 250
    [message] = mx.messages
    assert message.mail_from == "ü@a.test"
    assert message.rcpt_tos == ("δοκιμή@b.test",)
    assert set(message.mail_options) == {f"SIZE={len(body)}", "BODY=8BITMIME", "SMTPUTF8"}
    assert message.content == body


async def test_per_recipient_replies_in_one_transaction(smtp_server: ServerFactory) -> None:
    mx = smtp_server()
    mx.rcpt_replies["defer@x.test"] = "451 4.7.1 Try later"
    mx.rcpt_replies["rej@x.test"] = "550 5.1.1 No such user"
    conn = await connect(mx)
    try:
        result = await send(conn, ("ok@x.test", "defer@x.test", "rej@x.test", "ok2@x.test"))
    finally:
        await conn.close()
    assert [(a, r.code, r.enhanced) for a, r in result.rcpt] == [
        ("ok@x.test", 250, "2.1.5"),
        ("defer@x.test", 451, "4.7.1"),
        ("rej@x.test", 550, "5.1.1"),
        ("ok2@x.test", 250, "2.1.5"),
    ]
    assert result.final is not None
    assert result.final.code == 250
    [message] = mx.messages
    assert message.rcpt_tos == ("ok@x.test", "ok2@x.test")
    assert mx.pipelined > 0  # MAIL, the RCPTs and DATA came in one batch


async def test_without_pipelining_commands_go_one_at_a_time(smtp_server: ServerFactory) -> None:
    mx = smtp_server(pipelining=False)
    mx.rcpt_replies["rej@x.test"] = "550 5.1.1 No such user"
    conn = await connect(mx)
    try:
        result = await send(conn, ("a@x.test", "rej@x.test", "b@x.test"))
    finally:
        await conn.close()
    assert [r.code for _, r in result.rcpt] == [250, 550, 250]
    assert result.final is not None
    assert result.final.code == 250
    assert mx.pipelined == 0
    assert mx.commands == [
        *("EHLO", "STARTTLS", "EHLO"),
        *("MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"),
    ]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_rejected_mail_sends_no_content(smtp_server: ServerFactory, pipelining: bool) -> None:
    mx = smtp_server(pipelining=pipelining)
    mx.mail_reply = ["550 5.7.1 Sender rejected", "250 2.1.0 OK"]
    conn = await connect(mx)
    try:
        result = await send(conn)
        assert result.mail is not None
        assert result.mail.code == 550
        assert result.final is None
        assert mx.received == []
        assert conn.usable
        again = await send(conn)  # the next transaction on the same connection works
        assert again.final is not None
        assert again.final.code == 250
    finally:
        await conn.close()
    assert len(mx.messages) == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_no_recipient_accepted_sends_no_content(
    smtp_server: ServerFactory, pipelining: bool
) -> None:
    mx = smtp_server(pipelining=pipelining)
    mx.rcpt_replies["rej@x.test"] = "550 5.1.1 No such user"
    conn = await connect(mx)
    try:
        result = await send(conn, ("rej@x.test",))
        assert result.accepted == ()
        assert result.final is None
        if pipelining:
            assert result.data is not None
            assert result.data.code == 503  # DATA went in the batch and was refused
        else:
            assert result.data is None
        assert conn.usable
        ok = await send(conn, ("fine@x.test",))
        assert ok.final is not None
        assert ok.final.code == 250
    finally:
        await conn.close()
    assert [m.rcpt_tos for m in mx.messages] == [("fine@x.test",)]


async def test_greylisting_rule_changes_per_attempt(smtp_server: ServerFactory) -> None:
    mx = smtp_server()
    mx.rcpt_replies["grey@x.test"] = ["451 4.7.1 Greylisted", "250 2.1.5 Welcome"]
    conn = await connect(mx)
    try:
        first = await send(conn, ("grey@x.test",))
        second = await send(conn, ("grey@x.test",))
    finally:
        await conn.close()
    assert first.rcpt[0][1].code == 451
    assert second.rcpt[0][1].code == 250
    assert second.final is not None
    assert second.final.code == 250


async def test_size_limit_exceeded_sends_nothing(smtp_server: ServerFactory) -> None:
    mx = smtp_server(size_limit=100)
    conn = await connect(mx)
    try:
        with pytest.raises(PermanentFailure) as caught:
            await send(conn, data=b"x" * 98 + b"\r\n" + b"y" * 10)
        assert caught.value.code == 552
        assert caught.value.enhanced == "5.3.4"
        assert "MAIL" not in mx.commands
        assert conn.usable
        small = await send(conn, data=b"small\r\n")
        assert small.final is not None
        assert small.final.code == 250
    finally:
        await conn.close()
    assert mx.messages[0].mail_options == ("SIZE=7",)


async def test_size_counts_the_crlf_added_to_a_last_line_without_one(
    smtp_server: ServerFactory,
) -> None:
    # The content goes out with a CRLF after its last line (see the test above): SIZE
    # (RFC 1870 §3, the octets sent after 354) and the check against the server's limit
    # count it, or a message 1 or 2 octets under the limit is sent whole to be refused.
    mx = smtp_server(size_limit=100)
    conn = await connect(mx)
    try:
        with pytest.raises(PermanentFailure) as caught:
            await send(conn, data=b"x" * 99)
        assert caught.value.code == 552
        assert "MAIL" not in mx.commands
        result = await send(conn, data=b"y" * 98)
    finally:
        await conn.close()
    assert result.final is not None
    assert result.final.code == 250
    [message] = mx.messages
    assert message.mail_options == (f"SIZE={len(message.content)}",)


async def test_smtputf8_needed_but_not_offered(smtp_server: ServerFactory) -> None:
    mx = smtp_server(smtputf8=False)
    conn = await connect(mx)
    try:
        with pytest.raises(PermanentFailure, match="SMTPUTF8") as caught:
            await send(conn, ("ü@x.test",), smtputf8=True)
    finally:
        await conn.close()
    assert caught.value.enhanced == "5.6.7"
    assert "MAIL" not in mx.commands


async def test_eightbit_without_8bitmime_is_a_caller_error(smtp_server: ServerFactory) -> None:
    mx = smtp_server(eightbitmime=False)
    conn = await connect(mx)
    try:
        assert "8BITMIME" not in conn.extensions
        with pytest.raises(ValueError, match="8BITMIME"):
            await send(conn, data="Grüße\r\n".encode(), eightbit=True)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("stall_on", "what"), [("mail", "MAIL"), ("rcpt", "RCPT"), ("data", "DATA")]
)
async def test_stall_before_the_content_times_out(
    smtp_server: ServerFactory, stall_on: str, what: str
) -> None:
    mx = smtp_server(stall_on=stall_on)
    conn = await connect(mx, timeouts=STALL)
    try:
        started = time.monotonic()
        with pytest.raises(SMTPTimeout, match=what):
            await send(conn)
        assert time.monotonic() - started < 3
        assert not conn.usable
    finally:
        await conn.close()
    assert mx.received == []


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_stall_says_which_transactions_it_kept_off_the_wire(
    smtp_server: ServerFactory, pipelining: bool
) -> None:
    # The first transaction's RCPT gets no reply; the two submitted behind it never went.
    # All fail with the same timeout, but only the first as one whose commands were sent
    # (dispatch gives the others back untried).
    mx = smtp_server(stall_on="rcpt", pipelining=pipelining)
    conn = await connect(mx, timeouts=STALL)
    try:
        futures = [
            conn.submit(
                envelope_from="a@a.test",
                recipients=[f"b{n}@b.test"],
                data=CONTENT,
                smtputf8=False,
                eightbit=False,
            )
            for n in range(3)
        ]
        errors = []
        for future in futures:
            with pytest.raises(SMTPTimeout, match="RCPT") as caught:
                await future
            errors.append(caught.value)
    finally:
        await conn.close()
    assert [was_written(e) for e in errors] == [True, False, False]
    assert len({str(e) for e in errors}) == 1


async def test_stall_on_greeting_times_out(smtp_server: ServerFactory) -> None:
    mx = smtp_server(stall_on="greeting")
    with pytest.raises(SMTPTimeout, match="greeting"):
        await connect(mx, timeouts=STALL)


async def test_stall_after_the_dot_is_uncertain(smtp_server: ServerFactory) -> None:
    mx = smtp_server(stall_on="dot")
    conn = await connect(mx, timeouts=STALL)
    try:
        result = await send(conn)
        assert not conn.usable
    finally:
        await conn.close()
    assert result.uncertain
    assert result.final is None
    assert result.data is not None
    assert result.data.code == 354
    assert len(mx.received) == 1
    assert mx.messages == []


async def test_drop_on_data_is_a_connection_error(smtp_server: ServerFactory) -> None:
    mx = smtp_server()
    mx.drop_on_data = True
    conn = await connect(mx)
    try:
        with pytest.raises(SMTPConnectError, match="DATA"):
            await send(conn)
        assert not conn.usable
    finally:
        await conn.close()
    assert mx.received == []


async def test_drop_after_the_dot_is_uncertain(smtp_server: ServerFactory) -> None:
    mx = smtp_server()
    mx.drop_after_dot = True
    conn = await connect(mx)
    try:
        result = await send(conn)
        assert not conn.usable
    finally:
        await conn.close()
    assert result.uncertain
    assert result.final is None
    [received] = mx.received
    assert received.content == CONTENT
    assert received.reply is None


async def test_421_after_the_dot_makes_the_connection_unusable(smtp_server: ServerFactory) -> None:
    mx = smtp_server()
    mx.data_reply = "421 4.3.2 Shutting down"
    conn = await connect(mx)
    try:
        result = await send(conn)
        assert result.final is not None
        assert result.final.code == 421
        assert not result.uncertain
        assert not conn.usable
    finally:
        await conn.close()


async def test_421_to_rcpt_raises_temporary_for_all(smtp_server: ServerFactory) -> None:
    mx = smtp_server()
    mx.rcpt_replies["two@x.test"] = "421 4.7.0 Too busy"
    conn = await connect(mx)
    try:
        with pytest.raises(TemporaryFailure) as caught:
            await send(conn, ("one@x.test", "two@x.test", "three@x.test"))
        assert caught.value.code == 421
        assert not conn.usable
    finally:
        await conn.close()


async def test_broken_tls_handshake(smtp_server: ServerFactory) -> None:
    mx = smtp_server(tls_broken=True)
    with pytest.raises(TLSHandshakeError) as caught:
        await connect(mx)
    assert not isinstance(caught.value, TLSVerifyError)
    # What the caller then does under OPPORTUNISTIC: plaintext on a new connection.
    conn = await connect(mx, StartTLS.NEVER)
    try:
        result = await send(conn)
    finally:
        await conn.close()
    assert result.final is not None
    assert result.final.code == 250
    assert mx.connections == 2


@pytest.mark.parametrize("mode", [StartTLS.REQUIRED, StartTLS.VERIFY])
async def test_tls_required_but_not_offered(smtp_server: ServerFactory, mode: StartTLS) -> None:
    mx = smtp_server(starttls=False)
    with pytest.raises(TLSRequiredError, match="STARTTLS"):
        await connect(mx, mode)
    assert "MAIL" not in mx.commands
    assert mx.commands[-1] == "QUIT"  # left politely


async def test_required_accepts_an_unverified_certificate(smtp_server: ServerFactory) -> None:
    mx = smtp_server()
    conn = await connect(mx, StartTLS.REQUIRED, host="wrong.example")
    try:
        assert conn.tls_version is not None
    finally:
        await conn.close()


async def test_verify_with_the_test_ca(
    smtp_server: ServerFactory, client_tls_context: ssl.SSLContext
) -> None:
    mx = smtp_server()
    conn = await connect(mx, StartTLS.VERIFY, tls_context=client_tls_context)
    try:
        assert conn.tls_version is not None
        result = await send(conn)
    finally:
        await conn.close()
    assert result.final is not None
    assert result.final.code == 250


@pytest.mark.parametrize("host", ["wrong.example", "mx.test"])
async def test_verify_failure_is_distinguishable(
    smtp_server: ServerFactory, client_tls_context: ssl.SSLContext, host: str
) -> None:
    mx = smtp_server()
    # A wrong name with the right CA, or the right name with the system CAs only.
    context = client_tls_context if host == "wrong.example" else None
    with pytest.raises(TLSVerifyError, match="certificate"):
        await connect(mx, StartTLS.VERIFY, host=host, tls_context=context)


async def test_implicit_tls(smtp_server: ServerFactory, client_tls_context: ssl.SSLContext) -> None:
    mx = smtp_server(implicit_tls=True, starttls=False)
    conn = await connect(
        mx, StartTLS.NEVER, implicit_tls=True, tls_context=client_tls_context, host="relay.test"
    )
    try:
        assert conn.tls_version is not None
        await send(conn)
    finally:
        await conn.close()
    assert mx.messages[0].tls


async def test_reuse_for_three_messages_without_rset(smtp_server: ServerFactory) -> None:
    """A transaction that ended with the reply to its content leaves the server ready for
    the next MAIL (RFC 5321 §4.1.1.4): no RSET round trip between messages."""
    mx = smtp_server()
    conn = await connect(mx)
    try:
        for i in range(3):
            result = await send(conn, (f"r{i}@x.test",), b"Subject: %d\r\n\r\nbody\r\n" % i)
            assert result.final is not None
            assert result.final.code == 250
        assert conn.messages_sent == 3
        assert conn.usable
    finally:
        await conn.close()
    assert [m.rcpt_tos for m in mx.messages] == [("r0@x.test",), ("r1@x.test",), ("r2@x.test",)]
    assert mx.commands.count("RSET") == 0
    assert mx.commands.count("EHLO") == 2
    assert mx.connections == 1


async def test_auth_plain(smtp_server: ServerFactory) -> None:
    mx = smtp_server(auth=("user", "s3cret"))
    conn = await connect(mx, auth=("user", "s3cret"))
    try:
        await send(conn)
    finally:
        await conn.close()
    assert mx.messages[0].auth_login == "user"
    assert "AUTH" in mx.commands


async def test_auth_login_when_plain_is_not_offered(smtp_server: ServerFactory) -> None:
    mx = smtp_server(auth=("user", "s3cret"), auth_mechanisms=("LOGIN",))
    conn = await connect(mx, auth=("user", "s3cret"))
    try:
        assert conn.extensions["AUTH"] == "LOGIN"
        await send(conn)
    finally:
        await conn.close()
    assert mx.messages[0].auth_login == "user"


async def test_bad_address_is_refused_before_anything_is_sent(smtp_server: ServerFactory) -> None:
    mx = smtp_server(pipelining=False)
    conn = await connect(mx)
    try:
        with pytest.raises(ValueError, match="address"):
            await send(conn, ("ok@x.test", "bad\r\nRSET@x.test"))
        assert "MAIL" not in mx.commands
        assert conn.usable
    finally:
        await conn.close()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_an_empty_recipient_is_refused_by_submit(
    smtp_server: ServerFactory, pipelining: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """RCPT TO:<> cannot go on the wire (the session refuses it), but submit let it
    through, so it was refused only once its RCPT was due: inside the protocol's callback
    without PIPELINING (the error escaped to the event loop, the connection dropped and
    the transaction in flight failed as a lost connection), or with PIPELINING after the
    transaction was marked on the wire, where it stayed, never settled, the connection
    busy for good."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    mx = smtp_server(pipelining=pipelining)
    conn = await connect(mx, StartTLS.NEVER)
    try:
        with pytest.raises(ValueError, match="empty recipient"):
            conn.submit(
                envelope_from="a@a.test",
                recipients=["b@b.test", ""],
                data=CONTENT,
                smtputf8=False,
                eightbit=False,
            )
        assert not conn.busy
        assert conn.usable
        result = await send(conn)
    finally:
        await conn.close()
    assert result.final is not None
    assert result.final.code == 250
    assert [m.rcpt_tos for m in mx.messages] == [("b@b.test",)]
    assert not [r for r in caplog.records if r.name == "asyncio"]


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(
    ("offered", "dsn_mail", "dsn_rcpt", "error"),
    [
        (False, b" RET=HDRS", (), LocalProtocolError),
        (False, b"", (b" NOTIFY=NEVER",), LocalProtocolError),
        (True, b"", (b" NOTIFY=NEVER\r\nRSET",), ValueError),
    ],
)
async def test_dsn_parameters_that_cannot_go_are_refused_by_submit(
    smtp_server: ServerFactory,
    pipelining: bool,
    offered: bool,
    dsn_mail: bytes,
    dsn_rcpt: tuple[bytes, ...],
    error: type[Exception],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DSN parameters for a server that does not offer DSN, or not fit for the wire, are
    refused by submit itself, as 8BITMIME, SMTPUTF8 and REQUIRETLS are, before anything is
    queued. They were refused only once their command was due, which with another
    transaction in flight (or without PIPELINING, for RCPT) is inside the protocol's
    callback: the error escaped to the event loop ("Fatal error: protocol.data_received()
    call failed"), the connection dropped and the transaction before it, whose content was
    due, failed as a lost connection."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    mx = smtp_server(pipelining=pipelining, dsn=offered)
    conn = await connect(mx, StartTLS.NEVER)
    try:
        first = conn.submit(
            envelope_from="a@a.test",
            recipients=["b@b.test"],
            data=CONTENT,
            smtputf8=False,
            eightbit=False,
        )
        with pytest.raises(error, match="DSN"):
            conn.submit(
                envelope_from="a@a.test",
                recipients=["c@b.test"],
                data=CONTENT,
                smtputf8=False,
                eightbit=False,
                dsn_mail=dsn_mail,
                dsn_rcpt=dsn_rcpt,
            )
        result = await first
        assert result.final is not None and result.final.code == 250
        assert conn.usable and not conn.busy
    finally:
        await conn.close()
    assert [m.rcpt_tos for m in mx.messages] == [("b@b.test",)]
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("asyncio")]


async def test_auth_failure_is_temporary(smtp_server: ServerFactory) -> None:
    mx = smtp_server(auth=("user", "s3cret"))
    with pytest.raises(TemporaryFailure, match="authentication") as caught:
        await connect(mx, auth=("user", "wrong"))
    assert caught.value.code == 535


@pytest.mark.parametrize(
    ("greeting", "error"),
    [("421 4.3.2 Too busy", TemporaryFailure), ("554 5.7.1 No SMTP service", PermanentFailure)],
)
async def test_refused_greeting(
    smtp_server: ServerFactory, greeting: str, error: type[Exception]
) -> None:
    mx = smtp_server(greeting=greeting)
    with pytest.raises(error) as caught:
        await connect(mx)
    assert isinstance(caught.value, TemporaryFailure | PermanentFailure)
    assert caught.value.code == int(greeting[:3])
    assert caught.value.enhanced == greeting[4:9]
    assert caught.value.host == "mx.test"


async def test_helo_fallback(smtp_server: ServerFactory) -> None:
    mx = smtp_server(ehlo_reply="502 5.5.1 EHLO not implemented")
    conn = await connect(mx)
    try:
        assert dict(conn.extensions) == {}
        assert conn.tls_version is None
        result = await send(conn)
    finally:
        await conn.close()
    assert result.final is not None
    assert result.final.code == 250
    assert mx.commands[:3] == ["EHLO", "HELO", "MAIL"]


async def test_connection_refused() -> None:
    port = free_loopback_port()
    with pytest.raises(SMTPConnectError, match="cannot connect"):
        await SMTPConnection.open(
            host="mx.test",
            ip="127.0.0.1",
            port=port,
            helo_name="client.test",
            timeouts=FAST,
            starttls=StartTLS.OPPORTUNISTIC,
        )


async def test_servers_on_several_loopback_ips_share_one_port(smtp_server: ServerFactory) -> None:
    first = smtp_server(host="127.0.0.2")
    second = smtp_server(host="127.0.0.3", port=first.port)
    assert second.port == first.port
    for server in (first, second):
        conn = await connect(server, host="mx1.test", source_address="127.0.0.1")
        try:
            await send(conn, (f"to@{server.host}.test",))
        finally:
            await conn.close()
    assert [m.rcpt_tos for m in first.messages] == [("to@127.0.0.2.test",)]
    assert [m.rcpt_tos for m in second.messages] == [("to@127.0.0.3.test",)]
    assert first.messages[0].peer[0] == "127.0.0.1"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_loopback(
    smtp_server: ServerFactory, client_tls_context: ssl.SSLContext
) -> None:
    mx = smtp_server(host="::1")
    conn = await connect(mx, StartTLS.VERIFY, tls_context=client_tls_context)
    try:
        await send(conn)
    finally:
        await conn.close()
    assert mx.messages[0].tls


async def test_wait_for_messages_from_a_thread(smtp_server: ServerFactory) -> None:
    mx = smtp_server()
    conn = await connect(mx)
    try:
        await send(conn)
    finally:
        await conn.close()
    await mx.await_messages(1, within=5)
    assert len(mx.messages) == 1
    with pytest.raises(AssertionError, match="expected 2"):
        mx.wait_for_messages(2, timeout=0.05)


@pytest.mark.parametrize(
    ("literal", "ip"),
    [
        ("[127.0.0.1]", "127.0.0.1"),
        pytest.param(
            "[IPv6:::1]",
            "::1",
            marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback"),
        ),
    ],
)
async def test_an_address_literal_is_verified_against_its_address(
    smtp_server: ServerFactory, client_tls_context: ssl.SSLContext, literal: str, ip: str
) -> None:
    # Mail to user@[127.0.0.1] has the literal for its MX host name. The certificate names
    # the address; "[127.0.0.1]" is no name any certificate can hold.
    mx = smtp_server(host=ip)
    conn = await connect(mx, StartTLS.VERIFY, host=literal, tls_context=client_tls_context)
    try:
        assert conn.tls_version is not None
        await send(conn)
    finally:
        await conn.close()
    assert mx.messages[0].tls


async def test_an_address_literal_is_not_sent_as_sni(cert_receiver: Any) -> None:
    # RFC 6066 §3: SNI carries a DNS host name; a literal IPv4 or IPv6 address is not
    # permitted there, let alone in brackets (a strict TLS server refuses it).
    from tests.support.certs import self_signed  # cryptography: only when used

    names: list[str | None] = []
    mx = cert_receiver(*self_signed("mx.test"), sni=names)
    conn = await connect(mx, StartTLS.OPPORTUNISTIC, host="[127.0.0.1]")
    try:
        assert conn.tls_version is not None
    finally:
        await conn.close()
    assert names == [None]


async def test_a_failed_implicit_tls_handshake_leaves_no_error_unretrieved(
    smtp_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # The handshake failed, and the connection was also told it was lost: the error it
    # set on the greeting, which nobody would wait for now, was logged by asyncio as
    # "Future exception was never retrieved".
    mx = smtp_server(starttls=False)  # a plaintext server: it greets in the clear
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(TLSHandshakeError):
            await connect(mx, StartTLS.REQUIRED, implicit_tls=True)
        await asyncio.sleep(0.1)  # the transports' last callbacks let go of the connection
        gc.collect()
    assert "never retrieved" not in caplog.text


@pytest.mark.parametrize("mode", [StartTLS.OPPORTUNISTIC, StartTLS.REQUIRED, StartTLS.VERIFY])
async def test_the_mx_host_name_is_sent_as_sni(cert_receiver: Any, mode: StartTLS) -> None:
    # SNI carries the MX host name, never the address connected to (RFC 6066 §3); under
    # verify it is sent before the certificate (self-signed here) is refused.
    from tests.support.certs import self_signed  # cryptography: only when used

    names: list[str | None] = []
    mx = cert_receiver(*self_signed("mx.test"), sni=names)
    if mode is StartTLS.VERIFY:
        with pytest.raises(TLSVerifyError):
            await connect(mx, mode)
    else:
        conn = await connect(mx, mode)
        await conn.close()
    assert names == ["mx.test"]


@pytest.mark.parametrize(
    ("host", "accepted"),
    [("a.example.test", True), ("a.b.example.test", False), ("example.test", False)],
)
async def test_verify_takes_a_wildcard_for_one_label_only(
    cert_receiver: Any, host: str, accepted: bool
) -> None:
    # RFC 6125 §6.4.3: "*.example.test" names a.example.test, neither a name two labels
    # down nor example.test itself.
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("*.example.test")
    mx = cert_receiver(issued.cert_chain_pems[0].bytes(), issued.private_key_pem.bytes())
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    if not accepted:
        with pytest.raises(TLSVerifyError, match="mismatch"):
            await connect(mx, StartTLS.VERIFY, host=host, tls_context=trusting)
        assert mx.messages == []
        return
    conn = await connect(mx, StartTLS.VERIFY, host=host, tls_context=trusting)
    try:
        await send(conn)
    finally:
        await conn.close()
    assert mx.messages[0].tls

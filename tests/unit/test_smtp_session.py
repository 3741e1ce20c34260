"""The sans-IO client session: commands, pipelining, state, errors. No sockets."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstrom.errors import SMTPProtocolError
from mailstrom.smtp import (
    NEED_DATA,
    ClientSession,
    Command,
    LocalProtocolError,
    Reply,
    State,
    encode_body,
    encode_path,
)
from mailstrom.smtp.replies import MAX_TEXT
from mailstrom.smtp.session import _AFTER_REPLY, _ALLOWED, _GROUPABLE, _MAY_FOLLOW, _SUCCESS

EHLO_FULL = (
    b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n"
)
EHLO_PLAIN = b"250-mx.test\r\n250 8BITMIME\r\n"


def feed(session: ClientSession, wire: bytes) -> list[Reply]:
    """Feed bytes and collect every complete reply."""
    session.receive_data(wire)
    events = []
    while isinstance(event := session.next_event(), Reply):
        events.append(event)
    return events


def ready(ehlo: bytes = EHLO_FULL) -> ClientSession:
    session = ClientSession(helo_name="client.test")
    assert feed(session, b"220 mx.test ESMTP\r\n")[0].command is Command.GREETING
    assert session.ehlo() == b"EHLO client.test\r\n"
    [reply] = feed(session, ehlo)
    assert reply.command is Command.EHLO
    assert reply.ok
    assert session.state is State.READY
    return session


def test_greeting_and_ehlo_extensions() -> None:
    session = ready()
    assert session.esmtp
    assert session.pipelining
    assert session.max_size == 1000
    assert session.auth_mechanisms == {"PLAIN", "LOGIN"}
    assert session.extensions["SIZE"] == "1000"


def test_nothing_may_be_sent_before_the_greeting() -> None:
    session = ClientSession(helo_name="client.test")
    assert session.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        session.ehlo()


@pytest.mark.parametrize("code", [421, 554])
def test_refused_greeting_is_an_event_the_caller_acts_on(code: int) -> None:
    session = ClientSession(helo_name="client.test")
    [event] = feed(session, b"%d 4.3.2 go away\r\n" % code)
    assert event.command is Command.GREETING
    assert not event.ok
    assert session.state is (State.CLOSED if code == 421 else State.REFUSED)
    assert not session.can_send(Command.EHLO)
    assert session.can_send(Command.QUIT) is (code == 554)


@pytest.mark.parametrize("code", [500, 502, 550])
def test_helo_fallback_after_ehlo_refused(code: int) -> None:
    session = ClientSession(helo_name="client.test")
    feed(session, b"220 old.test\r\n")
    session.ehlo()
    [reply] = feed(session, b"%d command not recognized\r\n" % code)
    assert reply.command is Command.EHLO
    assert not reply.ok
    assert session.state is State.HELLO
    assert session.helo() == b"HELO client.test\r\n"
    [reply] = feed(session, b"250 old.test\r\n")
    assert reply.command is Command.HELO
    assert session.state is State.READY
    assert not session.esmtp
    assert not session.pipelining
    assert dict(session.extensions) == {}


def test_pipelined_batch_is_one_write_with_replies_matched_in_order() -> None:
    session = ready()
    batch = session.envelope(
        "from@a.test", ["one@b.test", "two@b.test", "three@b.test"], size=500, reset=True
    )
    assert batch == (
        b"RSET\r\nMAIL FROM:<from@a.test> SIZE=500\r\n"
        b"RCPT TO:<one@b.test>\r\nRCPT TO:<two@b.test>\r\nRCPT TO:<three@b.test>\r\nDATA\r\n"
    )
    assert session.outstanding == (
        Command.RSET,
        Command.MAIL,
        Command.RCPT,
        Command.RCPT,
        Command.RCPT,
        Command.DATA,
    )
    # Replies arrive in one read, split oddly.
    events = feed(session, b"250 2.0.0 reset\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no")
    events += feed(session, b" such user\r\n451 4.7.1 later\r\n354 go ahead\r\n")
    assert [(e.command, e.argument, e.reply.code) for e in events] == [
        (Command.RSET, None, 250),
        (Command.MAIL, "from@a.test", 250),
        (Command.RCPT, "one@b.test", 250),
        (Command.RCPT, "two@b.test", 550),
        (Command.RCPT, "three@b.test", 451),
        (Command.DATA, None, 354),
    ]
    assert events[3].reply.enhanced == "5.1.1"
    assert session.state is State.DATA
    assert session.body(b"hi\r\n") == b"hi\r\n.\r\n"
    [final] = feed(session, b"250 2.0.0 queued as X\r\n")
    assert final.command is Command.BODY
    assert final.ok
    assert session.state is State.READY


def test_envelope_needs_pipelining() -> None:
    session = ready(EHLO_PLAIN)
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        session.envelope("a@a.test", ["b@b.test"])


def test_without_pipelining_one_command_at_a_time() -> None:
    session = ready(EHLO_PLAIN)
    assert session.mail("a@a.test", size=10) == b"MAIL FROM:<a@a.test>\r\n"  # no SIZE offered
    with pytest.raises(LocalProtocolError):
        session.rcpt("b@b.test")
    feed(session, b"250 ok\r\n")
    assert session.state is State.MAIL
    assert session.rcpt("b@b.test") == b"RCPT TO:<b@b.test>\r\n"
    with pytest.raises(LocalProtocolError):
        session.data()
    feed(session, b"250 ok\r\n")
    session.data()
    [reply] = feed(session, b"354 go\r\n")
    assert reply.reply.code == 354
    assert session.state is State.DATA


def test_pipelining_groups_only_what_rfc_2920_allows() -> None:
    session = ready()
    session.mail("a@a.test")
    with pytest.raises(LocalProtocolError):
        session.ehlo()  # EHLO must wait for outstanding replies
    session.data()
    with pytest.raises(LocalProtocolError):
        session.body(b"x")  # content only after the 354 has arrived


def test_failed_mail_in_a_pipelined_batch_leaves_the_transaction() -> None:
    session = ready()
    session.envelope("a@a.test", ["b@b.test"])
    events = feed(
        session, b"550 5.7.1 sender rejected\r\n503 5.5.1 no MAIL\r\n503 no valid RCPT\r\n"
    )
    assert [e.reply.code for e in events] == [550, 503, 503]
    assert session.state is State.READY
    assert session.mail("a@a.test")  # a new transaction may start


def test_rset_between_messages_on_a_reused_session() -> None:
    session = ready(EHLO_PLAIN)
    session.mail("a@a.test")
    feed(session, b"250 ok\r\n")
    session.rcpt("b@b.test")
    feed(session, b"550 no\r\n")
    with pytest.raises(LocalProtocolError):
        session.mail("a@a.test")  # nested MAIL: must RSET first
    assert session.rset() == b"RSET\r\n"
    feed(session, b"250 flushed\r\n")
    assert session.state is State.READY
    assert session.mail("c@a.test") == b"MAIL FROM:<c@a.test>\r\n"


def test_mail_parameters() -> None:
    session = ready()
    line = session.mail("ü@a.test", size=123, eightbit=True, smtputf8=True)
    assert line == "MAIL FROM:<ü@a.test> SIZE=123 BODY=8BITMIME SMTPUTF8\r\n".encode()
    feed(session, b"250 ok\r\n")
    assert session.rcpt("δ@b.test", smtputf8=True) == "RCPT TO:<δ@b.test>\r\n".encode()


def test_null_reverse_path() -> None:
    assert ready().mail("") == b"MAIL FROM:<>\r\n"


def test_parameters_the_server_lacks_are_refused_locally() -> None:
    session = ready(EHLO_PLAIN.replace(b"8BITMIME", b"HELP"))
    with pytest.raises(LocalProtocolError, match="8BITMIME"):
        session.mail("a@a.test", eightbit=True)
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        session.mail("a@a.test", smtputf8=True)
    assert session.outstanding == ()


@pytest.mark.parametrize("address", ["ü@a.test", "a@a.test>\r\nRCPT TO:<x@evil.test", "a\0@b"])
def test_bad_addresses_are_refused_before_anything_is_queued(address: str) -> None:
    session = ready()
    with pytest.raises(ValueError, match="address"):
        session.envelope("a@a.test", ["ok@b.test", address])
    assert session.outstanding == ()


@pytest.mark.parametrize(
    ("content", "wire"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
        (b"", b".\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (
            b".starts\r\n.\r\n..two\r\nmid.dle\r\n.",
            b"..starts\r\n..\r\n...two\r\nmid.dle\r\n..\r\n.\r\n",
        ),
        (b"x\r\n.\r\n", b"x\r\n..\r\n.\r\n"),
        (b"ends in cr\r", b"ends in cr\r\r\n.\r\n"),
    ],
)
def test_dot_stuffing_and_terminator(content: bytes, wire: bytes) -> None:
    assert encode_body(content) == wire


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        ("1000", 1000),
        ("0", None),
        ("", None),
        ("abc", None),
        ("-5", None),
        ("²", None),
        ("٣", None),
    ],
)
def test_size_limit_is_ascii_digits_only(value: str, limit: int | None) -> None:
    """RFC 1870: SIZE takes ASCII digits; "²" (isdigit, but int() refuses it) and "٣"
    (int() reads 3) announce no limit, as any other invalid value does."""
    session = ready(b"250-mx.test\r\n250 SIZE " + value.encode() + b"\r\n")
    assert session.max_size == limit


@pytest.mark.parametrize("space", ["\t", " \t", "\t\t"], ids=["tab", "space-tab", "tabs"])
def test_an_ehlo_line_split_by_a_tab_is_read(space: str) -> None:
    """RFC 5321 §4.1.1.1 puts SP between an ehlo-keyword and its parameters; a server that
    puts HTAB there still means them, and Postfix's client (smtp_proto.c, keyword split at
    SP, HTAB or "=") and smtplib read them. Was: "SIZE<HTAB>1000" was one keyword, so the
    limit went unread and a message over it was sent whole, to be refused after its dot."""
    session = ready(
        f"250-mx.test\r\n250-SIZE{space}1000\r\n250 AUTH{space}PLAIN{space}LOGIN\r\n".encode()
    )
    assert session.max_size == 1000
    assert session.auth_mechanisms == {"PLAIN", "LOGIN"}
    assert set(session.extensions) == {"SIZE", "AUTH"}
    assert session.mail("a@a.test", size=10) == b"MAIL FROM:<a@a.test> SIZE=10\r\n"


def test_starttls_forgets_extensions_and_needs_ehlo_again() -> None:
    session = ready()
    assert session.starttls() == b"STARTTLS\r\n"
    [reply] = feed(session, b"220 2.0.0 ready\r\n")
    assert reply.command is Command.STARTTLS
    assert session.state is State.TLS
    with pytest.raises(LocalProtocolError):
        session.mail("a@a.test")
    session.tls_established()
    assert session.state is State.HELLO
    assert dict(session.extensions) == {}
    with pytest.raises(LocalProtocolError):
        session.mail("a@a.test")
    session.ehlo()
    feed(session, b"250-mx.test\r\n250 SIZE 5\r\n")
    assert dict(session.extensions) == {"SIZE": "5"}


def test_plaintext_after_the_starttls_reply_is_a_protocol_error() -> None:
    session = ready()
    session.starttls()
    session.receive_data(b"220 ready\r\n250 injected\r\n")
    with pytest.raises(SMTPProtocolError, match="STARTTLS"):
        session.next_event()
    assert session.state is State.CLOSED


def test_refused_starttls_returns_to_ready() -> None:
    session = ready()
    session.starttls()
    feed(session, b"454 4.7.0 TLS not available\r\n")
    assert session.state is State.READY
    with pytest.raises(LocalProtocolError):
        session.tls_established()


def test_auth_plain() -> None:
    session = ready()
    line = session.auth_plain("user", "pässword")
    assert line == b"AUTH PLAIN " + base64.b64encode("\0user\0pässword".encode()) + b"\r\n"
    [reply] = feed(session, b"235 2.7.0 ok\r\n")
    assert reply.command is Command.AUTH
    assert session.state is State.READY


def test_auth_login_challenges() -> None:
    session = ready()
    assert session.auth_login() == b"AUTH LOGIN\r\n"
    feed(session, b"334 VXNlcm5hbWU6\r\n")
    assert session.state is State.AUTH
    assert session.auth_response(b"user") == b"dXNlcg==\r\n"
    feed(session, b"334 UGFzc3dvcmQ6\r\n")
    assert session.auth_response(b"pw") == b"cHc=\r\n"
    [reply] = feed(session, b"535 5.7.8 bad credentials\r\n")
    assert not reply.ok
    assert session.state is State.READY


def test_auth_can_be_cancelled() -> None:
    session = ready()
    session.auth_login()
    feed(session, b"334 VXNlcm5hbWU6\r\n")
    assert session.auth_response(None) == b"*\r\n"


def test_421_closes_the_session_and_drops_outstanding_replies() -> None:
    session = ready()
    session.envelope("a@a.test", ["b@b.test", "c@b.test"])
    [reply] = feed(session, b"421 4.3.2 shutting down\r\n")
    assert reply.command is Command.MAIL
    assert reply.closing
    assert session.state is State.CLOSED
    assert session.outstanding == ()
    assert not session.can_send(Command.RSET)
    with pytest.raises(SMTPProtocolError, match="unsolicited"):
        feed(session, b"250 late\r\n")


def test_quit() -> None:
    session = ready()
    assert session.quit() == b"QUIT\r\n"
    feed(session, b"221 bye\r\n")
    assert session.state is State.CLOSED


def test_unsolicited_reply_is_a_protocol_error() -> None:
    session = ready()
    with pytest.raises(SMTPProtocolError, match="unsolicited"):
        feed(session, b"250 surprise\r\n")
    assert session.state is State.CLOSED


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"250 fine\r\nbogus\r\n", "malformed"),
        (b"250-one\r\n550 two\r\n", "changed"),
        (b"354 not for MAIL\r\n", "unexpected"),
    ],
)
def test_bad_replies_are_protocol_errors(wire: bytes, match: str) -> None:
    session = ready()
    session.envelope("a@a.test", ["b@b.test"])
    with pytest.raises(SMTPProtocolError, match=match):
        feed(session, wire)
    assert session.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        session.rset()


def test_byte_by_byte_conversation() -> None:
    session = ClientSession(helo_name="client.test")
    events: list[Reply] = []
    wire = b"220-mx.test\r\n220 ESMTP\r\n"
    for i in range(len(wire)):
        events += feed(session, wire[i : i + 1])
    session.ehlo()
    for i in range(len(EHLO_FULL)):
        events += feed(session, EHLO_FULL[i : i + 1])
    session.envelope("a@a.test", ["b@b.test"])
    replies = b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n"
    for i in range(len(replies)):
        events += feed(session, replies[i : i + 1])
    assert [e.command for e in events] == [
        Command.GREETING,
        Command.EHLO,
        Command.MAIL,
        Command.RCPT,
        Command.DATA,
    ]
    assert events[0].reply.text == "mx.test\nESMTP"
    assert session.pipelining
    assert session.state is State.DATA


def test_an_internationalised_helo_name_goes_out_in_its_idna_2008_form() -> None:
    session = ClientSession(helo_name="mail.straße.de")
    feed(session, b"220 mx.test\r\n")
    assert session.ehlo() == b"EHLO mail.xn--strae-oqa.de\r\n"  # not mail.strasse.de


def test_invalid_helo_name() -> None:
    with pytest.raises(ValueError, match="HELO"):
        ClientSession(helo_name="bad name\r\n")


# --- can_send keeps its bookkeeping incrementally; it must agree with a full re-walk ------


def reference_can_send(session: ClientSession, command: Command) -> bool:
    """can_send as it was: project the state over every outstanding command, then check."""
    state = session.state
    for pending in session.outstanding:
        after = _AFTER_REPLY[pending][_SUCCESS.get(pending, 2)]
        if after is not None:
            state = after
    if command not in _ALLOWED[state]:
        return False
    if not session.outstanding:
        return True
    return (
        session.pipelining
        and command in _MAY_FOLLOW
        and all(c in _GROUPABLE for c in session.outstanding)
    )


_SENDERS = {
    Command.EHLO: lambda s: s.ehlo(),
    Command.HELO: lambda s: s.helo(),
    Command.STARTTLS: lambda s: s.starttls(),
    Command.AUTH: lambda s: s.auth_response(b"x") if s.state is State.AUTH else s.auth_login(),
    Command.MAIL: lambda s: s.mail("a@a.test"),
    Command.RCPT: lambda s: s.rcpt("b@b.test"),
    Command.DATA: lambda s: s.data(),
    Command.BODY: lambda s: s.body(b"x\r\n"),
    Command.RSET: lambda s: s.rset(),
    Command.NOOP: lambda s: s.noop(),
    Command.QUIT: lambda s: s.quit(),
}
_CODES = {2: [250, 220], 3: [354, 334], 4: [451, 421], 5: [550]}


@settings(max_examples=300, deadline=None)  # a shared machine is no stopwatch
@given(st.data())
def test_can_send_agrees_with_a_full_walk_of_the_outstanding_commands(
    data: st.DataObject,
) -> None:
    # Half the runs start with PIPELINING offered, so that long batches are common.
    session = ready() if data.draw(st.booleans()) else ClientSession(helo_name="client.test")
    for _ in range(40):
        for command in Command:
            assert session.can_send(command) is reference_can_send(session, command), command
        if session.state is State.CLOSED:
            break
        sendable = [c for c in _SENDERS if session.can_send(c)]
        if Command.QUIT in sendable and len(sendable) > 1 and data.draw(st.integers(0, 19)):
            sendable.remove(Command.QUIT)  # rarely, or few sessions get as far as a batch
        if session.outstanding and (not sendable or data.draw(st.integers(0, 3)) == 0):
            # Answer the oldest command, usually with a reply it can get.
            head = session.outstanding[0]
            digits = sorted(_AFTER_REPLY[head]) if data.draw(st.integers(0, 9)) else [2, 3, 4, 5]
            code = data.draw(st.sampled_from(_CODES[data.draw(st.sampled_from(digits))]))
            wire = b"%d ok\r\n" % code
            if head in (Command.EHLO, Command.HELO) and code // 100 == 2:
                pipelining = b"250-mx\r\n250 PIPELINING\r\n"
                wire = data.draw(st.sampled_from([pipelining, pipelining, wire]))
            try:
                feed(session, wire)
            except SMTPProtocolError:
                assert session.state is State.CLOSED
        elif sendable:
            _SENDERS[data.draw(st.sampled_from(sendable))](session)
        elif session.state is State.TLS:
            session.tls_established()
        else:
            break


@pytest.mark.parametrize("wire", [b"421 4.3.2 bye\r\n", b"354 not for MAIL\r\n"])
def test_nothing_may_be_sent_once_closed_mid_batch(wire: bytes) -> None:
    session = ready()
    session.envelope("a@a.test", ["b@b.test", "c@b.test"])
    with contextlib.suppress(SMTPProtocolError):
        feed(session, wire)
    assert session.state is State.CLOSED
    assert [c for c in Command if session.can_send(c)] == []


def test_long_pipelined_envelope() -> None:
    session = ready()
    recipients = [f"r{i}@b.test" for i in range(5000)]
    batch = session.envelope("a@a.test", recipients, reset=True)
    assert batch.count(b"RCPT TO:") == 5000
    assert len(session.outstanding) == 5003
    assert not session.can_send(Command.MAIL)
    events = feed(session, b"250 ok\r\n" * 5002 + b"354 go\r\n")
    assert [e.argument for e in events[2:-1]] == recipients
    assert session.state is State.DATA
    assert session.outstanding == ()
    assert session.can_send(Command.BODY)


@pytest.mark.parametrize("char", ["\r", "\n", "\0", "<", ">"])
def test_encode_path_refuses_each_forbidden_character(char: str) -> None:
    with pytest.raises(ValueError, match="invalid envelope address"):
        encode_path(f"a{char}b@c.test", True)


def test_encode_path() -> None:
    assert encode_path("", False) == b"<>"
    assert encode_path("a@b.test", False) == b"<a@b.test>"
    assert encode_path("ü@b.test", True) == "<ü@b.test>".encode()
    with pytest.raises(ValueError, match="SMTPUTF8"):
        encode_path("ü@b.test", False)


def test_next_envelope_may_follow_the_content_in_one_group() -> None:
    """RFC 2920 §3.1: the content opens a group, so the next transaction's MAIL, RCPT and
    DATA go out with the final dot, and their replies follow the content's reply."""
    session = ready()
    session.envelope("a@a.test", ["b@b.test"])
    feed(session, b"250 ok\r\n250 ok\r\n354 go\r\n")
    batch = session.body(b"one\r\n") + session.envelope("a@a.test", ["c@b.test"])
    assert batch == b"one\r\n.\r\nMAIL FROM:<a@a.test>\r\nRCPT TO:<c@b.test>\r\nDATA\r\n"
    assert not session.can_send(Command.MAIL)  # DATA ends the group
    events = feed(session, b"250 queued\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert [e.command for e in events] == [
        Command.BODY,
        Command.MAIL,
        Command.RCPT,
        Command.DATA,
    ]
    assert session.state is State.DATA


def test_a_421_to_the_content_voids_the_pipelined_next_envelope() -> None:
    session = ready()
    session.envelope("a@a.test", ["b@b.test"])
    feed(session, b"250 ok\r\n250 ok\r\n354 go\r\n")
    session.body(b"one\r\n")
    session.envelope("a@a.test", ["c@b.test"])
    [reply] = feed(session, b"421 4.3.2 bye\r\n")
    assert reply.command is Command.BODY
    assert session.state is State.CLOSED
    assert session.outstanding == ()


def _stepwise_envelope(session: ClientSession, reset: bool) -> bytes:
    """envelope() as one command method after the other, each checked on its own."""
    out = [session.rset()] if reset else []
    out.append(session.mail("a@a.test", size=10))
    out += [session.rcpt("b@b.test"), session.rcpt("c@b.test"), session.data()]
    return b"".join(out)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_envelope_agrees_with_the_commands_sent_one_by_one(data: st.DataObject) -> None:
    # envelope() checks the first command and pushes the rest: it must accept and refuse
    # exactly where sending each command on its own would, and queue the same commands.
    steps: list[bytes | None] = []  # replies fed (bytes) or a random command sent (None)

    def replay() -> ClientSession:
        session = ready()
        for i, step in enumerate(steps):
            if step is None:
                _SENDERS[_chosen[i]](session)
            else:
                with contextlib.suppress(SMTPProtocolError):
                    feed(session, step)
        return session

    _chosen: dict[int, Command] = {}
    for _ in range(12):
        reset = data.draw(st.booleans())
        session, twin = replay(), replay()
        try:
            batch: bytes | str = session.envelope(
                "a@a.test", ["b@b.test", "c@b.test"], size=10, reset=reset
            )
        except LocalProtocolError:
            batch = "refused"
        try:
            stepwise: bytes | str = _stepwise_envelope(twin, reset)
        except LocalProtocolError:
            stepwise = "refused"
        assert batch == stepwise
        if batch != "refused":
            assert session.outstanding == twin.outstanding
            assert [session.can_send(c) for c in Command] == [twin.can_send(c) for c in Command]
        # Move on: an envelope, a reply to the oldest command, or another command.
        session = replay()
        sendable = [c for c in _SENDERS if session.can_send(c) and c is not Command.QUIT]
        if session.outstanding and (not sendable or data.draw(st.booleans())):
            code = data.draw(st.sampled_from([250, 354, 451, 550]))
            steps.append(b"%d ok\r\n" % code)
        elif sendable:
            _chosen[len(steps)] = data.draw(st.sampled_from(sendable))
            steps.append(None)
        else:
            break


def test_encode_path_remembers_only_good_addresses_per_smtputf8() -> None:
    from mailstrom.smtp import session as session_module

    session_module._paths[0].clear()
    session_module._paths[1].clear()
    assert encode_path("ü@b.test", True) == "<ü@b.test>".encode()
    assert encode_path("ü@b.test", True) == "<ü@b.test>".encode()  # remembered
    with pytest.raises(ValueError, match="SMTPUTF8"):  # not with smtputf8 off
        encode_path("ü@b.test", False)
    for _ in range(2):
        with pytest.raises(ValueError, match="invalid envelope address"):
            encode_path("a\r\nb@c.test", False)
    assert "a\r\nb@c.test" not in session_module._paths[0]
    for i in range(2 * session_module._PATHS_MAX):
        assert encode_path(f"u{i}@b.test", False) == b"<u%d@b.test>" % i
    assert len(session_module._paths[0]) <= session_module._PATHS_MAX


_ANSWER_WIRES = st.lists(
    st.sampled_from(
        [b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", b"354 go\r\n", b"550 5.1.1 no\r\n",
         b"421 4.3.2 bye\r\n", b"451-4.7.1 a\r\n451 4.7.1 b\r\n", b"250 ", b"\r\n", b"xyz\r\n"]
    ),
    max_size=10,
).map(b"".join)  # fmt: skip


def _drain(session: ClientSession, wire: bytes, *, events: bool) -> list[object]:
    out: list[object] = []
    try:
        session.receive_data(wire)
        while True:
            if events:
                event = session.next_event()
                if event is NEED_DATA:
                    break
                assert isinstance(event, Reply)
                out.append((event.command, event.reply, event.argument))
            else:
                answer = session.next_answer()
                if answer is None:
                    break
                out.append(answer)
    except SMTPProtocolError as exc:
        out.append(str(exc))
    out.append(session.state)
    return out


@settings(max_examples=300)
@given(_ANSWER_WIRES, st.booleans())
def test_next_answer_says_what_next_event_says(wire: bytes, reset: bool) -> None:
    sessions = [ready(), ready()]
    for session in sessions:
        session.envelope("a@a.test", ["b@b.test", "c@b.test"], reset=reset)
    assert _drain(sessions[0], wire, events=True) == _drain(sessions[1], wire, events=False)


def test_a_reply_s_text_is_handed_out_cut_but_ehlo_keywords_are_read_from_the_whole() -> None:
    """A transaction keeps every RCPT reply until it ends: each is cut to MAX_TEXT
    characters. The EHLO keywords are read first, from the whole reply, so a long line
    (a bogus SIZE, longer than an ehlo-line can be: ignored) costs none of those after
    it."""
    s = ClientSession(helo_name="client.example")
    s.receive_data(b"220 mx.example ESMTP\r\n")
    s.next_event()
    s.ehlo()
    long = b"9" * (2 * MAX_TEXT)
    s.receive_data(b"250-mx.example\r\n250-SIZE " + long + b"\r\n250 PIPELINING\r\n")
    ehlo = s.next_event()
    assert isinstance(ehlo, Reply) and len(ehlo.reply.text) == MAX_TEXT
    assert s.pipelining and "SIZE" not in s.extensions and s.max_size is None
    s.envelope("a@example.com", ["b@example.org", "c@example.org"])
    s.receive_data(b"250 2.1.0 ok\r\n")
    assert isinstance(s.next_event(), Reply)
    s.receive_data(b"550-5.1.1 " + b"x" * MAX_TEXT + b"\r\n550 5.1.1 no such user\r\n")
    s.receive_data(b"451 4.3.0 " + b"y" * (3 * MAX_TEXT) + b"\r\n")
    refused, deferred = s.next_event(), s.next_event()
    assert isinstance(refused, Reply) and isinstance(deferred, Reply)
    assert (refused.reply.code, refused.reply.enhanced) == (550, "5.1.1")
    assert refused.reply.text == "x" * MAX_TEXT
    assert (deferred.reply.enhanced, deferred.reply.text) == ("4.3.0", "y" * MAX_TEXT)


@pytest.mark.parametrize("unsolicited", [False, True])
def test_a_protocol_error_quotes_a_bounded_part_of_the_reply(unsolicited: bool) -> None:
    """A reply that breaks the protocol may be as long as the parser takes (a megabyte):
    the error quotes its start, with an ellipsis, not the whole of it, so that a hostile
    server cannot make the client hold and log a megabyte per error."""
    session = ready()
    if not unsolicited:
        session.envelope("a@a.test", ["b@b.test"])  # a 354 is no reply to MAIL
    lines = [b"354-" + b"x" * 1000 + b"\r\n"] * 500 + [b"354 end\r\n"]
    with pytest.raises(SMTPProtocolError) as caught:
        feed(session, b"".join(lines))
    message = str(caught.value)
    assert ("unsolicited" if unsolicited else "unexpected reply to MAIL: 354 xxx") in message
    assert len(message) <= 300, len(message)
    assert message.endswith("…")
    assert session.state is State.CLOSED


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        (Command.DATA, b"334 what now\r\n"),
        (Command.DATA, b"355 go on\r\n"),
        (Command.AUTH, b"354 go ahead\r\n"),
        (Command.AUTH, b"300 more\r\n"),
    ],
)
def test_an_intermediate_reply_other_than_the_command_s_own_is_a_protocol_error(
    command: Command, wire: bytes
) -> None:
    """DATA goes on with 354 alone (RFC 5321 §4.3.2), AUTH with 334 alone (RFC 4954 §4),
    as EHLO succeeds with 250 alone: another 3xx there leaves the server in a state the
    client cannot know, and taken for a reply it was recorded as the server's answer to
    the recipients, a "334" on a deferred recipient."""
    session = ready()
    if command is Command.DATA:
        session.envelope("a@a.test", ["b@b.test"])
        feed(session, b"250 ok\r\n250 ok\r\n")
    else:
        session.auth_login()
    with pytest.raises(
        SMTPProtocolError, match=f"unexpected reply to {command}: {wire[:3].decode()}"
    ):
        feed(session, wire)
    assert session.state is State.CLOSED

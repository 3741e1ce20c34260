"""DSN parameters (RFC 3461): the request's value type and the session's MAIL/RCPT lines."""

from __future__ import annotations

import pytest

from mailstrom.errors import InvalidMessage
from mailstrom.message.dsn import DSN, Notify, Return, xtext
from mailstrom.smtp import ClientSession, Command, LocalProtocolError, Reply, State

EHLO_DSN = b"250-mx.test\r\n250-PIPELINING\r\n250-DSN\r\n250 SIZE 1000\r\n"
EHLO_NO_DSN = b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
MID = "0190f3a2c4e1b7d08a4f2c6e9b1d3f57"


def feed(session: ClientSession, wire: bytes) -> list[Reply]:
    session.receive_data(wire)
    events = []
    while isinstance(event := session.next_event(), Reply):
        events.append(event)
    return events


def ready(ehlo: bytes) -> ClientSession:
    session = ClientSession(helo_name="client.test")
    assert feed(session, b"220 mx.test ESMTP\r\n")[0].command is Command.GREETING
    session.ehlo()
    feed(session, ehlo)
    assert session.state is State.READY
    return session


def test_xtext() -> None:
    assert xtext("bob@example.org") == b"bob@example.org"
    assert xtext("a+b=c d") == b"a+2Bb+3Dc+20d"
    assert xtext("jörg") == b"j+C3+B6rg"


def test_parameters() -> None:
    dsn = DSN(notify=(Notify.FAILURE, Notify.DELAY), ret=Return.HEADERS, envid="order+42")
    assert dsn.mail_params(MID) == b" RET=HDRS ENVID=order+2B42"
    assert dsn.rcpt_params("Bob@example.org") == (
        b" NOTIFY=FAILURE,DELAY ORCPT=rfc822;Bob@example.org"
    )
    plain = DSN()
    assert plain.mail_params(MID) == b" ENVID=" + MID.encode()  # the message id by default
    assert plain.rcpt_params("bob@example.org") == b" ORCPT=rfc822;bob@example.org"
    assert plain.rcpt_params("jörg@example.org") == b""  # ORCPT only for ASCII addresses
    assert DSN(notify=(Notify.NEVER,), orcpt=False).rcpt_params("b@x.test") == b" NOTIFY=NEVER"


def test_strings_are_taken_for_the_enums_and_bad_values_refused() -> None:
    dsn = DSN(notify=("failure", "FAILURE", "delay"), ret="hdrs")  # type: ignore[arg-type]
    assert dsn.notify == (Notify.FAILURE, Notify.DELAY) and dsn.ret is Return.HEADERS
    for bad in (
        {"notify": ("never", "failure")},
        {"notify": ("sometimes",)},
        {"ret": "body"},
        {"envid": "has space"},
        {"envid": ""},
        {"envid": "x" * 101},
        {"envid": "ünicode"},
        # Wrong types: refused where they enter, not when a store writes the request
        # (SQLite raised ValueError for orcpt="no"; orcpt=2 read back as False).
        {"orcpt": "no"},
        {"orcpt": 2},
        {"envid": 42},
        {"envid": b"order-42"},
        {"notify": None},
        {"notify": "failure"},
    ):
        with pytest.raises(InvalidMessage, match="dsn"):
            DSN(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "dsn",
    [
        DSN(),
        DSN(notify=(Notify.SUCCESS, Notify.FAILURE), ret=Return.FULL, envid="a;b=c", orcpt=False),
        DSN(notify=(Notify.NEVER,)),
    ],
)
def test_the_stored_form_round_trips(dsn: DSN) -> None:
    assert DSN.decode(dsn.encode()) == dsn


def test_command_line_options() -> None:
    assert DSN.from_options(None) is None
    assert DSN.from_options("failure, delay", "HDRS", "x") == DSN(
        notify=(Notify.FAILURE, Notify.DELAY), ret=Return.HEADERS, envid="x"
    )
    assert DSN.from_options("never") == DSN(notify=(Notify.NEVER,))
    with pytest.raises(InvalidMessage):
        DSN.from_options("always")


def test_the_session_sends_them_when_dsn_is_offered() -> None:
    session = ready(EHLO_DSN)
    dsn = DSN(notify=(Notify.FAILURE,), ret=Return.HEADERS)
    wire = session.envelope(
        "a@example.com",
        ["b@example.org", "c@example.org"],
        size=10,
        dsn_mail=dsn.mail_params(MID),
        dsn_rcpt=[dsn.rcpt_params("b@example.org"), dsn.rcpt_params("c@example.org")],
    )
    assert wire == (
        b"MAIL FROM:<a@example.com> SIZE=10 RET=HDRS ENVID=" + MID.encode() + b"\r\n"
        b"RCPT TO:<b@example.org> NOTIFY=FAILURE ORCPT=rfc822;b@example.org\r\n"
        b"RCPT TO:<c@example.org> NOTIFY=FAILURE ORCPT=rfc822;c@example.org\r\n"
        b"DATA\r\n"
    )


def test_the_session_never_sends_them_when_dsn_is_not_offered() -> None:
    session = ready(EHLO_NO_DSN)
    with pytest.raises(LocalProtocolError, match="DSN"):
        session.mail("a@example.com", dsn=b" RET=FULL")
    with pytest.raises(LocalProtocolError, match="DSN"):
        session.envelope("a@example.com", ["b@example.org"], dsn_rcpt=[b" NOTIFY=NEVER"])
    # Refused before anything was queued: the session goes on as if nothing happened.
    assert session.mail("a@example.com") == b"MAIL FROM:<a@example.com>\r\n"


def test_stepwise_rcpt_and_malformed_parameters() -> None:
    session = ready(EHLO_DSN)
    session.mail("a@example.com")
    feed(session, b"250 ok\r\n")
    assert session.rcpt("b@example.org", dsn=b" NOTIFY=DELAY") == (
        b"RCPT TO:<b@example.org> NOTIFY=DELAY\r\n"
    )
    fresh = ClientSession(helo_name="client.test")
    assert fresh.extensions == {}
    with pytest.raises(ValueError, match="malformed"):
        ready(EHLO_DSN).mail("a@example.com", dsn=b" RET=FULL\r\nRSET")


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"notify": ("bogus",)}, "SUCCESS, FAILURE, DELAY, NEVER"),
        ({"notify": (5,)}, "SUCCESS, FAILURE, DELAY, NEVER"),
        ({"notify": ("x" * 100_000,)}, "SUCCESS, FAILURE, DELAY, NEVER"),
        ({"ret": "bogus"}, "FULL, HDRS"),
        ({"ret": 5}, "FULL, HDRS"),
    ],
)
def test_a_bad_notify_or_ret_names_the_words_it_takes(
    fields: dict[str, object], words: str
) -> None:
    """The enum's own ValueError was passed on: "dsn: 'BOGUS' is not a valid Notify" (the
    value upper-cased, quoted whole however long, and "Notify" no word a ``send --notify``
    user knows) never said what is taken."""
    with pytest.raises(InvalidMessage) as raised:
        DSN(**fields)  # type: ignore[arg-type]
    assert words in str(raised.value)
    assert len(str(raised.value)) < 200
    assert "valid Notify" not in str(raised.value) and "valid Return" not in str(raised.value)
    with pytest.raises(InvalidMessage) as raised:
        DSN.from_options(
            str(fields.get("notify", ("failure",))[0]),  # type: ignore[index]
            str(fields["ret"]) if "ret" in fields else None,
        )
    assert words in str(raised.value) and len(str(raised.value)) < 200

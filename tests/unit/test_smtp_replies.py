"""Reply parsing: multi-line replies, enhanced codes, arbitrary splits, EHLO keywords."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstrom.errors import SMTPProtocolError
from mailstrom.smtp import ReplyParser, parse_ehlo
from mailstrom.smtp.replies import MAX_LINE
from mailstrom.status import SMTPReply


def parse_all(data: bytes) -> list[SMTPReply]:
    parser = ReplyParser()
    parser.feed(data)
    replies = []
    while (reply := parser.next_reply()) is not None:
        replies.append(reply)
    return replies


def test_single_line_with_enhanced_code() -> None:
    [reply] = parse_all(b"550 5.1.1 No such user here\r\n")
    assert reply == SMTPReply(code=550, enhanced="5.1.1", text="No such user here")


def test_multi_line_reply_joins_lines_and_strips_repeated_enhanced_code() -> None:
    [reply] = parse_all(b"452-4.5.3 Too many\r\n452-4.5.3 recipients\r\n452 4.5.3 today\r\n")
    assert reply.code == 452
    assert reply.enhanced == "4.5.3"
    assert reply.text == "Too many\nrecipients\ntoday"


def test_enhanced_code_of_another_class_is_text() -> None:
    [reply] = parse_all(b"250 5.1.1 odd\r\n")
    assert reply.enhanced is None
    assert reply.text == "5.1.1 odd"


def test_bare_code_and_bare_lf_are_tolerated() -> None:
    assert parse_all(b"250\r\n354 go\n") == [
        SMTPReply(code=250, text=""),
        SMTPReply(code=354, text="go"),
    ]


def test_incomplete_reply_waits_for_more() -> None:
    parser = ReplyParser()
    parser.feed(b"250-first\r\n250 sec")
    assert parser.next_reply() is None
    parser.feed(b"ond\r\n")
    assert parser.next_reply() == SMTPReply(code=250, text="first\nsecond")
    assert parser.next_reply() is None


@given(st.data())
def test_any_split_gives_the_same_replies(data: st.DataObject) -> None:
    wire = (
        b"220 mx.test ESMTP\r\n"
        b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
        b"451 4.7.1 Greylisted, try later\r\n"
        b"550-5.1.1 one\r\n550 5.1.1 two\r\n"
    )
    cuts = sorted(data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=20)))
    parser = ReplyParser()
    replies = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        parser.feed(wire[start:end])
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
    assert replies == parse_all(wire)
    assert [r.code for r in replies] == [220, 250, 451, 550]


@pytest.mark.parametrize(
    "wire",
    [
        b"hello\r\n",
        b"25 short\r\n",
        b"250x nope\r\n",
        b"650 bad class\r\n",
        b"190 bad class\r\n",
        b"\r\n",
    ],
)
def test_malformed_line_is_a_protocol_error(wire: bytes) -> None:
    with pytest.raises(SMTPProtocolError, match="malformed"):
        parse_all(wire)


def test_code_changing_inside_multi_line_reply_is_a_protocol_error() -> None:
    with pytest.raises(SMTPProtocolError, match="changed"):
        parse_all(b"250-one\r\n251 two\r\n")


def test_over_long_line_is_a_protocol_error_without_waiting_for_lf() -> None:
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * (MAX_LINE - 10))
    assert parser.next_reply() is None
    with pytest.raises(SMTPProtocolError, match="longer"):
        parser.feed(b"x" * 100)


def test_parse_ehlo_keywords() -> None:
    reply = SMTPReply(
        code=250,
        text="mx.test greets you\nPIPELINING\nsize 35882577\n8BITMIME\nSMTPUTF8\n"
        "STARTTLS\nAUTH PLAIN LOGIN\nAUTH=LOGIN\nENHANCEDSTATUSCODES",
    )
    assert parse_ehlo(reply) == {
        "PIPELINING": "",
        "SIZE": "35882577",
        "8BITMIME": "",
        "SMTPUTF8": "",
        "STARTTLS": "",
        "AUTH": "PLAIN LOGIN",
        "ENHANCEDSTATUSCODES": "",
    }


def test_parse_ehlo_legacy_auth_form() -> None:
    assert parse_ehlo(SMTPReply(code=250, text="mx\nAUTH=PLAIN LOGIN")) == {"AUTH": "PLAIN LOGIN"}

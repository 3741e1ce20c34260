"""Reply parsing: multi-line replies, enhanced codes, arbitrary splits, EHLO keywords."""

from __future__ import annotations

import contextlib
import re
import tracemalloc
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstrom.errors import SMTPProtocolError
from mailstrom.smtp import ReplyParser, make_reply, parse_ehlo, replies
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


def test_an_enhanced_code_in_other_digits_is_text_in_a_multi_line_reply_too() -> None:
    assert make_reply(550, [b"5.\xd9\xa1.1 no", b"5.\xd9\xa1.1 such user"]) == SMTPReply(
        code=550, text="5.\u0661.1 no\n5.\u0661.1 such user"
    )


@pytest.mark.parametrize(
    "line",
    [
        "SIZE 1000\u3000",  # str.strip() took the IDEOGRAPHIC SPACE: a limit of 1000
        "\u00a0STARTTLS",
        "\u017ftarttls",  # LATIN SMALL LETTER LONG S: str.upper() made it STARTTLS
        "AUTH PLA\u0131N",  # DOTLESS I: str.upper() made it PLAIN
    ],
)
def test_an_ehlo_line_that_is_not_ascii_announces_nothing(line: str) -> None:
    extensions = parse_ehlo(SMTPReply(code=250, text=f"mx\nPIPELINING\n{line}"))
    assert extensions == {"PIPELINING": ""}


def test_an_ehlo_line_longer_than_a_reply_line_announces_nothing() -> None:
    """An ehlo-line is one reply line (RFC 5321 §4.5.3.1.5: 512 octets); a longer one is
    ignored, as the session keeps what is read for as long as the connection lives."""
    long_auth = "AUTH " + " ".join(f"X-MECH-{i}" for i in range(100))
    text = f"mx\nPIPELINING\n{long_auth}\nSIZE 1000"
    assert len(long_auth) > replies.MAX_EHLO_LINE
    assert parse_ehlo(SMTPReply(code=250, text=text)) == {"PIPELINING": "", "SIZE": "1000"}


# --- the fast path agrees with the regex-only parser it replaced ----------------------

_REF_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])(.*))?", re.DOTALL)
_REF_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: +|$)")


_REF_INVISIBLE = set(
    "\u2028\u2029\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def reference_safe(text: str) -> str:
    """Every control character but TAB, and the line separators and bidi controls, as
    U+FFFD: character by character, from the Unicode database."""
    return "".join(
        "\ufffd" if (unicodedata.category(c) == "Cc" and c != "\t") or c in _REF_INVISIBLE else c
        for c in text
    )


def reference_make_reply(code: int, lines: list[bytes]) -> SMTPReply:
    texts = [reference_safe(raw.decode("utf-8", "replace")) for raw in lines]
    enhanced = None
    match = _REF_ENHANCED.match(texts[0]) if texts else None
    if match is not None and int(match.group(1)) == code // 100:
        enhanced = ".".join(match.group(1, 2, 3))
        stripped = []
        for text in texts:
            m = _REF_ENHANCED.match(text)
            if m is not None and ".".join(m.group(1, 2, 3)) == enhanced:
                text = text[m.end() :]
            stripped.append(text)
        texts = stripped
    return SMTPReply(code=code, text="\n".join(texts), enhanced=enhanced)


def reference_parse(wire: bytes) -> list[SMTPReply | str]:
    """Every reply of ``wire`` with plain regexes, then the error that stopped it, if any."""
    out: list[SMTPReply | str] = []
    code: bytes | None = None
    lines: list[bytes] = []
    *complete, _ = wire.split(b"\n")
    for line in complete:
        line = line.removesuffix(b"\r")
        if len(line) > MAX_LINE:
            return [*out, "longer"]
        match = _REF_LINE.fullmatch(line)
        if match is None:
            return [*out, "malformed"]
        if code is not None and match.group(1) != code:
            return [*out, "changed"]
        code = match.group(1)
        lines.append(match.group(3) or b"")
        if match.group(2) != b"-":
            out.append(reference_make_reply(int(code), lines))
            code, lines = None, []
    return out


def parse_or_error(wire: bytes) -> list[SMTPReply | str]:
    out: list[SMTPReply | str] = []
    parser = ReplyParser()
    try:
        parser.feed(wire)
        while (reply := parser.next_reply()) is not None:
            out.append(reply)
    except SMTPProtocolError as exc:
        out.append(next(w for w in ("longer", "malformed", "changed") if w in str(exc)))
    return out


_TEXT_PIECES = st.sampled_from(
    [
        "2.1.5", "5.1.1", "4.7.1", "2.0.0", "3.0.0", "5.7.26", "2.123.456", "2.1234.5",
        "2.1.5555", "2.\u0661.5", "2.1.\u0663", "2.\u00b2.5", "2.1.", "2..5", "2.1.5.6", "2.1.5\n",
        " ", "  ", "\t", "\r", ".", "OK", "ü", "x", "\0", "\x1b[2J", "\x85", "\u2028", "\u202e",
        "\u00a0", "\u200b",
    ]
)  # fmt: skip
_LINES = st.tuples(
    st.sampled_from(
        [*b"250 550 451 452 354 334 221 421 199 650 260 25 2x0".split(), b"", b"\xd9\xa2"]
    ),
    st.sampled_from([b" ", b" ", b" ", b" ", b"-", b"", b"\t", b"x"]),
    st.lists(_TEXT_PIECES, max_size=4).map(lambda p: "".join(p).encode()),
    st.sampled_from([b"\r\n", b"\n", b"\r\r\n"]),
)


@settings(max_examples=500)
@given(st.lists(_LINES, min_size=1, max_size=8))
def test_parser_agrees_with_the_regex_only_parser(lines: list[tuple[bytes, ...]]) -> None:
    wire = b"".join(code + sep + text + end for code, sep, text, end in lines)
    assert parse_or_error(wire) == reference_parse(wire)


@settings(max_examples=500)
@given(st.integers(0, 699), st.lists(st.lists(_TEXT_PIECES, max_size=4).map("".join), max_size=4))
def test_make_reply_agrees_with_the_regex_only_version(code: int, texts: list[str]) -> None:
    lines = [t.encode() for t in texts]
    assert make_reply(code, lines) == reference_make_reply(code, lines)


@pytest.mark.parametrize(
    ("wire", "reply"),
    [
        (b"250 2.1.5 OK\r\n", SMTPReply(code=250, enhanced="2.1.5", text="OK")),
        (b"250 2.1.5   OK\r\n", SMTPReply(code=250, enhanced="2.1.5", text="OK")),
        (b"250 2.1.5\r\n", SMTPReply(code=250, enhanced="2.1.5", text="")),
        (b"550 5.7.26 unauth\r\n", SMTPReply(code=550, enhanced="5.7.26", text="unauth")),
        (b"250 2.123.456 x\r\n", SMTPReply(code=250, enhanced="2.123.456", text="x")),
        (b"250 2.1234.5 x\r\n", SMTPReply(code=250, text="2.1234.5 x")),
        (b"250 2.1.5.6 x\r\n", SMTPReply(code=250, text="2.1.5.6 x")),
        (b"250 2.1.5\tOK\r\n", SMTPReply(code=250, text="2.1.5\tOK")),
        (b"354 3.0.0 go\r\n", SMTPReply(code=354, text="3.0.0 go")),
        (b"451 5.1.1 odd\r\n", SMTPReply(code=451, text="5.1.1 odd")),
        # RFC 3463's digits are ASCII: not other scripts' (a str pattern's \d took them) ...
        ("250 2.\u0661.5 x\r\n".encode(), SMTPReply(code=250, text="2.\u0661.5 x")),
        ("550 5.1.\uff11 x\r\n".encode(), SMTPReply(code=550, text="5.1.\uff11 x")),
        # ... nor any other character str.isdigit() accepts, such as a superscript two.
        ("250 2.\u00b2.5 x\r\n".encode(), SMTPReply(code=250, text="2.\u00b2.5 x")),
        (b"250 a\r\r\n", SMTPReply(code=250, text="a\ufffd")),
        (b"250 \xff\r\n", SMTPReply(code=250, text="\ufffd")),
    ],
)
def test_single_line_replies(wire: bytes, reply: SMTPReply) -> None:
    assert parse_all(wire) == [reply]


def test_single_line_fast_path_still_checks_the_multi_line_code() -> None:
    parser = ReplyParser()
    parser.feed(b"250-one\r\n")
    assert parser.next_reply() is None
    parser.feed(b"550 two\r\n")  # looks like a whole single-line reply on its own
    with pytest.raises(SMTPProtocolError, match="changed"):
        parser.next_reply()


@pytest.mark.parametrize("split", [0, 1, 2], ids=["whole", "LF apart", "CR LF apart"])
def test_a_line_of_exactly_max_line_octets_is_taken_however_it_is_split(split: int) -> None:
    """The bound counts the line without its CR LF: a line of MAX_LINE octets whose LF
    came in a later read than its CR was refused, the same bytes in one read taken."""
    wire = b"250 " + b"x" * (MAX_LINE - 4) + b"\r\n"
    parser = ReplyParser()
    parser.feed(wire[: len(wire) - split])
    if split:
        assert parser.next_reply() is None
        parser.feed(wire[len(wire) - split :])
    reply = parser.next_reply()
    assert reply is not None and reply.code == 250 and len(reply.text) == MAX_LINE - 4


def test_a_cr_after_max_line_octets_that_does_not_end_the_line_is_refused() -> None:
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * (MAX_LINE - 4) + b"\r")  # the line may end here
    assert parser.next_reply() is None
    with pytest.raises(SMTPProtocolError, match="longer"):
        parser.feed(b"x")  # it does not


def test_over_long_complete_line_is_a_protocol_error() -> None:
    with pytest.raises(SMTPProtocolError, match="longer"):
        parse_all(b"250 " + b"x" * MAX_LINE + b"\r\n")


def test_a_reply_of_many_short_lines_holds_memory_in_proportion_to_its_octets() -> None:
    """MAX_REPLY bounds the octets of a reply; each line costs objects besides (its bytes,
    its text), so a hostile peer's reply of tiny lines under that bound held twelve times
    its size, per connection."""
    wire = b"250-abc\r\n" * (replies.MAX_REPLY // 7 - 10) + b"250 end\r\n"
    size = len(wire)
    parser = ReplyParser()
    tracemalloc.start()
    try:
        with contextlib.suppress(SMTPProtocolError):
            for start in range(0, len(wire), 65536):
                parser.feed(wire[start : start + 65536])
                parser.next_reply()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * size


def test_a_reply_of_many_lines_within_the_bound_is_taken() -> None:
    wire = b"250-line\r\n" * (replies.MAX_LINES - 1) + b"250 end\r\n"
    [reply] = parse_all(wire)
    assert reply.text.count("\n") == replies.MAX_LINES - 1
    with pytest.raises(SMTPProtocolError, match="lines"):
        parse_all(b"250-line\r\n" * replies.MAX_LINES + b"250 end\r\n")


# --- the memory of single-line replies already parsed ------------------------------------


@settings(max_examples=300)
@given(st.lists(_LINES, min_size=1, max_size=8))
def test_remembered_lines_give_the_same_replies(lines: list[tuple[bytes, ...]]) -> None:
    # Cold, then warm (every short single line of the first pass remembered), then split
    # byte by byte: the regex-only parser's replies each time.
    wire = b"".join(code + sep + text + end for code, sep, text, end in lines)
    expected = reference_parse(wire)
    replies._known.clear()
    assert parse_or_error(wire) == expected
    assert parse_or_error(wire) == expected
    parser = ReplyParser()
    out: list[SMTPReply | str] = []
    try:
        for i in range(len(wire)):
            parser.feed(wire[i : i + 1])
            while (reply := parser.next_reply()) is not None:
                out.append(reply)
    except SMTPProtocolError as exc:
        out.append(next(w for w in ("longer", "malformed", "changed") if w in str(exc)))
    assert out == expected


def test_a_remembered_line_inside_a_multi_line_reply_is_one_of_its_lines() -> None:
    assert parse_all(b"250 2.1.5 Ok\r\n") == [SMTPReply(code=250, enhanced="2.1.5", text="Ok")]
    assert parse_all(b"250-2.1.5 first\r\n250 2.1.5 Ok\r\n") == [
        SMTPReply(code=250, enhanced="2.1.5", text="first\nOk")
    ]
    parser = ReplyParser()
    parser.feed(b"550-no\r\n250 2.1.5 Ok\r\n")  # remembered, but the code changed
    with pytest.raises(SMTPProtocolError, match="changed"):
        parser.next_reply()


def test_remembered_replies_are_bounded_in_number_and_length() -> None:
    replies._known.clear()
    parse_all(b"".join(b"250 2.0.0 queued as %d\r\n" % i for i in range(3 * replies._KNOWN_MAX)))
    assert 0 < len(replies._known) <= replies._KNOWN_MAX
    replies._known.clear()
    long_line = b"250 " + b"x" * replies._KNOWN_LINE + b"\r\n"
    assert parse_all(long_line) == [SMTPReply(code=250, text="x" * replies._KNOWN_LINE)]
    assert not replies._known
    parse_all(b"250-a\r\n250 b\r\n")  # lines of multi-line replies are never remembered
    assert list(replies._known) == []


@pytest.mark.parametrize(
    ("wire", "text"),
    [
        (b"250 queued as \x00abc\r\n", "queued as \ufffdabc"),
        (b"550 5.1.1 no\x1b[31m such\x1b[0m user\r\n", "no\ufffd[31m such\ufffd[0m user"),
        (b"250 a\rb\x7f\xc2\x85c\r\n", "a\ufffdb\ufffd\ufffdc"),
        ("250 \u202egnp.exe \u2028x\r\n".encode(), "\ufffdgnp.exe \ufffdx"),
        (b"250 tab\tkept\r\n", "tab\tkept"),
        ("250 caf\u00e9 \u00a0ok\r\n".encode(), "caf\u00e9 \u00a0ok"),
        (b"250-x\x00\r\n250 y\x1b\r\n", "x\ufffd\ny\ufffd"),
    ],
)
def test_reply_text_carries_no_control_characters(wire: bytes, text: str) -> None:
    """A peer's NUL cannot reach a PostgreSQL text column, nor its escape sequences a
    terminal; what is printable (TAB, non-ASCII text) stays as it was sent."""
    [reply] = parse_all(wire)
    assert reply.text == text

"""Octet-level helpers and the 8-bit → 7-bit downgrade."""

from __future__ import annotations

import base64
from email import message_from_bytes, policy

import pytest
from tests.support.deadline import hang_guard

from mailstrom.errors import InvalidHeaderValue, InvalidMessage, LineTooLong
from mailstrom.message import Email, downgrade_to_7bit, prepare
from mailstrom.message.encoding import check_line_lengths, encode_long_lines, to_crlf


def body_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[2]


def leaves(data: bytes) -> list[tuple[str, bytes]]:
    message = message_from_bytes(data, policy=policy.default)
    out = []
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() == "message":
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((part.get_content_type(), payload))
    return out


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\r\n\nb\r\r\n", b"a\r\n\r\nb\r\n\r\n"),
        (b"", b""),
    ],
)
def test_to_crlf(given: bytes, expected: bytes) -> None:
    assert to_crlf(given) == expected


def test_check_line_lengths() -> None:
    check_line_lengths(b"x" * 998 + b"\r\n" + b"y" * 998)
    with pytest.raises(LineTooLong, match="line 2 is 999 octets"):
        check_line_lengths(b"x\r\n" + b"y" * 999 + b"\r\n")


SINGLE = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\ncaf\xc3\xa9 =equals and trailing space \r\n.dot line\r\n"
)


def test_downgrade_single_text_part_to_quoted_printable() -> None:
    out = downgrade_to_7bit(SINGLE)
    assert body_of(out).isascii()
    message = message_from_bytes(out, policy=policy.default)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert leaves(out) == leaves(SINGLE)
    # Headers other than the CTE are untouched, byte for byte.
    assert out.startswith(b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n")


def test_downgrade_without_cte_header_adds_one() -> None:
    data = b"From: a@example.com\r\nTo: b@example.org\r\n\r\nna\xc3\xafve\r\n"
    out = downgrade_to_7bit(data)
    assert body_of(out).isascii()
    assert message_from_bytes(out)["Content-Transfer-Encoding"] == "quoted-printable"
    assert leaves(out) == [("text/plain", b"na\xc3\xafve\r\n")]


MULTI = (
    b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="BB"\r\nContent-Transfer-Encoding: 8bit\r\n'
    b"\r\npreamble\r\n--BB\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\nh\xc3\xa9llo\r\n--BB\r\n"
    b"Content-Type: text/plain\r\n\r\nplain ascii\r\n--BB\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n"
    b"Content-Disposition: attachment; filename=x.bin\r\n"
    b"\r\n\x00\x01\xfe\xff\r\n--BB\r\n"
    b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nm\xc3\xbc\r\n"
    b"--BB--\r\n"
)


def test_downgrade_multipart_keeps_decoded_content() -> None:
    out = downgrade_to_7bit(MULTI)
    assert body_of(out).isascii()
    assert leaves(out) == leaves(MULTI)
    message = message_from_bytes(out, policy=policy.default)
    ctes = [str(part.get("Content-Transfer-Encoding")) for part in message.walk()]
    assert ctes == ["7bit", "quoted-printable", "None", "base64", "7bit", "quoted-printable"]
    attachment = next(p for p in message.walk() if p.get_content_type().endswith("stream"))
    assert attachment.get_filename() == "x.bin"
    assert b"plain ascii\r\n" in out  # untouched 7-bit part


def test_downgrade_leaves_7bit_messages_alone() -> None:
    data = b"From: a@example.com\r\nSubject: caf\xc3\xa9\r\n\r\nascii body\r\n"
    assert downgrade_to_7bit(data) is data


def test_downgrade_of_prepared_raw_message_round_trips() -> None:
    prepared = prepare(SINGLE.replace(b"\r\n", b"\n"))
    assert prepared.eightbit
    out = downgrade_to_7bit(prepared.data)
    assert body_of(out).isascii()
    assert leaves(out) == leaves(prepared.data)
    check_line_lengths(out)


# An 8-bit line whose quoted-printable form breaks exactly before "--BOUND": "=C3=A9" and
# 69 letters fill the 75 octets before a soft line break.
_FORGING_LINE = "é" + "a" * 69 + "--BOUND"


def _forging_message(text: str = _FORGING_LINE) -> bytes:
    return (
        "From: x@example.com\r\nTo: y@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="BOUND"\r\n\r\n'
        "--BOUND\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        f"{text}\r\nContent-Type: text/html\r\n\r\n<b>forged part</b>\r\n--BOUND--\r\n"
    ).encode()


def _parts(data: bytes) -> list[tuple[str, str]]:
    parsed = message_from_bytes(data, policy=policy.default)
    return [(p.get_content_type(), p.get_content()) for p in parsed.iter_parts()]  # type: ignore[attr-defined]


@pytest.mark.parametrize("padding", range(0, 80, 7))
def test_downgrade_never_breaks_a_line_into_a_delimiter(padding: int) -> None:
    """A soft line break may fall right before text that reads as an enclosing
    multipart's delimiter: the part must keep its text whole, and no part appear that
    the message did not have."""
    text = "é" + "a" * padding + "--BOUND" if padding else _FORGING_LINE
    original = _forging_message(text)
    assert [t for t, _ in _parts(original)] == ["text/plain"]
    downgraded = downgrade_to_7bit(original)
    assert downgraded.isascii()
    assert _parts(downgraded) == _parts(original)


_FORGED = b"\r\n--BOUND\r\nContent-Type: text/html\r\n\r\n<b>forged part</b>"


@pytest.mark.parametrize(
    ("cte", "body"),
    [
        ("quoted-printable", b"caf\xc3\xa9" + _FORGED.replace(b"\n--", b"\n=2D-")),
        ("base64", base64.b64encode(b"caf\xc3\xa9" + _FORGED) + b"\xc3\xa9"),
    ],
)
def test_downgrade_never_decodes_a_line_into_a_delimiter(cte: str, body: bytes) -> None:
    """A part labelled quoted-printable or base64 that holds raw 8-bit octets is decoded
    and encoded again: its text may then hold a line of an enclosing multipart's
    delimiter (encoded as ``=2D-BOUND``, or in base64), which must stay inside it."""
    original = (
        b"From: x@example.com\r\nTo: y@example.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="BOUND"\r\n\r\n'
        b"--BOUND\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n" + body + b"\r\n--BOUND--\r\n"
    )
    assert [t for t, _ in _parts(original)] == ["text/plain"]
    downgraded = downgrade_to_7bit(original)
    assert downgraded.isascii()
    assert _parts(downgraded) == _parts(original)


def test_a_long_header_line_names_its_field_not_the_body() -> None:
    data = b"From: a@example.com\r\nX-Long: " + b"x" * 1000 + b"\r\n\r\nbody\r\n"
    with pytest.raises(LineTooLong, match=r"header field b'X-Long' holds a word of 1000") as caught:
        check_line_lengths(data)
    assert "body" not in str(caught.value)
    folded = b"From: a@example.com\r\nX-Long: a\r\n " + b"x" * 1000 + b"\r\n\r\nbody\r\n"
    with pytest.raises(LineTooLong, match=r"line 3 .* header field b'X-Long'"):
        check_line_lengths(folded)
    with pytest.raises(LineTooLong, match="encode the body"):
        check_line_lengths(b"From: a@example.com\r\n\r\n" + b"x" * 1000 + b"\r\n")


def test_a_long_header_line_that_cannot_be_folded_says_so() -> None:
    """A Message-ID of 1,000 octets was met with "fold it", but folding breaks a line only
    before white space (RFC 5322 §2.2.3) and a msg-id holds none: no folding could make
    the line fit. Such a line names the word that is too long now; a line that folding
    can make fit is still told to be folded."""
    top = b"From: a@example.com\r\nTo: b@example.org\r\n"
    long_id = b"<" + b"x" * 1000 + b"@example.com>"
    with pytest.raises(LineTooLong) as caught:
        prepare(top + b"Message-ID: " + long_id + b"\r\n\r\nbody\r\n")
    assert str(caught.value) == (
        "line 3 is 1026 octets long; RFC 5322 §2.1.1 allows at most 998 (the header field "
        "b'Message-ID' holds a word of 1014 octets, and folding breaks a line only at white "
        "space; shorten it)"
    )
    with pytest.raises(LineTooLong, match="holds a word of 1014 octets"):
        prepare(Email(from_="a@example.com", to=["b@example.org"], message_id=long_id.decode()))
    words = b"Subject:" + b" word" * 250
    with pytest.raises(LineTooLong, match=r"in the header field b'Subject'; fold it"):
        check_line_lengths(top + words + b"\r\n\r\nbody\r\n")
    check_line_lengths(top + words.replace(b" word" * 125, b" word" * 125 + b"\r\n", 1))
    # A parameter can be split into sections (RFC 2231 §3), a long filename among them.
    disposition = b'Content-Disposition: attachment; filename="' + b"x" * 1000 + b'.pdf"'
    with pytest.raises(LineTooLong, match="shorten it, or split a long parameter into RFC 2231"):
        check_line_lengths(top + disposition + b"\r\n\r\nbody\r\n")


def test_a_long_line_in_a_part_header_section_names_its_field_not_the_body() -> None:
    """A 2,000-character Content-ID in a MIME part's header section was met with "encode
    the body as quoted-printable or base64", which cannot shorten a header line; a line
    of the part's body still gets that advice."""
    head = (
        b"From: a@example.com\r\nTo: b@example.org\r\n"
        b"Content-Type: multipart/related; boundary=B\r\n\r\npreamble\r\n--B\r\n"
        b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n"
    )
    long_id = b"Content-ID:\r\n <" + b"x" * 1000 + b"@example.com>\r\n"
    with pytest.raises(
        LineTooLong,
        match=r"line 12 .* header field b'Content-ID' of a MIME part holds a word of 1014 octets",
    ) as caught:
        prepare(head + long_id + b"\r\nAAAA\r\n--B--\r\n")
    assert "body" not in str(caught.value)
    with pytest.raises(LineTooLong, match="encode the body"):
        prepare(head + b"\r\n" + b"A" * 1000 + b"\r\n--B--\r\n")
    with pytest.raises(LineTooLong, match="encode the body"):  # a part with no header section
        prepare(
            head.replace(b"Content-Type: image", b"Content-Type image")
            + b"x" * 999
            + b"\r\n--B--\r\n"
        )


def _one_part(text: str) -> bytes:
    return (
        b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
        + text.encode()
        + b"\r\n--B--\r\n"
    )


def test_a_part_whose_first_line_is_no_field_has_no_header_section() -> None:
    """A part starting with text, not a field, has no header section (RFC 2046 §5.1.1);
    readers (the stdlib, Postfix) read all of it as body. Its first paragraph was taken
    for one when an empty line followed: the downgrade wrote its Content-Transfer-
    Encoding into the text ("Hello,\\r\\nContent-Transfer-Encoding: ...") and left that
    part raw, and a non-ASCII first paragraph made the message need SMTPUTF8."""
    data = _one_part("Hello,\r\n\r\nGrüße")
    out = downgrade_to_7bit(data)
    assert body_of(out).isascii()
    assert leaves(out) == leaves(data) == [("text/plain", "Hello,\r\n\r\nGrüße".encode())]
    prepared = prepare(_one_part("Hallo Jürgen,\r\n\r\nwie geht's?"))
    assert prepared.eightbit
    assert not prepared.smtputf8


def test_a_part_header_section_ends_at_a_line_that_is_no_field() -> None:
    """A line in a part's header section that is neither a field nor a continuation ends
    the section there for readers (the stdlib, Postfix): it and what follows are body.
    The part's header section ran on to the empty line instead, so the downgrade wrote
    its Content-Transfer-Encoding after that line, into what readers show as text, and a
    non-ASCII line there made the message need SMTPUTF8."""
    data = _one_part("Content-Type: text/plain\r\nHello,\r\n\r\nGrüße")
    out = downgrade_to_7bit(data)
    assert body_of(out).isascii()
    assert leaves(out) == leaves(data) == [("text/plain", "Hello,\r\n\r\nGrüße".encode())]
    prepared = prepare(_one_part("Content-Type: text/plain\r\nJürgen,\r\n\r\nwie geht's?"))
    assert prepared.eightbit
    assert not prepared.smtputf8


@pytest.mark.parametrize("indent", [" ", "\t"])
def test_a_part_starting_with_a_continuation_line_is_refused(indent: str) -> None:
    """A part whose first line is a continuation (it starts with white space) is a
    header line for the stdlib, which drops it and reads the fields below, but starts
    the body for Postfix and for this module: readers see different parts. It was
    accepted, and the downgrade then put the part's Content-Type into its text, so a
    receiver showed "Content-Type: text/html" above the markup. It is now refused, as a
    message starting with a continuation line is."""
    data = _one_part(f"{indent}x\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Grüße</p>")
    assert leaves(data) == [("text/html", "<p>Grüße</p>".encode())]  # the stdlib's reading
    with pytest.raises(InvalidMessage, match="continuation line") as caught:
        prepare(data)
    assert type(caught.value) is InvalidMessage
    nested = (
        b"From: a@example.com\r\nTo: b@example.org\r\nContent-Type: message/rfc822\r\n\r\n"
        + indent.encode()
        + b"x\r\nFrom: c@example.com\r\n\r\nhi\r\n"
    )
    with pytest.raises(InvalidMessage, match="continuation line"):
        prepare(nested)


@pytest.mark.parametrize("spacing", [" ", "\t", "  "])
def test_white_space_before_a_field_colon_is_not_sent(spacing: str) -> None:
    """``Subject : Hi`` is RFC 5322 §4.5 obsolete syntax, which §4 says must not be
    generated. This module and Postfix read it as a field, the stdlib as the end of the
    header section: such a raw message was sent as it came, and stdlib readers found no
    To, Date or Message-ID (all below it) but a body that started with them. The field
    is now sent without the white space. In a MIME part, whose header section is sent as
    it came, an HTML part was plain text showing its Content-Type: refused."""
    top = f"From: a@example.com\r\nSubject{spacing}: Hi\r\nTo: b@example.org\r\n\r\nhi\r\n"
    assert message_from_bytes(top.encode(), policy=policy.default)["To"] is None
    prepared = prepare(top.encode())
    assert prepared.subject == "Hi"
    sent = message_from_bytes(prepared.data, policy=policy.default)
    assert (sent["Subject"], sent["To"], sent.get_content()) == ("Hi", "b@example.org", "hi\r\n")
    assert sent["Message-ID"] == prepared.header_message_id
    part = _one_part(f"Content-Type{spacing}: text/html; charset=utf-8\r\n\r\n<p>Grüße</p>")
    assert leaves(part)[0][0] == "text/plain"  # the stdlib's reading
    with pytest.raises(InvalidHeaderValue, match="'Content-Type' and its colon") as caught:
        prepare(part)
    assert caught.value.header == "Content-Type"


@pytest.mark.parametrize("last", [True, False])
def test_a_from_line_below_the_first_header_line_is_refused(last: bool) -> None:
    """A line starting with ``From `` counts as a header line here wherever it is, as an
    mbox line starting an attached message does; the stdlib takes one only as the first
    line: below it, one is dropped, and the last header line becomes the first body line.
    The downgrade then wrote Content-Transfer-Encoding below it, and stdlib readers lost
    "From the desk of Jo" from the text. Such a part is now refused."""
    fields = ["Content-Type: text/plain; charset=utf-8", "From the desk of Jo"]
    if not last:
        fields.append("Content-Transfer-Encoding: 8bit")
    data = _one_part("\r\n".join(fields) + "\r\n\r\nGrüße")
    if last:
        assert leaves(data) == [("text/plain", "From the desk of Jo\r\nGrüße".encode())]
    with pytest.raises(InvalidMessage, match="'From ' after its first line") as caught:
        prepare(data)
    assert type(caught.value) is InvalidMessage


def test_a_delimiter_line_right_after_another_is_kept_as_it_was() -> None:
    """Two delimiter lines in a row hold no part between them (RFC 2046 §5.1.1 wants a
    CRLF of the part's own before the second). The downgrade wrote the CRLF that ends the
    first one twice, so readers (the stdlib) found an empty part that was not there."""
    data = (
        b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n--B\r\n'
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "Grüße".encode()
        + b"\r\n--B--\r\n"
    )
    out = downgrade_to_7bit(data)
    assert body_of(out).isascii()
    assert b"--B\r\n--B\r\n" in out
    assert leaves(out) == leaves(data) == [("text/plain", "Grüße".encode())]


def test_an_attached_message_saved_from_a_mailbox_keeps_its_header_section() -> None:
    """An mbox ``From`` line (``From sender date``) starting an attached message is part of
    its header section for readers (the stdlib); read as a line that is no field, it made
    the whole message body, which the downgrade then quoted-printable encoded."""
    data = (
        b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: message/rfc822\r\n\r\n"
        b"From a@example.com Mon Jan  1 00:00:00 2024\r\nFrom: a@example.com\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "Grüße".encode()
        + b"\r\n"
    )
    out = downgrade_to_7bit(data)
    assert body_of(out).isascii()
    assert leaves(out) == leaves(data) == [("text/plain", "Grüße\r\n".encode())]


def test_finding_long_lines_costs_one_pass() -> None:
    """encode_long_lines() (sendmail input, an attached message/rfc822) looked for a line
    over 998 octets with an unanchored pattern, tried at every octet and run to the
    line's end each time: 20 MB of lines just within the limit took 40 s. It is now
    tried at line starts only; the guard is far above the time that takes."""
    lines = (b"x" * 998 + b"\r\n") * 20_000
    data = b"From: a@example.com\r\nSubject: s\r\n\r\n" + lines
    with hang_guard(10):
        assert encode_long_lines(data) is data
        longer = encode_long_lines(data + b"y" * 999 + b"\r\n")
    assert longer != data and max(map(len, longer.split(b"\r\n"))) <= 998


def test_a_long_line_in_a_preamble_or_epilogue_is_not_told_to_be_encoded() -> None:
    """A raw multipart whose preamble or epilogue has a line over 998 octets was refused
    with "encode the body as quoted-printable or base64", which a preamble cannot be (it
    belongs to no part, and carries no encoding). The advice names it now; a line of a
    part's body still gets the advice to encode it."""
    top = (
        b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
    )
    long = b"x" * 1000
    part = b"--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n--B--\r\n"
    for data, where in (
        (top + long + b"\r\n" + part, "preamble"),
        (top + part + b"\r\n" + long + b"\r\n", "epilogue"),
        (top + part + long, "epilogue"),
    ):
        with pytest.raises(LineTooLong) as caught:
            prepare(data)
        assert f"in the {where} of a multipart" in str(caught.value)
        assert "encode" not in str(caught.value)
    inner = top.replace(b"=B", b"=C") + long + b"\r\n--C\r\n\r\nx\r\n--C--\r\n"
    nested = top + b"--B\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--B--\r\n"
    with pytest.raises(LineTooLong, match="in the preamble of a multipart"):
        prepare(nested)
    with pytest.raises(LineTooLong, match="encode the body"):
        prepare(top + part.replace(b"hi", long))

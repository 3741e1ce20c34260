"""Regression tests for the security review of the message layer, one group per finding.

Each test names its finding in the docstring ("Hardening #N: ..."); each failed before the
fix it covers.
"""

from __future__ import annotations

import base64
import quopri
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.header import Header
from email.message import EmailMessage, Message
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesParser
from typing import Any

import pytest
from tests.support.deadline import hang_guard

from mailstrom import Config
from mailstrom.client.common import prepare_for
from mailstrom.errors import (
    ConfigError,
    ForbiddenCharacter,
    HeaderInjection,
    HeaderTooLong,
    InvalidAddress,
    InvalidAttachment,
    InvalidHeaderValue,
    InvalidMessage,
    LineTooLong,
    NestingTooDeep,
    TooManyHeaderFields,
    TooManyParts,
    TooManyRecipients,
)
from mailstrom.message import Attachment, Email, downgrade_to_7bit, preparation, prepare

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
BASE: dict[str, Any] = {"from_": "App <app@example.com>", "to": "bob@example.org"}


def email(**parts: Any) -> Email:
    return Email(**{**BASE, **parts})


def parsed(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def raw(*lines: str, body: bytes = b"body\r\n") -> bytes:
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def body_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[2]


# --- #2 NUL and other control characters -----------------------------------------------

CONTROLS = ["\0", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x1c", "\x1f", "\x7f", "\x85"]
SEPARATORS = ["\u2028", "\u2029"]


@pytest.mark.parametrize("char", CONTROLS + SEPARATORS)
@pytest.mark.parametrize(
    "build",
    [
        lambda c: email(subject=f"invoice{c}paid"),
        lambda c: email(headers={"X-Tag": f"a{c}b"}),
        lambda c: email(from_=f'"App{c}Name" <app@example.com>'),
        lambda c: email(to=f"Bob{c}By <bob@example.org>"),
        lambda c: email(attachments=[Attachment(filename=f"invoice.exe{c}.pdf", content=b"x")]),
        lambda c: email(
            attachments=[Attachment(filename="a.png", content=b"x", content_id=f"a{c}b@x")]
        ),
        lambda c: email(message_id=f"a{c}b@example.com"),
    ],
    ids=["subject", "header", "from name", "to name", "filename", "content-id", "message-id"],
)
def test_control_characters_in_builder_header_values(
    build: Callable[[str], Email], char: str
) -> None:
    """Hardening #2: NUL, C0 controls but TAB, DEL, NEL and U+2028/9 in any header value
    of an Email are refused (Postfix cuts a header line at NUL)."""
    with pytest.raises(ForbiddenCharacter):
        prepare(build(char), now=NOW)


def test_nul_in_attachment_filename_is_rejected() -> None:
    """Hardening #2: NUL in an attachment filename is rejected (it would arrive at a
    Postfix-fronted mailbox as "invoice.exe")."""
    attachment = Attachment(filename="invoice.exe\0.pdf", content=b"MZ")
    with pytest.raises(ForbiddenCharacter) as caught:
        prepare(email(attachments=[attachment]), now=NOW)
    assert "NUL" in caught.value.reason


def test_tab_is_still_allowed_in_header_values() -> None:
    """Hardening #2: TAB is the one control character header values keep."""
    message = parsed(prepare(email(subject="a\tb", headers={"X-T": "c\td"}), now=NOW).data)
    assert message["Subject"] == "a\tb"
    assert message["X-T"] == "c\td"


@pytest.mark.parametrize(
    "line",
    [
        b"Subject: a\x00b",
        b"Subject: a\x0bb",
        b"Subject: a\x1fb",
        b"Subject: a\x7fb",
        b"X-Folded: a\r\n \x00b",
        "Subject: a\u0085b".encode(),
        "Subject: a\u2028b".encode(),
        b'To: "x\x00y" <bob@example.org>',
    ],
)
def test_control_characters_in_raw_headers(line: bytes) -> None:
    """Hardening #2: control characters in raw header lines are refused."""
    data = b"From: a@example.com\r\nTo: b@example.org\r\n" + line + b"\r\n\r\nx\r\n"
    with pytest.raises(ForbiddenCharacter):
        prepare(data, now=NOW)


def test_nul_in_raw_body_is_rejected() -> None:
    """Hardening #2: a NUL octet in a raw 7bit/8bit body is refused (RFC 2045 §2.7/2.8)."""
    with pytest.raises(ForbiddenCharacter, match="NUL"):
        prepare(raw("From: a@example.com", "To: b@example.org", body=b"a\0b\r\n"), now=NOW)


def test_nul_in_email_message_header_is_rejected() -> None:
    """Hardening #2: an EmailMessage header value holding NUL is refused."""
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message["Subject"] = "a\0b"
    message.set_content("x")
    with pytest.raises(ForbiddenCharacter):
        prepare(message, now=NOW)


_NON_ASCII_FILLS: dict[str, Callable[[EmailMessage, str], None]] = {
    "subject": lambda m, c: m.__setitem__("Subject", f"Größe{c}"),
    "header": lambda m, c: m.__setitem__("X-Note", f"naïve {c}"),
    "to name": lambda m, c: m.replace_header("To", f"Jörg{c} <b@example.org>"),
    "filename": lambda m, c: m.add_attachment(b"x", "application", "pdf", filename=f"R{c}ü"),
}


@pytest.mark.parametrize("char", ["\0", "\x1b", "\x7f", "\x9b"])
@pytest.mark.parametrize("where", list(_NON_ASCII_FILLS))
def test_control_characters_in_non_ascii_email_message_headers(where: str, char: str) -> None:
    """A header object holding a control character and a non-ASCII one was written by the
    stdlib as an RFC 2047 word or RFC 2231 parameter (``=?utf-8?q?Gr=C3=B6=C3=9Fe=00?=``)
    and sent: only the same value without its non-ASCII character was refused, as the
    Email builder refuses both, so a reader decoded a NUL or an ESC sequence into a
    Subject, a name or a filename."""
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message.set_content("x")
    _NON_ASCII_FILLS[where](message, char)
    with pytest.raises(ForbiddenCharacter):
        prepare(message, now=NOW)


def test_nul_in_builder_text_is_encoded_not_sent_raw() -> None:
    """Hardening #2: a NUL in a text body switches the part to an encoding that carries it
    (never 7bit), and it decodes back unchanged."""
    prepared = prepare(email(text="a\0b\n"), now=NOW)
    assert b"\0" not in prepared.data
    message = parsed(prepared.data)
    assert message["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert message.get_content() == "a\0b\r\n"


# --- #5 one address blocks its whole domain ----------------------------------------------


@pytest.mark.parametrize("address", ['"x>y"@example.org', '"x<y"@example.org', '"<>"@example.org'])
@pytest.mark.parametrize("role", ["to", "cc", "bcc", "from_", "envelope_to", "envelope_from"])
def test_addresses_the_smtp_path_cannot_carry(address: str, role: str) -> None:
    """Hardening #5: an address SMTP's path encoder refuses ('<' or '>' in a quoted local
    part) is refused at submission, for the envelope sender and every recipient."""
    kwargs: dict[str, Any] = {}
    if role == "envelope_to":
        kwargs["envelope_to"] = [address]
        message = email()
    elif role == "envelope_from":
        kwargs["envelope_from"] = address
        message = email()
    else:
        message = email(**{role: [address]})
    with pytest.raises(InvalidAddress):
        prepare(message, now=NOW, **kwargs)


def test_angle_bracket_local_part_in_raw_header() -> None:
    """Hardening #5: the same in a raw header."""
    with pytest.raises(InvalidAddress):
        prepare(raw("From: a@example.com", 'To: "x>y"@example.org'), now=NOW)


# --- #8 header size and recipient count bounds, linear cost ------------------------------


def test_subject_over_64_kib_is_a_typed_error() -> None:
    """Hardening #8: a header field over 64 KiB raises HeaderTooLong (Postfix would cut it)."""
    with pytest.raises(HeaderTooLong) as caught:
        prepare(email(subject="x " * 40_000), now=NOW)
    assert caught.value.limit == 64 * 1024
    assert caught.value.header == "Subject"


def test_encoded_subject_is_measured_as_written() -> None:
    """Hardening #8: the limit applies to the field as sent, encoding included."""
    prepare(email(subject="ü " * 10_000), now=NOW)  # 30 KB of UTF-8, about 50 KB encoded
    with pytest.raises(HeaderTooLong):
        prepare(email(subject="ü" * 30_000), now=NOW)  # 60 KB of UTF-8, about 84 KB encoded


@pytest.mark.parametrize(
    "build",
    [
        lambda: email(headers={"X-Big": "y" * 70_000}),
        lambda: email(to=[f"user{i}@example.org" for i in range(4000)]),
        lambda: email(to=", ".join(f"user{i}@example.org" for i in range(4000))),
        lambda: email(attachments=[Attachment(filename="n" * 70_000, content=b"x")]),
    ],
    ids=["custom header", "to list", "to string", "filename"],
)
def test_other_builder_fields_over_64_kib(build: Callable[[], Email]) -> None:
    """Hardening #8: every header field is bounded, address lists and filenames included
    (4,000 recipients: within max_recipients, which would refuse them first)."""
    with pytest.raises(HeaderTooLong):
        prepare(build(), max_recipients=10_000, now=NOW)


def test_raw_header_field_over_64_kib() -> None:
    """Hardening #8: a raw (folded) header field over 64 KiB raises HeaderTooLong."""
    folded = "\r\n ".join(["x" * 70] * 1000)
    with pytest.raises(HeaderTooLong):
        prepare(raw("From: a@example.com", "To: b@example.org", f"X-Big: {folded}"), now=NOW)


def test_email_message_header_over_64_kib() -> None:
    """Hardening #8: the bound holds for EmailMessage input before the stdlib folds it."""
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message["Subject"] = "word " * 20_000
    with pytest.raises(HeaderTooLong):
        prepare(message, now=NOW)


def test_recipients_are_bounded_by_max_recipients() -> None:
    """Hardening #8: more recipients than max_recipients (default 1000) is a typed error."""
    many = [f"user{i}@example.org" for i in range(1001)]
    with pytest.raises(TooManyRecipients) as caught:
        prepare(email(to=many[:500], bcc=many[500:]), now=NOW)
    assert (caught.value.count, caught.value.limit) == (1001, 1000)
    assert len(prepare(email(to=many[:1000]), now=NOW).recipients) == 1000
    with pytest.raises(TooManyRecipients):
        prepare(email(to=many[:3]), max_recipients=2, now=NOW)
    with pytest.raises(TooManyRecipients):
        prepare(email(), envelope_to=many[:3], max_recipients=2, now=NOW)
    # Duplicates are one recipient.
    assert prepare(email(to=["a@example.org"] * 3), max_recipients=1, now=NOW).recipients


def test_config_max_recipients_reaches_prepare() -> None:
    """Hardening #8: Config.max_recipients (validated, default 1000) is what prepare_for uses."""
    assert Config(helo_name="mail.example.com").max_recipients == 1000
    with pytest.raises(ConfigError):
        Config(helo_name="mail.example.com", max_recipients=0)
    config = Config(helo_name="mail.example.com", max_recipients=2)
    message = email(to=["a@example.org", "b@example.org", "c@example.org"])
    with pytest.raises(TooManyRecipients):
        prepare_for(config, message, envelope_from=None, envelope_to=None, now=NOW)


@contextmanager
def forbidden(*targets: tuple[Any, str]) -> Iterator[None]:
    """Make the given (owner, attribute) callables raise if anything calls them."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the quadratic stdlib header code was called")

    try:
        for owner, name, _ in saved:
            setattr(owner, name, refuse)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def test_builder_path_never_uses_the_quadratic_stdlib_header_code() -> None:
    """Hardening #8: building a message with a long subject and a long To list never goes
    through the stdlib's header parser or folder, whose cost grows with the square of the
    length (250 KB subject: 2.2 s; 20,000 addresses: 7.6 s)."""
    import email._header_value_parser as parser
    import email.headerregistry as registry

    big = email(
        subject="Grüße, Welt " * 1500,
        to=", ".join(f"Jürgen Müller {i} <user{i}@example.org>" for i in range(900)),
        headers={"X-Long": "wörd " * 3000},
    )
    with forbidden(
        (parser, "get_address_list"),
        (parser, "get_unstructured"),
        (parser, "_refold_parse_tree"),
        (registry.HeaderRegistry, "__call__"),
    ):
        prepared = prepare(big, now=NOW)
    assert len(prepared.recipients) == 900


def calls_made(function: Callable[[], object]) -> int:
    """How many Python-level function calls running ``function`` makes."""
    count = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        function()
    finally:
        sys.setprofile(None)
    return count


@pytest.mark.parametrize(
    "build",
    [
        lambda n: email(subject="Grüße Welt " * n),
        lambda n: email(to=", ".join(f"Zoë {i} <u{i}@example.org>" for i in range(n))),
        lambda n: email(to=[f"u{i}@d{i}.example.org" for i in range(n)]),
        lambda n: raw(
            "From: a@example.com", "To: " + ",\r\n ".join(f"u{i}@example.org" for i in range(n))
        ),
    ],
    ids=["subject", "to string", "to list", "raw to"],
)
def test_cost_grows_linearly_with_header_size(build: Callable[[int], Any]) -> None:
    """Hardening #8: doubling a header's size at most doubles the work (counted as function
    calls, so the test does not depend on the machine's speed). The old path's quadratic
    cost was in C-level slicing inside the stdlib, which calls do not show: the test above
    is the one that failed before; this one keeps our own code linear."""
    small, large = build(200), build(400)
    prepare(small, now=NOW)  # warm caches that would otherwise count for the first run only
    prepare(large, now=NOW)
    ratio = calls_made(lambda: prepare(large, now=NOW)) / calls_made(
        lambda: prepare(small, now=NOW)
    )
    assert ratio < 2.3


# --- #9 message/* attachments -------------------------------------------------------------

INNER = b"From: x@example.net\nSubject: inner\n\n" + b"The quick brown fox.\n" * 60


def test_message_rfc822_attachment_is_7bit_with_crlf() -> None:
    """Hardening #9: a message/rfc822 attachment is not base64-encoded (RFC 2046 §5.2.1),
    has CRLF line ends (no bare LF on the wire) and no longer fails over ~750 octets."""
    attachment = Attachment(filename="fwd.eml", content=INNER, content_type="message/rfc822")
    prepared = prepare(email(text="see attached", attachments=[attachment]), now=NOW)
    assert b"\n" not in prepared.data.replace(b"\r\n", b"")
    part = next(p for p in parsed(prepared.data).walk() if p.get_content_type() == "message/rfc822")
    assert part["Content-Transfer-Encoding"] == "7bit"
    inner = part.get_payload()[0]
    assert inner["Subject"] == "inner"
    assert inner.get_payload().count("The quick brown fox.") == 60


def test_message_rfc822_attachment_with_8bit_body_is_downgraded_inside() -> None:
    """Hardening #9: an attached message's 8-bit body is re-encoded inside it, so the
    built message stays 7-bit and never needs 8BITMIME."""
    inner = b"Subject: x\nContent-Type: text/plain; charset=utf-8\n\nGr\xc3\xbc\xc3\x9fe\n"
    attachment = Attachment(filename="m.eml", content=inner, content_type="message/rfc822")
    prepared = prepare(email(attachments=[attachment]), now=NOW)
    assert prepared.data.isascii() and not prepared.eightbit
    part = next(p for p in parsed(prepared.data).walk() if p.get_content_type() == "message/rfc822")
    assert part.get_payload()[0].get_content() == "Grüße\r\n"


def test_message_rfc822_with_utf8_headers_points_to_message_global() -> None:
    """Hardening #9: an attached message with UTF-8 headers cannot be encoded as
    message/rfc822; it is refused with a pointer to message/global, which is base64."""
    inner = "Subject: Grüße\n\nx\n".encode()
    bad = Attachment(filename="m.eml", content=inner, content_type="message/rfc822")
    with pytest.raises(InvalidAttachment, match="message/global"):
        prepare(email(attachments=[bad]), now=NOW)
    good = Attachment(filename="m.eml", content=inner, content_type="message/global")
    part = next(iter(parsed(prepare(email(attachments=[good]), now=NOW).data).iter_attachments()))
    assert part["Content-Transfer-Encoding"] == "base64"


def test_message_rfc822_attachment_with_long_lines_is_encoded_inside() -> None:
    """A forwarded message saved as it arrived may have an HTML body on one line over 998
    octets, or a long Subject unfolded: attached as message/rfc822 it was refused with
    LineTooLong, telling the application to encode a body it did not write. The long
    body is encoded and the long header line folded inside the attached message, as
    ``mailstrom sendmail`` does for a message of its own; the content reads the same."""
    html = "<p>" + "x" * 1500 + "</p>\n"
    subject = "word " * 299 + "end"
    inner = f"From: c@example.net\nSubject: {subject}\nContent-Type: text/html\n\n{html}"
    attachment = Attachment(
        filename="fwd.eml", content=inner.encode(), content_type="message/rfc822"
    )
    prepared = prepare(email(text="see attached", attachments=[attachment]), now=NOW)
    assert max(map(len, prepared.data.split(b"\r\n"))) <= 998
    part = next(p for p in parsed(prepared.data).walk() if p.get_content_type() == "message/rfc822")
    assert part["Content-Transfer-Encoding"] == "7bit"
    forwarded = part.get_payload()[0]
    assert forwarded["Subject"] == subject
    assert forwarded.get_content() == html.replace("\n", "\r\n")


def test_an_attached_message_with_unwrapped_base64_is_wrapped_inside() -> None:
    """A message whose attachment is base64 on one line (PHP's base64_encode() without
    chunk_split(), which Postfix passes on), forwarded as message/rfc822, was refused
    with LineTooLong telling the application to "encode the body as quoted-printable or
    base64": it was base64, and a message/rfc822 may not be encoded (RFC 2046 §5.2.1).
    Its lines are now 76 characters (RFC 2045 §6.8); decoders ignore line breaks, so the
    attachment decodes to the same octets."""
    pdf = bytes(range(256)) * 8
    inner = (
        b"From: c@example.net\nSubject: report\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="b1"\n\n--b1\n'
        b"Content-Type: text/plain\n\nSee the file.\n--b1\n"
        b"Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
        + base64.b64encode(pdf)
        + b"\n--b1--\n"
    )
    attachment = Attachment(filename="fwd.eml", content=inner, content_type="message/rfc822")
    prepared = prepare(email(text="see attached", attachments=[attachment]), now=NOW)
    assert max(map(len, prepared.data.split(b"\r\n"))) <= 76
    part = next(p for p in parsed(prepared.data).walk() if p.get_content_type() == "message/rfc822")
    assert part["Content-Transfer-Encoding"] == "7bit"
    forwarded = part.get_payload()[0]
    assert forwarded["Subject"] == "report"
    file = next(p for p in forwarded.walk() if p.get_content_type() == "application/pdf")
    assert file.get_payload(decode=True) == pdf
    assert not file.defects
    # A "-" is no base64: wrapped, "--b1--" could start a line and close the multipart.
    broken = inner.replace(b"\n--b1--", b"x" * 1000 + b"--b1--\n--b1--")
    attachment = Attachment(filename="fwd.eml", content=broken, content_type="message/rfc822")
    with pytest.raises(LineTooLong):
        prepare(email(text="see attached", attachments=[attachment]), now=NOW)


def test_an_attached_message_with_unwrapped_quoted_printable_is_wrapped_inside() -> None:
    """A forwarded message whose HTML is quoted-printable without soft line breaks (a
    2,000-octet line, "=3D" and "=C3=A9" escapes in it) was refused with LineTooLong
    telling the application to "encode the body as quoted-printable or base64", which
    it was; an attached message/rfc822 may not be encoded itself (RFC 2046 §5.2.1). Its
    lines now end by 76 characters with soft line breaks (RFC 2045 §6.7), never inside
    an escape nor before a "--", so it decodes to the same text."""
    html = '<p class="x">' + "Grüße -- " * 200 + "</p>"
    body = quopri.encodestring(html.encode()).replace(b"=\n", b"")
    assert max(map(len, body.split(b"\n"))) > 998
    inner = (
        b"From: c@example.net\nSubject: fwd\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/alternative; boundary="b1"\n\n--b1\n'
        b"Content-Type: text/html; charset=utf-8\n"
        b"Content-Transfer-Encoding: quoted-printable\n\n" + body + b"\n--b1--\n"
    )
    attachment = Attachment(filename="fwd.eml", content=inner, content_type="message/rfc822")
    prepared = prepare(email(text="see attached", attachments=[attachment]), now=NOW)
    assert max(map(len, prepared.data.split(b"\r\n"))) <= 76
    part = next(p for p in parsed(prepared.data).walk() if p.get_content_type() == "message/rfc822")
    forwarded = part.get_payload()[0]
    [html_part] = forwarded.get_payload()
    assert html_part.get_content() == html


def test_an_attached_message_with_a_long_preamble_or_epilogue_line_is_sent() -> None:
    """A forwarded multipart message whose preamble (or epilogue) has a line over 998
    octets ("This is a multi-part message in MIME format." followed by a long note) was
    refused with LineTooLong telling the application to "encode the body as
    quoted-printable or base64", which a message/rfc822 may not be (RFC 2046 §5.2.1), and
    a preamble cannot be. Readers ignore the preamble and epilogue (RFC 2046 §5.1.1): the
    line is broken into lines of at most 998 octets, each after the first starting with a
    space (so none is a delimiter), and the parts read the same."""
    note = b"This is a multi-part message in MIME format. " + b"x-" * 600
    for preamble, epilogue in ((note, b""), (b"", note + b"\n" + b"-" * 1200 + b"y")):
        inner = (
            b"From: c@example.net\nSubject: report\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="b1"\n\n'
            + preamble
            + b"\n--b1\nContent-Type: text/plain\n\nSee the file.\n--b1--\n"
            + epilogue
        )
        attachment = Attachment(filename="fwd.eml", content=inner, content_type="message/rfc822")
        prepared = prepare(email(text="see attached", attachments=[attachment]), now=NOW)
        lines = prepared.data.split(b"\r\n")
        assert max(map(len, lines)) <= 998
        # The text is all there, in lines that continue with a space, as Postfix breaks
        # them (smtp_line_length_limit): such a line is no delimiter.
        assert (preamble + epilogue).replace(b"\n", b"\r\n") in prepared.data.replace(b"\r\n ", b"")
        part = next(
            p for p in parsed(prepared.data).walk() if p.get_content_type() == "message/rfc822"
        )
        forwarded = part.get_payload()[0]
        assert [p.get_content_type() for p in forwarded.walk()] == [
            "multipart/mixed",
            "text/plain",
        ]
        assert forwarded.get_payload()[0].get_content() == "See the file."
        assert not forwarded.defects


# --- #10 the 7-bit downgrade --------------------------------------------------------------


def mislabelled(cte: str, payload: bytes, content_type: str = "text/plain") -> bytes:
    return (
        b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
        + f"Content-Type: {content_type}; charset=utf-8\r\n".encode()
        + f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode()
        + payload
        + b"\r\n--B--\r\n"
    )


def test_downgrade_reencodes_quoted_printable_holding_8bit_octets() -> None:
    """Hardening #10: a part labelled quoted-printable but holding raw 8-bit octets is
    re-encoded; its content is what a lenient reader decodes (RFC 2045 §6.7)."""
    prepared = prepare(mislabelled("quoted-printable", b"caf\xc3\xa9 =3D ok"), now=NOW)
    assert prepared.eightbit
    out = downgrade_to_7bit(prepared.data)
    assert out.isascii()
    part = next(parsed(out).iter_parts())
    assert part.get_content() == "café = ok"


def test_downgrade_reencodes_base64_holding_8bit_octets() -> None:
    """Hardening #10: a part labelled base64 but holding 8-bit octets is re-encoded; the
    octets outside the base64 alphabet are ignored, as RFC 2045 §6.8 says."""
    prepared = prepare(
        mislabelled("base64", b"YWJj\xff\xfeZGVm", "application/octet-stream"), now=NOW
    )
    out = downgrade_to_7bit(prepared.data)
    assert out.isascii()
    assert next(parsed(out).iter_parts()).get_payload(decode=True) == b"abcdef"


def nested(levels: int, *, kind: str = "multipart") -> bytes:
    entity = b"Content-Type: text/plain; charset=utf-8\r\n\r\ncaf\xc3\xa9\r\n"
    for level in range(levels):
        if kind == "multipart":
            boundary = f"b{level}".encode()
            entity = (
                b'Content-Type: multipart/mixed; boundary="'
                + boundary
                + b'"\r\n\r\n--'
                + boundary
                + b"\r\n"
                + entity
                + b"\r\n--"
                + boundary
                + b"--\r\n"
            )
        else:
            entity = b"Content-Type: message/rfc822\r\n\r\n" + entity
    return b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n" + entity


@pytest.mark.parametrize("kind", ["multipart", "message"])
def test_deep_nesting_is_refused_at_submission(kind: str) -> None:
    """Hardening #10: MIME nesting deeper than 100 levels (Postfix's mime_nesting_limit)
    is refused with NestingTooDeep; 100 levels are accepted and downgrade cleanly."""
    with pytest.raises(NestingTooDeep):
        prepare(nested(300, kind=kind), now=NOW)
    with pytest.raises(NestingTooDeep):
        prepare(nested(101, kind=kind), now=NOW)
    prepared = prepare(nested(100, kind=kind), now=NOW)
    assert body_of(downgrade_to_7bit(prepared.data)).isascii()


def test_downgrade_never_raises_even_on_what_prepare_refuses() -> None:
    """Hardening #10: downgrade_to_7bit does not recurse without bound (it raised
    RecursionError at 300 levels)."""
    assert body_of(downgrade_to_7bit(nested(300))).isascii()
    assert body_of(downgrade_to_7bit(nested(300, kind="message"))).isascii()


@pytest.mark.parametrize(
    "data",
    [
        # A message/rfc822 part whose own headers are 8-bit.
        b"From: a@example.com\r\nTo: b@example.org\r\nContent-Type: multipart/mixed; "
        b"boundary=B\r\n\r\n--B\r\nContent-Type: message/rfc822\r\n\r\nSubject: caf\xc3\xa9"
        b"\r\n\r\nbody \xff\r\n--B--\r\n",
        # A digest whose implicit message/rfc822 parts have 8-bit headers.
        b"From: a@example.com\r\nTo: b@example.org\r\nContent-Type: multipart/digest; "
        b"boundary=B\r\n\r\n--B\r\n\r\nSubject: \xc3\xa9\r\n\r\n\xc3\xa9\r\n--B--\r\n",
        # A part header with 8-bit octets in a parameter.
        b"From: a@example.com\r\nTo: b@example.org\r\nContent-Type: multipart/mixed; "
        b'boundary=B\r\n\r\n--B\r\nContent-Type: text/plain; name="\xc3\xa9"\r\n'
        b"Content-Transfer-Encoding: 8bit\r\n\r\n\xc3\xa9\r\n--B--\r\n",
        # A non-ASCII boundary (RFC 2046 bchars are ASCII).
        b"From: a@example.com\r\nTo: b@example.org\r\nContent-Type: multipart/mixed; "
        b'boundary="\xc3\xa9"\r\n\r\n--\xc3\xa9\r\n\r\n\xff\r\n--\xc3\xa9--\r\n',
    ],
    ids=["rfc822 8bit headers", "digest", "part header", "boundary"],
)
def test_malformed_nesting_downgrades_to_7bit(data: bytes) -> None:
    """Hardening #10: 8-bit octets in nested headers or delimiters no longer survive the
    downgrade (they were sent raw to servers without 8BITMIME); such messages are also
    marked as needing SMTPUTF8 when 8-bit part headers are what RFC 6532 allows."""
    prepared = prepare(data, now=NOW)
    out = downgrade_to_7bit(prepared.data)
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    if b'name="\xc3\xa9"' in data:
        # 8-bit part headers are RFC 6532 headers: only an SMTPUTF8 server may get them,
        # and such a server takes 8BITMIME (RFC 6531 §3.1), so no downgrade happens.
        assert prepared.smtputf8
        assert body_of(out).count(b"\xc3\xa9") == 1  # the header; the body is encoded
    else:
        assert body_of(out).isascii()


# --- #11 invalid addresses rewritten ------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["c@exa\x0bmple.org", "a@good.test\u2028.evil.test", "c@exa\x0cmple.org", "c\x85d@x.org"],
)
def test_addresses_with_line_breaking_characters_are_refused(address: str) -> None:
    """Hardening #11: characters the stdlib treats as line breaks made c@exa\\x0bmple.org
    into c@example.org; such an address is refused, never rewritten."""
    with pytest.raises(InvalidMessage):
        prepare(email(to=[address]), now=NOW)
    with pytest.raises(InvalidMessage):
        prepare(email(), envelope_to=[address], now=NOW)


@pytest.mark.parametrize(
    "value",
    [
        "=?utf-8?q?a?=b@evil.test",
        '"X Y" <=?utf-8?q?a?=b@evil.test>',
        "<=?utf-8?q?a?=@evil.test>",
        '"=?utf-8?q?a?="@evil.test',
    ],
)
def test_encoded_word_in_addr_spec_is_refused(value: str) -> None:
    """Hardening #11: an RFC 2047 word inside an addr-spec (forbidden by RFC 2047 §5) is
    refused, in a raw header and from a parsed EmailMessage, instead of being decoded
    into an envelope address that differs from what the header shows."""
    data = raw("From: a@example.com", f"To: {value}")
    with pytest.raises(InvalidAddress, match="encoded word"):
        prepare(data, now=NOW)
    with pytest.raises(InvalidAddress, match="encoded word"):
        prepare(message_from_bytes(data, policy=policy.default), now=NOW)
    with pytest.raises(InvalidAddress, match="encoded word"):
        prepare(email(to=[value]), now=NOW)


def test_encoded_display_name_is_still_fine() -> None:
    """Hardening #11: encoded words keep working where they belong, in display names."""
    prepared = prepare(raw("From: a@example.com", "To: =?utf-8?q?J=C3=B6?= <j@example.org>"))
    assert prepared.recipients == ("j@example.org",)


# --- #12 untyped errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: email(subject="a\ud800b"),
        lambda: email(text="a\udfffb"),
        lambda: email(html="<p>\ud83d</p>"),
        lambda: email(to="B\ud800b <bob@example.org>"),
        lambda: email(attachments=[Attachment(filename="a\ud800.txt", content=b"x")]),
        lambda: email(headers={"X-A": "\udc80"}),
    ],
)
def test_lone_surrogates_are_typed(build: Callable[[], Email]) -> None:
    """Hardening #12: lone surrogates raised UnicodeEncodeError; now ForbiddenCharacter."""
    with pytest.raises(ForbiddenCharacter, match="surrogate"):
        prepare(build(), now=NOW)


def test_delivery_status_attachment_is_sent_7bit() -> None:
    """Hardening #12: a message/delivery-status attachment raised AttributeError; it is
    now sent 7bit, and one with 8-bit content is a typed error."""
    status = b"Reporting-MTA: dns; mx.example.org\n\nFinal-Recipient: rfc822; b@example.org\n"
    attachment = Attachment(filename="s", content=status, content_type="message/delivery-status")
    prepared = prepare(email(attachments=[attachment]), now=NOW)
    assert b"Reporting-MTA: dns; mx.example.org\r\n" in prepared.data
    bad = Attachment(filename="s", content="Ä".encode(), content_type="message/delivery-status")
    with pytest.raises(InvalidAttachment):
        prepare(email(attachments=[bad]), now=NOW)


@pytest.mark.parametrize(
    "content_type", ["message/delivery-status", "message/disposition-notification"]
)
def test_a_status_attachment_with_a_long_field_is_folded(content_type: str) -> None:
    """A bounce built as an Email with a message/delivery-status part quoting the remote
    server's reply (a Diagnostic-Code of 1,500 octets: Gmail's and Microsoft's replies run
    long) was refused with LineTooLong, telling to encode a part that must be 7bit text
    (RFC 3464 §2: its fields are header fields). Such a line is now folded at white space,
    as a header line is (RFC 5322 §2.2.3); unfolded, the field reads the same."""
    reply = "smtp; 550-5.7.1 " + " ".join(f"word{i}" for i in range(250))
    status = (
        "Reporting-MTA: dns; mx.example.org\n\nFinal-Recipient: rfc822; b@example.org\n"
        f"Action: failed\nStatus: 5.7.1\nDiagnostic-Code: {reply}\n"
    ).encode()
    assert len(reply) > 998
    attachment = Attachment(filename="s", content=status, content_type=content_type)
    prepared = prepare(email(text="undeliverable", attachments=[attachment]), now=NOW)
    assert max(map(len, prepared.data.split(b"\r\n"))) <= 998
    body = prepared.data.partition(b"Reporting-MTA:")[2]
    unfolded = (b"Reporting-MTA:" + body).replace(b"\r\n ", b" ")
    assert b"Diagnostic-Code: " + reply.encode() + b"\r\n" in unfolded


@pytest.mark.parametrize(
    ("content_type", "content"),
    [
        ("message/external-body", b"Content-Type: text/plain\n\n" + b"x" * 1200 + b"\n"),
        ("message/delivery-status", b"Reporting-MTA: dns; " + b"m" * 1200 + b"\n"),
    ],
)
def test_a_7bit_message_attachment_with_a_line_too_long_names_it(
    content_type: str, content: bytes
) -> None:
    """A message/* attachment sent as 7-bit text (RFC 2046 §5.2 allows it no encoding)
    with a line over 998 octets that folding cannot shorten was refused with
    LineTooLong telling to "encode the body as quoted-printable or base64", which that
    part may not be, and without naming the attachment. It is InvalidAttachment now, as
    the guide says errors about such attachments are, naming the file and the line,
    with advice that can be followed."""
    attachment = Attachment(filename="part.txt", content=content, content_type=content_type)
    with pytest.raises(InvalidAttachment, match=r"may not be encoded.*shorten") as caught:
        prepare(email(text="t", attachments=[attachment]), now=NOW)
    assert caught.value.filename == "part.txt"
    assert "encode the body" not in caught.value.reason


@pytest.mark.parametrize("address", ["bob@", "bob@@", "@", "<bob@>", "a@b@"])
def test_malformed_address_reason_is_plain(address: str) -> None:
    """Hardening #12: `bob@` leaked IndexError('string index out of range') into the
    reason; the reason now says what is wrong in words."""
    with pytest.raises(InvalidAddress) as caught:
        prepare(email(to=address), now=NOW)
    assert "Error" not in caught.value.reason
    assert "index" not in caught.value.reason


# --- #13 Resent-Bcc -----------------------------------------------------------------------


def test_resent_bcc_is_not_transmitted() -> None:
    """Hardening #13: Resent-Bcc is removed like Bcc (RFC 5322 §3.6.6); the resent
    message goes to its Resent- recipients, as Postfix's cleanup does."""
    data = raw(
        "From: a@example.com",
        "To: b@example.org",
        "Resent-From: r@example.com",
        "Resent-To: c@example.org",
        "Resent-Bcc: hidden@example.net,",
        " other@example.net",
    )
    prepared = prepare(data, now=NOW)
    assert b"Resent-Bcc" not in prepared.data
    assert b"hidden" not in prepared.data and b"other@" not in prepared.data
    assert prepared.recipients == ("c@example.org", "hidden@example.net", "other@example.net")


def test_resent_bcc_cannot_be_smuggled_through_builder_headers() -> None:
    """Hardening #13: the builder refuses Resent-Bcc (and the other Resent- address
    fields) in ``headers``."""
    with pytest.raises(InvalidMessage, match="Resent-Bcc"):
        prepare(email(headers={"Resent-Bcc": "x@example.net"}), now=NOW)


@pytest.mark.parametrize("kind", ["raw", "EmailMessage"])
def test_return_path_is_not_transmitted(kind: str) -> None:
    """Return-Path is the delivering server's to add, from the envelope sender: "a
    message-originating SMTP system SHOULD NOT send a message that already contains a
    Return-path header field" (RFC 5321 §4.4). One given was sent as it came, so the
    mailbox showed a return path the message never had (Postfix's cleanup removes it)."""
    data = raw(
        "Return-Path: <forged@example.net>",
        "From: a@example.com",
        "To: b@example.org",
        "RETURN-path: <other@example.net>",
    )
    prepared = prepare(parsed(data) if kind == "EmailMessage" else data, now=NOW)
    assert b"return-path" not in prepared.data.lower()
    assert b"example.net" not in prepared.data
    assert prepared.envelope_from == "a@example.com"
    with pytest.raises(InvalidMessage, match=r"Return-Path.*envelope_from"):
        prepare(email(headers={"Return-Path": "<x@example.net>"}), now=NOW)


# --- #15 encoded-word filenames -----------------------------------------------------------


@pytest.mark.parametrize(
    "filename", ["=?utf-8?q?evil=2Eexe?=", "report =?utf-8?b?LmV4ZQ==?= .pdf", "a=?b?=c"]
)
def test_filename_is_sent_as_the_literal_text(filename: str) -> None:
    """Hardening #15: a filename that looks like an RFC 2047 word was decoded (evil.exe)
    behind the application's back; it now reaches the reader as the literal text given,
    in RFC 2231 form, which readers do not decode as encoded words."""
    attachment = Attachment(filename=filename, content=b"MZ")
    prepared = prepare(email(attachments=[attachment]), now=NOW)
    assert b"evil.exe" not in prepared.data
    assert next(parsed(prepared.data).iter_attachments()).get_filename() == filename


# --- #16 addresses SMTP cannot carry (with the RFC table) ---------------------------------

LOCAL_64 = "a" * 64
LONG_DOMAIN = ".".join(["d" * 60] * 3) + ".example"  # 191 octets

# (address, verdict, source). "valid": accepted; "invalid": RFC 5322/5321 syntax forbids
# it; "smtp": RFC 5322 allows it in a header but SMTP cannot carry it as given.
ADDRESS_TABLE = [
    ("simple@example.com", "valid", "RFC 5322 §3.4.1 addr-spec, dot-atom"),
    ("very.common+tag@example.com", "valid", "RFC 5322 §3.2.3 dot-atom-text"),
    ("!#$%&'*+-/=?^_`{|}~@example.org", "valid", "RFC 5322 §3.2.3 atext"),
    ('"john..doe"@example.org', "valid", "RFC 5321 §4.1.2 Quoted-string"),
    ('"a b"@example.org', "valid", "RFC 5321 §4.1.2 qtextSMTP includes SP"),
    ('"a\\"b"@example.org', "valid", "RFC 5321 §4.1.2 quoted-pairSMTP"),
    ("user@[192.0.2.1]", "valid", "RFC 5321 §4.1.3 IPv4-address-literal"),
    ("user@[IPv6:2001:db8::1]", "valid", "RFC 5321 §4.1.3 IPv6-address-literal"),
    ("josé@example.org", "valid", "RFC 6531 §3.3 UTF-8 Local-part"),
    ("用户@例子.广告", "valid", "RFC 6531 §3.3 UTF-8 local part and U-label domain"),
    ("bob@bücher.example", "valid", "RFC 5890 U-label, sent as an A-label"),
    (f"{LOCAL_64}@example.org", "valid", "RFC 5321 §4.5.3.1.1 64-octet local part"),
    ("Abc.example.com", "invalid", "RFC 5322 §3.4.1 addr-spec needs @"),
    ("A@b@c@example.com", "invalid", "RFC 5322 §3.2.3 @ is not atext"),
    ('a"b(c)d,e:f;g<h>i[j\\k]l@example.com', "invalid", "RFC 5322 §3.2.3 specials"),
    ('just"not"right@example.com', "invalid", "RFC 5322 §3.4.1 quotes must enclose all"),
    ("john..doe@example.com", "invalid", "RFC 5322 §3.2.3 dot-atom-text"),
    (".john@example.com", "invalid", "RFC 5322 §3.2.3 dot-atom-text"),
    ("john.@example.com", "invalid", "RFC 5322 §3.2.3 dot-atom-text"),
    ("a@-example.com", "invalid", "RFC 5321 §4.1.2 sub-domain starts with Let-dig"),
    ("a@example..com", "invalid", "RFC 5321 §4.1.2 Domain"),
    ("a@[300.1.1.1]", "invalid", "RFC 5321 §4.1.3 IPv4-address-literal"),
    ("@example.com", "invalid", "RFC 5322 §3.4.1 local-part required"),
    ("a@", "invalid", "RFC 5322 §3.4.1 domain required"),
    (f"{LOCAL_64}a@example.org", "smtp", "RFC 5321 §4.5.3.1.1 local part over 64 octets"),
    (f"{LOCAL_64}@{LONG_DOMAIN}", "smtp", "RFC 5321 §4.5.3.1.3 path over 256 octets"),
    ('"test\\©"@example.org', "smtp", "RFC 5321 §4.1.2 quoted-pairSMTP; RFC 6531 §3.3"),
    ('"a\\\tb"@example.org', "smtp", "RFC 5321 §4.1.2 quoted-pairSMTP excludes HTAB"),
    ("john . doe@example.org", "smtp", "RFC 5322 §4.4 obs-local-part; RFC 5321 §4.1.2"),
    ("a(comment)b@example.org", "smtp", "RFC 5322 §3.2.2 CFWS inside; RFC 5321 §4.1.2"),
    ("=?utf-8?q?a?=b@example.org", "smtp", "RFC 2047 §5: no encoded word in an addr-spec"),
    ('"x>y"@example.org', "smtp", "RFC 5321 §4.1.2 allows it; our path encoder does not"),
]


@pytest.mark.parametrize(
    ("address", "verdict", "source"), ADDRESS_TABLE, ids=[row[2] for row in ADDRESS_TABLE]
)
def test_address_table(address: str, verdict: str, source: str) -> None:
    """Hardening #16: the address cases of RFC 5321/5322/6531, valid, invalid and valid
    only in a header (SMTP cannot carry them), each with the section it comes from."""
    if verdict == "valid":
        prepared = prepare(email(to=[address]), now=NOW)
        assert len(prepared.recipients) == 1
        assert prepared.smtputf8 == (not prepared.recipients[0].split("@")[0].isascii())
        assert prepare(email(), envelope_to=[address], now=NOW).recipients == (prepared.recipients)
    else:
        with pytest.raises(InvalidMessage):
            prepare(email(to=[address]), now=NOW)
        with pytest.raises(InvalidMessage):
            prepare(email(), envelope_to=[address], now=NOW)


def test_local_part_over_64_octets_and_non_ascii_quoted_pair() -> None:
    """Hardening #16: the two examples of the finding, as InvalidAddress."""
    with pytest.raises(InvalidAddress, match="64"):
        prepare(email(to=f"{LOCAL_64}x@example.org"), now=NOW)
    with pytest.raises(InvalidAddress, match="quoted-pair"):
        prepare(email(to='"test\\©"@example.org'), now=NOW)
    # 64 UTF-8 octets is the bound, not 64 characters.
    with pytest.raises(InvalidAddress, match="64"):
        prepare(email(to="é" * 33 + "@example.org"), now=NOW)


def test_header_injection_stays_its_own_error() -> None:
    """Hardening #2: CR and LF keep raising HeaderInjection, not ForbiddenCharacter."""
    with pytest.raises(HeaderInjection):
        prepare(email(subject="a\r\nBcc: x@example.net"), now=NOW)


# --- wrong argument types: typed errors, not TypeError/AttributeError from inside --------


@pytest.mark.parametrize(
    ("parts", "error"),
    [
        ({"headers": None}, "headers must be a mapping"),
        ({"headers": 5}, "headers must be a mapping"),
        ({"attachments": None}, "attachments must be a sequence"),
        ({"attachments": b"x"}, "attachments must be a sequence"),
        ({"attachments": [b"x"]}, "must be Attachment values, not bytes"),
        ({"attachments": [{"filename": "a", "content": b"x"}]}, "not dict"),
    ],
)
def test_wrong_builder_types_are_invalid_message(parts: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidMessage, match=error):
        prepare(email(**parts), now=NOW)


def test_header_pairs_are_still_taken() -> None:
    prepared = prepare(email(headers=[("X-A", "1")]), now=NOW)
    assert b"\r\nX-A: 1\r\n" in prepared.data


def test_header_pairs_with_a_repeated_name_are_all_sent() -> None:
    """Pairs went through dict(), so a name given twice (two Comments, two X-Tag fields)
    kept only its last value and the others were dropped without a word."""
    pairs = [("Comments", "first"), ("X-Tag", "a"), ("Comments", "second")]
    data = prepare(email(headers=pairs), now=NOW).data
    assert b"\r\nComments: first\r\nX-Tag: a\r\nComments: second\r\n" in data
    # A field RFC 5322 allows once is still refused when repeated so.
    with pytest.raises(InvalidMessage, match="twice"):
        prepare(email(headers=[("References", "<a@b.c>"), ("References", "<d@e.f>")]), now=NOW)


@pytest.mark.parametrize(
    "envelope",
    [
        {"envelope_to": [None]},
        {"envelope_to": b"x@example.org"},
        {"envelope_to": 5},
        {"envelope_from": b"a@example.com"},
        {"envelope_from": 5},
    ],
)
def test_wrong_envelope_types_are_invalid_address(envelope: dict[str, Any]) -> None:
    """bytes were iterated as ints and None or 5 reached the address regex (TypeError)."""
    config = Config(helo_name="mail.example.com")
    for message in (email(), b"From: a@example.com\r\nTo: b@example.org\r\n\r\nx\r\n"):
        with pytest.raises(InvalidAddress, match="must be"):
            prepare_for(
                config, message, now=NOW, **{"envelope_from": None, "envelope_to": None, **envelope}
            )


def _with_part(part: Message) -> Message:
    root = MIMEMultipart()
    root["From"] = "a@example.com"
    root["To"] = "b@example.org"
    root.attach(MIMEText("hello"))
    root.attach(part)
    return root


def _filename_part(filename: str) -> Message:
    part = MIMEBase("application", "pdf")
    part.set_payload(b"%PDF")
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def _raw_part_header(value: str | Header) -> Message:
    part = MIMEText("x")
    part["X-Note"] = value
    return part


def _header_object_part(value: str) -> Message:
    # What a stdlib bug or a hand-made tree can leave behind: a policy header object
    # whose value holds a line break (assignment would have refused the string).
    part = EmailMessage()
    part.set_content("x")
    part._headers.append(("X-Note", policy.default.header_factory("X-Note", value)))  # type: ignore[attr-defined]
    return part


@pytest.mark.parametrize(
    "part",
    [
        _filename_part('a.pdf"\r\nX-Injected: 1'),
        _filename_part("a.pdf\nX-Injected: 1"),
        _filename_part("a.pdf\r\n\r\n--injected-boundary"),
        _raw_part_header("v\r\nX-Injected: 1"),
        _raw_part_header("v\rX-Injected: 1"),
        _raw_part_header(Header("v\r\nX-Injected: 1")),
        _header_object_part("v\nX-Injected: 1"),
    ],
    ids=[
        "filename-crlf",
        "filename-lf",
        "filename-blank-line",
        "raw",
        "bare-cr",
        "Header",
        "object",
    ],
)
def test_line_breaks_in_a_mime_part_header_are_injection(part: Message) -> None:
    """A compat32 part stores what it is given, and Python 3.11.7's generator (no
    ``verify_generated_headers``) wrote ``X-Injected: 1`` as a header line of that part:
    every entity's fields are checked, not only the top level's."""
    with pytest.raises(HeaderInjection) as caught:
        prepare(_with_part(part), now=NOW)
    assert caught.value.header in ("Content-Disposition", "X-Note")


def test_folded_mime_part_headers_are_still_taken() -> None:
    """Folding in a part's header (parsed source, or a compat32 value) is not injection."""
    part = _raw_part_header("a long value\r\n folded onto a second line")
    parsed = message_from_bytes(
        b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain;\r\n charset=us-ascii\r\n"
        b"X-Note: one\r\n\ttwo\r\n\r\nx\r\n--b--\r\n",
        policy=policy.default,
    )
    for message in (_with_part(part), parsed):
        data = prepare(message, now=NOW).data
        assert b"X-Injected" not in data
        assert b"X-Note:" in data


def _nested_tree(levels: int, *, kind: str) -> Message:
    """``levels`` entities nested in one another, built from the innermost out."""
    inner: Message = MIMEText("x")
    for _ in range(levels - 1):
        if kind == "multipart":
            outer: Message = MIMEMultipart()
            outer.attach(inner)
        else:
            outer = MIMEMessage(inner)
        inner = outer
    inner["From"] = "a@example.com"
    inner["To"] = "b@example.org"
    return inner


@pytest.mark.parametrize("kind", ["multipart", "message"])
def test_a_deep_hand_made_tree_is_refused_before_the_stdlib_recurses(kind: str) -> None:
    """3,000 nested parts raised RecursionError out of ``prepare()``; the tree is walked
    without recursion and refused with the raw path's bound, at the same depth as its
    serialised bytes are."""
    with pytest.raises(NestingTooDeep):
        prepare(_nested_tree(3000, kind=kind), now=NOW)
    verdicts = set()
    for levels in range(40, 110, 3):
        tree = _nested_tree(levels, kind=kind)
        try:
            prepare(tree.as_bytes(), now=NOW)
        except NestingTooDeep:
            with pytest.raises(NestingTooDeep):
                prepare(tree, now=NOW)
            verdicts.add("refused")
        else:
            prepare(tree, now=NOW)
            verdicts.add("taken")
    assert verdicts == {"refused", "taken"}


def test_a_wide_hand_made_tree_is_refused_by_the_part_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counted on the tree, before the stdlib writes 1,200 parts for the raw path to
    count."""
    root = MIMEMultipart()
    root["From"] = "a@example.com"
    root["To"] = "b@example.org"
    for _ in range(1200):
        root.attach(MIMEText("x"))
    monkeypatch.setattr(preparation, "serialise", _must_not_serialise)
    with pytest.raises(TooManyParts):
        prepare(root, now=NOW)


def test_a_multipart_holding_no_message_is_invalid() -> None:
    root = MIMEMultipart()
    root["From"] = "a@example.com"
    root["To"] = "b@example.org"
    root.set_payload(["not a part"])
    with pytest.raises(InvalidMessage, match="must be messages, not str"):
        prepare(root, now=NOW)


@pytest.mark.parametrize("where", ["top", "part"])
def test_too_many_fields_are_refused_before_the_stdlib_writes_them(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100,000 fields cost the stdlib's folder 1.5 s to write before the raw path counted
    them; the count of a stdlib message is known without writing it."""

    def build(fields: int) -> Message:
        message = EmailMessage()
        message["From"] = "a@example.com"
        message["To"] = "b@example.org"
        message.set_content("x")
        target: Message = message
        if where == "part":
            message.add_attachment(b"x", "application", "pdf")
            target = message.get_payload()[1]
        for _ in range(fields - len(target)):
            target["X-Field"] = "v"
        return message

    assert len(prepare(build(998), now=NOW).data) > 0  # Date and Message-ID are added
    monkeypatch.setattr(preparation, "serialise", _must_not_serialise)
    with pytest.raises(TooManyHeaderFields):
        prepare(build(1001), now=NOW)


@pytest.mark.parametrize("where", ["top", "part"])
def test_a_header_section_too_long_is_refused_before_the_stdlib_writes_it(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each field of a stdlib message was bounded (64 KiB) before the stdlib wrote it, but
    not their sum: 1,000 fields of 64 KiB, which raw input refuses past 1 MiB, were all
    folded first (0.25 s each; 2 s each for text full of "=?", which the stdlib parses
    in quadratic time) and only then refused."""

    def build(fields: int) -> Message:
        message = MIMEMultipart()
        message["From"] = "a@example.com"
        message["To"] = "b@example.org"
        message.attach(MIMEText("x"))
        target = message if where == "top" else message.get_payload()[0]
        for index in range(fields):
            target[f"X-{index}"] = "word " * 12_000
        return message

    monkeypatch.setattr(preparation, "serialise", _must_not_serialise)
    with pytest.raises(HeaderTooLong, match=r"header.* octets long") as caught:
        prepare(build(18), now=NOW)
    assert caught.value.header == "header section"


def _must_not_serialise(message: Message, *, utf8: bool) -> bytes:
    raise AssertionError("serialised before its fields were counted")


def _forwarding(inner: Message, how: str) -> Message:
    if how == "add_attachment":
        outer = EmailMessage()
        outer.set_content("see attached")
        outer.add_attachment(inner)
    else:
        outer = MIMEMultipart()
        outer.attach(MIMEMessage(inner))
    outer["From"] = "a@example.com"
    outer["To"] = "b@example.org"
    return outer


@pytest.mark.parametrize("how", ["add_attachment", "MIMEMessage"])
@pytest.mark.parametrize("kind", ["EmailMessage", "compat32"])
def test_an_attached_message_keeps_its_utf8_address(kind: str, how: str) -> None:
    """The stdlib wrote an attached message's ``jörg@exämple.org`` as encoded words inside
    the addr-spec (``=?utf-8?q?j=C3=B6rg?=@...``, which RFC 2047 §5 forbids), or could not
    write it at all; it is written as raw UTF-8 (RFC 6532), and the message needs
    SMTPUTF8."""
    inner = EmailMessage() if kind == "EmailMessage" else MIMEText("hallo")
    if isinstance(inner, EmailMessage):
        inner.set_content("hallo")
    inner["From"] = "Jörg <jörg@exämple.org>"
    inner["To"] = "b@example.org"
    prepared = prepare(_forwarding(inner, how), now=NOW)
    assert prepared.smtputf8
    assert b"=?utf-8?q?j=C3=B6rg?=" not in prepared.data
    attached = next(parsed(prepared.data).iter_attachments()).get_content()
    written = attached["From"].addresses[0].addr_spec  # raw UTF-8: surrogate escapes
    assert written.encode("utf-8", "surrogateescape").decode("utf-8") == "jörg@exämple.org"


@pytest.mark.parametrize(
    ("inner", "from_", "smtputf8"),
    [
        # An encoded word in the display name, as before.
        (EmailMessage, "Jörg <j@example.org>", False),
        (lambda: MIMEText("hallo"), "j@example.org", False),
        # No address list: carried as it is, not refused, and not as an encoded word.
        (lambda: MIMEText("hallo"), "not an address (ö) <<", True),
    ],
)
def test_an_attached_message_without_utf8_address(
    inner: Callable[[], Message], from_: str, smtputf8: bool
) -> None:
    """The attached message is only carried: its fields are not validated."""
    attached = inner()
    attached["From"] = from_
    outer = MIMEMultipart()
    outer["From"] = "a@example.com"
    outer["To"] = "b@example.org"
    outer.attach(MIMEMessage(attached))
    assert prepare(outer, now=NOW).smtputf8 is smtputf8


# --- found by fuzzing stdlib trees (tests/unit/test_message_tree_fuzz.py) -----------------


@pytest.mark.parametrize(
    "char", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
@pytest.mark.parametrize("where", ["top", "part"])
def test_a_raw_value_with_a_line_break_of_splitlines(char: str, where: str) -> None:
    """A compat32 value (or a parsed one) ``"v\\x0bX-Injected: 1"`` passed the CR/LF check,
    and the stdlib's writer, which splits a raw value with ``str.splitlines``, wrote
    ``X-Injected: 1`` as a header field of its own, at the top level too."""
    part = MIMEText("x")
    root = _with_part(part)
    (root if where == "top" else part)["X-Note"] = f"v{char}X-Injected: 1"
    with pytest.raises(ForbiddenCharacter) as caught:
        prepare(root, now=NOW)
    assert caught.value.where == "X-Note"


LINE_BREAK_WORD = "=?utf-8?q?=0D=0AX-Injected:_1?="


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Subject", f"{LINE_BREAK_WORD} " + "x" * 80),
        ("Content-Disposition", f"{LINE_BREAK_WORD}=" + "x" * 80),
        ("Content-Disposition", "a; filename*=utf-8''%0D%0AX-Injected%3A%201; x=" + "y" * 70),
        ("Content-Type", f'multipart/mixed; boundary="{LINE_BREAK_WORD}"'),
    ],
    ids=["long subject", "long disposition", "long RFC 2231 filename", "boundary"],
)
@pytest.mark.parametrize("where", ["top", "part"])
def test_a_raw_value_with_an_encoded_line_break(name: str, value: str, where: str) -> None:
    """The stdlib's writer refolds a long raw value through ``policy.default``'s parser,
    which decodes encoded words and RFC 2231 parameters, and wrote the CR LF they decode
    to: a header field.
    A boundary is read through that parser too, and its delimiter lines held CR LF."""
    part = MIMEText("x")
    root = _with_part(part)
    target = root if where == "top" else part
    del target[name]
    target[name] = value
    with pytest.raises(HeaderInjection) as caught:
        prepare(root, now=NOW)
    assert caught.value.header == name


def _with_boundary(boundary: str, *bodies: str, preamble: str | None = None) -> Message:
    root = MIMEMultipart(boundary=boundary)
    root["From"] = "a@example.com"
    root["To"] = "b@example.org"
    for body in bodies:
        root.attach(MIMEText(body))
    root.preamble = preamble
    return root


@pytest.mark.parametrize(
    "message",
    [
        _with_boundary("B", "a\n--B\nX-Forged: 1\n\nforged\n", "b"),
        _with_boundary("B", "a\n--B--\n", "lost"),
        _with_boundary("B", "a", preamble="--B\nX-Forged: 1\n"),
    ],
    ids=["delimiter in a body", "close delimiter in a body", "delimiter in the preamble"],
)
def test_a_given_boundary_that_occurs_in_the_content(message: Message) -> None:
    """A boundary the caller set is written as it is (the stdlib checks only those it
    makes up): a part whose body holds its delimiter line was read as two parts, the
    second with header fields of the sender's choosing, or hid the parts after it."""
    with pytest.raises(InvalidMessage, match="boundary 'B'"):
        prepare(message, now=NOW)


def test_a_given_boundary_that_occurs_nowhere_else_is_taken() -> None:
    for message in (
        _with_boundary("B", "a --B", "--Bx\n", "b"),  # not delimiter lines
        _with_boundary("B"),  # written with one empty part
        _forwarding(_with_boundary("B", "inner"), "MIMEMessage"),
    ):
        written = parsed(prepare(message, now=NOW).data)
        assert written.is_multipart()


@pytest.mark.parametrize("kind", ["EmailMessage", "compat32"])
def test_a_long_parameter_name_does_not_hang_the_writer(kind: str) -> None:
    """A Content-Type parameter name of 70 characters made the stdlib's writer loop for
    ever (its RFC 2231 splitting left no room for the value): prepare() never returned.
    (On the old code this test fails by its guard, after 10 s.)"""
    value = "text/plain; " + "n" * 70 + '="' + "v" * 100 + '"'
    message: Message = EmailMessage() if kind == "EmailMessage" else Message()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message.set_payload("x")
    message["Content-Type"] = value
    with hang_guard(10), pytest.raises(InvalidHeaderValue, match="the limit is 40"):
        prepare(message, now=NOW)
    del message["Content-Type"]
    message["Content-Type"] = value.replace("n" * 70, "n" * 40)
    prepare(message, now=NOW)


@pytest.mark.parametrize("kind", ["EmailMessage", "compat32"])
def test_a_value_the_folder_breaks_without_white_space(kind: str) -> None:
    """The stdlib's folder broke a long Content-Type before a comment with no white space
    to make the rest a continuation: ``(X-Injected: 1)`` was written as a field of its
    own, at the top level as in a part. The written fields are read back along the tree."""
    subtype = "x" * 80 + "(X-Injected: 1)"
    message: Message
    if kind == "EmailMessage":
        message = EmailMessage()
        message.set_content("hi")
        message.add_attachment(b"", "application", subtype)
    else:
        message = Message()
        message["Content-Type"] = f"application/{subtype}"
        message.set_payload("x")
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    with pytest.raises(HeaderInjection, match=r"Content-Type field .*'\(X-Injected: 1\)'"):
        prepare(message, now=NOW)


def test_compat32_header_values_are_written_as_their_encoded_words() -> None:
    """``msg["Subject"] = Header("Grüße", "utf-8")`` on a ``MIMEText``, how Python's
    documentation long taught non-ASCII headers (and what smtplib sends), raised
    InvalidMessage ("'Header' object has no attribute 'splitlines'")."""
    message = MIMEText("Grüße", "plain", "utf-8")
    message["From"] = Header("Jörg Müller", "utf-8").encode() + " <joerg@example.com>"
    message["To"] = "b@example.org"
    subject = "Grüße aus Köln, " * 8
    message["Subject"] = Header(subject, "utf-8")
    prepared = prepare(message, now=NOW)
    assert not prepared.smtputf8
    read = parsed(prepared.data)
    assert str(read["Subject"]) == subject
    assert str(read["From"]) == "Jörg Müller <joerg@example.com>"
    assert prepared.data.isascii()


def test_compat32_plain_non_ascii_header_strings_are_written_as_encoded_words() -> None:
    """``msg["Subject"] = "Grüße"`` on a ``MIMEText`` (the common idiom, which smtplib
    sends) raised UnencodableHeader ("'ascii' codec can't encode"): the SMTP policy writes
    a short compat32 string as it is. Each field is now parsed as its type, so a display
    name is encoded and its address stays readable (compat32's own ``as_bytes`` encodes
    the address into the word as well), and a long text keeps every space (the stdlib's
    folder dropped one between two encoded words)."""
    message = MIMEText("Grüße", "plain", "utf-8")
    message["From"] = "José Núñez <jose@example.com>"
    message["To"] = "Zoë <zoe@example.org>, b@example.org"
    message["Subject"] = "Café crème"
    message["X-Note"] = "Köln, " * 20  # long: folded into several words
    prepared = prepare(message, now=NOW)
    assert not prepared.smtputf8
    assert prepared.data.isascii()
    assert b"<jose@example.com>" in prepared.data
    assert prepared.recipients == ("zoe@example.org", "b@example.org")
    read = parsed(prepared.data)
    assert str(read["From"]) == "José Núñez <jose@example.com>"
    assert str(read["To"]) == "Zoë <zoe@example.org>, b@example.org"
    assert str(read["Subject"]) == "Café crème"
    assert str(read["X-Note"]) == "Köln, " * 20
    head = prepared.data.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert sum(line.startswith(b" ") for line in head) >= 2  # X-Note is folded


def test_compat32_non_ascii_address_strings_go_as_smtputf8() -> None:
    message = MIMEText("x", "plain", "utf-8")
    message["From"] = "Jörg <jörg@example.com>"
    message["To"] = "b@example.org"
    message["Subject"] = "Grüße"
    prepared = prepare(message, now=NOW)
    assert prepared.smtputf8
    assert prepared.envelope_from == "jörg@example.com"
    assert 'From: "Jörg" <jörg@example.com>'.encode() in prepared.data  # RFC 6532


@pytest.mark.parametrize("value", ["Köln, " * 20, "Grüße " + "aus Köln " * 12 + "und Bonn"])
def test_a_long_non_ascii_text_of_an_email_message_keeps_its_spaces(value: str) -> None:
    """The stdlib's folder dropped the space between two encoded words where it broke a
    long Subject or X- field of an ``EmailMessage`` ("Köln, Köln" read back as
    "Köln,Köln"); such text is now folded as the ``Email`` builder folds it."""
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message["Subject"] = value
    message["X-Note"] = value
    message.set_content("x")
    prepared = prepare(message, now=NOW)
    read = parsed(prepared.data)
    assert str(read["Subject"]) == value
    assert str(read["X-Note"]) == value
    assert prepared.data.isascii()


@pytest.mark.parametrize("kind", ["EmailMessage", "MIMEText"])
def test_a_long_list_of_non_ascii_names_keeps_every_name_whole(kind: str) -> None:
    """The stdlib's folder split display names where it broke a long To of a stdlib
    message ("Zoë Ünïcød é", "Kö ln" read back); the list is now folded as the ``Email``
    builder folds it: at the spaces between words, each short name in one encoded word."""
    names = [f"Zoë Ünïcødé Nummer {i} aus Köln" for i in range(8)]
    message: Message = EmailMessage() if kind == "EmailMessage" else MIMEText("x")
    if isinstance(message, EmailMessage):
        message.set_content("x")
    message["From"] = "a@example.com"
    message["To"] = ", ".join(f'"{name}" <u{i}@example.org>' for i, name in enumerate(names))
    prepared = prepare(message, now=NOW)
    assert prepared.data.isascii()
    assert prepared.recipients == tuple(f"u{i}@example.org" for i in range(8))
    read = parsed(prepared.data)
    assert [a.display_name for a in read["To"].addresses] == names


@pytest.mark.parametrize(
    "content_type",
    [
        "image/png; name*=utf-8''evil%0D%0AX-Injected%3A%201",
        "image/png; name*0*=utf-8''a%0A; name*1=b",
        "image/png; name*0=a; name*1=b",
    ],
)
def test_an_attachment_type_with_rfc2231_parameters_is_refused(content_type: str) -> None:
    # Percent-encoded values would be sent as given, and decode to CR LF or anything
    # else; a plain value is encoded by the builder itself.
    attachment = Attachment(filename="f.png", content=b"\x89PNG", content_type=content_type)
    with pytest.raises(InvalidAttachment, match="RFC 2231"):
        prepare(
            Email(from_="a@example.com", to="b@example.org", text="x", attachments=[attachment])
        )


def test_a_non_ascii_header_object_is_written_as_it_holds_its_value() -> None:
    """A non-ASCII header object of an ``EmailMessage`` (a Content-Disposition with a
    UTF-8 filename) was turned back into text and parsed again before it was written,
    which decoded its values a second time: ``add_attachment(filename="=?utf-8?q?a?=é")``
    arrived as ``aé``, and a Content-Disposition copied from a parsed message, whose
    RFC 2231 filename held an encoded word of CR LF CR LF, was written with a blank line
    in it and a body of the sender's making after it."""
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message.set_content("x")
    message.add_attachment(b"a", "application", "octet-stream", filename="=?utf-8?q?a?=é")
    message.add_attachment(b"b", "application", "pdf", filename="b.pdf")
    copied = message_from_bytes(
        b"Content-Disposition: attachment; x*=utf-8''%C3%A9; filename*=utf-8''"
        b"%3D%3Futf-8%3Fq%3F%3D0D%3D0A%3D0D%3D0Aforged%3F%3D\r\n\r\n",
        policy=policy.default,
    )["Content-Disposition"]
    second = message.get_payload()[2]
    del second["Content-Disposition"]
    second["Content-Disposition"] = copied
    prepared = prepare(message, now=NOW)
    parts = list(parsed(prepared.data).iter_attachments())
    assert parts[0].get_filename() == "=?utf-8?q?a?=é"
    assert parts[1].get_content() == b"b"
    assert b"\r\n\r\nforged" not in prepared.data


OUTLOOK_ID = "<BN6PR11MB1234567890ABCDEF1234567890ABCDEF@BN6PR11MB1234.namprd11.prod.outlook.com>"
"""A msg-id as Outlook makes them: 83 characters, longer than a folded line holds."""


@pytest.mark.parametrize("kind", ["EmailMessage", "MIMEText"])
def test_a_long_ascii_word_of_a_stdlib_message_is_never_made_an_encoded_word(kind: str) -> None:
    """The stdlib's folder wraps an ASCII word too long for a 78-character line by making
    it RFC 2047 words: an Outlook msg-id in In-Reply-To or References, a List-Unsubscribe
    URL with its token, a part's Content-ID arrived as ``=?utf-8?q?=3CBN6PR11...?=``,
    which RFC 2047 §5 forbids there (no thread, no unsubscribe link, a broken cid:
    image), and a long URL in a Subject as words of 77 characters (§2 allows 75). Such a
    word now stays as it is, on a line of its own."""
    unsubscribe = "<https://example.com/unsubscribe?token=" + "a1b2c3d4" * 12 + ">"
    subject = "Report ready: https://example.com/reports/2024/05/06/" + "x" * 60
    message: Message = EmailMessage() if kind == "EmailMessage" else MIMEMultipart()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message["Subject"] = subject
    message["In-Reply-To"] = OUTLOOK_ID
    message["References"] = "<first@example.org> " + OUTLOOK_ID
    message["List-Unsubscribe"] = unsubscribe
    if isinstance(message, EmailMessage):
        message.set_content("x")
        message.add_attachment(b"\x89PNG", "image", "png", filename="a.png", cid=OUTLOOK_ID)
    else:
        message.attach(MIMEText("x"))
        image = MIMEApplication(b"\x89PNG")
        image["Content-ID"] = OUTLOOK_ID
        message.attach(image)
    prepared = prepare(message, now=NOW)
    assert b"=?" not in prepared.data
    assert max(map(len, prepared.data.split(b"\r\n"))) <= 998
    read = parsed(prepared.data)
    assert str(read["Subject"]) == subject
    assert str(read["In-Reply-To"]) == OUTLOOK_ID
    assert str(read["References"]) == "<first@example.org> " + OUTLOOK_ID
    assert str(read["List-Unsubscribe"]) == unsubscribe
    assert [str(part["Content-ID"]) for part in read.iter_parts()][1] == OUTLOOK_ID


@pytest.mark.parametrize("kind", ["MIMEText", "MIMEMultipart", "Message", "shift_jis"])
def test_a_long_line_the_stdlib_wrote_for_a_message_tree_is_encoded(kind: str) -> None:
    """``MIMEText(html, "html")`` with minified HTML on one line (5,426 octets here) is
    written by the stdlib as 7bit, past RFC 5322's 998 octets, and prepare() refused it
    with LineTooLong ("encode the body"), a body the application did not encode, while
    smtplib sends it and ``mailstrom sendmail`` encodes the same bytes. Such a body is now
    encoded quoted-printable, as for sendmail, and reads the same."""
    html = "<html><body>" + "<p>hello world</p>" * 300 + "</body></html>"
    message: Message
    if kind == "MIMEText":
        message, text = MIMEText(html, "html"), html
    elif kind == "MIMEMultipart":
        message, text = MIMEMultipart("alternative"), html
        message.attach(MIMEText("hello"))
        message.attach(MIMEText(html, "html"))
    elif kind == "Message":
        message, text = Message(), html
        message.set_payload(html)
    else:  # written as 7bit ISO-2022-JP by the stdlib
        text = "長い行" * 400
        message = MIMEText(text, "plain", "shift_jis")
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    prepared = prepare(message, now=NOW)
    assert max(map(len, prepared.data.split(b"\r\n"))) <= 998
    read = parsed(prepared.data)
    body = read.get_body(("html", "plain"))
    assert body is not None
    assert body.get_content().replace("\r\n", "\n").rstrip("\n") == text


def _dkim_signed(text: str, field: str = "DKIM-Signature") -> Message:
    message = MIMEText(text, "html")
    message[field] = "v=1; a=rsa-sha256; d=example.com; s=s1; h=from; bh=YQ==; b=YQ=="
    message["From"] = "a@example.com"
    return message


@pytest.mark.parametrize(
    "kind", ["multipart/signed", "DKIM-Signature", "ARC-Message-Signature", "attached"]
)
def test_a_long_line_in_signed_content_of_a_message_tree_is_refused(kind: str) -> None:
    """Follows the encoding of a stdlib tree's long lines: the signed part of a
    multipart/signed (S/MIME, PGP/MIME: RFC 1847 §2.1, signed as it is) and the body of a
    message with a DKIM-Signature (or ARC-Message-Signature) field, its own or an
    attached one's (an abuse report), were re-encoded quoted-printable, so their
    signature no longer verified. They are refused with LineTooLong, as before, saying
    why; a line outside them is encoded."""
    html = "<html><body>" + "<p>hello world</p>" * 300 + "</body></html>"
    message: Message
    if kind == "multipart/signed":
        message = MIMEMultipart("signed", protocol="application/pkcs7-signature", micalg="sha-256")
        message.attach(MIMEText(html, "html"))
        message.attach(MIMEApplication(b"\x30\x80", "pkcs7-signature"))
        message["From"] = "a@example.com"
    elif kind.endswith("Signature"):
        message = _dkim_signed(html, kind)
    else:
        message = MIMEMultipart()
        message["From"] = "a@example.com"
        message.attach(MIMEText(html, "html"))  # not signed: encoded, were it alone
        message.attach(MIMEMessage(_dkim_signed(html)))
    message["To"] = "b@example.org"
    with pytest.raises(LineTooLong, match="signed") as caught:
        prepare(message, now=NOW)
    assert "octets long" in str(caught.value)


def test_a_long_line_beside_a_multipart_signed_is_encoded() -> None:
    """Only what is signed is kept as it is: a long line in a part beside a
    multipart/signed, or in its signature part, is encoded as in any other tree."""
    html = "<html><body>" + "<p>hello world</p>" * 300 + "</body></html>"
    signed = MIMEMultipart("signed", protocol="application/pgp-signature", micalg="pgp-sha256")
    signed.attach(MIMEText("signed text"))
    signed.attach(MIMEText("-----BEGIN PGP SIGNATURE-----" + "A" * 1200, "pgp-signature"))
    message = MIMEMultipart()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message.attach(signed)
    message.attach(MIMEText(html, "html"))
    prepared = prepare(message, now=NOW)
    assert max(map(len, prepared.data.split(b"\r\n"))) <= 998
    assert b"\r\n\r\nsigned text" in prepared.data
    read = parsed(prepared.data)
    assert read.get_body(("html",)).get_content().rstrip("\n") == html  # type: ignore[union-attr]

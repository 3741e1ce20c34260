"""Raw RFC 5322 input to ``prepare()``: what is refused at the boundary, and the header
fields and envelope a message that is accepted gets. One test per fault found."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest

from mailstrom.errors import (
    ForbiddenCharacter,
    InvalidHeaderValue,
    InvalidMessage,
    MessageTooLarge,
    MissingFrom,
    MultipleFromWithoutSender,
    NoRecipients,
    UnencodableHeader,
)
from mailstrom.message import Attachment, Email, preparation, prepare
from mailstrom.message.encoding import to_crlf

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)

TOP = b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"


def _multipart(part_head: bytes) -> bytes:
    return (
        TOP + b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
        b"--B\r\n" + part_head + b"\r\n\r\nhello\r\n--B--\r\n"
    )


def _attached_message(inner_head: bytes, content_type: bytes) -> bytes:
    return (
        TOP
        + b"Content-Type: "
        + content_type
        + b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + inner_head
        + b"\r\n\r\nhello\r\n"
    )


LATIN1_PART_HEADERS = {
    "part": _multipart(
        b'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="caf\xe9.txt"'
    ),
    "message/rfc822": _attached_message(
        b"From: x@example.net\r\nSubject: caf\xe9", b"message/rfc822"
    ),
}


@pytest.mark.parametrize("data", LATIN1_PART_HEADERS.values(), ids=LATIN1_PART_HEADERS)
def test_a_part_header_that_is_not_utf8_is_refused_as_the_top_one_is(data: bytes) -> None:
    """8-bit octets that are not UTF-8 in the header section of a MIME part (or of an
    attached message/rfc822) were queued and marked as needing SMTPUTF8: sent under
    SMTPUTF8 as Latin-1, which RFC 6532 §3.1 does not allow (8-bit header text is UTF-8),
    and failed for every recipient at a server without SMTPUTF8, though the same octets in
    the message's own header section are refused at submission (UnencodableHeader)."""
    with pytest.raises(UnencodableHeader, match=r"MIME part.*not UTF-8"):
        prepare(data, now=NOW)
    # The same part header in UTF-8 is taken, and needs SMTPUTF8.
    prepared = prepare(data.replace(b"caf\xe9", "café".encode()), now=NOW)
    assert prepared.smtputf8


def test_a_message_global_body_is_content_not_a_header_section() -> None:
    """A message/global body is 8-bit content (RFC 6532 §3.7): not walked, not refused,
    and needing 8BITMIME only, whatever its octets."""
    data = _attached_message(b"From: x@example.net\r\nSubject: caf\xe9", b"message/global")
    prepared = prepare(data, now=NOW)
    assert (prepared.smtputf8, prepared.eightbit) == (False, True)


def _fields(data: bytes, name: bytes) -> list[bytes]:
    head = data[: data.index(b"\r\n\r\n")]
    return [line for line in head.split(b"\r\n") if line.lower().startswith(name.lower() + b":")]


@pytest.mark.parametrize("char", ["\x01", "\x0b", "\x0c", "\x1c", "\x1e", "\x7f", "\x85", "\u2028"])
def test_a_control_character_in_a_parts_header_section_is_refused(char: str) -> None:
    """The top header section's fields may hold no control character but TAB (nor NEL or
    the Unicode line separators); a MIME part's were not checked. A part field
    ``X-Foo: a<VT>Content-Type: text/html`` was queued and sent: one field here and at
    Postfix, but any hop that rewrites the part with the stdlib (a list server, a Python
    forwarder) breaks the line at VT, FF or FS, and the part became text/html with a
    field of the sender's making. Refused as the same octet is at the top."""
    head = b"X-Foo: a" + char.encode() + b"Content-Type: text/html"
    with pytest.raises(ForbiddenCharacter, match="MIME part"):
        prepare(_multipart(head), now=NOW)
    # The same field in an attached message, and the top-level check, as before.
    with pytest.raises(ForbiddenCharacter):
        prepare(_attached_message(head, b"message/rfc822"), now=NOW)
    with pytest.raises(ForbiddenCharacter):
        prepare(TOP + head + b"\r\n\r\nhi\r\n", now=NOW)
    # TAB is white space, and a part with plain fields passes.
    plain = prepare(_multipart(b"X-Foo: a\tb"), now=NOW)
    parts = email.message_from_bytes(plain.data, policy=email.policy.default).get_payload()
    assert [part["X-Foo"] for part in parts] == ["a\tb"]


RESENT = (
    b"Resent-From: desk@example.net\r\nResent-To: agent@example.net\r\n"
    b"From: customer@example.com\r\nTo: desk@example.net\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <orig@example.com>\r\n"
    b"Subject: help\r\n\r\nbody\r\n"
)


def test_a_resent_message_gets_the_resent_date_and_message_id_it_lacks() -> None:
    """A raw message being resent (it has Resent-To) without Resent-Date was sent so:
    RFC 5322 §3.6.6 requires Resent-Date in every resent block (and Resent-Message-ID
    should be there), and Postfix's cleanup adds both when they are missing, as
    prepare() adds Date and Message-ID to a message lacking them. They are added now;
    the original Date and Message-ID stay as they were, and the Message-ID is still the
    one the queue keeps (the one bounces quote)."""
    prepared = prepare(RESENT, now=NOW)
    assert prepared.recipients == ("agent@example.net",)
    assert _fields(prepared.data, b"Resent-Date") == [
        b"Resent-Date: Mon, 06 May 2024 07:08:09 +0000"
    ]
    (resent_id,) = _fields(prepared.data, b"Resent-Message-ID")
    assert re.fullmatch(rb"Resent-Message-ID: <[0-9a-f]{32}@example\.com>", resent_id)
    assert _fields(prepared.data, b"Date") == [b"Date: Mon, 01 Jan 2024 00:00:00 +0000"]
    assert _fields(prepared.data, b"Message-ID") == [b"Message-ID: <orig@example.com>"]
    assert prepared.header_message_id == "<orig@example.com>"


def test_resent_fields_given_are_not_added_again() -> None:
    given = RESENT.replace(
        b"Resent-To:",
        b"Resent-Date: Tue, 02 Jan 2024 00:00:00 +0000\r\n"
        b"Resent-Message-ID: <again@example.net>\r\nResent-To:",
    )
    prepared = prepare(given, now=NOW)
    assert len(_fields(prepared.data, b"Resent-Date")) == 1
    assert _fields(prepared.data, b"Resent-Message-ID") == [
        b"Resent-Message-ID: <again@example.net>"
    ]
    # A message that is not being resent gets no Resent- field.
    plain = prepare(RESENT.replace(b"Resent-To: agent@example.net\r\n", b""), now=NOW)
    assert plain.recipients == ("desk@example.net",)
    assert not _fields(plain.data, b"Resent-Date")
    assert not _fields(plain.data, b"Resent-Message-ID")


def test_a_resent_message_is_sent_from_its_resender() -> None:
    """The reverse-path of a message being resent is who resends it (RFC 5322 §3.6.6):
    its Resent-From, or Resent-Sender when it has one. It was the original Sender or
    From, so the customer who wrote to the desk got the bounces of the desk's resend to
    an agent, and the desk never heard of them."""
    assert prepare(RESENT, now=NOW).envelope_from == "desk@example.net"
    with_sender = RESENT.replace(
        b"Resent-To:", b"Resent-Sender: Ops <ops@example.net>\r\nResent-To:"
    )
    assert prepare(with_sender, now=NOW).envelope_from == "ops@example.net"
    # The newest resent block comes first (each resend prepends its block).
    again = b"Resent-From: second@example.net\r\nResent-To: other@example.net\r\n" + RESENT
    prepared = prepare(again, now=NOW)
    assert prepared.envelope_from == "second@example.net"
    # The caller's envelope sender still wins, and the author's From stays in the header.
    assert prepare(RESENT, envelope_from="", now=NOW).envelope_from == ""
    assert prepare(RESENT, envelope_from="x@example.org", now=NOW).envelope_from == "x@example.org"
    assert _fields(prepared.data, b"From") == [b"From: customer@example.com"]


def test_a_resender_is_not_taken_from_an_older_resent_block() -> None:
    """Who resends a message is named by its newest resent block only (RFC 5322 §3.6.6:
    each resend prepends a block of its own). The first Resent-Sender anywhere was taken,
    so a message resent by the desk, then by second@ (Resent-From alone), went out with
    the desk's ops address as its reverse-path: the bounces of second@'s resend went to
    ops, and a Resent-From of two mailboxes passed without the Resent-Sender it needs."""
    older = RESENT.replace(
        b"Resent-To:",
        b"Resent-Date: Mon, 01 Jan 2024 01:00:00 +0000\r\n"
        b"Resent-Sender: Ops <ops@example.net>\r\nResent-To:",
    )
    newest = b"Resent-From: second@example.net\r\nResent-To: other@example.net\r\n"
    assert prepare(newest + older, now=NOW).envelope_from == "second@example.net"
    # Its own Resent-Sender still counts, wherever in its block it stands.
    own = (
        b"Resent-From: second@example.net\r\nResent-Sender: me@example.net\r\n"
        b"Resent-To: other@example.net\r\n"
    )
    assert prepare(own + older, now=NOW).envelope_from == "me@example.net"
    several = b"Resent-From: a@x.example, b@x.example\r\nResent-To: other@example.net\r\n"
    with pytest.raises(MultipleFromWithoutSender, match="Resent-Sender"):
        prepare(several + older, now=NOW)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("Resent-Date", "2024-01-02 03:04:05"),  # str(datetime), as Date was given too
        ("Resent-Date", "Tue, 02 Jan 2024 03:04:05"),  # no zone
        ("Resent-Message-ID", "again@example.net"),
        ("Resent-Message-ID", "<a@b>, <c@d>"),
    ],
)
def test_the_resend_s_own_resent_date_and_message_id_are_checked(field: str, value: str) -> None:
    """A message being resent got a missing Resent-Date and Resent-Message-ID, but one
    given that no reader can take (``str(datetime)``, a msg-id without angle brackets)
    was sent as it came, where the same Date or Message-ID is refused: the resent block
    this call makes then had none usable, which RFC 5322 §3.6.6 requires (Resent-Date)
    or asks for (Resent-Message-ID). They are checked as Date and Message-ID are. An
    older block's are history, carried as they came, as its Received fields are; so are
    the fields of a message not being resent."""
    bad = f"{field}: {value}\r\n".encode()
    with pytest.raises(InvalidHeaderValue, match=f"invalid {field} ") as caught:
        prepare(bad + RESENT, now=NOW)
    assert caught.value.header == field
    older = RESENT.replace(b"Resent-To:", bad + b"Resent-To:")
    newest = b"Resent-From: second@example.net\r\nResent-To: other@example.net\r\n"
    assert bad in prepare(newest + older, now=NOW).data
    # Not being resent (no Resent-To, -Cc or -Bcc): every Resent- field is history.
    plain = RESENT.replace(b"Resent-To: agent@example.net\r\n", b"")
    assert bad in prepare(bad + plain, now=NOW).data
    # Obsolete but readable forms pass, as they do in Date and Message-ID (§4.3, §4.5.4).
    ok = b'Resent-Date: 2 Jan 24 03:04 EST (a comment)\r\nResent-Message-ID: <"q"@x> (c)\r\n'
    assert ok in prepare(ok + RESENT, now=NOW).data


def test_a_resent_message_without_a_resender_is_refused() -> None:
    """RFC 5322 §3.6.6: "When resent fields are used, the Resent-From: and Resent-Date:
    fields MUST be sent." Resent-Date is added as Date is; who resends is not known,
    so the message is refused as one without From is. It was sent without one, from
    its author."""
    without = RESENT.replace(b"Resent-From: desk@example.net\r\n", b"")
    with pytest.raises(MissingFrom, match="Resent-From"):
        prepare(without, now=NOW)
    several = RESENT.replace(
        b"desk@example.net\r\nResent-To", b"a@x.example, b@x.example\r\nResent-To"
    )
    with pytest.raises(MultipleFromWithoutSender, match="Resent-Sender"):
        prepare(several, now=NOW)
    # Not being resent (no Resent-To, -Cc or -Bcc): no Resent-From needed.
    plain = without.replace(b"Resent-To: agent@example.net\r\n", b"")
    assert prepare(plain, now=NOW).envelope_from == "customer@example.com"


def test_a_message_resent_twice_goes_to_its_newest_block_s_recipients_only() -> None:
    """Each resend prepends a resent block naming its own recipients (RFC 5322 §3.6.6);
    the older block's recipients got the message from the earlier resend. A message
    resent a second time went to the recipients of every block: the agent of the first
    resend got it again (a duplicate, perhaps with the second resender's private note).
    Only the newest block's Resent-To, Resent-Cc and Resent-Bcc count now; the older
    block stays in the header, as it was, and its Resent-Bcc is still removed."""
    older = RESENT.replace(
        b"Resent-To:",
        b"Resent-Date: Mon, 01 Jan 2024 01:00:00 +0000\r\n"
        b"Resent-Bcc: hidden@example.net\r\nResent-To:",
    )
    newest = (
        b"Resent-Date: Tue, 02 Jan 2024 00:00:00 +0000\r\n"
        b"Resent-From: second@example.net\r\nResent-To: other@example.net\r\n"
        b"Resent-Cc: third@example.net\r\n"
    )
    prepared = prepare(newest + older, now=NOW)
    assert prepared.recipients == ("other@example.net", "third@example.net")
    assert prepared.envelope_from == "second@example.net"
    assert _fields(prepared.data, b"Resent-To") == [
        b"Resent-To: other@example.net",
        b"Resent-To: agent@example.net",
    ]
    assert not _fields(prepared.data, b"Resent-Bcc")
    # A newest block naming no recipient is no resend to the older block's.
    bare = b"Resent-Date: Tue, 02 Jan 2024 00:00:00 +0000\r\nResent-From: second@example.net\r\n"
    with pytest.raises(NoRecipients, match="newest resent block"):
        prepare(bare + older, now=NOW)
    assert prepare(bare + older, envelope_to=["x@example.org"], now=NOW).recipients == (
        "x@example.org",
    )


@pytest.mark.parametrize("name", ["To", "Cc", "Reply-To"])
def test_a_second_to_cc_or_reply_to_field_is_refused(name: str) -> None:
    """A raw message with two To (Cc, Reply-To) fields, one per recipient as some
    generators write them, was queued and sent, though RFC 5322 §3.6 allows one of each:
    Gmail checks exactly these fields (with From, Sender, Subject, Date, Message-ID,
    In-Reply-To, References and Bcc) and refuses such a message at the end of DATA
    ("550 5.7.1 ... not RFC 5322 compliant"), so it failed later, per recipient. It is
    refused now, as a second Subject is. Bcc, never sent, may still come in several
    fields, and so may the Resent- fields, one block per resend."""
    data = (
        b"From: a@example.com\r\nTo: b@example.org\r\n"
        + f"{name}: c@example.org\r\n{name}: d@example.org\r\n".encode()
        + b"\r\nbody\r\n"
    )
    with pytest.raises(InvalidMessage, match=f"2 {name} header fields; RFC 5322 §3.6 allows one"):
        prepare(data.replace(b"To: b@example.org\r\n", b"") if name == "To" else data, now=NOW)
    several = (
        b"From: a@example.com\r\nTo: b@example.org\r\nBcc: c@example.org\r\nBcc: d@example.org\r\n"
        b"Resent-From: r@example.com\r\nResent-To: e@example.org\r\nResent-To: f@example.org\r\n"
        b"\r\nbody\r\n"
    )
    assert prepare(several, now=NOW).recipients == ("e@example.org", "f@example.org")
    assert prepare(several.replace(b"Resent-", b"X-"), now=NOW).recipients == (
        "b@example.org",
        "c@example.org",
        "d@example.org",
    )


def test_an_email_message_surely_too_large_is_refused_before_it_is_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An EmailMessage with a 60 MB attachment was written out whole by the stdlib (3 s of
    CPU, 250 MB more memory) before it was found over the 35 MiB limit, though an Email
    is refused before it is rendered and raw input before it is parsed. Its parts'
    payloads, held already encoded, are a lower bound on its size: past the limit it is
    now refused at once."""
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message.set_content("hi")
    message.add_attachment(bytes(3000), "application", "octet-stream", filename="a.bin")
    # Payloads: "hi" and its line end, 4,000 base64 characters in 53 lines: 4,056.
    assert prepare(message, now=NOW).size > 4056

    def serialise(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("a message known to be too large was written")

    monkeypatch.setattr(preparation, "serialise", serialise)
    with pytest.raises(MessageTooLarge, match="at least 4056 octets") as info:
        prepare(message, max_size=4055, now=NOW)
    assert (info.value.size, info.value.limit) == (4056, 4055)


def test_a_second_mime_version_field_is_refused() -> None:
    """A raw message with two MIME-Version fields was queued and sent, though RFC 2045 §4
    allows one in the message's header section; it is refused now, as a second Subject
    is. A MIME part may still carry its own."""
    data = TOP + b"MIME-Version: 1.0 (generated)\r\n\r\nbody\r\n"
    message = "2 MIME-Version header fields; RFC 2045 §4 allows one"
    with pytest.raises(InvalidMessage, match=message):
        prepare(data, now=NOW)
    assert prepare(TOP + b"\r\nbody\r\n", now=NOW)
    assert prepare(_multipart(b"MIME-Version: 1.0\r\nContent-Type: text/plain"), now=NOW)


_OCTETS = b"\x01\x02\r\x03\n\x04\r\n\x05"
"""Binary content: a bare CR, a bare LF and a CRLF among other octets."""
_BINARY_PART = (
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n" + _OCTETS
)


def _binary_email_message() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message.set_content("see the attachment\n")
    message.add_attachment(_OCTETS, "application", "octet-stream", cte="binary")
    return message


BARE_LINE_ENDS_IN_BINARY = {
    "raw": TOP + _BINARY_PART + b"\r\n",
    "raw part": (
        TOP + b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
        b"Content-Type: text/plain\r\n\r\nhello\r\n--B\r\n" + _BINARY_PART + b"\r\n--B--\r\n"
    ),
}


def _email_forwarding(attached: bytes) -> Email:
    forwarded = Attachment(filename="m.eml", content=attached, content_type="message/rfc822")
    return Email(from_="a@example.com", to="b@example.org", text="hi", attachments=[forwarded])


@pytest.mark.parametrize(
    "message",
    [
        *BARE_LINE_ENDS_IN_BINARY.values(),
        _binary_email_message(),
        _email_forwarding(BARE_LINE_ENDS_IN_BINARY["raw"]),
    ],
    ids=[*BARE_LINE_ENDS_IN_BINARY, "EmailMessage", "attached to an Email"],
)
def test_a_binary_part_with_a_bare_line_end_is_refused_not_altered(
    message: bytes | EmailMessage | Email,
) -> None:
    """A part labelled Content-Transfer-Encoding: binary holds octets, not lines (RFC 2045
    §2.9), so its bare CR and LF are content; every bare CR and LF of the message was made
    CRLF all the same, and the attachment arrived with other octets than it was given
    (``\\r\\x03\\n`` as ``\\r\\n\\x03\\r\\n``). Such content cannot be sent unchanged without
    BINARYMIME (RFC 3030), which is not used: it is refused, naming base64."""
    with pytest.raises(ForbiddenCharacter, match=r"binary.*bare CR or LF.*base64"):
        prepare(message, now=NOW)


def test_bare_line_ends_outside_a_binary_part_are_still_made_crlf() -> None:
    """What the refusal above leaves alone: LF line ends in a text part beside a binary
    part whose own line ends are CRLF, and a binary part without any line end."""
    data = (
        TOP + b'Content-Type: multipart/mixed; boundary="B"\n\n--B\n'
        b"Content-Type: text/plain\n\nhello\n--B\n"
        b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: binary\n\n"
        b"\x01\x02\r\n\x03\n--B--\n"
    )
    prepared = prepare(data, now=NOW)
    assert b"\r\n\r\nhello\r\n--B\r\n" in prepared.data
    assert b"\r\n\r\n\x01\x02\r\n\x03\r\n--B--\r\n" in prepared.data
    single = TOP.replace(b"\r\n", b"\n") + _BINARY_PART.replace(_OCTETS, b"\x01\x02")
    assert prepare(single.replace(b"\r\n", b"\n"), now=NOW).data.endswith(b"\r\n\r\n\x01\x02\r\n")


_ENDS_IN_CR = (
    b"From: a@example.com\nTo: b@example.org\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="B"\n\n--B\n'
    b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: binary\n\n"
    b"\x01\x02\r\n--B--\n"
)
"""A message whose line ends are LF with a binary part whose last octet is a CR."""


@pytest.mark.parametrize(
    "message",
    [_ENDS_IN_CR, _email_forwarding(_ENDS_IN_CR)],
    ids=["raw", "attached to an Email"],
)
def test_a_binary_part_ending_in_cr_in_an_lf_message_is_refused_not_cut(
    message: bytes | Email,
) -> None:
    """In a message whose line ends are LF, the CR before the LF that starts a
    delimiter line is the binary part's last octet; CR LF was read as one CRLF line end,
    so the part arrived one octet short (``\\x01\\x02`` for ``\\x01\\x02\\r``), as the
    property test of binary parts found. Sent unchanged, the CR would be a bare CR, which
    needs BINARYMIME (RFC 3030): it is refused, naming base64."""
    with pytest.raises(ForbiddenCharacter, match=r"binary.*bare CR or LF.*base64"):
        prepare(message, now=NOW)
    # In a message whose line ends are CRLF, that CR LF is the delimiter's line end.
    assert b"\r\n\r\n\x01\x02\r\n--B--\r\n" in prepare(to_crlf(_ENDS_IN_CR), now=NOW).data


_CR_BEFORE_BOUNDARY = (
    b"From: a@example.com\nTo: b@example.org\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="B"\n\n--B\n'
    b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: binary\n\n"
    b"\x01\r--B\n\x02\n--B--\n"
)
"""A binary part holding its own boundary right after a bare CR: one part to a reader of
LF line ends, whose CR is content."""


@pytest.mark.parametrize(
    "message",
    [
        _CR_BEFORE_BOUNDARY,
        _CR_BEFORE_BOUNDARY.replace(b"\n", b"\r\n"),
        _email_forwarding(_CR_BEFORE_BOUNDARY),
    ],
    ids=["LF line ends", "CRLF line ends", "attached to an Email"],
)
def test_a_bare_cr_in_a_binary_part_making_a_delimiter_is_refused(
    message: bytes | Email,
) -> None:
    """The bare CR in ``\\x01\\r--B`` was made a CRLF, which made ``--B`` a delimiter line:
    the part ended there, its CR was cut off, and ``\\x02`` was sent as another part (of
    text), a MIME structure other than the one given. A bare CR inside a binary part was
    refused already, but the part's end was found after the CR had become a line end, so
    it was no longer inside. It is refused now, naming base64."""
    with pytest.raises(ForbiddenCharacter, match=r"binary.*bare CR or LF.*base64"):
        prepare(message, now=NOW)


def _compat32_with_subject(subject: str) -> email.message.Message:
    message = email.message.Message()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message["Subject"] = subject
    message["Content-Type"] = "text/html"
    message.set_payload("<p>hi</p>")
    return message


WHITE_SPACE_LINES = {
    "raw": TOP + b"Subject: hi\r\n \r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n",
    "raw tab": TOP + b"Subject: hi\r\n\t \r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n",
    "compat32": _compat32_with_subject("hi\n "),
}


@pytest.mark.parametrize("message", WHITE_SPACE_LINES.values(), ids=WHITE_SPACE_LINES)
def test_a_header_line_of_only_white_space_is_joined_to_the_line_before(
    message: bytes | email.message.Message,
) -> None:
    """A folded line of only white space is obsolete syntax that RFC 5322 §4.2 and §4 say
    must not be generated, and readers differ on it: Ruby's mail gem and vmime end the
    header section there. It was sent as it came (a compat32 Subject "hi\\n " too, and the
    stdlib's own folding of a long run of spaces in a display name), so such a reader saw
    the fields below it, Content-Type and the Date and Message-ID added here, as body
    text. It is joined to the line before, which unfolds to the same value."""
    data = prepare(message, now=NOW).data
    head = data[: data.index(b"\r\n\r\n") + 2]
    assert re.search(rb"\n[ \t]+\r\n", head) is None
    assert re.search(rb"\r\nSubject: hi[ \t]+\r\nContent-Type: text/html\r\n", head)


def test_the_stdlib_s_white_space_line_in_a_display_name_is_joined() -> None:
    """The stdlib folds a quoted display name with a long run of spaces into a line of
    only white space; the message is sent without it, its To field reading the same."""
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = '"' + "x" * 90 + " " * 100 + 'y" <b@example.org>'
    message.set_content("hi")
    data = prepare(message, now=NOW).data
    head = data[: data.index(b"\r\n\r\n") + 2]
    assert re.search(rb"\n[ \t]+\r\n", head) is None
    assert re.search(rb"\n[ \t]+\r\n", message.as_bytes(policy=email.policy.SMTP))
    written = email.message_from_bytes(message.as_bytes(policy=email.policy.SMTP))
    parsed = email.message_from_bytes(data)
    unfolded = [re.sub(r"\r?\n", "", m["To"]) for m in (parsed, written)]
    assert unfolded[0] == unfolded[1]  # as sent, and as the stdlib wrote it


def test_a_part_header_line_of_only_white_space_is_refused() -> None:
    """In a MIME part's header section, which is body text sent as it came, such a line
    is refused, naming the field it is in."""
    data = _multipart(b"X-Note: a\r\n \r\nContent-Type: text/html")
    with pytest.raises(InvalidMessage, match=r"MIME part has a line of only white space.*X-Note"):
        prepare(data, now=NOW)
    # White space after text on a continuation line is folding as ever.
    assert prepare(TOP + b"Subject: hi\r\n there \r\n\r\nbody\r\n", now=NOW)


def _compat32_body(text: str) -> email.message.Message:
    message = email.message.Message()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message["Subject"] = "Grüße"
    message.set_payload(text)
    return message


def test_a_body_of_unencoded_non_ascii_text_is_refused_as_such() -> None:
    """A stdlib message whose payload is a str with non-ASCII characters and no charset
    (``set_payload("hé")`` without one) cannot be written; the stdlib's 'ascii' codec
    error came back as UnencodableHeader, "the message cannot be encoded", so that the
    caller looked for a bad header (here the Subject, which is fine). It is refused as
    the body it is, naming what encodes it."""
    with pytest.raises(InvalidMessage, match=r"text/plain part's body.*set_content") as caught:
        prepare(_compat32_body("h\u00e9"), now=NOW)
    assert not isinstance(caught.value, UnencodableHeader)
    assert prepare(_compat32_body("he"), now=NOW).data.endswith(b"\r\n\r\nhe\r\n")

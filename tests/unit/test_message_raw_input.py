"""Raw RFC 5322 input to ``prepare()``: what is refused at the boundary, and the header
fields and envelope a message that is accepted gets. One test per fault found."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mailstrom.errors import UnencodableHeader
from mailstrom.message import prepare

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

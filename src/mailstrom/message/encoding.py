"""Octet-level encoding: CRLF line endings, line-length limits, and the 8-bit downgrade."""

from __future__ import annotations

import io
from email import base64mime, policy, quoprimime
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from typing import Any

from mailstrom.errors import LineTooLong, UnencodableHeader

MAX_LINE = 998
"""Longest line RFC 5322 §2.1.1 allows, in octets, not counting the CRLF."""

_ENCODED_LINE = 76
"""Line length of quoted-printable and base64 output (RFC 2045 §6.7, §6.8)."""

# Headers are re-emitted exactly as parsed (no refolding), 8-bit headers included, so
# the downgrade changes nothing but the bodies that need it.
_PASSTHROUGH = policy.SMTP.clone(refold_source="none", utf8=True)


def to_crlf(data: bytes) -> bytes:
    """Return ``data`` with every line ending (CRLF, bare LF, bare CR) made CRLF.

    SMTP forbids bare CR and LF in content (RFC 5321 §2.3.8), so both become line ends.
    """
    crlf = data.count(b"\r\n")
    # Counting is several times cheaper than rewriting, and most input is already right.
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def check_line_lengths(data: bytes) -> None:
    """Raise :class:`LineTooLong` if a CRLF-separated line of ``data`` exceeds 998 octets."""
    if len(data) <= MAX_LINE:
        return
    for number, line in enumerate(data.split(b"\r\n"), start=1):
        if len(line) > MAX_LINE:
            raise LineTooLong(
                f"line {number} is {len(line)} octets long; RFC 5322 §2.1.1 allows at most "
                f"{MAX_LINE} (encode the body as quoted-printable or base64)"
            )


def downgrade_to_7bit(data: bytes) -> bytes:
    """Re-encode every 8-bit MIME part of ``data`` so the body is pure 7-bit.

    For servers that do not offer 8BITMIME (RFC 6152): a part whose
    Content-Transfer-Encoding is ``8bit``/``binary``, or whose content holds octets
    above 127, becomes quoted-printable (``text/*``) or base64 (anything else). Its
    decoded content is unchanged. Parts already 7-bit, and all headers, are left as
    they are. Input without 8-bit octets in the body is returned unchanged.
    """
    end = data.find(b"\r\n\r\n")
    if end == -1 or data[end:].isascii():
        return data
    message = BytesParser(policy=_PASSTHROUGH).parsebytes(data)
    for part in message.walk():
        _downgrade_part(part)
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_PASSTHROUGH).flatten(message)
    return to_crlf(out.getvalue())


def serialise(message: Message, *, utf8: bool) -> bytes:
    """Serialise a stdlib message with CRLF line endings (``email.policy.SMTP``).

    ``utf8`` writes non-ASCII headers as raw UTF-8 (RFC 6532) instead of RFC 2047 words.
    """
    out = io.BytesIO()
    generator: BytesGenerator[Any] = BytesGenerator(
        out, mangle_from_=False, policy=policy.SMTPUTF8 if utf8 else policy.SMTP
    )
    try:
        generator.flatten(message)
    except UnicodeEncodeError as exc:
        raise UnencodableHeader(f"the message cannot be encoded: {exc}") from exc
    return out.getvalue()


def _downgrade_part(part: Message) -> None:
    cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if part.is_multipart() or part.get_content_maintype() == "message":
        # Composite types may only be labelled 7bit/8bit/binary (RFC 2045 §6.4); their
        # children are downgraded on their own by the walk, so the label becomes 7bit.
        if cte in ("8bit", "binary"):
            part.replace_header("Content-Transfer-Encoding", "7bit")
        return
    if cte in ("quoted-printable", "base64"):
        return
    raw = part.get_payload(decode=True)
    assert isinstance(raw, bytes)
    if cte not in ("8bit", "binary") and raw.isascii():
        return
    if part.get_content_maintype() == "text":
        # quoprimime works on str of code points 0-255, one per octet: latin-1 is exact.
        encoded = quoprimime.body_encode(raw.decode("latin-1"), _ENCODED_LINE, "\r\n")
        new_cte = "quoted-printable"
    else:
        encoded = base64mime.body_encode(raw, _ENCODED_LINE, "\r\n")
        new_cte = "base64"
    part.set_payload(encoded)
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", new_cte)
    else:
        part["Content-Transfer-Encoding"] = new_cte

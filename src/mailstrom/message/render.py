"""Render a checked :class:`~mailstrom.message.builder.Draft` straight to bytes.

The MIME shape is the one the stdlib's ``EmailMessage`` content manager builds: text
and/or HTML (multipart/alternative), inline parts beside the HTML (multipart/related),
attachments around it all (multipart/mixed). Each part's Content-Transfer-Encoding is
chosen as the stdlib chooses it — 7bit for ASCII text with short lines, else
quoted-printable or base64, whichever is shorter on the first lines; base64 for
attachments — so the output is always 7-bit and a built message never needs 8BITMIME.
The encodings are the stdlib's (``email.quoprimime``, ``binascii``); the text of
headers comes from :mod:`mailstrom.message.words`.

Rules for message/* attachments, which cannot simply be base64-encoded:

- message/rfc822 must be 7bit, 8bit or binary (RFC 2046 §5.2.1): it is sent 7bit with
  CRLF line ends, its own 8-bit parts re-encoded by the downgrade. One whose headers are
  8-bit is refused with a pointer to message/global.
- message/global and its RFC 6533 siblings may be encoded (RFC 6532 §3.7): base64.
- any other message/* (delivery-status, partial, external-body…) must be 7-bit text.
"""

from __future__ import annotations

import binascii
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email import quoprimime

from mailstrom.errors import ForbiddenCharacter, InvalidAttachment
from mailstrom.message import mime
from mailstrom.message.addresses import extra_field, format_address_field
from mailstrom.message.bounds import MAX_PARTS, check_header_section, too_many_parts
from mailstrom.message.builder import Draft, Part
from mailstrom.message.chars import shorten
from mailstrom.message.encoding import (
    MAX_LINE,
    check_binary_line_ends,
    downgrade_to_7bit,
    encode_long_lines,
    fold_line,
    quoted_printable,
    to_crlf,
)
from mailstrom.message.headers import MAX_FIELD, check_field_size
from mailstrom.message.identification import format_date
from mailstrom.message.words import FOLD_AT, fold, parameter, unstructured_field

_GLOBAL = frozenset(
    {
        "message/global",
        "message/global-headers",
        "message/global-delivery-status",
        "message/global-disposition-notification",
    }
)


@dataclass(frozen=True, slots=True)
class _Node:
    """A rendered entity: its header fields (without CRLF) and its body."""

    fields: list[str]
    body: bytes


def render(
    draft: Draft,
    *,
    date: datetime,
    message_id: str,
    utf8: bool,
    boundary: Callable[[], str] | None = None,
) -> bytes:
    """The message as bytes: CRLF line ends, no Bcc, every field at most 64 KiB.

    ``utf8`` writes non-ASCII header text raw (RFC 6532) instead of as RFC 2047 words; it
    is set when an address needs SMTPUTF8 anyway. ``boundary`` makes multipart
    boundaries (default: random); a boundary found in a part's content is never used.
    """
    fields = [f"Date: {_date(draft.date or date)}"]
    for name, groups in (
        ("From", draft.fields.from_),
        ("Sender", draft.fields.sender),
        ("Reply-To", draft.fields.reply_to),
        ("To", draft.fields.to),
        ("Cc", draft.fields.cc),
    ):
        if groups:
            fields.append(format_address_field(name, groups, utf8=utf8))
    if draft.subject:
        fields.append(unstructured_field("Subject", draft.subject, utf8=utf8))
    fields.append(f"Message-ID: {message_id}")
    for name, value in draft.headers:
        fields.append(extra_field(name, value, utf8=utf8))
    if draft.provided:
        fields.extend(draft.provided)
    fields.append("MIME-Version: 1.0")
    top = _Builder(boundary or _random_boundary).tree(draft)
    fields.extend(top.fields)
    head = ("\r\n".join(fields) + "\r\n\r\n").encode("utf-8" if utf8 else "ascii")
    if len(head) > MAX_FIELD:  # only then can one field be too long
        _check_sizes(fields)
    # The bounds of raw input's header section (fields, octets): counted at C speed.
    check_header_section(head, 0, len(head) - 2, where="the header section")
    return head + top.body


def _check_sizes(fields: list[str]) -> None:
    for text in fields:
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        check_field_size(text.partition(":")[0], size)


_last_date: tuple[tuple[datetime | None, object], str] = ((None, None), "")


def _date(when: datetime) -> str:
    """:func:`~mailstrom.message.identification.format_date` of ``when``, remembered for
    the last second asked: messages submitted in a burst share it, and formatting costs
    more than the rest of a header."""
    global _last_date
    # The second itself, not int(timestamp()): that truncates toward zero, so 1969-12-31
    # 23:59:59.5 and the epoch shared a key. With the offset, equal keys format alike
    # (aware datetimes compare as instants, naive ones as wall times).
    key = (when.replace(microsecond=0), when.utcoffset())
    # Read once: threads share it, and one may replace it between two reads (comparing
    # the keys can run a Python zone's utcoffset()), giving this message its Date.
    last = _last_date
    if last[0] != key:
        last = _last_date = (key, format_date(when))
    return last[1]


def _random_boundary() -> str:
    # "=_" cannot occur in quoted-printable or base64 output; the check in _multipart
    # covers 7bit text.
    return "=_" + secrets.token_hex(12)


class _Builder:
    def __init__(self, boundary: Callable[[], str]) -> None:
        self.boundary = boundary
        self.has_message = False

    def tree(self, draft: Draft) -> _Node:
        text = None if draft.text is None else _text_part("plain", draft.text)
        html = None if draft.html is None else _text_part("html", draft.html)
        # multipart/related holds what the HTML refers to by cid: (RFC 2387), inline or
        # not (in multipart/mixed, readers that look among the related parts showed a
        # broken image); an inline part without a Content-ID cannot be referred to, and
        # is shown among the attachments (Content-Disposition: inline, RFC 2183).
        related: list[Part] = []
        others: list[Part] = []
        for part in draft.attachments:
            beside = html is not None and _related(part, draft.named)
            (related if beside else others).append(part)
        # Every entity counts against the bound raw input has, the multiparts and the
        # top one included: the leaves, related, alternative, mixed, or an empty text.
        entities = (
            len(draft.attachments)
            + (text is not None)
            + (html is not None)
            + bool(html is not None and related)
            + (text is not None and html is not None)
            + bool(others)
            + (text is None and html is None and not others)
        )
        if entities > MAX_PARTS:
            raise too_many_parts()
        if html is not None and related:
            parts = [html, *(self._attachment(a) for a in related)]
            html = self._multipart("related", parts, extra=(("type", "text/html"),))
        main = html if text is None else text if html is None else None
        if text is not None and html is not None:
            main = self._multipart("alternative", [text, html])
        if others:
            parts = [] if main is None else [main]
            parts.extend(self._attachment(a) for a in others)
            main = self._multipart("mixed", parts)
        if main is None:
            main = _text_part("plain", "")
        if self.has_message:
            # An attached message brings its own nesting; the whole must stay in bounds.
            mime.check_structure(_bytes(main))
        return main

    def _multipart(
        self, subtype: str, parts: list[_Node], extra: tuple[tuple[str, str], ...] = ()
    ) -> _Node:
        rendered = [_bytes(part) for part in parts]
        while True:
            boundary = self.boundary()
            delimiter = b"--" + boundary.encode("ascii")
            if not any(delimiter in part for part in rendered):
                break
        body = [delimiter + b"\r\n"]
        for index, part in enumerate(rendered):
            if index:
                body.append(b"\r\n" + delimiter + b"\r\n")
            body.append(part)
        body.append(b"\r\n" + delimiter + b"--\r\n")
        params = [f'boundary="{boundary}"', *(f'{name}="{value}"' for name, value in extra)]
        return _Node([_with_params("Content-Type", f"multipart/{subtype}", params)], b"".join(body))

    def _attachment(self, part: Part) -> _Node:
        content_type = part.content_type
        if content_type == "message/rfc822":
            self.has_message = True
            cte, body = "7bit", _attached_message(part)
        elif part.maintype == "message" and content_type not in _GLOBAL:
            cte, body = "7bit", _seven_bit(part)
        else:
            cte, body = "base64", _base64(part.content)
        params = [piece for name, value in _params(part) for piece in parameter(name, value)]
        disposition = "inline" if part.inline else "attachment"
        fields = [
            _with_params("Content-Type", content_type, params),
            f"Content-Transfer-Encoding: {cte}",
            _with_params("Content-Disposition", disposition, parameter("filename", part.filename)),
        ]
        if part.content_id is not None:
            fields.append(f"Content-ID: {part.content_id}")
        _check_sizes(fields)
        return _Node(fields, body)


def _related(part: Part, named: frozenset[str]) -> bool:
    """Whether ``part`` goes with the HTML in its multipart/related: it has a Content-ID,
    and is inline or the HTML names it (``named``: :attr:`Draft.named`)."""
    cid = part.content_id
    return cid is not None and (part.inline or cid[1:-1].lower() in named)


def _params(part: Part) -> tuple[tuple[str, str], ...]:
    """The Content-Type parameters of ``part``: the caller's, and for text whose octets
    are UTF-8 but not ASCII and whose charset is not given, ``charset=utf-8``.

    Text without a charset is US-ASCII (RFC 2046 §4.1.2), so readers (and the stdlib's
    ``get_content()``) showed such an attachment garbled. Octets that are not UTF-8 get
    no charset: it cannot be known, and a wrong one is no better than none.
    """
    params = part.params
    if part.maintype != "text" or part.content.isascii():
        return params
    if any(name == "charset" for name, _ in params):
        return params
    try:
        part.content.decode("utf-8")
    except UnicodeDecodeError:
        return params
    return (*params, ("charset", "utf-8"))


def _with_params(name: str, value: str, params: list[str]) -> str:
    """``Name: value; p1; p2`` folded between parameters."""
    items = [value, *params]
    last = len(items) - 1
    pieces = [(" ", item + (";" if index < last else "")) for index, item in enumerate(items)]
    return fold(f"{name}:", pieces)


def _bytes(node: _Node) -> bytes:
    head = "\r\n".join(node.fields) + "\r\n\r\n"
    return head.encode("ascii") + node.body


def _text_part(subtype: str, text: str) -> _Node:
    cte, body = encode_text(text)
    return _Node(
        [f'Content-Type: text/{subtype}; charset="utf-8"', f"Content-Transfer-Encoding: {cte}"],
        body,
    )


def encode_text(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, body) for a text part, as the stdlib content manager
    chooses: 7bit when ASCII with lines of at most 78, else quoted-printable or base64,
    whichever is shorter on the first ten lines.

    Only CR, LF and CRLF end lines (the stdlib's ``splitlines`` would also break at VT,
    FF, NEL and U+2028, changing the text). The body ends with a line break. A NUL is
    never sent raw: it is not allowed in 7bit data (RFC 2045 §2.7), so it forces
    quoted-printable or base64.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    data = text.replace("\n", "\r\n").encode("utf-8")
    # The longest line by split: a search for 79 characters without LF took ~25 times
    # as long (2.9 ms of a 100 KB body), trying the pattern at every character.
    if data.isascii() and b"\0" not in data and max(map(len, text.split("\n"))) <= FOLD_AT:
        return "7bit", data
    end = -1
    for _ in range(_SNIFF_LINES):
        end = data.find(b"\n", end + 1)
        if end == -1:
            break
    sniff = data if end == -1 else data[: end + 1]
    if not _qp_may_be_longer(sniff):
        return "quoted-printable", quoted_printable(data)
    # Measured exactly as the stdlib measures (LF line ends, 78-character lines), so the
    # choice is the same; the encoding itself has CRLF and 76-character lines.
    sniff_qp = quoprimime.body_encode(sniff.decode("latin-1"), FOLD_AT)
    if len(sniff_qp) > len(binascii.b2a_base64(sniff)):
        return "base64", _base64(data)
    return "quoted-printable", quoted_printable(data)


_SNIFF_LINES = 10
"""Lines the stdlib's content manager encodes both ways to choose between them."""
_QP_PLAIN = bytes(range(32, 127)).replace(b"=", b"") + b"\t\r\n"
"""Octets that quoted-printable writes as themselves (line ends aside, as quoprimime)."""


def _qp_may_be_longer(sniff: bytes) -> bool:
    """False when quoted-printable of ``sniff`` (CRLF lines) surely is no longer than its
    base64, so the stdlib would choose it; True when only encoding it can tell.

    An upper bound on quoprimime's length at 78 characters a line: every octet it escapes
    takes 3 characters; a line breaks softly ("=" and LF) at least every 75 characters,
    once more at its end; white space ending a line costs at most 4 more; LF ends each
    line. Plain text with long lines is far below base64's 4/3, and the bound skips
    encoding the sniffed lines a second time.
    """
    lines = sniff.count(b"\n")
    escaped = len(sniff.translate(None, _QP_PLAIN))
    chars = len(sniff) - 2 * lines + 2 * escaped
    bound = chars + 2 * (chars // (FOLD_AT - 3) + lines) + 5 * lines
    return bound > 4 * ((len(sniff) + 2) // 3) + 1


def _base64(data: bytes) -> bytes:
    """Base64 in CRLF-ended lines of 76 characters (RFC 2045 §6.8)."""
    encoded = binascii.b2a_base64(data, newline=False)
    if not encoded:
        return b""
    return b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + b"\r\n"


def attached_message(content: bytes) -> bytes:
    """``content``, a message attached as message/rfc822, as it is sent: CRLF line ends,
    its 8-bit bodies re-encoded (the downgrade). It is 7-bit unless a header section in
    it, its own or a part's, is 8-bit (RFC 6532), which only message/global may carry.

    A message saved as it arrived may have lines over 998 octets (a one-line HTML body,
    an unfolded Subject), which it may not be sent with: each such body is encoded and
    each such header line folded, as for sendmail input; the content reads the same."""
    return downgrade_to_7bit(encode_long_lines(to_crlf(content)))


def _attached_message(part: Part) -> bytes:
    check_binary_line_ends(part.content)
    content = attached_message(part.content)
    if b"\0" in content:
        raise ForbiddenCharacter(
            f"attachment {shorten(part.filename)} (message/rfc822) holds a NUL octet, which "
            "7bit data may not carry (RFC 2045 §2.7)",
            where=part.filename,
        )
    if not content.isascii():
        raise InvalidAttachment(
            f"attachment {shorten(part.filename)} is a message/rfc822 with 8-bit (UTF-8) "
            "headers; it may not be encoded (RFC 2046 §5.2.1), so attach it as "
            "message/global (RFC 6532 §3.7)",
            filename=part.filename,
        )
    return content


def _seven_bit(part: Part) -> bytes:
    content = to_crlf(part.content)
    if not content.isascii() or b"\0" in content:
        raise InvalidAttachment(
            f"attachment {shorten(part.filename)} is {part.content_type}, which must be 7-bit "
            "text without NUL (RFC 2046 §5.2); use its message/global-* form for UTF-8",
            filename=part.filename,
        )
    if part.content_type in _FIELDS_ONLY and len(content) > MAX_LINE:
        # A Diagnostic-Code quoting a remote server's long reply: folded as a header
        # line is (RFC 5322 §2.2.3), since the part may not be encoded.
        lines = content.split(b"\r\n")
        content = b"\r\n".join(piece for line in lines for piece in fold_line(line))
    if len(content) > MAX_LINE:
        _check_seven_bit_lines(part, content)
    return content


def _check_seven_bit_lines(part: Part, content: bytes) -> None:
    """:class:`InvalidAttachment` when a line of ``content``, a message/* part sent as it
    is, is over :data:`MAX_LINE` octets: no encoding may shorten it (RFC 2046 §5.2)."""
    for number, line in enumerate(content.split(b"\r\n"), start=1):
        if len(line) > MAX_LINE:
            raise InvalidAttachment(
                f"attachment {shorten(part.filename)} is {part.content_type}, which may not "
                f"be encoded (RFC 2046 §5.2), and its line {number} is {len(line)} octets "
                f"long; RFC 5322 §2.1.1 allows at most {MAX_LINE}: shorten it, or attach "
                "it as application/octet-stream",
                filename=part.filename,
            )


_FIELDS_ONLY = frozenset(
    {"message/delivery-status", "message/disposition-notification", "message/feedback-report"}
)
"""message/* types whose body is groups of header fields (RFC 3464 §2, RFC 8098 §3.1,
RFC 5965 §3), so a long line may be folded."""

"""Octet-level encoding: CRLF line endings, line-length limits, and the 8-bit downgrade."""

from __future__ import annotations

import binascii
import io
import re
import sys
from email import base64mime, quoprimime
from email.generator import BytesGenerator
from email.header import Header
from email.headerregistry import AddressHeader, BaseHeader, UnstructuredHeader
from email.message import Message
from email.policy import EmailPolicy
from typing import Any

from mailstrom.errors import (
    InvalidMessage,
    LineTooLong,
    MailstromError,
    UnencodableHeader,
)
from mailstrom.message import mime
from mailstrom.message.addresses import (
    ADDRESS_FIELDS,
    DROPPED_FIELDS,
    EXTRA_ADDRESS_FIELDS,
    extra_field,
    format_address_field,
    parse_address_list,
)
from mailstrom.message.bounds import structured_tokens
from mailstrom.message.chars import shorten
from mailstrom.message.policies import HEADER_FACTORY
from mailstrom.message.words import unstructured_field

MAX_LINE = 998
"""Longest line RFC 5322 §2.1.1 allows, in octets, not counting the CRLF."""

ENCODED_LINE = 76
"""Line length of quoted-printable and base64 output (RFC 2045 §6.7, §6.8)."""


def to_crlf(data: bytes) -> bytes:
    """Return ``data`` with every line ending (CRLF, bare LF, bare CR) made CRLF.

    SMTP forbids bare CR and LF in content (RFC 5321 §2.3.8), so both become line ends.
    A CR right before an LF is read as part of one CRLF line end whatever the rest of the
    message's line ends are, as Postfix's sendmail reads it by default
    (``sendmail_fix_line_endings = always``): a text file with CRLF line ends in a message
    written with LF ones keeps its lines, not one empty line more after each. That reading
    is a guess only where the octets are not lines, in a binary part: its last octet
    being a CR before the LF that starts a delimiter line, in a message with a bare LF,
    is refused (:func:`bare_line_ends`), not cut off.
    """
    # Counting is several times cheaper than rewriting, and most input is already right.
    if not has_bare_line_end(data):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def has_bare_line_end(data: bytes) -> bool:
    """Whether ``data`` holds a CR or an LF that is not part of a CRLF."""
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


def bare_line_ends(data: bytes, offset: int = 0) -> bytes | None:
    """Where :func:`to_crlf` makes a bare CR or LF of ``data`` a CRLF: None when it holds
    none, else octets laid over ``to_crlf(data)`` (placed at ``offset`` of a buffer, with
    the ``offset`` octets before it NUL), for :func:`~mailstrom.message.mime.check_structure`'s
    check of binary parts: an LF at each line end made of a bare CR or LF and nowhere else,
    and a CR first in each line end whose CR may be content.

    A bare CR is content to a reader of lines that end in LF (Postfix's), and a line end to
    :func:`to_crlf` (and the stdlib): made CRLF it reads CR LF, and NUL LF where a bare LF
    was. Where ``data`` holds a bare LF, its line ends are LF (some of them at least), so a
    CR before an LF may be content too: each CRLF it held reads CR NUL, else NUL NUL.
    Inside a binary part's body a CR that is content is sent as it came in a CRLF; right
    after one, where a delimiter line starts, it would be cut off the part, or (a bare CR)
    have made that delimiter line of content."""
    if not has_bare_line_end(data):
        return None
    kept = b"\0\0" if data.count(b"\n") == data.count(b"\r\n") else b"\r\0"
    # Bare LFs first: the NUL LF they become holds no CR for the bare CRs' replace.
    bare = kept.join(
        piece.replace(b"\n", b"\0\n").replace(b"\r", b"\r\n") for piece in data.split(b"\r\n")
    )
    return b"\0" * offset + bare if offset else bare


def check_binary_line_ends(data: bytes) -> None:
    """Raise :class:`ForbiddenCharacter` if :func:`to_crlf` would change the body of a
    part of ``data`` labelled ``Content-Transfer-Encoding: binary``: for content whose
    structure is checked later, as part of a whole (an attached message); a whole message
    has this checked by :func:`~mailstrom.message.mime.check_structure`.

    Binary data is octets, not lines (RFC 2045 §2.9): a bare CR or LF in it is content,
    which only BINARYMIME (RFC 3030) can carry, and made CRLF it arrived as other octets.
    Elsewhere a bare line end is a line end, and CRLF is its form on the wire.
    """
    bare = bare_line_ends(data)
    if bare is None:
        return
    content_type = mime.binary_with_bare_line_end(to_crlf(data), bare)
    if content_type is not None:
        raise mime.binary_line_end(content_type)


def check_line_lengths(data: bytes) -> None:
    """Raise :class:`LineTooLong` if a CRLF-separated line of ``data`` exceeds 998 octets."""
    if len(data) <= MAX_LINE:
        return
    lines = data.split(b"\r\n")
    if max(map(len, lines)) <= MAX_LINE:
        return
    blank = lines.index(b"") if b"" in lines else len(lines)
    offset = 0
    for number, line in enumerate(lines, start=1):
        if len(line) > MAX_LINE:
            # In a header section: which field it belongs to, not body advice.
            field = next((f for f in reversed(lines[:number]) if f[:1] not in (b" ", b"\t")), line)
            key = field.partition(b":")[0]
            name = shorten(key, 40)
            sections = key.strip().lower() in (b"content-type", b"content-disposition")
            if number <= blank:
                advice = _header_advice(line, f"the header field {name}", sections)
            elif mime.in_part_header_section(data, offset):
                where = f"the header field {name} of a MIME part"
                advice = _header_advice(line, where, sections)
            elif (ignored := mime.ignored_text(data, offset)) is not None:
                # Readers ignore it (RFC 2046 §5.1.1), and it can carry no encoding.
                advice = f"in the {ignored} of a multipart, which readers ignore; shorten it"
            else:
                advice = "encode the body as quoted-printable or base64"
            raise LineTooLong(
                f"line {number} is {len(line)} octets long; RFC 5322 §2.1.1 allows at most "
                f"{MAX_LINE} ({advice})"
            )
        offset += len(line) + 2


_FOLD_POINT = re.compile(rb"(?=[ \t])")
"""Where folding may break a header line: before white space (RFC 5322 §2.2.3)."""


def _header_advice(line: bytes, field: str, sections: bool) -> str:
    """What to do about a header ``line`` over 998 octets in ``field``: fold it, unless a
    piece of it between two places folding may break at is too long itself (a msg-id,
    a long word), which no folding makes fit. ``sections``: the field has MIME parameters,
    which RFC 2231 §3 can split (a long filename)."""
    longest = max(_FOLD_POINT.split(line), key=len)
    if len(longest) <= MAX_LINE:
        return f"in {field}; fold it"
    word = len(longest.lstrip(b" \t"))
    remedy = (
        "shorten it, or split a long parameter into RFC 2231 sections" if sections else "shorten it"
    )
    return (
        f"{field} holds a word of {word} octets, and folding breaks a line only at white "
        f"space; {remedy}"
    )


def quoted_printable(data: bytes) -> bytes:
    """``data`` (CRLF line ends) as quoted-printable with CRLF lines of at most 76."""
    # quoprimime works on str of code points 0-255, one per octet: latin-1 is exact. It
    # encodes every octet but CR and LF outside printable ASCII before it splits lines,
    # so only CRLF breaks lines.
    text = quoprimime.body_encode(data.decode("latin-1"), ENCODED_LINE, "\r\n")
    return text.encode("ascii")


def base64_lines(data: bytes) -> bytes:
    """``data`` as base64 in CRLF lines of 76 characters."""
    return base64mime.body_encode(data, ENCODED_LINE, "\r\n").encode("ascii")


def downgrade_to_7bit(data: bytes) -> bytes:
    """Re-encode what is 8-bit in the body of ``data`` so that the body is pure 7-bit.

    For servers that do not offer 8BITMIME (RFC 6152). Header sections, the top one and
    those of MIME parts, are left as they are: 8-bit headers are RFC 6532 headers, which
    :func:`prepare` marks as needing SMTPUTF8, and a server offering SMTPUTF8 also takes
    8BITMIME (RFC 6531 §3.1), so such a message is never downgraded. In the body:

    - a leaf part holding octets above 127 is re-encoded: quoted-printable for ``text/*``,
      base64 otherwise, and for text whose quoted-printable would start a line with
      "--" that no line started before (it could read as a delimiter). That includes
      parts *labelled* quoted-printable or base64 that nevertheless hold raw 8-bit
      octets: they are decoded as a lenient reader would (RFC 2045 §6.7, §6.8) and
      encoded again. Their decoded content is unchanged.
    - multipart and message/rfc822 parts are walked into; a ``8bit``/``binary`` label on
      them becomes ``7bit`` (RFC 2045 §6.4 allows no other encoding on them).
    - a message/rfc822 part whose own headers are 8-bit cannot be made 7-bit as
      message/rfc822 (RFC 2046 §5.2.1 forbids encoding it), so it becomes message/global,
      which may be base64-encoded (RFC 6532 §3.7).
    - 8-bit preambles and epilogues, which readers ignore, are dropped.

    Never raises: malformed structure is treated as opaque content. Input whose body is
    already 7-bit is returned unchanged (the same object).
    """
    data = to_crlf(data)
    top = mime.entity(data)
    if data[top.body :].isascii():
        return data
    # One list of pieces for the whole message, joined once: a nested part's bytes were
    # copied again at every level above it (20 MB under 99 levels: seconds of the
    # worker's event loop, which runs this).
    pieces: list[bytes] = []
    _downgrade(top, depth=0, out=pieces, ascii=_AsciiMap(data))
    if pieces[0] != top.head and not _has_field(top.head, b"mime-version"):
        # A re-encoded body needs MIME to be understood (RFC 2045 §4).
        pieces[0] = _with_field(pieces[0], "MIME-Version", "1.0")
    return b"".join(pieces)


class _AsciiMap:
    """Which stretches of a message are ASCII, answered without copying them: slicing and
    scanning each nested part's body again at every level above it cost 19 ms per level
    for a 20 MB body (2 s under 99 levels)."""

    _CHUNK = 1 << 16

    def __init__(self, data: bytes) -> None:
        self._data = data
        size = self._CHUNK
        self._chunks = [data[i : i + size].isascii() for i in range(0, len(data), size)]

    def ascii(self, start: int, end: int) -> bool:
        """Whether ``data[start:end]`` is ASCII: the whole chunks inside it by the map,
        the two ends by a scan of at most a chunk each."""
        first, last = -(-start // self._CHUNK), end // self._CHUNK
        data = self._data
        if first >= last:
            return data[start:end].isascii()
        return (
            all(self._chunks[first:last])
            and data[start : first * self._CHUNK].isascii()
            and data[last * self._CHUNK : end].isascii()
        )


def _downgrade(item: mime.Entity, *, depth: int, out: list[bytes], ascii: _AsciiMap) -> None:
    """Append the header section of ``item`` and then its body, made 7-bit, to ``out``."""
    data = item.data
    head = item.head
    if ascii.ascii(item.body, item.end):
        out += (head, data[item.body : item.end])
        return
    if depth >= mime.MAX_DEPTH + 2:
        # Deeper than anything prepare() accepts; still never raise: opaque content.
        out += _opaque(head, "application/octet-stream", data[item.body : item.end])
        return
    if item.maintype == "multipart" or item.nested:
        at = len(out)
        out.append(head)
        if item.nested:
            inner = mime.entity(data, item.body, item.end)
            if not inner.head.isascii():
                del out[at:]
                out += _opaque(head, "message/global", data[item.body : item.end])
                return
            _downgrade(inner, depth=depth + 1, out=out, ascii=ascii)
        else:
            found = mime.layout(item)
            if found is None:
                del out[at:]
                out += _opaque(head, "application/octet-stream", data[item.body : item.end])
                return
            _downgrade_parts(item, found, depth, out, ascii)
        if item.cte in ("8bit", "binary"):
            out[at] = _with_field(head, "Content-Transfer-Encoding", "7bit")
        return
    raw = _decoded(item.cte, data[item.body : item.end])
    encoded = quoted_printable(raw) if item.maintype == "text" else None
    if encoded is not None and not _new_dash_lines(encoded, decoded=item.cte in _DECODED):
        out += (_with_field(head, "Content-Transfer-Encoding", "quoted-printable"), encoded)
        return
    # Not text; or "--" would start a line it did not start before, where it could be a
    # delimiter of an enclosing multipart, ending this part early and making the rest a
    # part of the sender's making. Base64 has no "-".
    out += (_with_field(head, "Content-Transfer-Encoding", "base64"), base64_lines(raw))


def _new_dash_lines(encoded: bytes, *, decoded: bool) -> bool:
    """Whether a line of ``encoded`` (quoted-printable) may start with "--" where the body
    it replaces had none: after a soft line break (the text chose where it falls), or
    anywhere when the body was decoded first (``=2D-BOUND`` or base64 became "--BOUND").
    The lines of a body sent as it came are its own: those it had were no delimiters."""
    if b"=\r\n--" in encoded:
        return True
    return decoded and (encoded.startswith(b"--") or b"\n--" in encoded)


def _downgrade_parts(
    item: mime.Entity, found: mime.Layout, depth: int, pieces: list[bytes], ascii: _AsciiMap
) -> None:
    """Append the body of the multipart ``item`` (laid out as ``found``), made 7-bit."""
    data = item.data
    position = item.body
    default = "message/rfc822" if item.content_type == "multipart/digest" else "text/plain"
    start, end = found.preamble
    pieces.append(b"" if not data[start:end].isascii() else data[start:end])
    position = end
    for start, end in found.parts:
        if start > end:
            # No part between two delimiter lines in a row: the CRLF ending the first
            # also begins the second, and is written once.
            continue
        pieces.append(data[position:start])  # the delimiter line
        part = mime.entity(data, start, end, default=default)
        _downgrade(part, depth=depth + 1, out=pieces, ascii=ascii)
        position = end
    if found.epilogue is None:
        pieces.append(data[position : item.end])
    else:
        start, end = found.epilogue
        pieces.append(data[position:start])  # the close delimiter line
        if data[start:end].isascii():
            pieces.append(data[start:end])


_DECODED = ("quoted-printable", "base64")
"""The encodings :func:`_decoded` undoes."""


def _decoded(cte: str, body: bytes) -> bytes:
    """The octets a lenient reader gets from ``body``."""
    if cte == "quoted-printable":
        # Raw 8-bit octets in quoted-printable data are kept as they are (RFC 2045 §6.7).
        return binascii.a2b_qp(body)
    if cte == "base64":
        # Characters outside the base64 alphabet are ignored (RFC 2045 §6.8); padding is
        # made right again, and a lone trailing character (no whole octet) dropped.
        cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", body)
        extra = len(cleaned) % 4
        if extra == 1:
            cleaned = cleaned[:-1]
        elif extra:
            cleaned += b"=" * (4 - extra)
        return binascii.a2b_base64(cleaned)
    # 7bit/8bit/binary, or an encoding we do not know: the octets are the content.
    return body


def _opaque(head: bytes, content_type: str, body: bytes) -> tuple[bytes, bytes]:
    head = _with_field(head, "Content-Type", content_type)
    return _with_field(head, "Content-Transfer-Encoding", "base64"), base64_lines(body)


def _with_field(head: bytes, name: str, value: str) -> bytes:
    """``head`` (a header section ending with its empty line, or empty) with the field
    ``name`` (and its continuation lines) replaced by ``name: value``, or appended."""
    lines = head.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if lines and lines[-1] == b"":
        lines.pop()
    key = name.lower().encode("ascii")
    out: list[bytes] = []
    skipping = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == key
        if not skipping:
            out.append(line)
    out.append(f"{name}: {value}".encode("ascii"))
    return b"\r\n".join(out) + b"\r\n\r\n"


def _has_field(head: bytes, key: bytes) -> bool:
    return any(
        line.split(b":", 1)[0].strip().lower() == key
        for line in head.split(b"\r\n")
        if line[:1] not in (b" ", b"\t")
    )


def encode_long_lines(data: bytes, *, keep_signed: bool = False) -> bytes:
    """``data`` with each body that has a line over 998 octets (RFC 5322 §2.1.1) encoded:
    quoted-printable for text, base64 otherwise, as a part that carries no encoding
    (7bit, 8bit, binary) may be, the message itself, a part of its multiparts or of a
    message/rfc822 part (which then says ``MIME-Version: 1.0``); and each header line
    over 998 octets, of the message or of a part, folded at white space within it
    (:func:`fold_line`). Programs hand sendmail such mail as it is (PHP's mail() with its
    HTML on one line, cron and logwatch with a long log line, a forwarded message),
    Postfix and Sendmail send it on, and prepare() refused it (exit 65: the mail was
    lost). A base64 or quoted-printable body with such a line is put in lines of 76
    characters, and such a line of a multipart's preamble or epilogue, which readers
    ignore, is broken (:func:`_break_ignored`). The content is unchanged: a reader
    unfolds and decodes it. Anything else (a header line without white space to fold
    at) is left as it was, for prepare() to judge.

    ``keep_signed`` raises :class:`LineTooLong` for such a line in signed content, which
    must go as it was signed: the first part of a multipart/signed (RFC 1847 §2.1, its
    header section included), and a message, the top one or an attached one, with a
    DKIM-Signature or ARC-Message-Signature field (RFC 6376 §3.7, RFC 8617 §4.1.2: a hash
    of its body and of header fields). Re-encoded, its signature no longer verifies."""
    if len(data) <= MAX_LINE:
        return data
    crlf = to_crlf(data)
    if not _LONG_LINE.search(crlf):
        return data
    from mailstrom.message.headers import split_header_section  # it imports this module

    try:
        split_header_section(crlf)
    except InvalidMessage:
        return data  # prepare() refuses it with the reason
    pieces: list[bytes] = []
    if not _message(mime.entity(crlf), depth=0, out=pieces, keep_signed=keep_signed):
        return data
    return b"".join(pieces)


_BODY_SIGNATURES = (b"dkim-signature", b"arc-message-signature")
"""Header fields whose signature covers the message's body (RFC 6376, RFC 8617)."""


def has_body_signature(data: bytes) -> bool:
    """Whether the top header section of ``data`` (CRLF line ends) has a field whose
    signature covers the body (:data:`_BODY_SIGNATURES`): a body that must go as it is."""
    end = data.find(b"\r\n\r\n")
    return _signs_body(data if end < 0 else data[: end + 2])


def _signs_body(head: bytes) -> bool:
    """Whether header section ``head`` has a field of :data:`_BODY_SIGNATURES`."""
    return any(_has_field(head, name) for name in _BODY_SIGNATURES)


def _refuse_signed(data: bytes, start: int, end: int, what: str) -> None:
    """Raise :class:`LineTooLong` for the first line over :data:`MAX_LINE` octets in
    ``data[start:end]``, signed content (``what``), if it has one."""
    found = _LONG_LINE.search(data, start, end)
    if found is None:
        return
    number = data.count(b"\r\n", 0, found.start()) + 1
    stop = data.find(b"\r\n", found.start())
    size = (len(data) if stop < 0 else stop) - found.start()
    raise LineTooLong(
        f"line {number} is {size} octets long; RFC 5322 §2.1.1 allows at most {MAX_LINE}, "
        f"and it is in {what}, which cannot be re-encoded without breaking the signature; "
        "encode it as quoted-printable or base64 before it is signed"
    )


_LONG_LINE = re.compile(rb"(?<![^\r\n])[^\r\n]{%d}" % (MAX_LINE + 1))
"""A line over 998 octets, tried at line starts only: unanchored, the pattern was tried at
every octet and ran to the line's end each time, its work the sum of the squares of the
line lengths (20 MB of 998-octet lines: 40 s)."""
_FOLDED = 1
_ENCODED = 2


def _message(item: mime.Entity, *, depth: int, out: list[bytes], keep_signed: bool) -> int:
    """:func:`_encode_entity` for a message (the top one, or one attached), which says
    ``MIME-Version: 1.0`` when a body in it was encoded: an encoding is read under MIME
    (RFC 2045 §4)."""
    if keep_signed and _signs_body(item.head):
        what = "a message with a DKIM-Signature or ARC-Message-Signature field"
        _refuse_signed(item.data, item.start, item.end, what)
    at = len(out)
    done = _encode_entity(item, depth=depth, out=out, keep_signed=keep_signed)
    if done & _ENCODED and not _has_field(item.head, b"mime-version"):
        out[at] = _with_field(out[at], "MIME-Version", "1.0")
    return done


def _encode_entity(item: mime.Entity, *, depth: int, out: list[bytes], keep_signed: bool) -> int:
    """Append the header section and the body of ``item`` to ``out``, header lines over
    :data:`MAX_LINE` folded and a body with such a line encoded where it may be; what was
    done (:data:`_FOLDED`, :data:`_ENCODED`, or 0)."""
    data = item.data
    head = _fold_head(item.head)
    done = _FOLDED if head != item.head else 0
    if _LONG_LINE.search(data, item.body, item.end) and depth < mime.MAX_DEPTH:
        found = mime.layout(item) if item.maintype == "multipart" else None
        signed = keep_signed and item.content_type == "multipart/signed"
        if signed and found is not None and found.parts:
            # The second part is the signature, over the first as it is.
            start, end = found.parts[0]
            what = "the signed part of a multipart/signed (RFC 1847 §2.1)"
            _refuse_signed(data, start, end, what)
        if found is not None:
            out.append(head)
            # Readers ignore the preamble and the epilogue (RFC 2046 §5.1.1), which no
            # encoding can be given: a long line of theirs is broken.
            preamble = _break_ignored(data[found.preamble[0] : found.preamble[1]])
            out.append(preamble)
            done |= _FOLDED if len(preamble) != found.preamble[1] - found.preamble[0] else 0
            position = found.preamble[1]
            for start, end in found.parts:
                if start > end:
                    continue  # no part between two delimiter lines (see mime.layout)
                out.append(data[position:start])  # the delimiter line
                part = mime.entity(data, start, end, default=_part_default(item))
                done |= _encode_entity(part, depth=depth + 1, out=out, keep_signed=keep_signed)
                position = end
            if found.epilogue is None:
                out.append(data[position : item.end])
                return done
            epilogue = _break_ignored(data[found.epilogue[0] : found.epilogue[1]])
            out += (data[position : found.epilogue[0]], epilogue)  # the close delimiter
            return done | (_FOLDED if len(epilogue) != item.end - found.epilogue[0] else 0)
        if item.nested:  # message/rfc822 (RFC 2046 §5.2.1 allows it no encoding itself)
            out.append(head)
            attached = mime.entity(data, item.body, item.end)
            return done | _message(attached, depth=depth + 1, out=out, keep_signed=keep_signed)
        # Two encodings named (repeated): which one holds is prepare()'s to say.
        leaf = item.maintype not in ("multipart", "message")
        if leaf and item.cte in _UNENCODED and not item.repeated:
            raw = data[item.body : item.end]
            text = quoted_printable(raw) if item.maintype == "text" else None
            # Inside a multipart, a soft line break could start a line with "--": a
            # delimiter, maybe. Base64 has no "-".
            if text is not None and not (depth and b"=\r\n--" in text):
                cte, encoded = "quoted-printable", text
            else:
                cte, encoded = "base64", base64_lines(raw)
            out += (_with_field(head, "Content-Transfer-Encoding", cte), encoded)
            return done | _ENCODED
        if leaf and item.cte == "quoted-printable" and not item.repeated:
            # Quoted-printable without soft line breaks: they are added (RFC 2045 §6.7),
            # so the text decodes the same.
            wrapped = _soft_breaks(data[item.body : item.end])
            if wrapped is not None:
                out += (head, wrapped)
                return done | _FOLDED
        if leaf and item.cte == "base64" and not item.repeated:
            # Base64 on one line (PHP's base64_encode() without chunk_split()): in lines
            # of 76 characters (RFC 2045 §6.8). Decoders skip line breaks, so the content
            # is the same. With a "-", which is no base64, a new line could start with a
            # delimiter: left as it was.
            chars = b"".join(data[item.body : item.end].split())
            if b"-" not in chars:
                size = ENCODED_LINE
                lines = [chars[i : i + size] for i in range(0, len(chars), size)]
                out += (head, b"\r\n".join(lines) + b"\r\n")
                return done | _FOLDED
    out += (head, data[item.body : item.end])
    return done


def _break_ignored(text: bytes) -> bytes:
    """``text``, a preamble or an epilogue (CRLF lines), with each line over
    :data:`MAX_LINE` broken as Postfix breaks one (``smtp_line_length_limit``): by CRLF and
    a space, so that no new line can be a delimiter line; ``text`` itself when none is
    that long. Readers ignore the text (RFC 2046 §5.1.1); a line may not be longer."""
    if len(text) <= MAX_LINE or not _LONG_LINE.search(text):
        return text
    out: list[bytes] = []
    for line in text.split(b"\r\n"):
        out.append(line[:MAX_LINE])
        size = MAX_LINE - 1  # after the space
        out.extend(b" " + line[i : i + size] for i in range(MAX_LINE, len(line), size))
    return b"\r\n".join(out)


def _soft_breaks(body: bytes) -> bytes | None:
    """The quoted-printable ``body`` (CRLF lines) with each line over 76 characters
    broken by soft line breaks (``=`` CRLF, RFC 2045 §6.7 rule 5), never inside an
    ``=XX`` escape nor before ``--`` (a new line starting so could be a delimiter); None
    when a line cannot be broken so (a run of "-")."""
    out: list[bytes] = []
    for line in body.split(b"\r\n"):
        start = 0  # offsets, not slices: a 10 MB line is not copied for every cut
        while len(line) - start > ENCODED_LINE:
            cut = start + ENCODED_LINE - 1  # room for the "="
            while cut > start and (
                line.find(b"=", max(cut - 2, start), cut) >= 0 or line.startswith(b"--", cut)
            ):
                cut -= 1
            if cut == start:
                return None
            out.append(line[start:cut] + b"=")
            start = cut
        out.append(line[start:])
    return b"\r\n".join(out)


def _fold_head(head: bytes) -> bytes:
    """The header section ``head`` (CRLF lines) with each line over :data:`MAX_LINE`
    folded (:func:`fold_line`); ``head`` itself when none is."""
    if not _LONG_LINE.search(head):
        return head
    return b"\r\n".join(piece for line in head.split(b"\r\n") for piece in fold_line(line))


def fold_line(line: bytes) -> list[bytes]:
    """``line`` as lines of at most :data:`MAX_LINE` octets, each but the first starting
    with the white space it was folded before; as far as it can be folded."""
    out = []
    start = 0  # offsets, not slices: a long line was copied once a fold (4 MB: 0.3 s)
    while len(line) - start > MAX_LINE:
        end = start + MAX_LINE + 1
        cut = max(line.rfind(b" ", start + 1, end), line.rfind(b"\t", start + 1, end))
        if cut <= start or not line[start:cut].strip(b" \t"):
            break  # no white space to fold at (a line of only it is no line, §3.2.2)
        out.append(line[start:cut])
        start = cut
    out.append(line[start:])
    return out


def _part_default(item: mime.Entity) -> str:
    """The type of a part without Content-Type in the multipart ``item`` (RFC 2046)."""
    return "message/rfc822" if item.content_type == "multipart/digest" else "text/plain"


_UNENCODED = ("7bit", "8bit", "binary")
"""Content-Transfer-Encodings that leave the octets as they are (RFC 2045 §6.2)."""


class _SMTPPolicy(EmailPolicy):
    """``email.policy.SMTP`` that also writes what a compat32 message (``MIMEText``,
    ``Message()``) holds as a header value:

    - a :class:`~email.header.Header` (``msg["Subject"] = Header("Grüße", "utf-8")``, how
      Python's documentation long taught non-ASCII headers, and what ``smtplib`` sends)
      as the RFC 2047 words it encodes to; the stock policy raises AttributeError on one;
    - a plain string that is not ASCII (``msg["Subject"] = "Grüße"``, which ``smtplib``
      sends as RFC 2047 words too) parsed as its field's type and folded as such, so that
      a display name is encoded and its address left readable; the stock policy writes a
      short one as it is and then cannot encode it ("'ascii' codec can't encode").

    A non-ASCII field that is unstructured (Subject, Comments, an ``X-`` field) or an
    address list (From, To, Reply-To...) is folded as the ``Email`` builder folds it
    (:func:`~mailstrom.message.words.unstructured_field`,
    :func:`~mailstrom.message.addresses.format_address_field`): where the stdlib's
    folder breaks a long one, it drops the space between two encoded words ("Köln, Köln"
    read back as "Köln,Köln") or splits a display name's word ("Groß britannien").
    """

    def fold(self, name: str, value: Any) -> str:
        own = self._own_fold(name, value)
        if own is not None:
            return own
        folded: str = super().fold(name, self._encoded(name, value))
        return folded

    def fold_binary(self, name: str, value: Any) -> bytes:
        own = self._own_fold(name, value)
        if own is not None:
            # Bcc and Resent-Bcc are read back for the envelope and then dropped, never
            # sent: a UTF-8 address in them is written as it is, so that it needs no raw
            # UTF-8 in the fields that are sent (see check_entity_headers).
            utf8 = self.utf8 or name.lower() in DROPPED_FIELDS
            return own.encode("utf-8" if utf8 else "ascii")
        return super().fold_binary(name, self._encoded(name, value))

    def _own_fold(self, name: str, value: Any) -> str | None:
        """The folded field (with its line end) when it is non-ASCII unstructured text,
        ASCII text with a word too long for a line, or an address list that UTF-8 can
        write and our parser reads; else None, for the stdlib's folder."""
        if isinstance(value, Header):
            return None
        text = str(value)  # a header object: its decoded text
        if text.isascii():
            return self._long_address_list(name, value) or self._long_word(name, value)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable octets (surrogates): the stdlib's way
            return None
        text = "".join(text.splitlines())
        factory = self.header_factory
        kind = factory.registry.get(name.lower(), factory.default_class)  # type: ignore[attr-defined]
        if name.lower() in EXTRA_ADDRESS_FIELDS:
            folded = extra_field(name, text, utf8=self.utf8)
        elif issubclass(kind, UnstructuredHeader):
            folded = unstructured_field(name, text, utf8=self.utf8)
        elif issubclass(kind, AddressHeader):
            try:
                groups = parse_address_list(name, text)
            except MailstromError:  # what only the stdlib reads: its folder writes it
                return None
            folded = format_address_field(name, groups, utf8=self.utf8)
        else:
            return None
        return folded.replace("\r\n", self.linesep) + self.linesep

    def _long_address_list(self, name: str, value: Any) -> str | None:
        """An ASCII raw address list the stdlib would refold (a line over the length)
        folded as the builder folds it, when it has more tokens than the stdlib parses in
        bounded work (:data:`~mailstrom.message.bounds.MAX_STRUCTURED_TOKENS`) and our
        parser reads it; else None. ``check_entity_headers`` refused any other such field
        but an attached message's address field our parser cannot read."""
        if isinstance(value, BaseHeader) or name.lower() not in ADDRESS_FIELDS:
            return None
        lines = str(value).splitlines()
        if not self._refolds(name, lines) or structured_tokens(str(value)) is None:
            return None
        try:
            groups = parse_address_list(name, "".join(lines))
        except MailstromError:
            return None
        folded = format_address_field(name, groups, utf8=self.utf8)
        return folded.replace("\r\n", self.linesep) + self.linesep

    def _long_word(self, name: str, value: Any) -> str | None:
        """An ASCII unstructured field (Subject, In-Reply-To, List-Unsubscribe, an ``X-``
        field...) with a word longer than a folded line holds, folded as the builder
        folds it (the word kept as it is, on a line of its own); else None.

        The stdlib's folder wraps such a word by making it RFC 2047 words, of up to 77
        characters where RFC 2047 §2 allows 75, and in msg-id and URI fields, where §5
        allows none: an Outlook msg-id (83 characters) in In-Reply-To named no message,
        a List-Unsubscribe URL with its token no link. A raw value (compat32) is written
        as it is unless a line of it is too long; then it is read as the stdlib reads it
        (encoded words decoded) before it is folded."""
        factory = self.header_factory
        kind = factory.registry.get(name.lower(), factory.default_class)  # type: ignore[attr-defined]
        if not issubclass(kind, UnstructuredHeader):
            return None
        text = str(value)
        # What fits after the white space that starts a folded line is never encoded.
        room = (self.max_line_length or sys.maxsize) - 1
        if max(map(len, text.split()), default=0) <= room:
            return None
        if not isinstance(value, BaseHeader):
            lines = text.splitlines()
            if not self._refolds(name, lines):
                return None
            text = str(factory(name, "".join(lines)))
        folded = extra_field(name, text, utf8=self.utf8)
        return folded.replace("\r\n", self.linesep) + self.linesep

    def _refolds(self, name: str, lines: list[str]) -> bool:
        """Whether the stdlib's policy refolds a raw value of these lines
        (``EmailPolicy._fold`` with ``refold_source="long"``)."""
        limit = self.max_line_length or sys.maxsize
        return bool(lines) and (
            len(lines[0]) + len(name) + 2 > limit or any(len(line) > limit for line in lines[1:])
        )

    def _encoded(self, name: str, value: Any) -> Any:
        if isinstance(value, Header):
            # Folded between its words with LF; the policy writes its own line ends.
            return value.encode()
        # A header object is a str too, but its text is decoded: parsed again, its
        # values were decoded twice (a filename "=?utf-8?q?=0D=0A?=é" became CR LF).
        if (
            isinstance(value, str)
            and not isinstance(value, BaseHeader)
            and not value.isascii()
            and not self.utf8
        ):
            return self.header_factory(name, "".join(value.splitlines()))
        return value


# The writer parses a long raw value (a compat32 message's) with its header factory to
# refold it: the stdlib's own registry parses unstructured text in work quadratic in its
# length (see mailstrom.message.unstructured).
_SMTP = _SMTPPolicy(linesep="\r\n", header_factory=HEADER_FACTORY)
_SMTPUTF8 = _SMTPPolicy(linesep="\r\n", utf8=True, header_factory=HEADER_FACTORY)


def serialise(message: Message, *, utf8: bool) -> bytes:
    """Serialise a stdlib message with CRLF line endings (``email.policy.SMTP``).

    ``utf8`` writes non-ASCII headers as raw UTF-8 (RFC 6532) instead of RFC 2047 words.
    Whatever the stdlib raises on a message it cannot write becomes :class:`InvalidMessage`,
    RecursionError too: the writer recurses a few frames per MIME level, and its parser of
    structured fields a few per level of comment nesting, which RFC 5322 does not bound (a
    compat32 message parsed from anyone's bytes holds what it was sent).
    """
    out = io.BytesIO()
    generator: BytesGenerator[Any] = BytesGenerator(
        out, mangle_from_=False, policy=_SMTPUTF8 if utf8 else _SMTP
    )
    try:
        generator.flatten(message)
    except UnicodeEncodeError as exc:
        raise UnencodableHeader(f"the message cannot be encoded: {exc}") from exc
    except InvalidMessage:  # ours (a ValueError), from a field folded as the builder does
        raise
    except (LookupError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise InvalidMessage(f"the EmailMessage cannot be serialised: {exc!r}") from exc
    except RecursionError:
        # Unwound by now (the writer's finally blocks put back each part's policy), and
        # it wrote only to `out`: refusing is safe.
        raise InvalidMessage(
            "the EmailMessage cannot be serialised: its parts, or the comments in a header "
            "field, are nested too deep for the stdlib's writer"
        ) from None
    return out.getvalue()

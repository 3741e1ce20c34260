"""The raw header section of a serialised message: split, check, parse, rewrite.

Raw and already-serialised messages are handled at the octet level: the header section
is checked line by line and rewritten (Bcc dropped, Date and Message-ID added) while the
body is kept exactly as it came, bar line endings. Nothing is re-encoded.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from mailstrom.errors import HeaderInjection, HeaderTooLong, InvalidMessage, UnencodableHeader
from mailstrom.message.bounds import check_header_section, section_end
from mailstrom.message.chars import check_header_octets, check_header_text, shorten
from mailstrom.message.encoding import to_crlf
from mailstrom.message.policies import HEADER_FACTORY
from mailstrom.message.unstructured import LONGEST_DECODED_RUN, parse_unstructured
from mailstrom.message.unstructured import pieces as _pieces

MAX_FIELD = 64 * 1024
"""Longest header field accepted, in octets as written (name, value and folding).

Postfix keeps at most ``header_size_limit`` (100 KiB by default) of one header and
discards the rest, so a longer field would arrive cut short. The bound also keeps the
cost of reading and writing a header small whatever the input."""

# RFC 5322 §3.6.8: a field name is printable US-ASCII except the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")
_FIELD_LINE = re.compile(rb"([!-9;-~]+)[ \t]*:")


def check_field_size(name: str, size: int) -> None:
    """Raise :class:`HeaderTooLong` if a ``name`` field of ``size`` octets is too long."""
    if size > MAX_FIELD:
        raise HeaderTooLong(
            f"the {name} header field is {size} octets long; the limit is {MAX_FIELD}",
            header=name,
            size=size,
            limit=MAX_FIELD,
        )


def check_field_name(name: str) -> None:
    """Raise unless ``name`` is a valid header field name (RFC 5322 §3.6.8)."""
    if _FIELD_NAME.fullmatch(name):
        return
    if not name:
        raise InvalidMessage("a header name is empty; RFC 5322 §3.6.8 requires one character")
    shown = shorten(name)  # a name can be any length here: quote only its ends
    if "\r" in name or "\n" in name or ":" in name or " " in name or "\t" in name:
        raise HeaderInjection(
            f"header name {shown} contains CR, LF, a colon or white space", header=name
        )
    if not name.isascii():
        raise UnencodableHeader(
            f"header name {shown} is not ASCII; header names cannot be encoded (RFC 5322 §2.2)"
        )
    raise HeaderInjection(f"header name {shown} contains control characters", header=name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Field:
    """One header field: its name and its raw lines (without line endings)."""

    name: str
    lines: tuple[bytes, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderSection:
    """A message split into its header fields and its body (raw octets)."""

    fields: tuple[Field, ...]
    body: bytes
    """Everything after the empty line that ends the header section, line endings as given."""
    utf8: bool
    """The header section holds non-ASCII octets (RFC 6532 raw UTF-8 headers)."""

    def values(self, name: str) -> list[str]:
        """Unfolded values of every field called ``name`` (case-insensitive), in order."""
        key = name.lower()
        out = []
        for field in self.fields:
            if field.name == key:
                # Unfolding removes the line breaks only (RFC 5322 §2.2.3).
                text = b"".join(field.lines).decode("utf-8")
                out.append(text.partition(":")[2].strip(" \t"))
        return out

    def value(self, name: str, *, rule: str = "RFC 5322 §3.6") -> str | None:
        """The unfolded value of the one field called ``name``, None when there is none;
        :class:`InvalidMessage` when there are several of a field ``rule`` allows once
        (From, Sender, Date, Message-ID, ...)."""
        values = self.values(name)
        if len(values) > 1:
            raise InvalidMessage(
                f"the message has {len(values)} {name} header fields; {rule} allows one"
            )
        return values[0] if values else None

    def rewrite(self, *, drop: Collection[str], add: Sequence[tuple[str, str]]) -> bytes:
        """The message with fields named in ``drop`` (lower-case) removed and ``add`` appended.

        Line endings are CRLF throughout and the result ends with CRLF.
        """
        out = [line for field in self.fields if field.name not in drop for line in field.lines]
        out.extend(f"{name}: {value}".encode("ascii") for name, value in add)
        head = b"\r\n".join(out) + b"\r\n\r\n"
        if not self.body:
            return head
        body = to_crlf(self.body)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        return head + body


def split_header_section(data: bytes) -> HeaderSection:
    """Split ``data`` at the first empty line and check every header line.

    A line in the header section must be a ``name:`` field line or a folded continuation
    (starting with space or tab). Anything else, and any CR not followed by LF, means a
    line break inside a header value: :class:`HeaderInjection`. Non-ASCII octets must be
    UTF-8 (RFC 6532), else :class:`UnencodableHeader`. A section too long or with too many
    fields (:mod:`~mailstrom.message.bounds`) is refused before it is read.
    """
    check_header_section(data, 0, section_end(data), where="the header section")
    fields: list[tuple[str, list[bytes]]] = []
    pos = 0
    body = b""
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end == -1:
            line, next_pos = data[pos:], len(data)
        else:
            line, next_pos = data[pos:end], end + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            body = data[next_pos:]
            break
        _check_line(line, fields)
        if line[0] in b" \t":
            lines = fields[-1][1]
            if line.strip(b" \t"):
                lines.append(line)
            else:
                # A line of only white space (RFC 5322 §4.2 obsolete syntax, which the
                # stdlib's folder writes for a long run of spaces in a display name):
                # Ruby's mail gem and vmime end the header section there, so the fields
                # below it were body text to them. Joined to the line before, the field
                # unfolds to the same value (§2.2.3: unfolding removes the CRLF only).
                lines[-1] += line
        else:
            match = _FIELD_LINE.match(line)
            assert match is not None
            if match.end() - 1 > match.end(1):
                # "Subject : Hi", RFC 5322 §4.5 obsolete syntax, which §4 says must not be
                # generated: the stdlib (and programs reading mail with it) ends the header
                # section there, so every field below it, the Date and Message-ID added
                # here too, would be body text. The same field without the white space.
                line = match.group(1) + line[match.end() - 1 :]
            fields.append((match.group(1).decode("ascii").lower(), [line]))
        pos = next_pos
    head_end = pos
    for name, lines in fields:
        check_field_size(name, sum(len(line) + 2 for line in lines) - 2)
    utf8 = not data[:head_end].isascii()
    if utf8:
        _check_utf8(fields)
    return HeaderSection(
        fields=tuple(Field(name=name, lines=tuple(lines)) for name, lines in fields),
        body=body,
        utf8=utf8,
    )


def _check_line(line: bytes, fields: list[tuple[str, list[bytes]]]) -> None:
    name = fields[-1][0] if fields else "(start)"
    if b"\r" in line:
        # The field the line belongs to: its own, unless it continues the one before.
        own = None if line[0] in b" \t" else _FIELD_LINE.match(line)
        if own is not None:
            name = own.group(1).decode("ascii").lower()
        raise HeaderInjection(f"a bare CR inside the {name} header: {line[:80]!r}", header=name)
    if line[0] in b" \t":
        if not fields:
            raise HeaderInjection(
                f"the message starts with a continuation line: {line[:80]!r}", header=name
            )
        check_header_octets(name, line)
        return
    match = _FIELD_LINE.match(line)
    if match:
        check_header_octets(match.group(1).decode("ascii"), line)
        return
    colon = line.find(b":")
    if colon > 0 and not line[:colon].isascii():
        raise UnencodableHeader(
            f"header name {line[:colon]!r} is not ASCII; header names cannot be encoded"
        )
    raise HeaderInjection(
        f"line {line[:80]!r} in the header section is neither a header field nor a folded "
        f"continuation (a line break inside the {name} header?)",
        header=name,
    )


def _check_utf8(fields: list[tuple[str, list[bytes]]]) -> None:
    for name, lines in fields:
        for line in lines:
            if line.isascii():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UnencodableHeader(
                    f"the {name} header holds octets that are not UTF-8 ({exc.reason} at "
                    f"{exc.start}); raw 8-bit headers must be UTF-8 (RFC 6532)"
                ) from exc
            # NEL and the Unicode line separators only exist once decoded.
            check_header_text(name, text)


def decode_text(value: str) -> str:
    """Decode RFC 2047 words in an unstructured header value (for display only), as the
    stdlib's ``policy.default`` does, piece by piece so that the work stays linear."""
    if "=?" not in value:
        return value
    try:
        return "".join(_decode_piece(value[start:end]) for start, end in _pieces(value))
    except Exception:  # the stdlib parser can fail on malformed words; show them as sent
        return value


def _decode_piece(piece: str) -> str:
    if "=?" not in piece:
        return piece
    if len(piece) > LONGEST_DECODED_RUN:  # nowhere to cut: word by word
        return str(parse_unstructured(piece))
    return str(HEADER_FACTORY("subject", piece))

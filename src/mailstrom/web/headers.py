"""The header section of a stored message, for display (never for delivery)."""

from __future__ import annotations

import re
from email.errors import MessageError
from email.header import decode_header, make_header

MAX_HEADER_BYTES = 64 * 1024
"""Octets of header section shown; a longer one is cut (the raw view shows the rest)."""
MAX_BODY_BYTES = 1024 * 1024
"""Octets of a message shown in the raw view."""


def header_fields(data: bytes) -> list[tuple[str, str]]:
    """(name, value) per header field, unfolded, encoded-words decoded where they are
    valid (left as they are otherwise)."""
    end = data.find(b"\r\n\r\n")
    section = data[: end if end >= 0 else MAX_HEADER_BYTES][:MAX_HEADER_BYTES]
    text = section.decode("utf-8", "replace")
    fields: list[tuple[str, str]] = []
    for line in text.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}")
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return [(name, _decoded(value)) for name, value in fields]


_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def _decoded(value: str) -> str:
    """``value`` with each valid encoded word decoded where it stands; the white space
    between two of them is no part of the text (RFC 2047 §6.2).

    Word by word, never the whole value through the stdlib: its ``decode_header()``
    looks for words in time quadratic in the length of what it is given (56 KB of
    ``=?a?q?x `` in a sender's Subject took 2.3 s, in the server's event loop), gives up
    on a whole field for one word in an unknown charset, and reads raw UTF-8 (RFC 6532)
    beside words as ASCII."""
    if "=?" not in value:
        return value
    pieces: list[str] = []
    end = 0
    after_word = False  # the last piece is a decoded word
    for match in _ENCODED_WORD.finditer(value):
        gap, word = value[end : match.start()], match.group()
        # A word that is not ASCII (its charset name) is no encoded word: as written.
        text = _decoded_word(word) if word.isascii() else word
        if not (after_word and text != word and not gap.strip(" \t")):
            pieces.append(gap)
        pieces.append(text)
        after_word, end = text != word, match.end()
    return "".join(pieces) + value[end:]


def _decoded_word(word: str) -> str:
    """One encoded word decoded, or as written when it does not decode."""
    try:
        return str(make_header(decode_header(word)))
    except (ValueError, LookupError, UnicodeError, MessageError):
        # MessageError: base64 that does not decode (HeaderParseError), a charset name
        # that is not ASCII (CharsetError); the stdlib raises them for what a sender wrote.
        return word


def shown_body(data: bytes) -> tuple[str, bool]:
    """The message as text for the raw view, and whether it was cut."""
    cut = len(data) > MAX_BODY_BYTES
    return data[:MAX_BODY_BYTES].decode("utf-8", "replace"), cut

"""MIME structure at the octet level: entities, their content types, multipart layouts.

Used where a message is already bytes (raw and ``EmailMessage`` input, message/rfc822
attachments, the 8-bit downgrade), so nothing is decoded and re-encoded that does not
have to be. Entities are spans (``start``, ``end``) of one buffer, never copies, so
walking a nested message costs no memory per level. Input is CRLF-normalised.

Everything here is tolerant: a missing or malformed Content-Type reads as text/plain
(RFC 2045 §5.2), a multipart without a usable boundary as a single opaque body. Only
:func:`check_structure` raises, and only :class:`NestingTooDeep`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from mailstrom.errors import NestingTooDeep

MAX_DEPTH = 100
"""Deepest MIME nesting accepted (multipart and message/rfc822 levels below the top).

Postfix refuses mail nested deeper than ``mime_nesting_limit``, 100 by default, so such a
message could not be delivered to it anyway; no real mail comes close. The bound also
keeps every walk over a message, ours and the receivers', within a recursion budget."""

_TOKEN = rb"[!#$%&'*+\-.0-9A-Z^-~]+"
"""RFC 2045 §5.1 token: printable ASCII but tspecials (and A-Z, ^-~ cover the letters)."""
_TYPE = re.compile(rb"\s*(" + _TOKEN + rb")/(" + _TOKEN + rb")\s*(?:;|$)")
_BOUNDARY = re.compile(rb';\s*boundary\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]+))', re.I)
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_IDENTITY = frozenset({"7bit", "8bit", "binary"})


@dataclass(frozen=True, slots=True)
class Entity:
    """One MIME entity: ``data[start:body]`` is its header section (with the empty line
    that ends it, or nothing when it has no headers), ``data[body:end]`` its body."""

    data: bytes
    start: int
    body: int
    end: int
    content_type: str
    """``type/subtype``, lower-case."""
    boundary: bytes | None
    cte: str
    """Content-Transfer-Encoding, lower-case; ``7bit`` when absent."""

    @property
    def maintype(self) -> str:
        return self.content_type.partition("/")[0]

    @property
    def head(self) -> bytes:
        return self.data[self.start : self.body]

    @property
    def nested(self) -> bool:
        """A message/rfc822 body is itself an entity, unless encoded (which RFC 2046
        §5.2.1 forbids, but then it is opaque content)."""
        return self.content_type == "message/rfc822" and self.cte in _IDENTITY


def entity(
    data: bytes, start: int = 0, end: int | None = None, *, default: str = "text/plain"
) -> Entity:
    """Read the entity at ``data[start:end]``; ``default`` is the type without Content-Type
    (message/rfc822 inside multipart/digest, RFC 2046 §5.1.5)."""
    if end is None:
        end = len(data)
    if data.startswith(b"\r\n", start) or start >= end:
        body = min(start + 2, end)
    else:
        blank = data.find(b"\r\n\r\n", start, end)
        if blank != -1:
            body = blank + 4
        elif _FIELD.match(data, start, end):
            body = end  # headers only
        else:
            body = start  # no header section at all
    content_type, boundary, cte = default, None, "7bit"
    for name, value in _fields(data, start, body):
        if name == b"content-type":
            match = _TYPE.match(value)
            if match is not None:
                content_type = (match[1] + b"/" + match[2]).decode("ascii").lower()
                found = _BOUNDARY.search(value)
                if found is not None:
                    boundary = found[2] or re.sub(rb"\\(.)", rb"\1", found[1] or b"")
                    if not boundary.isascii():
                        boundary = None  # RFC 2046 §5.1.1 bchars are ASCII
        elif name == b"content-transfer-encoding":
            cte = value.strip().decode("latin-1").lower() or "7bit"
    if not content_type.startswith("multipart/"):
        boundary = None
    return Entity(
        data=data,
        start=start,
        body=body,
        end=end,
        content_type=content_type,
        boundary=boundary or None,
        cte=cte,
    )


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, bytes]]:
    """(lower-case name, unfolded value) of each field in ``data[start:end]``."""
    name: bytes | None = None
    value: list[bytes] = []
    for line in data[start:end].split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and name is not None:
            value.append(line)
            continue
        if name is not None:
            yield name, b"".join(value)
        match = _FIELD.match(line)
        if match is None:
            name = None
            continue
        name, value = match[1].lower(), [line[match.end() :]]
    if name is not None:
        yield name, b"".join(value)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the parts of a multipart body are: spans of the shared buffer.

    The CRLF before a delimiter line belongs to the delimiter (RFC 2046 §5.1.1), so a part
    span ends before it. ``epilogue`` is None when the close delimiter is missing.
    """

    preamble: tuple[int, int]
    parts: tuple[tuple[int, int], ...]
    epilogue: tuple[int, int] | None


def layout(item: Entity) -> Layout | None:
    """The layout of a multipart entity, or None when it has no boundary or no delimiter."""
    if item.boundary is None:
        return None
    delimiter = re.compile(rb"(?m)^--" + re.escape(item.boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")
    data, parts = item.data, []
    preamble: tuple[int, int] | None = None
    part_start = 0
    for match in delimiter.finditer(data, item.body, item.end):
        if match.start() != item.body and data[match.start() - 2 : match.start()] != b"\r\n":
            continue  # "^" matched after a bare LF, which CRLF input does not have
        before = max(match.start() - 2, item.body)
        if preamble is None:
            preamble = (item.body, before)
        else:
            parts.append((part_start, before))
        line_end = data.find(b"\r\n", match.end(), item.end)
        part_start = item.end if line_end == -1 else line_end + 2
        if match[1]:
            return Layout(preamble=preamble, parts=tuple(parts), epilogue=(part_start, item.end))
    if preamble is None:
        return None
    parts.append((part_start, item.end))
    return Layout(preamble=preamble, parts=tuple(parts), epilogue=None)


def children(item: Entity) -> list[Entity]:
    """The entities directly inside ``item`` (parts of a multipart, a nested message)."""
    if item.nested:
        return [entity(item.data, item.body, item.end)]
    found = layout(item)
    if found is None:
        return []
    default = "message/rfc822" if item.content_type == "multipart/digest" else "text/plain"
    return [entity(item.data, start, end, default=default) for start, end in found.parts]


def check_structure(data: bytes, *, limit: int = MAX_DEPTH) -> bool:
    """Walk every entity of ``data``: raise :class:`NestingTooDeep` if they nest deeper
    than ``limit``; return True if a part's own header section (below the top level) holds
    8-bit octets, which only RFC 6532 allows, so the message then needs SMTPUTF8."""
    utf8 = False
    stack = [(entity(data), 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise NestingTooDeep(
                f"MIME parts are nested more than {limit} levels deep (multipart and "
                "message/rfc822 levels); Postfix refuses such mail (mime_nesting_limit)",
                limit=limit,
            )
        if depth and not utf8:
            utf8 = not item.head.isascii()
        if item.maintype in ("multipart", "message"):
            stack.extend((child, depth + 1) for child in children(item))
    return utf8

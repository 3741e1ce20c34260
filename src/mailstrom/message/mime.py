"""MIME structure at the octet level: entities, their content types, multipart layouts.

Used where a message is already bytes (raw and ``EmailMessage`` input, message/rfc822
attachments, the 8-bit downgrade), so nothing is decoded and re-encoded that does not
have to be. Entities are spans (``start``, ``end``) of one buffer, never copies, so
walking a nested message costs no memory per level. Input is CRLF-normalised.

Everything here is tolerant: a missing or malformed Content-Type reads as text/plain
(RFC 2045 §5.2), a multipart without a usable boundary as a single opaque body. Only
:func:`check_structure` raises, when a bound on nesting, parts or header sections is
passed, or an entity's structure is ambiguous.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mailstrom.errors import (
    ForbiddenCharacter,
    InvalidHeaderValue,
    InvalidMessage,
    NestingTooDeep,
    UnencodableHeader,
)
from mailstrom.message.bounds import MAX_PARTS, check_header_section, too_many_parts
from mailstrom.message.chars import bad_header_char, bad_header_octet, describe, shorten

MAX_DEPTH = 100
"""Deepest MIME nesting accepted (multipart and message/rfc822 levels below the top).

Postfix refuses mail nested deeper than ``mime_nesting_limit``, 100 by default, so such a
message could not be delivered to it anyway; no real mail comes close. The bound also
keeps every walk over a message, ours and the receivers', within a recursion budget."""

_TOKEN = rb"[!#$%&'*+\-.0-9A-Z^-~]+"
"""RFC 2045 §5.1 token: printable ASCII but tspecials (and A-Z, ^-~ cover the letters)."""
_TYPE = re.compile(rb"\s*(" + _TOKEN + rb")/(" + _TOKEN + rb")\s*(?:;|$)")
_BOUNDARY_VALUE = rb'boundary\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]+))'
_BOUNDARY = re.compile(rb";\s*" + _BOUNDARY_VALUE, re.I)
_OTHER_PARAMETER = rb'\s*(?:[^\s;="()]+(?:\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^\s;"]*))?)?\s*;'
"""A parameter (or an empty one) and the ``;`` after it: a quoted value is taken whole."""
_FIRST_BOUNDARY = re.compile(rb"(?:" + _OTHER_PARAMETER + rb")*?\s*" + _BOUNDARY_VALUE, re.I)
"""The first boundary parameter, read from the first parameter on, one parameter at a
time: a ``; boundary=`` inside another parameter's quoted value is no boundary."""
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_HEADER_LINES = re.compile(
    rb"(?:(?:From |[!-9;-~]++[ \t]*+:)[^\r\n]*+(?:\r\n[ \t][^\r\n]*+)*+(?:\r\n|\Z))*+"
)
"""Field lines, each with its continuation lines, as many as follow one another
(possessive: a long line that is no field is given up at once, not octet by octet). An
mbox ``From`` line (``From sender date``, which starts an attached message saved from a
mailbox) counts as one, as readers (the stdlib) take it."""
_SPACED_FIELD_NAME = re.compile(rb"(?<![^\n])([!-9;-~]+)[ \t]+:")
"""A field line with white space before its colon, at a line start (an entity starts at
one: after a CRLF, or at the start of the message)."""
_IDENTITY = frozenset({"7bit", "8bit", "binary"})
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
_WHITE_LINE = re.compile(rb"\n[ \t]+(?:\r\n|\Z)")
"""A line of only white space after the first (a continuation line, to this module)."""


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
    repeated: str | None = None
    """``Content-Type`` or ``Content-Transfer-Encoding`` when the header section has that
    field more than once (the last one is what ``content_type`` or ``cte`` reads)."""
    unread_boundary: bool = False
    """A multipart whose Content-Type names a boundary where it is not read (after a
    comment or a malformed parameter, or in RFC 2231 form), as readers may."""

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
    return _entity(data, start, body_start(data, start, end), end, default=default)


def body_start(data: bytes, start: int, end: int) -> int:
    """Where the body of the entity at ``data[start:end]`` starts: after the empty line that
    ends its header section (``end`` when it has only headers, ``start`` when none).

    A line that is neither a field nor a continuation ends the header section as readers
    (the stdlib, Postfix) end it: the body starts with that line, an empty line further
    on or not. An entity whose first line is no field so has no header section."""
    if data.startswith(b"\r\n", start) or start >= end:
        return min(start + 2, end)
    fields = _HEADER_LINES.match(data, start, end)
    assert fields is not None  # it matches the empty string
    stop = fields.end()
    if data.startswith(b"\r\n", stop, end):
        return stop + 2  # the empty line
    return stop  # headers only (end), or a line that is no field starts the body


def _entity(data: bytes, start: int, body: int, end: int, *, default: str) -> Entity:
    content_type, boundary, cte = default, None, "7bit"
    seen: set[bytes] = set()
    repeated = None
    unread = False
    for name, value in _fields(data, start, body):
        if name in _STRUCTURAL:
            if name in seen:
                repeated = _STRUCTURAL[name]
            seen.add(name)
        if name == b"content-type":
            match = _TYPE.match(value)
            if match is not None:
                content_type = (match[1] + b"/" + match[2]).decode("ascii").lower()
                boundary, unread = None, False
                if match[1].lower() == b"multipart":
                    boundary, unread = _boundary(value, match.end())
        elif name == b"content-transfer-encoding":
            cte = value.strip().decode("latin-1").lower() or "7bit"
    if not content_type.startswith("multipart/"):
        boundary, unread = None, False
    return Entity(
        data=data,
        start=start,
        body=body,
        end=end,
        content_type=content_type,
        boundary=boundary or None,
        cte=cte,
        repeated=repeated,
        unread_boundary=unread,
    )


def _boundary(value: bytes, parameters: int) -> tuple[bytes | None, bool]:
    """(the boundary, whether one is named where it is not read) of a multipart's
    Content-Type ``value``, whose parameters start at offset ``parameters``."""
    found = _BOUNDARY.search(value)
    if found is None:
        # Past a comment, in RFC 2231 form (boundary*=, boundary*0=): readers that decode
        # those (the stdlib) and readers that do not would see other parts.
        return None, b"boundary" in value[parameters:].lower()
    before = value[parameters : found.start()]
    if b'"' in before or b"(" in before:
        # It may be inside a quoted value or a comment: read parameter by parameter (at
        # C speed still, but slower than the search most values need alone).
        found = _FIRST_BOUNDARY.match(value, parameters)
        if found is None:
            return None, True
    boundary = found[2] or re.sub(rb"\\(.)", rb"\1", found[1] or b"")
    if not boundary.isascii():
        return None, False  # RFC 2046 §5.1.1 bchars are ASCII
    return boundary, False


_STRUCTURAL = {
    b"content-type": "Content-Type",
    b"content-transfer-encoding": "Content-Transfer-Encoding",
}
"""The fields that decide how an entity is read, lower-case, with their names as shown."""


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
    preamble: tuple[int, int] | None = None
    parts = []
    part_start = 0
    for line, next_line, close in _delimiters(item):
        before = max(line - 2, item.body)
        if preamble is None:
            preamble = (item.body, before)
        else:
            parts.append((part_start, before))
        part_start = next_line
        if close:
            return Layout(preamble=preamble, parts=tuple(parts), epilogue=(part_start, item.end))
    if preamble is None:
        return None
    parts.append((part_start, item.end))
    return Layout(preamble=preamble, parts=tuple(parts), epilogue=None)


@functools.lru_cache(maxsize=256)
def _delimiter_line(boundary: bytes) -> re.Pattern[bytes]:
    """A delimiter line of ``boundary`` after its CRLF: ``--boundary``, ``--`` more for
    the close one (group 1), then white space up to the line end (RFC 2046 §5.1.1), which
    is looked at but not taken, so the CRLF may begin the next delimiter."""
    return re.compile(b"--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")


@functools.lru_cache(maxsize=256)
def _delimiter_after_crlf(boundary: bytes) -> re.Pattern[bytes]:
    """:func:`_delimiter_line` with the CRLF before it, for searching."""
    return re.compile(b"\r\n" + _delimiter_line(boundary).pattern)


def _delimiters(item: Entity, *, past_close: bool = False) -> Iterator[tuple[int, int, bool]]:
    """(where its line starts, where the next line starts, whether it closes) for each
    delimiter line of a multipart body, in order, up to the close delimiter (or to the
    end of the body, ``past_close``).

    A delimiter line is ``--boundary``, ``--`` more for the close one, then white space
    (RFC 2046 §5.1.1), at the start of the body or after a CRLF. Found by one regular
    expression led by the literal CRLF and boundary, which the engine skips ahead to at C
    speed; a line that starts with the boundary but goes on (``--boundaryX``) is passed
    over there too. A regular expression anchored at line starts tried every position,
    and a body nested a hundred levels deep is scanned once per level (33 MB: 12 s); a
    loop over ``bytes.find`` hits came back to Python for every such line, and 30 MB of
    them nested 70 levels deep took 32 s.
    """
    if item.boundary is None:
        return
    data, end = item.data, item.end
    found = _delimiter_line(item.boundary).match(data, item.body, end)
    at = item.body
    if found is None:
        found = _delimiter_after_crlf(item.boundary).search(data, item.body, end)
        at = -1 if found is None else found.start() + 2
    while found is not None:
        after = found.end()
        close = found[1] is not None
        yield at, min(after + 2, end), close
        if close and not past_close:
            return
        found = _delimiter_after_crlf(item.boundary).search(data, after, end)
        at = -1 if found is None else found.start() + 2


def delimiter_lines(item: Entity) -> tuple[int, int]:
    """(delimiter lines, close delimiter lines) in the whole body of a multipart entity,
    the epilogue included: a writer that chose its boundary well wrote one per part and
    one close delimiter, and a boundary that also occurs in the content shows as more."""
    opening = closing = 0
    for _, _, close in _delimiters(item, past_close=True):
        if close:
            closing += 1
        else:
            opening += 1
    return opening, closing


def _child_spans(item: Entity) -> Iterator[tuple[int, int, str]]:
    """(start, end, default content type) of each entity directly inside ``item``, found
    one at a time."""
    if item.nested:
        yield item.body, item.end, "text/plain"
        return
    default = "message/rfc822" if item.content_type == "multipart/digest" else "text/plain"
    part_start: int | None = None
    for line, next_line, close in _delimiters(item):
        if part_start is not None:
            yield part_start, max(line - 2, item.body), default
        part_start = next_line
        if close:
            return
    if part_start is not None:
        yield part_start, item.end, default


def _walk(data: bytes, visit: Callable[[int, int, str, int], Entity | None]) -> None:
    """Call ``visit(start, end, default, depth)`` for every entity of ``data``, the message
    itself first (depth 0), depth first, each one found only when the one before has been
    visited. ``default`` is its type without Content-Type; the entities inside the
    :class:`Entity` that ``visit`` returns (a multipart or message) are visited next, none
    when it returns None. The one walk every reader of the whole tree here makes."""
    pending = [(iter([(0, len(data), "text/plain")]), 0)]
    while pending:
        spans, depth = pending[-1]
        span = next(spans, None)
        if span is None:
            pending.pop()
            continue
        start, end, default = span
        item = visit(start, end, default, depth)
        if item is not None and item.maintype in ("multipart", "message"):
            pending.append((_child_spans(item), depth + 1))


def _bare_in_binary(item: Entity, bare: bytes) -> bool:
    """Whether ``item`` is a leaf labelled ``Content-Transfer-Encoding: binary`` whose body
    holds a CRLF that was a bare CR or LF (an LF in ``bare``), or is followed by a CRLF
    whose CR may be its last octet (a CR in ``bare``: a CR before an LF in a message with
    LF line ends, or a bare CR, which made the delimiter line after it): ``bare`` is laid
    over its buffer octet for octet (see :func:`~mailstrom.message.encoding.bare_line_ends`)."""
    if item.maintype == "multipart" or item.nested or item.cte != "binary":
        return False
    return bare.find(b"\n", item.body, item.end) >= 0 or bare.startswith(b"\r", item.end)


def binary_with_bare_line_end(data: bytes, bare: bytes) -> str | None:
    """The content type of the first leaf of ``data`` labelled binary that holds a CRLF
    which was a bare CR or LF (``bare`` as for :func:`check_structure`), or None. Read as
    tolerantly as the rest of this module, no deeper than :data:`MAX_DEPTH` levels; for
    content whose structure is checked later, once it is part of a whole."""
    found: str | None = None

    def visit(start: int, end: int, default: str, depth: int) -> Entity | None:
        nonlocal found
        if found is not None:
            return None
        item = entity(data, start, end, default=default)
        if _bare_in_binary(item, bare):
            found = item.content_type
        return item if depth < MAX_DEPTH else None

    _walk(data, visit)
    return found


def eight_bit_part_header(data: bytes) -> bool:
    """Whether a header section below the top level of ``data`` holds 8-bit octets, which
    only RFC 6532 allows (the message then needs SMTPUTF8), read as tolerantly as the rest
    of this module: for a message already accepted, which is not judged again here, so one
    queued under older input rules reads the same as when it was queued.

    Where readers may differ on which lines are a part's header section (a multipart
    boundary or Content-Type they read differently, a continuation line first, nesting
    past :data:`MAX_DEPTH`), 8-bit octets anywhere in that entity's body count, as the
    check that refused such structure counted them; :func:`check_structure` gives the
    same answer for every message it accepts."""
    found = False

    def visit(start: int, end: int, default: str, depth: int) -> Entity | None:
        nonlocal found
        if found:
            return None
        item = entity(data, start, end, default=default)
        if depth and not item.head.isascii():
            found = True
            return None
        deeper = depth >= MAX_DEPTH and item.maintype in ("multipart", "message")
        unclear = (
            item.unread_boundary
            or item.repeated is not None
            or data.startswith((b" ", b"\t"), start, end)
            or (deeper and next(_child_spans(item), None) is not None)
        )
        if unclear and _EIGHT_BIT.search(data, item.body, item.end) is not None:
            found = True
        return None if found or depth >= MAX_DEPTH else item

    _walk(data, visit)
    return found


def binary_line_end(content_type: str) -> ForbiddenCharacter:
    """The error for a ``content_type`` part labelled binary that holds a bare CR or LF."""
    return ForbiddenCharacter(
        f"the {content_type} part labelled Content-Transfer-Encoding: binary holds a bare CR "
        "or LF (a CR last, before a line end, in a message with LF line ends), which cannot "
        "be sent unchanged without BINARYMIME (RFC 3030) and would be made CRLF or cut off; "
        "encode that part as base64",
        where=content_type,
    )


def in_part_header_section(data: bytes, offset: int) -> bool:
    """Whether ``data[offset]`` is in the header section of an entity below the top level
    (a MIME part, an attached message): only the entities around it are read."""
    item = entity(data)
    for _ in range(MAX_DEPTH + 1):  # check_structure has bounded the nesting
        if item.maintype not in ("multipart", "message"):
            return False
        span = next((s for s in _child_spans(item) if s[0] <= offset < s[1]), None)
        if span is None:
            return False  # a preamble, an epilogue or a delimiter line
        start, end, default = span
        item = entity(data, start, end, default=default)
        if offset < item.body:
            return True
    return False


def ignored_text(data: bytes, offset: int) -> str | None:
    """``"preamble"`` or ``"epilogue"`` when ``data[offset]`` is in that text of a
    multipart (at any level), which readers ignore (RFC 2046 §5.1.1); None otherwise."""
    item = entity(data)
    for _ in range(MAX_DEPTH + 1):  # check_structure has bounded the nesting
        if offset < item.body:
            return None
        if item.maintype == "multipart":
            found = layout(item)
            if found is None:
                return None
            if found.preamble[0] <= offset < found.preamble[1]:
                return "preamble"
            if found.epilogue is not None and found.epilogue[0] <= offset < found.epilogue[1]:
                return "epilogue"
        elif not item.nested:
            return None
        span = next((s for s in _child_spans(item) if s[0] <= offset < s[1]), None)
        if span is None:
            return None  # a delimiter line
        start, end, default = span
        item = entity(data, start, end, default=default)
    return None


def _spaced_field_name(name: str, where: str) -> InvalidHeaderValue:
    """The error for a field of ``where`` with white space between its name and colon."""
    # RFC 5322 §4.5 obsolete syntax, which §4 says must not be generated. Postfix and
    # this module read such a line as a field, the stdlib as the end of the header
    # section: "Content-Type : text/html" made a part text/plain showing that line.
    return InvalidHeaderValue(
        f"{where} has white space between the field name {name!r} and its colon, obsolete "
        "syntax (RFC 5322 §4.5) that the stdlib takes for the end of the header section: "
        f"write {name + ':'!r}",
        header=name,
    )


def _white_line(before: bytes, where: str) -> InvalidMessage:
    """The error for a line of only white space in ``where``, after the octets ``before``."""
    field = next((f for f in reversed(before.split(b"\r\n")) if f[:1] not in (b" ", b"\t")), b"")
    name = shorten(field.partition(b":")[0].decode("ascii", "replace"), 60)
    # Obsolete syntax (RFC 5322 §4.2) that §4 says must not be generated; Ruby's mail
    # gem and vmime end the header section at such a line, so the fields below it (the
    # part's Content-Type) were body text to them.
    return InvalidMessage(
        f"{where} has a line of only white space in the field {name}; readers differ on "
        "whether it ends the header section (RFC 5322 §4.2 obsolete syntax), so remove it"
    )


def nesting_too_deep(limit: int = MAX_DEPTH) -> NestingTooDeep:
    """The error for a message whose entities nest deeper than ``limit``."""
    return NestingTooDeep(
        f"MIME parts are nested more than {limit} levels deep (multipart and "
        "message/rfc822 levels); Postfix refuses such mail (mime_nesting_limit)",
        limit=limit,
    )


def _check_utf8_head(head: bytes, where: str) -> None:
    """Refuse the 8-bit header section ``head`` of an entity below the top level unless it
    is UTF-8, as the top one is refused (RFC 6532 §3.1: 8-bit header text is UTF-8), and
    holds no character the top one may not (NEL, the Unicode line separators)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnencodableHeader(
            f"{where} holds octets that are not UTF-8 ({exc.reason} at {exc.start}): "
            f"{shorten(head[max(exc.start - 20, 0) : exc.end + 20])}; raw 8-bit headers "
            "must be UTF-8 (RFC 6532), so encode them as RFC 2047 words or in UTF-8"
        ) from None
    char = bad_header_char(text)
    if char is not None:
        raise _control_character(where, describe(char))


def _check_head_octets(data: bytes, start: int, end: int, where: str) -> None:
    """Refuse the header section ``data[start:end]`` of an entity below the top level if
    it holds a control octet, as the top one is refused for it."""
    at = bad_header_octet(data, start, end)
    if at >= 0:
        raise _control_character(where, describe(chr(data[at])))


def _control_character(where: str, described: str) -> ForbiddenCharacter:
    # The stdlib's writer breaks a line at VT, FF and FS to RS (str.splitlines): a hop
    # that rewrites the part made "X-Foo: a<VT>Content-Type: text/html" two fields.
    return ForbiddenCharacter(
        f"{where} contains the control character {described}; header values may not hold "
        "control characters other than TAB, and readers that rewrite the part break its "
        "line at some of them",
        where=where,
    )


def check_structure(
    data: bytes, *, limit: int = MAX_DEPTH, max_parts: int = MAX_PARTS, bare: bytes | None = None
) -> bool:
    """Walk every entity of ``data``; return True if a part's own header section (below
    the top level) holds 8-bit octets, which only RFC 6532 allows, so the message then
    needs SMTPUTF8.

    Raises :class:`NestingTooDeep` if entities nest deeper than ``limit``,
    :class:`TooManyParts` past ``max_parts`` entities, and :class:`TooManyHeaderFields` or
    :class:`HeaderTooLong` for a header section over the bounds of
    :mod:`~mailstrom.message.bounds`, and :class:`InvalidMessage` for an entity with two
    Content-Type or Content-Transfer-Encoding fields, a multipart boundary named where
    readers differ on it (after a comment, in RFC 2231 form), a continuation line first, a
    line of only white space in a part's header section, or an mbox ``From`` line after
    the first;
    :class:`InvalidHeaderValue` for a field with white space before its colon;
    :class:`UnencodableHeader` for a part's 8-bit header section that is not UTF-8;
    :class:`ForbiddenCharacter` for a control character in a part's header section (the
    top one's are checked by :func:`~mailstrom.message.headers.split_header_section`).
    Entities are read one at a time, each bound checked before the next is, so refusing
    costs no more than the limits allow.

    ``bare``, when ``data`` was made CRLF from input with bare CR or LF line ends, is laid
    over ``data`` octet for octet with a CRLF exactly where one was made of a bare CR or
    LF (:func:`~mailstrom.message.encoding.bare_line_ends`): a part labelled
    ``Content-Transfer-Encoding: binary`` with one in its body is then refused
    (:func:`binary_line_end`), once the whole structure has passed, in the same walk.
    """
    utf8 = False
    count = 0
    binary: str | None = None

    def visit(start: int, end: int, default: str, depth: int) -> Entity:
        nonlocal utf8, count, binary
        count += 1
        if count > max_parts:
            raise too_many_parts(max_parts)
        if depth > limit:
            raise nesting_too_deep(limit)
        where = "the header section of a MIME part" if depth else "the header section"
        if data.startswith((b" ", b"\t"), start, end):
            # The stdlib reads such a line as a header line (and drops it, with the fields
            # below it as the part's); Postfix and body_start read it as the first body
            # line: the part would be text/plain here and text/html for a receiver.
            raise InvalidMessage(
                f"{where} starts with a continuation line (white space first); readers "
                "differ on whether it starts the body, so the MIME structure is ambiguous"
            )
        body = body_start(data, start, end)
        check_header_section(data, start, body, where=where)
        if depth:
            _check_head_octets(data, start, body, where)
        white = _WHITE_LINE.search(data, start, body) if depth else None
        if white is not None:
            # The top one's such lines are joined to the line before as it is read
            # (split_header_section); a part's are in a body, which is sent as it came.
            raise _white_line(data[start : white.start()], where)
        spaced = _SPACED_FIELD_NAME.search(data, start, body)
        if spaced is not None:
            raise _spaced_field_name(spaced[1].decode("ascii"), where)
        if data.find(b"\r\nFrom ", start, body) >= 0:
            # Only a first line is an mbox From line to the stdlib: it drops one further
            # down, or (the last header line) takes it for the first body line; Postfix
            # ends the header section there. The downgrade lost "From the desk of ...".
            raise InvalidMessage(
                f"{where} holds a line starting with 'From ' after its first line; readers "
                "differ on whether it is a header or body line, so the part is ambiguous"
            )
        item = _entity(data, start, body, end, default=default)
        if item.unread_boundary:
            raise InvalidMessage(
                f"{where} names a multipart boundary after a comment or a malformed "
                "parameter, or in RFC 2231 form; readers differ on such a boundary, so the "
                'MIME structure is ambiguous: give it as boundary="..."'
            )
        if item.repeated is not None:
            # Readers differ on which one counts (the stdlib reads the first, this module
            # the last), so the parts counted here, and those the downgrade re-encodes,
            # would not be the parts a receiver reads: 3,000 parts passed the bound as
            # text/plain, and a multipart was quoted-printable encoded as text.
            raise InvalidMessage(
                f"{where} has more than one {item.repeated} field; readers differ on which "
                "one counts, so the MIME structure is ambiguous"
            )
        if depth and not item.head.isascii():
            _check_utf8_head(item.head, where)
            utf8 = True
        if bare is not None and binary is None and _bare_in_binary(item, bare):
            binary = item.content_type
        return item

    _walk(data, visit)
    if binary is not None:
        raise binary_line_end(binary)
    return utf8

"""Bounds on the shape of raw input, checked on the octets before anything is parsed.

A 35 MiB message can hold four million one-line header fields or two million empty MIME
parts, and each costs Python objects and microseconds: half a minute of CPU and
gigabytes for one call to ``prepare()``. These bounds are counted at C speed
(``bytes.count``, ``bytes.find``) so that what they refuse costs almost nothing, and set
well above what real mail holds.
"""

from __future__ import annotations

import re

from mailstrom.errors import HeaderTooLong, TooManyHeaderFields, TooManyParts

MAX_HEADER_FIELDS = 1000
"""Header fields in one header section (the message's, or a MIME part's).

Real messages hold a few dozen; a long path adds a Received field per hop, which MTAs
cap at 30 to 100 (Exim's ``received_headers_max``, Postfix's ``hopcount_limit`` 50),
and ARC adds three per hop (at most 50 sets, RFC 8617 §4.2.1): a few hundred at
worst. Go's mime/multipart allows 10,000 per part, and ASP.NET 16."""

MAX_HEADER_SECTION = 1024 * 1024
"""Octets in one header section, line ends included.

Exim refuses a message whose header section passes ``header_maxsize`` (1 MiB by
default), Stalwart stores at most 512 KiB of it, and Sendmail's ``MaxHeadersLength`` is
32 KiB; each field is also bounded on its own (64 KiB,
:data:`~mailstrom.message.headers.MAX_FIELD`). Without this bound the fields within their
own limit could still fill the whole message with continuation lines."""

MAX_PARTS = 1000
"""MIME entities in one message, the message itself and nested ones included.

Exchange Online accepts at most 250 attachments, and Go's mime/multipart reads at most
1,000 parts of a form; a message with text, HTML and 250 attachments has about 255."""

_SECTION_END = re.compile(rb"\n\r?\n")


def section_end(data: bytes, start: int = 0, end: int | None = None) -> int:
    """Offset of the empty line that ends the header section at ``data[start:end]``
    (``end`` when no empty line does): its octets are ``data[start:offset]``."""
    if end is None:
        end = len(data)
    if data.startswith(b"\n", start, end) or data.startswith(b"\r\n", start, end):
        return start
    found = _SECTION_END.search(data, start, end)
    return end if found is None else found.start() + 1


def check_header_section(data: bytes, start: int, end: int, *, where: str) -> None:
    """Refuse the header section ``data[start:end]`` (up to the empty line, which the
    caller found with :func:`section_end`) if it is too long or has too many fields.

    ``where`` names it in the error: ``"the header section"``, or ``"the header section of
    a MIME part"``.
    """
    size = end - start
    if size > MAX_HEADER_SECTION:
        raise section_too_long(size, where=where)
    if size <= MAX_HEADER_FIELDS * 3:
        return  # the shortest field line is "a:" and LF: too short to hold too many
    # A field starts each line that is not a continuation (RFC 5322 §2.2.3); the final
    # line end, before the empty line, starts nothing.
    lines = data.count(b"\n", start, end - 1) + 1
    folded = data.count(b"\n ", start, end) + data.count(b"\n\t", start, end)
    empty = data.count(b"\n\r\n", start, end) + data.count(b"\n\n", start, end)
    fields = lines - folded - empty
    if fields > MAX_HEADER_FIELDS:
        raise too_many_fields(fields, where=where)


def too_many_fields(fields: int, *, where: str) -> TooManyHeaderFields:
    """The error for a header section (``where``) of ``fields`` fields, over the bound."""
    return TooManyHeaderFields(
        f"{where} has {fields} fields; the limit is {MAX_HEADER_FIELDS}",
        count=fields,
        limit=MAX_HEADER_FIELDS,
    )


def section_too_long(size: int, *, where: str) -> HeaderTooLong:
    """The error for a header section (``where``) of ``size`` octets, over the bound."""
    return HeaderTooLong(
        f"{where} is {size} octets long; the limit is {MAX_HEADER_SECTION}",
        header="header section",
        size=size,
        limit=MAX_HEADER_SECTION,
    )


def too_many_parts(limit: int = MAX_PARTS) -> TooManyParts:
    """The error for a message with more than ``limit`` MIME entities."""
    return TooManyParts(
        f"the message has more than {limit} MIME parts (every entity counts, nested ones included)",
        limit=limit,
    )


MAX_STRUCTURED_TOKENS = 1000
"""Most words, runs of white space and special characters (RFC 5322 §3.2.3) in a
structured field of a stdlib message that the stdlib's parser reads and ours does not:
Content-Type, Content-Disposition, Content-Transfer-Encoding, MIME-Version, Message-ID,
and an attached entity's address field that is no address list we read (one we read is
not handed to the stdlib's parser).

The stdlib's structured parsers copy the rest of the value at every token (and search it
for "?="), so their work grows with the number of tokens times the length: a 60 KB
Content-Type of ``a; `` repeated cost 4 s of CPU per ``prepare()``. Real values have a few
dozen tokens (a long RFC 2047 filename, a few hundred); at this bound a value within
:data:`~mailstrom.message.headers.MAX_FIELD` costs the stdlib milliseconds. RFC 2045 and
RFC 2231 set no bound on the number of parameters."""

_STRUCTURED_TOKEN = re.compile(r'[^\s()<>@,;:\\"/\[\]?=.]+|\s+|.', re.DOTALL)


def structured_tokens(value: str) -> int | None:
    """The tokens of ``value`` when there are more than :data:`MAX_STRUCTURED_TOKENS`,
    else None (counted no further than the bound)."""
    for count, _ in enumerate(_STRUCTURED_TOKEN.finditer(value), start=1):
        if count > MAX_STRUCTURED_TOKENS:
            return count
    return None

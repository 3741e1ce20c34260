"""The "relaxed" canonicalisation of RFC 6376 §3.4.2 (headers) and §3.4.4 (body).

It works on the octets of a prepared message (CRLF line ends throughout), so UTF-8 header
text (RFC 6532) is canonicalised as the octets it is, as RFC 8616 §4 asks; only space and
tab are white space (WSP), never a non-ASCII space.
"""

from __future__ import annotations

import re

FIELD_END = re.compile(rb"\r\n(?![ \t])")
"""A line end that ends a header field: one not followed by WSP."""


def split_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """``(lower-case name, raw field)`` for each field of a header section.

    ``head`` is the header section up to and including the CRLF of its last field (not
    the empty line); each raw field keeps its folding and its final CRLF.
    """
    if head.endswith(b"\r\n"):
        head = head[:-2]
    if not head:
        return []
    # A field ends at a line end not followed by WSP (a folded continuation belongs to the
    # field before it). One split at C speed: adding each continuation line to its field's
    # bytes copied a long folded field once per line (0.4 s for a 1 MiB header section of
    # one-word lines).
    return [
        (raw.partition(b":")[0].rstrip(b" \t").lower(), raw + b"\r\n")
        for raw in FIELD_END.split(head)
    ]


def one_space(data: bytes) -> bytes:
    """``data`` with every run of WSP made one space (``data`` itself when it has none).

    Not by a regular expression: replacing each run of a text of millions (tab-separated
    values, 16 MiB of them) took seconds, of ``prepare`` and of the worker's event loop
    when it signs anew. Tabs become spaces, then each pass of ``bytes.replace`` halves
    every run of spaces: passes as many as the longest run has bits, each at C speed.
    """
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def relaxed_header(raw: bytes) -> bytes:
    """One header field (with or without its CRLF) canonicalised, ending with CRLF.

    The name is lower-cased, continuation lines unfolded, every run of WSP made one space,
    and WSP at the end of the value and around the colon removed (RFC 6376 §3.4.2).
    """
    name, _, value = raw.partition(b":")
    value = one_space(value.replace(b"\r\n", b""))
    return name.rstrip(b" \t").lower() + b":" + value.strip(b" ") + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """The body canonicalised (RFC 6376 §3.4.4): WSP at line ends removed, other WSP runs
    made one space, empty lines at the end removed; a non-empty result ends with CRLF and
    an empty body stays empty."""
    body = one_space(body)
    if b" \r\n" in body:
        body = body.replace(b" \r\n", b"\r\n")
    if body.endswith(b" "):
        body = body[:-1]
    # The input has CRLF line ends only, so stripping CR and LF removes whole empty lines.
    body = body.rstrip(b"\r\n")
    return body + b"\r\n" if body else b""

"""The octet-level rules every message ``prepare()`` returns must obey on the wire."""

from __future__ import annotations

MAX_LINE = 998
"""RFC 5322 §2.1.1, in octets, without the CRLF."""


def check_line_ends_and_lengths(data: bytes) -> None:
    """Assert that ``data`` ends with CRLF, holds no bare CR or LF (RFC 5321 §2.3.8) and
    no line longer than 998 octets."""
    assert data.endswith(b"\r\n")
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert max(len(line) for line in data.split(b"\r\n")) <= MAX_LINE

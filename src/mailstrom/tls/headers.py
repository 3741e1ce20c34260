"""What a message's own header says about TLS: ``TLS-Required: No`` (RFC 8689 §5), and
whether it is a TLS report (RFC 8460 §5.3)."""

from __future__ import annotations

import re

MAX_HEADER_SCAN = 256 * 1024
"""Octets of a message looked at for its header block; a header field further down is
not honoured (the limit only bounds the work a huge header could cause)."""

# RFC 8689 §5: "TLS-Required:" [FWS] "No" CRLF, where FWS may fold the line (RFC 5322
# §3.2.2: white space, a line break, then white space again).
_TLS_REQUIRED_NO = re.compile(rb"(?im)^tls-required:[ \t]*(?:\r\n[ \t]+)?no[ \t]*\r?$")
_TLS_REPORT_DOMAIN = re.compile(rb"(?im)^tls-report-domain:")


def tls_required_no(data: bytes) -> bool:
    """Whether ``data`` (a message with CRLF line endings) carries ``TLS-Required: No``:
    the sender asks that MTA-STS and DANE failures not stop delivery (RFC 8689 §5).

    >>> tls_required_no(b"Subject: x\\r\\nTLS-Required: No\\r\\n\\r\\nbody\\r\\n")
    True
    >>> tls_required_no(b"Subject: x\\r\\n\\r\\nTLS-Required: No\\r\\n")
    False
    """
    header = _header(data)
    # Nearly every message lacks the field: one substring search decides for those.
    if b"equired" not in header:
        return False
    return _TLS_REQUIRED_NO.search(header) is not None


def tls_report(data: bytes) -> bool:
    """Whether ``data`` (a message with CRLF line endings) is a TLS report: it carries
    the ``TLS-Report-Domain`` field RFC 8460 §5.3 gives a mailed report.

    >>> tls_report(b"TLS-Report-Domain: example.com\\r\\n\\r\\n")
    True
    """
    return _TLS_REPORT_DOMAIN.search(_header(data)) is not None


def _header(data: bytes) -> bytes:
    """The header block of ``data`` (at most :data:`MAX_HEADER_SCAN` octets of it)."""
    end = data.find(b"\r\n\r\n", 0, MAX_HEADER_SCAN)
    return data[: end + 2 if end >= 0 else MAX_HEADER_SCAN]

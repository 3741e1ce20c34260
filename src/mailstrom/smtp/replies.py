"""Parsing server replies: lines into (multi-line) replies, enhanced codes, EHLO keywords.

A reply is one or more lines ``DDD-text`` ending with one ``DDD text`` (RFC 5321 §4.2.1).
The parser accepts bytes split anywhere, byte by byte included, and refuses what would make
a client hang or grow without bound: a malformed line, a code that changes inside one
multi-line reply, a line longer than :data:`MAX_LINE` octets.
"""

from __future__ import annotations

import re

from mailstrom.errors import SMTPProtocolError
from mailstrom.status import SMTPReply

MAX_LINE = 64 * 1024
"""Longest reply line accepted (RFC 5321 §4.5.3.1.5 asks for 512; servers exceed it)."""
MAX_REPLY = 1024 * 1024
"""Largest multi-line reply accepted, in octets."""

# Code: first digit 2-5, second 0-5 (RFC 5321 §4.2); then SP, "-" or nothing ("250\r\n" is
# seen in the wild and harmless).
_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])(.*))?", re.DOTALL)
# RFC 3463: class.subject.detail at the start of the text.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: +|$)")


class ReplyParser:
    """Accumulates received bytes and returns complete replies, oldest first.

    >>> p = ReplyParser()
    >>> p.feed(b"250-mx.example\\r\\n250 PIPEL")
    >>> p.next_reply() is None
    True
    >>> p.feed(b"INING\\r\\n")
    >>> p.next_reply()
    SMTPReply(code=250, text='mx.example\\nPIPELINING', enhanced=None)
    """

    __slots__ = ("_buffer", "_code", "_lines", "_scanned", "_size")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer already known to hold no LF
        self._code: bytes | None = None  # code of the multi-line reply being read
        self._lines: list[bytes] = []
        self._size = 0

    @property
    def buffered(self) -> int:
        """Octets received but not yet part of a returned reply."""
        return len(self._buffer) + self._size

    def feed(self, data: bytes) -> None:
        """Add received bytes; raises :class:`SMTPProtocolError` on an over-long line."""
        self._buffer += data
        if len(self._buffer) > MAX_LINE and self._buffer.find(b"\n", self._scanned) < 0:
            raise SMTPProtocolError(f"reply line longer than {MAX_LINE} octets")

    def next_reply(self) -> SMTPReply | None:
        """The next complete reply, or None until more bytes arrive."""
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    raise SMTPProtocolError(f"reply line longer than {MAX_LINE} octets")
                self._scanned = len(self._buffer)
                return None
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scanned = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_LINE:
                raise SMTPProtocolError(f"reply line longer than {MAX_LINE} octets")
            match = _LINE.fullmatch(line)
            if match is None:
                raise SMTPProtocolError(f"malformed reply line: {line[:80]!r}")
            code, separator, text = match.group(1), match.group(2), match.group(3) or b""
            if self._code is not None and code != self._code:
                raise SMTPProtocolError(
                    f"reply code changed inside a multi-line reply: "
                    f"{self._code.decode()} then {code.decode()}"
                )
            self._code = code
            self._lines.append(text)
            self._size += len(line)
            if self._size > MAX_REPLY:
                raise SMTPProtocolError(f"reply longer than {MAX_REPLY} octets")
            if separator != b"-":
                lines, self._lines, self._code, self._size = self._lines, [], None, 0
                return make_reply(int(code), lines)


def make_reply(code: int, lines: list[bytes]) -> SMTPReply:
    """An :class:`SMTPReply` from a code and the raw text of each line.

    The RFC 3463 enhanced code is taken from the first line when its class matches the
    reply's, and removed from every line that repeats it (RFC 2034 §4 puts it on each).
    """
    texts = [raw.decode("utf-8", "replace") for raw in lines]
    enhanced = None
    match = _ENHANCED.match(texts[0]) if texts else None
    if match is not None and int(match.group(1)) == code // 100:
        enhanced = ".".join(match.group(1, 2, 3))
        texts = [_strip_enhanced(t, enhanced) for t in texts]
    return SMTPReply(code=code, text="\n".join(texts), enhanced=enhanced)


def _strip_enhanced(text: str, enhanced: str) -> str:
    match = _ENHANCED.match(text)
    if match is not None and ".".join(match.group(1, 2, 3)) == enhanced:
        return text[match.end() :]
    return text


def parse_ehlo(reply: SMTPReply) -> dict[str, str]:
    """EHLO keywords (upper-cased) mapped to their parameters, per RFC 5321 §4.1.1.1.

    The first line is the server's name and is skipped. The pre-standard ``AUTH=LOGIN``
    form is read as ``AUTH`` when no proper ``AUTH`` line is present.

    >>> parse_ehlo(SMTPReply(code=250, text="mx\\nSIZE 1000\\nAUTH PLAIN LOGIN\\n8BITMIME"))
    {'SIZE': '1000', 'AUTH': 'PLAIN LOGIN', '8BITMIME': ''}
    """
    extensions: dict[str, str] = {}
    legacy_auth: str | None = None
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if not keyword:
            continue
        if keyword.startswith("AUTH="):
            legacy_auth = " ".join(filter(None, (keyword[5:], params.strip())))
            continue
        extensions[keyword] = params.strip()
    if legacy_auth is not None and "AUTH" not in extensions:
        extensions["AUTH"] = legacy_auth
    return extensions

"""Parsing server replies: lines into (multi-line) replies, enhanced codes, EHLO keywords.

A reply is one or more lines ``DDD-text`` ending with one ``DDD text`` (RFC 5321 §4.2.1).
The parser accepts bytes split anywhere, byte by byte included, and refuses what would make
a client hang or grow without bound: a malformed line, a code that changes inside one
multi-line reply, a line longer than :data:`MAX_LINE` octets, a reply longer than
:data:`MAX_REPLY` octets or of more than :data:`MAX_LINES` lines.
"""

from __future__ import annotations

import re

from mailstrom.errors import SMTPProtocolError
from mailstrom.safetext import safe_decode
from mailstrom.status import SMTPReply

MAX_LINE = 64 * 1024
"""Longest reply line accepted (RFC 5321 §4.5.3.1.5 asks for 512; servers exceed it)."""
MAX_REPLY = 1024 * 1024
"""Largest multi-line reply accepted, in octets."""
MAX_LINES = 4096
"""Most lines in one reply. Each line costs objects besides its octets (its bytes, then its
text): without this bound, a reply of tiny lines under :data:`MAX_REPLY` held a dozen
times its size."""
MAX_TEXT = 4096
"""Characters of a reply's text that the session hands out
(:meth:`~mailstrom.smtp.session.ClientSession.next_answer`); the rest is dropped once an
EHLO reply's keywords are read from the whole. A transaction keeps the reply to each of
its RCPTs until it ends, up to ``max_recipients`` (1,000) of them: whole, a server that
answered each with a reply of :data:`MAX_REPLY` octets had the worker hold a gigabyte.
RFC 5321 §4.5.3.1.5 allows 512 octets a line; stores keep 2,048 octets of a reply
(:data:`~mailstrom.stores.base.MAX_REPLY_TEXT`), as Postfix does."""
MAX_EHLO_KEYWORDS = 64
"""EHLO keywords read at most (:func:`parse_ehlo`); those after are ignored. A session
keeps the keywords for as long as its connection lives, idle in the cache included: read
whole from an EHLO reply of :data:`MAX_REPLY` octets, a server announcing thousands of
long keywords had each connection to it hold more than a megabyte. The SMTP service
extensions IANA registers number about fifty; servers announce a dozen."""
MAX_EHLO_LINE = 512
"""Characters of an EHLO line read at most: RFC 5321 §4.5.3.1.5's reply line. A longer
one (an ehlo-line is a keyword and its parameters) is ignored, as a line that is not
ASCII is."""
MAX_QUOTED = 200
"""Characters of a reply's text that an error about it quotes (:func:`quote_reply`)."""

# Code: first digit 2-5, second 0-5 (RFC 5321 §4.2); then SP, "-" or nothing ("250\r\n" is
# seen in the wild and harmless).
_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])(.*))?", re.DOTALL)
# RFC 3463: class.subject.detail at the start of the text. re.ASCII: the code is ASCII
# digits; a str pattern's \d would take "5.\u0661.1", which a bounce notice cannot carry.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: +|$)", re.ASCII)
# Reply classes that carry an enhanced code of the same class (RFC 3463: 2, 4 and 5).
_CLASS = {2: "2", 4: "4", 5: "5"}
# Single-line replies already parsed, by their raw line (CR LF included): servers repeat
# the same few lines ("250 2.1.0 Ok", "354 End data ...") for every transaction. SMTPReply
# is immutable, so one object serves every parser (and thread). Bounded in lines and in the
# length of each, so a peer sending ever different lines only makes it start over.
_KNOWN_LINE = 128
"""Lines (with their LF) shorter than this many octets are remembered."""
_KNOWN_MAX = 512
"""Lines remembered at most; the memory is emptied when it is full."""
_known: dict[bytes, SMTPReply] = {}


def _remember(raw: bytes, reply: SMTPReply) -> None:
    if len(_known) >= _KNOWN_MAX:
        _known.clear()
    _known[raw] = reply


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
        if _too_long(self._buffer) and self._buffer.find(b"\n", self._scanned) < 0:
            raise SMTPProtocolError(f"reply line longer than {MAX_LINE} octets")

    def next_reply(self) -> SMTPReply | None:
        """The next complete reply, or None until more bytes arrive."""
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", self._scanned)
            if end < 0:
                if _too_long(buffer):
                    raise SMTPProtocolError(f"reply line longer than {MAX_LINE} octets")
                self._scanned = len(buffer)
                return None
            self._scanned = 0
            raw: bytes | None = None
            if self._code is None and end < _KNOWN_LINE:
                # A short line outside a multi-line reply: most likely one seen before
                # ("250 2.1.5 Ok" for every RCPT), whose reply is already made.
                raw = bytes(buffer[: end + 1])
                del buffer[: end + 1]
                known = _known.get(raw)
                if known is not None:
                    return known
                line = raw[: -2 if end and raw[-2] == 13 else -1]  # no CR, no LF
            else:
                line = bytes(buffer[: end - 1 if end and buffer[end - 1] == 13 else end])
                del buffer[: end + 1]
                if len(line) > MAX_LINE:
                    raise SMTPProtocolError(f"reply line longer than {MAX_LINE} octets")
            # Fast path, the common case: a whole single-line reply "DDD SP text". Bytes
            # indexing gives ints: first digit 2-5, second 0-5, third 0-9, then a space.
            if (
                self._code is None
                and len(line) > 3
                and line[3] == 32
                and 50 <= line[0] <= 53
                and 48 <= line[1] <= 53
                and 48 <= line[2] <= 57
            ):
                code = (line[0] - 48) * 100 + (line[1] - 48) * 10 + line[2] - 48
                single = _single_reply(code, safe_decode(line[4:]))
                if raw is not None:
                    _remember(raw, single)
                return single
            reply = self._add_line(line)
            if reply is not None:
                return reply

    def _add_line(self, line: bytes) -> SMTPReply | None:
        """One line of any form; the reply when it was the last line of one."""
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
        if len(self._lines) > MAX_LINES:
            raise SMTPProtocolError(f"reply of more than {MAX_LINES} lines")
        if separator == b"-":
            return None
        lines, self._lines, self._code, self._size = self._lines, [], None, 0
        return make_reply(int(code), lines)


def _too_long(partial: bytearray) -> bool:
    """Whether ``partial``, a line whose LF has not come yet, is longer than
    :data:`MAX_LINE` already. Its last octet may be the CR of its CR LF, which the bound
    does not count: whether a line is refused must not depend on where the bytes split."""
    size = len(partial)
    return size > MAX_LINE and (size > MAX_LINE + 1 or partial[-1] != 13)


def make_reply(code: int, lines: list[bytes]) -> SMTPReply:
    """An :class:`SMTPReply` from a code and the raw text of each line.

    The RFC 3463 enhanced code is taken from the first line when its class matches the
    reply's, and removed from every line that repeats it (RFC 2034 §4 puts it on each).
    """
    texts = [safe_decode(raw) for raw in lines]
    if len(texts) == 1:
        return _single_reply(code, texts[0])
    klass = _CLASS.get(code // 100)
    enhanced = None
    if klass is not None and texts:
        enhanced, first = _split_enhanced(texts[0], klass)
        if enhanced is not None:
            texts[0] = first
            for i in range(1, len(texts)):
                repeated, rest = _split_enhanced(texts[i], klass)
                if repeated == enhanced:
                    texts[i] = rest
    return SMTPReply(code=code, text="\n".join(texts), enhanced=enhanced)


def _single_reply(code: int, text: str) -> SMTPReply:
    klass = _CLASS.get(code // 100)
    if klass is None:
        return SMTPReply(code=code, text=text)
    enhanced, text = _split_enhanced(text, klass)
    return SMTPReply(code=code, text=text, enhanced=enhanced)


def _split_enhanced(text: str, klass: str) -> tuple[str | None, str]:
    """(enhanced code, rest of the text) when ``text`` starts with an enhanced code of
    class ``klass``, else (None, text); exactly what :data:`_ENHANCED` would find.

    The usual "2.1.5 OK" is taken apart with string methods; anything unusual goes to the
    regex, which agrees with them (ASCII digits only).
    """
    if text[:1] != klass or text[1:2] != ".":
        return None, text  # the regex cannot match, or matches another class
    token, _, rest = text.partition(" ")
    parts = token.split(".")
    if len(parts) == 3 and token.isascii():
        subject, detail = parts[1], parts[2]
        if (
            0 < len(subject) <= 3
            and 0 < len(detail) <= 3
            and subject.isdigit()
            and detail.isdigit()
        ):
            return token, rest.lstrip(" ")
    match = _ENHANCED.match(text)
    if match is None:
        return None, text
    return ".".join(match.group(1, 2, 3)), text[match.end() :]


def quote_reply(reply: SMTPReply) -> str:
    """``reply`` as an error quotes it: its codes and at most :data:`MAX_QUOTED`
    characters of its text, "…" standing for the rest. A reply that breaks the protocol
    may be as long as the parser takes (:data:`MAX_REPLY`): quoted whole, a hostile
    server had the client hold, and log, a megabyte per error.

    >>> quote_reply(SMTPReply(code=354, text="x" * 500))[-5:]
    'xxxx…'
    """
    text = reply.text
    if len(text) <= MAX_QUOTED:
        return str(reply)
    cut = SMTPReply(code=reply.code, text=text[:MAX_QUOTED], enhanced=reply.enhanced)
    return f"{cut}…"


def parse_ehlo(reply: SMTPReply) -> dict[str, str]:
    """EHLO keywords (upper-cased) mapped to their parameters, per RFC 5321 §4.1.1.1.

    The first line is the server's name and is skipped. The pre-standard ``AUTH=LOGIN``
    form is read as ``AUTH`` when no proper ``AUTH`` line is present. At most
    :data:`MAX_EHLO_KEYWORDS` keywords are read, from lines of at most
    :data:`MAX_EHLO_LINE` characters.

    >>> parse_ehlo(SMTPReply(code=250, text="mx\\nSIZE 1000\\nAUTH PLAIN LOGIN\\n8BITMIME"))
    {'SIZE': '1000', 'AUTH': 'PLAIN LOGIN', '8BITMIME': ''}
    """
    extensions: dict[str, str] = {}
    legacy_auth: str | None = None
    for line in reply.text.split("\n")[1:]:
        if not line.isascii() or len(line) > MAX_EHLO_LINE:
            # An ehlo-line is ASCII (RFC 5321 §4.1.1.1). Other text would be read as what
            # it is not: str.strip() takes U+3000 ("SIZE 1000\u3000" was a limit),
            # str.upper() makes "\u017ftarttls" STARTTLS and "PLA\u0131N" PLAIN.
            continue
        # SP separates the keyword and its parameters (RFC 5321 §4.1.1.1); HTAB is read
        # as one too, as Postfix's client and smtplib read it: taken for a part of the
        # keyword, it hid the SIZE limit or AUTH mechanisms after it.
        keyword, _, params = line.replace("\t", " ").strip().partition(" ")
        keyword = keyword.upper()
        if not keyword:
            continue
        if keyword.startswith("AUTH="):
            legacy_auth = " ".join(filter(None, (keyword[5:], params.strip())))
            continue
        if len(extensions) >= MAX_EHLO_KEYWORDS and keyword not in extensions:
            continue
        extensions[keyword] = params.strip()
    if legacy_auth is not None and "AUTH" not in extensions:
        extensions["AUTH"] = legacy_auth
    return extensions

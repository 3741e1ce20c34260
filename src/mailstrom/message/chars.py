"""Which characters may appear in header values, names and bodies.

One rule for every header value, whatever its source (an ``Email`` field, an
``EmailMessage`` header or a raw header line): CR and LF are :class:`HeaderInjection`;
NUL, the other C0 controls except TAB, DEL, the C1 controls (U+0085 NEL among them) and
the Unicode line and paragraph separators are :class:`ForbiddenCharacter`.

Why so strict: mail software disagrees on what these characters mean. Postfix cuts a
header line at a NUL (``filename="invoice.exe\\0.pdf"`` arrives as ``invoice.exe``);
Python's ``str.splitlines`` and so the stdlib header parser treat VT, FF, FS to US, NEL and
U+2028/U+2029 as line breaks, which silently rewrote ``c@exa\\x0bmple.org`` into
``c@example.org``. A value that different readers read differently is refused.
"""

from __future__ import annotations

import re

from mailstrom.errors import ForbiddenCharacter, HeaderInjection

# C0 controls but TAB; DEL and C1; line and paragraph separators; lone surrogates.
_BAD_TEXT = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# _BAD_TEXT but CR and LF (a header injection, refused) and lone surrogates (no text).
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
# The same for raw header octets (TAB allowed; CR and LF are handled by the line splitter).
_BAD_OCTETS = re.compile(b"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

ASCII_LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e"
"""The ASCII characters ``str.splitlines`` breaks a line at: CR, LF, VT, FF, FS, GS, RS."""
OTHER_LINE_BREAKS = re.compile(f"[{ASCII_LINE_BREAKS[2:]}\x85\u2028\u2029]")
"""What ``str.splitlines`` breaks lines at besides CR and LF: VT, FF, FS, GS, RS, NEL,
U+2028, U+2029."""

_NAMES = {"\0": "NUL", "\x0b": "VT", "\x0c": "FF", "\x7f": "DEL", "\x85": "NEL"}


def describe(char: str) -> str:
    """``U+000B VT``: how a character is named in error messages."""
    name = _NAMES.get(char)
    code = f"U+{ord(char):04X}"
    return f"{code} {name}" if name else code


def check_header_text(where: str, value: str) -> None:
    """Raise unless ``value`` may appear in the header (or name, filename) ``where``."""
    match = _BAD_TEXT.search(value)
    if match is None:
        return
    char = match.group()
    if char in "\r\n":
        raise HeaderInjection(
            f"{where} header value contains a CR or LF character: {shorten(value)}",
            header=where,
        )
    if "\ud800" <= char <= "\udfff":
        raise ForbiddenCharacter(
            f"{where} contains a lone surrogate ({describe(char)}), which has no UTF-8 form",
            where=where,
        )
    raise ForbiddenCharacter(
        f"{where} contains the control character {describe(char)} at position "
        f"{match.start()}; header values may not hold control characters other than TAB",
        where=where,
    )


def replace_controls(value: str, replacement: str) -> str:
    """``value`` with ``replacement`` for each control character :func:`check_header_text`
    refuses but CR and LF, which it refuses as a header injection (and a lone surrogate,
    which is no text): NUL, ESC, DEL, C1, VT, FF, U+2028... TAB is kept."""
    return _CONTROLS.sub(replacement, value)


def check_other_line_breaks(where: str, value: str) -> None:
    """Raise :class:`ForbiddenCharacter` if ``value``, a header value as a stdlib message
    holds it (a raw string), has a character ``str.splitlines`` breaks lines at other
    than CR and LF: VT, FF, FS, GS, RS, NEL, U+2028, U+2029.

    The stdlib's writer splits such a value with ``splitlines`` and writes each piece as
    a line of its own, so ``"v\\x0bX-Injected: 1"`` became a header field; the octets it
    writes hold no trace of the character for the raw path's checks to see.
    """
    match = OTHER_LINE_BREAKS.search(value)
    if match is not None:
        char = match.group()
        raise ForbiddenCharacter(
            f"the {where} header value contains {describe(char)}, which the standard "
            f"library writes as a line break: {shorten(value)}",
            where=where,
        )


def bad_header_octet(data: bytes, start: int, end: int) -> int:
    """Offset of the first control octet of ``data[start:end]`` that no header line may
    hold (CR and LF aside, as line ends), or -1."""
    match = _BAD_OCTETS.search(data, start, end)
    return -1 if match is None else match.start()


def bad_header_char(text: str) -> str | None:
    """The first character of ``text``, a decoded header section, that no header value
    may hold (CR and LF aside, as line ends): DEL and C1 (NEL), the Unicode line and
    paragraph separators; None when there is none."""
    match = _BAD_TEXT.search(text.replace("\r\n", ""))
    return None if match is None else match.group()


def check_header_octets(where: str, line: bytes) -> None:
    """Raise :class:`ForbiddenCharacter` for a control octet in a raw header line."""
    match = _BAD_OCTETS.search(line)
    if match is not None:
        char = match.group().decode("ascii")
        raise ForbiddenCharacter(
            f"the {where} header contains the control character {describe(char)}; header "
            "values may not hold control characters other than TAB",
            where=where,
        )


def utf8_encodable(text: str) -> bool:
    """Whether ``text`` has a UTF-8 form (holds no lone surrogate, which an environment
    variable or a file name read from a Latin-1 shell does)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_encodable(where: str, text: str) -> None:
    """Raise :class:`ForbiddenCharacter` if ``text`` holds a lone surrogate (no UTF-8 form)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        raise ForbiddenCharacter(
            f"{where} contains a lone surrogate ({describe(char)}) at position {exc.start}, "
            "which has no UTF-8 form",
            where=where,
        ) from None


def shorten(value: str | bytes, limit: int = 120) -> str:
    """``repr(value)``, cut in the middle when longer than ``limit``, for error messages.
    The repr is what is bounded: escapes make it up to ten times the value's length."""
    text = repr(value)
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}…({len(text) - limit} more)…{text[-half:]}"

"""Text from outside (a peer's reply, a bounce report, a DNS record, an MTA-STS policy)
made safe to store, log and show.

Such text must not carry control characters but TAB: NUL cannot be stored in a
PostgreSQL text column, and ESC sequences rewrite the terminal of whoever reads the text.
Unicode's line and paragraph separators and its bidirectional controls (Bidi_Control: the
embeddings, overrides and isolates, and the marks LRM, RLM and ALM, which reorder the
digits and punctuation around them), which change what a reader sees, go too, and so do
lone surrogates (an undecodable octet kept with ``errors="surrogateescape"``), which no
terminal or database can encode. Each becomes U+FFFD, as undecodable octets do when bytes
are decoded with ``errors="replace"``.

>>> safe_text("queued as \\x00abc \\x1b[31mred")
'queued as \\ufffdabc \\ufffd[31mred'
>>> safe_text("caf\\u00e9\\tok")
'café\\tok'
"""

from __future__ import annotations

import re

BIDI_CONTROLS = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
"""Unicode's Bidi_Control property (PropList.txt) whole, as a regular expression's
character class body: U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069 (cli.output
shows them escaped)."""

UNICODE_CONTROLS = f"\x7f-\x9f\u2028\u2029{BIDI_CONTROLS}"
"""DEL, the C1 controls (U+009B is a CSI to some terminals), the line and paragraph
separators and the bidirectional controls, as a character class body: what JSON written
with ``ensure_ascii=False`` leaves as it is of the unsafe characters but lone surrogates
(it escapes the C0 controls itself)."""

_UNSAFE = re.compile(f"[\x00-\x08\x0a-\x1f{UNICODE_CONTROLS}\ud800-\udfff]")
_JSON_UNSAFE = re.compile(f"[{UNICODE_CONTROLS}\ud800-\udfff]")
_BIDI = re.compile(f"[{BIDI_CONTROLS}\ud800-\udfff]")


def bidi_escaped(text: str) -> str:
    r"""``text`` with each bidirectional control as a ``\uXXXX`` escape: for a page,
    where they would show the text around them in another order than it reads
    (CVE-2021-42574), while other control characters change nothing a reader sees. A
    lone surrogate (an octet of a stored value that was not UTF-8) too: no page can
    encode one, and it failed the page as a whole.

    >>> bidi_escaped("invoice\u202efdp.exe")
    'invoice\\u202efdp.exe'
    """
    if text.isprintable():
        return text
    return _BIDI.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def escaped_json(text: str) -> str:
    """``text``, JSON written with ``ensure_ascii=False``, with each unsafe character that
    JSON leaves as it is (DEL, C1 controls such as U+009B, a CSI to some terminals, the
    line separators, the bidirectional ones, lone surrogates) as a ``\\uXXXX`` escape:
    the same JSON value, shown as written. A line break or tab in ``text`` is layout
    (``json.dumps(..., indent=2)``) and stays: JSON writes those in strings as escapes.

    >>> escaped_json('"a\u202eb"')
    '"a\\\\u202eb"'
    """
    if text.isprintable():
        return text
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def safe_text(text: str) -> str:
    """``text`` with every unsafe character (see the module) replaced by U+FFFD."""
    # isprintable() is one C-level pass, true for almost every text met; it is false for
    # every character _UNSAFE matches (and for some harmless ones, like U+00A0).
    return text if text.isprintable() else _UNSAFE.sub("\ufffd", text)


def is_safe(text: str) -> bool:
    """Whether ``text`` holds no unsafe character: what input meant to be shown (a note, a
    reason) is checked with before it is kept.

    >>> is_safe("gone\tfor good"), is_safe("gone\x1b[2J")
    (True, False)
    """
    return text.isprintable() or _UNSAFE.search(text) is None


def safe_decode(raw: bytes) -> str:
    """``raw`` decoded as UTF-8 (U+FFFD for what is not) and made safe."""
    return safe_text(raw.decode("utf-8", "replace"))

"""Outside text made safe: nothing that moves a terminal or breaks a store survives."""

from __future__ import annotations

import doctest
import io
import json
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

import mailstrom.safetext
from mailstrom.cli.output import print_json, visible
from mailstrom.safetext import escaped_json, is_safe, safe_decode, safe_text

# The line separators, and Unicode's Bidi_Control property (PropList.txt): ALM, LRM, RLM,
# the embeddings and overrides, the isolates.
_BIDI_CONTROL = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_INVISIBLE = {"\u2028", "\u2029", *_BIDI_CONTROL}


def unsafe(c: str) -> bool:
    return (unicodedata.category(c) == "Cc" and c != "\t") or c in _INVISIBLE


def test_examples() -> None:
    assert doctest.testmod(mailstrom.safetext).failed == 0


@given(st.text())
def test_every_unsafe_character_and_nothing_else_is_replaced(text: str) -> None:
    out = safe_text(text)
    assert len(out) == len(text)
    for before, after in zip(text, out, strict=True):
        assert after == ("\ufffd" if unsafe(before) else before)


@given(st.binary())
def test_any_bytes_decode_to_safe_text(raw: bytes) -> None:
    assert not any(unsafe(c) for c in safe_decode(raw))


def test_the_bidi_marks_are_replaced() -> None:
    """RLM, LRM and ALM are strong directional characters: "1 2 3" between two RLMs shows
    as "3 2 1", so a reply or report holding them reads in another order than it is; they
    were kept while the overrides went."""
    for mark in "\u061c\u200e\u200f":
        assert safe_text(f"550 {mark}1 2{mark}") == "550 \ufffd1 2\ufffd"
        assert not is_safe(f"bob{mark}@example.org")
        assert escaped_json(f'"a{mark}b"') == f'"a\\u{ord(mark):04x}b"'


def test_the_same_characters_as_the_cli_shows_as_escapes() -> None:
    """What is kept out of stored text and log lines is what the CLI's views escape (TAB
    aside, which stored text keeps): one set, not two that drift apart."""
    for code in range(0x110000):
        c = chr(code)
        if c != "\t":
            assert (safe_text(c) != c) == (visible(c) != c), f"U+{code:04X}"


def test_escaped_json_keeps_the_layout_of_indented_json() -> None:
    """``print_json`` escapes what ``escaped_json`` does, by calling it, not by a second
    copy of the set; ``escaped_json`` escaped C0 controls too, which JSON has only as
    layout (indented), making it ``\\u000a`` outside any string: no JSON at all."""
    value = {"a": ["x\u202ey\n\x1b\x9b\u2028", "\t"], "b": 1}
    text = json.dumps(value, indent=2, ensure_ascii=False)
    escaped = escaped_json(text)
    assert json.loads(escaped) == value
    assert "\n  " in escaped and "\\u202e" in escaped and "\\u009b" in escaped
    out = io.StringIO()
    print_json(value, out)
    assert out.getvalue() == escaped + "\n"

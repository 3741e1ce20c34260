"""Outside text made safe: nothing that moves a terminal or breaks a store survives."""

from __future__ import annotations

import doctest
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

import mailstrom.safetext
from mailstrom.safetext import safe_decode, safe_text

_INVISIBLE = set("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


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

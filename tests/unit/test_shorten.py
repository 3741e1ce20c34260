"""``shorten``: how error messages quote a value they were given, bounded."""

from __future__ import annotations

import pytest

from mailstrom.message.chars import shorten


@pytest.mark.parametrize(
    "value",
    ["plain", "x" * 1000, "\U000101fe" * 300, "\x00" * 500, b"\xff" * 400, "é\n" * 300],
    ids=["short", "long", "astral", "nul", "bytes", "mixed"],
)
def test_the_quote_is_bounded_whatever_the_characters(value: str | bytes) -> None:
    quoted = shorten(value, 100)
    # The middle's note ("…(N more)…") is the only thing past the bound.
    assert len(quoted) <= 100 + len("…() more)…") + len(str(len(repr(value))))
    assert quoted.startswith(repr(value)[:10])
    assert quoted.isprintable()


def test_a_short_value_is_its_repr() -> None:
    assert shorten("mx.example.org") == "'mx.example.org'"
    assert shorten(b"\x00") == "b'\\x00'"

"""The doctor's linear-work replacements of two pyspf steps give pyspf's own answers.

:mod:`mailstrom.doctor.spfexpand` reads domain-specs and expands macros in work linear in
the text; here, on texts short enough for pyspf's quadratic steps, both are compared with
pyspf's: the same text, or the same error.
"""

from __future__ import annotations

import hypothesis
import pytest
from hypothesis import strategies as st

from mailstrom.doctor.spfexpand import _DOMAIN_END, check_domain_end, expanded

spf = pytest.importorskip("spf")

_PIECES = st.sampled_from(
    [".", "..", "-", "_", "a", "Z", "0", "9", "x1", "%", "%%", "%_", "%-", "%{", "}",
     "%{d}", "%{D2}", "%{ir}", "%{l-}", "%{s}", "%{O1r.}", "%{i}", "%{v}", "%{h}", "%{c}",
     "%{r}", "%{t}", "%{x}", "%{}", "%{d0}", "\n", " ", "com", ".org.", "é"]
)  # fmt: skip
_TEXTS = st.lists(_PIECES, max_size=24).map("".join)


def _query() -> object:
    return spf.query(i="192.0.2.10", s="Strong-Bad@Mail.Example.com", h="mx.example.org")


def _outcome(call: object) -> tuple[str, str]:
    try:
        return ("ok", str(call()))  # type: ignore[operator]
    except spf.PermError as exc:
        return ("permerror", str(exc))


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(text=_TEXTS)
def test_domain_end_splits_as_pyspf(text: str) -> None:
    assert _DOMAIN_END.split(text) == spf.RE_TOPLAB.split(text)
    ours = _outcome(lambda: check_domain_end(spf, text))
    assert ours[0] == ("permerror" if spf.RE_TOPLAB.split(text)[-1] else "ok")


def _fitted(name: str) -> str:
    """RFC 7208 §7.3, label by label: the labels on the left go until 253 are left."""
    while len(name) > 253 and "." in name:
        name = name.partition(".")[2]
    return name


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(text=_TEXTS, stripdot=st.booleans())
def test_expansion_is_pyspfs(text: str, stripdot: bool) -> None:
    # pyspf's, but for a result still longer than a name once pyspf removed its first
    # label: then the others go too, as RFC 7208 §7.3 says.
    mine, theirs = _query(), _query()
    status, pyspfs = _outcome(lambda: spf.query.expand(theirs, text, stripdot))
    expected = (status, _fitted(pyspfs) if status == "ok" else pyspfs)
    assert _outcome(lambda: expanded(spf, mine, text, stripdot)) == expected


def test_long_expansion_loses_labels_on_the_left_until_it_fits() -> None:
    # RFC 7208 §7.3: "the left side is truncated to fit, by removing successive domain
    # labels (and their following dots) until the total length does not exceed 253
    # characters". pyspf removes one, and left 316 characters here: no name at all.
    text = "%{d}." + "b" * 60 + "." + ".".join(["c" * 60] * 4)
    assert len(spf.query.expand(_query(), text, True)) > 253
    assert expanded(spf, _query(), text, True) == ".".join(["c" * 60] * 4)
    # Exactly 253 left, or the last label alone when even that is longer.
    assert expanded(spf, _query(), "x." + "y" * 251 + ".z", True) == "y" * 251 + ".z"
    assert expanded(spf, _query(), "x.y." + "z" * 300, True) == "z" * 300


@pytest.mark.timeout(20)
def test_long_expansion_is_truncated_in_linear_work() -> None:
    # An included record's %{d} is its own domain: here 122 labels, expanded 16,000 times
    # by a 64 KiB record, some 2,000,000 labels to remove. Removed one at a time, each
    # removal a copy of what was left, they took over two minutes.
    domain = "a." * 120 + "example.com"
    query = spf.query(i="192.0.2.10", s=f"postmaster@{domain}", h="mx.example.org")
    assert expanded(spf, query, "%{d}." * 16_000, True) == domain


@pytest.mark.timeout(20)  # the fault was work growing as the square of the unclosed macros
def test_unclosed_macros_are_read_in_linear_work() -> None:
    # Each "%{" after the text's last "}" was a search to the end of the text that failed:
    # 1.7 s of CPU for a check of a 60,000-character record, here minutes.
    text = "a:x" + "%{" * 300_000
    with pytest.raises(spf.PermError):
        check_domain_end(spf, text)
    assert expanded(spf, _query(), text, True) == text  # no macro in it: as written

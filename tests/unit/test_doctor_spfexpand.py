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


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(text=_TEXTS, stripdot=st.booleans())
def test_expansion_is_pyspfs(text: str, stripdot: bool) -> None:
    mine, theirs = _query(), _query()
    assert _outcome(lambda: expanded(spf, mine, text, stripdot)) == _outcome(
        lambda: spf.query.expand(theirs, text, stripdot)
    )


def test_long_expansion_drops_its_first_label_as_pyspf() -> None:
    text = "%{d}." + "b" * 60 + "." + ".".join(["c" * 60] * 4)
    assert expanded(spf, _query(), text, True) == spf.query.expand(_query(), text, True)


@pytest.mark.timeout(20)  # the fault was work growing as the square of the unclosed macros
def test_unclosed_macros_are_read_in_linear_work() -> None:
    # Each "%{" after the text's last "}" was a search to the end of the text that failed:
    # 1.7 s of CPU for a check of a 60,000-character record, here minutes.
    text = "a:x" + "%{" * 300_000
    with pytest.raises(spf.PermError):
        check_domain_end(spf, text)
    assert expanded(spf, _query(), text, True) == text  # no macro in it: as written

"""The standard library's lenient address-list reader, made safe for hostile text.

``email.utils.getaddresses`` guesses where mailstrom's own parser
(:mod:`mailstrom.message.addresses`) refuses, which is what a bounce report from anyone,
or a ``sendmail -t`` message the application wrote loosely, needs. But it reads a group
(``name: a@b, c@d;``) by recursion, one level per colon, and a comment one level per
opening parenthesis: a field of a few hundred of either raised RecursionError, and
several fields read joined let a quote left open in one expose the next one's. Here each
field is read on its own, and one nested past :data:`MAX_NESTING` is read with its colons
and parentheses as spaces: no real field has that many, and a token in such garbage is
still found.
"""

from __future__ import annotations

from collections.abc import Iterable
from email.utils import getaddresses

MAX_NESTING = 100
"""Colons and opening parentheses a field may hold and still be read as written."""
_NO_NESTING = str.maketrans(":()", "   ")


def address_pairs(values: Iterable[str]) -> list[tuple[str, str]]:
    """``getaddresses(values)``, each value read alone and its nesting bounded.

    >>> address_pairs(["Bob <bob@example.org>, carol@example.org", "a:" * 5000])[:2]
    [('Bob', 'bob@example.org'), ('', 'carol@example.org')]
    """
    pairs: list[tuple[str, str]] = []
    for value in values:
        if value.count(":") + value.count("(") > MAX_NESTING:
            value = value.translate(_NO_NESTING)
        pairs += getaddresses([value])
    return pairs

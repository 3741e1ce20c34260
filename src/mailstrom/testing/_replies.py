"""The rules a receiving server answers by, checked where they are set.

A rule (:data:`Rule`) is a reply line, or a list of them used one per command with the
last one repeating (:class:`Repeated` for one reply many times over); ``rcpt_replies`` is a
:class:`_Rules` dict that checks its rules and restarts each when set again. A stall or
drop point (:func:`_stall_point`) names where a server stops answering or hangs up. The
servers are in :mod:`mailstrom.testing.smtp`.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import Any, cast, overload

Rule = str | Sequence[str]
"""A reply line, or replies used one per command with the last one repeating (a list;
:class:`Repeated` for one reply many times over)."""


class Repeated(Sequence[str]):
    """``reply`` ``times`` over, then ``then``: the rule ``[reply] * times + [then]`` in
    constant memory (``FakeMX.defer(address, times=n)`` builds one; the list took 8 MB
    for a million, and failed for more); ``times`` is a whole number, 0 or more
    (:class:`ValueError` otherwise). Read-only, as a rule in use should be."""

    __slots__ = ("reply", "then", "times")

    def __init__(self, reply: str, times: int, then: str) -> None:
        # Checked here: a count below 0 made len() 0, refused where the rule was set as
        # "an empty list of replies", a list the test never wrote.
        if isinstance(times, bool) or not isinstance(times, int) or times < 0:
            raise ValueError(
                f"Repeated(times=...) must be a whole number of at least 0, got {times!r}"
            )
        self.reply = reply
        self.times = times
        self.then = then

    def __len__(self) -> int:
        # len() must fit an index: past that many turns, it is ``reply`` for ever anyway.
        return min(self.times, sys.maxsize - 1) + 1

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size = len(self)
        position = index + size if index < 0 else index
        if not 0 <= position < size:
            raise IndexError("Repeated index out of range")
        return self.reply if position < self.times else self.then

    def __repr__(self) -> str:
        return f"[{self.reply!r}] * {self.times} + [{self.then!r}]"


def _rule(rule: Rule | None, where: str) -> Rule | None:
    """``rule``, checked where it is set: an empty list gives no reply, and the command it
    was for failed inside aiosmtpd (an IndexError, a 500 to the client)."""
    if rule is None or isinstance(rule, str):
        return rule
    if not isinstance(rule, Sequence):
        raise TypeError(f"{where}: a reply line or a list of them, not {rule!r}")
    if len(rule) == 0:
        raise ValueError(f"{where}: an empty list of replies gives no reply; give one at least")
    return rule


class _Rules(dict[str, Rule]):
    """``rcpt_replies``: a dict whose rules are checked as they are set (:func:`_rule`),
    each starting from its first reply. Every setting gets a new :meth:`stamp`, which a
    server compares with the one its turn in the rule began at: so every server using
    the dict starts over, where a restart told to the server that made it left another
    (``mx2.rcpt_replies = mx1.rcpt_replies``) going on where it was."""

    def __init__(self) -> None:
        super().__init__()
        self._stamps: dict[str, int] = {}
        self._settings = itertools.count(1)

    def __setitem__(self, address: str, rule: Rule) -> None:
        # None (which reads as no rule, so accept) is kept as it always was.
        super().__setitem__(address, cast(Rule, _rule(rule, f"rcpt_replies[{address!r}]")))
        self._stamps[address] = next(self._settings)

    def stamp(self, address: str) -> int:
        """Which setting of ``address``'s rule is in force (0: none through this dict)."""
        return self._stamps.get(address, 0)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for address, rule in dict(*args, **kwargs).items():
            self[address] = rule

    def setdefault(self, address: str, rule: Rule) -> Rule:
        if address not in self:
            self[address] = rule
        return self[address]

    def __ior__(self, other: Any) -> _Rules:  # type: ignore[override,misc]
        self.update(other)
        return self


_STALL_NAMES = frozenset(
    {"greeting", "ehlo", "helo", "starttls", "auth", "mail", "rcpt", "data", "rset"}
    | {"noop", "quit", "dot"}
)


def _stall_point(value: str | None) -> str | None:
    """``value`` as the rules compare it (lower case), or ValueError when it names no
    point: set as an attribute, a typo or ``"DATA"`` matched no command, so the server
    answered as though no rule was set."""
    if value is None:
        return None
    point = value.lower() if isinstance(value, str) else value
    if point not in _STALL_NAMES:
        raise ValueError(f"unknown stall/drop point {value!r}")
    return point

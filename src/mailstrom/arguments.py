"""Checks of the arguments the facades' queue calls take (limits, ages, times, timeouts),
raising :class:`~mailstrom.errors.InvalidArgument` where the value enters.

Without them a wrong value reached the store and came back as whatever the store made of
it: a negative ``limit`` was "no limit" to SQLite and "nothing" to the memory store, a
``limit`` past a bigint a :class:`~mailstrom.errors.StoreRefusedData`, a naive
datetime a ``TypeError`` raised later, by a worker. The same bounds as the configuration's
(:mod:`mailstrom.bounds`). A leaf module: it imports nothing of mailstrom but those two.

>>> check_limit(20, "limit")
20
>>> check_limit(-1, "limit")
Traceback (most recent call last):
...
mailstrom.errors.InvalidArgument: limit: expected a whole number from 0 to \
9223372036854775807, got -1
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from mailstrom.bounds import MAX_DURATION, MAX_INTEGER, MAX_SECONDS
from mailstrom.errors import InvalidArgument


def shown(value: object) -> str:
    """``value`` as an error quotes it: a short repr, or only its type's name when its
    repr is long or raises (an error message must not fail, nor echo megabytes)."""
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


_Member = TypeVar("_Member", bound=StrEnum)


def member_of(kind: type[_Member], value: object) -> _Member | None:
    """``value`` as a member of the string enum ``kind``: a member, or a member's value
    (``"delivered"``); None for anything else, for the caller to raise its own error.

    >>> from mailstrom.status import RecipientState
    >>> member_of(RecipientState, "failed"), member_of(RecipientState, 3)
    (<RecipientState.FAILED: 'failed'>, None)
    """
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            return None
    return None


def word_of(kind: type[_Member], value: object) -> _Member | None:
    """``value`` as a member of the string enum ``kind`` the way the configuration reads
    its words (``tls``, ``tls_domains``, ``relay.tls``, ``event_loop``, in ``Config`` as
    in the TOML and environment settings): a member, or a member's value in any case,
    with white space around it; None for anything else, for the caller to raise its own
    error. Unlike :func:`member_of`, which takes a value exactly as a store writes it.

    >>> from mailstrom.status import RecipientState
    >>> word_of(RecipientState, " Failed "), word_of(RecipientState, 3)
    (<RecipientState.FAILED: 'failed'>, None)
    """
    if isinstance(value, str):
        return member_of(kind, value.strip().lower())
    return None


def check_limit(value: object, argument: str) -> int:
    """``value`` when it is an ``int`` (not a bool) from 0 to :data:`MAX_INTEGER`, the
    largest number every store takes as a LIMIT."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INTEGER:
        raise InvalidArgument(
            f"{argument}: expected a whole number from 0 to {MAX_INTEGER}, got {shown(value)}",
            argument=argument,
        )
    return value


def row_limit(value: int, argument: str = "limit") -> int:
    """``value`` as a store takes a LIMIT: a negative one is none (0), as every store has
    always read it. :class:`InvalidArgument` past :data:`MAX_INTEGER` (or for what is no
    whole number): SQLite and PostgreSQL refused one past a bigint as a store error
    (StoreRefusedData), and the memory store took it."""
    if isinstance(value, bool) or not isinstance(value, int) or value > MAX_INTEGER:
        raise InvalidArgument(
            f"{argument}: expected a whole number up to {MAX_INTEGER}, got {shown(value)}",
            argument=argument,
        )
    return max(value, 0)


def row_after(value: int, argument: str = "after") -> int:
    """``value`` as a store takes the id a page starts after (``read_events``): ids are
    1 to :data:`MAX_INTEGER`, so one past either end asks the same as that end.
    :class:`InvalidArgument` for what is no whole number: ``True`` was a StoreError from
    PostgreSQL and an id of 1 to the others, a float compared as it was."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(
            f"{argument}: expected a whole number, got {shown(value)}", argument=argument
        )
    return min(max(value, 0), MAX_INTEGER)


def check_age(value: object, argument: str, *, signed: bool = False) -> timedelta:
    """``value`` when it is a :class:`~datetime.timedelta` from zero (from minus 100
    years when ``signed``) to 100 years (:data:`MAX_DURATION`): ages are subtracted from
    now, and longer ones overflow."""
    low = -MAX_DURATION if signed else timedelta(0)
    if not isinstance(value, timedelta) or not low <= value <= MAX_DURATION:
        raise InvalidArgument(
            f"{argument}: expected a timedelta from {low.days} to {MAX_DURATION.days} days, "
            f"got {shown(value)}",
            argument=argument,
        )
    return value


def check_time(value: object, argument: str) -> datetime:
    """``value`` when it is a timezone-aware :class:`~datetime.datetime` (the queue
    compares times in UTC; a naive one cannot be compared with them)."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidArgument(
            f"{argument}: expected a timezone-aware datetime, got {shown(value)}",
            argument=argument,
        )
    return value


def check_timeout(value: object, argument: str = "timeout") -> float:
    """``value`` as seconds to wait: a finite number (an int or a float, not a bool) of
    at most 100 years; a negative one means not to wait."""
    # NaN fails both comparisons; a huge int is compared exactly (float() would raise).
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not -MAX_SECONDS <= value <= MAX_SECONDS
    ):
        raise InvalidArgument(
            f"{argument}: expected a finite number of seconds, at most {MAX_SECONDS:.15g}, "
            f"got {shown(value)}",
            argument=argument,
        )
    return max(float(value), 0.0)


def check_key(value: object, argument: str, *, limit: int) -> str:
    """``value`` when it is a string every store can compare with its keys: at most
    ``limit`` octets of UTF-8, without NUL (PostgreSQL refuses it in text) or a lone
    surrogate (it has no UTF-8 form: SQLite refused it as ``StoreRefusedData``)."""
    if not isinstance(value, str):
        raise InvalidArgument(
            f"{argument}: expected a string, got {shown(value)}", argument=argument
        )
    if len(value) > limit or "\x00" in value or _utf8_size(value) > limit:
        raise InvalidArgument(
            f"{argument}: expected at most {limit} octets of text without NUL or lone "
            f"surrogates, got {shown(value)}",
            argument=argument,
        )
    return value


def _utf8_size(text: str) -> int:
    """Octets of ``text`` in UTF-8; more than any limit for a lone surrogate."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return 2**63

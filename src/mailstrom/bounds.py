"""Range checks for the numbers and durations of the configuration dataclasses.

One helper per kind of value, shared by :class:`~mailstrom.config.Config` and every
dataclass nested in it, so the Python constructors refuse what the TOML/environment loader
(:mod:`mailstrom.settings`) refuses. A plain ``value < 1`` check is not enough: it is false
for NaN, so ``max_recipients=float("nan")`` would switch the limit off; infinity, a bool
(``True == 1``) or a string pass such checks, or fail later with a raw ``TypeError``.

A leaf module (it imports nothing of mailstrom but the errors).

>>> check_int(5, "lease_batch")
5
>>> check_int(float("nan"), "max_recipients")
Traceback (most recent call last):
...
mailstrom.errors.ConfigError: max_recipients: expected an integer from 1 to \
9223372036854775807, got nan
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from mailstrom.errors import ConfigError

MAX_INTEGER = 2**63 - 1
"""The largest integer setting: what SQLite and PostgreSQL store in a bigint."""
MAX_DURATION = timedelta(days=36525)
"""The longest duration accepted (100 years): longer ones overflow date arithmetic."""
MAX_SECONDS = MAX_DURATION.total_seconds()
"""The largest number of seconds accepted, for the same reason."""
EARLIEST_TIME = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(9000, 1, 1, tzinfo=UTC)
"""Times a store gives back (from EARLIEST_TIME, before LATEST_TIME): every time mailstrom
writes, and room to add any duration it allows without leaving ``datetime``'s range. A
time given from outside (an imported suppression's) must lie between them."""


def safe_repr(value: object) -> str:
    """``repr(value)``, or what it is when it has none: an int past
    sys.get_int_max_str_digits() (4,300 digits), alone or inside a container, raises
    ValueError, and an error quoting it would fail to be written."""
    try:
        return repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to show>"


def shown(value: object) -> str:
    """``repr(value)`` for a configuration error, cut to 40 characters: the value is quoted,
    never at any length (:func:`safe_repr`)."""
    text = safe_repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(value: object, where: str, *, minimum: int = 1, maximum: int = MAX_INTEGER) -> int:
    """``value`` when it is an ``int`` (not a bool, not a float) from ``minimum`` to
    ``maximum``; :class:`ConfigError` naming ``where`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(
            f"{where}: expected an integer from {minimum} to {maximum}, got {shown(value)}"
        )
    return value


def check_bool(value: object, where: str) -> bool:
    """``value`` when it is ``True`` or ``False``: a switch given as anything else (the
    string ``"false"``, which is true, or ``0``) is refused rather than read for its truth."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected True or False, got {shown(value)}")
    return value


def check_port(value: object, where: str) -> int:
    """A TCP port number, 1 to 65535."""
    return check_int(value, where, minimum=1, maximum=65535)


def check_number(
    value: object,
    where: str,
    *,
    minimum: float = 0.0,
    inclusive: bool = False,
    maximum: float = MAX_SECONDS,
    what: str = "a number",
) -> float:
    """``value`` when it is a finite number (an int or a float, not a bool) above
    ``minimum`` (or equal to it when ``inclusive``) and at most ``maximum``;
    :class:`ConfigError` otherwise. NaN and infinity fail every comparison or pass it, so
    they are refused first; an int is compared as it is (exactly, at any size), where
    math.isfinite() raised OverflowError for one past a float."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not math.isfinite(value))
        or not (value >= minimum if inclusive else value > minimum)
        or value > maximum
    ):
        low = f"{'at least' if inclusive else 'above'} {minimum:.15g}"
        raise ConfigError(
            f"{where}: expected {what} {low} and at most {maximum:.15g}, got {shown(value)}"
        )
    return float(value)


def check_seconds(
    value: object, where: str, *, positive: bool = True, maximum: float = MAX_SECONDS
) -> float:
    """:func:`check_number` for a number of seconds, above 0 (``positive``) or at least 0,
    and at most 100 years by default (timers and dates are computed from it)."""
    return check_number(value, where, inclusive=not positive, maximum=maximum, what="seconds")


def check_duration(
    value: object, where: str, *, positive: bool = True, maximum: timedelta = MAX_DURATION
) -> timedelta:
    """``value`` when it is a :class:`~datetime.timedelta` above zero (``positive``) or at
    least zero, and at most ``maximum`` (100 years: the queue adds durations to dates);
    :class:`ConfigError` otherwise."""
    if (
        not isinstance(value, timedelta)
        or not (value > timedelta(0) if positive else value >= timedelta(0))
        or value > maximum
    ):
        kind = "a positive timedelta" if positive else "a timedelta of zero or more"
        raise ConfigError(
            f"{where}: expected {kind} of at most {maximum.days} days, got {shown(value)}"
        )
    return value

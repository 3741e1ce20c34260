"""Retry policy: when to try a temporarily failed recipient again, or when to give up.

Pure: time and randomness are parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from mailstrom.bounds import check_duration, check_int, check_number
from mailstrom.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by a minimum and a maximum delay.

    Defaults follow RFC 5321 §4.5.4.1 and Postfix (``minimal_backoff_time`` 300 s,
    ``maximal_backoff_time`` 4000 s, ``maximal_queue_lifetime`` 5 d): the first retry comes
    after about five minutes, retries are never more than about an hour apart, and a
    recipient still failing five days after it was queued fails for good.

    >>> RetryPolicy(min_delay=timedelta(minutes=1), max_age=timedelta(hours=4))
    RetryPolicy(min_delay=..., ...)
    """

    min_delay: timedelta = timedelta(minutes=5)
    max_delay: timedelta = timedelta(hours=1)
    multiplier: float = 2.0
    jitter: float = 0.2
    """Fraction of the delay drawn at random (±), so retries of many messages spread out."""
    max_age: timedelta | None = timedelta(days=5)
    """Retry until ``queued_at + max_age``, the last attempt at that time at the latest,
    then give up (above zero; None: no limit)."""
    max_attempts: int | None = None
    """Give up after this many attempts (None: only ``max_age`` limits)."""

    def __post_init__(self) -> None:
        # Above zero: the delays grow from it (min_delay * multiplier ** n), and from zero
        # every retry would come at once, as fast as a worker can lease, until max_age.
        check_duration(self.min_delay, "retry.min_delay")
        check_duration(self.max_delay, "retry.max_delay", positive=False)
        if self.min_delay > self.max_delay:
            # The delays are clamped into [min_delay, max_delay]: an empty range.
            raise ConfigError("retry.min_delay must not exceed retry.max_delay")
        # Below 1 the delays would shrink with every attempt.
        check_number(self.multiplier, "retry.multiplier", minimum=1, inclusive=True)
        check_number(self.jitter, "retry.jitter", inclusive=True, maximum=1)
        if self.max_age is not None:
            if self.max_age == timedelta(0):
                # As the settings loader says: zero failed every recipient at its first
                # temporary failure (a greylisting's), where no limit was likely meant.
                raise ConfigError(
                    "retry.max_age: 0 is ambiguous; give None to retry without an age limit,"
                    " or max_attempts=1 to give up at the first temporary failure"
                )
            check_duration(self.max_age, "retry.max_age")
        if self.max_attempts is not None:
            check_int(self.max_attempts, "retry.max_attempts")

"""When to try a temporarily failed recipient again: exponential backoff with jitter.

Pure: the current time and the random source are parameters, so the worker, the CLI and
tests share one piece of logic and tests need neither sleeps nor patched clocks.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from mailstrom.policy.retry import RetryPolicy


def backoff_delay(*, attempts: int, rng: random.Random, policy: RetryPolicy) -> timedelta:
    """The delay before the next attempt after ``attempts`` attempts (at least 1).

    ``min_delay * multiplier ** (attempts - 1)``, capped at ``max_delay``, then drawn
    uniformly from the part of ``±jitter`` of itself that lies in ``[min_delay,
    max_delay]``: the bounds are promises to the operator, jitter only spreads retries
    inside them (at ``min_delay``, the first retry, it can only lengthen the delay; at
    ``max_delay`` only shorten it).

    >>> import random
    >>> backoff_delay(attempts=1, rng=random.Random(0), policy=RetryPolicy(jitter=0.0))
    datetime.timedelta(seconds=300)
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    shortest, longest = _jitter_range(_base_seconds(attempts, policy), policy)
    # One draw, as before, so a seeded rng gives one schedule. Clamped: the float sum
    # may pass the end by a rounding.
    drawn = rng.uniform(shortest, longest)
    return timedelta(seconds=min(max(drawn, shortest), longest))


def _base_seconds(attempts: int, policy: RetryPolicy) -> float:
    """The delay after ``attempts`` attempts before jitter, capped at ``max_delay``."""
    low = policy.min_delay.total_seconds()
    high = policy.max_delay.total_seconds()
    try:
        # A float power: an int multiplier would make an exact integer of it, whose size
        # and time grow with the attempts (hours, for a count near its 2^31 bound).
        base = low * float(policy.multiplier) ** (attempts - 1)
    except OverflowError:
        # A recipient retried thousands of times has long since reached the cap.
        base = high
    return min(base, high)


def _jitter_range(base: float, policy: RetryPolicy) -> tuple[float, float]:
    """The shortest and longest delay ``base`` may be moved to: ``±jitter`` of itself,
    within ``[min_delay, max_delay]``. Drawn in the whole ``±jitter`` and clamped after,
    the half of the draws past a bound all fell on it: of a queue deferred at one
    instant, half came back together at exactly ``min_delay``, then at ``max_delay``."""
    low = policy.min_delay.total_seconds()
    high = policy.max_delay.total_seconds()
    # base lies in [low, high], so the range is never empty.
    return max(base * (1.0 - policy.jitter), low), min(base * (1.0 + policy.jitter), high)


_SUMMED = 1000
"""Delays :func:`last_attempt_by` adds one by one; the rest count as ``max_delay`` each."""


def last_attempt_by(*, attempts: int, next_at: datetime, policy: RetryPolicy) -> datetime | None:
    """The latest the last attempt ``policy.max_attempts`` allows can be due, for a
    recipient deferred after ``attempts`` attempts and due again at ``next_at``: each
    backoff after that one at its longest (jitter up). None when ``max_attempts`` sets
    no end, or the end lies past the last date a datetime holds.

    >>> from datetime import UTC
    >>> t = datetime(2024, 1, 1, tzinfo=UTC)
    >>> last_attempt_by(attempts=1, next_at=t, policy=RetryPolicy(jitter=0.0, max_attempts=3))
    datetime.datetime(2024, 1, 1, 0, 10, tzinfo=datetime.timezone.utc)
    """
    if policy.max_attempts is None:
        return None
    high = policy.max_delay.total_seconds()
    later = 0.0
    # Attempt ``n + 1`` comes a backoff after attempt ``n``; attempt ``attempts + 1`` is
    # the one due at ``next_at``, the last is attempt ``max_attempts``.
    first, last = attempts + 1, policy.max_attempts
    for n in range(first, min(last, first + _SUMMED)):
        later += _jitter_range(_base_seconds(n, policy), policy)[1]
    # Past the delays added up (a count of thousands), each is at most max_delay.
    later += high * max(0, last - (first + _SUMMED))
    try:
        return next_at + timedelta(seconds=later)
    except OverflowError:
        return None


def next_attempt(
    *,
    attempts: int,
    queued_at: datetime,
    now: datetime,
    rng: random.Random,
    policy: RetryPolicy,
) -> datetime | None:
    """When to try again after a temporary failure, or None to give up.

    ``attempts`` counts the attempts made so far, including the one that just failed.
    Gives up when ``policy.max_attempts`` attempts have been made, or when not even
    ``policy.min_delay`` is left before ``queued_at + policy.max_age``. A backoff that
    would pass that end brings the last attempt to it: given up there, a recipient failed
    up to ``max_delay`` early (half the window of ``max_age = 30m``: attempts at 0, 5
    and 15 minutes), where Postfix tries until its queue lifetime is over.

    >>> import random
    >>> from datetime import UTC
    >>> t = datetime(2024, 1, 1, tzinfo=UTC)
    >>> next_attempt(attempts=1, queued_at=t, now=t, rng=random.Random(0),
    ...              policy=RetryPolicy(jitter=0.0))
    datetime.datetime(2024, 1, 1, 0, 5, tzinfo=datetime.timezone.utc)
    """
    if policy.max_attempts is not None and attempts >= policy.max_attempts:
        return None
    when = now + backoff_delay(attempts=attempts, rng=rng, policy=policy)
    return _within_max_age(when, queued_at=queued_at, now=now, policy=policy)


def next_try_unattempted(
    *, queued_at: datetime, now: datetime, rng: random.Random, policy: RetryPolicy
) -> datetime | None:
    """When to try again after a deferral that was no attempt at the destination (this
    host ran out of file descriptors or memory before any server was asked), or None to
    give up: soon, a first retry's delay (``min_delay``, with jitter) whatever the
    attempts made before, as the destination's growing backoff is no measure of this
    host's trouble; given up at ``policy.max_age`` as any, never by
    ``policy.max_attempts``, which counts attempts.

    >>> import random
    >>> from datetime import UTC
    >>> t = datetime(2024, 1, 1, tzinfo=UTC)
    >>> next_try_unattempted(queued_at=t, now=t, rng=random.Random(0),
    ...                      policy=RetryPolicy(jitter=0.0, max_attempts=1))
    datetime.datetime(2024, 1, 1, 0, 5, tzinfo=datetime.timezone.utc)
    """
    when = now + backoff_delay(attempts=1, rng=rng, policy=policy)
    return _within_max_age(when, queued_at=queued_at, now=now, policy=policy)


def _within_max_age(
    when: datetime, *, queued_at: datetime, now: datetime, policy: RetryPolicy
) -> datetime | None:
    """``when``, brought back to ``queued_at + policy.max_age`` when past it; None when
    not even ``policy.min_delay`` is left before that end."""
    if policy.max_age is not None:
        end = queued_at + policy.max_age
        if when > end:
            # Never two attempts closer than min_delay, nor one past the end.
            return None if now + policy.min_delay > end else end
    return when

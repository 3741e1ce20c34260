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

    ``min_delay * multiplier ** (attempts - 1)``, capped at ``max_delay``, then moved by up
    to ``±jitter`` of itself and clamped back into ``[min_delay, max_delay]``: the bounds
    are promises to the operator, jitter only spreads retries inside them.

    >>> import random
    >>> backoff_delay(attempts=1, rng=random.Random(0), policy=RetryPolicy(jitter=0.0))
    datetime.timedelta(seconds=300)
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    low = policy.min_delay.total_seconds()
    high = policy.max_delay.total_seconds()
    try:
        # A float power: an int multiplier would make an exact integer of it, whose size
        # and time grow with the attempts (hours, for a count near its 2^31 bound).
        base = low * float(policy.multiplier) ** (attempts - 1)
    except OverflowError:
        # A recipient retried thousands of times has long since reached the cap.
        base = high
    base = min(base, high)
    jittered = base * (1.0 + rng.uniform(-policy.jitter, policy.jitter))
    return timedelta(seconds=min(max(jittered, low), high))


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
    Gives up when ``policy.max_attempts`` attempts have been made, or when the next attempt
    would fall after ``queued_at + policy.max_age`` (then the recipient fails with the last
    reason rather than waiting for an attempt that may not come).

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
    if policy.max_age is not None and when > queued_at + policy.max_age:
        return None
    return when

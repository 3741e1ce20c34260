"""Retry backoff: bounds, growth, giving up, determinism."""

from __future__ import annotations

import random
import tracemalloc
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstrom.errors import ConfigError
from mailstrom.policy import RetryPolicy, backoff_delay, next_attempt
from mailstrom.policy.backoff import last_attempt_by

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
NO_JITTER = RetryPolicy(
    min_delay=timedelta(minutes=5), max_delay=timedelta(hours=1), jitter=0.0, max_age=None
)


@pytest.mark.parametrize(
    ("attempts", "minutes"),
    [(1, 5), (2, 10), (3, 20), (4, 40), (5, 60), (6, 60), (500, 60)],
)
def test_delay_doubles_up_to_the_maximum(attempts: int, minutes: int) -> None:
    delay = backoff_delay(attempts=attempts, rng=random.Random(1), policy=NO_JITTER)
    assert delay == timedelta(minutes=minutes)


def test_huge_attempt_counts_do_not_overflow() -> None:
    policy = RetryPolicy(multiplier=10.0, jitter=0.0)
    assert backoff_delay(attempts=100_000, rng=random.Random(), policy=policy) == timedelta(hours=1)


def test_an_integer_multiplier_costs_what_a_float_one_does() -> None:
    # RetryPolicy(multiplier=3) made 3 ** (attempts - 1) an exact integer power: for a
    # recipient attempted millions of times (a row's count may be up to 2^31 - 2) that
    # took megabytes and seconds, hours near the top, on the worker's event loop, where a
    # float power overflows at once to the cap.
    policy = RetryPolicy(multiplier=3, jitter=0.0)
    tracemalloc.start()
    try:
        delay = backoff_delay(attempts=5_000_000, rng=random.Random(), policy=policy)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert delay == timedelta(hours=1)
    assert peak < 64 * 1024


def test_a_zero_min_delay_is_refused() -> None:
    # The delays grow from min_delay (min_delay * multiplier ** n): from zero every one
    # was zero whatever max_delay said, so a greylisted recipient was retried as fast as
    # the worker could lease it, thousands of sessions a minute, until max_age (5 days).
    with pytest.raises(ConfigError, match=r"retry\.min_delay"):
        RetryPolicy(min_delay=timedelta(0))
    with pytest.raises(ConfigError, match=r"retry\.min_delay"):
        RetryPolicy(min_delay=timedelta(0), max_delay=timedelta(0))


def test_a_zero_max_age_is_refused() -> None:
    # The settings loader refuses retry.max_age = 0 as ambiguous (no limit, or none at
    # all?); RetryPolicy took it, and then every temporary failure, a greylisting's
    # first "451 try again later" included, failed the recipient for good at once.
    with pytest.raises(ConfigError, match=r"retry\.max_age.*None"):
        RetryPolicy(max_age=timedelta(0))
    with pytest.raises(ConfigError, match=r"retry\.max_age"):
        RetryPolicy(max_age=timedelta(seconds=-1))
    assert RetryPolicy(max_age=None).max_age is None
    assert RetryPolicy(max_age=timedelta(microseconds=1)).max_age == timedelta(microseconds=1)


def test_a_min_delay_above_the_max_delay_is_refused() -> None:
    # Only Config checked it: a policy used alone (backoff_delay, or replaced into a
    # config's) was built, and its delays, clamped to max_delay, fell below min_delay.
    with pytest.raises(ConfigError, match=r"retry\.min_delay must not exceed retry\.max_delay"):
        RetryPolicy(min_delay=timedelta(hours=2), max_delay=timedelta(hours=1))
    with pytest.raises(ConfigError, match=r"retry\.min_delay must not exceed"):
        RetryPolicy(min_delay=timedelta(hours=2))  # above the default max_delay, 1 h
    same = RetryPolicy(min_delay=timedelta(hours=1), max_delay=timedelta(hours=1))
    assert backoff_delay(attempts=3, rng=random.Random(0), policy=same) == timedelta(hours=1)


def test_attempts_below_one_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        backoff_delay(attempts=0, rng=random.Random(), policy=NO_JITTER)


def test_jitter_moves_the_delay_within_its_fraction() -> None:
    policy = RetryPolicy(min_delay=timedelta(minutes=1), max_delay=timedelta(hours=10), jitter=0.25)
    rng = random.Random(7)
    delays = {backoff_delay(attempts=3, rng=rng, policy=policy) for _ in range(200)}
    assert all(timedelta(minutes=3) <= d <= timedelta(minutes=5) for d in delays)
    assert len(delays) > 100  # actually spread, not constant


@pytest.mark.parametrize(
    ("attempts", "bound"), [(1, timedelta(minutes=5)), (9, timedelta(hours=1))]
)
def test_jitter_spreads_retries_at_the_bounds_too(attempts: int, bound: timedelta) -> None:
    # A destination down defers its whole queue at one instant. Drawn past min_delay
    # (the first retry) or max_delay (every retry once capped) and clamped back, half
    # of them came back at exactly the bound, together again: no jitter at all for them.
    rng = random.Random(3)
    delays = [backoff_delay(attempts=attempts, rng=rng, policy=RetryPolicy()) for _ in range(1000)]
    assert all(timedelta(minutes=5) <= d <= timedelta(hours=1) for d in delays)
    assert sum(d == bound for d in delays) <= 10
    assert len(set(delays)) > 900


def test_next_attempt_is_now_plus_delay() -> None:
    now = T0 + timedelta(hours=2)
    when = next_attempt(attempts=2, queued_at=T0, now=now, rng=random.Random(), policy=NO_JITTER)
    assert when == now + timedelta(minutes=10)


def test_gives_up_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, jitter=0.0)
    rng = random.Random()
    assert next_attempt(attempts=2, queued_at=T0, now=T0, rng=rng, policy=policy) is not None
    assert next_attempt(attempts=3, queued_at=T0, now=T0, rng=rng, policy=policy) is None


def test_gives_up_when_the_next_attempt_would_pass_max_age() -> None:
    policy = RetryPolicy(max_age=timedelta(hours=1), jitter=0.0)
    rng = random.Random()
    # 5-minute delay: 12:50 + 5 min = 12:55, within the hour.
    late = T0 + timedelta(minutes=50)
    assert next_attempt(attempts=1, queued_at=T0, now=late, rng=rng, policy=policy) == (
        late + timedelta(minutes=5)
    )
    later = T0 + timedelta(minutes=56)
    assert next_attempt(attempts=1, queued_at=T0, now=later, rng=rng, policy=policy) is None


policies = st.builds(
    lambda lo, extra, mult, jit, age, most: RetryPolicy(
        min_delay=timedelta(seconds=lo),
        max_delay=timedelta(seconds=lo + extra),
        multiplier=mult,
        jitter=jit,
        max_age=None if age is None else timedelta(seconds=age),
        max_attempts=most,
    ),
    st.integers(1, 3600),
    st.integers(0, 86_400),
    st.floats(1.0, 10.0),
    st.floats(0.0, 0.9),
    st.none() | st.integers(1, 10 * 86_400),
    st.none() | st.integers(1, 50),
)


@given(policy=policies, attempts=st.integers(1, 10_000), seed=st.integers())
def test_delay_always_within_bounds(policy: RetryPolicy, attempts: int, seed: int) -> None:
    delay = backoff_delay(attempts=attempts, rng=random.Random(seed), policy=policy)
    assert policy.min_delay <= delay <= policy.max_delay


@given(
    policy=policies,
    attempts=st.integers(1, 100),
    elapsed=st.integers(0, 20 * 86_400),
    seed=st.integers(),
)
def test_next_attempt_respects_every_limit(
    policy: RetryPolicy, attempts: int, elapsed: int, seed: int
) -> None:
    now = T0 + timedelta(seconds=elapsed)
    when = next_attempt(
        attempts=attempts, queued_at=T0, now=now, rng=random.Random(seed), policy=policy
    )
    if policy.max_attempts is not None and attempts >= policy.max_attempts:
        assert when is None
    if when is not None:
        assert now + policy.min_delay <= when <= now + policy.max_delay
        if policy.max_age is not None:
            assert when <= T0 + policy.max_age
    elif policy.max_attempts is None or attempts < policy.max_attempts:
        # Given up without hitting max_attempts: only max_age can explain it.
        assert policy.max_age is not None
        # Not even min_delay left: a longer backoff brings the last attempt to the end.
        assert now + policy.min_delay > T0 + policy.max_age


@given(policy=policies, attempts=st.integers(1, 100), seed=st.integers())
def test_deterministic_for_a_seeded_rng(policy: RetryPolicy, attempts: int, seed: int) -> None:
    def run() -> datetime | None:
        return next_attempt(
            attempts=attempts, queued_at=T0, now=T0, rng=random.Random(seed), policy=policy
        )

    assert run() == run()


def test_the_last_attempt_allowed_is_each_backoff_at_its_longest() -> None:
    t = datetime(2024, 1, 1, tzinfo=UTC)
    policy = RetryPolicy(min_delay=timedelta(minutes=5), jitter=0.5, max_attempts=5)
    # After the 3rd (due at t) come the 4th (20 min, 30 with jitter) and the 5th (40 min,
    # 60 with jitter: the cap).
    assert last_attempt_by(attempts=2, next_at=t, policy=policy) == t + timedelta(minutes=90)
    assert last_attempt_by(attempts=4, next_at=t, policy=policy) == t
    assert last_attempt_by(attempts=4, next_at=t, policy=RetryPolicy()) is None
    # Billions of attempts: the rest count as max_delay each, past the last datetime.
    many = RetryPolicy(max_attempts=2**31 - 1, multiplier=1.0)
    assert last_attempt_by(attempts=1, next_at=t, policy=many) is None

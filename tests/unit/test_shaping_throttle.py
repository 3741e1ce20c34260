"""Which replies pause a whole destination, how long pauses last, and token buckets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstrom.bounds import MAX_DURATION
from mailstrom.errors import InvalidArgument
from mailstrom.policy.throttle import (
    CLOCK_SET_BACK,
    BucketState,
    TokenBucket,
    is_throttling,
    next_pause,
    pause_runs,
    take_tokens,
)
from mailstrom.status import DestinationThrottle, SMTPReply

NOW = datetime(2030, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def reply(code: int, enhanced: str | None, text: str) -> SMTPReply:
    return SMTPReply(code=code, enhanced=enhanced, text=text)


@pytest.mark.parametrize(
    "r",
    [
        reply(421, "4.7.28", "Too much unsolicited mail seen from your sending domain. - gsmtp"),
        reply(451, "4.7.650", "The mail server [192.0.2.1] has been temporarily rate limited"),
        reply(451, "4.7.500", "Server busy, try again later from [192.0.2.1]. (AS761)"),
        reply(421, "4.7.500", "Server busy. Please try again later from [192.0.2.1]. (S77719)"),
        reply(421, "4.7.650", "The mail server [192.0.2.1] has been temporarily rate limited"),
        reply(421, "4.7.0", "[TSS04] Messages from 192.0.2.1 deferred for now"),
        reply(421, None, "Too many connections from your IP, slow down"),
    ],
)
def test_provider_rate_limit_replies_throttle_the_destination(r: SMTPReply) -> None:
    assert is_throttling(r)


@pytest.mark.parametrize(
    "r",
    [
        reply(450, "4.2.1", "The recipient is getting mail too fast; try later. - gsmtp"),
        reply(451, "4.3.0", "Temporary local problem"),
        reply(421, "4.3.2", "Service shutting down"),
        # A limit of messages per connection (Exim's smtp_accept_max_per_connection, SES):
        # the next connection takes mail at once, the destination is not asking to slow.
        reply(421, None, "too many messages in this connection"),
        reply(421, "4.7.0", "Too many messages in this session, closing connection"),
        reply(550, "5.7.28", "rate limited for good"),
        reply(250, "2.0.0", "OK"),
    ],
)
def test_other_replies_do_not(r: SMTPReply) -> None:
    assert not is_throttling(r)
    assert not is_throttling(None)


def test_any_421_while_connecting_throttles() -> None:
    busy = reply(421, "4.3.2", "Service shutting down")
    assert is_throttling(busy, connecting=True)
    assert not is_throttling(reply(450, None, "try later"), connecting=True)


def test_pauses_double_up_to_the_maximum() -> None:
    pause, lengths, at = None, [], NOW
    for _ in range(5):
        pause = next_pause(
            pause, destination="d", now=at, first=MINUTE, maximum=5 * MINUTE, reply="421"
        )
        lengths.append(pause.until - at)
        at = pause.until
    assert lengths == [MINUTE, 2 * MINUTE, 4 * MINUTE, 5 * MINUTE, 5 * MINUTE]
    huge = next_pause(
        pause.__class__(destination="d", until=at, strikes=10_000, reply="", since=at),
        destination="d",
        now=at,
        first=MINUTE,
        maximum=5 * MINUTE,
        reply="x" * 10_000,
    )
    assert huge.until - at == 5 * MINUTE  # no overflow however many strikes
    assert len(huge.reply) == 512  # a hostile reply is bounded


@pytest.mark.parametrize(
    ("first", "maximum"),
    [
        (timedelta(minutes=5), timedelta(hours=1)),  # the defaults
        (timedelta(seconds=1), MAX_DURATION),  # the longest maximum the settings allow
        (MAX_DURATION, MAX_DURATION),
        (timedelta(minutes=59), timedelta(hours=1)),
    ],
)
@pytest.mark.parametrize("strikes", [39, 40, 41, 10_000, 2**63 - 1])
def test_repeats_stay_at_the_maximum_for_any_settings(
    first: timedelta, maximum: timedelta, strikes: int
) -> None:
    # A destination throttled without end: 5 min * 2 ** 39 overflowed a timedelta, and
    # every throttle from the 40th on raised instead of pausing.
    last = DestinationThrottle(destination="d", until=NOW, strikes=strikes - 1, reply="", since=NOW)
    pause = next_pause(last, destination="d", now=NOW, first=first, maximum=maximum, reply="421")
    assert (pause.until - NOW, pause.strikes) == (maximum, strikes)


def test_a_pause_from_a_clock_set_back_is_over_and_the_next_starts_anew() -> None:
    # Recorded by a clock a year ahead, then set back by NTP: held, the destination got
    # nothing for a year and its mail expired in the queue.
    ahead = next_pause(
        None,
        destination="d",
        now=NOW + timedelta(days=365),
        first=MINUTE,
        maximum=60 * MINUTE,
        reply="421",
    )
    assert not pause_runs(ahead, NOW)
    assert not pause_runs(ahead, NOW + timedelta(days=365) - CLOCK_SET_BACK - MINUTE)
    assert pause_runs(ahead, NOW + timedelta(days=365) - CLOCK_SET_BACK)
    again = next_pause(
        ahead, destination="d", now=NOW, first=MINUTE, maximum=60 * MINUTE, reply="421"
    )
    assert (again.since, again.until, again.strikes) == (NOW, NOW + MINUTE, 1)
    # Another worker's clock, ahead within the hour, still pauses (and counts a repeat).
    near = next_pause(
        None, destination="d", now=NOW + 59 * MINUTE, first=MINUTE, maximum=60 * MINUTE, reply="421"
    )
    assert pause_runs(near, NOW)
    assert (
        next_pause(near, destination="d", now=NOW, first=MINUTE, maximum=60 * MINUTE, reply="")
        is near
    )


def test_bucket_refill_is_bounded_and_a_clock_behind_adds_nothing() -> None:
    bucket = TokenBucket.per_second("k", 2.0)
    assert bucket.capacity == 2.0
    assert TokenBucket.per_second("k", 0.1).capacity == 1.0
    states = {"k": BucketState(tokens=0.0, at=NOW)}
    grant, new = take_tokens([bucket], states, want=1, now=NOW - MINUTE)
    assert grant.granted == 0 and new["k"].tokens == 0.0
    grant, _ = take_tokens([bucket], states, want=10, now=NOW + MINUTE)
    assert grant.granted == 2
    grant, new = take_tokens([bucket], {}, want=0, now=NOW)
    assert (grant.granted, grant.wait) == (0, 0.0) and new["k"].tokens == 2.0


def test_a_clock_behind_never_moves_the_stamp_back() -> None:
    # Two workers 60 s apart polling every second: the one behind moved the stamp back
    # by the skew, and the one ahead refilled for it each time (10x a 6/min rate).
    bucket = TokenBucket.per_second("k", 0.1)
    states: dict[str, BucketState] = {}
    granted = 0
    for second in range(600):
        for skew in (60, 0):
            at = NOW + timedelta(seconds=second + skew)
            grant, new = take_tokens([bucket], states, want=1, now=at)
            granted += grant.granted
            states = {**states, **new}
    assert granted <= 61  # 10 minutes at 6/min, and the new bucket full
    assert states["k"].at == NOW + timedelta(seconds=659)  # the clock ahead's


def test_a_clock_set_back_from_a_year_ahead_does_not_starve_the_bucket() -> None:
    # A host whose clock jumped a year ahead (an RTC, a restored VM) took from the bucket,
    # then NTP set it back: no refill until the clock caught up with the stamp, so no
    # message went to the destination for a year and its mail expired in the queue.
    bucket = TokenBucket.per_second("k", 0.1)
    _, states = take_tokens([bucket], {}, want=1, now=NOW + timedelta(days=365))
    granted = 0
    for second in range(0, 2 * 3600, 10):
        grant, new = take_tokens([bucket], states, want=1, now=NOW + timedelta(seconds=second))
        granted += grant.granted
        states = {**states, **new}
    # Two hours at 6 a minute is 720; within an hour of being set back it sends at the rate.
    assert 360 <= granted <= 721
    assert states["k"].at <= NOW + timedelta(hours=2)


@pytest.mark.parametrize("tokens", [-1e300, -1e9, -5.0])
def test_a_stored_bucket_below_empty_refills_from_empty(tokens: float) -> None:
    # No take leaves a bucket below empty (a grant never passes its level): a row read
    # back below it was written by no worker, and at -1e300 (where -inf reads as a full
    # bucket) the destination's rate gave no token again, ever, its mail expiring.
    bucket = TokenBucket.per_second("k", 0.1)
    states = {"k": BucketState(tokens=tokens, at=NOW)}
    grant, new = take_tokens([bucket], states, want=1, now=NOW)
    assert (grant.granted, grant.wait) == (0, 10.0)
    assert new["k"].tokens == 0.0
    grant, _ = take_tokens([bucket], states, want=1, now=NOW + timedelta(seconds=10))
    assert grant.granted == 1


@given(
    rate=st.floats(1 / 86_400, 1e6 / 60),
    skews=st.lists(st.floats(0, CLOCK_SET_BACK.total_seconds()), min_size=1, max_size=3),
    takes=st.lists(
        st.tuples(st.integers(0, 2), st.floats(0, 100), st.integers(0, 5)), max_size=100
    ),
)
def test_workers_whose_clocks_disagree_never_take_more_than_the_rate(
    rate: float, skews: list[float], takes: list[tuple[int, float, int]]
) -> None:
    # Each worker reads its own clock, ``skew`` seconds ahead (up to CLOCK_SET_BACK): all
    # together they get a full bucket and the rate over the time the clock furthest ahead
    # has seen, however their takes interleave (a stamp moved back by a clock behind let
    # the clock ahead refill for the skew on each take: 10 times a rate of 6 a minute).
    bucket = TokenBucket.per_second("k", rate)
    states: dict[str, BucketState] = {}
    real, first, ahead = 0.0, None, 0.0
    granted = 0
    for worker, step, want in takes:
        real += step
        at = real + skews[worker % len(skews)]
        first = at if first is None else first
        ahead = max(ahead, at)
        grant, new = take_tokens([bucket], states, want=want, now=NOW + timedelta(seconds=at))
        states = {**states, **new}
        granted += grant.granted
        assert 0 <= grant.granted <= want
        assert grant.wait >= 0 and (grant.wait > 0) == (grant.granted == 0 and want > 0)
        assert granted <= bucket.capacity + rate * (ahead - first) + 1e-6


@pytest.mark.parametrize(
    ("rate", "capacity", "named"),
    [
        (0.0, 1.0, "rate"),
        (-1.0, 1.0, "rate"),
        (float("nan"), 1.0, "rate"),
        (float("inf"), 1.0, "rate"),
        (1.0, float("nan"), "capacity"),
        (1.0, float("inf"), "capacity"),
        (1.0, 0.5, "capacity"),
    ],
)
def test_a_bucket_no_take_can_use_is_refused(rate: float, capacity: float, named: str) -> None:
    """Was: a bucket of rate 0 granted its capacity and then raised ZeroDivisionError in
    every store; a NaN rate or capacity ValueError, an infinite one OverflowError (the
    memory store and PostgreSQL) or StoreRefusedData (SQLite); one holding less than a
    token never granted one. Such a bucket is refused where it is made."""
    with pytest.raises(InvalidArgument, match=rf"^{named}: ") as raised:
        TokenBucket(key="example.org messages/minute", rate=rate, capacity=capacity)
    assert raised.value.argument == named


@pytest.mark.parametrize(
    "key", ["k\x00ey", "k\udcffey", "k" * 2000, None], ids=["nul", "surrogate", "too-long", "none"]
)
def test_a_bucket_key_no_store_can_key_is_refused_where_it_is_made(key: str) -> None:
    """Was: a token bucket keyed with a NUL was taken from by the memory store and SQLite
    and refused by PostgreSQL, one with a lone surrogate by both SQL stores, and one of
    thousands of characters was a StoreError in PostgreSQL. It is refused where it is
    made (InvalidArgument), as a rate no store can use is."""
    with pytest.raises(InvalidArgument, match=r"^key: "):
        TokenBucket(key=key, rate=1.0, capacity=3.0)

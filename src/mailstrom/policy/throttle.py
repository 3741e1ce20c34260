"""Site-wide backoff and token buckets (pure): when a destination is paused, and how many
messages or connections a rate still allows.

A **throttling reply** tells the whole site to slow down, not one recipient: a 421 while
connecting (greeting or EHLO: the server closes the channel), or a 421/451 that
:func:`~mailstrom.policy.reasons.classify_reply` classes ``rate_limited`` (Gmail's 4.7.28,
Microsoft's 4.7.500-699, Yahoo's TSS04...) or that carries a provider's rate-limit code
(:data:`RATE_LIMIT_CODES`: Microsoft's 4.7.650 is classed ``reputation`` by its cause).
A 450 about one recipient ("getting mail too fast") is per recipient and does not pause
the destination.

**Pauses** grow on repeats: the first lasts ``first``, each next one twice the last up to
``maximum``; a throttle that comes more than ``maximum`` after the end of the last pause
starts over. A throttle reported while a pause runs (a connection made before another
worker's pause was known) neither lengthens it nor counts as a repeat. A pause that
started more than :data:`CLOCK_SET_BACK` ahead of the clock was made by a clock since set
back and is over (:func:`pause_runs`); one read back longer than ``maximum`` ends
``maximum`` after it started (:func:`bounded`).

**Token buckets** refill at ``rate`` tokens a second up to ``capacity``; a new bucket is
full. Taking from several buckets at once (per minute and per hour) grants what all of
them allow. A clock behind a bucket's stamp (another worker's host) refills nothing and
never moves the stamp back, unless the stamp is more than :data:`CLOCK_SET_BACK` ahead
(a clock that was a year ahead and was set back). Stores keep the buckets' state so
that every worker of one store draws from the same buckets (see docs/guide.md,
"Traffic shaping").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from mailstrom.arguments import check_key, row_limit, shown
from mailstrom.bounds import EARLIEST_TIME
from mailstrom.errors import InvalidArgument
from mailstrom.policy.reasons import classify_reply
from mailstrom.status import DestinationThrottle, ReasonClass, SMTPReply

THROTTLE_CODES = frozenset({421, 451})
RATE_LIMIT_CODES = frozenset({"4.7.28", "4.7.650", "4.7.651"})
"""Enhanced codes that throttle whatever class explains them: Microsoft's 4.7.650/651
("temporarily rate limited due to IP reputation") are classed ``reputation`` for the
cause, and still ask for the whole destination to slow down."""
MAX_THROTTLE_REPLY = 512
"""Characters of the throttling reply kept with a pause."""
CLOCK_SET_BACK = timedelta(hours=1)
"""How far a bucket's stamp, or the start of a pause, may lie ahead of a worker's clock
and still be another worker's clock ahead (a stamp is kept, so that its skew is not
refilled twice); further ahead, it was made by a clock since set back: the stamp is moved
to the worker's time, and the pause is over (:func:`pause_runs`). Six times the 10
minutes two PostgreSQL workers may differ by and both lease (each within ``lease_for /
3`` of the server, 5 minutes by default); the SQLite and memory stores share one host's
clock. (The PostgreSQL store's pause queries say it again, as ``interval '1 hour'``.)"""
MAX_SHAPING_KEY = 1024
"""Octets of a paused destination or a bucket's key: a shaping rule's pattern or a
recipient domain (at most 253) and the rate's name. Every store keys its pauses and
buckets by them; PostgreSQL's index keeps no key of several thousand octets."""


def is_throttling(reply: SMTPReply | None, *, connecting: bool = False) -> bool:
    """Whether ``reply`` pauses its whole destination (see the module docstring)."""
    if reply is None or reply.code not in THROTTLE_CODES:
        return False
    if connecting and reply.code == 421:
        return True
    if reply.enhanced in RATE_LIMIT_CODES:
        return True
    return classify_reply(reply) is ReasonClass.RATE_LIMITED


def forget_before(now: datetime, maximum: timedelta, kept: timedelta) -> datetime:
    """A pause that ended before this can be deleted at ``now``: it ended ``kept`` ago
    (a store's own margin) and longer ago than ``maximum``, after which :func:`next_pause`
    starts over at the first delay as if it never was. Deleted after ``kept`` alone, a
    pause of a ``maximum`` above it was forgotten while it still counted. No earlier than
    :data:`~mailstrom.bounds.EARLIEST_TIME` (no store keeps a pause ending before it): a
    ``maximum`` of thousands of years reached before year 1 (OverflowError)."""
    try:
        return max(EARLIEST_TIME, now - max(maximum, kept))
    except OverflowError:
        return EARLIEST_TIME


def pause_runs(pause: DestinationThrottle, now: datetime) -> bool:
    """Whether ``pause`` holds its destination back at ``now``: it has not ended, and it
    did not start more than :data:`CLOCK_SET_BACK` after ``now``. One that did was made by
    a clock since set back (a host a year ahead, corrected by NTP): kept, it held the
    destination for a year and its mail expired in the queue. It is over rather than cut
    to some length: cut from each reader's clock, it would run on as long as it is read;
    and a receiver still throttling says so at the next connection, which starts a pause
    of its own over this one (:func:`next_pause`)."""
    return pause.until > now and pause.since - now <= CLOCK_SET_BACK


def bounded(pause: DestinationThrottle, maximum: timedelta) -> DestinationThrottle:
    """``pause``, ending ``maximum`` after it started at the latest. No throttle writes a
    longer one (:func:`next_pause`); read back longer (a dump restored, a hand edit: an
    end in the year 8000), it held its destination for good, all its mail expiring."""
    try:
        end = pause.since + maximum
    except OverflowError:  # a start near the last date a datetime holds: no end past it
        return pause
    return pause if pause.until <= end else replace(pause, until=end)


def next_pause(
    previous: DestinationThrottle | None,
    *,
    destination: str,
    now: datetime,
    first: timedelta,
    maximum: timedelta,
    reply: str,
) -> DestinationThrottle:
    """The pause a throttle at ``now`` starts, given the destination's ``previous`` one."""
    if previous is not None and previous.since - now > CLOCK_SET_BACK:
        previous = None  # made by a clock since set back: no pause, and no strike
    if previous is not None:
        previous = bounded(previous, maximum)
    if previous is not None and previous.until > now:
        return previous
    strikes = 1
    if previous is not None and now - previous.until < maximum:
        strikes = previous.strikes + 1
    # Doubled one strike at a time, and never past ``maximum``: a power of two of the
    # strikes overflows a timedelta (5 min * 2 ** 39 already does), and the loop ends
    # once the maximum is reached (about 50 doublings from 1 us to 100 years).
    delay = first
    for _ in range(strikes - 1):
        if delay >= maximum or delay <= timedelta(0):
            break
        delay = maximum if delay > maximum / 2 else delay * 2
    delay = min(maximum, delay)
    return DestinationThrottle(
        destination=destination,
        until=now + delay,
        strikes=strikes,
        reply=reply[:MAX_THROTTLE_REPLY],
        since=now,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenBucket:
    """One rate: ``rate`` tokens a second, at most ``capacity`` saved, named ``key``."""

    key: str
    rate: float
    capacity: float

    def __post_init__(self) -> None:
        check_key(self.key, "key", limit=MAX_SHAPING_KEY)
        # Checked where made, as every store then takes alike: a rate of 0 divided by
        # zero at the second take, a NaN or infinite one raised ValueError, OverflowError
        # or StoreRefusedData by store, and a capacity under one token never granted any.
        for name, least in (("rate", "above 0"), ("capacity", "of at least 1")):
            value = getattr(self, name)
            try:
                number = float(value) if not isinstance(value, bool | str) else math.nan
            except (TypeError, ValueError, OverflowError):
                number = math.nan
            low = number > 0 if name == "rate" else number >= 1
            if not (low and math.isfinite(number)):
                raise InvalidArgument(
                    f"{name}: expected a finite number {least}, got {shown(value)}",
                    argument=name,
                )
            object.__setattr__(self, name, number)

    @classmethod
    def per_second(cls, key: str, rate: float) -> TokenBucket:
        """A bucket for ``rate`` a second holding one second's worth (at least one)."""
        return cls(key=key, rate=rate, capacity=max(1.0, rate))


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketState:
    tokens: float
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenGrant:
    """What :func:`take_tokens` granted; ``wait`` is the seconds until one more token
    would be available (0 when some were granted)."""

    granted: int
    wait: float


def take_tokens(
    buckets: Sequence[TokenBucket],
    states: Mapping[str, BucketState],
    *,
    want: int,
    now: datetime,
) -> tuple[TokenGrant, dict[str, BucketState]]:
    """Take up to ``want`` tokens from every bucket of ``buckets`` (their saved
    ``states``; a missing one is full); returns the grant and the buckets' new states.
    InvalidArgument for a ``want`` that is no whole number (a negative one takes none):
    1.5 was granted, a fraction of a token, and NaN granted none with no wait."""
    want = row_limit(want, "want")
    levels: dict[str, float] = {}
    stamps: dict[str, datetime] = {}
    for bucket in buckets:
        state = states.get(bucket.key)
        if state is None:
            level, at = bucket.capacity, now
        else:
            # A clock behind the one that saved the state (another host) adds nothing,
            # and leaves the stamp where it was: moved back, the next worker with a clock
            # ahead would refill for the skew again, every time.
            elapsed = max(0.0, (now - state.at).total_seconds())
            # From empty at least: no take leaves a bucket below it, and a row read back
            # below it (-1e300) would give no token again, ever.
            level = min(bucket.capacity, max(0.0, state.tokens) + elapsed * bucket.rate)
            at = max(state.at, now)
            if state.at - now > CLOCK_SET_BACK:
                # No worker's clock is this far ahead of another's that still leases; it
                # is this host's own before it was set back (a year ahead: kept, the
                # stamp refilled nothing for a year). The bucket goes on from now.
                at = now
        levels[bucket.key], stamps[bucket.key] = level, at
    granted = max(0, min([want, *(math.floor(level + 1e-9) for level in levels.values())]))
    wait = 0.0
    if granted == 0 and want > 0:
        wait = max(
            (max(0.0, 1.0 - levels[b.key]) / b.rate for b in buckets),
            default=0.0,
        )
    new = {
        bucket.key: BucketState(tokens=levels[bucket.key] - granted, at=stamps[bucket.key])
        for bucket in buckets
    }
    return TokenGrant(granted=granted, wait=wait), new

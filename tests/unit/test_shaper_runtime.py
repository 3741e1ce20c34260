"""The worker's shaper: which shape a destination has, pauses known and shared through the
store, rate tokens, and the schedule of mail given back for later."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Config, DestinationRule, RetryPolicy, ShapingConfig, StoreError
from mailstrom.bounds import MAX_DURATION
from mailstrom.policy.throttle import TokenBucket
from mailstrom.runtime.shaper import Shaper
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.base import Store

NOW = datetime(2030, 1, 1, tzinfo=UTC)
REPLY = "421 4.7.28 slow down - gsmtp"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return method(*args, **kwargs)


def make(*rules: DestinationRule, store: Store | None = None) -> tuple[Shaper, Clock]:
    clock = Clock()
    config = Config(
        helo_name="client.test",
        shaping=ShapingConfig(rules=rules, provider_defaults=False, refresh=0.01),
    )
    return Shaper(config, store or MemoryStore(), store_call=call, clock=clock), clock


def test_domains_of_one_rule_share_one_shape() -> None:
    google = DestinationRule(match="*.google.com", max_connections=2)
    shaper, _ = make(google, DestinationRule(match="example.org"))
    assert shaper.known("gmail.com") is None  # not known before its MX hosts are
    one = shaper.for_route("gmail.com", ["gmail-smtp-in.l.google.com"])
    two = shaper.for_route("acme.example", ["aspmx.l.google.com"])
    assert one is two and one.key == "*.google.com" and one.max_connections == 2
    assert shaper.known("gmail.com") is one  # remembered once routed
    assert shaper.known("example.org") is not None  # a rule for the domain itself
    plain = shaper.for_route("other.test", ["mx.other.test"])
    assert plain.key == "other.test" and plain.rule is None


def test_a_domain_whose_mx_hosts_moved_takes_the_rule_of_its_new_hosts() -> None:
    """The shape found through a domain's MX hosts was kept for good: a domain that moved
    from Google Workspace to Microsoft 365 while the worker ran stayed under the Google
    rule, its limits and its pauses (a Microsoft throttle paused every Gmail domain)."""
    google = DestinationRule(match="*.google.com", max_connections=5)
    outlook = DestinationRule(match="*.outlook.com", max_connections=3)
    shaper, _ = make(google, outlook)
    assert shaper.for_route("acme.test", ["aspmx.l.google.com"]).key == "*.google.com"
    # Its route's TTL ran out, and DNS names Microsoft's hosts now.
    moved = shaper.for_route("acme.test", ["acme-test.mail.protection.outlook.com"])
    assert moved.key == "*.outlook.com" and moved.max_connections == 3
    assert shaper.known("acme.test") is moved
    # Then to a server of its own, under no rule.
    own = shaper.for_route("acme.test", ["mx.acme.test"])
    assert own.key == "acme.test" and own.rule is None
    assert shaper.known("acme.test") is None


async def test_a_pause_holds_until_it_ends_and_reaches_other_workers() -> None:
    store = MemoryStore()
    mine, clock = make(store=store)
    theirs, _ = make(store=store)
    shape = mine.for_route("example.org", ["mx.example.org"])
    pause = await mine.throttled(shape, REPLY)
    assert mine.pause_of(shape) == pause
    assert theirs.known("example.org") is None
    await theirs.refresh()
    assert theirs.pause_of(theirs.for_route("example.org", ["mx.example.org"])) == pause
    assert theirs.known("example.org") is not None  # items arriving now are held back
    clock.now = pause.until
    assert mine.pause_of(shape) is None
    assert await mine.wait_to_send(shape)


async def test_a_pause_from_a_clock_since_set_back_does_not_hold_the_destination() -> None:
    # The worker's clock was a year ahead when it was throttled; NTP set it back. The
    # pause (its own and the store's) held the destination for a year.
    store = MemoryStore()
    mine, clock = make(store=store)
    theirs, _ = make(store=store)
    shape = mine.for_route("example.org", ["mx.example.org"])
    clock.now = NOW + timedelta(days=365)
    await mine.throttled(shape, REPLY)
    clock.now = NOW
    await theirs.refresh()
    assert theirs.paused() == []
    assert mine.paused() == [] and mine.pause_of(shape) is None
    await mine.refresh()
    assert mine.pause_of(shape) is None and await mine.wait_to_send(shape)
    # Throttled again: a pause of the first delay from now, not the year-ahead one.
    pause = await mine.throttled(shape, REPLY)
    assert (pause.since, pause.until, pause.strikes) == (NOW, NOW + timedelta(minutes=5), 1)
    assert mine.pause_of(shape) == pause


async def test_a_pause_read_back_longer_than_pause_max_ends_by_it(tmp_path: Path) -> None:
    """No throttle writes a pause longer than ``pause_max`` (1 hour here): one read back
    ending in the year 8000 (a dump restored, a hand edit) held the destination for good,
    every message to it failing as expired, and a throttle meanwhile counted no repeat."""
    store = SQLiteStore(tmp_path / "q.db")
    try:
        mine, _ = make(store=store)
        theirs, clock = make(store=store)
        shape = mine.for_route("example.org", [])
        await mine.throttled(shape, REPLY)
        far = datetime(8000, 1, 1, tzinfo=UTC)
        micros = (far - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        with sqlite3.connect(tmp_path / "q.db") as conn:
            conn.execute("UPDATE destination_throttles SET until = ?", (micros,))
        conn.close()
        await theirs.refresh()
        [pause] = theirs.paused()
        assert pause.until == NOW + timedelta(hours=1)
        clock.now = NOW + timedelta(hours=1)
        await theirs.refresh()
        assert theirs.paused() == []
        # Throttled again: a repeat after the pause it ended at, twice the first delay.
        again = await theirs.throttled(theirs.for_route("example.org", []), REPLY)
        assert (again.since, again.strikes) == (clock.now, 2)
        assert again.until == clock.now + timedelta(minutes=10)
    finally:
        store.close()


async def test_a_failing_store_still_pauses_this_worker() -> None:
    class FailingStore(MemoryStore):
        def throttle(self, *args: Any, **kwargs: Any) -> Any:
            raise StoreError("database unreachable")

    shaper, _ = make(store=FailingStore())
    shape = shaper.for_route("example.org", [])
    pause = await shaper.throttled(shape, REPLY)
    assert pause.until == NOW + timedelta(minutes=5)  # the default first pause
    assert not await shaper.wait_to_send(shape)  # paused: nothing goes out


async def test_tokens_come_from_the_store_a_second_at_a_time() -> None:
    rule = DestinationRule(match="example.org", messages_per_minute=180)
    store = MemoryStore()
    shaper, clock = make(rule, store=store)
    shape = shaper.for_route("example.org", [])
    assert shape.want == 3
    assert await shaper.wait_to_send(shape)
    sent = sum(shape.take_local() for _ in range(10))
    assert sent == 3  # a full bucket holds one second's worth
    clock.now += timedelta(seconds=1)
    assert await shaper.wait_to_send(shape)
    assert sum(shape.take_local() for _ in range(10)) == 3


def test_mail_beyond_the_horizon_is_scheduled_at_the_rate() -> None:
    rule = DestinationRule(match="example.org", messages_per_minute=60)
    shaper, _ = make(rule)
    shape = shaper.for_route("example.org", [])
    assert shaper.spread(shape, 5) is None  # within 10 s of the rate: kept
    dues = [shaper.spread(shape, 10) for _ in range(5)]
    assert dues == [NOW + timedelta(seconds=s) for s in (11, 12, 13, 14, 15)]
    unlimited = shaper.for_route("other.test", [])
    assert shaper.spread(unlimited, 10_000) is None


def test_a_higher_lane_books_ahead_of_a_lower_lanes_schedule() -> None:
    rule = DestinationRule(match="example.org", messages_per_minute=60)
    shaper, _ = make(rule)
    shape = shaper.for_route("example.org", [])
    bulk = [shaper.spread(shape, 10, rank=1) for _ in range(30)]
    assert bulk[-1] == NOW + timedelta(seconds=40)
    # Ten of its own lane ahead of it: its place in the rate, not after the bulk backlog.
    assert shaper.spread(shape, 10, rank=0) == NOW + timedelta(seconds=11)
    assert shaper.spread(shape, 10, rank=0) == NOW + timedelta(seconds=12)
    assert shaper.spread(shape, 10, rank=1) == NOW + timedelta(seconds=41)


def test_mail_the_retry_policy_gives_up_on_books_no_place_in_the_schedule() -> None:
    """A message whose place in the rate falls past when its retries end fails instead of
    going back to the store: its place, booked all the same, pushed back every message
    after it (past their own retries, had they little time left)."""
    rule = DestinationRule(match="example.org", messages_per_minute=60)
    shaper, _ = make(rule)
    shape = shaper.for_route("example.org", [])
    late = shaper.spread(shape, 10, latest=NOW + timedelta(seconds=5))
    assert late == NOW + timedelta(seconds=11)  # past ``latest``: the caller fails it
    assert shaper.spread(shape, 10, latest=NOW + timedelta(seconds=11)) == late  # its place
    assert shaper.spread(shape, 10) == NOW + timedelta(seconds=12)


async def test_a_schedule_booked_by_a_clock_since_set_back_is_dropped() -> None:
    # Mail given back while the worker's clock was a year ahead booked the rate's places
    # then; once NTP set the clock back, each next message was booked after them, a year
    # ahead, and failed at once as expired (past retry.max_age).
    rule = DestinationRule(match="example.org", messages_per_minute=60)
    shaper, clock = make(rule)
    shape = shaper.for_route("example.org", [])
    clock.now = NOW + timedelta(days=365)
    assert shaper.spread(shape, 10) == clock.now + timedelta(seconds=11)
    clock.now = NOW
    assert shaper.spread(shape, 10) == NOW + timedelta(seconds=11)
    assert shaper.spread(shape, 10) == NOW + timedelta(seconds=12)
    # Sent a year ahead only: the schedule still lapses once stale (sent_at was a year
    # ahead, and a schedule with mail sent since it began never lapsed).
    other, clock = make(rule)
    shape = other.for_route("example.org", [])
    clock.now = NOW + timedelta(days=365)
    assert await other.wait_to_send(shape) and shape.take_local()
    clock.now = NOW
    booked = [other.spread(shape, 10) for _ in range(400)]
    assert booked[-1] == NOW + timedelta(seconds=410)
    clock.now = NOW + timedelta(minutes=5)  # the mail given back is gone from the store
    assert other.spread(shape, 10) == clock.now + timedelta(seconds=11)


async def test_a_schedule_of_mail_gone_from_the_store_lapses(tmp_path: Path) -> None:
    """The schedule of mail given back was never reset: a campaign cancelled once given
    back left it 80 minutes ahead at 120 a minute, and the next campaign's overflow was
    booked behind mail that was gone, until the worker restarted."""
    rule = DestinationRule(match="example.org", messages_per_minute=120)
    store = SQLiteStore(tmp_path / "q.db")
    try:
        shaper, clock = make(rule, store=store)
        shape = shaper.for_route("example.org", [])
        first = [shaper.spread(shape, 20) for _ in range(10_000)]
        assert first[-1] == NOW + timedelta(seconds=5010)  # 83 minutes of the rate
        # Cancelled in the store: none of it comes back, nothing goes out.
        clock.now += timedelta(minutes=5)
        second = [shaper.spread(shape, 20) for _ in range(1000)]
        assert second[0] == clock.now + timedelta(seconds=11)  # its own queue's place
        # Mail that does come back and go out keeps its schedule.
        clock.now += timedelta(seconds=30)
        assert await shaper.wait_to_send(shape)
        clock.now += timedelta(minutes=1)
        assert shaper.spread(shape, 20) == NOW + timedelta(minutes=5, seconds=511)
    finally:
        store.close()


def test_a_pause_as_long_as_the_retries_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    """A full-length throttle pause no shorter than ``retry.max_age`` fails every message
    pending for the destination as expired, at once; nothing said so."""

    def shaper(pause_max: timedelta, max_age: timedelta | None) -> None:
        config = Config(
            helo_name="client.test",
            retry=RetryPolicy(max_age=max_age),
            shaping=ShapingConfig(pause_max=pause_max),
        )
        Shaper(config, MemoryStore(), store_call=call, clock=Clock())

    with caplog.at_level(logging.WARNING, logger="mailstrom.shaping"):
        shaper(timedelta(hours=1), timedelta(days=5))
        shaper(timedelta(hours=1), None)
        assert not caplog.records
        shaper(timedelta(hours=1), timedelta(minutes=30))
    assert [r.getMessage() for r in caplog.records] == [
        "shaping.pause_max (1:00:00) is not shorter than retry.max_age (0:30:00): a "
        "destination throttled that long fails all its pending mail as expired at once"
    ]


def test_the_schedule_of_a_slow_rate_ends_within_the_longest_duration() -> None:
    # 1e-12 an hour (refused by the rule now) overflowed a timedelta in spread; the
    # slowest rate a rule takes, one a day, did too behind a long enough queue.
    slowest = DestinationRule(match="example.org", messages_per_hour=1 / 24)
    shaper, _ = make(slowest)
    shape = shaper.for_route("example.org", [])
    end = NOW + MAX_DURATION + timedelta(seconds=1)
    assert shaper.spread(shape, 1) == NOW + timedelta(days=1, seconds=1)
    assert all(shaper.spread(shape, 10**9) == end for _ in range(3))
    tiny = shaper.for_route("other.test", [])
    tiny.message_buckets = (TokenBucket(key="tiny", rate=1e-16, capacity=1.0),)
    assert shaper.spread(tiny, 1) == end


async def test_tokens_held_when_a_pause_starts_add_nothing_after_it() -> None:
    """A session takes a second's worth of tokens before it connects; a throttle (a 421
    greeting) left them held through the pause, and after it they went out on top of the
    store's bucket, refilled meanwhile: twice the rate at once to the destination that
    had just throttled."""
    rule = DestinationRule(match="example.org", messages_per_minute=600)
    store = MemoryStore()
    shaper, clock = make(rule, store=store)
    shape = shaper.for_route("example.org", [])
    assert await shaper.wait_to_send(shape)  # ten tokens, for the session about to connect
    pause = await shaper.throttled(shape, REPLY)
    clock.now = pause.until
    assert await shaper.wait_to_send(shape)
    at_once = 0
    while shape.take_local():
        at_once += 1
    at_once += store.take_tokens(shape.message_buckets, want=100, now=clock.now).granted
    assert at_once == 10  # the bucket's second's worth, no more


async def test_tokens_held_when_another_worker_pauses_add_nothing_after_it() -> None:
    rule = DestinationRule(match="*.example.org", messages_per_minute=600)
    store = MemoryStore()
    mine, clock = make(rule, store=store)
    theirs, _ = make(rule, store=store)
    shape = mine.for_route("a.test", ["mx.example.org"])
    assert await mine.wait_to_send(shape)
    pause = await theirs.throttled(theirs.for_route("b.test", ["mx.example.org"]), REPLY)
    await mine.refresh()
    clock.now = pause.until
    assert await mine.wait_to_send(shape)
    at_once = 0
    while shape.take_local():
        at_once += 1
    at_once += store.take_tokens(shape.message_buckets, want=100, now=clock.now).granted
    assert at_once == 10


async def test_tokens_held_through_a_failed_connection_add_nothing_later() -> None:
    """A session takes a second's worth of tokens before it connects; when no MX host
    could be reached (refused, or the connect timeout), its queue was deferred with the
    tokens still held, and the next session to the destination (the retry, minutes later)
    sent them on top of the store's bucket, refilled meanwhile: twice the rate at once."""
    rule = DestinationRule(match="example.org", messages_per_minute=600)
    store = MemoryStore()
    shaper, clock = make(rule, store=store)
    shape = shaper.for_route("example.org", [])
    assert await shaper.wait_to_send(shape)  # ten tokens, for the session about to connect
    clock.now += timedelta(minutes=5)  # nothing was reached; the retry is due
    assert await shaper.wait_to_send(shape)
    at_once = 0
    while shape.take_local():
        at_once += 1
    at_once += store.take_tokens(shape.message_buckets, want=100, now=clock.now).granted
    assert at_once == 10  # the bucket's second's worth, no more


async def test_tokens_last_as_long_as_the_rate_takes_to_give_as_many() -> None:
    fast = DestinationRule(match="example.org", messages_per_minute=600)
    shaper, clock = make(fast)
    shape = shaper.for_route("example.org", [])
    assert await shaper.wait_to_send(shape)
    assert sum(shape.take_local() for _ in range(4)) == 4
    clock.now += timedelta(milliseconds=900)
    assert await shaper.wait_to_send(shape)
    assert sum(shape.take_local() for _ in range(100)) == 6  # the rest of that second's ten
    # One a minute: the token taken before the first MX host timed out still carries the
    # message to the next host, rather than wait a minute for another.
    slow = DestinationRule(match="example.org", messages_per_hour=60)
    store = MemoryStore()
    shaper, clock = make(slow, store=store)
    shape = shaper.for_route("example.org", [])
    assert await shaper.wait_to_send(shape)
    clock.now += timedelta(seconds=30)
    assert await shaper.wait_to_send(shape)
    assert shape.take_local() and not shape.take_local()
    assert store.take_tokens(shape.message_buckets, want=1, now=clock.now).granted == 0

"""Contract: traffic shaping state every worker of a store shares (schema version 7):
destination pauses, postponed recipients, rate buckets."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import pytest

from mailstrom.errors import InvalidArgument
from mailstrom.policy.throttle import TokenBucket
from mailstrom.status import RecipientState
from mailstrom.stores import Store

from .conftest import Backend
from .support import LEASE_FOR, NOW, SECOND, lease_all, message, results_for

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
REPLY = "421 4.7.28 Too much unsolicited mail seen from your sending domain - gsmtp"


def _throttle(store: Store, at: datetime, destination: str = "*.google.com") -> object:
    return store.throttle(destination, now=at, reply=REPLY, first=MINUTE, maximum=HOUR)


def test_a_throttle_pauses_the_destination_for_the_first_delay(store: Store) -> None:
    pause = store.throttle("*.google.com", now=NOW, reply=REPLY, first=MINUTE, maximum=HOUR)
    assert (pause.destination, pause.until, pause.strikes) == ("*.google.com", NOW + MINUTE, 1)
    assert pause.reply == REPLY and pause.since == NOW
    assert store.throttles(now=NOW + 30 * SECOND) == [pause]
    assert store.throttles(now=NOW + MINUTE) == []  # over at its end


def test_a_throttle_during_the_pause_changes_nothing(store: Store) -> None:
    first = _throttle(store, NOW)
    again = _throttle(store, NOW + 10 * SECOND)
    assert again == first


def test_a_throttle_at_a_zoned_now_answers_in_utc_alike(store: Store) -> None:
    # The SQL stores answered a new pause in the zone of ``now`` and one read back in UTC;
    # every time a store returns is in UTC, as the memory store's pauses are.
    zoned = NOW.astimezone(timezone(timedelta(hours=-5)))
    pauses = [_throttle(store, zoned), _throttle(store, zoned + SECOND)]
    pauses += store.throttles(now=zoned)
    for pause in pauses:
        assert pause == pauses[0]
        assert pause.until.tzinfo is UTC and pause.since.tzinfo is UTC, pause
    assert (pauses[0].since, pauses[0].until) == (NOW, NOW + MINUTE)


def test_repeats_double_the_pause_up_to_the_maximum_and_a_quiet_spell_resets(
    store: Store,
) -> None:
    at, pauses = NOW, []
    for _ in range(8):
        pause = store.throttle("example.org", now=at, reply=REPLY, first=MINUTE, maximum=HOUR)
        pauses.append(pause.until - at)
        at = pause.until + SECOND
    assert pauses[:7] == [MINUTE * 2**i for i in range(6)] + [HOUR]
    assert pauses[7] == HOUR
    later = at + 2 * HOUR  # no throttle for longer than the maximum pause
    fresh = store.throttle("example.org", now=later, reply=REPLY, first=MINUTE, maximum=HOUR)
    assert (fresh.strikes, fresh.until) == (1, later + MINUTE)


def test_a_quiet_spell_shorter_than_a_maximum_above_a_day_keeps_the_strikes(
    store: Store,
) -> None:
    # The durable stores deleted every pause that ended a day ago, whatever the maximum:
    # with pause_max above a day the next pause started over at the first delay. The
    # memory store kept every pause it ever made, a destination each, for good.
    day, most = 24 * HOUR, 3 * 24 * HOUR
    first = store.throttle("example.org", now=NOW, reply=REPLY, first=HOUR, maximum=most)
    at = first.until + 2 * day  # quiet for less than the maximum: not a fresh start
    again = store.throttle("example.org", now=at, reply=REPLY, first=HOUR, maximum=most)
    assert (again.strikes, again.until) == (2, at + 2 * HOUR)
    later = again.until + most  # quiet for the maximum: a fresh start
    fresh = store.throttle("example.org", now=later, reply=REPLY, first=HOUR, maximum=most)
    assert (fresh.strikes, fresh.until) == (1, later + HOUR)


def test_a_destination_throttled_without_end_stays_paused_for_the_maximum(
    store: Store,
) -> None:
    # 5 min * 2 ** 39 overflowed a timedelta: from the 40th throttle on, none paused.
    at = NOW
    for strikes in range(1, 46):
        pause = store.throttle("example.org", now=at, reply=REPLY, first=5 * MINUTE, maximum=HOUR)
        assert pause.strikes == strikes
        at = pause.until + SECOND
    assert pause.until - pause.since == HOUR


def test_destinations_are_paused_apart(store: Store) -> None:
    _throttle(store, NOW, "*.google.com")
    _throttle(store, NOW + 10 * SECOND, "example.org")
    listed = store.throttles(now=NOW + 20 * SECOND)
    assert [t.destination for t in listed] == ["*.google.com", "example.org"]  # soonest first


def test_a_pause_is_seen_by_every_store_object(store_backend: Backend) -> None:
    store_backend.require_durable()
    one, two = store_backend.open(), store_backend.open()
    pause = _throttle(one, NOW)
    assert two.throttles(now=NOW) == [pause]
    assert _throttle(two, NOW + SECOND) == pause  # still the same pause, not a repeat


def test_postponed_recipients_wait_without_an_attempt_and_show_the_pause(store: Store) -> None:
    # The pause runs in real time: status shows a pause only while it lasts on the clock.
    now = datetime.now(UTC)
    mid = store.enqueue(message("a@gmail.com", "b@gmail.com"), now=now)
    lease = lease_all(store, now=now)
    pause = store.throttle("*.google.com", now=now, reply=REPLY, first=HOUR, maximum=HOUR)
    assert store.postpone(lease.items, until=pause.until, destination="*.google.com") == 2

    assert store.lease(now=now + MINUTE, limit=10, lease_for=LEASE_FOR) is None
    assert store.next_due(now=now) == pause.until
    status = store.status(mid)
    for r in status.recipients:
        assert (r.state, r.attempts, r.next_attempt_at) == (RecipientState.QUEUED, 0, pause.until)
        assert r.throttle == pause
        assert r.throttle_note is not None
        assert r.throttle_note.startswith("destination *.google.com throttled until ")
        assert REPLY in r.throttle_note
    again = store.lease(now=pause.until, limit=10, lease_for=LEASE_FOR)
    assert again is not None
    assert sorted(r.address for i in again.items for r in i.recipients) == [
        "a@gmail.com",
        "b@gmail.com",
    ]


def test_the_queue_lists_show_the_pause_as_status_does(store: Store) -> None:
    """Was: query() and recent() (``mailstrom queue --json``, ``query_recent()``) gave
    ``throttle=None`` for recipients a destination's pause held back, which status()
    showed."""
    now = datetime.now(UTC)
    mid = store.enqueue(message("a@gmail.com", "b@example.org"), now=now)
    other = store.enqueue(message("c@example.org"), now=now)
    lease = lease_all(store, now=now)
    pause = store.throttle("*.google.com", now=now, reply=REPLY, first=HOUR, maximum=HOUR)
    gmail = [i for i in lease.items if i.domain == "gmail.com"]
    store.postpone(gmail, until=pause.until, destination="*.google.com")
    expected = store.status(mid)
    assert expected.recipient("a@gmail.com").throttle == pause
    for listed in (store.query(now=now), store.recent()):
        by_id = {m.id: m for m in listed}
        assert by_id[mid].recipient("a@gmail.com").throttle == pause
        assert by_id[mid].recipient("b@example.org").throttle is None
        assert all(r.throttle is None for r in by_id[other].recipients)


def test_status_shows_no_pause_once_it_ended_or_the_recipient_is_final(store: Store) -> None:
    now = datetime.now(UTC)
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=now - HOUR)
    lease = lease_all(store, now=now - HOUR)
    ended = store.throttle("example.org", now=now - HOUR, reply=REPLY, first=MINUTE, maximum=HOUR)
    store.postpone(lease.items, until=ended.until, destination="example.org")
    assert all(r.throttle is None for r in store.status(mid).recipients)

    lease = lease_all(store, now=now)
    pause = store.throttle("example.org", now=now, reply=REPLY, first=HOUR, maximum=HOUR)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    store.postpone(lease.items, until=pause.until, destination="example.org")
    status = store.status(mid)
    assert status.recipient("a@example.org").throttle is None  # delivered: final
    assert status.recipient("b@example.org").throttle == pause


def test_postpone_skips_recipients_no_longer_held(store: Store) -> None:
    store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    assert store.postpone(lease.items, until=NOW + HOUR) == 1
    assert store.postpone(lease.items, until=NOW + HOUR) == 0  # given back already
    assert store.lease(now=NOW + MINUTE, limit=10, lease_for=LEASE_FOR) is None


def test_a_new_bucket_is_full_and_refills_at_its_rate(store: Store) -> None:
    bucket = TokenBucket(key="example.org messages/minute", rate=2.0, capacity=2.0)
    first = store.take_tokens([bucket], want=5, now=NOW)
    assert (first.granted, first.wait) == (2, 0.0)
    empty = store.take_tokens([bucket], want=1, now=NOW)
    assert empty.granted == 0 and abs(empty.wait - 0.5) < 1e-6
    half = store.take_tokens([bucket], want=3, now=NOW + timedelta(milliseconds=500))
    assert half.granted == 1
    full = store.take_tokens([bucket], want=3, now=NOW + 10 * SECOND)
    assert full.granted == 2  # never more than its capacity saved


def test_several_buckets_grant_what_all_of_them_allow(store: Store) -> None:
    minute = TokenBucket(key="d messages/minute", rate=1.0, capacity=3.0)
    hour = TokenBucket(key="d messages/hour", rate=0.01, capacity=2.0)
    assert store.take_tokens([minute, hour], want=5, now=NOW).granted == 2
    refused = store.take_tokens([minute, hour], want=1, now=NOW + SECOND)
    assert refused.granted == 0
    assert abs(refused.wait - 99.0) < 1e-6  # the hour bucket (0.01 refilled) decides


def test_workers_share_one_bucket_and_never_take_more_than_it_holds(
    store_backend: Backend,
) -> None:
    stores = [store_backend.open() for _ in range(2)]
    bucket = TokenBucket(key="*.google.com messages/minute", rate=0.001, capacity=20.0)

    def take(i: int) -> int:
        return sum(stores[i % 2].take_tokens([bucket], want=1, now=NOW).granted for _ in range(8))

    with ThreadPoolExecutor(6) as pool:
        granted = sum(pool.map(take, range(6)))
    assert granted == 20


def test_a_clock_behind_takes_nothing_and_leaves_the_bucket_as_it_was(store: Store) -> None:
    # Moved back by a worker whose clock is behind, the stamp let a worker whose clock
    # is ahead refill for the whole skew on its next take.
    bucket = TokenBucket(key="example.org messages/minute", rate=0.1, capacity=1.0)
    ahead = NOW + MINUTE
    assert store.take_tokens([bucket], want=1, now=ahead).granted == 1
    assert store.take_tokens([bucket], want=1, now=NOW).granted == 0
    assert store.take_tokens([bucket], want=1, now=ahead + SECOND).granted == 0
    assert store.take_tokens([bucket], want=1, now=ahead + 10 * SECOND).granted == 1


def test_a_clock_set_back_from_a_year_ahead_takes_again_at_the_rate(store: Store) -> None:
    # A stamp a year ahead (this host's clock before NTP set it back) refilled nothing
    # until the year was over: the destination's mail expired in the queue.
    bucket = TokenBucket(key="example.org messages/minute", rate=0.1, capacity=1.0)
    assert store.take_tokens([bucket], want=1, now=NOW + timedelta(days=365)).granted == 1
    assert store.take_tokens([bucket], want=1, now=NOW).granted == 0
    assert store.take_tokens([bucket], want=1, now=NOW + 10 * SECOND).granted == 1


def test_a_pause_from_a_clock_set_back_from_a_year_ahead_is_over(store: Store) -> None:
    # A pause recorded by a clock a year ahead (then set back by NTP) held the destination
    # for a year: the worker gave its mail back due then, and it expired in the queue.
    ahead = store.throttle(
        "example.org", now=NOW + 365 * DAY, reply=REPLY, first=MINUTE, maximum=HOUR
    )
    assert store.throttles(now=NOW) == []
    pause = _throttle(store, NOW, "example.org")  # the receiver throttles again: a new one
    assert (pause.since, pause.until, pause.strikes) == (NOW, NOW + MINUTE, 1)
    assert store.throttles(now=NOW) == [pause] != [ahead]
    # Within the hour two workers' clocks may differ by, a pause ahead still holds.
    near = _throttle(store, NOW + 59 * MINUTE, "example.com")
    assert store.throttles(now=NOW) == [pause, near]


def test_status_shows_no_pause_from_a_clock_set_back(store: Store) -> None:
    now = datetime.now(UTC)
    mid = store.enqueue(message("a@example.org"), now=now)
    lease = lease_all(store, now=now)
    ahead = now + 365 * DAY
    store.throttle("example.org", now=ahead, reply=REPLY, first=HOUR, maximum=HOUR)
    store.postpone(lease.items, until=now + MINUTE, destination="example.org")
    assert store.status(mid).recipient("a@example.org").throttle is None
    assert store.query(now=now)[0].recipient("a@example.org").throttle is None


def test_a_recipient_deferred_on_its_own_since_a_pause_does_not_show_the_next(
    store: Store,
) -> None:
    # Held back by a pause once, then tried and deferred for a reason of its own (due in
    # three hours): a later pause of its destination, over in one, does not hold it back.
    now = datetime.now(UTC)
    mid = store.enqueue(message("a@example.org"), now=now - 2 * HOUR)
    lease = lease_all(store, now=now - 2 * HOUR)
    ended = store.throttle(
        "example.org", now=now - 2 * HOUR, reply=REPLY, first=MINUTE, maximum=HOUR
    )
    store.postpone(lease.items, until=ended.until, destination="example.org")
    lease = lease_all(store, now=ended.until)
    own = now + 3 * HOUR
    store.record(results_for(lease, RecipientState.DEFERRED, at=now, next_attempt_at=own))
    pause = store.throttle("example.org", now=now, reply=REPLY, first=HOUR, maximum=HOUR)
    assert pause.until < own
    a = store.status(mid).recipient("a@example.org")
    assert (a.state, a.next_attempt_at) == (RecipientState.DEFERRED, own)
    assert a.throttle is None, a.throttle_note


def test_a_naive_now_is_refused_and_leaves_the_bucket_as_it_was(store: Store) -> None:
    """Was: SQLite and PostgreSQL took a naive ``now``: with the bucket saved, its aware
    time less the naive one raised TypeError, no error of the store's; without it, the
    naive time was saved and read back as UTC. The memory store refuses it."""
    bucket = TokenBucket(key="example.org messages/minute", rate=2.0, capacity=2.0)
    naive = NOW.replace(tzinfo=None)
    with pytest.raises(InvalidArgument):
        store.take_tokens([bucket], want=1, now=naive)
    assert store.take_tokens([bucket], want=1, now=NOW).granted == 1
    with pytest.raises(InvalidArgument):
        store.take_tokens([bucket], want=1, now=naive)
    assert store.take_tokens([bucket], want=5, now=NOW).granted == 1


@pytest.mark.parametrize(
    ("first", "maximum", "named"),
    [
        (timedelta(days=10**8), timedelta(days=10**8), "first"),
        (MINUTE, timedelta(days=10**8), "maximum"),
        (MINUTE, timedelta(days=365 * 7000), "maximum"),
    ],
    ids=["huge-first", "huge-maximum", "maximum-past-9000"],
)
def test_a_pause_no_store_reads_back_is_refused_alike(
    store: Store, first: timedelta, maximum: timedelta, named: str
) -> None:
    """Was: a throttle whose ``first`` or ``maximum`` ends past the times a store keeps
    (``timedelta(days=10**8)``) was a bare OverflowError in the memory store and
    PostgreSQL and StoreRefusedData in SQLite. Every store refuses it (InvalidArgument,
    naming the argument) before writing anything, as it refuses such a lease; a
    ``maximum`` of 5000 years was an OverflowError in every store."""
    mid = store.enqueue(message(), now=NOW)
    recipients = [(mid, "alice@example.org")]
    with pytest.raises(InvalidArgument, match=rf"{named}: .* keeps"):
        store.throttle(
            "example.org",
            now=NOW,
            reply=REPLY,
            first=first,
            maximum=maximum,
            recipients=recipients,
        )
    assert store.throttles(now=NOW) == []
    assert all(r.throttle is None for r in store.status(mid).recipients)
    # A maximum of thousands of years that still ends before 9000 is kept (forgetting
    # old pauses reached back before year 1: OverflowError).
    long = timedelta(days=365 * 5000)
    pause = store.throttle("example.org", now=NOW, reply=REPLY, first=MINUTE, maximum=long)
    assert (pause.until, pause.strikes) == (NOW + MINUTE, 1)
    assert store.throttles(now=NOW) == [pause]


@pytest.mark.parametrize("want", [1.5, True, "3", None, float("nan")])
def test_a_want_that_is_no_whole_number_is_refused_alike(store: Store, want: object) -> None:
    """Was: every store granted ``want=1.5`` one and a half tokens (a TokenGrant whose
    ``granted`` is no int, the bucket left at a fraction) and ``True`` as a token; a NaN
    granted none with no wait (a caller looping at once); a string or None was a
    TypeError. Every store refuses it (InvalidArgument) and leaves the bucket as it was."""
    bucket = TokenBucket(key="example.org messages/minute", rate=0.1, capacity=3.0)
    with pytest.raises(InvalidArgument, match=r"^want: "):
        store.take_tokens([bucket], want=want, now=NOW)  # type: ignore[arg-type]
    assert store.take_tokens([bucket], want=5, now=NOW).granted == 3


def test_a_reply_no_store_can_write_is_kept_with_replacements_alike(store: Store) -> None:
    """Was: a throttling reply with a NUL or a lone surrogate given to ``throttle`` was
    kept as it was by the memory store, made SQLite refuse the pause for the surrogate
    (StoreRefusedData) and PostgreSQL for either: the pause was lost there. Every store
    now keeps such a reply as recorded replies are kept, those characters as U+FFFD."""
    reply = "421 4.7.0 slow\x00 down \udcff now"
    pause = store.throttle("example.org", now=NOW, reply=reply, first=MINUTE, maximum=HOUR)
    assert pause.reply == "421 4.7.0 slow\ufffd down \ufffd now"
    assert store.throttles(now=NOW) == [pause]


@pytest.mark.parametrize(
    "destination",
    ["example\x00.org", "example\udcff.org", "x" * 2000, 5],
    ids=["nul", "surrogate", "too-long", "no-string"],
)
def test_a_destination_no_store_can_key_is_refused_alike(store: Store, destination: str) -> None:
    """Was: a destination with a NUL given to ``throttle`` or ``postpone`` was kept by the
    memory store and SQLite and refused by PostgreSQL (StoreRefusedData), one with a lone
    surrogate refused by the SQL stores only, and one of thousands of characters was a
    StoreError in PostgreSQL (its index keeps no such key). Every store refuses it
    (InvalidArgument, named) before it marks or postpones anything."""
    mid = store.enqueue(message(), now=NOW)
    lease = lease_all(store)
    with pytest.raises(InvalidArgument, match=r"^destination: "):
        store.throttle(
            destination,
            now=NOW,
            reply=REPLY,
            first=MINUTE,
            maximum=HOUR,
            recipients=[(mid, "alice@example.org")],
        )
    with pytest.raises(InvalidArgument, match=r"^destination: "):
        store.postpone(lease.items, until=NOW + HOUR, destination=destination)
    assert store.throttles(now=NOW) == []
    assert all(r.throttle is None for r in store.status(mid).recipients)
    # The recipients are still held by the lease: postponed now, they are given back.
    assert store.postpone(lease.items, until=NOW + HOUR, destination="example.org") == 2


@pytest.mark.parametrize(
    "when",
    [datetime(9999, 1, 1, tzinfo=UTC), datetime(1, 1, 2, tzinfo=UTC)],
    ids=["year-9999", "year-1"],
)
def test_a_now_no_store_reads_back_is_refused_at_a_take_alike(store: Store, when: datetime) -> None:
    """Was: ``take_tokens`` at a ``now`` past the times a store keeps (year 9999) took the
    tokens and stamped the bucket then: every later take, at the real time, is behind the
    stamp and refills nothing, so the rate sent nothing again (and SQLite, which reads no
    such stamp back, kept it full instead). Every store refuses it (InvalidArgument, as
    a throttle's ``now``) and leaves the bucket as it was."""
    bucket = TokenBucket(key="example.org messages/minute", rate=1.0, capacity=3.0)
    assert store.take_tokens([bucket], want=3, now=NOW).granted == 3
    with pytest.raises(InvalidArgument, match=r"^now: .* keeps"):
        store.take_tokens([bucket], want=1, now=when)
    assert store.take_tokens([bucket], want=3, now=NOW + 2 * SECOND).granted == 2


def test_recipients_that_name_nothing_stored_leave_the_pause_alike(store: Store) -> None:
    """Was: a throttle whose ``recipients`` held a message id or address with a NUL (or
    a lone surrogate) lost the pause in PostgreSQL, which refused the whole call
    (StoreRefusedData), and SQLite for the surrogate, while the memory store skipped the
    pair, as it skips any unknown one. Such a pair names no stored recipient: every store
    skips it, and pauses the destination and marks the recipients it does name."""
    now = datetime.now(UTC)
    mid = store.enqueue(message(), now=now)
    pairs = [("nope\x00", "a@example.org"), (mid, "b\udcff@example.org"), (mid, "bob@example.org")]
    pause = store.throttle(
        "example.org", now=now, reply=REPLY, first=HOUR, maximum=HOUR, recipients=pairs
    )
    assert store.throttles(now=now) == [pause]
    shown = {r.address: r.throttle for r in store.status(mid).recipients}
    assert shown == {"alice@example.org": None, "bob@example.org": pause}

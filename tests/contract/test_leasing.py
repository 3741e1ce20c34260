"""Contract: what lease hands out, to whom, and when it comes back."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores import Store

from .conftest import Backend
from .support import LEASE_FOR, NOW, SECOND, lease_all, leased_addresses, message, results_for


def test_lease_groups_per_message_and_domain_with_bytes_and_flags(store: Store) -> None:
    data = b"Subject: caf\xc3\xa9\r\n\r\n\x80\x81 bytes\r\n"
    prepared = message(
        "a@example.org",
        "x@other.net",
        "b@EXAMPLE.org",
        "y@Other.Net",
        data=data,
        envelope_from="s\u00e9nder@example.com",
        smtputf8=True,
        eightbit=True,
    )
    mid = store.enqueue(prepared, now=NOW)
    lease = store.lease(now=NOW, limit=10, lease_for=LEASE_FOR)

    assert lease is not None
    assert lease.token
    assert lease.expires_at == NOW + LEASE_FOR
    by_domain = {item.domain: item for item in lease.items}
    assert sorted(by_domain) == ["example.org", "other.net"]
    assert [r.address for r in by_domain["example.org"].recipients] == [
        "a@example.org",
        "b@EXAMPLE.org",
    ]
    assert [r.address for r in by_domain["other.net"].recipients] == [
        "x@other.net",
        "y@Other.Net",
    ]
    for item in lease.items:
        assert item.message_id == mid
        assert item.data == data
        assert item.envelope_from == "s\u00e9nder@example.com"
        assert item.smtputf8 is True
        assert item.eightbit is True
        for r in item.recipients:
            assert r.attempts == 0
            assert r.first_attempt_at is None
            assert r.created_at == NOW


def test_flags_default_false(store: Store) -> None:
    store.enqueue(message("a@example.org"), now=NOW)
    (item,) = lease_all(store).items
    assert item.smtputf8 is False
    assert item.eightbit is False


def test_nothing_due_returns_none(store: Store) -> None:
    assert store.lease(now=NOW, limit=10, lease_for=LEASE_FOR) is None
    store.enqueue(message(), now=NOW)
    # Enqueued at NOW: not due a second earlier.
    assert store.lease(now=NOW - SECOND, limit=10, lease_for=LEASE_FOR) is None


def test_held_messages_are_not_leased_until_released(store: Store) -> None:
    held = store.enqueue(message("h@example.org"), now=NOW, hold=True)
    assert store.lease(now=NOW, limit=10, lease_for=LEASE_FOR) is None
    store.set_held(held, False)
    assert leased_addresses(lease_all(store)) == ["h@example.org"]


def test_limit_is_respected_and_oldest_due_first(store: Store) -> None:
    ids = [
        store.enqueue(message(f"a{i}@example.org", f"b{i}@example.org"), now=NOW + i * SECOND)
        for i in range(5)
    ]
    now = NOW + 10 * SECOND
    first = store.lease(now=now, limit=3, lease_for=LEASE_FOR)
    assert leased_addresses(first) == ["a0@example.org", "b0@example.org", "a1@example.org"]
    assert first is not None
    assert [i.message_id for i in first.items] == [ids[0], ids[1]]
    second = store.lease(now=now, limit=3, lease_for=LEASE_FOR)
    assert leased_addresses(second) == ["b1@example.org", "a2@example.org", "b2@example.org"]
    third = store.lease(now=now, limit=100, lease_for=LEASE_FOR)
    assert sorted(leased_addresses(third)) == [
        "a3@example.org",
        "a4@example.org",
        "b3@example.org",
        "b4@example.org",
    ]
    assert store.lease(now=now, limit=100, lease_for=LEASE_FOR) is None


def test_concurrent_leasers_never_share_a_recipient(store_backend: Backend) -> None:
    stores = [store_backend.open(), store_backend.open()]
    expected: set[str] = set()
    batch = []
    for i in range(60):
        rcpts = tuple(f"r{i}-{j}@d{j}.example" for j in range(3))
        expected.update(rcpts)
        batch.append(message(*rcpts))
    stores[0].enqueue_many(batch, now=NOW)

    start = threading.Barrier(len(stores))
    got: list[list[str]] = [[] for _ in stores]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            start.wait()
            while lease := stores[n].lease(now=NOW, limit=7, lease_for=LEASE_FOR):
                got[n].extend(leased_addresses(lease))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert not set(got[0]) & set(got[1])
    assert len(got[0]) + len(got[1]) == len(expected)
    assert set(got[0]) | set(got[1]) == expected


def test_items_come_in_due_order_not_queue_order(store: Store) -> None:
    """A lease's items are in the order their recipients fell due, which is not the order
    of the queue once a message was retried, deferred or its lease ran out; the worker
    starts them in this order. (SQLite handed them out in the queue's order.)"""
    ids = [store.enqueue(message(f"a{i}@example.org"), now=NOW) for i in range(4)]
    store.retry(ids[0], now=NOW + 3 * SECOND)
    store.retry(ids[1], now=NOW + 2 * SECOND)
    taken = store.lease(now=NOW + SECOND, limit=1, lease_for=SECOND)  # ids[2], due at NOW
    assert taken is not None
    assert [i.message_id for i in taken.items] == [ids[2]]
    # ids[2]'s lease ran out at NOW + 2 s, so it is due then, after ids[1] (same due
    # time, earlier in the queue).
    lease = store.lease(now=NOW + 10 * SECOND, limit=10, lease_for=LEASE_FOR)
    assert lease is not None
    assert [i.message_id for i in lease.items] == [ids[3], ids[1], ids[2], ids[0]]


def test_expired_lease_makes_work_due_again(store: Store) -> None:
    store.enqueue(message("a@example.org"), now=NOW)
    first = store.lease(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert first is not None
    assert store.lease(now=NOW + LEASE_FOR - SECOND, limit=10, lease_for=LEASE_FOR) is None
    second = store.lease(now=NOW + LEASE_FOR, limit=10, lease_for=LEASE_FOR)
    assert leased_addresses(second) == ["a@example.org"]
    assert second is not None
    assert second.token != first.token


def test_record_under_a_taken_over_lease_is_ignored(store: Store) -> None:
    mid = store.enqueue(message("a@example.org"), now=NOW)
    stale = lease_all(store)
    fresh = lease_all(store, now=NOW + LEASE_FOR + SECOND)

    assert len(store.record(results_for(stale, RecipientState.FAILED))) == 0
    st = store.status(mid)
    assert st.recipients[0].state is RecipientState.QUEUED
    assert st.recipients[0].attempts == 0
    assert st.recipients[0].history == ()

    assert len(store.record(results_for(fresh, RecipientState.DELIVERED))) == 1
    assert store.status(mid).state is RecipientState.DELIVERED
    # And the stale lease cannot overwrite the outcome afterwards either.
    assert len(store.record(results_for(stale, RecipientState.FAILED))) == 0
    assert store.status(mid).recipients[0].attempts == 1


def test_record_after_expiry_without_takeover_still_counts(store: Store) -> None:
    mid = store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    late = NOW + LEASE_FOR + SECOND
    assert len(store.record(results_for(lease, RecipientState.DELIVERED, at=late))) == 1
    assert store.status(mid).recipients[0].state is RecipientState.DELIVERED


def test_release_gives_back_unrecorded_recipients_without_an_attempt(store: Store) -> None:
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    lease = lease_all(store)
    assert store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    store.release(lease)

    again = store.lease(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert leased_addresses(again) == ["b@example.org"]
    st = store.status(mid)
    assert st.recipient("a@example.org").state is RecipientState.DELIVERED
    assert st.recipient("b@example.org").attempts == 0
    # The released lease no longer owns b.
    assert len(store.record(results_for(lease, RecipientState.FAILED))) == 0


def test_leased_recipient_carries_previous_attempts(store: Store) -> None:
    store.enqueue(message("a@example.org"), now=NOW)
    first = lease_all(store)
    retry_at = NOW + 10 * SECOND
    store.record(results_for(first, RecipientState.DEFERRED, next_attempt_at=retry_at))
    assert store.lease(now=retry_at - SECOND, limit=10, lease_for=LEASE_FOR) is None
    second = lease_all(store, now=retry_at)
    (r,) = second.items[0].recipients
    assert r.attempts == 1
    assert r.first_attempt_at == NOW
    assert r.created_at == NOW


def test_next_due(store: Store) -> None:
    assert store.next_due(now=NOW) is None
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    assert store.next_due(now=NOW) == NOW
    lease = lease_all(store)
    # Everything leased: due again when the lease expires.
    assert store.next_due(now=NOW) == NOW + LEASE_FOR
    later = NOW + 2 * SECOND
    store.record(results_for(lease, RecipientState.DEFERRED, next_attempt_at=later))
    assert store.next_due(now=NOW) == later
    store.set_held(mid, True)
    assert store.next_due(now=NOW) is None
    store.set_held(mid, False)
    lease = lease_all(store, now=later)
    store.record(results_for(lease, RecipientState.DELIVERED, at=later))
    assert store.next_due(now=later) is None


def test_extend_keeps_work_from_being_taken_over(store: Store) -> None:
    store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    lease = lease_all(store)
    later = NOW + 10 * LEASE_FOR
    assert store.extend(lease, until=later) == 2

    # Past the original expiry, before the extended one: still held.
    assert store.lease(now=NOW + 2 * LEASE_FOR, limit=10, lease_for=LEASE_FOR) is None
    assert store.next_due(now=NOW) == later
    # Past the extended expiry: due again.
    again = store.lease(now=later + SECOND, limit=10, lease_for=LEASE_FOR)
    assert sorted(leased_addresses(again)) == ["a@example.org", "b@example.org"]


def test_extend_leaves_recorded_and_taken_over_recipients_alone(store: Store) -> None:
    store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    assert store.extend(lease, until=NOW + 2 * LEASE_FOR) == 1

    taken_over = store.lease(now=NOW + 3 * LEASE_FOR, limit=10, lease_for=LEASE_FOR)
    assert leased_addresses(taken_over) == ["b@example.org"]
    assert store.extend(lease, until=NOW + 10 * LEASE_FOR) == 0
    assert taken_over is not None
    assert store.next_due(now=NOW) == taken_over.expires_at


def test_extend_does_not_count_the_recipients_of_messages_held_since(store: Store) -> None:
    """The worker's heartbeat gives back the work it has fewer of than it leased: a held
    message's recipients are extended (one may be on the wire) but not counted, so its
    unstarted work goes back and is not sent while held."""
    held = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    store.enqueue(message("c@example.org"), now=NOW)
    lease = lease_all(store)
    store.set_held(held, True)
    later = NOW + 10 * LEASE_FOR
    assert store.extend(lease, until=later) == 1
    # Still extended: nothing of it is leased again meanwhile, once released.
    store.set_held(held, False)
    assert store.lease(now=NOW + 2 * LEASE_FOR, limit=10, lease_for=LEASE_FOR) is None
    assert store.extend(lease, until=later) == 3
    assert store.hold_many([held], True) == 1
    assert store.extend(lease, until=later) == 1


def _sized(size: int, *recipients: str) -> PreparedMessage:
    """A message of exactly ``size`` octets."""
    head = b"Subject: Hello\r\n\r\n"
    return message(*recipients, data=head + b"x" * (size - len(head) - 2) + b"\r\n")


def test_max_bytes_leases_the_messages_whose_data_fits(store: Store) -> None:
    """A lease reads at most max_bytes of message data: the messages in due order up to
    where the next would go past it (each counted once, whatever its recipients); the
    others stay due, unleased. Without it a lease read ``limit`` messages whatever their
    size: a queue of large ones put gigabytes into one worker."""
    ids = [
        store.enqueue(_sized(1000, f"a{i}@example.org", f"b{i}@other.net"), now=NOW + i * SECOND)
        for i in range(5)
    ]
    now = NOW + 10 * SECOND
    lease = store.lease(now=now, limit=100, lease_for=LEASE_FOR, max_bytes=2999)
    assert lease is not None
    assert sorted({item.message_id for item in lease.items}) == sorted(ids[:2])
    assert len(leased_addresses(lease)) == 4
    rest = store.lease(now=now, limit=100, lease_for=LEASE_FOR, max_bytes=3000)
    assert rest is not None
    assert sorted({item.message_id for item in rest.items}) == sorted(ids[2:])
    assert store.lease(now=now, limit=100, lease_for=LEASE_FOR) is None


def test_max_bytes_still_leases_one_message_larger_than_it(store: Store) -> None:
    """The first message goes alone when it alone is larger: a message over the budget is
    still delivered, not left queued for ever."""
    big = store.enqueue(_sized(5000, "big@example.org"), now=NOW)
    store.enqueue(_sized(100, "small@example.org"), now=NOW + SECOND)
    now = NOW + 10 * SECOND
    lease = store.lease(now=now, limit=100, lease_for=LEASE_FOR, max_bytes=1000)
    assert lease is not None
    assert [item.message_id for item in lease.items] == [big]
    assert leased_addresses(store.lease(now=now, limit=100, lease_for=LEASE_FOR, max_bytes=1))
    assert store.lease(now=now, limit=100, lease_for=LEASE_FOR) is None


def test_a_message_max_bytes_leaves_out_keeps_the_lease_it_had(store: Store) -> None:
    """A recipient whose lease ran out, due again but left out of a new lease by
    max_bytes, keeps that lease: the worker that held it may still record its result,
    and its status still says leased. A budget applied after marking has to put the old
    lease back; one applied before marking never touches it."""
    ids = {
        store.enqueue(_sized(1000, "a@example.org"), now=NOW): "a@example.org",
        store.enqueue(_sized(1000, "b@example.org"), now=NOW + SECOND): "b@example.org",
    }
    old = lease_all(store)
    later = NOW + LEASE_FOR + 10 * SECOND
    new = store.lease(now=later, limit=100, lease_for=LEASE_FOR, max_bytes=1500)
    assert new is not None
    [taken] = {item.message_id for item in new.items}
    [(left, address)] = [(mid, a) for mid, a in ids.items() if mid != taken]
    assert [r.leased for r in store.status(left).recipients] == [True]
    recorded = store.record(results_for(old, RecipientState.DELIVERED, only=[address]))
    assert [r.address for r in recorded] == [address]
    assert store.status(left).recipients[0].state is RecipientState.DELIVERED


@pytest.mark.parametrize("huge", [2**63 - 1, 2**63, 2**64], ids=["bigint", "past", "huge"])
def test_a_max_bytes_past_any_store_size_is_no_bound(store: Store, huge: int) -> None:
    """Was: a budget past a bigint (``max_bytes=2**64``: "as much as you like") failed
    every lease on PostgreSQL as StoreRefusedData (bigint out of range) and leased as
    no bound in the others; no store holds that much, so it is no bound in every one,
    with lanes too."""
    ids = [store.enqueue(_sized(1000, f"a{i}@example.org"), now=NOW) for i in range(3)]
    lease = store.lease(now=NOW, limit=100, lease_for=LEASE_FOR, max_bytes=huge)
    assert lease is not None
    assert sorted(item.message_id for item in lease.items) == sorted(ids)
    store.release(lease)
    lanes = [("high", 1), ("normal", 1)]
    lease = store.lease(now=NOW, limit=100, lease_for=LEASE_FOR, lanes=lanes, max_bytes=huge)
    assert lease is not None
    assert sorted(item.message_id for item in lease.items) == sorted(ids)


def test_max_bytes_applies_across_lanes(store: Store) -> None:
    """With lanes, the budget is spent lane by lane in the lease's order: what is left
    out of a higher lane is not passed over for a lower one's."""
    high = [
        store.enqueue(
            dataclasses.replace(
                _sized(1000, f"h{i}@example.org"),
                attributes=QueueAttributes(priority="high"),
            ),
            now=NOW + i * SECOND,
        )
        for i in range(3)
    ]
    store.enqueue(_sized(100, "unnamed@example.org"), now=NOW)  # a lane not named
    now = NOW + 10 * SECOND
    lease = store.lease(
        now=now,
        limit=100,
        lease_for=LEASE_FOR,
        lanes=[("high", 10), ("normal", 10)],
        max_bytes=2500,
    )
    assert lease is not None
    assert [item.message_id for item in lease.items] == high[:2]


def test_a_lease_taken_in_a_zone_with_summer_time_lasts_its_length(store: Store) -> None:
    """Was: a ``now`` in a zone with summer time (``ZoneInfo``) had ``lease_for`` added on
    its wall clock: 01:50 CET plus two hours is 03:50 CEST, one hour on, so a lease (of
    mail or of events) taken for two hours was taken again by another worker after one."""
    from datetime import UTC, datetime, timedelta
    from zoneinfo import ZoneInfo

    now = datetime(2026, 3, 29, 1, 50, tzinfo=ZoneInfo("Europe/Berlin"))  # 00:50 UTC
    later = datetime(2026, 3, 29, 2, 0, tzinfo=UTC)  # 70 minutes on
    two_hours = timedelta(hours=2)
    store.enable_events()
    store.enqueue(message("a@example.org"), now=now)
    lease = store.lease(now=now, limit=10, lease_for=two_hours)
    assert lease is not None
    assert lease.expires_at == datetime(2026, 3, 29, 2, 50, tzinfo=UTC)
    assert store.lease(now=later, limit=10, lease_for=LEASE_FOR) is None
    store.record(results_for(lease, RecipientState.DELIVERED, at=now))
    events = store.lease_events(now=now, limit=10, lease_for=two_hours)
    assert events is not None and events.expires_at == datetime(2026, 3, 29, 2, 50, tzinfo=UTC)
    assert store.lease_events(now=later, limit=10, lease_for=LEASE_FOR) is None

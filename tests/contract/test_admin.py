"""Contract: retry, cancel, hold, purge, stats, query and recent."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mailstrom.errors import UnknownMessage
from mailstrom.status import RecipientState
from mailstrom.stores import QueueFilter, Store

from .support import LEASE_FOR, NOW, SECOND, lease_all, leased_addresses, message, results_for

HOUR = timedelta(hours=1)


def _defer(store: Store, *, until: timedelta = HOUR) -> None:
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW + until))


def test_retry_makes_pending_recipients_due_now(store: Store) -> None:
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    store.record(
        results_for(
            lease, RecipientState.DEFERRED, next_attempt_at=NOW + HOUR, only=["b@example.org"]
        ),
    )
    soon = NOW + 60 * SECOND
    assert store.lease(now=soon, limit=10, lease_for=LEASE_FOR) is None

    assert store.retry(mid, now=soon) == 1  # the delivered one is final
    assert store.status(mid).recipient("b@example.org").next_attempt_at == soon
    assert leased_addresses(store.lease(now=soon, limit=10, lease_for=LEASE_FOR)) == [
        "b@example.org"
    ]


def test_retry_deferred_reschedules_only_deferred(store: Store) -> None:
    store.enqueue(message("a@example.org"), now=NOW)
    store.enqueue(message("b@example.org"), now=NOW)
    _defer(store)
    not_yet = store.enqueue(message("c@example.org"), now=NOW + HOUR * 2)
    soon = NOW + 60 * SECOND

    assert store.retry_deferred(now=soon) == 2
    assert sorted(leased_addresses(store.lease(now=soon, limit=10, lease_for=LEASE_FOR))) == [
        "a@example.org",
        "b@example.org",
    ]
    assert store.status(not_yet).recipients[0].next_attempt_at == NOW + HOUR * 2


def test_cancel_fails_pending_recipients_and_keeps_final_ones(store: Store) -> None:
    mid = store.enqueue(message("a@example.org", "b@example.org", "c@example.org"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    store.record(
        results_for(
            lease, RecipientState.DEFERRED, next_attempt_at=NOW + HOUR, only=["b@example.org"]
        ),
    )
    # c@example.org is still under the lease: it is cancelled too.
    cancelled_at = NOW + 10 * SECOND
    assert store.cancel(mid, now=cancelled_at) == 2

    st = store.status(mid)
    assert st.state is RecipientState.FAILED
    assert st.recipient("a@example.org").state is RecipientState.DELIVERED
    for address, attempts in (("b@example.org", 1), ("c@example.org", 0)):
        r = st.recipient(address)
        assert r.state is RecipientState.FAILED
        assert r.error == "cancelled"
        assert r.reason == "cancelled"
        assert r.attempts == attempts
        assert r.next_attempt_at is None
        assert r.reason_class is None  # "cancelled" is no failure to classify
        assert len(r.history) == attempts
    assert st.recipient("b@example.org").history[0].reason_class is not None

    # A worker still holding c records no deferral or failure, and nothing is leased again.
    for state in (RecipientState.DEFERRED, RecipientState.FAILED):
        ignored = results_for(lease, state, next_attempt_at=NOW + HOUR, only=["c@example.org"])
        assert len(store.record(ignored)) == 0
    assert st == store.status(mid)
    assert store.lease(now=NOW + 2 * HOUR, limit=10, lease_for=LEASE_FOR) is None
    assert store.cancel(mid, now=cancelled_at) == 0


def test_a_delivery_accepted_after_the_cancel_is_recorded(store: Store) -> None:
    """A server that accepted a cancelled recipient (its transaction was on the wire when
    the cancel came) delivered it: the result is recorded, not ignored as a deferral or
    failure is, and the status says delivered (it said "cancelled", never attempted)."""
    store.enable_events()
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    lease = lease_all(store)
    assert store.cancel(mid, now=NOW + SECOND) == 2
    recorded = store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    assert [r.address for r in recorded] == ["a@example.org"]
    st = store.status(mid)
    a, b = st.recipient("a@example.org"), st.recipient("b@example.org")
    assert (a.state, a.error, a.attempts, len(a.history)) == (RecipientState.DELIVERED, None, 1, 1)
    assert (b.state, b.error) == (RecipientState.FAILED, "cancelled")
    assert st.state is RecipientState.FAILED  # b never went
    # Each recipient's cancel was an event; a's delivery, recorded later, is its last.
    events = store.read_events()
    assert sorted((e.address, e.state) for e in events[:2]) == [
        ("a@example.org", RecipientState.FAILED),
        ("b@example.org", RecipientState.FAILED),
    ]
    assert [(e.address, e.state) for e in events[2:]] == [
        ("a@example.org", RecipientState.DELIVERED)
    ]
    # Recorded once: the same result again changes nothing.
    assert store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"])) == []
    assert store.status(mid) == st


def test_set_held_and_held_counts(store: Store) -> None:
    mid = store.enqueue(message(), now=NOW)
    store.set_held(mid, True)
    assert store.status(mid).held is True
    assert store.stats().held == 1
    assert store.lease(now=NOW, limit=10, lease_for=LEASE_FOR) is None
    store.set_held(mid, False)
    assert store.status(mid).held is False
    assert store.stats().held == 0


def test_purge_deletes_only_finished_messages_finished_before_the_cutoff(store: Store) -> None:
    old = store.enqueue(message("a@example.org"), now=NOW)
    recent = store.enqueue(message("b@example.org"), now=NOW)
    pending = store.enqueue(message("c@example.org", "d@example.org"), now=NOW)
    cancelled = store.enqueue(message("e@example.org"), now=NOW, hold=True)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    store.record(
        results_for(lease, RecipientState.FAILED, at=NOW + HOUR, only=["b@example.org"]),
    )
    store.record(results_for(lease, RecipientState.DELIVERED, only=["c@example.org"]))
    store.cancel(cancelled, now=NOW + SECOND)

    assert store.purge(finished_before=NOW + 60 * SECOND) == 2
    for gone in (old, cancelled):
        with pytest.raises(UnknownMessage):
            store.status(gone)
    assert store.status(recent).state is RecipientState.FAILED
    assert store.status(pending).recipient("c@example.org").history
    stats = store.stats()
    assert stats.messages == 2
    # Their recipients went with them: b, c and d are left.
    assert sum(stats.by_state.values()) == 3
    assert store.purge(finished_before=NOW + 60 * SECOND) == 0


def test_stats_counts_states_domains_messages_and_held(store: Store) -> None:
    assert store.stats().messages == 0
    store.enqueue(message("a@one.example", "b@one.example", "c@TWO.example"), now=NOW)
    store.enqueue(message("d@two.example"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@one.example"]))
    store.record(
        results_for(
            lease, RecipientState.DEFERRED, next_attempt_at=NOW + HOUR, only=["c@TWO.example"]
        ),
    )
    store.record(results_for(lease, RecipientState.FAILED, only=["d@two.example"]))
    store.enqueue(message("e@three.example"), now=NOW, hold=True)

    stats = store.stats()
    assert stats.messages == 3
    assert stats.held == 1
    counts = {s: stats.by_state.get(s, 0) for s in RecipientState}
    assert counts == {
        RecipientState.QUEUED: 2,
        RecipientState.DEFERRED: 1,
        RecipientState.DELIVERED: 1,
        RecipientState.FAILED: 1,
    }
    assert stats.pending_by_domain.get("one.example") == 1
    assert stats.pending_by_domain.get("two.example") == 1
    assert "TWO.example" not in stats.pending_by_domain


def test_recent_is_newest_first_and_without_history(store: Store) -> None:
    first = store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED))
    same_time = store.enqueue_many(
        [message("b@example.org"), message("c@example.org")], now=NOW + SECOND
    )
    assert [m.id for m in store.recent()] == [same_time[1], same_time[0], first]
    assert [m.id for m in store.recent(limit=2)] == [same_time[1], same_time[0]]
    oldest = store.recent()[-1]
    assert oldest.state is RecipientState.DELIVERED
    assert oldest.recipients[0].attempts == 1
    assert oldest.recipients[0].history == ()


def test_recent_with_a_negative_limit_is_none_on_every_store(store: Store) -> None:
    """The memory store sliced [:-1] (all but the oldest), SQLite's LIMIT -1 is no
    limit, PostgreSQL took it as none: three answers to one contract call."""
    for i in range(3):
        store.enqueue(message("a@example.org"), now=NOW + i * SECOND)
    assert store.recent(limit=-1) == []
    assert store.recent(limit=0) == []
    assert len(store.recent(limit=3)) == 3


def test_query_filters(store: Store) -> None:
    delivered = store.enqueue(message("a@one.example"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED))
    deferred = store.enqueue(message("b@two.example", "c@one.example"), now=NOW + SECOND)
    lease = lease_all(store, now=NOW + SECOND)
    store.record(
        results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW + HOUR),
    )
    queued = store.enqueue(message("d@Three.example"), now=NOW + 2 * SECOND)
    held = store.enqueue(message("e@two.example"), now=NOW + 3 * SECOND, hold=True)
    now = NOW + 10 * SECOND

    def ids(**kw: object) -> list[str]:
        return [m.id for m in store.query(now=now, where=QueueFilter(**kw))]  # type: ignore[arg-type]

    assert [m.id for m in store.query(now=now)] == [held, queued, deferred, delivered]
    assert ids(state=RecipientState.DELIVERED) == [delivered]
    assert ids(state=RecipientState.DEFERRED) == [deferred]
    assert ids(state=RecipientState.QUEUED) == [held, queued]
    assert ids(state=RecipientState.FAILED) == []
    assert ids(domain="ONE.example") == [deferred, delivered]
    assert ids(domain="three.example") == [queued]
    assert ids(older_than=timedelta(seconds=8)) == [deferred, delivered]
    assert ids(older_than=timedelta(seconds=9)) == [delivered]  # strictly older
    assert ids(held=True) == [held]
    assert ids(held=False) == [queued, deferred, delivered]
    assert ids(limit=2) == [held, queued]
    assert ids(domain="two.example", held=False, state=RecipientState.DEFERRED) == [deferred]
    assert all(r.history == () for m in store.query(now=now) for r in m.recipients)

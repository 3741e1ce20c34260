"""Contract: a result that was no attempt at the destination (``attempted=False``: this
host ran out of file descriptors or memory before any server was asked) defers the
recipient with its reason and next attempt time, and counts no attempt.

Counted, a host out of descriptors for an hour spent every queued recipient's
``retry.max_attempts`` on its own trouble, and failed mail whose destination was never
tried."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, RecipientState
from mailstrom.stores import Lease, RecipientResult, Store
from mailstrom.stores.base import MAX_HISTORY

from .support import NOW, SECOND, lease_all, message, results_for

SHORTAGE = (
    "local resource shortage: connecting to 192.0.2.1 failed on this host:"
    " Too many open files (no server was asked)"
)


def _shortage(lease: Lease, *, at: datetime, next_at: datetime) -> list[RecipientResult]:
    """Every leased recipient deferred for this host's shortage, no attempt made."""
    assert lease.items
    return [
        replace(
            r,
            attempt=Attempt(
                at=r.attempt.at,
                outcome=AttemptOutcome.TEMPORARY,
                duration=0.001,
                mx_host="mx1.example.org",
                ip="192.0.2.1",
                port=25,
                error=SHORTAGE,
                reason_class=ReasonClass.LOCAL,
            ),
            attempted=False,
        )
        for r in results_for(lease, RecipientState.DEFERRED, at=at, next_attempt_at=next_at)
    ]


def test_a_deferral_that_was_no_attempt_counts_none(store: Store) -> None:
    mid = store.enqueue(message("tried@example.org", "new@example.org"), now=NOW)
    # One real attempt for the first recipient, deferred; the second given back untried.
    first = lease_all(store)
    store.record(
        results_for(
            first,
            RecipientState.DEFERRED,
            next_attempt_at=NOW + 60 * SECOND,
            only=["tried@example.org"],
        )
    )
    store.release(first)

    at = NOW + 60 * SECOND
    again = lease_all(store, now=at)
    soon = at + 5 * 60 * SECOND
    recorded = store.record(_shortage(again, at=at, next_at=soon))
    assert len(recorded) == 2

    st = store.status(mid)
    assert st.state is RecipientState.DEFERRED
    tried_r, new_r = st.recipient("tried@example.org"), st.recipient("new@example.org")
    for r, attempts in ((tried_r, 1), (new_r, 0)):
        assert r.state is RecipientState.DEFERRED
        assert r.attempts == attempts, r  # not advanced: no server was asked
        assert r.next_attempt_at == soon
        assert r.error == SHORTAGE and r.reply is None
        assert r.reason_class is ReasonClass.LOCAL
        assert r.reason == SHORTAGE
        assert r.last_attempt_at == at
    # The history keeps the attempts made at the destination only.
    assert [h.outcome for h in tried_r.history] == [AttemptOutcome.TEMPORARY]
    assert tried_r.history[0].at == NOW
    assert new_r.history == ()
    # The lease is over: due again at the time given, as any deferral.
    assert store.lease(now=soon - SECOND, limit=10, lease_for=60 * SECOND) is None
    later = lease_all(store, now=soon)
    counts = {r.address: r.attempts for item in later.items for r in item.recipients}
    assert counts == {"tried@example.org": 1, "new@example.org": 0}
    store.record(results_for(later, RecipientState.DELIVERED, at=soon))
    st = store.status(mid)
    assert st.state is RecipientState.DELIVERED
    assert [r.attempts for r in st.recipients] == [2, 1]
    assert [len(r.history) for r in st.recipients] == [2, 1]


def test_a_deferral_that_was_no_attempt_leaves_a_full_history_whole(store: Store) -> None:
    """A recipient whose history is at its bound loses none of it to a result that adds
    nothing to it."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    total = MAX_HISTORY + 2
    for n in range(total):
        lease = lease_all(store, now=NOW + n * SECOND)
        store.record(
            results_for(
                lease,
                RecipientState.DEFERRED,
                at=NOW + n * SECOND,
                next_attempt_at=NOW + (n + 1) * SECOND,
            )
        )
    at = NOW + total * SECOND
    lease = lease_all(store, now=at)
    assert len(store.record(_shortage(lease, at=at, next_at=at + SECOND))) == 1
    (r,) = store.status(mid).recipients
    assert r.attempts == total
    assert len(r.history) == MAX_HISTORY
    assert r.history[0].at == NOW + (total - MAX_HISTORY) * SECOND
    assert r.history[-1].at == NOW + (total - 1) * SECOND
    assert r.error == SHORTAGE


def test_one_record_of_a_round_mixing_attempts_and_a_shortage_counts_each_apart(
    store: Store,
) -> None:
    """A round in which the destination answered for one recipient (deferred with its
    reply) and this host's shortage stopped the other before any server was asked: one
    record, each result counted as it says (the worker's dispatch makes such rounds)."""
    mid = store.enqueue(message("tried@example.org", "new@example.org"), now=NOW)
    lease = lease_all(store)
    soon = NOW + 5 * 60 * SECOND
    tried = results_for(
        lease, RecipientState.DEFERRED, next_attempt_at=soon, only=["tried@example.org"]
    )
    short = [r for r in _shortage(lease, at=NOW, next_at=soon) if r.address == "new@example.org"]
    assert len(store.record(tried + short)) == 2
    st = store.status(mid)
    tried_r, new_r = st.recipient("tried@example.org"), st.recipient("new@example.org")
    assert (tried_r.state, tried_r.attempts) == (RecipientState.DEFERRED, 1)
    assert tried_r.reply is not None and tried_r.reply.code == 451
    assert tried_r.reason_class is not ReasonClass.LOCAL
    assert [h.outcome for h in tried_r.history] == [AttemptOutcome.TEMPORARY]
    assert (new_r.state, new_r.attempts, new_r.history) == (RecipientState.DEFERRED, 0, ())
    assert new_r.error == SHORTAGE and new_r.reason_class is ReasonClass.LOCAL
    assert tried_r.next_attempt_at == new_r.next_attempt_at == soon

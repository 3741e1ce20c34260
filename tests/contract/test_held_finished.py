"""Contract: a message held while its delivery was in flight, or held and then cancelled,
that has no pending recipient left, is not held: a hold keeps pending recipients from
leases, and a finished one has none (as ``set_held`` leaves a finished message unheld).
Its status, the queue view's held filter, and a release, which counts the messages that
were waiting for it, all say so, judging the message (a flag and a pending recipient).
SQLite also clears the stored flag as the message finishes, so that it leaves the held
index (test_sqlite_store.py); a flag left from before is still judged as not held.

It kept reporting held: ``mailstrom show`` said "delivered (held)", ``list --held``
listed it (and ``held=False`` left it out), and ``release`` counted it as released."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mailstrom.status import RecipientState
from mailstrom.stores import Store
from mailstrom.stores.base import QueueFilter

from .support import NOW, SECOND, lease_all, message, results_for
from .test_watch import Counter

LATER = NOW + 10 * SECOND


def _in_flight_delivered(store: Store, mid: str) -> None:
    lease = lease_all(store)
    assert store.hold_many([mid], True) == 1  # held while the worker sends it
    assert len(store.record(results_for(lease, RecipientState.DELIVERED))) == 2


def _in_flight_failed(store: Store, mid: str) -> None:
    lease = lease_all(store)
    store.set_held(mid, True)
    assert len(store.record(results_for(lease, RecipientState.FAILED))) == 2


def _held_then_cancelled(store: Store, mid: str) -> None:
    store.set_held(mid, True)
    assert store.cancel(mid, now=NOW + SECOND) == 2


FINISHES = {
    "delivered in flight": _in_flight_delivered,
    "failed in flight": _in_flight_failed,
    "cancelled": _held_then_cancelled,
}


@pytest.mark.parametrize("finish", FINISHES.values(), ids=FINISHES.keys())
def test_a_held_message_that_finished_is_not_held(
    store: Store, finish: Callable[[Store, str], None]
) -> None:
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    finish(store, mid)
    status = store.status(mid)
    assert status.state.is_final
    assert status.held is False
    assert [m.held for m in store.query(now=LATER)] == [False]
    assert store.stats().held == 0

    def ids(held: bool) -> list[str]:
        return [m.id for m in store.query(now=LATER, where=QueueFilter(held=held))]

    assert ids(True) == []
    assert ids(False) == [mid]
    assert store.select_ids(now=LATER, where=QueueFilter(held=True)) == []
    assert store.select_ids(now=LATER, where=QueueFilter(held=False)) == [mid]
    # Nothing was waiting for a release.
    assert store.hold_many([mid], False) == 0
    assert store.status(mid).held is False


@pytest.mark.parametrize("finish", FINISHES.values(), ids=FINISHES.keys())
def test_a_held_message_that_finished_is_not_counted_held(
    store: Store, finish: Callable[[Store, str], None]
) -> None:
    """``count`` (the total ``list --held`` and a bulk command's note give) judged the
    stored flag in PostgreSQL where ``query`` and ``select_ids`` judge the message."""
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    finish(store, mid)
    assert store.count(now=LATER, where=QueueFilter(held=True), cap=100) == 0
    assert store.count(now=LATER, where=QueueFilter(held=False), cap=100) == 1


def test_a_held_message_with_a_recipient_still_pending_stays_held(store: Store) -> None:
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    lease = lease_all(store)
    store.set_held(mid, True)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    store.record(
        results_for(
            lease,
            RecipientState.DEFERRED,
            next_attempt_at=NOW + 60 * SECOND,
            only=["b@example.org"],
        )
    )
    assert store.status(mid).held is True
    assert store.stats().held == 1
    assert [m.id for m in store.query(now=LATER, where=QueueFilter(held=True))] == [mid]
    assert store.query(now=LATER, where=QueueFilter(held=False)) == []
    assert store.hold_many([mid], False) == 1
    assert store.status(mid).held is False


@pytest.mark.parametrize("finish", FINISHES.values(), ids=FINISHES.keys())
def test_releasing_a_held_message_that_finished_wakes_no_worker(
    store: Store, finish: Callable[[Store, str], None]
) -> None:
    """A release wakes the workers for the mail that waited for it; a message that
    finished while held waited for nothing. ``set_held(id, False)`` woke them all the same
    (the in-process wake, SQLite's datagram, PostgreSQL's NOTIFY), each looking for work
    that was not there."""
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    finish(store, mid)
    waiting = store.enqueue(message("c@example.org"), now=NOW)
    store.set_held(waiting, True)
    woken = Counter()
    stop = store.watch(woken)
    try:
        # A first witness: PostgreSQL's listener may still pass on the NOTIFYs of the
        # writes above; they come before its own.
        store.enqueue(message("d@example.org"), now=NOW)
        assert woken.wait_for(1)
        seen = woken.calls
        store.set_held(mid, False)
        assert store.hold_many([mid], False) == 0
        store.set_held(waiting, False)  # the witness: its wake comes after any before it
        assert woken.wait_for(seen + 1)
    finally:
        stop()
    assert woken.calls == seen + 1

"""The memory store's whole-queue calls (``purge``, ``purge_state``, ``retry_deferred``,
``release_holder``, ``shape``) take its lock a batch of messages at a time, as its
listings do (``test_memory_listing_lock.py``): each held it while it went through every
message, so with 100,000 queued each ``send_email`` and the worker waited 100 ms and more
(benchmarks/memory_lease.py). Counted, not timed: the holds of the lock each call takes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType

import pytest

from mailstrom.status import RecipientState
from mailstrom.stores import MemoryStore, QueueFilter, memory_operator

from .support import LEASE_FOR, NOW, message, results_for

HOUR = timedelta(hours=1)
HOLDER = "0123abcd"
COUNT = 6000
"""Three batches of a walk's (2,000 messages)."""


class CountedLock:
    """A lock that counts how many times it was taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holds = 0

    def __enter__(self) -> bool:
        self._lock.acquire()
        self.holds += 1
        return True

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._lock.release()


def queue_of(state: RecipientState | None) -> MemoryStore:
    """COUNT messages of one recipient, leased by HOLDER and recorded in ``state``
    (None: left leased)."""
    store = MemoryStore()
    store.enqueue_many([message(f"u{i}@d{i % 7}.example.org") for i in range(COUNT)], now=NOW)
    lease = store.lease(now=NOW, limit=COUNT, lease_for=LEASE_FOR, holder=HOLDER)
    assert lease is not None
    if state is not None:
        later = NOW + HOUR if state is RecipientState.DEFERRED else None
        recorded = store.record(results_for(lease, state, next_attempt_at=later))
        assert len(recorded) == COUNT
    return store


CALLS: dict[str, tuple[RecipientState | None, Callable[[MemoryStore], object]]] = {
    "purge": (RecipientState.FAILED, lambda s: s.purge(finished_before=NOW + HOUR)),
    "purge_state": (
        RecipientState.FAILED,
        lambda s: s.purge_state(finished_before=NOW + HOUR, state=RecipientState.FAILED),
    ),
    "retry_deferred": (RecipientState.DEFERRED, lambda s: s.retry_deferred(now=NOW)),
    "release_holder": (None, lambda s: s.release_holder(HOLDER)),
    "shape": (None, lambda s: sum(row.total for row in s.shape(now=NOW, edges=[HOUR]))),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_whole_queue_call_takes_the_lock_a_batch_at_a_time(name: str) -> None:
    """Under one hold of the lock, the call kept every other caller out for the whole
    queue; walked a batch per hold, it takes the lock once per WALK_BATCH messages (and
    once to copy the list), with the same result."""
    state, call = CALLS[name]
    store = queue_of(state)
    lock = CountedLock()
    store._lock = lock  # type: ignore[assignment]
    assert call(store) == COUNT
    assert lock.holds >= COUNT // memory_operator.WALK_BATCH, lock.holds


def test_a_walk_by_state_reads_no_recipient_of_a_finished_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Was: each message a list by state looked at had its state worked out from every
    recipient, under the lock: a retention walk's page over 6 messages of 400 delivered
    recipients read 2,400 recipients' states (a batch of the walk's 2,000 messages of
    50,000 held the lock for 10⁸). The message keeps counts of its recipients' states."""
    from mailstrom.stores.memory_records import _Recipient

    store = MemoryStore()
    for n in range(6):
        store.enqueue(message(*[f"u{n}-{i}@example.org" for i in range(400)]), now=NOW - 2 * HOUR)
    while (lease := store.lease(now=NOW, limit=1000, lease_for=LEASE_FOR)) is not None:
        store.record(results_for(lease, RecipientState.DELIVERED))
    slot = _Recipient.__dict__["state"]
    reads = 0

    def read(r: _Recipient) -> RecipientState:
        nonlocal reads
        reads += 1
        return slot.__get__(r)  # type: ignore[no-any-return]

    monkeypatch.setattr(_Recipient, "state", property(read, slot.__set__))
    delivered = frozenset({RecipientState.DELIVERED})
    where = QueueFilter(limit=100, states=delivered, older_than=HOUR)
    page = store.select_page(now=NOW, where=where, examine=10)
    assert len(page.ids) == 6
    assert reads <= 6, reads

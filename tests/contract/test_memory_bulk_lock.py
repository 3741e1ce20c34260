"""The memory store's bulk changes take its lock a batch at a time, as SQLite commits them a
batch per write transaction (``test_sqlite_write_lock.py``): ``hold_many``, ``retry_many``
and ``purge_many`` held it for the whole list, and the worker, which calls the store on
its event loop, stood still (as did every ``send_email``) until the last message was
changed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest

from mailstrom.status import MessageStatus, RecipientState
from mailstrom.stores import MemoryStore, QueueFilter, memory_operator

from .support import NOW, message

HOUR = timedelta(hours=1)
COUNT = 4000
"""Eight batches of the memory store's (500 messages, as SQLite's)."""

BULK: dict[str, Callable[[MemoryStore, list[str]], int]] = {
    "cancel_many": lambda store, ids: store.cancel_many(ids, now=NOW),
    "hold_many": lambda store, ids: store.hold_many(ids, True),
    "retry_many": lambda store, ids: store.retry_many(ids, now=NOW),
    "purge_many": lambda store, ids: store.purge_many(ids),
}

CHANGED: dict[str, Callable[[MessageStatus], bool]] = {
    "cancel_many": lambda m: m.state is RecipientState.FAILED,
    "hold_many": lambda m: m.held,
    "retry_many": lambda m: m.recipients[0].next_attempt_at == NOW,
    "purge_many": lambda m: False,  # gone
}


def queue_for(name: str) -> tuple[MemoryStore, list[str]]:
    """COUNT messages of one recipient: due in an hour (retry makes them due now), or
    cancelled (what purge deletes)."""
    store = MemoryStore()
    ids = store.enqueue_many([message("a@example.org")] * COUNT, now=NOW + HOUR)
    if name == "purge_many":
        store.cancel_many(ids, now=NOW)
    return store, ids


@pytest.mark.parametrize("name", sorted(BULK))
def test_a_large_bulk_change_lets_others_in_between_its_batches(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looks at the queue, each under one hold of the lock, while the change runs: some
    see it part done (a batch changed, the next not yet), where one hold for the whole
    list let a look in only before or after it; the total is the same."""
    # A listing walks a batch per hold too (test_memory_listing_lock.py): one for all.
    monkeypatch.setattr(memory_operator, "WALK_BATCH", 4 * COUNT)
    store, ids = queue_for(name)
    seen: list[int] = []
    looking, stop = threading.Event(), threading.Event()

    def look() -> None:
        while not stop.is_set():
            listed = store.query(now=NOW, where=QueueFilter(limit=2 * COUNT))
            seen.append(COUNT - len(listed) + sum(CHANGED[name](m) for m in listed))
            looking.set()

    looker = threading.Thread(target=look)
    looker.start()
    try:
        assert looking.wait(30)
        changed = BULK[name](store, ids)
    finally:
        stop.set()
        looker.join(60)
    assert not looker.is_alive()
    assert changed == COUNT  # the same total as one hold of the lock
    assert any(0 < n < COUNT for n in seen), f"every look saw none or all changed: {seen}"

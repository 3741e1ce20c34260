"""The memory store's listings take its lock a batch of messages at a time, as its bulk
changes do (``test_memory_bulk_lock.py``): ``query``, ``count``, ``recent``, ``stats``
and the dashboard's views sorted and walked every message under one hold, so with
100,000 messages queued each ``send_email`` and the worker waited up to 200 ms for a
``queue --domain`` that matched nothing, and 25 s for the dashboard's destinations
(benchmarks/memory_listing.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest

from mailstrom.readmodel import QueueQuery, QueueView, SortOrder
from mailstrom.readmodel.memory import MemoryReadModel
from mailstrom.stores import MemoryStore, QueueFilter

from .support import NOW, message

COUNT = 6000
"""Three batches of a listing's (2,000 messages)."""
LOOKS = 500
"""Listings made at most while two messages, at both ends of the queue, are held and
released together (one hold of the lock each time)."""

HELD_SEEN: dict[str, Callable[[MemoryStore], int]] = {
    "query": lambda store: len(store.query(now=NOW, where=QueueFilter(held=True, limit=2 * COUNT))),
    "select_ids": lambda store: len(
        store.select_ids(now=NOW, where=QueueFilter(held=True, limit=2 * COUNT))
    ),
    "count": lambda store: store.count(now=NOW, where=QueueFilter(held=True), cap=2 * COUNT),
    "recent": lambda store: sum(m.held for m in store.recent(2 * COUNT)),
    "stats": lambda store: store.stats().held,
    "overview": lambda store: MemoryReadModel(store).overview(now=NOW).held,
    "held page": lambda store: len(
        MemoryReadModel(store)
        .queue_page(QueueQuery(view=QueueView.HELD, limit=100), now=NOW)
        .messages
    ),
}


@pytest.mark.parametrize("name", sorted(HELD_SEEN))
def test_a_listing_of_a_large_queue_lets_others_in_between_its_batches(name: str) -> None:
    """While another thread holds and releases the newest and the oldest message
    together, a listing under one hold of the lock saw both held or neither; walked a
    batch per hold, the others' changes come in between its batches, and some listing
    sees one of the two."""
    store = MemoryStore()
    ids = store.enqueue_many([message("a@example.org")] * COUNT, now=NOW)
    ends = [ids[0], ids[-1]]
    stop = threading.Event()

    def toggle() -> None:
        held = True
        while not stop.is_set():
            store.hold_many(ends, held)
            held = not held

    toggler = threading.Thread(target=toggle)
    toggler.start()
    seen: set[int] = set()
    try:
        for _ in range(LOOKS):
            seen.add(HELD_SEEN[name](store))
            if 1 in seen:
                break
    finally:
        stop.set()
        toggler.join(30)
    assert not toggler.is_alive()
    assert seen <= {0, 1, 2}
    assert 1 in seen, f"every listing saw both ends held or neither: {sorted(seen)}"


def test_a_clock_that_went_back_still_lists_by_created_time() -> None:
    """Listings take the queue's order as kept (no sort) while every enqueue's time was
    no earlier than the one before; one queued earlier than that makes them sort."""
    store = MemoryStore()
    late = store.enqueue(message("a@example.org"), now=NOW + timedelta(hours=1))
    early = store.enqueue(message("a@example.org"), now=NOW)
    same = store.enqueue(message("a@example.org"), now=NOW)
    expected = [late, same, early]
    assert [m.id for m in store.recent(10)] == expected
    assert store.select_ids(now=NOW, where=QueueFilter()) == expected
    page = MemoryReadModel(store).queue_page(
        QueueQuery(view=QueueView.ALL, order=SortOrder.OLDEST), now=NOW
    )
    assert [m.id for m in page.messages] == expected[::-1]

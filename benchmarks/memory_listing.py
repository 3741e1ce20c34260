"""How long a listing of a large memory store keeps ``send_email`` waiting: p50/p99/max
latency of single enqueues while another thread lists the queue, ``--messages`` queued
(default 100,000, one recipient each over 1,000 domains, a fifth of them delivered).

Each view runs in a loop in a second thread (the store's ``query`` with a domain filter
that matches nothing, ``recent(50)``, ``stats()``, and the dashboard's overview,
destinations and Delivered page); the main thread enqueues one message at a time for
``--seconds`` and records how long each call took. ``idle`` is the same with no listing.

    .venv/bin/python benchmarks/memory_listing.py [--messages 100000] [--seconds 2]

Prints figures only.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from mailstrom.message.prepared import PreparedMessage
from mailstrom.readmodel import QueueQuery, QueueView
from mailstrom.readmodel.memory import MemoryReadModel
from mailstrom.status import Attempt, AttemptOutcome, RecipientState
from mailstrom.stores import QueueFilter
from mailstrom.stores.base import RecipientResult
from mailstrom.stores.memory import MemoryStore

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _message(i: int, domains: int) -> PreparedMessage:
    return PreparedMessage(
        data=b"Subject: x\r\n\r\nx\r\n",
        envelope_from="app@example.com",
        recipients=(f"user{i}@d{i % domains}.test",),
    )


def fill(messages: int, domains: int) -> MemoryStore:
    store = MemoryStore()
    for start in range(0, messages, 5000):
        count = min(5000, messages - start)
        batch = [_message(i, domains) for i in range(start, start + count)]
        store.enqueue_many(batch, now=T0 + timedelta(seconds=start))
    # A fifth delivered, as a queue that has been running looks.
    now = T0 + timedelta(seconds=messages)
    delivered = 0
    while delivered < messages // 5 and (
        lease := store.lease(now=now, limit=5000, lease_for=timedelta(minutes=5))
    ):
        results = [
            RecipientResult(
                message_id=item.message_id,
                address=r.address,
                lease_token=lease.token,
                state=RecipientState.DELIVERED,
                attempt=Attempt(at=now, outcome=AttemptOutcome.DELIVERED),
            )
            for item in lease.items
            for r in item.recipients
        ]
        delivered += len(store.record(results))
    return store


def latencies(store: MemoryStore, seconds: float, view: Callable[[], Any] | None) -> list[float]:
    """Seconds each single enqueue took while ``view`` ran in a loop in another thread."""
    stop = threading.Event()
    listings: list[float] = []

    def lister() -> None:
        assert view is not None
        while not stop.is_set():
            t0 = time.perf_counter()
            view()
            listings.append(time.perf_counter() - t0)

    thread = threading.Thread(target=lister) if view is not None else None
    if thread is not None:
        thread.start()
    took = []
    end = time.perf_counter() + seconds
    i = 10**9
    try:
        while time.perf_counter() < end:
            message = _message(i, 1000)
            t0 = time.perf_counter()
            store.enqueue(message, now=T0 + timedelta(days=1))
            took.append(time.perf_counter() - t0)
            i += 1
            time.sleep(0.0005)  # an application's pace, not a tight loop
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    if listings:
        print(f"  ({len(listings)} listings, median {statistics.median(listings) * 1000:.1f} ms)")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    store = fill(args.messages, 1000)
    model = MemoryReadModel(store)
    now = T0 + timedelta(days=1)
    views: dict[str, Callable[[], Any] | None] = {
        "idle": None,
        "query --domain (none match)": lambda: store.query(
            now=now, where=QueueFilter(domain="nowhere.test", limit=100)
        ),
        "recent(50)": lambda: store.recent(50),
        "stats()": store.stats,
        "dashboard overview": lambda: model.overview(now=now),
        "dashboard destinations": lambda: model.destinations(limit=20),
        "dashboard Delivered page": lambda: model.queue_page(
            QueueQuery(view=QueueView.DELIVERED), now=now
        ),
    }
    print(f"{args.messages:,} messages; enqueue latency in ms while a thread lists")
    print(f"{'view':30} {'p50':>7} {'p99':>7} {'max':>7}")
    for name, view in views.items():
        took = sorted(latencies(store, args.seconds, view))
        p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
        print(
            f"{name:30} {statistics.median(took) * 1000:7.2f} {p99 * 1000:7.2f}"
            f" {took[-1] * 1000:7.2f}"
        )


if __name__ == "__main__":
    main()

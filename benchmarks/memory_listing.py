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
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.meanwhile import latencies
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
        took = latencies(store, args.seconds, view, message=lambda i: _message(i, 1000), now=now)
        if took.calls:
            median = statistics.median(took.calls) * 1000
            print(f"  ({len(took.calls)} listings, median {median:.1f} ms)")
        p50, p99, most = took.ms()
        print(f"{name:30} {p50:7.2f} {p99:7.2f} {most:7.2f}")


if __name__ == "__main__":
    main()

"""What a worker's calls cost on a large memory store, and how long they keep
``send_email`` waiting: µs per call of ``lease`` (plain, with lanes, fair), ``next_due``
and the bulk calls (``shape``, ``retry_deferred``, ``release_holder``, ``purge``,
``purge_state``), then the p50/p99/max latency of single enqueues while a second thread
makes one of them in a loop. ``--messages`` queued (default 10,000 and 100,000), one
recipient each over 1,000 domains, all due.

Then, at each size, the sweeps of the due index's stale entries: single enqueues'
p50/p99/max, and the longest call, while a second thread leases 100 and gives them back
in a loop for ``--sweep-seconds`` (each lease and release files 100 entries anew: a sweep
every few hundred loops at 100,000).

    .venv/bin/python benchmarks/memory_lease.py [--messages 10000 100000] [--seconds 1]
        [--sweep-seconds 5]

Prints figures only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.meanwhile import latencies
from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores.memory import MemoryStore

T0 = datetime(2030, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
NOW = T0 + DAY
LEASE = timedelta(minutes=5)
LANES = [("transactional", 50), ("bulk", 50)]


def _message(i: int) -> PreparedMessage:
    return PreparedMessage(
        data=b"Subject: x\r\n\r\nx\r\n",
        envelope_from="app@example.com",
        recipients=(f"user{i}@d{i % 1000}.test",),
        attributes=QueueAttributes(priority="bulk" if i % 2 else "transactional"),
    )


def fill(messages: int) -> MemoryStore:
    store = MemoryStore()
    for start in range(0, messages, 5000):
        batch = [_message(i) for i in range(start, min(messages, start + 5000))]
        store.enqueue_many(batch, now=T0 + timedelta(seconds=start))
    return store


def leased(store: MemoryStore, **kwargs: Any) -> Callable[[], Any]:
    """A lease of 100 at NOW, given back (the queue stays as it was)."""

    def call() -> None:
        lease = store.lease(now=NOW, limit=100, lease_for=LEASE, **kwargs)
        if lease is not None:
            store.release(lease)

    return call


def calls(store: MemoryStore) -> dict[str, Callable[[], Any]]:
    return {
        "lease 100 (+release)": leased(store),
        "lease 100 with lanes": leased(store, lanes=LANES),
        "lease 100 fair": leased(store, busy=["d1.test"], per_destination=5),
        "next_due": lambda: store.next_due(now=NOW),
        "shape": lambda: store.shape(now=NOW, edges=[timedelta(hours=1)]),
        "retry_deferred (none)": lambda: store.retry_deferred(now=NOW),
        "release_holder (none)": lambda: store.release_holder("0123abcd"),
        "purge (none)": lambda: store.purge(finished_before=T0),
        "purge_state (none)": lambda: store.purge_state(
            finished_before=T0, state=RecipientState.DELIVERED
        ),
    }


def per_call(call: Callable[[], Any], seconds: float) -> float:
    """µs one call takes (median of as many as ``seconds`` allows, at least 3)."""
    took: list[float] = []
    end = time.perf_counter() + seconds
    while len(took) < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        call()
        took.append(time.perf_counter() - t0)
    return statistics.median(took) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--sweep-seconds", type=float, default=5.0)
    args = parser.parse_args()
    for messages in args.messages:
        store = fill(messages)
        print(f"{messages:,} messages; µs per call, and enqueue latency (ms) meanwhile")
        print(f"{'call':24} {'µs/call':>10} {'p50':>7} {'p99':>7} {'max':>7}")
        for name, call in calls(store).items():
            micros = per_call(call, args.seconds)
            # Not due in the day the calls lease at: their leases are unchanged.
            took = latencies(store, args.seconds, call, message=_message, now=NOW + DAY)
            p50, p99, most = took.ms()
            print(f"{name:24} {micros:10.0f} {p50:7.2f} {p99:7.2f} {most:7.2f}")
        sweeping = latencies(
            store, args.sweep_seconds, leased(store), message=_message, now=NOW + DAY
        )
        p50, p99, most = sweeping.ms()
        print(
            f"sweeps ({args.sweep_seconds:g} s of lease 100 + release): enqueue p50 {p50:.2f}"
            f" p99 {p99:.2f} max {most:.2f} ms; longest call {max(sweeping.calls) * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()

"""What counting the queue costs: ``Store.stats()`` on a SQLite store of many recipients.

The metrics endpoint reads the queue's depth by state and by domain from ``stats()``; this
measures that call at ``--recipients`` rows (default one million), so the cache in front
of it (``runtime.metrics.QueueStatsCache``, 5 s) can be judged. The store is filled with
``enqueue_many`` (500-byte messages, two recipients each, over ``--domains`` domains), and a
fifth of the recipients are then marked delivered and a tenth deferred, as a busy queue
looks. Prints figures only.

    .venv/bin/python benchmarks/stats.py [--recipients 1000000] [--domains 5000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores import SQLiteStore


def fill(store: SQLiteStore, recipients: int, domains: int) -> None:
    now = datetime.now(UTC)
    body = b"Subject: x\r\n\r\n" + b"x" * 480 + b"\r\n"
    batch: list[PreparedMessage] = []
    for i in range(0, recipients, 2):
        batch.append(
            PreparedMessage(
                data=body,
                envelope_from="app@example.com",
                recipients=(f"a{i}@d{i % domains}.test", f"b{i}@d{(i + 7) % domains}.test"),
            )
        )
        if len(batch) == 5000:
            store.enqueue_many(batch, now=now)
            batch = []
    if batch:
        store.enqueue_many(batch, now=now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--recipients", type=int, default=1_000_000)
    parser.add_argument("--domains", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.db"
        store = SQLiteStore(path)
        started = time.perf_counter()
        fill(store, args.recipients, args.domains)
        filled = time.perf_counter() - started
        # A busy queue: some delivered, some deferred (straight SQL: this is setup).
        import sqlite3

        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE recipients SET state = 'delivered' WHERE id % 5 = 0")
            conn.execute("UPDATE recipients SET state = 'deferred' WHERE id % 10 = 1")
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            stats = store.stats()
            times.append(time.perf_counter() - t0)
        store.close()
        total = sum(stats.by_state.values())
        print(f"filled {total:,} recipients in {filled:.1f} s ({args.domains:,} domains)")
        print(
            f"stats(): median {statistics.median(times) * 1000:.0f} ms, "
            f"min {min(times) * 1000:.0f} ms over {args.runs} runs; "
            f"{len(stats.pending_by_domain):,} pending domains, {stats.messages:,} messages"
        )


if __name__ == "__main__":
    main()

"""The suppression check: what one lease's lookup costs, by store and list size.

Prints figures only. The worker looks up every leased batch once
(``Store.suppressions_for`` with each address and each domain of the lease); this times
that call alone for a batch of ``--batch`` recipients (the worker's default lease is 500)
at 20 domains, against a list of 0, 1,000 and ``--entries`` entries, of which
``--hits`` per batch match. SQLite runs on a temporary file (a read transaction and
primary-key lookups); the memory store is the floor.

    .venv/bin/python benchmarks/suppression.py [--entries 100000] [--batch 500] [--repeat 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

# This checkout's package, whatever PYTHONPATH or an editable install of another says.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.base import Store
from mailstrom.suppression import Suppression, SuppressionSource, lookup_targets

NOW = datetime(2026, 11, 30, tzinfo=UTC)


def fill(store: Store, count: int) -> None:
    batch = []
    for i in range(count):
        batch.append(
            Suppression(
                target=f"gone{i}@d{i % 20}.example",
                source=SuppressionSource.HARD_BOUNCE,
                reply="550 5.1.1 no such user",
                created_at=NOW,
            )
        )
        if len(batch) == 5000:
            store.suppress(batch)
            batch = []
    store.suppress(batch)


def time_lookups(store: Store, *, batch: int, hits: int, repeat: int) -> list[float]:
    times = []
    for r in range(repeat):
        addresses = [f"user{r}-{i}@d{i % 20}.example" for i in range(batch - hits)]
        addresses += [f"gone{i}@d{i % 20}.example" for i in range(hits)]
        targets = lookup_targets(addresses)
        start = time.perf_counter()
        found = store.suppressions_for(targets, now=NOW)
        times.append(time.perf_counter() - start)
        assert len(found) <= hits
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--hits", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    sizes = sorted({0, min(1000, args.entries), args.entries})
    print(
        f"suppressions_for: one lease of {args.batch} recipients at 20 domains, "
        f"{args.hits} suppressed; median of {args.repeat}"
    )
    print(f"{'store':<8} {'entries':>8} {'µs/lease':>10} {'p90 µs':>8} {'µs/rcpt':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("memory", "sqlite"):
            for size in sizes:
                store: Store = (
                    MemoryStore() if name == "memory" else SQLiteStore(Path(tmp) / f"{size}.db")
                )
                try:
                    fill(store, size)
                    hits = min(args.hits, size)
                    times = time_lookups(store, batch=args.batch, hits=hits, repeat=args.repeat)
                finally:
                    store.close()
                median = statistics.median(times) * 1e6
                p90 = statistics.quantiles(times, n=10)[-1] * 1e6 if len(times) > 1 else median
                print(
                    f"{name:<8} {size:>8} {median:>10.0f} {p90:>8.0f} {median / args.batch:>8.2f}"
                )


if __name__ == "__main__":
    main()

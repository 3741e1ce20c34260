"""Many paused destinations: what one more pause and one worker refresh cost.

Prints figures only. Every throttle (``Store.throttle``: a 421 at connect, one pause per
destination) deletes the pauses that ended over a day ago, and every worker reads the
running pauses each second (``Store.throttles``, runtime/shaper.py). This fills a SQLite
store on a temporary file with ``N`` pauses of distinct destinations, as a sender to many
small domains leaves them, either all still running or all ended within the last day
(kept), then times ``--throttles`` throttles of new destinations (each in its own write)
and ``--refreshes`` refreshes.

    .venv/bin/python benchmarks/pause_scale.py [--sizes 2000,20000] [--throttles 200]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

# This checkout's package, whatever PYTHONPATH or an editable install of another says.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mailstrom.stores import SQLiteStore
from mailstrom.stores.sqlite_schema import to_us

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)


def fill(path: Path, count: int, *, running: bool) -> None:
    """``count`` pauses written straight into the table (a throttle each takes too long
    on a store without the index to fill 20,000): ending in the next hour, or ended in
    the last 23 hours."""
    rows = []
    for i in range(count):
        step = timedelta(seconds=1 + (i * 37) % 3600 if running else -60 - (i * 41) % 82_000)
        until = NOW + step
        rows.append((f"d{i}.example", to_us(until), 1, "421 busy", to_us(until - MINUTE)))
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany(
            "INSERT INTO destination_throttles (destination, until, strikes, reply, since)"
            " VALUES (?, ?, ?, ?, ?)",
            rows,
        )


def measure(count: int, *, running: bool, throttles: int, refreshes: int) -> tuple[float, float]:
    """Per-throttle and per-refresh seconds (process CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queue.db"
        SQLiteStore(path).close()
        fill(path, count, running=running)
        store = SQLiteStore(path)
        try:
            start = time.process_time()
            for i in range(throttles):
                store.throttle(
                    f"new{i}.example", now=NOW, reply="421 busy", first=MINUTE, maximum=HOUR
                )
            per_throttle = (time.process_time() - start) / throttles
            start = time.process_time()
            for _ in range(refreshes):
                found = store.throttles(now=NOW)
            per_refresh = (time.process_time() - start) / refreshes
            assert len(found) == throttles + (count if running else 0)
        finally:
            store.close()
    return per_throttle, per_refresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--throttles", type=int, default=200)
    parser.add_argument("--refreshes", type=int, default=20)
    args = parser.parse_args()
    print("pauses   kept as   per throttle   per refresh")
    for count in (int(s) for s in args.sizes.split(",")):
        for running in (True, False):
            t, r = measure(
                count, running=running, throttles=args.throttles, refreshes=args.refreshes
            )
            kind = "running" if running else "ended"
            print(f"{count:>6}   {kind:<7}   {t * 1e3:9.3f} ms   {r * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()

"""What SQLite's page size costs a durable enqueue, and what it saves on disk.

Prints figures only (no assertions). For each page size, in alternating rounds so that a
busy machine hurts every size alike: µs per ``enqueue`` (committed, WAL fsynced, one
thread), WAL octets written per enqueue, and the database file's octets per message
once checkpointed. A commit writes every page it touched to the WAL, and an enqueue
touches a page of each table and index it adds to, so the page size is the bytes behind
each fsync.

    .venv/bin/python benchmarks/page_size.py [--count 3000] [--rounds 5] [--size 1024]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from mailstrom.stores import SQLiteStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.enqueue import typical_message

SIZES = (4096, 8192)


def one_round(directory: Path, page_size: int, count: int, size: int) -> tuple[float, float, float]:
    """(µs per enqueue, WAL octets per enqueue, file octets per message)."""
    path = directory / f"queue-{page_size}-{time.monotonic_ns()}.db"
    with sqlite3.connect(path) as conn:  # fix the page size before the store creates tables
        conn.execute(f"PRAGMA page_size={page_size}")
        conn.execute("PRAGMA journal_mode=WAL")
    store = SQLiteStore(path)
    message = typical_message(size)
    now = datetime.now(UTC)
    warm = max(1, count // 10)
    for _ in range(warm):
        store.enqueue(message, now=now)
    wal = Path(str(path) + "-wal")
    began = time.perf_counter()
    for _ in range(count):
        store.enqueue(message, now=now)
    seconds = time.perf_counter() - began
    # Few enough enqueues after an emptied WAL that no automatic checkpoint (at 1,000
    # pages) restarts it: its size is then what they wrote.
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    probe = 20
    for _ in range(probe):
        store.enqueue(message, now=now)
    wal_per = wal.stat().st_size / probe
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    file_per = path.stat().st_size / (warm + count + probe)
    return seconds / count * 1e6, wal_per, file_per


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000, help="enqueues per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per page size")
    parser.add_argument("--size", type=int, default=1024, help="message size in octets")
    parser.add_argument("--dir", default=None, help="directory for the database files")
    args = parser.parse_args()
    figures: dict[int, list[tuple[float, float, float]]] = {size: [] for size in SIZES}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="mailstrom-pages-") as tmp:
        for _ in range(args.rounds):
            for page_size in SIZES:
                figures[page_size].append(one_round(Path(tmp), page_size, args.count, args.size))
    print(
        f"{args.count} durable enqueues of a {args.size}-octet message, 2 recipients, "
        f"{args.rounds} alternating rounds (median)"
    )
    head = ("page size", "us/enqueue", "rounds", "WAL B/enq", "file B/msg")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (10, 11, 30, 10, 11), strict=True)))
    for page_size, runs in figures.items():
        times = [run[0] for run in runs]
        print(
            f"{page_size:>10} {statistics.median(times):>11.0f} "
            f"{' '.join(f'{t:.0f}' for t in times):>30} "
            f"{statistics.median(run[1] for run in runs):>10,.0f} "
            f"{statistics.median(run[2] for run in runs):>11,.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

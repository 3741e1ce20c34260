"""The operator's bulk changes on a large SQLite queue: ``hold``, ``release``, ``retry``
and ``cancel`` of ``--listed`` messages by id while ``--messages`` are pending.

The store is filled through its API (``enqueue_many``, batches of 5,000, one recipient
each over 2,000 domains, 600-byte messages); every recipient stays pending. The listed
messages are the newest ones. Each change is timed once per run on the same ids (hold,
release, retry, then cancel last: it finishes them), median of ``--runs`` fresh copies of
the database, and the query plan of each per-batch recipient statement is printed.

    .venv/bin/python benchmarks/sqlite_bulk_changes.py [--messages 100000] [--listed 1000]

Prints figures only.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores import SQLiteStore
from mailstrom.stores.sqlite_operator import (
    BULK_BATCH,
    cancel_seqs,
    leased_pending,
    retry_seqs,
)

BATCH = 5000


def fill(path: Path, messages: int) -> list[str]:
    """Fill the store; the ids, oldest first."""
    store = SQLiteStore(path)
    body = b"Subject: report\r\nFrom: app@example.com\r\n\r\n" + b"x" * 550 + b"\r\n"
    now = datetime.now(UTC)
    ids: list[str] = []
    for start in range(0, messages, BATCH):
        ids += store.enqueue_many(
            [
                PreparedMessage(
                    data=body,
                    envelope_from="app@example.com",
                    recipients=(f"user{i}@d{i % 2000}.test",),
                    subject="report",
                )
                for i in range(start, min(messages, start + BATCH))
            ],
            now=now,
        )
    store.close()
    return ids


def plans(path: Path) -> None:
    """The plan of each per-batch recipient statement for a batch of BULK_BATCH ids."""
    statements: list[str] = []
    seqs = list(range(1, BULK_BATCH + 1))
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.set_trace_callback(statements.append)
        conn.execute("BEGIN")
        leased_pending(conn, seqs)
        retry_seqs(conn, seqs, datetime.now(UTC))
        cancel_seqs(conn, seqs, datetime.now(UTC))
        conn.execute("ROLLBACK")
        conn.set_trace_callback(None)
        names = ("leased_pending", "retry_seqs", "cancel_seqs")
        for name, statement in zip(names, statements[1:-1], strict=True):
            plan = "; ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement))
            print(f"{name}: {plan}")


def timed(store: SQLiteStore, listed: list[str]) -> dict[str, float]:
    """Seconds each change of the listed messages took, in order; closes the store."""
    now = datetime.now(UTC)
    changes: dict[str, Callable[[], int]] = {
        "hold": lambda: store.hold_many(listed, True),
        "release": lambda: store.hold_many(listed, False),
        "retry": lambda: store.retry_many(listed, now=now),
        "cancel": lambda: store.cancel_many(listed, now=now),
    }
    took: dict[str, float] = {}
    for name, change in changes.items():
        t0 = time.perf_counter()
        changed = change()
        took[name] = time.perf_counter() - t0
        assert changed == len(listed), (name, changed)
    store.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--listed", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        filled = Path(tmp) / "filled.db"
        ids = fill(filled, args.messages)
        listed = ids[-args.listed :]
        print(f"{args.messages:,} pending messages, {len(listed):,} listed")
        plans(filled)
        times: dict[str, list[float]] = {}
        for run in range(args.runs):
            path = Path(tmp) / f"run{run}.db"
            shutil.copyfile(filled, path)
            for name, took in timed(SQLiteStore(path), listed).items():
                times.setdefault(name, []).append(took)
        for name, took in times.items():
            print(f"{name:<8} {statistics.median(took) * 1000:>9.1f} ms")


if __name__ == "__main__":
    main()

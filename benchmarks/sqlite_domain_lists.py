"""One domain's mail in each state on a large SQLite queue: ``queue --domain d`` with
``--state failed``, ``deferred``, ``queued``, the pending default and any state
(the store's ``select_ids`` and ``count``), for a small, a middling and a big domain.

The store is filled through its API (``enqueue_many``, batches of 5,000): half the
``--messages`` are delivered mail at ``big.test``, half pending mail over 1,000 other
domains (``d7.test``'s deferred), and ``small.test`` has one failed, one deferred and one queued
message (each with a delivered recipient there and one elsewhere). States are then set
by SQL. Each listing is timed (median of ``--runs``), the store choosing its plan each
time (a listing of 100; a count capped at 1,000,000, as the command line's).

    .venv/bin/python benchmarks/sqlite_domain_lists.py [--messages 200000]

Prints figures only.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores import QueueFilter, SQLiteStore

BATCH = 5000
BODY = b"Subject: report\r\nFrom: app@example.com\r\n\r\n" + b"x" * 550 + b"\r\n"
STATES: dict[str, frozenset[RecipientState] | None] = {
    "failed": frozenset({RecipientState.FAILED}),
    "deferred": frozenset({RecipientState.DEFERRED}),
    "queued": frozenset({RecipientState.QUEUED}),
    "pending": frozenset({RecipientState.QUEUED, RecipientState.DEFERRED}),
    "any": None,
}


def prepared(recipients: tuple[str, ...]) -> PreparedMessage:
    return PreparedMessage(data=BODY, envelope_from="app@example.com", recipients=recipients)


def fill(path: Path, messages: int) -> None:
    store = SQLiteStore(path)
    now = datetime.now(UTC)
    half = messages // 2
    for start in range(0, half, BATCH):
        n = min(BATCH, half - start)
        store.enqueue_many([prepared((f"u{start + i}@big.test",)) for i in range(n)], now=now)
    store.enqueue_many(
        [prepared(("a@small.test", f"b{i}@elsewhere.test")) for i in range(3)], now=now
    )
    for start in range(half, messages, BATCH):
        n = min(BATCH, messages - start)
        store.enqueue_many(
            [prepared((f"u{i}@d{i % 1000}.test",)) for i in range(start, start + n)], now=now
        )
    store.close()
    with closing(sqlite3.connect(path)) as conn, conn:
        final = "finished_at = 1, next_attempt_at = NULL"
        conn.execute(
            f"UPDATE recipients SET state = 'delivered', {final} WHERE domain = ?", ("big.test",)
        )
        conn.execute(
            f"UPDATE recipients SET state = 'delivered', {final} WHERE domain = ?", ("small.test",)
        )
        seqs = [
            s
            for (s,) in conn.execute(
                "SELECT message_seq FROM recipients WHERE domain = 'elsewhere.test'"
                " ORDER BY message_seq"
            )
        ]
        conn.execute(
            f"UPDATE recipients SET state = 'failed', {final} WHERE message_seq = ?"
            " AND domain = 'elsewhere.test'",
            (seqs[0],),
        )
        conn.execute(
            "UPDATE recipients SET state = 'deferred' WHERE message_seq = ?"
            " AND domain = 'elsewhere.test'",
            (seqs[1],),
        )
        conn.execute("UPDATE recipients SET state = 'deferred' WHERE domain = 'd7.test'")


def timed(call: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queue.db"
        fill(path, args.messages)
        store = SQLiteStore(path)
        now = datetime.now(UTC)
        print(f"{args.messages:,} messages; ms, median of {args.runs}")
        print(f"{'domain':<11} {'state':<9} {'select_ids':>10} {'count':>9} {'found':>7}")
        for domain in ("small.test", "d7.test", "big.test"):
            for name, states in STATES.items():
                where = QueueFilter(states=states, domain=domain)
                ids = store.select_ids(now=now, where=where)
                listing = timed(lambda w=where: store.select_ids(now=now, where=w), args.runs)
                counting = timed(
                    lambda w=where: store.count(now=now, where=w, cap=1_000_000), args.runs
                )
                print(f"{domain:<11} {name:<9} {listing:>10.1f} {counting:>9.1f} {len(ids):>7}")
        store.close()


if __name__ == "__main__":
    main()

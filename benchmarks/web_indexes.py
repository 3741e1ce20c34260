"""What the dashboard's indexes (schema 11) cost the write path of a SQLite store.

Migration 0011 adds three indexes for ``mailstrom web``: pending recipients by message,
recipients by address, attempts by time. Every enqueue and every recorded result now
maintains them. This fills two stores alike, one with those indexes dropped, alternating
``--rounds`` times: ``enqueue_many`` of ``--messages`` one-recipient messages in batches of
1,000, then leasing 500 at a time and recording each delivered (``record_and_lease``, as
the worker does). Prints the medians; figures only.

    .venv/bin/python benchmarks/web_indexes.py [--messages 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores import RecipientResult, SQLiteStore

DASHBOARD_INDEXES = ("recipients_pending_message", "recipients_address", "attempts_at")


def one_run(messages: int, *, with_indexes: bool) -> tuple[float, float]:
    """(messages enqueued per second, recipients leased and recorded per second)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queue.db"
        SQLiteStore(path).close()
        if not with_indexes:
            with sqlite3.connect(path) as conn:
                for name in DASHBOARD_INDEXES:
                    conn.execute(f"DROP INDEX {name}")
        store = SQLiteStore(path)
        now = datetime.now(UTC)
        batch = [
            PreparedMessage(
                data=b"Subject: x\r\n\r\nx\r\n",
                envelope_from="app@example.com",
                recipients=(f"user{i}@d{i % 50}.example",),
            )
            for i in range(messages)
        ]
        started = time.perf_counter()
        for i in range(0, messages, 1000):
            store.enqueue_many(batch[i : i + 1000], now=now)
        enqueued = time.perf_counter() - started
        delivered = Attempt(
            at=now, outcome=AttemptOutcome.DELIVERED, reply=SMTPReply(code=250, text="ok")
        )
        started = time.perf_counter()
        results: list[RecipientResult] = []
        while True:
            _, lease = store.record_and_lease(
                results, now=now, limit=500, lease_for=timedelta(minutes=5)
            )
            if lease is None:
                break
            results = [
                RecipientResult(
                    message_id=item.message_id,
                    address=r.address,
                    lease_token=lease.token,
                    ref=r.ref,
                    state=RecipientState.DELIVERED,
                    attempt=delivered,
                )
                for item in lease.items
                for r in item.recipients
            ]
        recorded = time.perf_counter() - started
        store.close()
        return messages / enqueued, messages / recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for with_indexes in (False, True):
            figures[with_indexes].append(one_run(args.messages, with_indexes=with_indexes))
    print(f"{'':24} {'enqueue_many msg/s':>20} {'lease+record rcpt/s':>20}")
    for with_indexes, label in ((False, "without 0011 indexes"), (True, "with 0011 indexes")):
        enq = statistics.median(e for e, _ in figures[with_indexes])
        rec = statistics.median(r for _, r in figures[with_indexes])
        print(f"{label:24} {enq:20,.0f} {rec:20,.0f}")
    base, new = figures[False], figures[True]
    for i, name in ((0, "enqueue_many"), (1, "lease+record")):
        ratio = statistics.median(x[i] for x in new) / statistics.median(x[i] for x in base)
        print(f"{name}: {ratio:.2f} of the rate without them")


if __name__ == "__main__":
    main()

"""What reading a message's DKIM outcome costs: ``recent()`` and ``status()`` on SQLite.

The SQLite store keeps each message's DKIM outcome (``MessageStatus.dkim``) in a table of
its own, ``message_dkim`` (migration 0004), not in a column added to ``messages``: a
column added now would sit after ``messages.data``, and SQLite reaches a column past a
large blob only by walking that blob's overflow pages. This fills a store with
``--messages`` DKIM-signed messages of ``--size`` bytes, times ``recent()`` and
``status()`` through the store, and times the same read of a raw copy of ``messages`` in
which the outcome is a column after ``data`` — the layout not taken — so the two can be
compared. Caches are warm (the file was just written); cold reads cost more. Prints
figures only.

    .venv/bin/python benchmarks/status_read.py [--messages 200] [--size 5000000]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from mailstrom.dkim import DKIMAlgorithm, DKIMSignature
from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores import SQLiteStore

SIGNATURES = (
    DKIMSignature(domain="example.com", selector="s2026r", algorithm=DKIMAlgorithm.RSA_SHA256),
    DKIMSignature(domain="example.com", selector="s2026e", algorithm=DKIMAlgorithm.ED25519_SHA256),
)


def timed(call: Callable[[], object], runs: int) -> float:
    """Median seconds of ``runs`` calls."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=5_000_000, help="bytes per message")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    now = datetime.now(UTC)
    body = b"Subject: x\r\n\r\n" + b"x" * max(0, args.size - 16) + b"\r\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.db"
        store = SQLiteStore(path)
        ids = store.enqueue_many(
            [
                PreparedMessage(
                    data=body,
                    envelope_from="app@example.com",
                    recipients=("bob@example.org",),
                    dkim=SIGNATURES,
                )
                for _ in range(args.messages)
            ],
            now=now,
        )
        assert store.status(ids[0]).dkim is not None
        limit = min(100, args.messages)
        recent = timed(lambda: store.recent(limit), args.runs)
        one = timed(lambda: store.status(ids[0]), args.runs)
        store.close()
        # The layout not taken: the same rows with the outcome as a column after data.
        with sqlite3.connect(path) as conn:
            conn.execute(
                "CREATE TABLE messages_column AS SELECT m.*, x.data, d.dkim FROM messages m"
                " JOIN message_data x ON x.seq = m.seq"
                " JOIN message_dkim d ON d.message_seq = m.seq"
            )
        conn.close()
        with sqlite3.connect(path) as conn:
            query = "SELECT id, subject, {} FROM messages_column ORDER BY seq DESC LIMIT ?"
            without = timed(lambda: conn.execute(query.format("1"), (limit,)).fetchall(), 5)
            column = timed(lambda: conn.execute(query.format("dkim"), (limit,)).fetchall(), 5)
        conn.close()
    print(f"{args.messages} signed messages of {args.size:,} bytes; reading the newest {limit}")
    print(f"store.recent({limit}) with message_dkim table: {recent * 1000:8.2f} ms")
    print(f"store.status(id) with message_dkim table:   {one * 1000:8.2f} ms")
    print(f"raw rows, outcome not read:                 {without * 1000:8.2f} ms")
    print(f"raw rows, outcome as column after data:     {column * 1000:8.2f} ms")


if __name__ == "__main__":
    main()

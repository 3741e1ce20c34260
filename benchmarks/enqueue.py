"""Durable enqueues per second into SQLite, and memory use with a large queue.

Prints figures only (no assertions):

* enqueues/s of a typical message (2 KB, 2 recipients) into a SQLite file, one thread and
  several threads, with and without group commit, and the ratio between them. Every
  enqueue is durable (committed, WAL fsynced) before it returns.
* the peak RSS of a process that opens a store holding ``--queued`` messages, leases and
  records a batch, and reads stats (run in fresh subprocesses so the figure is clean).

    .venv/bin/python benchmarks/enqueue.py [--count 2000] [--threads 4] [--queued 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores import RecipientResult, SQLiteStore


def typical_message(size: int) -> PreparedMessage:
    header = (
        b"From: App <app@example.com>\r\nTo: bob@example.org, carol@example.net\r\n"
        b"Subject: Your order has shipped\r\nMessage-ID: <bench@example.com>\r\n"
        b"Date: Thu, 02 Jan 2030 03:04:05 +0000\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    lines, rest = divmod(max(0, size - len(header)), len(line))
    body = line * lines + (b"." * (rest - 2) + b"\r\n" if rest >= 2 else b"")
    return PreparedMessage(
        data=header + body,
        envelope_from="app@example.com",
        recipients=("bob@example.org", "carol@example.net"),
        header_message_id="<bench@example.com>",
        subject="Your order has shipped",
    )


def enqueue_rate(path: Path, *, threads: int, count: int, group_commit: bool, size: int) -> float:
    """Durable enqueues per second with ``threads`` threads sharing one store."""
    store = SQLiteStore(path, group_commit=group_commit)
    message = typical_message(size)
    now = datetime.now(UTC)
    per_thread = count // threads
    start = threading.Barrier(threads + 1)

    def run() -> None:
        start.wait()
        for _ in range(per_thread):
            store.enqueue(message, now=now)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    began = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - began
    store.close()
    return per_thread * threads / elapsed


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def role_fill(path: Path, queued: int, size: int) -> dict[str, float]:
    """Fill the queue in chunks (one transaction each) and report time and peak RSS."""
    store = SQLiteStore(path)
    message = typical_message(size)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    began = time.perf_counter()
    chunk = 1000
    for done in range(0, queued, chunk):
        store.enqueue_many([message] * min(chunk, queued - done), now=now)
    elapsed = time.perf_counter() - began
    store.close()
    return {"seconds": elapsed, "rss_mib": peak_rss_mib()}


def role_work(path: Path, batch: int) -> dict[str, float]:
    """Open a full queue, lease and record one batch, read stats: timings and peak RSS."""
    base = peak_rss_mib()
    store = SQLiteStore(path)
    now = datetime(2030, 1, 2, tzinfo=UTC)
    timings = {}
    t = time.perf_counter()
    lease = store.lease(now=now, limit=batch, lease_for=timedelta(minutes=15))
    timings["lease_ms"] = (time.perf_counter() - t) * 1000
    if lease is None:
        raise SystemExit("nothing was due: the fill step failed")
    attempt = Attempt(
        at=now, outcome=AttemptOutcome.DELIVERED, reply=SMTPReply(code=250, text="ok")
    )
    results = [
        RecipientResult(
            message_id=item.message_id,
            address=r.address,
            lease_token=lease.token,
            state=RecipientState.DELIVERED,
            attempt=attempt,
        )
        for item in lease.items
        for r in item.recipients
    ]
    t = time.perf_counter()
    recorded = len(store.record(results))
    timings["record_ms"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    stats = store.stats()
    timings["stats_ms"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    store.next_due(now=now)
    timings["next_due_ms"] = (time.perf_counter() - t) * 1000
    store.close()
    return {
        **timings,
        "recorded": recorded,
        "messages": stats.messages,
        "python_rss_mib": base,
        "rss_mib": peak_rss_mib(),
    }


def subprocess_role(*args: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--role", *args], capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="enqueues per throughput run")
    parser.add_argument("--threads", type=int, default=4, help="threads in the concurrent runs")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration")
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    parser.add_argument("--queued", type=int, default=100_000, help="messages for the RSS run")
    parser.add_argument("--batch", type=int, default=500, help="recipients leased in the RSS run")
    parser.add_argument("--dir", default=None, help="directory for the database files")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role:
        role, path, *rest = args.role
        if role == "fill":
            result = role_fill(Path(path), int(rest[0]), int(rest[1]))
        else:
            result = role_work(Path(path), int(rest[0]))
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="mailstrom-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"SQLite durable enqueue (WAL, synchronous=FULL) on {root}")
        print(f"message: {typical_message(args.size).size} bytes, 2 recipients")
        print(f"median of {args.repeat} runs of {args.count} enqueues, configurations interleaved")
        print(f"{'threads':>8} {'group commit':>13} {'enqueues/s':>11}")
        configs = [(t, g) for t in (1, args.threads) for g in (False, True)]
        samples: dict[tuple[int, bool], list[float]] = {c: [] for c in configs}
        for run in range(args.repeat):
            # Interleaved, so a noisy neighbour on a shared machine hits every column alike.
            for threads, group in configs:
                db = root / f"rate-{threads}-{group}-{run}.db"
                samples[threads, group].append(
                    enqueue_rate(
                        db, threads=threads, count=args.count, group_commit=group, size=args.size
                    )
                )
        rates = {c: statistics.median(v) for c, v in samples.items()}
        for (threads, group), rate in rates.items():
            print(f"{threads:>8} {'on' if group else 'off':>13} {rate:>11,.0f}")
        for threads in (1, args.threads):
            ratio = rates[threads, True] / rates[threads, False]
            print(f"group commit on/off with {threads} thread(s): {ratio:.2f}x")

        db = root / "big.db"
        print(f"\nqueue of {args.queued:,} messages ({args.queued * 2:,} recipients)")
        fill = subprocess_role("fill", str(db), str(args.queued), str(args.size))
        mib = os.path.getsize(db) / 2**20
        print(
            f"fill via enqueue_many (1000/txn): {fill['seconds']:.1f} s, "
            f"{args.queued / fill['seconds']:,.0f} messages/s, file {mib:,.0f} MiB, "
            f"peak RSS {fill['rss_mib']:.1f} MiB"
        )
        work = subprocess_role("work", str(db), str(args.batch))
        print(
            f"open + lease {args.batch} + record + stats: peak RSS {work['rss_mib']:.1f} MiB "
            f"(interpreter + imports before opening: {work['python_rss_mib']:.1f} MiB)"
        )
        print(
            f"  lease {work['lease_ms']:.1f} ms, record {work['record_ms']:.1f} ms "
            f"({work['recorded']:.0f} recipients), stats {work['stats_ms']:.1f} ms, "
            f"next_due {work['next_due_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()

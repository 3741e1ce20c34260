"""The operator's views on a large queue: ``queue``, ``queue --shape`` and ``show`` on a
SQLite store of ``--messages`` messages (default one million).

The store is filled through its API (``enqueue_many``, batches of 5,000 with enqueue times
spread over the last ``--hours`` hours, oldest first, one recipient each over ``--domains``
domains, 600-byte messages). Then, as a busy queue looks, plain SQL on the store's own
schema marks 70 % of the recipients delivered, 5 % failed and 10 % deferred (with a reply
and a retry time), leaving 15 % queued. Each view is timed twice:

* ``store``: the store call the command makes (query + count, shape, resolve + status +
  message_data), in this process, median of ``--runs``;
* ``command``: the real ``python -m mailstrom ...`` in a subprocess, wall time including
  interpreter start-up, median of ``--runs``.

    .venv/bin/python benchmarks/queue_tools.py [--messages 1000000] [--runs 3]

Prints figures only; ``--keep PATH`` keeps (and reuses) the filled database.
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores import QueueFilter, SQLiteStore
from mailstrom.stores.operator import AGE_EDGES, PENDING_STATES

ROOT = Path(__file__).resolve().parent.parent
BATCH = 5000


def fill(path: Path, messages: int, domains: int, hours: float) -> float:
    """Fill the store; returns the seconds it took."""
    started = time.perf_counter()
    store = SQLiteStore(path)
    body = b"Subject: report\r\nFrom: app@example.com\r\n\r\n" + b"x" * 550 + b"\r\n"
    now = datetime.now(UTC)
    batches = max(1, -(-messages // BATCH))
    n = 0
    for b in range(batches):
        # Oldest first, so enqueue times rise with enqueue order as with one clock.
        at = now - timedelta(hours=hours) * (1 - b / batches)
        size = min(BATCH, messages - n)
        store.enqueue_many(
            [
                PreparedMessage(
                    data=body,
                    envelope_from="app@example.com",
                    recipients=(f"user{i}@d{_skewed(i, domains)}.test",),
                    subject="report",
                )
                for i in range(n, n + size)
            ],
            now=at,
        )
        n += size
    store.close()
    # Setup, not under test: outcomes written straight into the store's schema.
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA synchronous=OFF")
        finished = _us(now - timedelta(minutes=1))
        retry = _us(now + timedelta(minutes=20))
        conn.execute(
            "UPDATE recipients SET state = 'delivered', attempts = 1, finished_at = ?,"
            " last_attempt_at = ?, next_attempt_at = NULL, reply_code = 250,"
            " reply_text = 'Ok' WHERE id % 20 < 14",
            (finished, finished),
        )
        conn.execute(
            "UPDATE recipients SET state = 'failed', attempts = 1, finished_at = ?,"
            " last_attempt_at = ?, next_attempt_at = NULL, reply_code = 550,"
            " reply_enhanced = '5.1.1', reply_text = 'No such user' WHERE id % 20 = 14",
            (finished, finished),
        )
        conn.execute(
            "UPDATE recipients SET state = 'deferred', attempts = 2, last_attempt_at = ?,"
            " next_attempt_at = ?, reply_code = 451, reply_enhanced = '4.7.1',"
            " reply_text = 'Greylisted, try again later' WHERE id % 20 IN (15, 16)",
            (finished, retry),
        )
    return time.perf_counter() - started


def _us(when: datetime) -> int:
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _skewed(i: int, domains: int) -> int:
    """A few big destinations and a long tail, as real queues have: a third of the mail
    goes to 5 domains, the rest spreads over all of them."""
    return (i * 7919) % domains if i % 3 else i % 5


def median_ms(call: Callable[[], Any], runs: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, result


def command_ms(path: Path, args: list[str], runs: int) -> tuple[float, float]:
    """Median wall and CPU (user + system) milliseconds of the command in a subprocess;
    the CPU time says what the command costs whatever else the machine is running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "mailstrom", "--store", f"sqlite:///{path}", *args]
    times, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.decode()}")
    return statistics.median(times) * 1000, statistics.median(cpu) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--domains", type=int, default=2000)
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="fill (or reuse) this database file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "q.db"
        if args.keep is None or not path.exists():
            took = fill(path, args.messages, args.domains, args.hours)
            print(f"filled {args.messages:,} messages in {took:.1f} s")
        size = path.stat().st_size
        print(f"database: {size / 1e6:,.0f} MB")
        store = SQLiteStore(path, read_only=True)
        now = datetime.now(UTC)
        pending = QueueFilter(states=PENDING_STATES, limit=100)
        any_state = QueueFilter(limit=100)
        [newest] = store.query(now=now, where=QueueFilter(limit=1))
        prefix = newest.id[:16]
        rows: list[tuple[str, float, tuple[float, float], str]] = []

        def listed(where: QueueFilter) -> Callable[[], tuple[int, int]]:
            # What `queue` does: the page, then (a full page) the footer's count.
            def view() -> tuple[int, int]:
                found = store.query(now=now, where=where)
                return len(found), store.count(now=now, where=where, cap=1_000_000)

            return view

        for args_, where in (
            ([], pending),
            (["--state", "any"], any_state),
            (["--state", "deferred"], QueueFilter(states=frozenset({RecipientState.DEFERRED}))),
            (["--state", "failed"], QueueFilter(states=frozenset({RecipientState.FAILED}))),
        ):
            ms, (shown, total) = median_ms(listed(where), args.runs)
            cmd = command_ms(path, ["queue", *args_], args.runs)
            rows.append((" ".join(["queue", *args_]), ms, cmd, f"{shown} of {total:,}"))

        ms, shape = median_ms(lambda: store.shape(now=now, edges=AGE_EDGES), args.runs)
        recipients = sum(r.total for r in shape)
        cmd = command_ms(path, ["queue", "--shape"], args.runs)
        rows.append(("queue --shape", ms, cmd, f"{len(shape):,} domains, {recipients:,} rcpts"))

        def show() -> int:
            mid = store.resolve_id(prefix)
            store.status(mid)
            return len(store.message_data(mid))

        ms, octets = median_ms(show, args.runs)
        cmd = command_ms(path, ["show", prefix], args.runs)
        rows.append((f"show {prefix}", ms, cmd, f"{octets} octets"))
        store.close()

        # What every command pays before it reads anything: interpreter and imports.
        rows.append(("--version (start-up)", 0.0, command_ms(path, ["--version"], args.runs), "-"))
        width = max(len(r[0]) for r in rows)
        print(f"{'view':<{width}}  {'store ms':>9}  {'command ms':>10}  {'cpu ms':>6}  result")
        for name, store_ms, (wall, cpu), note in rows:
            print(f"{name:<{width}}  {store_ms:>9.1f}  {wall:>10.0f}  {cpu:>6.0f}  {note}")


if __name__ == "__main__":
    main()

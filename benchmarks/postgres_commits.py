"""PostgreSQL store: enqueues from several processes into a server that flushes its commits.

Prints figures only (no assertions). A throwaway PostgreSQL cluster with PostgreSQL's own
durability settings (``ThrowawayPostgres(durable=True)``: fsync, synchronous_commit and
full_page_writes on, as in production), a fresh database per row, and ``P`` processes,
each with its own ``PostgresStore``, calling ``enqueue`` (one 1 KB message per call, one
transaction each) ``--count`` times after a common start. ``msg/s`` is all messages over
the time from the start to the last process done. ``NOTIFY/s`` counts the wake-ups a
LISTEN connection received meanwhile.

Commits that share the disk's flush scale with the number of clients; commits that
cannot (PostgreSQL serialises those of transactions that NOTIFY) stay flat, whatever P.

    .venv/bin/python benchmarks/postgres_commits.py [--processes 1,4,8,16] [--count 300]

Compare checkouts with ``PYTHONPATH=<tree>/src`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from tests.fixtures.postgres import ThrowawayPostgres

from benchmarks.postgres import make_messages
from mailstrom.stores.postgres import PostgresStore

CHANNEL = "mailstrom_work"


def sender(url: str, count: int, start: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    messages = make_messages(count, 1000)
    store = PostgresStore(url, max_size=1)
    try:
        start.wait(60)
        now = datetime.now(UTC)
        for message in messages:
            store.enqueue(message, now=now)
    finally:
        store.close()


def count_notifies(url: str, stop: threading.Event, counted: list[int]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        while not stop.is_set():
            counted[0] += sum(1 for _ in conn.notifies(timeout=0.1))


def one_row(pg: ThrowawayPostgres, processes: int, count: int) -> tuple[float, float]:
    url = pg.create_database()
    PostgresStore(url).close()  # the schema, before the clock
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=sender, args=(url, count, start)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    time.sleep(1.5 + 0.1 * processes)  # every process imported and connected
    stop, counted = threading.Event(), [0]
    listener = threading.Thread(target=count_notifies, args=(url, stop, counted))
    listener.start()
    time.sleep(0.2)
    began = time.perf_counter()
    start.set()
    for proc in procs:
        proc.join(300)
    elapsed = time.perf_counter() - began
    time.sleep(0.2)
    stop.set()
    listener.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise SystemExit("a sender failed")
    return processes * count / elapsed, counted[0] / elapsed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,4,8,16", help="sender process counts")
    parser.add_argument("--count", type=int, default=300, help="enqueues per process")
    parser.add_argument("--repeat", type=int, default=1, help="rows per process count")
    args = parser.parse_args(argv)
    counts = [int(p) for p in args.processes.split(",")]
    with ThrowawayPostgres(durable=True) as pg:
        print(f"enqueue (1 message per call) from P processes, {args.count} each; durable server")
        print(f"{'P':>4} {'msg/s':>9} {'NOTIFY/s':>9}")
        for processes in counts:
            for _ in range(args.repeat):
                rate, notifies = one_row(pg, processes, args.count)
                print(f"{processes:>4} {rate:>9,.0f} {notifies:>9,.0f}", flush=True)


if __name__ == "__main__":
    main()

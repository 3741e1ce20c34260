"""PostgreSQL store: the lease query on a new database with a large backlog.

Prints figures only (no assertions). A throwaway PostgreSQL cluster
(``tests.fixtures.postgres.ThrowawayPostgres``) gets a fresh database per run, ``--backlog``
messages (one recipient each, all due) are enqueued with ``enqueue_many``, and a store
opened afterwards, as a worker started on that backlog would open it, times ``--leases``
leases of ``--limit`` recipients. Autovacuum is off for the queue's tables, so they keep
the state of the first minute of a new database: no planner statistics (unless the store
gathers them itself).

Columns: the first lease (whatever the store does before it), the median and the slowest
of the others, the sum of all, how many took over 50 ms, and whether ``recipients`` had
statistics at the end. Blind, a lease reads every due recipient until the connection's
plan cache settles on a generic plan (psycopg prepares a statement on its 5th execution,
PostgreSQL tries 5 custom plans before a generic one), so roughly the first ten leases
on each pooled connection are slow.

    .venv/bin/python benchmarks/postgres_lease.py [--backlog 100000] [--runs 3]

Compare checkouts with ``PYTHONPATH=<tree>/src`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from tests.fixtures.postgres import ThrowawayPostgres

from benchmarks.postgres import make_messages
from mailstrom.stores.postgres import PostgresStore


def fill(url: str, backlog: int, batch: int) -> None:
    store = PostgresStore(url)  # creates the schema
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for table in ("recipients", "messages"):
                conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        template = make_messages(min(backlog, 1000), 1000)
        now = datetime.now(UTC)
        for start in range(0, backlog, batch):
            chunk = [template[(start + i) % len(template)] for i in range(batch)]
            store.enqueue_many(chunk[: backlog - start], now=now)
    finally:
        store.close()


def has_statistics(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL"
            " FROM pg_stat_user_tables WHERE relname = 'recipients'"
        ).fetchone()
    return bool(row and row[0])


def one_run(pg: ThrowawayPostgres, args: argparse.Namespace) -> tuple[list[float], bool]:
    url = pg.create_database()
    fill(url, args.backlog, 1000)
    store = PostgresStore(url)
    try:
        times = []
        now = datetime.now(UTC) + timedelta(seconds=1)
        for _ in range(args.leases):
            began = time.perf_counter()
            lease = store.lease(now=now, limit=args.limit, lease_for=timedelta(minutes=15))
            times.append((time.perf_counter() - began) * 1000)
            if lease is None:
                raise SystemExit("the backlog ran out: raise --backlog or lower --leases")
    finally:
        store.close()
    return times, has_statistics(url)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=100_000, help="messages due")
    parser.add_argument("--leases", type=int, default=20, help="leases timed per run")
    parser.add_argument("--limit", type=int, default=150, help="recipients per lease")
    parser.add_argument("--runs", type=int, default=3, help="fresh databases")
    args = parser.parse_args(argv)
    with ThrowawayPostgres() as pg:
        print(
            f"backlog {args.backlog:,} due, {args.leases} leases of {args.limit}, "
            f"{args.runs} fresh databases; ms per lease"
        )
        print(
            f"{'run':>4} {'first':>9} {'median':>9} {'slowest':>9} {'sum':>9} {'> 50 ms':>8}"
            "  statistics"
        )
        for run in range(1, args.runs + 1):
            times, analysed = one_run(pg, args)
            rest = times[1:]
            print(
                f"{run:>4} {times[0]:>9.1f} {statistics.median(rest):>9.1f} {max(rest):>9.1f}"
                f" {sum(times):>9.1f} {sum(t > 50 for t in times):>8}"
                f"  {'yes' if analysed else 'no'}"
            )


if __name__ == "__main__":
    main()

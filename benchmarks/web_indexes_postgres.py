"""What the dashboard's index of recipients by state (schema 22) costs a PostgreSQL store's
write path.

Migration 0022 replaced ``recipients_pending_seq`` (pending recipients by seq) with
``recipients_state_seq`` (queued, deferred and failed recipients by state and seq). Both
get an entry for each enqueued recipient and each deferral; the new one also for each
failure. This fills two databases of one throwaway cluster alike, one with the index set
of schema 21 put back, alternating ``--rounds`` times: ``enqueue_many`` of ``--messages``
one-recipient messages in batches of 1,000, then leasing 500 at a time and recording each
recipient (``record_and_lease``, as the worker does) delivered, but every 20th deferred
and every 33rd failed. Prints the medians, and the WAL each phase wrote (the same in
every round: a measure of the index writes that the machine's load does not move);
figures only.

    .venv/bin/python benchmarks/web_indexes_postgres.py [--messages 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from tests.fixtures.postgres import ThrowawayPostgres

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores import RecipientResult
from mailstrom.stores.postgres import PostgresStore

SCHEMA_21 = (
    b"DROP INDEX recipients_state_seq;"
    b" CREATE INDEX recipients_pending_seq ON recipients (seq)"
    b" WHERE state IN ('queued', 'deferred')"
)
OUTCOMES = {
    RecipientState.DELIVERED: Attempt(
        at=datetime.now(UTC), outcome=AttemptOutcome.DELIVERED, reply=SMTPReply(code=250, text="ok")
    ),
    RecipientState.DEFERRED: Attempt(
        at=datetime.now(UTC),
        outcome=AttemptOutcome.TEMPORARY,
        reply=SMTPReply(code=451, text="later"),
    ),
    RecipientState.FAILED: Attempt(
        at=datetime.now(UTC), outcome=AttemptOutcome.PERMANENT, reply=SMTPReply(code=550, text="no")
    ),
}


def _state(i: int) -> RecipientState:
    if i % 33 == 0:
        return RecipientState.FAILED
    if i % 20 == 0:
        return RecipientState.DEFERRED
    return RecipientState.DELIVERED


def _wal(conn: psycopg.Connection[Any]) -> int:
    """Bytes of WAL the cluster has written so far."""
    row = conn.execute(b"SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')").fetchone()
    assert row is not None
    return int(row[0])


def one_run(
    pg: ThrowawayPostgres, messages: int, *, schema_21: bool
) -> tuple[float, float, float, float]:
    """(messages enqueued per second, recipients leased and recorded per second, WAL
    bytes per message enqueued, WAL bytes per recipient leased and recorded)."""
    url = pg.create_database()
    PostgresStore(url).close()
    if schema_21:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SCHEMA_21)
    store = PostgresStore(url)
    watch = psycopg.connect(url, autocommit=True)
    try:
        now = datetime.now(UTC)
        batch = [
            PreparedMessage(
                data=b"Subject: x\r\n\r\nx\r\n",
                envelope_from="app@example.com",
                recipients=(f"user{i}@d{i % 50}.example",),
            )
            for i in range(messages)
        ]
        wal = _wal(watch)
        started = time.perf_counter()
        for i in range(0, messages, 1000):
            store.enqueue_many(batch[i : i + 1000], now=now)
        enqueued = time.perf_counter() - started
        enqueue_wal, wal = _wal(watch) - wal, _wal(watch)
        started = time.perf_counter()
        results: list[RecipientResult] = []
        n = 0
        while True:
            _, lease = store.record_and_lease(
                results, now=now, limit=500, lease_for=timedelta(minutes=5)
            )
            if lease is None:
                break
            results = []
            for item in lease.items:
                for r in item.recipients:
                    n += 1
                    state = _state(n)
                    results.append(
                        RecipientResult(
                            message_id=item.message_id,
                            address=r.address,
                            lease_token=lease.token,
                            ref=r.ref,
                            state=state,
                            attempt=OUTCOMES[state],
                            next_attempt_at=now + timedelta(days=1),
                        )
                    )
        recorded = time.perf_counter() - started
        record_wal = _wal(watch) - wal
        return messages / enqueued, n / recorded, enqueue_wal / messages, record_wal / n
    finally:
        watch.close()
        store.close()
        pg.drop_database(url.rpartition("/")[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures: dict[bool, list[tuple[float, float, float, float]]] = {True: [], False: []}
    with ThrowawayPostgres() as pg:
        for _ in range(args.rounds):
            for schema_21 in (True, False):
                figures[schema_21].append(one_run(pg, args.messages, schema_21=schema_21))
    print(
        f"{'':28} {'enqueue_many msg/s':>19} {'lease+record rcpt/s':>20}"
        f" {'WAL B/msg':>10} {'WAL B/rcpt':>11}"
    )
    labels = ((True, "recipients_pending_seq (21)"), (False, "recipients_state_seq (22)"))
    for schema_21, label in labels:
        enq, rec, enq_wal, rec_wal = (
            statistics.median(f[i] for f in figures[schema_21]) for i in range(4)
        )
        print(f"{label:28} {enq:19,.0f} {rec:20,.0f} {enq_wal:10,.0f} {rec_wal:11,.0f}")
    base, new = figures[True], figures[False]
    for i, name in ((0, "enqueue_many"), (1, "lease+record")):
        ratio = statistics.median(x[i] for x in new) / statistics.median(x[i] for x in base)
        print(f"{name}: {ratio:.2f} of the rate with schema 21's index")


if __name__ == "__main__":
    main()

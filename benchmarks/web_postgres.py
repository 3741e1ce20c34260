"""The dashboard's read model on a big PostgreSQL queue: how long each page's queries take.

Starts a throwaway PostgreSQL cluster (``tests.fixtures.postgres.ThrowawayPostgres``),
creates the schema with ``PostgresStore``, and loads ``--messages`` messages (default
1,000,000) with ``COPY``, shaped as in ``web.py``: one recipient each over 2,000 domains
with a Zipf-like spread, queued over five days, 90 % delivered, 3 % failed, 5 % deferred,
2 % queued at random, one attempt per attempted recipient, about 100 held; then
``ANALYZE``. Each read-model call behind a page runs ``--runs`` times with the count cache
off (templates are not rendered: ``web.py`` shows they cost a few milliseconds). Prints
figures only.

    .venv/bin/python benchmarks/web_postgres.py [--messages 1000000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from tests.fixtures.postgres import ThrowawayPostgres

from mailstrom.readmodel import QueueQuery, QueueView, Search, SortOrder, open_read_model
from mailstrom.stores.postgres import PostgresStore

BIG = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com", "gmx.de", "web.de")


def fill(url: str, messages: int, domains: int, now: datetime) -> None:
    rng = random.Random(7)
    names = list(BIG) + [f"d{i}.example" for i in range(domains - len(BIG))]
    picked = rng.choices(names, [1 / (k + 1) for k in range(len(names))], k=messages)
    start = now - timedelta(days=5)
    step = timedelta(days=5) / max(messages, 1)
    body = b"From: app@example.com\r\nSubject: Your order\r\n\r\n" + b"x" * 350 + b"\r\n"
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        rows = []
        for i in range(messages):
            created = start + step * i
            mid = f"{int(created.timestamp() * 1000):012x}{rng.getrandbits(80):020x}"
            r = rng.random()
            state = (
                "delivered"
                if r < 0.9
                else "failed"
                if r < 0.93
                else "deferred"
                if r < 0.98
                else "queued"
            )
            rows.append((mid, created, picked[i], state, i % 10007 == 0))
        with cur.copy(
            "COPY messages (id, data, envelope_from, created_at, held, subject, size) FROM STDIN"
        ) as copy:
            for mid, created, _, _, held in rows:
                copy.write_row((mid, body, "app@example.com", created, held, "Your order", 400))
        with cur.copy(
            "COPY recipients (message_id, address, seq, position, domain, state, attempts,"
            " first_attempt_at, last_attempt_at, next_attempt_at, finished_at, reply_code,"
            " reply_enhanced, reply_text, reason_class) FROM STDIN"
        ) as copy:
            for seq, (mid, created, domain, state, held) in enumerate(rows, 1):
                state = "queued" if held else state
                at = None if state == "queued" else created + timedelta(seconds=2)
                final = state in ("delivered", "failed")
                reply = {
                    "delivered": (250, "2.0.0", "OK", None),
                    "failed": (550, "5.1.1", "No such user", "mailbox"),
                    "deferred": (451, "4.7.0", "Too many messages, slow down", "rate_limited"),
                    "queued": (None, None, None, None),
                }[state]
                next_at = None if final else (at + timedelta(hours=1) if at else created)
                copy.write_row(
                    (mid, f"user{seq}@{domain}", seq, 0, domain, state, int(at is not None),
                     at, at, next_at, at if final else None, *reply)
                )  # fmt: skip
        with cur.copy("COPY attempts (message_id, address, at, outcome) FROM STDIN") as copy:
            for seq, (mid, created, domain, state, held) in enumerate(rows, 1):
                if state != "queued" and not held:
                    outcome = {"delivered": "delivered", "failed": "permanent"}.get(state)
                    copy.write_row(
                        (mid, f"user{seq}@{domain}", created + timedelta(seconds=2),
                         outcome or "temporary")
                    )  # fmt: skip
        cur.execute("ANALYZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--domains", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    now = datetime.now(UTC)
    with ThrowawayPostgres() as pg:
        url = pg.create_database()
        store = PostgresStore(url)
        started = time.perf_counter()
        fill(url, args.messages, args.domains, now)
        print(f"loaded {args.messages:,} messages in {time.perf_counter() - started:.0f} s")
        model = open_read_model(store, cache_seconds=0)
        newest = model.queue_page(QueueQuery(view=QueueView.ALL), now=now).messages[-1]
        cases: list[tuple[str, Callable[[], object]]] = [
            ("overview", lambda: model.overview(now=now)),
            ("destinations", lambda: model.destinations(limit=101)),
            ("message (store.status)", lambda: store.status(newest.id)),
        ]
        queries = {
            "queue (pending, newest first)": QueueQuery(),
            "queue: all": QueueQuery(view=QueueView.ALL),
            "queue: deferred": QueueQuery(view=QueueView.DEFERRED),
            "queue: queued": QueueQuery(view=QueueView.QUEUED),
            "queue: failed": QueueQuery(view=QueueView.FAILED),
            "queue: held": QueueQuery(view=QueueView.HELD),
            "queue: oldest first": QueueQuery(order=SortOrder.OLDEST),
            "queue: older than 2d": QueueQuery(older_than=timedelta(days=2)),
            "queue: domain gmail.com": QueueQuery(view=QueueView.ALL, domain="gmail.com"),
            "queue: rare domain": QueueQuery(view=QueueView.ALL, domain="d1990.example"),
            "queue: search address": QueueQuery(
                view=QueueView.ALL, search=Search.parse(newest.recipients[0].address)
            ),
            "queue: search id prefix": QueueQuery(
                view=QueueView.ALL, search=Search.parse(newest.id[:14])
            ),
        }
        for name, query in queries.items():
            cases.append((name, lambda q=query: model.queue_page(q, now=now)))  # type: ignore[misc]
        print(f"{'page':36} {'median ms':>10} {'max ms':>8}")
        for name, call in cases:
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            print(f"{name:36} {statistics.median(times) * 1000:10.0f} {max(times) * 1000:8.0f}")
        model.close()
        store.close()


if __name__ == "__main__":
    main()

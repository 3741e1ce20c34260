"""The dashboard on a big queue: how long ``mailstrom web``'s pages take over a SQLite store
of ``--messages`` messages (default 1,000,000).

The store is created by ``SQLiteStore`` (every migration, the dashboard's indexes included)
and then filled with straight SQL, which is setup, not what is measured: one recipient per
message over ``--domains`` domains with a Zipf-like spread (the first few hold most mail, as
gmail.com and friends do), queued over the last five days in time order. Each recipient's
state is drawn at random (90 % delivered, 3 % failed, 5 % deferred, 2 % queued), so pending
mail is spread over the whole queue rather than gathered at its young end, which is the
harder case for paging; every attempted recipient has one attempt in the history, and 100
messages are held.

Each page is fetched through the ASGI application in-process (Starlette's test client:
routing, the read model's queries, the template), ``--runs`` times, with the dashboard's
few-second count cache turned off, so every figure is a cold read; then the overview once
more with the cache on. Prints figures only.

    .venv/bin/python benchmarks/web.py [--messages 1000000] [--db /tmp/web-1m.db]

``--db`` keeps the filled store in that file and reuses it on the next run.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from starlette.testclient import TestClient

from mailstrom.stores import SQLiteStore
from mailstrom.web import create_app

BIG = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com", "gmx.de", "web.de")
STATES = (("delivered", 0.90), ("failed", 0.93), ("deferred", 0.98), ("queued", 1.0))
DEFERRAL = "Too many messages from your IP, slow down"
US = 1_000_000
LOCAL = "http://127.0.0.1:8025"
"""The dashboard without a token answers only loopback names in Host."""


def fill(path: Path, messages: int, domains: int, now: datetime) -> float:
    """Create the store at ``path`` and fill it; returns the seconds it took."""
    started = time.perf_counter()
    SQLiteStore(path).close()  # the schema, as mailstrom creates it
    rng = random.Random(7)
    names = list(BIG) + [f"d{i}.example" for i in range(domains - len(BIG))]
    weights = [1 / (rank + 1) for rank in range(len(names))]
    picked = rng.choices(names, weights, k=messages)
    start_us = int((now - timedelta(days=5)).timestamp() * US)
    step = 5 * 86400 * US // max(messages, 1)
    body = b"From: app@example.com\r\nSubject: Your order\r\n\r\n" + b"x" * 350 + b"\r\n"
    held = set(rng.sample(range(messages), min(100, messages)))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    chunk: tuple[list[tuple[object, ...]], ...]
    chunk = ([], [], [], [])
    for i in range(messages):
        seq = i + 1
        created = start_us + i * step
        mid = f"{created // 1000:012x}{rng.getrandbits(80):020x}"
        domain = picked[i]
        r = rng.random()
        state = next(s for s, limit in STATES if r < limit)
        is_held = i in held
        if is_held:
            state = "queued"
        attempted = state != "queued"
        at = created + 2 * US if attempted else None
        code, enhanced, text, reason = {
            "delivered": (250, "2.0.0", "OK", None),
            "failed": (550, "5.1.1", "No such user", "mailbox"),
            "deferred": (451, "4.7.0", DEFERRAL, "rate_limited"),
            "queued": (None, None, None, None),
        }[state]
        final = state in ("delivered", "failed")
        next_at = None if final else (at + 3600 * US if at else created)
        chunk[0].append(
            (seq, mid, "app@example.com", created, is_held, "Your order", f"<{seq}@ex>", 400)
        )
        chunk[3].append((seq, body))
        chunk[1].append(
            (
                seq,
                seq,
                0,
                f"user{i}@{domain}",
                domain,
                state,
                is_held,
                int(attempted),
                at,
                at,
                next_at,
                at if final else None,
                code,
                enhanced,
                text,
                "mx." + domain if at else None,
                "192.0.2.1" if at else None,
                bool(at),
                reason,
            )
        )
        if attempted:
            outcome = {"delivered": "delivered", "failed": "permanent"}.get(state, "temporary")
            chunk[2].append(
                (
                    seq,
                    at,
                    outcome,
                    0.2,
                    "mx." + domain,
                    "192.0.2.1",
                    25,
                    "TLSv1.3",
                    "TLS_AES_256_GCM_SHA384",
                    code,
                    enhanced,
                    text,
                    reason,
                )
            )
        if len(chunk[0]) == 50_000 or i == messages - 1:
            conn.executemany(
                "INSERT INTO messages (seq, id, envelope_from, created_at, held, subject,"
                " header_message_id, size) VALUES (?,?,?,?,?,?,?,?)",
                chunk[0],
            )
            # The bytes in a table of their own (schema version 20).
            conn.executemany("INSERT INTO message_data (seq, data) VALUES (?,?)", chunk[3])
            conn.executemany(
                "INSERT INTO recipients (id, message_seq, position, address, domain, state,"
                " held, attempts, first_attempt_at, last_attempt_at, next_attempt_at,"
                " finished_at, reply_code, reply_enhanced, reply_text, mx_host, ip, tls,"
                " reason_class) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                chunk[1],
            )
            conn.executemany(
                "INSERT INTO attempts (recipient_id, at, outcome, duration, mx_host, ip, port,"
                " tls_version, tls_cipher, reply_code, reply_enhanced, reply_text,"
                " reason_class) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                chunk[2],
            )
            chunk = ([], [], [], [])
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - started


def line(name: str, times: list[float], extra: object = "") -> None:
    median, most = statistics.median(times) * 1000, max(times) * 1000
    print(f"{name:36} {median:10.0f} {most:8.0f}  {extra}")


def timed(fetch: Callable[[], str], runs: int) -> tuple[list[float], str]:
    times, text = [], ""
    for _ in range(runs):
        t0 = time.perf_counter()
        text = fetch()
        times.append(time.perf_counter() - t0)
    return times, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--domains", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--db", type=Path, help="keep the filled store here and reuse it")
    args = parser.parse_args()
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or Path(tmp) / "queue.db"
        if args.db is None or not path.exists():
            took = fill(path, args.messages, args.domains, now)
            size = path.stat().st_size >> 20
            print(f"filled {args.messages:,} messages in {took:.0f} s ({size} MiB)")
        else:
            print(f"reusing {path} ({path.stat().st_size >> 20} MiB)")
        store = SQLiteStore(path)
        try:
            run(store, args.runs)
        finally:
            store.close()


def run(store: SQLiteStore, runs: int) -> None:
    with TestClient(create_app(store, cache_seconds=0), base_url=LOCAL) as client:

        def page(url: str) -> Callable[[], str]:
            def fetch() -> str:
                response = client.get(url)
                assert response.status_code == 200, (url, response.status_code)
                return response.text

            return fetch

        queue = page("/queue")()
        some_id = re.findall(r'href="/message/([0-9a-f]{32})"', queue)[-1]
        address = re.search(r"<td>(user\d+@[^<]+)</td>", queue)
        assert address is not None
        rows: list[tuple[str, str]] = [
            ("overview", "/"),
            ("queue (pending, newest first)", "/queue"),
            ("queue: all", "/queue?view=all"),
            ("queue: deferred", "/queue?view=deferred"),
            ("queue: queued", "/queue?view=queued"),
            ("queue: failed", "/queue?view=failed"),
            ("queue: held", "/queue?view=held"),
            ("queue: oldest first", "/queue?view=pending&order=oldest"),
            ("queue: older than 2d", "/queue?view=pending&age=2d"),
            ("queue: domain gmail.com", "/queue?view=all&domain=gmail.com"),
            ("queue: rare domain", "/queue?view=all&domain=d1990.example"),
            ("queue: deferred at a rare domain", "/queue?view=deferred&domain=d1990.example"),
            ("queue: search address", f"/queue?view=all&q={address.group(1)}"),
            ("queue: search id prefix", f"/queue?view=all&q={some_id[:14]}"),
            ("queue: 200 a page", "/queue?view=all&limit=200"),
            ("message", f"/message/{some_id}"),
            ("destinations", "/destinations"),
        ]
        print(f"{'page':36} {'median ms':>10} {'max ms':>8}  rows")
        for name, url in rows:
            times, text = timed(page(url), runs)
            found = text.count('class="mid"') or max(text.count("<tr>") - 1, 0)
            line(name, times, found)
        # Following "Next page" ten times: keyset pages cost the same deep in the queue.
        url, deepest = "/queue?view=all", []
        for _ in range(10):
            text = page(url)()
            link = re.search(r'href="([^"]+)" rel="next"', text)
            assert link is not None
            url = link.group(1).replace("&amp;", "&")
            deepest.append(timed(page(url), 1)[0][0])
        line("queue: pages 2-11 (next link)", deepest)
    with TestClient(create_app(store), base_url=LOCAL) as client:
        client.get("/")
        times, _ = timed(lambda: client.get("/").text, runs)
        line("overview, counts cached (5 s)", times)
    print(f"(pid {os.getpid()}, {runs} runs a page)")


if __name__ == "__main__":
    main()

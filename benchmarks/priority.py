"""Priority lanes: how long a transactional message takes behind a bulk backlog.

Prints figures only (no assertions). One run fills a SQLite store (a temporary file) with
N bulk messages (``priority="bulk"``, one recipient each, about 1 KB, 100,000 by default),
starts a ``Mailstrom`` worker on it, and once ``--warmup`` bulk recipients have been
delivered (bulk is flowing) sends ``--transactional`` messages with ``send_email`` (default
lane ``transactional``), one after another, each when the previous one was delivered. For
each it prints the latency: from ``send_email`` being called until the ``on_result`` hook
reports it delivered (a ``threading.Condition``, no polling), with how many bulk messages
were still queued behind or ahead of it. ``--no-lanes`` puts everything in one lane, for
comparison: the transactional message then waits for the backlog (use a smaller N).

The SMTP peer is Postfix's ``smtp-sink`` on a free loopback port when installed, else the
aiosmtpd sink of :mod:`benchmarks.sink` (``--sink`` chooses), both in processes of their
own; the loopback DNS fixture serves ``example.org MX 10 mx.test`` and ``mx.test A
127.0.0.1``. 10 SMTP sessions (``max_connections`` = ``max_per_destination`` = 10).

    .venv/bin/python benchmarks/priority.py                     # N=100,000, 5 messages
    .venv/bin/python benchmarks/priority.py -n 5000 --transactional 3
    .venv/bin/python benchmarks/priority.py -n 20000 --no-lanes  # one lane, for comparison
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich import box
from rich.console import Console
from rich.table import Table
from tests.fixtures.dns_server import LoopbackDNS

from benchmarks.postfix import Children, PostfixSink, missing_tools
from benchmarks.sink import SinkProcess
from mailstrom import Config, Email, Lane, Mailstrom, QueueAttributes, RecipientState, prepare
from mailstrom.stores import SQLiteStore
from mailstrom.stores.base import RecipientResult

DOMAIN = "example.org"
MX_HOST = "mx.test"
SESSIONS = 10
CHUNK = 10_000
"""Bulk messages per ``enqueue_many`` transaction while filling the store."""


class Watch:
    """Counts bulk deliveries and notes when each transactional message was delivered."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.bulk = 0
        self.failed = 0
        self.done: dict[str, float] = {}

    def __call__(self, result: RecipientResult) -> None:
        at = time.perf_counter()
        with self.cond:
            if result.state is not RecipientState.DELIVERED:
                self.failed += result.state.is_final
            elif result.address.startswith("urgent"):
                self.done[result.message_id] = at
            else:
                self.bulk += 1
            self.cond.notify_all()

    def wait(self, check: Any, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(check, timeout)


def fill(store: SQLiteStore, n: int, *, lane: str) -> float:
    """Queue ``n`` bulk messages (one prepared template, a recipient each); seconds taken."""
    now = datetime.now(UTC)
    template = prepare(
        Email(
            from_="News <news@sender.test>",
            to=[f"reader@{DOMAIN}"],
            subject="The weekly news",
            text=("All the news that fits in a kilobyte. " * 24).strip(),
        ),
        now=now,
    )
    attributes = QueueAttributes(priority=lane)
    began = time.perf_counter()
    for start in range(0, n, CHUNK):
        store.enqueue_many(
            [
                dataclasses.replace(
                    template, recipients=(f"reader{i}@{DOMAIN}",), attributes=attributes
                )
                for i in range(start, min(n, start + CHUNK))
            ],
            now=now,
        )
    return time.perf_counter() - began


def run(console: Console, args: argparse.Namespace, host: str, port: int, dns: LoopbackDNS) -> int:
    lanes = (Lane(name="transactional"), Lane(name="bulk", share=0.75))
    if args.no_lanes:
        lanes = (Lane(name="transactional"),)
    config = Config(
        helo_name="bench.test",
        smtp_port=port,
        dns=dns.dns_config,
        max_connections=SESSIONS,
        max_per_destination=SESSIONS,
        allow_loopback=True,
        lanes=lanes,
    )
    with tempfile.TemporaryDirectory(prefix="mailstrom-priority-") as tmp:
        store = SQLiteStore(Path(tmp) / "queue.db")
        lane = "transactional" if args.no_lanes else "bulk"
        filled = fill(store, args.bulk, lane=lane)
        console.print(f"queued {args.bulk:,} bulk messages in {filled:.1f} s")
        watch = Watch()
        ms = Mailstrom(config, store=store, worker=args.worker, on_result=watch)
        rows: list[tuple[int, float, int]] = []
        began = time.perf_counter()
        ms.start()
        try:
            if not watch.wait(lambda: watch.bulk >= args.warmup, args.timeout):
                console.print(f"[red]bulk did not start flowing within {args.timeout} s")
                return 1
            for k in range(args.transactional):
                sent = time.perf_counter()
                mid = ms.send_email(
                    Email(
                        from_="Shop <shop@sender.test>",
                        to=[f"urgent{k}@{DOMAIN}"],
                        subject="Your password reset code",
                        text="Your code is 123456.",
                    )
                )
                if not watch.wait(lambda mid=mid: mid in watch.done, args.timeout):
                    console.print(f"[red]transactional {k} not delivered within {args.timeout} s")
                    return 1
                with watch.cond:
                    rows.append((k, watch.done[mid] - sent, args.bulk - watch.bulk))
                # Let bulk run on for a while between the transactional messages.
                target = min(args.bulk, watch.bulk + args.gap)
                watch.wait(lambda target=target: watch.bulk >= target, args.timeout)
            elapsed = time.perf_counter() - began
            delivered = watch.bulk
        finally:
            ms.stop(timeout=10)
            store.close()
    table = Table(
        title=f"transactional behind {args.bulk:,} bulk "
        f"({'one lane' if args.no_lanes else 'lanes: transactional, bulk 0.75'}; "
        f"worker {args.worker}; sink {args.sink_used})",
        box=box.SIMPLE,
    )
    for column in ("#", "latency ms", "bulk still queued"):
        table.add_column(column, justify="right")
    for k, latency, backlog in rows:
        table.add_row(str(k), f"{latency * 1000:.1f}", f"{backlog:,}")
    console.print(table)
    latencies = [latency for _, latency, _ in rows]
    console.print(
        f"latency median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms; bulk delivered meanwhile: {delivered:,} "
        f"({delivered / elapsed:,.0f} msg/s); failed: {watch.failed}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--bulk", type=int, default=100_000, help="bulk messages queued")
    parser.add_argument("--transactional", type=int, default=5, help="messages sent behind")
    parser.add_argument("--warmup", type=int, default=2000, help="bulk delivered before")
    parser.add_argument("--gap", type=int, default=1000, help="bulk delivered between them")
    parser.add_argument("--worker", choices=["process", "thread"], default="process")
    parser.add_argument("--sink", choices=["auto", "postfix", "aiosmtpd"], default="auto")
    parser.add_argument("--no-lanes", action="store_true", help="one lane for everything")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per wait")
    args = parser.parse_args(argv)
    console = Console()
    use_postfix = args.sink == "postfix" or (args.sink == "auto" and not missing_tools())
    args.sink_used = "smtp-sink" if use_postfix else "aiosmtpd"
    children = Children()
    try:
        with tempfile.TemporaryDirectory(prefix="mailstrom-sink-") as tmp, LoopbackDNS() as dns:
            dns.mx(DOMAIN, [(10, MX_HOST)])
            if use_postfix:
                sink = PostfixSink(children, Path(tmp)).start()
                try:
                    dns.a(MX_HOST, sink.host)
                    return run(console, args, sink.host, sink.port, dns)
                finally:
                    sink.stop()
            with SinkProcess(kind="aiosmtpd") as aio:
                dns.a(MX_HOST, aio.host)
                return run(console, args, aio.host, aio.port, dns)
    except KeyboardInterrupt:
        print("\ninterrupted: processes stopped, temporary files removed", file=sys.stderr)
        return 130
    finally:
        children.stop_all()


if __name__ == "__main__":
    sys.exit(main())

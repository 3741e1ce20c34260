"""Delivery engine: messages per second from ``send_email`` to "every recipient delivered".

Prints figures only (no assertions). For 1 and 10 recipients per message and several
concurrency levels (``Config.max_connections`` = ``max_per_destination``), each row is one
end-to-end run against a local SMTP sink in its own process (:mod:`benchmarks.sink`):

* ``enqueue``: ``send_email`` of N prepared :class:`~mailstrom.Email` objects (validated,
  serialised and durably stored: one caller thread) with the worker not yet started;
* ``deliver``: from ``start()`` until the ``on_result`` hook has reported every recipient
  recorded in the store (a ``threading.Event``, no polling);
* ``total``: the two together; ``msg/s`` is N / total.

Beside each row, in the same run and against the same sink: a naive ``smtplib`` loop, one
connection per message (connect, EHLO, MAIL, RCPT..., DATA, QUIT), sending the very bytes
mailstrom sends (serialised beforehand, so the baseline pays no encoding at all). ``ratio``
is mailstrom end-to-end msg/s over smtplib msg/s; ``ratio dlv`` uses the delivery phase
alone. ``sink CPU`` is the sink process's CPU time over the phase's wall time: well below
100 % means the sink was not the bottleneck. A side row repeats one configuration with
aiosmtpd as the sink.

Every recipient of a message is at one domain (example.org, MX on 127.0.0.1 via a loopback
DNS server), so each message is one SMTP transaction. Stores: MemoryStore and SQLiteStore on
a temporary file (the embedded default; every enqueue is committed and fsynced).

    .venv/bin/python -m benchmarks.deliver [-n 2000] [--concurrency 1,4,16] [--rcpts 1,10]
    .venv/bin/python -m benchmarks.deliver --profile      # cProfile the 10 rcpt / c=16 run
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import random
import smtplib
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich import box
from rich.console import Console
from rich.table import Table
from tests.fixtures.dns_server import LoopbackDNS

from benchmarks.sink import SinkProcess, SinkStats
from mailstrom import Config, Email, Mailstrom, RecipientState
from mailstrom.message import PreparedMessage, prepare
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.base import RecipientResult, Store

DOMAIN = "example.org"
MX_HOST = "mx.test"
SENDER = "App <app@sender.test>"
WORDS = ("order", "shipped", "invoice", "account", "reset", "welcome", "update", "report")


# --- the messages --------------------------------------------------------------------------


def make_emails(count: int, rcpts: int, size: int, rng: random.Random) -> list[Email]:
    """``count`` distinct messages of about ``size`` octets, ``rcpts`` recipients each."""
    date = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    emails = []
    for i in range(count):
        lines = []
        length = 0
        while length < size:
            line = " ".join(rng.choices(WORDS, k=10)).capitalize() + "."
            lines.append(line)
            length += len(line) + 2
        emails.append(
            Email(
                from_=SENDER,
                to=[f"user{i * rcpts + j}@{DOMAIN}" for j in range(rcpts)],
                subject=f"Benchmark message {i}",
                text="\n".join(lines),
                date=date,
                message_id=f"<bench-{rcpts}-{i}@sender.test>",
            )
        )
    return emails


# --- one mailstrom run ------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    messages: int
    enqueue_s: float
    deliver_s: float
    delivered: int
    expected: int
    problems: int = 0
    first_problem: str | None = None
    sink: SinkStats | None = None
    max_gap: float | None = None

    @property
    def total_s(self) -> float:
        return self.enqueue_s + self.deliver_s

    @property
    def rate(self) -> float:
        return self.messages / self.total_s

    @property
    def deliver_rate(self) -> float:
        return self.messages / self.deliver_s


class Outcomes:
    """The ``on_result`` hook: counts results and sets ``done`` when all are in."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.delivered = 0
        self.problems = 0
        self.first_problem: str | None = None
        self.done = threading.Event()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.max_gap = 0.0
        self.record_lags: list[float] = []
        """Per result: the server's final reply → its record committed (on_result fires
        after the commit): the window in which a crash would resend the message."""

    def __call__(self, result: RecipientResult) -> None:  # after the store recorded it
        self.record_lags.append((datetime.now(UTC) - result.attempt.at).total_seconds())
        now = time.perf_counter()
        if self.last_at is None:
            self.first_at = now
        else:
            self.max_gap = max(self.max_gap, now - self.last_at)
        self.last_at = now
        if result.state is RecipientState.DELIVERED:
            self.delivered += 1
        else:
            self.problems += 1
            if self.first_problem is None:
                a = result.attempt
                self.first_problem = f"{result.state}: {a.reply or a.error}"
        if self.delivered + self.problems >= self.expected:
            self.done.set()


def make_store(kind: str, directory: Path) -> Store:
    if kind == "memory":
        return MemoryStore()
    path = Path(tempfile.mkstemp(suffix=".db", dir=directory)[1])
    path.unlink()
    return SQLiteStore(path)


def run_mailstrom(
    emails: Sequence[Email],
    *,
    rcpts: int,
    store_kind: str,
    concurrency: int,
    sink: SinkProcess,
    dns: LoopbackDNS,
    directory: Path,
    timeout: float,
    profiler: ThreadProfiler | None = None,
) -> Run:
    expected = len(emails) * rcpts
    outcomes = Outcomes(expected)
    store = make_store(store_kind, directory)
    config = Config(
        helo_name="bench.test",
        smtp_port=sink.port,
        dns=dns.dns_config,
        allow_loopback=True,  # the sink is on 127.0.0.1
        max_connections=concurrency,
        max_per_destination=concurrency,
    )
    ms = Mailstrom(config, store=store, on_result=outcomes)
    try:
        sink.reset()
        with profiler.main("enqueue") if profiler else _nothing():
            began = time.perf_counter()
            for email in emails:
                ms.send_email(email)
            enqueued = time.perf_counter()
        with profiler.threads() if profiler else _nothing():
            ms.start()
            finished = outcomes.done.wait(timeout)
            delivered_at = time.perf_counter()
            sink_stats = sink.stats()
            ms.stop(timeout=10)
        if not finished:
            print(
                f"  ! timed out after {timeout:g} s with {outcomes.delivered}/{expected} delivered",
                file=sys.stderr,
            )
    finally:
        store.close()
    return Run(
        messages=len(emails),
        enqueue_s=enqueued - began,
        deliver_s=delivered_at - enqueued,
        delivered=outcomes.delivered,
        expected=expected,
        problems=outcomes.problems,
        first_problem=outcomes.first_problem,
        sink=sink_stats,
        max_gap=outcomes.max_gap,
    )


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# --- the smtplib baseline ---------------------------------------------------------------------


def run_smtplib(prepared: Sequence[PreparedMessage], sink: SinkProcess) -> Run:
    """One connection per message, as a naive sender does: no reuse, no pipelining."""
    sink.reset()
    began = time.perf_counter()
    for message in prepared:
        # local_hostname: smtplib would otherwise call getfqdn() for every connection.
        with smtplib.SMTP(sink.host, sink.port, local_hostname="bench.test") as smtp:
            smtp.ehlo()
            smtp.sendmail(message.envelope_from, list(message.recipients), message.data)
    elapsed = time.perf_counter() - began
    stats = sink.stats()
    rcpts = len(prepared[0].recipients) if prepared else 0
    return Run(
        messages=len(prepared),
        enqueue_s=0.0,
        deliver_s=elapsed,
        delivered=stats.recipients,
        expected=len(prepared) * rcpts,
        sink=stats,
    )


# --- profiling every thread -------------------------------------------------------------------


@dataclass(slots=True)
class ThreadProfiler:
    """cProfile for the worker thread and the store's executor threads as well as main.

    ``threading.setprofile`` installs a hook in every thread started while ``threads()`` is
    active; its first call swaps itself for a per-thread ``cProfile.Profile``.
    """

    clock: str = "cpu"
    """``cpu``: per-thread CPU time (GIL waits and idle not counted); ``wall``: cProfile's
    default, where a GIL wait is charged to whatever function was running."""
    profiles: list[tuple[str, cProfile.Profile]] = field(default_factory=list)

    def _new(self) -> cProfile.Profile:
        return cProfile.Profile(time.thread_time) if self.clock == "cpu" else cProfile.Profile()

    @contextmanager
    def main(self, label: str) -> Iterator[None]:
        profile = self._new()
        self.profiles.append((label, profile))
        profile.enable()
        try:
            yield
        finally:
            profile.disable()

    @contextmanager
    def threads(self) -> Iterator[None]:
        lock = threading.Lock()

        def hook(frame: Any, event: str, arg: Any) -> None:
            sys.setprofile(None)
            profile = self._new()
            with lock:
                self.profiles.append((threading.current_thread().name, profile))
            profile.enable()

        threading.setprofile(hook)
        try:
            yield
        finally:
            threading.setprofile(None)  # type: ignore[arg-type, unused-ignore]

    def grouped(self) -> dict[str, pstats.Stats]:
        """Stats merged per thread kind: enqueue (main), worker (loop), executor."""
        groups: dict[str, pstats.Stats] = {}
        for name, profile in self.profiles:
            if name == "enqueue":
                group = "enqueue (caller thread)"
            elif name == "mailstrom-worker":
                group = "worker (event loop thread)"
            else:
                group = "executor threads (store calls)"
            profile.create_stats()
            if group in groups:
                groups[group].add(profile)
            else:
                groups[group] = pstats.Stats(profile)
        return groups


_IDLE = (
    "poll' of 'select.epoll",
    "acquire' of '_thread.lock",
    "get' of '_queue.SimpleQueue",
    "time.sleep",
    "'wait' of",
)


def _label(key: tuple[str, int, str]) -> str:
    path, line, name = key
    if path == "~":
        return name
    short = path.split("/site-packages/")[-1].split("/lib/python3.11/")[-1]
    short = short.split("/src/")[-1]
    return f"{short}:{line}({name})"


def _area(key: tuple[str, int, str]) -> str:
    path, _, name = key
    if path == "~":
        if "sqlite3" in name:
            return "sqlite3 (C)"
        if "socket" in name or "send" in name or "recv" in name:
            return "socket I/O (C)"
        return "builtins (C)"
    if "/mailstrom/" in path:
        part = path.split("/mailstrom/")[-1]
        return "mailstrom/" + part
    if "/asyncio/" in path:
        return "asyncio (stdlib)"
    if "/email/" in path:
        return "email (stdlib)"
    if "/site-packages/" in path:
        return path.split("/site-packages/")[-1].split("/")[0]
    return path.split("/")[-1] + " (stdlib)"


def print_profile(console: Console, profiler: ThreadProfiler, *, wall: dict[str, float]) -> None:
    for group, stats in profiler.grouped().items():
        entries = stats.stats  # type: ignore[attr-defined]
        total = sum(tt for (_, _, tt, _, _) in entries.values())
        idle = sum(
            tt for key, (_, _, tt, _, _) in entries.items() if any(i in key[2] for i in _IDLE)
        )
        busy = total - idle
        console.print(
            f"\n[bold]{group}[/]: {total:.2f} s profiled ({profiler.clock} clock), "
            f"{idle:.2f} s in waits (epoll, locks, queues), {busy:.2f} s busy"
            + (f"; phase wall time {wall[group]:.2f} s" if group in wall else "")
        )
        areas: dict[str, float] = defaultdict(float)
        for key, (_, _, tt, _, _) in entries.items():
            if not any(i in key[2] for i in _IDLE):
                areas[_area(key)] += tt
        table = Table(title=f"{group}: busy self time by module", title_justify="left")
        table.add_column("module")
        table.add_column("self s", justify="right")
        table.add_column("% busy", justify="right")
        for area, tt in sorted(areas.items(), key=lambda kv: -kv[1])[:12]:
            table.add_row(area, f"{tt:.3f}", f"{100 * tt / busy:.1f}")
        console.print(table)
        table = Table(title=f"{group}: top functions by self time", title_justify="left")
        table.add_column("function")
        table.add_column("calls", justify="right")
        table.add_column("self s", justify="right")
        table.add_column("cum s", justify="right")
        top = sorted(entries.items(), key=lambda kv: -kv[1][2])
        shown = 0
        for key, (_, nc, tt, ct, _) in top:
            if any(i in key[2] for i in _IDLE):
                continue
            table.add_row(_label(key), str(nc), f"{tt:.3f}", f"{ct:.3f}")
            shown += 1
            if shown == 15:
                break
        console.print(table)
        table = Table(
            title=f"{group}: mailstrom functions by cumulative time", title_justify="left"
        )
        table.add_column("function")
        table.add_column("calls", justify="right")
        table.add_column("cum s", justify="right")
        mine = [kv for kv in entries.items() if "/mailstrom/" in kv[0][0]]
        for key, (_, nc, _, ct, _) in sorted(mine, key=lambda kv: -kv[1][3])[:15]:
            table.add_row(_label(key), str(nc), f"{ct:.3f}")
        console.print(table)


# --- the report -------------------------------------------------------------------------------


def parse_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def pct(stats: SinkStats | None, seconds: float) -> str:
    if stats is None or seconds <= 0:
        return "-"
    return f"{100 * stats.cpu_seconds / seconds:.0f} %"


def check(run: Run, what: str) -> None:
    if run.max_gap is not None and run.max_gap > 1.0:
        print(f"  ! {what}: no result for {run.max_gap:.1f} s (a stall)", file=sys.stderr)
    if run.delivered != run.expected or run.problems:
        print(
            f"  ! {what}: {run.delivered}/{run.expected} delivered, {run.problems} not "
            f"({run.first_problem})",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=1500, help="messages per row")
    parser.add_argument("--rcpts", default="1,10", help="recipients per message (list)")
    parser.add_argument("--concurrency", default="1,4,16", help="session limits (list)")
    parser.add_argument("--stores", default="memory,sqlite", help="stores (list)")
    parser.add_argument("--size", type=int, default=2000, help="approximate body octets")
    parser.add_argument("--seed", type=int, default=20300102)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per row at most")
    parser.add_argument("--no-aiosmtpd", action="store_true", help="skip the aiosmtpd row")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table: cProfile one SQLite run at the largest rcpts/concurrency",
    )
    parser.add_argument(
        "--profile-clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: per-thread CPU time (default); wall: cProfile's default clock",
    )
    parser.add_argument("--profile-out", type=Path, help="also dump the worker's pstats here")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per row; the fastest is reported"
    )
    args = parser.parse_args(argv)
    rcpt_counts = parse_ints(args.rcpts)
    levels = parse_ints(args.concurrency)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    console = Console(width=160)
    rng = random.Random(args.seed)

    emails = {r: make_emails(args.messages, r, args.size, rng) for r in rcpt_counts}
    now = datetime.now(UTC)
    prepared = {r: [prepare(e, now=now) for e in emails[r]] for r in rcpt_counts}
    octets = sum(len(p.data) for p in prepared[rcpt_counts[0]]) // max(1, args.messages)

    with (
        tempfile.TemporaryDirectory(prefix="mailstrom-bench-") as tmp,
        LoopbackDNS() as dns,
        SinkProcess(host="127.0.0.1") as sink,
    ):
        dns.mx(DOMAIN, [(10, MX_HOST)])
        dns.a(MX_HOST, "127.0.0.1")
        directory = Path(tmp)
        common: dict[str, Any] = {
            "sink": sink,
            "dns": dns,
            "directory": directory,
            "timeout": args.timeout,
        }
        console.print(
            f"mailstrom delivery benchmark: {args.messages} messages per row of ~{octets} "
            f"octets, seed {args.seed}; sink in process {sink.pid} on 127.0.0.1:{sink.port}; "
            f"{os.cpu_count()} CPUs, load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        )
        # Warm-up: imports, first DNS lookup, code paths; not reported.
        run_mailstrom(
            emails[rcpt_counts[0]][:200],
            rcpts=rcpt_counts[0],
            store_kind="memory",
            concurrency=4,
            **common,
        )
        if args.profile:
            profile(console, args, emails, common)
            return

        table = Table(
            title="messages/s, end to end (send_email → every recipient recorded delivered)",
            box=box.SIMPLE_HEAD,
        )
        for name in COLUMNS:
            table.add_column(name, justify="left" if name == "store" else "right", no_wrap=True)
        for rcpts in rcpt_counts:
            baseline = best(args.repeat, functools.partial(run_smtplib, prepared[rcpts], sink))
            check(baseline, f"smtplib {rcpts} rcpts")
            add_row(table, rcpts, "smtplib loop", 1, baseline, baseline)
            for store_kind in stores:
                for level in levels:
                    measure = functools.partial(
                        run_mailstrom,
                        emails[rcpts],
                        rcpts=rcpts,
                        store_kind=store_kind,
                        concurrency=level,
                        **common,
                    )
                    run = best(args.repeat, measure)
                    check(run, f"{store_kind} {rcpts} rcpts c={level}")
                    add_row(table, rcpts, store_kind, level, run, baseline)
            table.add_section()
        if not args.no_aiosmtpd:
            side_rows(table, args, emails, prepared, common)
        console.print(table)
        console.print(
            "enqueue/deliver/total in seconds; msg/s = N ÷ total; dlv msg/s = N ÷ deliver; "
            "ratio = msg/s ÷ smtplib msg/s; ratio dlv = dlv msg/s ÷ smtplib msg/s;\n"
            "sink CPU = sink process CPU time ÷ delivery wall time; max gap = longest time "
            "between two recorded results (a stall).\n"
            f"Best of {args.repeat} per row. Load average at the end: "
            + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        )


COLUMNS = (
    "rcpts",
    "store",
    "conc",
    "enqueue",
    "deliver",
    "total",
    "msg/s",
    "rcpt/s",
    "dlv msg/s",
    "smtplib msg/s",
    "ratio",
    "ratio dlv",
    "sink CPU",
    "max gap",
)


def add_row(table: Table, rcpts: int, label: str, level: int, run: Run, baseline: Run) -> None:
    is_baseline = run is baseline
    table.add_row(
        str(rcpts),
        label,
        str(level),
        "-" if is_baseline else f"{run.enqueue_s:.2f}",
        f"{run.deliver_s:.2f}",
        f"{run.total_s:.2f}",
        f"{run.rate:,.0f}",
        f"{run.rate * rcpts:,.0f}",
        f"{run.deliver_rate:,.0f}",
        f"{baseline.rate:,.0f}",
        f"{run.rate / baseline.rate:.2f}",
        f"{run.deliver_rate / baseline.rate:.2f}",
        pct(run.sink, run.deliver_s),
        "-" if run.max_gap is None else f"{1000 * run.max_gap:,.0f} ms",
    )


def best(repeat: int, measure: Callable[[], Run]) -> Run:
    """The fastest of ``repeat`` runs (the machine is shared: slower runs are noise)."""
    return min((measure() for _ in range(max(1, repeat))), key=lambda run: run.total_s)


def side_rows(
    table: Table,
    args: argparse.Namespace,
    emails: dict[int, list[Email]],
    prepared: dict[int, list[PreparedMessage]],
    common: dict[str, Any],
) -> None:
    """One configuration again with aiosmtpd (its own process) as the sink."""
    rcpts = max(emails)
    level = max(parse_ints(args.concurrency))
    with SinkProcess(host="127.0.0.1", kind="aiosmtpd") as slow:
        options = dict(common, sink=slow)
        baseline = run_smtplib(prepared[rcpts], slow)
        check(baseline, "smtplib → aiosmtpd")
        run = run_mailstrom(
            emails[rcpts], rcpts=rcpts, store_kind="memory", concurrency=level, **options
        )
        check(run, "mailstrom → aiosmtpd")
    add_row(table, rcpts, "smtplib → aiosmtpd", 1, baseline, baseline)
    add_row(table, rcpts, "memory → aiosmtpd", level, run, baseline)


def profile(
    console: Console,
    args: argparse.Namespace,
    emails: dict[int, list[Email]],
    common: dict[str, Any],
) -> None:
    rcpts = max(emails)
    level = max(parse_ints(args.concurrency))
    profiler = ThreadProfiler(clock=args.profile_clock)
    run = run_mailstrom(
        emails[rcpts],
        rcpts=rcpts,
        store_kind="sqlite",
        concurrency=level,
        profiler=profiler,
        **common,
    )
    check(run, "profiled run")
    console.print(
        f"\n[bold]cProfile[/] of sqlite, {rcpts} rcpts, concurrency {level}: "
        f"{run.messages} messages, enqueue {run.enqueue_s:.2f} s, deliver {run.deliver_s:.2f} s "
        "(slowed down by the profiler; compare shares, not absolute times)"
    )
    print_profile(
        console,
        profiler,
        wall={
            "enqueue (caller thread)": run.enqueue_s,
            "worker (event loop thread)": run.deliver_s,
        },
    )
    if args.profile_out is not None:
        groups = profiler.grouped()
        groups["worker (event loop thread)"].dump_stats(args.profile_out)


if __name__ == "__main__":
    main()

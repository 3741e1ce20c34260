"""End to end against Postfix's ``smtp-sink``: mailstrom beside the tools an MTA is measured with.

Prints figures only (no assertions). One run starts Postfix's ``smtp-sink`` on a free
loopback port (its own process, stopped at the end) and measures, with messages of about
1 KB, one recipient each, and 10 SMTP sessions:

* ``reference``: Postfix's ``smtp-source -d -s 10 -m N -l 1024`` into the sink. Every other
  figure is also printed as a ratio to it (higher is better; 1.00 = as fast as smtp-source).
* ``aiosmtplib`` (when importable): 10 asyncio tasks, each with one connection it reuses for
  all its messages (the bytes mailstrom would send, serialised beforehand); no queue.
* ``deliver thread`` / ``deliver process``: a SQLite store (a temporary file) filled with N
  messages first, then the worker started: the facade's in-process worker
  (``Mailstrom.start()``; the clock stops when the ``on_result`` hook has seen every
  recipient, a ``threading.Event``), or a ``mailstrom worker`` process (the clock starts
  when it is spawned and stops when ``store.stats()``, polled every 2 ms once the sink has
  seen N messages, counts every recipient delivered).
* ``e2e 1 thread`` / ``e2e 4 threads``: a started ``Mailstrom`` on a SQLite store, one or
  four application threads calling ``send_email(Email(...))`` N times in all; the clock
  stops when every recipient is delivered. Each call's latency gives p50/p99. Run for each
  worker mode ``Mailstrom`` offers (see :func:`make_facade`).
* ``wake-up``: a ``mailstrom worker`` process idle on a SQLite store; this process enqueues
  ONE message through its own store object and polls every 1 ms until the sink has it and
  until ``store.status(id)`` shows it delivered; ~20 times with 0.5 s pauses. Its ratio is
  the time ``smtp-source -m 1`` takes to send one message on a fresh connection over the
  row's time.

Throughput rows run ``--repeat`` times (3); the median is reported with min and max.

    .venv/bin/python benchmarks/e2e.py                      # N=5000, 3 repeats
    .venv/bin/python benchmarks/e2e.py -n 500 --repeat 1    # a quick check
    .venv/bin/python benchmarks/e2e.py --rows deliver-thread,wakeup
    .venv/bin/python benchmarks/e2e.py --profile            # cProfile deliver thread
    .venv/bin/python benchmarks/e2e.py --split              # send_email, stage by stage
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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

from benchmarks.deliver import Outcomes
from benchmarks.postfix import (
    INSTALL_HINT,
    Children,
    PostfixSink,
    missing_tools,
    smtp_source_argv,
)
from mailstrom import Config, Email, Mailstrom, PreparedMessage, RecipientState, prepare
from mailstrom.stores import SQLiteStore
from mailstrom.stores.base import RecipientResult, Store

DOMAIN = "example.org"
MX_HOST = "mx.test"
SENDER = "App <app@sender.test>"
HELO = "bench.test"
SESSIONS = 10
SIZE = 1024
"""Octets per message: smtp-source's ``-l 1024``; mailstrom's whole message is sized to it."""
WORDS = ("order", "shipped", "invoice", "account", "reset", "welcome", "update", "report")
ROWS = ("reference", "aiosmtplib", "deliver-thread", "deliver-process", "e2e-1", "e2e-4", "wakeup")


# --- the messages ---------------------------------------------------------------------------


def make_emails(count: int, *, offset: int = 0) -> list[Email]:
    """``count`` distinct one-recipient messages of about SIZE octets once prepared."""
    date = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

    def email(i: int, text: str) -> Email:
        return Email(
            from_=SENDER,
            to=[f"user{i}@{DOMAIN}"],
            subject=f"Benchmark message {i:07d}",
            text=text,
            date=date,
            message_id=f"<e2e-{i:07d}@sender.test>",
        )

    overhead = len(prepare(email(offset, "x")).data) - 3  # 'x' + CRLF
    words = itertools.cycle(WORDS)
    lines: list[str] = []
    length = 0
    while length < SIZE - overhead - 40:
        line = " ".join(next(words) for _ in range(9)).capitalize() + "."
        lines.append(line)
        length += len(line) + 2
    pad = max(1, SIZE - overhead - length - 2)
    lines.append("x" * pad)
    text = "\n".join(lines)
    return [email(offset + i, text) for i in range(count)]


# --- the facade (the one place that knows how Mailstrom is built) -----------------------------


def worker_modes() -> list[str | None]:
    """The worker modes to run the end-to-end rows with: ``None`` (the default, today an
    in-process thread) unless ``Mailstrom`` takes a ``worker=`` argument."""
    if "worker" in inspect.signature(Mailstrom).parameters:
        return ["thread", "process"]
    return [None]


def make_facade(
    config: Config,
    store_path: Path,
    worker_mode: str | None,
    *,
    on_result: Callable[[RecipientResult], None] | None = None,
) -> Mailstrom:
    """``Mailstrom`` on a SQLite store at ``store_path``; ``worker=`` is passed only when the
    signature has it (the option being added), so this runs before and after that change."""
    params = inspect.signature(Mailstrom).parameters
    kwargs: dict[str, Any] = {"store": SQLiteStore(store_path)}
    if worker_mode is not None and "worker" in params:
        kwargs["worker"] = worker_mode
    if on_result is not None:
        kwargs["on_result"] = on_result
    return Mailstrom(config, **kwargs)


def mode_label(worker_mode: str | None) -> str:
    return "default" if worker_mode is None else worker_mode


def hooks_results(worker_mode: str | None) -> bool:
    """Whether results come back through ``on_result`` (a worker in this process)."""
    return worker_mode in (None, "thread")


# --- results --------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    messages: int
    seconds: float
    delivered: int
    completed: bool = True
    problems: int = 0
    first_problem: str | None = None
    first_s: float | None = None
    """Time from the clock's start to the first result (or the sink's first message)."""
    max_gap: float | None = None
    record_lags: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    """Per ``send_email`` call, seconds."""
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_rate(self) -> float | None:
        """Messages after the first ÷ the time after the first (startup left out)."""
        if self.first_s is None or self.seconds <= self.first_s or self.messages < 2:
            return None
        return (self.messages - 1) / (self.seconds - self.first_s)


@dataclass(slots=True)
class Row:
    key: str
    label: str
    runs: list[Run] = field(default_factory=list)
    latency: tuple[list[float], list[float]] | None = None
    """For the wake-up row: seconds until the sink had it, until the store said delivered."""

    def median_rate(self) -> float | None:
        done = [r.rate for r in self.runs if r.completed]
        return statistics.median(done) if done else None


class LogCatcher(logging.Handler):
    """Keeps mailstrom's warnings and errors logged in this process (a row's notes)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 1000:
            self.records.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    def take(self) -> list[str]:
        taken, self.records = self.records, []
        return taken


# --- the rows -------------------------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    """What every row needs."""

    sink: PostfixSink
    dns: LoopbackDNS
    children: Children
    directory: Path
    timeout: float
    worker_log_level: str
    logs: LogCatcher
    _files: Iterator[int] = field(default_factory=itertools.count)

    def config(self) -> Config:
        return Config(
            helo_name=HELO,
            smtp_port=self.sink.port,
            dns=self.dns.dns_config,
            max_connections=SESSIONS,
            max_per_destination=SESSIONS,
            allow_loopback=True,  # the sink listens on 127.0.0.1
        )

    def new_store_path(self) -> Path:
        return self.directory / f"queue-{next(self._files)}.db"

    def check_sink(self, run: Run, before: int, expected: int) -> None:
        got = self.sink.count() - before
        if got != expected:
            run.notes.append(f"sink received {got} messages, expected {expected}")


def run_reference(bench: Bench, n: int) -> Run:
    sink = bench.sink
    before = sink.count()
    argv = smtp_source_argv(sink, messages=n, sessions=SESSIONS, size=SIZE)
    began = time.perf_counter()
    proc = bench.children.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=bench.timeout)
        completed = proc.returncode == 0
    except subprocess.TimeoutExpired:
        err, completed = b"", False
    finally:
        bench.children.stop(proc)
    elapsed = time.perf_counter() - began
    run = Run(messages=n, seconds=elapsed, delivered=sink.count() - before, completed=completed)
    if err.strip():
        run.notes.append(err.decode(errors="replace").strip().splitlines()[-1])
    bench.check_sink(run, before, n)
    return run


def reference_latency(bench: Bench, count: int) -> list[float]:
    """``smtp-source`` sending one message on a fresh connection, wall time, ``count`` times."""
    sink = bench.sink
    argv = smtp_source_argv(sink, messages=1, sessions=1, size=SIZE, reuse=False)
    times = []
    for _ in range(count):
        began = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, timeout=bench.timeout, check=True)
        times.append(time.perf_counter() - began)
    return times


def run_aiosmtplib(bench: Bench, prepared: Sequence[PreparedMessage]) -> Run:
    import aiosmtplib

    sink = bench.sink
    before = sink.count()
    sent = 0

    async def session(queue: Iterator[PreparedMessage]) -> None:
        nonlocal sent
        smtp = aiosmtplib.SMTP(
            hostname=sink.host,
            port=sink.port,
            local_hostname=HELO,
            start_tls=False,
            timeout=30,
        )
        await smtp.connect()
        try:
            for message in queue:
                await smtp.sendmail(message.envelope_from, list(message.recipients), message.data)
                sent += 1
        finally:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()

    async def main() -> None:
        queue = iter(prepared)  # shared: each session takes the next message
        async with asyncio.timeout(bench.timeout):
            await asyncio.gather(*(session(queue) for _ in range(SESSIONS)))

    began = time.perf_counter()
    completed = True
    try:
        asyncio.run(main())
    except TimeoutError:
        completed = False
    elapsed = time.perf_counter() - began
    run = Run(messages=len(prepared), seconds=elapsed, delivered=sent, completed=completed)
    bench.check_sink(run, before, len(prepared))
    return run


def stop_facade(ms: Mailstrom, run: Run, timeout: float = 30.0) -> None:
    """``ms.stop()`` with a bound: a worker that does not stop must not hang the benchmark."""
    stopper = threading.Thread(target=ms.stop, kwargs={"timeout": 10.0}, daemon=True)
    stopper.start()
    stopper.join(timeout)
    if stopper.is_alive():
        run.notes.append(f"stop() did not return within {timeout:g} s")
    ms.store.close()


def run_deliver_thread(bench: Bench, emails: Sequence[Email], profiler: Any | None = None) -> Run:
    """The facade's in-process worker; N messages queued before ``start()``."""
    sink = bench.sink
    outcomes = Outcomes(len(emails))
    ms = make_facade(bench.config(), bench.new_store_path(), "thread", on_result=outcomes)
    before = sink.count()
    run = Run(messages=len(emails), seconds=0.0, delivered=0)
    try:
        ms.send_emails(emails)  # one transaction, not timed
        with profiler.threads() if profiler is not None else contextlib.nullcontext():
            began = time.perf_counter()
            ms.start()
            run.completed = outcomes.done.wait(bench.timeout)
            run.seconds = time.perf_counter() - began
    finally:
        stop_facade(ms, run)
    fill(run, outcomes, began)
    bench.check_sink(run, before, len(emails))
    run.notes += bench.logs.take()
    return run


def fill(run: Run, outcomes: Outcomes, began: float) -> None:
    run.delivered = outcomes.delivered
    run.problems = outcomes.problems
    run.first_problem = outcomes.first_problem
    run.max_gap = outcomes.max_gap
    run.record_lags = outcomes.record_lags
    if outcomes.first_at is not None:
        run.first_s = outcomes.first_at - began


def worker_argv(bench: Bench, store_path: Path, log_level: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mailstrom",
        "worker",
        "--store",
        f"sqlite:///{store_path}",  # an absolute path: sqlite:////tmp/...
        "--dns-server",
        f"{bench.dns.address}:{bench.dns.port}",
        "--smtp-port",
        str(bench.sink.port),
        "--helo-name",
        HELO,
        "--no-live",
        "--log-level",
        log_level,
    ]


def worker_env(bench: Bench) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env["MAILSTROM_MAX_CONNECTIONS"] = str(SESSIONS)
    env["MAILSTROM_MAX_PER_DESTINATION"] = str(SESSIONS)
    env["MAILSTROM_ALLOW_LOOPBACK"] = "1"
    env["XDG_CONFIG_HOME"] = str(bench.directory)  # no user config file is read
    return env


def spawn_worker(
    bench: Bench, store_path: Path, log_level: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = bench.directory / f"{store_path.stem}.worker.log"
    with open(log_path, "wb") as log_file:
        proc = bench.children.spawn(
            worker_argv(bench, store_path, log_level),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=worker_env(bench),
            cwd=bench.directory,  # no ./mailstrom.toml is read
        )
    return proc, log_path


def worker_trouble(log_path: Path, limit: int = 5) -> list[str]:
    """The worker's log lines at warning level or worse (and tracebacks)."""
    lines = log_path.read_text(errors="replace").splitlines()
    bad = [
        line
        for line in lines
        if "level=warning" in line
        or "level=error" in line
        or "level=critical" in line
        or line.startswith("Traceback")
    ]
    return [f"worker log: {line[:200]}" for line in bad[:limit]] + (
        [f"worker log: {len(bad) - limit} more such lines"] if len(bad) > limit else []
    )


SINK_POLL = 0.001
"""How often a worker process's rows read the sink's counter (a ``pread`` of a file: a few
µs). The reference's clock is its process's exit, read at once; a coarser poll would add
half its interval, on average, to a row's time and to its ``1st ms``."""
STATS_POLL = 0.002
"""How often they then ask ``store.stats()`` (0.2 to 0.6 ms on 5,000 messages) whether every
result is recorded."""


def delivered_in(store: Store) -> tuple[int, int]:
    """(delivered, failed or deferred) recipients according to the store."""
    by_state = store.stats().by_state
    bad = by_state.get(RecipientState.FAILED, 0) + by_state.get(RecipientState.DEFERRED, 0)
    return by_state.get(RecipientState.DELIVERED, 0), bad


def wait_delivered(
    bench: Bench, store: Store, expected: int, before: int, began: float, run: Run
) -> None:
    """For a worker in another process: the sink's counter (a file, read every
    ``SINK_POLL`` s) until it has ``expected`` new messages, then ``store.stats()`` every
    ``STATS_POLL`` s until it counts every recipient delivered (or failed/deferred). Fills
    ``run``."""
    deadline = began + bench.timeout
    sink = bench.sink
    while sink.count() == before and time.perf_counter() < deadline:
        time.sleep(SINK_POLL)
    if sink.count() > before:
        run.first_s = time.perf_counter() - began
    sink.wait_count(before + expected, deadline, SINK_POLL)
    while True:
        delivered, bad = delivered_in(store)
        now = time.perf_counter()
        if delivered + bad >= expected or now >= deadline:
            break
        time.sleep(STATS_POLL)
    run.seconds = now - began
    run.delivered = delivered
    run.problems = bad
    run.completed = delivered + bad >= expected
    if bad:
        run.first_problem = f"{bad} recipients failed or deferred"


def run_deliver_process(bench: Bench, prepared: Sequence[PreparedMessage]) -> Run:
    """A ``mailstrom worker`` process started on a store already holding N messages."""
    store_path = bench.new_store_path()
    store = SQLiteStore(store_path)
    run = Run(messages=len(prepared), seconds=0.0, delivered=0)
    proc = None
    log_path = None
    try:
        store.enqueue_many(prepared, now=datetime.now(UTC))
        before = bench.sink.count()
        began = time.perf_counter()
        proc, log_path = spawn_worker(bench, store_path, bench.worker_log_level)
        wait_delivered(bench, store, len(prepared), before, began, run)
        if proc.poll() is not None:
            run.notes.append(f"worker exited with {proc.returncode}")
    finally:
        if proc is not None:
            code = bench.children.stop(proc)
            if code not in (0, None, -signal.SIGTERM):
                run.notes.append(f"worker exit status {code} after SIGTERM")
        store.close()
    bench.check_sink(run, before, len(prepared))
    if log_path is not None:
        run.notes += worker_trouble(log_path)
    return run


def run_e2e(bench: Bench, emails: Sequence[Email], *, threads: int, worker_mode: str | None) -> Run:
    """``send_email`` from ``threads`` application threads into a started facade."""
    sink = bench.sink
    n = len(emails)
    hooked = hooks_results(worker_mode)
    outcomes = Outcomes(n)
    ms = make_facade(
        bench.config(),
        bench.new_store_path(),
        worker_mode,
        on_result=outcomes if hooked else None,
    )
    run = Run(messages=n, seconds=0.0, delivered=0)
    before = sink.count()
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []
    gate = threading.Barrier(threads + 1)

    def app(index: int) -> None:
        mine = latencies[index]
        clock = time.perf_counter
        try:
            gate.wait()
            for email in emails[index::threads]:
                t0 = clock()
                ms.send_email(email)
                mine.append(clock() - t0)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    try:
        ms.start()
        workers = [
            threading.Thread(target=app, args=(i,), name=f"app-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in workers:
            t.start()
        gate.wait(bench.timeout)
        began = time.perf_counter()
        if hooked:
            run.completed = outcomes.done.wait(bench.timeout)
            run.seconds = time.perf_counter() - began
            fill(run, outcomes, began)
        else:
            wait_delivered(bench, ms.store, n, before, began, run)
        for t in workers:
            t.join(max(0.0, began + bench.timeout - time.perf_counter()))
    finally:
        stop_facade(ms, run)
    run.latencies = [x for mine in latencies for x in mine]
    if errors:
        run.notes.append(f"{len(errors)} send_email errors, first: {errors[0]}")
    bench.check_sink(run, before, n)
    run.notes += bench.logs.take()
    return run


@dataclass(slots=True)
class WakeUps:
    sink_s: list[float] = field(default_factory=list)
    stored_s: list[float] = field(default_factory=list)
    enqueue_s: list[float] = field(default_factory=list)
    misses: int = 0
    notes: list[str] = field(default_factory=list)


def run_wakeup(bench: Bench, count: int, pause: float, bound: float) -> WakeUps:
    """One message at a time into an idle ``mailstrom worker`` process's store."""
    store_path = bench.new_store_path()
    store = SQLiteStore(store_path)  # creates the schema before the worker opens it
    emails = make_emails(count, offset=9_000_000)
    found = WakeUps()
    proc, log_path = spawn_worker(bench, store_path, "info")
    try:
        deadline = time.perf_counter() + 30
        while b"worker started" not in log_path.read_bytes():
            if proc.poll() is not None or time.perf_counter() > deadline:
                found.notes.append("the worker did not log 'worker started'")
                return found
            time.sleep(0.01)
        for email in emails:
            time.sleep(pause)  # let the worker go idle
            before = bench.sink.count()
            prepared = prepare(email)
            t0 = time.perf_counter()
            mid = store.enqueue(prepared, now=datetime.now(UTC))
            found.enqueue_s.append(time.perf_counter() - t0)
            at_sink = stored = None
            while stored is None:
                now = time.perf_counter()
                if at_sink is None and bench.sink.count() > before:
                    at_sink = now - t0
                if store.status(mid).state is RecipientState.DELIVERED:
                    stored = now - t0
                    at_sink = stored if at_sink is None else at_sink
                elif now - t0 > bound:
                    break
                else:
                    time.sleep(0.001)
            if stored is None:
                found.misses += 1
                store.cancel(mid, now=datetime.now(UTC))
                continue
            assert at_sink is not None
            found.sink_s.append(at_sink)
            found.stored_s.append(stored)
    finally:
        bench.children.stop(proc)
        store.close()
        found.notes += worker_trouble(log_path)
    return found


# --- the report -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{1000 * seconds:,.2f}" if seconds < 0.01 else f"{1000 * seconds:,.0f}"


def add_row(table: Table, row: Row, reference: float | None) -> None:
    runs = row.runs
    done = [r for r in runs if r.completed]
    if not done:
        last = runs[-1]
        table.add_row(
            row.label,
            str(last.messages),
            "timeout",
            f"{last.delivered}/{last.messages} dlv",
            *["-"] * 7,
        )
        return
    median = statistics.median(r.rate for r in done)
    spread = f"{min(r.rate for r in done):,.0f}-{max(r.rate for r in done):,.0f}"
    if len(done) < len(runs):
        spread += f" +{len(runs) - len(done)} timeout"
    steady = [s for r in done if (s := r.steady_rate) is not None]
    firsts = [r.first_s for r in done if r.first_s is not None]
    gaps = [r.max_gap for r in done if r.max_gap is not None]
    lat = [x for r in done for x in r.latencies]
    lags = [x for r in done for x in r.record_lags]
    table.add_row(
        row.label,
        str(done[0].messages),
        fmt_rate(median),
        spread,
        "-" if reference is None else fmt_ratio(median / reference),
        fmt_rate(statistics.median(steady) if steady else None),
        fmt_ms(statistics.median(firsts)) if firsts else "-",
        fmt_ms(percentile(lat, 0.5)) if lat else "-",
        fmt_ms(percentile(lat, 0.99)) if lat else "-",
        fmt_ms(max(gaps)) if gaps else "-",
        fmt_ms(percentile(lags, 0.99)) if lags else "-",
    )


COLUMNS = (
    "row",
    "N",
    "msg/s",
    "min-max",
    "ratio",
    "msg/s from 1st",
    "1st ms",
    "p50 ms",
    "p99 ms",
    "max gap ms",
    "record p99 ms",
)


def wakeup_table(found: WakeUps, reference: list[float]) -> Table:
    table = Table(
        title="idle wake-up: one message into an idle `mailstrom worker` process (ms)",
        box=box.SIMPLE_HEAD,
    )
    for name in ("measure", "n", "median ms", "max ms", "min ms", "ratio"):
        table.add_column(name, justify="left" if name == "measure" else "right")
    ref = statistics.median(reference) if reference else None

    def line(label: str, values: list[float], ratio: bool) -> None:
        if not values:
            table.add_row(label, "0", "-", "-", "-", "-")
            return
        med = statistics.median(values)
        table.add_row(
            label,
            str(len(values)),
            fmt_ms(med),
            fmt_ms(max(values)),
            fmt_ms(min(values)),
            fmt_ratio(ref / med) if ratio and ref else "-",
        )

    line("reference: smtp-source -m 1 (fresh process and connection)", reference, False)
    line("store.enqueue (this process, fsync)", found.enqueue_s, False)
    line("enqueue → the sink has it", found.sink_s, True)
    line("enqueue → store.status says delivered", found.stored_s, True)
    return table


def print_notes(console: Console, label: str, runs: Sequence[Run]) -> None:
    seen: set[str] = set()
    for i, run in enumerate(runs, 1):
        tag = f"{label} (run {i})"
        if not run.completed:
            console.print(
                f"  ! {tag}: timeout after {run.seconds:.1f} s with {run.delivered}/"
                f"{run.messages} delivered"
            )
        if run.problems:
            console.print(f"  ! {tag}: {run.problems} not delivered ({run.first_problem})")
        if run.max_gap is not None and run.max_gap > 1.0:
            console.print(f"  ! {tag}: no result for {run.max_gap:.1f} s (a stall)")
        for note in run.notes:
            if note not in seen:
                seen.add(note)
                console.print(f"  ! {tag}: {note}", markup=False, highlight=False)


# --- main -----------------------------------------------------------------------------------


def measure(repeat: int, once: Callable[[], Run]) -> list[Run]:
    return [once() for _ in range(max(1, repeat))]


def parse_rows(text: str) -> list[str]:
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(unknown)} (choose from {', '.join(ROWS)})")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-n", "--messages", type=int, default=5000, help="messages per row")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; median reported")
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"rows to run, from {','.join(ROWS)} (the reference always runs)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run at most")
    parser.add_argument("--wakeups", type=int, default=20, help="messages in the wake-up row")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds idle between them")
    parser.add_argument(
        "--worker-log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="--log-level of the `mailstrom worker` process in `deliver process` "
        "(info, the CLI's default, logs one line per attempt)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table: cProfile one `deliver thread` run (every thread)",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="instead of the table: where the app thread's send_email time goes in one "
        "`e2e 1 thread` run per worker mode (µs per message per stage)",
    )
    args = parser.parse_args(argv)
    rows = parse_rows(args.rows)
    console = Console(width=160)

    missing = missing_tools()
    if missing:
        print(f"e2e.py: {' and '.join(missing)} not found. {INSTALL_HINT}", file=sys.stderr)
        return 69
    try:
        import aiosmtplib  # noqa: F401
    except ImportError:
        if "aiosmtplib" in rows:
            rows.remove("aiosmtplib")
            console.print(
                "aiosmtplib is not installed: its row is left out (pip install '.[bench]')"
            )

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # run the finally blocks: stop children, remove files

    signal.signal(signal.SIGTERM, terminate)
    children = Children()
    logs = LogCatcher()
    logging.getLogger("mailstrom").addHandler(logs)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="mailstrom-e2e-") as tmp,
            LoopbackDNS() as dns,
        ):
            directory = Path(tmp)
            sink = PostfixSink(children, directory)
            try:
                sink.start()
                dns.mx(DOMAIN, [(10, MX_HOST)])
                dns.a(MX_HOST, sink.host)
                bench = Bench(
                    sink=sink,
                    dns=dns,
                    children=children,
                    directory=directory,
                    timeout=args.timeout,
                    worker_log_level=args.worker_log_level,
                    logs=logs,
                )
                return run_all(console, bench, args, rows)
            finally:
                sink.stop()
    except KeyboardInterrupt:
        print("\ninterrupted: processes stopped, temporary files removed", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        logging.getLogger("mailstrom").removeHandler(logs)


def run_all(console: Console, bench: Bench, args: argparse.Namespace, rows: list[str]) -> int:
    n = args.messages
    emails = make_emails(n)
    now = datetime.now(UTC)
    prepared = [prepare(e, now=now) for e in emails]
    octets = sum(len(p.data) for p in prepared) // max(1, n)
    modes = worker_modes()
    console.print(
        f"mailstrom end to end vs Postfix smtp-source → smtp-sink (pid {bench.sink.pid}, "
        f"{bench.sink.host}:{bench.sink.port}); N={n}, {octets} octets per message, "
        f"1 recipient, {SESSIONS} sessions, "
        + ("one instrumented run" if args.profile or args.split else f"{args.repeat} runs per row")
        + "; worker modes "
        f"{', '.join(mode_label(m) for m in modes)}; {os.cpu_count()} CPUs, load average "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    )
    # Warm-up, not reported: imports, code paths, the sink's first connections.
    run_e2e(bench, make_emails(200, offset=8_000_000), threads=1, worker_mode=modes[0])
    bench.logs.take()

    if args.profile:
        return profile(console, bench, emails)
    if args.split:
        return split(console, bench, emails, modes)

    results: list[Row] = []
    reference = Row("reference", f"smtp-source -d -s {SESSIONS} -l {SIZE}")
    reference.runs = measure(args.repeat, lambda: run_reference(bench, n))
    results.append(reference)
    if "aiosmtplib" in rows:
        row = Row("aiosmtplib", f"aiosmtplib, {SESSIONS} reused connections")
        row.runs = measure(args.repeat, lambda: run_aiosmtplib(bench, prepared))
        results.append(row)
    if "deliver-thread" in rows:
        row = Row("deliver-thread", "deliver only, in-process worker")
        row.runs = measure(args.repeat, lambda: run_deliver_thread(bench, emails))
        results.append(row)
    if "deliver-process" in rows:
        row = Row("deliver-process", "deliver only, `mailstrom worker` process")
        row.runs = measure(args.repeat, lambda: run_deliver_process(bench, prepared))
        results.append(row)
    for threads, key in ((1, "e2e-1"), (4, "e2e-4")):
        if key not in rows:
            continue
        for mode in modes:
            row = Row(
                key,
                f"e2e, {threads} app thread{'s' if threads > 1 else ''}, worker={mode_label(mode)}",
            )
            row.runs = measure(
                args.repeat,
                lambda t=threads, m=mode: run_e2e(bench, emails, threads=t, worker_mode=m),
            )
            results.append(row)

    ref_rate = reference.median_rate()
    table = Table(
        title="msg/s (median of runs); ratio = msg/s ÷ smtp-source msg/s in this run",
        box=box.SIMPLE_HEAD,
    )
    for name in COLUMNS:
        table.add_column(name, justify="left" if name == "row" else "right", no_wrap=True)
    for row in results:
        add_row(table, row, ref_rate)
    console.print(table)
    console.print(
        "msg/s from 1st: (N-1) ÷ time after the first result (start-up left out). "
        "1st ms: clock start → first result (worker process: → the sink's first message).\n"
        "p50/p99: send_email call latency. max gap: longest time between two results "
        "(worker in this process only).\n"
        "record p99: the server's final reply → its result committed (rows whose results "
        "reach on_result): a crash in this window resends the message.\n"
        "Worker in another process (deliver process, worker=process): done when "
        "store.stats(), polled every 2 ms once the sink has N, counts all delivered.\n"
        "deliver process: the clock starts at spawn; the worker logs at "
        f"--log-level {args.worker_log_level}."
    )
    for row in results:
        print_notes(console, row.label, row.runs)

    if "wakeup" in rows:
        reference_ms = reference_latency(bench, args.wakeups)
        found = run_wakeup(bench, args.wakeups, args.pause, bound=min(args.timeout, 30.0))
        console.print(wakeup_table(found, reference_ms))
        console.print(
            f"{args.pause:g} s idle before each message; store.status polled every 1 ms; "
            "ratio = smtp-source's one-message time ÷ the row's median."
        )
        if found.stored_s:
            console.print(
                "each, enqueue → delivered (ms): "
                + " ".join(f"{1000 * x:.0f}" for x in found.stored_s),
                highlight=False,
            )
        if found.misses:
            console.print(f"  ! wake-up: {found.misses} messages not delivered within the bound")
        for note in found.notes:
            console.print(f"  ! wake-up: {note}", markup=False, highlight=False)
    console.print("Load average at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    return 0


def profile(console: Console, bench: Bench, emails: Sequence[Email]) -> int:
    from benchmarks.deliver import ThreadProfiler, print_profile

    profiler = ThreadProfiler(clock="cpu")
    run = run_deliver_thread(bench, emails, profiler=profiler)
    print_notes(console, "profiled deliver thread", [run])
    console.print(
        f"\n[bold]cProfile[/] of `deliver thread`: {run.messages} messages in "
        f"{run.seconds:.2f} s ({run.rate:,.0f} msg/s under the profiler; compare shares, "
        "not absolute times)"
    )
    print_profile(console, profiler, wall={"worker (event loop thread)": run.seconds})
    return 0


def split(
    console: Console, bench: Bench, emails: Sequence[Email], modes: Sequence[str | None]
) -> int:
    from benchmarks.send_split import STAGES, instrumented

    table = Table(
        title="one app thread's send_email, µs per message (wall clock, app thread only)",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("stage", no_wrap=True)
    for mode in modes:
        table.add_column(f"worker={mode_label(mode)}", justify="right", no_wrap=True)
    columns: list[dict[str, str]] = []
    for mode in modes:
        with instrumented() as times:
            run = run_e2e(bench, emails, threads=1, worker_mode=mode)
        print_notes(console, f"e2e 1 thread, worker={mode_label(mode)}", [run])
        per = times.per_message()
        cells = {}
        for stage in STAGES:
            cell = f"{per[stage]:,.0f}"
            directly = {"COMMIT (WAL write + fsync)": "transaction"}.get(stage, stage)
            found = times.quantiles(directly) if stage != "other" else None
            if found is not None:
                cell += f" (p50 {found[0]:,.0f}, p90 {found[1]:,.0f})"
            cells[stage] = cell
        cells["send_email"] = f"{sum(per.values()):,.0f}"
        cells["msg/s"] = f"{run.rate:,.0f}"
        columns.append(cells)
    for stage in (*STAGES, "send_email", "msg/s"):
        table.add_row(stage, *(cells[stage] for cells in columns))
    console.print(table)
    console.print(
        "COMMIT's p50/p90 are of the whole transaction (BEGIN, INSERT and COMMIT); "
        "other = send_email minus the stages above (group commit bookkeeping, calls)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

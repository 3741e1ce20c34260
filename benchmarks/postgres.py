"""PostgreSQL store: enqueue throughput, and delivery throughput with 1, 2, 4 worker processes.

Prints figures only (no assertions). Everything runs on this machine: a throwaway
PostgreSQL cluster (``tests.fixtures.postgres.ThrowawayPostgres``, run with ``fsync=off``
and ``synchronous_commit=off``, so commits cost less than on a production server), the
loopback DNS server, and the SMTP sink in its own process (:mod:`benchmarks.sink`).

* ``enqueue``: messages/s into a fresh database through ``PostgresStore.enqueue`` (one
  message per call and per transaction; one caller thread, then several threads sharing the
  store's pool) and through ``enqueue_many`` (batches of ``--batch`` messages per call).
* ``deliver``: ``mailstrom worker`` processes (the real command, as on separate hosts) share
  a fresh database; once they are listening, N messages are enqueued with ``enqueue_many``
  and the clock runs until the store's stats count all N recipients DELIVERED. ``msg/s`` is
  N over that time; ``scaling`` is relative to the 1-process row. Worker start-up is not
  timed. ``sink CPU`` is the sink's CPU time over the wall time: well below 100 % means the
  sink was not the bottleneck.

    .venv/bin/python benchmarks/postgres.py [-n 10000] [--processes 1,2,4] [--connections 16]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.postgres import ThrowawayPostgres

from benchmarks.sink import SinkProcess
from mailstrom import Email
from mailstrom.message import PreparedMessage, prepare
from mailstrom.status import RecipientState
from mailstrom.stores.postgres import PostgresStore

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("example.org", "example.net", "example.com", "example.edu")
"""Recipient domains, each with its own MX host name (all on 127.0.0.1), so a worker's
per-destination session limit does not cap it below --connections."""


def make_messages(count: int, size: int) -> list[PreparedMessage]:
    """``count`` distinct prepared messages of about ``size`` octets, one recipient each."""
    line = "The quick brown fox jumps over the lazy dog, again and again."
    text = "\n".join([line] * max(1, size // (len(line) + 2)))
    date = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    now = datetime.now(UTC)
    return [
        prepare(
            Email(
                from_="App <app@sender.test>",
                to=[f"user{i}@{DOMAINS[i % len(DOMAINS)]}"],
                subject=f"Benchmark message {i}",
                text=text,
                date=date,
                message_id=f"<pg-bench-{i}@sender.test>",
            ),
            now=now,
        )
        for i in range(count)
    ]


# --- enqueue ---------------------------------------------------------------------------------


def enqueue_single(url: str, messages: Sequence[PreparedMessage], threads: int) -> float:
    """Messages/s with ``threads`` threads each calling ``enqueue`` for its share."""
    with PostgresStore(url, max_size=max(10, threads)) as store:
        now = datetime.now(UTC)
        shares = [messages[i::threads] for i in range(threads)]
        barrier = threading.Barrier(threads + 1)

        def work(share: Sequence[PreparedMessage]) -> None:
            barrier.wait()
            for message in share:
                store.enqueue(message, now=now)

        workers = [threading.Thread(target=work, args=(s,)) for s in shares]
        for thread in workers:
            thread.start()
        barrier.wait()
        began = time.perf_counter()
        for thread in workers:
            thread.join()
        return len(messages) / (time.perf_counter() - began)


def enqueue_batches(store: PostgresStore, messages: Sequence[PreparedMessage], batch: int) -> None:
    now = datetime.now(UTC)
    for start in range(0, len(messages), batch):
        store.enqueue_many(messages[start : start + batch], now=now)


def enqueue_many_rate(url: str, messages: Sequence[PreparedMessage], batch: int) -> float:
    with PostgresStore(url) as store:
        began = time.perf_counter()
        enqueue_batches(store, messages, batch)
        return len(messages) / (time.perf_counter() - began)


# --- delivery --------------------------------------------------------------------------------


class WorkerProcess:
    """``python -m mailstrom worker`` with its log in a temporary file."""

    def __init__(self, env: dict[str, str], log: IO[str]) -> None:
        self.log = log
        # Logging at info, as deployed: one line per attempt (and "worker started", which
        # tells us the worker is listening).
        command = ["worker", "--no-live", "--log-format", "json"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailstrom", *command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )

    def started_or_exited(self) -> bool:
        if self.proc.poll() is not None:
            return True
        with open(self.log.name) as f:
            return '"worker started"' in f.read()

    def tail(self) -> str:
        with open(self.log.name) as f:
            return "".join(f.readlines()[-10:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll ``check`` until true or ``timeout`` (a benchmark may poll: it only measures,
    and the interval bounds the error of the delivery figure)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(interval)


@contextmanager
def workers(count: int, env: dict[str, str], directory: Path) -> Iterator[list[WorkerProcess]]:
    """``count`` worker processes, started and listening; SIGTERM-ed afterwards."""
    with ExitStack() as stack:
        logs = [
            stack.enter_context(open(directory / f"worker-{i}.log", "w+")) for i in range(count)
        ]
        procs = [WorkerProcess(env, log) for log in logs]
        try:
            for proc in procs:
                wait_until(proc.started_or_exited, 60, "a worker started")
                if proc.proc.poll() is not None:
                    raise RuntimeError(f"worker exited {proc.proc.returncode}:\n{proc.tail()}")
            yield procs
        finally:
            for proc in procs:
                code = proc.stop()
                if code != 0:
                    print(f"  ! worker exited {code}:\n{proc.tail()}", file=sys.stderr)


@dataclass(frozen=True, slots=True)
class DeliveryRun:
    processes: int
    messages: int
    enqueue_s: float
    total_s: float
    sink_messages: int
    sink_cpu: float

    @property
    def rate(self) -> float:
        return self.messages / self.total_s


def deliver_run(
    processes: int,
    *,
    url: str,
    messages: Sequence[PreparedMessage],
    batch: int,
    env: dict[str, str],
    sink: SinkProcess,
    directory: Path,
    timeout: float,
) -> DeliveryRun:
    with (
        PostgresStore(url) as store,
        workers(processes, {**env, "MAILSTROM_STORE": url}, directory),
    ):
        sink.reset()
        began = time.perf_counter()
        enqueue_batches(store, messages, batch)
        enqueued = time.perf_counter()

        def delivered() -> bool:
            return store.stats().by_state[RecipientState.DELIVERED] >= len(messages)

        wait_until(delivered, timeout, f"{len(messages)} recorded delivered", interval=0.05)
        finished = time.perf_counter()
        stats = sink.stats()
    return DeliveryRun(
        processes=processes,
        messages=len(messages),
        enqueue_s=enqueued - began,
        total_s=finished - began,
        sink_messages=stats.messages,
        sink_cpu=stats.cpu_seconds / (finished - began),
    )


def worker_env(sink: SinkProcess, dns: LoopbackDNS, args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    src = str(ROOT / "src")
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")])),
        MAILSTROM_HELO_NAME="bench.test",
        MAILSTROM_SMTP_PORT=str(sink.port),
        MAILSTROM_ALLOW_LOOPBACK="1",
        MAILSTROM_DNS_NAMESERVERS=dns.address,
        MAILSTROM_DNS_PORT=str(dns.port),
        MAILSTROM_MAX_CONNECTIONS=str(args.connections),
        MAILSTROM_MAX_PER_DESTINATION=str(max(1, args.connections // len(DOMAINS))),
        MAILSTROM_LEASE_BATCH=str(args.lease_batch),
    )
    return env


# --- main ------------------------------------------------------------------------------------


def parse_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=10000, help="messages per run")
    parser.add_argument("--processes", default="1,2,4", help="worker process counts (list)")
    parser.add_argument("--connections", type=int, default=16, help="SMTP sessions per worker")
    parser.add_argument("--lease-batch", type=int, default=500, help="recipients per lease")
    parser.add_argument("--batch", type=int, default=500, help="messages per enqueue_many")
    parser.add_argument("--threads", type=int, default=4, help="threads for threaded enqueue")
    parser.add_argument("--size", type=int, default=2000, help="approximate body octets")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run at most")
    args = parser.parse_args(argv)
    levels = parse_ints(args.processes)
    messages = make_messages(args.messages, args.size)
    octets = sum(len(m.data) for m in messages) // len(messages)

    with (
        ThrowawayPostgres() as pg,
        LoopbackDNS() as dns,
        SinkProcess(host="127.0.0.1") as sink,
        tempfile.TemporaryDirectory(prefix="mailstrom-bench-") as tmp,
    ):
        for i, domain in enumerate(DOMAINS):
            dns.mx(domain, [(10, f"mx{i}.test")])
            dns.a(f"mx{i}.test", "127.0.0.1")
        print(
            f"PostgreSQL store, {args.messages} messages of {octets} octets, 1 recipient each; "
            f"{os.cpu_count()} CPUs; server with fsync=off"
        )
        print()
        print("enqueue                               msg/s")
        rate = enqueue_single(pg.create_database(), messages, 1)
        print(f"  enqueue, 1 thread                {rate:10,.0f}")
        rate = enqueue_single(pg.create_database(), messages, args.threads)
        print(f"  enqueue, {args.threads} threads{'':<{16 - len(str(args.threads))}}{rate:10,.0f}")
        rate = enqueue_many_rate(pg.create_database(), messages, args.batch)
        label = f"enqueue_many, batches of {args.batch}"
        print(f"  {label:<31}{rate:10,.0f}")
        print()

        env = worker_env(sink, dns, args)
        print(
            f"deliver (enqueue_many → all recorded delivered; {args.connections} sessions "
            "per worker)"
        )
        print("  processes   enqueue s   total s      msg/s   scaling   sink msgs   sink CPU")
        base: float | None = None
        for count in levels:
            run = deliver_run(
                count,
                url=pg.create_database(),
                messages=messages,
                batch=args.batch,
                env=env,
                sink=sink,
                directory=Path(tmp),
                timeout=args.timeout,
            )
            base = base or run.rate
            print(
                f"  {run.processes:9d}   {run.enqueue_s:9.2f}   {run.total_s:7.2f}"
                f"   {run.rate:8,.0f}   {run.rate / base:6.2f}x   {run.sink_messages:9d}"
                f"   {run.sink_cpu:7.0%}"
            )


if __name__ == "__main__":
    main()

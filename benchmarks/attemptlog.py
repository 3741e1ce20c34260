"""Microseconds per attempt log line, as ``mailstrom worker`` writes them.

Each row logs ``--count`` realistic results through :func:`log_attempt` with the handler the
CLI's own ``configure_logging`` installs for the worker, writing to a file opened the way
stderr is (line-buffered text, so an unbuffered handler pays one write per line), and
prints CPU µs per line (this process's time, which other jobs on a shared machine disturb
less than wall time) and wall µs per line, medians of ``--runs``. The "delivered" rows are
the worker's steady state (INFO lines); "deferred" lines are WARNINGs, which are written
at once whatever the handler. Works against older checkouts too (their handler is the
plain one).

    .venv/bin/python benchmarks/attemptlog.py [--count 20000] [--runs 5] [--profile text]
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import logging
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TextIO

from mailstrom.cli.logs import configure_logging
from mailstrom.runtime.attemptlog import log_attempt
from mailstrom.status import (
    Attempt,
    AttemptOutcome,
    ReasonClass,
    RecipientState,
    SMTPReply,
)
from mailstrom.stores.base import RecipientResult

QUEUED = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def delivered(n: int) -> RecipientResult:
    return RecipientResult(
        message_id=f"0190f3a2c4e1b7d08a4f2c6e{n:08x}",
        address=f"customer{n}@example{n % 20}.org",
        lease_token="t1",
        state=RecipientState.DELIVERED,
        attempt=Attempt(
            at=QUEUED + timedelta(seconds=1.5 + n / 1000),
            outcome=AttemptOutcome.DELIVERED,
            duration=0.0123 + n % 7 / 1000,
            mx_host=f"mx{n % 3}.example{n % 20}.org",
            ip=f"192.0.2.{n % 200}",
            port=25,
            tls_version="TLSv1.3",
            tls_cipher="TLS_AES_256_GCM_SHA384",
            tls_policy="opportunistic",
            reply=SMTPReply(code=250, enhanced="2.0.0", text=f"Ok: queued as 4Vb{n:x}"),
        ),
        queued_at=QUEUED,
        size=1024 + n % 50,
        envelope_from="shop@example.com",
    )


def deferred(n: int) -> RecipientResult:
    at = QUEUED + timedelta(seconds=1.5 + n / 1000)
    return RecipientResult(
        message_id=f"0190f3a2c4e1b7d08a4f2c6e{n:08x}",
        address=f"customer{n}@example{n % 20}.org",
        lease_token="t1",
        state=RecipientState.DEFERRED,
        attempt=Attempt(
            at=at,
            outcome=AttemptOutcome.TEMPORARY,
            duration=0.25,
            mx_host=f"mx{n % 3}.example{n % 20}.org",
            ip=f"192.0.2.{n % 200}",
            port=25,
            reply=SMTPReply(code=451, enhanced="4.7.1", text="Greylisted, try later"),
            reason_class=ReasonClass.GREYLISTED,
        ),
        next_attempt_at=at + timedelta(minutes=5),
        queued_at=QUEUED,
        size=1024,
        envelope_from="shop@example.com",
    )


SHAPES: dict[str, Callable[[int], RecipientResult]] = {
    "delivered": delivered,
    "deferred": deferred,
}


def _stderr_like(path: str) -> TextIO:
    # As sys.stderr when redirected to a file: text, line-buffered, backslashreplace.
    return open(path, "w", buffering=1, encoding="utf-8", errors="backslashreplace")


def _configure(fmt: str, stream: TextIO) -> logging.Handler:
    params = inspect.signature(configure_logging).parameters
    if "buffered" in params:  # the worker's handler, where this checkout has one
        return configure_logging(fmt, stream=stream, buffered=True)
    return configure_logging(fmt, stream=stream)


def run(
    fmt: str, shape: str, count: int, profiler: cProfile.Profile | None = None
) -> tuple[float, float, int]:
    results = [SHAPES[shape](n) for n in range(count)]
    fd, path = tempfile.mkstemp(suffix=".log")
    os.close(fd)
    stream = _stderr_like(path)
    handler = _configure(fmt, stream)
    try:
        if profiler is not None:
            profiler.enable()
        cpu, wall = time.process_time(), time.perf_counter()
        for result in results:
            log_attempt(result)
        handler.flush()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if profiler is not None:
            profiler.disable()
    finally:
        handler.close()
        stream.close()
        logging.getLogger("mailstrom").handlers[:] = [logging.NullHandler()]
    with open(path, encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    os.unlink(path)
    if lines != count:
        raise SystemExit(f"{fmt} {shape}: wrote {lines} lines, expected {count}")
    return cpu / count * 1e6, wall / count * 1e6, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="lines per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per row (median)")
    parser.add_argument("--profile", choices=["text", "json"], help="cProfile one delivered run")
    args = parser.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        run(args.profile, "delivered", args.count, profiler)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return
    print(f"{'format':<6} {'shape':<10} {'CPU µs/line':>12} {'wall µs/line':>13}")
    for fmt in ("text", "json"):
        for shape in SHAPES:
            cpu, wall = [], []
            for _ in range(args.runs):
                c, w, _lines = run(fmt, shape, args.count)
                cpu.append(c)
                wall.append(w)
            print(
                f"{fmt:<6} {shape:<10} {statistics.median(cpu):>12.2f} "
                f"{statistics.median(wall):>13.2f}"
            )


if __name__ == "__main__":
    main()

"""A worker in a child process of the application (``Mailstrom(worker="process")``).

The parent starts ``python -m mailstrom.runtime.child`` and talks to it over its stdin and
stdout in length-prefixed pickled frames (both ends are mailstrom; nothing else writes
there). The parent sends a :class:`ChildSpec` first, then ``wake`` and ``stop`` frames;
the child answers ``ready``, then ``results`` (batched per loop turn), ``log`` records at
the levels the parent asked for, ``status`` snapshots, and ``stopped`` or ``error`` last.

The child runs in a session of its own, so a Ctrl-C meant for the application does not
cut its deliveries short: the parent stops it gracefully. If the parent dies, the child's
stdin reaches its end (or, should a process forked from the parent still hold that pipe,
the child sees itself adopted by another parent) and it stops as if asked, giving back
what it did not deliver. ``PR_SET_PDEATHSIG`` is not used: Linux sends it when the *thread*
that started the child ends, and a facade may well be started from a short-lived thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import IO, Any

from mailstrom.runtime.loops import run as run_loop
from mailstrom.runtime.pipes import ChildSpec, read_frame, result_to_wire, write_frame
from mailstrom.runtime.worker import Worker
from mailstrom.stores.base import RecipientResult, Store

_STATUS_EVERY = 0.5
"""Seconds between status snapshots sent to the parent."""
_PARENT_CHECK = 0.5
"""Seconds between looks at whether the parent is still there."""


class _Outbox:
    """Frames to the parent, from the worker's loop thread (and the logging handler)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._results: list[RecipientResult] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def send(self, kind: str, payload: Any = None) -> None:
        with self._lock, contextlib.suppress(BrokenPipeError, ValueError):
            write_frame(self._stream, kind, payload)

    def result(self, result: RecipientResult) -> None:
        # Called once per result on the loop: batch a loop turn's results in one frame.
        if not self._results:
            asyncio.get_running_loop().call_soon(self._flush)
        self._results.append(result)

    def _flush(self) -> None:
        batch, self._results = self._results, []
        if batch:
            self.send("results", [result_to_wire(r) for r in batch])


class _ForwardLogs(logging.Handler):
    def __init__(self, outbox: _Outbox) -> None:
        super().__init__()
        self._outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        fields = {
            "name": record.name,
            "levelno": record.levelno,
            "levelname": record.levelname,
            "msg": record.getMessage(),
            "created": record.created,
            "exc_text": self.format(record).partition("\n")[2] if record.exc_info else None,
        }
        for extra in ("fields", "event"):
            if hasattr(record, extra):
                fields[extra] = getattr(record, extra)
        self._outbox.send("log", fields)


def _watch_parent(parent: int, stop: Callable[[], None]) -> None:
    """Stop when this process is adopted by another parent: its own one died."""
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK)  # a timer: nothing to wait on for another process's death
    stop()


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames may reach the parent's pipe
    parent = os.getppid()
    outbox = _Outbox(stdout)
    try:
        # Unpickling the spec opens the store (a pickled store is the way to reopen it).
        frame = read_frame(stdin)
    except Exception as exc:
        outbox.send("error", f"{type(exc).__name__}: {exc}")
        return 1
    if frame is None or frame[0] != "spec":
        return 2
    spec: ChildSpec = frame[1]
    store: Store = spec.store
    config = spec.config
    if spec.tls is not None:
        config = replace(config, tls_context=spec.tls.build())
    package = logging.getLogger("mailstrom")
    package.addHandler(_ForwardLogs(outbox))
    package.propagate = False
    for name, level in spec.log_levels.items():
        logging.getLogger(name).setLevel(level)
    worker = Worker(config, store, on_result=outbox.result if spec.forward_results else None)

    def control() -> None:
        while (frame := read_frame(stdin)) is not None:
            kind, payload = frame
            if kind == "wake":
                worker.wake()
            elif kind == "stop":
                worker.request_stop(drain_timeout=payload)
                return
        worker.request_stop(drain_timeout=0)  # the parent is gone

    async def run() -> None:
        async def report() -> None:
            while True:
                outbox.send("status", worker.status)
                await asyncio.sleep(_STATUS_EVERY)  # a timer: periodic snapshots

        reporter: asyncio.Task[None] | None = None

        def started() -> None:
            nonlocal reporter
            reporter = asyncio.get_running_loop().create_task(report())
            outbox.send("ready")

        try:
            await worker.run(on_started=started)
        finally:
            if reporter is not None:
                reporter.cancel()

    threading.Thread(target=control, name="mailstrom-child-control", daemon=True).start()
    threading.Thread(
        target=_watch_parent,
        args=(parent, lambda: worker.request_stop(drain_timeout=0)),
        name="mailstrom-child-parent",
        daemon=True,
    ).start()
    # The parent stops us; a SIGTERM to our session drains quickly.
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop(drain_timeout=5.0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_loop(run(), config.event_loop)
    except BaseException as exc:
        outbox.send("status", worker.status)
        outbox.send("error", "".join(traceback.format_exception_only(exc)).strip())
        return 1
    finally:
        store.close()
    outbox.send("status", worker.status)
    outbox.send("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

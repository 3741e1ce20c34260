"""A worker in a child process of the application (``Mailstrom(worker="process")``).

The parent runs this module (``python -c BOOT mailstrom.runtime.child ROOT IN OUT``: see
:data:`mailstrom.client.process_start.BOOT`) and talks to it over the two pipes whose
descriptors these are, in length-prefixed pickled frames (both ends are
mailstrom; nothing else writes there: not its standard output, where an interpreter's
start-up, a library or a process it starts may write too). The parent sends a
:class:`ChildSpec` first, then ``wake``, ``ping`` and ``stop`` frames; the child answers
``ready``, then ``results`` (batched per loop turn), ``log`` records at the levels the parent
asked for, ``status`` snapshots, a ``pong`` for each ``ping`` (from the worker's event loop
once it runs, or from the thread reading the pipe while that loop waits in a store call:
a child whose loop is blocked elsewhere, or that is stopped, answers none, and its
parent kills it after :data:`~mailstrom.client.process.FROZEN_AFTER`), and ``stopped``
(with the name of the signal that stopped it, if one did) or ``error`` last (after
``cause``, the exception itself, when its store cannot be opened).

The child opens its store itself. While the database does not answer it answers ``ready``
all the same, with a status whose ``store_error`` says what it waits for, and keeps trying
with backoff (:mod:`mailstrom.runtime.store_opening`): the parent's ``start()`` returns, and
delivery begins by itself once the store opens. A ``stop`` frame ends the wait at once. A
store that waiting cannot mend (damaged, a newer schema, the database refusing the role)
ends the child with ``error`` instead.

The child runs in a session of its own, so a Ctrl-C meant for the application does not
cut its deliveries short: the parent stops it gracefully. If the parent dies, the child's
control pipe reaches its end (or, should a process forked from the parent still hold that pipe,
the child sees itself adopted by another parent) and it stops as if asked: its deliveries
in flight get the spec's ``orphan_drain`` to finish, and it gives back what it did not
deliver. ``PR_SET_PDEATHSIG`` is not used: Linux sends it when the *thread*
that started the child ends, and a facade may well be started from a short-lived thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import IO, Any

from mailstrom.config import Config
from mailstrom.errors import MailstromError
from mailstrom.runtime.loops import run as run_loop
from mailstrom.runtime.pipes import (
    ChildSpec,
    open_store,
    read_frame,
    result_to_wire,
    write_frame,
)
from mailstrom.runtime.store_opening import StoreOpener
from mailstrom.runtime.worker import Worker
from mailstrom.runtime.worker_stopping import sooner_end
from mailstrom.status import WorkerStatus
from mailstrom.stores.base import RecipientResult, Store

_STATUS_EVERY = 0.5
"""Seconds between status snapshots sent to the parent."""
_PARENT_CHECK = 0.5
"""Seconds between looks at whether the parent is still there."""
RESULTS_PER_FRAME = 1000
"""Results sent in one frame at most: a loop turn may end many more (``lease_batch`` has
no upper bound), and the parent reads no frame past
:data:`~mailstrom.runtime.pipes.MAX_FRAME`."""


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
        for at in range(0, len(batch), RESULTS_PER_FRAME):
            self.send("results", [result_to_wire(r) for r in batch[at : at + RESULTS_PER_FRAME]])


_ORIGIN = (
    *("pathname", "filename", "module", "lineno", "funcName", "stack_info"),
    *("process", "processName", "thread", "threadName"),
)
"""A log record's attributes saying where it was made."""


class _ForwardLogs(logging.Handler):
    def __init__(self, outbox: _Outbox) -> None:
        super().__init__()
        self._outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        # As every handler does: a record that cannot be formatted or sent (bad % args, an
        # extra that does not pickle) is logging's error to report, never an exception
        # raised into the worker code that logged it.
        try:
            fields = {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": record.getMessage(),
                "created": record.created,
                # Made from ``created`` as the record was: the parent's record would have
                # its own, of when it got the frame (a formatter's %(asctime)s shows msecs).
                "msecs": record.msecs,
                # The traceback alone: cut from the formatted record at its first line
                # end, it began with the rest of a message of several lines.
                "exc_text": _TRACEBACK.formatException(record.exc_info)
                if record.exc_info
                else None,
            }
            # Where it was made: the parent's record would say its own process (a
            # formatter's %(process)d named the application), and no file, line or
            # function at all.
            for extra in (*_ORIGIN, "fields", "event"):
                if hasattr(record, extra):
                    fields[extra] = getattr(record, extra)
            self._outbox.send("log", fields)
        except Exception:
            self.handleError(record)


_TRACEBACK = logging.Formatter()


def _watch_parent(parent: int, stop: Callable[[], None]) -> None:
    """Stop when this process is adopted by another parent: its own one died."""
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK)  # a timer: nothing to wait on for another process's death
    stop()


class _Control:
    """What the parent (or a signal) asks: of the store opener while the store is not
    open yet, of the worker once it exists. No locks: a signal handler calls :meth:`stop`,
    and the two writes below are ordered so that a stop racing :meth:`attach` still
    reaches the worker (each side writes its own attribute before reading the other's)."""

    def __init__(self, opener: StoreOpener, outbox: _Outbox) -> None:
        self._opener = opener
        self._outbox = outbox
        self.loop: asyncio.AbstractEventLoop | None = None
        """The worker's event loop while it runs: it answers the parent's pings."""
        self._worker: Worker | None = None
        self._stop_asked = False
        self._drain_timeout: float | None = 0.0
        self.stopped_by: str | None = None
        """The signal that stopped this child, told to the parent in ``stopped``: a
        child stopped from outside is not started again."""

    def attach(self, worker: Worker) -> None:
        self._worker = worker
        if self._stop_asked:
            worker.request_stop(drain_timeout=self._drain_timeout)

    def wake(self) -> None:
        if self._worker is not None:
            self._worker.wake()  # before, the worker leases as soon as it starts anyway

    def ping(self) -> None:
        """Answer the parent's ping from the worker's loop, or from here while there is
        none (the store not open yet, the worker ended) or while the loop waits in a store
        call (an SQLite write lock held elsewhere, for as long as ``busy_timeout`` says,
        which may be longer than :data:`~mailstrom.client.process.FROZEN_AFTER`): it is
        waiting, not frozen. A stopped child answers from no thread, nor one whose loop
        is blocked anywhere else."""
        loop = self.loop
        worker = self._worker
        if loop is not None and not (worker is not None and worker.in_store_call):
            try:
                loop.call_soon_threadsafe(self._outbox.send, "pong")
            except RuntimeError:  # closed meanwhile: the worker has ended
                pass
            else:
                return
        if loop is not None and worker is not None and worker.in_store_call:
            # The loop's snapshots stop meanwhile: one from here says since when it waits.
            # Read beside the loop, which may have left the call since: a snapshot that
            # fails so is skipped (the loop sends the next), never the pong, whose thread
            # would end with it and the parent kill a child that only waited.
            try:
                status: WorkerStatus | None = worker.status
            except Exception:
                status = None
            if status is not None:
                self._outbox.send("status", status)
        self._outbox.send("pong")

    def stop(self, drain_timeout: float | None) -> None:
        if not self._stop_asked or sooner_end(drain_timeout, self._drain_timeout):
            self._drain_timeout = drain_timeout  # the shortest asked for (see request_stop)
        self._stop_asked = True
        worker = self._worker
        if worker is not None:
            worker.request_stop(drain_timeout=drain_timeout)
        self._opener.stop()


def _stop_by_signal(control: _Control) -> None:
    control.stopped_by = "SIGTERM"
    control.stop(5.0)


def _waiting_status(opener: StoreOpener, started_at: datetime) -> WorkerStatus:
    """The status of a child still waiting for its store: running (it goes on by itself),
    with the reason in ``store_error``."""
    return WorkerStatus(running=True, started_at=started_at, store_error=opener.error)


def main() -> int:
    # A process starts with the signal mask of the thread that started it: a server's
    # thread blocking SIGTERM (leaving signals to its main thread) would leave this child
    # deaf to the operator's SIGTERM. Before the threads below, which inherit ours.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    control_fd, frames_fd = (int(arg) for arg in sys.argv[1:3])
    for fd in (control_fd, frames_fd):
        # The parent's alone: a process started from here must not keep them open (the
        # parent would not see this child's end, nor this child its parent's).
        os.set_inheritable(fd, False)
    stdin, stdout = open(control_fd, "rb"), open(frames_fd, "wb")  # noqa: SIM115
    parent = os.getppid()
    outbox = _Outbox(stdout)
    try:
        frame = read_frame(stdin)
    except Exception as exc:
        outbox.send("error", f"{type(exc).__name__}: {exc}")
        return 1
    if frame is None or frame[0] != "spec":
        return 2
    spec: ChildSpec = frame[1]
    config = spec.config
    if spec.tls is not None:
        config = replace(config, tls_context=spec.tls.build())
    package = logging.getLogger("mailstrom")
    package.addHandler(_ForwardLogs(outbox))
    package.propagate = False
    for name, level in spec.log_levels.items():
        logging.getLogger(name).setLevel(level)

    started_at = datetime.now(UTC)

    def waiting() -> None:
        # The status first: the parent's start() returns at "ready" and must not see a
        # worker running fine in between.
        outbox.send("status", _waiting_status(opener, started_at))
        if opener.error is not None:
            outbox.send("ready")

    opener = StoreOpener(functools.partial(open_store, spec), on_change=waiting)
    control = _Control(opener, outbox)

    def read_control() -> None:
        while (frame := read_frame(stdin)) is not None:
            kind, payload = frame
            if kind == "wake":
                control.wake()
            elif kind == "ping":
                control.ping()
            elif kind == "stop":
                # Read on: a second, shorter stop (a second stop() of the parent) comes
                # on this pipe, which the parent closes once this child has ended.
                control.stop(payload)
        control.stop(spec.orphan_drain)  # the parent is gone (after a stop: extends none)

    threading.Thread(target=read_control, name="mailstrom-child-control", daemon=True).start()
    threading.Thread(
        target=_watch_parent,
        args=(parent, lambda: control.stop(spec.orphan_drain)),
        name="mailstrom-child-parent",
        daemon=True,
    ).start()
    # The parent stops us; a SIGTERM to our session drains quickly.
    signal.signal(signal.SIGTERM, lambda *_: _stop_by_signal(control))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        store = opener.open()
    except Exception as exc:
        if isinstance(exc, MailstromError):  # ours pickle: the parent raises from it
            outbox.send("cause", exc)
        outbox.send("error", "".join(traceback.format_exception_only(exc)).strip())
        return 1
    if store is None:  # stopped before the store opened: nothing was leased
        outbox.send("status", WorkerStatus(running=False, started_at=started_at))
        outbox.send("stopped", control.stopped_by)
        return 0
    try:
        return _deliver(config, store, spec, outbox, control)
    finally:
        store.close()


def _deliver(
    config: Config, store: Store, spec: ChildSpec, outbox: _Outbox, control: _Control
) -> int:
    """Run the worker over the open ``store`` until it is stopped."""
    worker = Worker(
        config,
        store,
        on_result=outbox.result if spec.forward_results else None,
        holder=spec.holder,
    )
    control.attach(worker)

    async def run() -> None:
        control.loop = asyncio.get_running_loop()

        async def report() -> None:
            while True:
                await asyncio.sleep(_STATUS_EVERY)  # a timer: periodic snapshots
                outbox.send("status", worker.status)

        reporter: asyncio.Task[None] | None = None

        def started() -> None:
            nonlocal reporter
            # The status first, as while waiting for the store: the parent's start()
            # returns at "ready", and its status then said running since nobody knew
            # when (started_at None, every other field at its default) until the next.
            outbox.send("status", worker.status)
            reporter = asyncio.get_running_loop().create_task(report())
            outbox.send("ready")

        try:
            await worker.run(on_started=started)
        finally:
            control.loop = None
            if reporter is not None:
                reporter.cancel()

    try:
        run_loop(run(), config.event_loop, then=store.close)  # closed again by the caller
    except BaseException as exc:
        outbox.send("status", worker.status)
        outbox.send("error", "".join(traceback.format_exception_only(exc)).strip())
        return 1
    outbox.send("status", worker.status)
    outbox.send("stopped", control.stopped_by)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A worker child process's frames as they come: read from its pipe on a reader thread,
its results handed on to ``on_result`` on a thread of their own (in order; a slow
callback does not hold the pipe), its log records re-emitted here, its status kept, and
its end, once its stream ends, handed to the judgement of
:mod:`mailstrom.client.process_restart`.

Mixed into :class:`~mailstrom.client.process.WorkerProcess`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailstrom.client.process_restart import Restarting, at_rest
from mailstrom.client.process_watch import ChildWatch
from mailstrom.runtime.pipes import read_frame, result_from_wire
from mailstrom.runtime.worker_reporting import ends_the_program
from mailstrom.status import RecipientState
from mailstrom.stores.base import RecipientResult
from mailstrom.stores.url import redact_url

log = logging.getLogger("mailstrom.worker")

STREAM_END_GRACE = 5.0
"""Seconds a worker process has to exit once its frame stream has ended. A child's
stream ends as it exits (the kernel closes the pipe after its interpreter has shut
down), so one still running this long after has lost it (a library that closed or
redirected the descriptor): it would deliver unseen while its status said running,
until the frozen watch took it for frozen. It is killed then, and started again."""


class FrameReading(Restarting):
    """The reader thread's work, and the thread it hands results to; mixed into
    :class:`~mailstrom.client.process.WorkerProcess`."""

    _on_result: Callable[[RecipientResult], None] | None
    _write_lock: threading.RLock
    _reader: threading.Thread | None
    _passer: threading.Thread | None
    _ready: threading.Event
    _stopped: threading.Event
    _counts: dict[RecipientState, int]
    _busy: tuple[float, float | None]
    _cause: BaseException | None
    _spec_sent: bool

    if TYPE_CHECKING:

        @property
        def pid(self) -> int | None: ...

    def _busy_for(self) -> float:
        """Seconds the readers have spent handling frames so far (a full hand-off waits
        for ``on_result``), the current one's included."""
        total, since = self._busy
        return total if since is None else total + time.monotonic() - since

    def reading_on(self, thread: threading.Thread) -> bool:
        """Whether ``thread`` is one passing on the current child's results: its reader,
        or the thread it hands them to (where ``on_result`` runs)."""
        return thread is self._reader or (thread is self._passer and thread is not None)

    def _join_reader(self, reader: threading.Thread, limit: float | None) -> bool:
        """Wait for ``reader`` to end, for ever without ``limit``; with it, for as long
        as ``on_result`` goes on taking results: False once it took none for ``limit``
        seconds (the reader then ends by itself, after stop() returned).

        on_result may wait for this very stop() from its thread (an async facade's stop
        awaited there, its executor thread the one here; an application's thread the
        callback joins): identities tell nothing then, and each waited for the other for
        ever. A callback that is merely slow (a webhook) keeps taking results, and every
        one still reaches it before stop() returns."""
        if limit is None:
            reader.join()
            return True
        passed = sum(self._counts.values())
        while True:
            reader.join(limit)
            if not reader.is_alive():
                return True
            now = sum(self._counts.values())  # counted as each is handed to on_result
            if now == passed:
                log.error(
                    "on_result has taken nothing for %g s: stop() returns without waiting"
                    " for it (is it waiting for this stop()?); the results left follow"
                    " once it returns",
                    limit,
                )
                return False
            passed = now

    def _read(
        self,
        proc: subprocess.Popen[bytes],
        spec: bytes,
        handoff: Handoff | None,
        watch: ChildWatch,
    ) -> None:
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None
        followed = False
        try:
            try:
                # Here, not in _spawn under _lock: a spec larger than the pipe (a TLS
                # context's CA certificates) waits for the child to read it, which
                # start()'s timeout must bound; killing the child ends the write.
                stdin.write(spec)
                stdin.flush()
                os.set_blocking(stdin.fileno(), False)  # for _send's frames from now on
            except (OSError, ValueError):
                pass  # it is gone already: its end is read below
            else:
                if proc is self._proc:
                    self._spec_sent = True
            while (frame := read_frame(stdout)) is not None:
                kind, payload = frame
                started = time.monotonic()
                self._busy = (self._busy[0], started)
                try:
                    self._handle(kind, payload, handoff, watch)
                except Exception:
                    # A forwarded record the application's logging raises on (a filter,
                    # a handler): one frame is lost, not every later result and status.
                    log.exception("worker process: a %r frame could not be handled", kind)
                finally:
                    self._busy = (self._busy[0] + time.monotonic() - started, None)
            followed = True
        except Exception as exc:
            log.exception("worker process: unreadable frame")
            # Its death says why: a frame that cannot be read leaves the stream unfollowed.
            watch.killed_for = f"its frames could not be read ({exc})"
        finally:
            if not followed:
                # Nothing reads its pipe any more: left running, it would deliver
                # unseen while its status says running. Killed, its death is judged.
                log.error("worker process %d can no longer be followed; killing it", proc.pid)
                with contextlib.suppress(OSError):
                    proc.kill()
            stdout.close()
            try:
                proc.wait(STREAM_END_GRACE)
            except subprocess.TimeoutExpired:
                if self._stopping:
                    # Told to stop: its end may take longer (a slow interpreter shutdown
                    # on a busy host), and stop() bounds it and kills it past its grace.
                    proc.wait()
            if proc.returncode is None:
                # Its death says why (see STREAM_END_GRACE); the frozen watch, still on,
                # would have killed it only FROZEN_AFTER later, and called it frozen.
                watch.killed_for = "it closed its frame stream and went on running"
                log.error(
                    "worker process %d closed its frame stream and went on running; killing it",
                    proc.pid,
                )
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.wait()
            watch.end()  # nothing more to watch
            # Of no use now; and a fork must not take its number for ours. Unless stop()
            # closed it first: from a signal handler, it closes it and waits for this
            # thread while the thread it interrupted holds the lock (in wake()).
            while not stdin.closed:
                if self._write_lock.acquire(timeout=0.1):
                    try:
                        with contextlib.suppress(OSError):
                            stdin.close()
                    finally:
                        self._write_lock.release()
            if handoff is not None:
                # Every result reaches on_result before the child's end is judged (and
                # stop(), which joins this thread, returns).
                handoff.close()
                self._pass_on(handoff.wait_taken())
            with self._lock:
                if proc is self._proc:  # not a child stop() or start() has let go of
                    self._end_of(proc)

    def _end_of(self, proc: subprocess.Popen[bytes]) -> None:
        """The current child's stream has ended and it has exited (``_lock`` held)."""
        try:
            self._judge(proc)
        finally:
            self._coming_back = False  # it came back, or its end is what status says now
            # Nothing is in its hands now: a child killed (by stop() past the grace, by
            # a signal) sent no last status, and its last snapshot showed deliveries,
            # sessions and leases in flight for good. Its counts stay.
            carried, last = self._runs
            self._runs = (carried, at_rest(last))
            if proc.returncode and self._error is None and not self._stopping:
                # An intended stop that had to kill it is no death.
                self._error = f"worker process exited with status {proc.returncode}"
            elif self._error is None and not self._stopping and not self._ready.is_set():
                # Status 0 before its "ready", with start() still waiting (a restarted
                # one was judged above): no start either. It let start() return as if
                # it delivered, and such a child was started again and again.
                by = f", stopped by {self._stopped_by}" if self._stopped_by else ""
                self._error = f"worker process ended (status 0) before it was ready{by}"
            self._stopped.set()
            self._ready.set()  # wake a start() still waiting: it sees the error

    def _handle(self, kind: str, payload: Any, handoff: Handoff | None, watch: ChildWatch) -> None:
        if kind == "results":
            batch = [result_from_wire(wire) for wire in payload]
            # Handed to the thread calling on_result: read here, a slow callback left
            # the frames in the pipe, and the child's loop (every delivery of it) waited
            # to write the next ones once a hundred or so piled up.
            if handoff is None or not handoff.put(batch):
                self._pass_on(batch)
        elif kind == "pong":
            watch.answered = (time.monotonic(), self._busy_for())
        elif kind == "status":
            self._runs = (self._runs[0], payload)
        elif kind == "log":
            if logging.root.manager.disable >= payload["levelno"]:
                # Silenced here by logging.disable(), which Logger.handle() does not heed
                # (every logging call does): the child only knows the loggers' levels.
                return
            record = logging.makeLogRecord({})
            handled_at = record.created
            record.__dict__.update(payload)
            # Since logging was loaded here, as every record of this process counts it,
            # from the child's time: not from when this frame came through the pipe.
            record.relativeCreated += (record.created - handled_at) * 1000
            logging.getLogger(record.name).handle(record)
        elif kind == "ready":
            watch.up.set()
            self._came_up()
        elif kind == "error":
            # The child's last words, whatever raised them: a driver's error may quote
            # its connection string.
            self._error = redact_url(str(payload))
            self._reported_error = True
        elif kind == "cause":
            self._cause = payload
        elif kind == "stopped":
            # The end of the stream follows; a child stopped by a signal says which.
            self._stopped_by = payload if isinstance(payload, str) else None
            self._said_stopped = True

    def _pass_on(self, batch: list[RecipientResult]) -> None:
        """Count each result of ``batch`` and hand it to ``on_result``."""
        on_result = self._on_result
        for result in batch:
            self._counts[result.state] += 1
            if on_result is not None:
                try:
                    on_result(result)
                except BaseException as exc:  # on a thread of ours: see the function
                    if ends_the_program(exc):
                        raise
                    log.exception("on_result callback failed")

    def _pass_results(self, handoff: Handoff) -> None:
        """The thread calling ``on_result`` with what the reader hands it, in order."""
        try:
            while (batch := handoff.take()) is not None:
                self._pass_on(batch)
        finally:
            handoff.end()

    def _came_up(self) -> None:
        # Under _lock: a restart sets _coming_back and its error after the spawn, and
        # the new child's "ready" may arrive before that (the reader starts in _spawn).
        with self._lock:
            self._backoff.child_ready(now=time.monotonic())
            back, self._coming_back = self._coming_back, False
            if back:
                self._error = None
        if back:
            log.warning(
                "worker process started again (pid %s; %d restart%s so far)",
                self.pid,
                self._restarts,
                "" if self._restarts == 1 else "s",
            )
        self._ready.set()


class Handoff:
    """Results from a reader to the thread that calls ``on_result``: at most ``bound``
    wait (a batch is never split), past which :meth:`put` waits for room."""

    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._changed = threading.Condition()
        self._batches: deque[list[RecipientResult]] = deque()
        self._waiting = 0
        self._closed = False
        """The reader has put its last batch."""
        self._ended = False
        """The taker is gone (or never came): nothing more is taken."""
        self._warned = False
        self.taker: threading.Thread | None = None

    def put(self, batch: list[RecipientResult]) -> bool:
        """Hand ``batch`` on, once there is room; False when nothing takes it any more
        (the caller passes it on itself)."""
        with self._changed:
            while self._waiting >= self._bound and not self._ended:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "on_result is %d results behind: the worker process waits for it"
                        " to take some before it delivers more",
                        self._waiting,
                    )
                self._changed.wait()
            if self._ended:
                return False
            self._batches.append(batch)
            self._waiting += len(batch)
            self._changed.notify_all()
            return True

    def take(self) -> list[RecipientResult] | None:
        """The next batch; None once the reader closed and all were taken."""
        with self._changed:
            while not self._batches and not self._closed:
                self._changed.wait()
            if not self._batches:
                return None
            batch = self._batches.popleft()
            self._waiting -= len(batch)
            self._changed.notify_all()
            return batch

    def close(self) -> None:
        """The reader has no more: the taker ends once it has taken every batch."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def end(self) -> None:
        """The taker has ended (or never started): nothing waits for it any more."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_taken(self) -> list[RecipientResult]:
        """Wait until the taker has ended (after :meth:`close`), every batch passed on;
        what it left, should it have ended early, is returned."""
        with self._changed:
            while not self._ended:
                self._changed.wait()
            left = [result for batch in self._batches for result in batch]
            self._batches.clear()
        taker = self.taker
        if taker is not None and taker is not threading.current_thread():
            taker.join()  # ending now: no thread of ours outlives its reader
        return left

"""A stream handler that writes log lines in batches, for ``mailstrom worker``.

The worker logs one line per delivery, thousands a second. A plain
:class:`logging.StreamHandler` writes and flushes each record, and stderr is line-buffered
even when redirected, so each line costs a system call. This handler keeps lines in memory
and writes them in one go when:

- they pass ``max_chars`` (64 Ki characters, about 64 KiB of log text);
- a record of ``flush_level`` (WARNING) or above arrives, so trouble shows at once;
- ``interval`` (0.1 s) has passed since the first line still held, so an idle worker's
  last lines appear promptly;
- the handler is flushed or closed (``logging.shutdown`` does both at exit).

The interval is kept by one daemon thread that sleeps on an event while nothing is held:
an idle worker wakes it never, a busy one at most once per interval. A thread rather than a
callback on the worker's event loop, because a loop busy with a long step (or not yet
running, or stopped) would hold lines back; the thread flushes whatever the loop is doing.

A process killed outright (SIGKILL, a crash of the interpreter) loses the lines held, at
most ``max_chars`` and ``interval`` worth.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TextIO

MAX_CHARS = 64 * 1024
INTERVAL = 0.1
_FLUSHING = logging.makeLogRecord({"msg": "writing held log lines", "name": __name__})


class BufferedStreamHandler(logging.StreamHandler[TextIO]):
    """Like :class:`logging.StreamHandler`, writing held lines in batches (see the module)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        max_chars: int = MAX_CHARS,
        interval: float = INTERVAL,
        flush_level: int = logging.WARNING,
    ) -> None:
        super().__init__(stream)
        self.max_chars = max_chars
        self.interval = interval
        self.flush_level = flush_level
        self._lines: list[str] = []
        self._chars = 0
        self._held = threading.Event()  # set while lines are held: the timer's cue
        self._closing = threading.Event()
        self._timer: threading.Thread | None = None
        self._timer_pid = 0

    def emit(self, record: logging.LogRecord) -> None:
        # Called with self.lock held (Handler.handle).
        try:
            line = self.format(record) + self.terminator
            self._lines.append(line)
            self._chars += len(line)
            if record.levelno >= self.flush_level or self._chars >= self.max_chars:
                self._write_held()
            elif len(self._lines) == 1:
                self._start_timer()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write what is held. A stream that cannot take it (a pipe to a logger that
        restarted: BrokenPipeError; a full disk) loses the lines, reported as
        :meth:`emit` reports them, and raises nothing: the worker flushes as it starts and
        as it ends, and the error failed its start (it delivered nothing) or replaced
        its exit code."""
        self.acquire()
        try:
            self._write_held()
        except (OSError, ValueError):  # ValueError: the stream was closed
            self.handleError(_FLUSHING)
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self._closing.set()
            self._held.set()  # wake the timer so that it ends
            self._write_held()
        except (OSError, ValueError):
            pass  # the stream is closed or gone: nothing more can be written (as at shutdown)
        finally:
            timer, self._timer = self._timer, None
            self.release()
            super().close()
        if timer is not None and timer is not threading.current_thread():
            timer.join(timeout=1.0)

    def _write_held(self) -> None:
        # Under self.lock. One write for every line held, then the stream's own flush.
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()
            self._chars = 0
            if not self._closing.is_set():
                self._held.clear()
            self.stream.write(text)
        if hasattr(self.stream, "flush"):
            self.stream.flush()

    def _start_timer(self) -> None:
        # Under self.lock, when a first line is held. After a fork the child has the
        # handler but not the thread: start one there too.
        self._held.set()
        pid = os.getpid()
        if self._timer is None or self._timer_pid != pid:
            if self._closing.is_set():
                return  # closed: flushed by whoever closes it
            self._timer_pid = pid
            self._timer = threading.Thread(
                target=self._run_timer, name="mailstrom-log-flush", daemon=True
            )
            self._timer.start()

    def _run_timer(self) -> None:
        while not self._closing.is_set():
            self._held.wait()
            if self._closing.wait(self.interval):
                return  # close() writes what is held
            try:
                self.flush()
            except Exception:
                self.handleError(_FLUSHING)

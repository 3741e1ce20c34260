"""The watch over a worker child process: killed when it hangs at its start (no ``ready``
within the time it has) or, once up, leaves its parent's pings unanswered for
``FROZEN_AFTER`` seconds (:data:`mailstrom.client.process.FROZEN_AFTER`, where an
application or a test sets it). Its death is then judged as any other, and it is started
again after the restart backoff (:mod:`mailstrom.client.process_restart`). The time the
parent spends on the child's frames does not count: the child waits for it then.

Mixed into :class:`~mailstrom.client.process.WorkerProcess`.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

log = logging.getLogger("mailstrom.worker")

PING_EVERY = 5.0
"""Seconds between pings at most (a quarter of ``FROZEN_AFTER`` when that is less)."""


class ChildWatch:
    """What :meth:`Watching._watch_over` knows of one child."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        *,
        start_within: float | None,
        frozen_after: float,
    ) -> None:
        self.proc = proc
        self.start_within = start_within
        """Seconds it has to answer ``ready`` (None: start() bounds that itself)."""
        self.frozen_after = frozen_after
        """Seconds it may leave the pings unanswered once up."""
        self.up = threading.Event()
        """Its ``ready`` came, or its stream ended: its start is over."""
        self.done = threading.Event()
        """Its stream ended: the watch is over."""
        self.killed_for: str | None = None
        """Why the watch killed it."""
        self.answered = (0.0, 0.0)
        """When it last answered a ping (a monotonic clock's time), and the readers'
        :meth:`~mailstrom.client.process.WorkerProcess._busy_for` then."""
        self.thread: threading.Thread | None = None

    def hung_at_start(self) -> bool:
        return not self.up.is_set()

    def end(self) -> None:
        """The child's stream has ended: the watch ends too (waited for: no thread of
        ours outlives its reader)."""
        self.up.set()
        self.done.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class Watching:
    """The watcher thread's work; mixed into
    :class:`~mailstrom.client.process.WorkerProcess`."""

    _lock: threading.Lock
    _proc: subprocess.Popen[bytes] | None
    _stopping: bool

    if TYPE_CHECKING:

        def _busy_for(self) -> float: ...

        def _send(self, kind: str, payload: Any = None, *, wait: bool = True) -> None: ...

    def _watch_over(self, watch: ChildWatch) -> None:
        """Kill the child of ``watch`` when it hangs at its start (no ``ready`` within
        ``start_within`` seconds), or later leaves its pings unanswered for
        ``watch.frozen_after`` seconds: its death is then judged as any other, and it is
        started again after the backoff. Ends with the child's stream, or at stop()
        (which bounds the child's end itself)."""
        limit = watch.start_within
        if not watch.up.wait(limit):
            self._kill_hung(
                watch, f"no answer within {limit:g} s of its start", watch.hung_at_start
            )
            return
        frozen_after = watch.frozen_after
        every = min(PING_EVERY, frozen_after / 4)
        last = time.monotonic()
        watch.answered = (last, self._busy_for())

        def frozen() -> bool:
            at, busy = watch.answered
            return time.monotonic() - at - (self._busy_for() - busy) >= frozen_after

        while not watch.done.wait(every) and not self._stopping:
            now = time.monotonic()
            if now - last > 2 * every:
                # This process did not run meanwhile (stopped, suspended, starved): no
                # ping went out, and the child's answers wait unread.
                watch.answered = (now, self._busy_for())
            last = now
            self._send("ping", wait=False)
            if frozen():
                why = f"no answer to its pings for {frozen_after:g} s"
                self._kill_hung(
                    watch, f"{why} (frozen: stopped, or its event loop blocked)", frozen
                )
                return

    def _kill_hung(self, watch: ChildWatch, why: str, still: Callable[[], bool]) -> None:
        """Kill the child of ``watch`` for ``why``, if it is still the current one, no
        stop() came, and it ``still`` hangs (asked under ``_lock``)."""
        with self._lock:
            proc = watch.proc
            if proc is not self._proc or self._stopping or watch.done.is_set() or not still():
                return
            watch.killed_for = why  # for _judge, which names it as the death
            log.error("worker process %d: %s; killing it", proc.pid, why)
            with contextlib.suppress(OSError):
                proc.kill()  # its reader sees its end, and _judge starts another

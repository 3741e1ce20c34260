"""What a worker reports: its counters, :attr:`Worker.status`, and each recorded result
counted (metrics, the attempt log, ``on_result``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from mailstrom.runtime.attemptlog import log_attempt
from mailstrom.runtime.metrics import MetricsRecorder
from mailstrom.status import RecipientState, WorkerStatus
from mailstrom.stores.base import RecipientResult

if TYPE_CHECKING:
    from mailstrom.runtime.dispatch import Dispatcher
    from mailstrom.runtime.worker import _HeldBytes

log = logging.getLogger("mailstrom.worker")


@dataclass(slots=True)
class _Counters:
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    started_at: datetime | None = None
    last_activity_at: datetime | None = None
    error: str | None = None
    store_error: str | None = None
    store_errors: int = 0
    record_lag: float = 0.0
    clock_skew: float | None = None
    clock_warning: bool = False
    paused: str | None = None


class WorkerReporting:
    """The counters and what is read from them; mixed into :class:`Worker`."""

    metrics: MetricsRecorder
    holder: str
    _counters: _Counters
    _running: bool
    _stopping: bool
    _dispatcher: Dispatcher | None
    _pending: list[RecipientResult]
    _items: dict[tuple[str, str, str], int]
    _held_bytes: _HeldBytes
    _on_result: Callable[[RecipientResult], None] | None
    _cut_off: str | None
    store_call_since: float | None

    @property
    def status(self) -> WorkerStatus:
        c = self._counters
        dispatcher = self._dispatcher
        return WorkerStatus(
            running=self._running,
            started_at=c.started_at,
            error=c.error,
            in_flight=dispatcher.in_flight if dispatcher is not None else 0,
            delivered=c.delivered,
            deferred=c.deferred,
            failed=c.failed,
            last_activity_at=c.last_activity_at,
            store_error=c.store_error,
            store_wait_since=_since(self.store_call_since),
            unrecorded=len(self._pending),
            sessions=dispatcher.sessions if dispatcher is not None else 0,
            record_lag=c.record_lag,
            transactions=len(self._items),
            idle_connections=dispatcher.idle_connections if dispatcher is not None else 0,
            leased_bytes=self._held_bytes.now,
            leased_bytes_peak=self._held_bytes.peak,
            clock_skew=c.clock_skew,
            clock_warning=c.clock_warning,
            paused=c.paused or self._cut_off,
            stopping=self._running and self._stopping,
            holder=self.holder,
            metrics=self.metrics.snapshot(),
        )

    def _count(self, result: RecipientResult) -> None:
        c = self._counters
        c.last_activity_at = result.attempt.at
        self.metrics.observe(result)
        if result.state is RecipientState.DELIVERED:
            c.delivered += 1
        elif result.state is RecipientState.DEFERRED:
            c.deferred += 1
        else:
            c.failed += 1
        log_attempt(result)
        if self._on_result is not None:
            try:
                self._on_result(result)
            except BaseException as exc:
                # The application's callback: a bug in it must not stop every delivery
                # (a worker process logs it the same way, in the application).
                if ends_the_program(exc):
                    raise
                log.exception("on_result callback failed")


def ends_the_program(exc: BaseException) -> bool:
    """Whether ``exc``, raised by the application's ``on_result``, must leave it rather
    than be logged: a KeyboardInterrupt or SystemExit on the main thread, where a Ctrl-C
    lands wherever the code is (in the callback of a worker task, say) and asyncio itself
    lets both end the loop. On any other thread no signal lands, so they can only be the
    callback's own raise, a bug of it like any other: swallowing none of them ended the
    worker thread (or a worker process's reader), and mail was queued that nobody
    delivered."""
    return isinstance(exc, KeyboardInterrupt | SystemExit) and (
        threading.current_thread() is threading.main_thread()
    )


def _since(at: float | None) -> datetime | None:
    """``at`` (``time.time()``) as an aware UTC time."""
    return None if at is None else datetime.fromtimestamp(at, UTC)

"""How a worker calls its store: on its event loop or in a thread, with exponential
backoff between retries of a failing call, and the failure shown in its status until
the store works again.

The base of the worker's other parts (``worker_*.py``), all mixed into
:class:`~mailstrom.runtime.worker.Worker`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from mailstrom.errors import StoreCorrupt, StoreError, StoreRefusedData
from mailstrom.runtime.metrics import MetricsRecorder
from mailstrom.stores.base import RecipientResult, Store, bare_result
from mailstrom.stores.clock import ClockReading

if TYPE_CHECKING:
    from mailstrom.runtime.worker_reporting import _Counters

log = logging.getLogger("mailstrom.worker")

T = TypeVar("T")

_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 5.0
"""Bounds of the wait between retries of a failing store call."""

_POOL_REFUSALS = ("cannot schedule new futures", "can't register atexit after shutdown")
"""What CPython says when the thread pools refuse new work (see ``_off_loop``)."""


class _Backoff:
    """Exponential waits between retries of a failing store call, reset on success."""

    def __init__(self) -> None:
        self._next = _BACKOFF_FIRST

    def reset(self) -> None:
        self._next = _BACKOFF_FIRST

    def take(self) -> float:
        wait, self._next = self._next, min(self._next * 2, _BACKOFF_MAX)
        return wait


class WorkerStore:
    """The worker's store calls and its account of a failing store."""

    store: Store
    metrics: MetricsRecorder
    _clock: Callable[[], datetime]
    _inline: bool
    _counters: _Counters
    _wake: asyncio.Event | None
    _cut_call: asyncio.Future[Any] | None = None
    """The call of :meth:`_kept_call` last cancelled, still running or done."""
    _unusable: Exception | None = None
    """What a call beside the store loop's (a beat, an extension, a read of pauses) found:
    the store cannot be used and trying again will not help (a newer mailstrom migrated
    PostgreSQL's database, which a beat finds first), or a bug ended one of the worker's
    tasks beside the store loop (:meth:`_loop_ended`). The store loop ends the worker
    on it at once, as on one of its own calls' (see :meth:`_store_unusable`)."""

    _closing: bool

    store_call_since: float | None = None
    """When (``time.time()``) the event loop entered the store call made on it that it is
    still inside (memory, SQLite), None outside one: a wait the store itself bounds
    (SQLite's ``busy_timeout`` for a write lock held elsewhere), with the GIL released.
    Read from other threads: a worker process answers its parent's pings from its
    control thread meanwhile (:mod:`mailstrom.runtime.child`), the loop being busy
    waiting, not frozen, and the status says since when (``store_wait_since``)."""

    @property
    def in_store_call(self) -> bool:
        """Whether the event loop is inside a store call made on it (see above)."""
        return self.store_call_since is not None

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A task of the worker beside the store loop ended: one of its loops (the
        heartbeat, fencing, the clock check, the look for dead workers, the reads of
        pauses and broken TLS) or a postponement. Each handles a failing store itself: one
        that raised is a bug (or no thread could be started for a store call), which ends
        the worker as a bug of the store loop does, its status saying why. Unseen, the
        worker went on without it: a heartbeat ended so extended no lease again (another
        worker sent its mail a second time), and a postponement ended so left its
        recipients leased to this worker for as long as it ran."""
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        if exc is None:
            return  # done (no reaping, no TLS memory for this store; written)
        log.error("%s crashed: %s: %s", task.get_name(), type(exc).__name__, exc, exc_info=exc)
        if self._unusable is None:
            self._unusable = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
        if self._wake is not None:
            self._wake.set()

    async def _store_call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call the store: on this loop when its calls are short local work (memory,
        SQLite: no thread hand-off, and no waiting for the GIL behind the loop's own
        work), else in a thread (PostgreSQL: a network round trip; see
        :meth:`_off_loop`)."""
        if self._inline:
            return self._on_loop(method, *args, **kwargs)
        return await self._off_loop(method, *args, **kwargs)

    async def _off_loop(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``method`` in a thread of the loop's pool, or on this loop when the
        pools refuse new work: from the moment the main thread returns (CPython runs
        their exit hook then, before it waits for the program's other threads), so all
        the life of a program whose main starts a serving thread and returns, and at
        exit, before the atexit hook that drains a worker thread. The refusal ended the
        worker ("mailstrom worker died"), and a drain at exit recorded nothing (the
        next worker sent the mail again). It is known by its words only (CPython's
        flag is private): a pool refuses work, or the first pool's module cannot be
        imported then. It comes before the call is queued, so the call cannot run
        twice."""
        handed = self._hand_off(method, *args, **kwargs)
        if handed is None:
            return self._on_loop(method, *args, **kwargs)
        return await handed

    def _hand_off(
        self, method: Callable[..., T], *args: Any, **kwargs: Any
    ) -> asyncio.Future[T] | None:
        """``method`` called in a thread of the loop's pool; None when the pools refuse
        new work (see :meth:`_off_loop`)."""
        call = functools.partial(contextvars.copy_context().run, method, *args, **kwargs)
        try:
            return asyncio.get_running_loop().run_in_executor(None, call)
        except RuntimeError as exc:
            if not any(words in str(exc) for words in _POOL_REFUSALS):
                raise
            return None

    async def _kept_call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """:meth:`_store_call` for a write whose outcome must not be lost: cancelled while
        it runs in its thread (which a cancel does not stop), the caller finds the call,
        and what it comes to, in :attr:`_cut_call`."""
        self._cut_call = None
        handed = None if self._inline else self._hand_off(method, *args, **kwargs)
        if handed is None:
            return await self._store_call(method, *args, **kwargs)
        try:
            return await asyncio.shield(handed)
        except asyncio.CancelledError:
            self._cut_call = handed
            # Its outcome is looked at when settled; one never settled logs no "Future
            # exception was never retrieved" at the loop's end.
            handed.add_done_callback(_looked_at)
            raise

    def _on_loop(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self.store_call_since = time.time()
        try:
            return method(*args, **kwargs)
        finally:
            self.store_call_since = None

    def _store_unusable(self, exc: StoreError) -> None:
        """Have the store loop end the worker on ``exc`` when it is permanent
        (StoreCorrupt), at once: idle, it would otherwise take it for a passing trouble
        of another call until its own next call, as late as the next poll."""
        if isinstance(exc, StoreCorrupt) and self._unusable is None:
            self._unusable = exc
            if self._wake is not None:
                self._wake.set()

    async def _read_clock(
        self, measure: Callable[[Callable[[], datetime]], ClockReading]
    ) -> ClockReading:
        """This worker's clock read against the store server's (``measure``, the store's
        ``measure_clock``), counted as a clock check: StoreError, counted as store
        trouble, when the store does not answer."""
        try:
            reading = await self._store_call(measure, self._clock)
        except StoreError as exc:
            self._store_trouble("clock check", exc)
            raise
        self._store_fine("clock check")
        return reading

    def _store_trouble(self, doing: str, exc: StoreError) -> None:
        self._store_unusable(exc)
        c = self._counters
        first = c.store_error is None
        c.store_error = f"{doing}: {exc}"
        c.store_errors += 1
        self.metrics.store_errors += 1
        if first:
            log.warning("store failing (%s): %s; retrying with backoff", doing, exc)

    def _store_fine(self, doing: str | None = None, *, but: str | None = None) -> None:
        """A store call worked: the store is fine again. A call of another kind than the
        main loop's (``doing``: a clock check, a postponement) says so only of a failure
        of its own kind: a database can answer those while every write of results still
        fails (a lock held elsewhere, a full disk), and ``store_error`` is what tells. A
        record or a lease made apart (see ``Worker._store_loop``) says nothing of a
        failure of the other kind (``but``)."""
        c = self._counters
        error = c.store_error
        if (
            error is not None
            and (doing is None or error.startswith(f"{doing}: "))
            and (but is None or not error.startswith(f"{but}: "))
        ):
            log.warning("store working again after %d failed calls", c.store_errors)
            c.store_error = None
            c.store_errors = 0

    async def _record_apart(
        self, batch: list[RecipientResult], progress: RecordProgress | None = None
    ) -> tuple[int, list[RecipientResult], StoreError | None]:
        """Record, one at a time, a batch whose write the store refused, so that the
        result it refuses does not hold up the rest (nor the worker: it would be retried
        for ever). That result is recorded bare (:func:`bare_result`): its recipient's
        state is what counts.

        Returns how many results of ``batch`` (from its start) were written, the results
        as recorded, and the error that stopped the writing early: a passing one (the rest
        wait for the next write) or :class:`StoreCorrupt` when the store refuses even a
        bare result. ``progress``, when given, follows the writing as it goes (what a
        caller cancelled mid-way finds written)."""
        progress = RecordProgress() if progress is None else progress
        recorded = progress.recorded
        for done, result in enumerate(batch):
            try:
                try:
                    recorded += await self._store_call(self.store.record, [result])
                except StoreRefusedData as exc:
                    bare = bare_result(result, exc)
                    log.error(
                        "the store refused the result for %s of message %s (%s); "
                        "recorded without its details",
                        result.address,
                        result.message_id,
                        bare.attempt.error,
                    )
                    recorded += await self._store_call(self.store.record, [bare])
            except StoreRefusedData as exc:
                return done, recorded, StoreCorrupt(f"the store refuses even a bare result: {exc}")
            except StoreError as exc:
                return done, recorded, exc
            progress.done = done + 1
        return len(batch), recorded, None


@dataclass(slots=True)
class RecordProgress:
    """How far :meth:`WorkerStore._record_apart` got: results of its batch written (from
    its start), and those results as recorded."""

    done: int = 0
    recorded: list[RecipientResult] = field(default_factory=list)


def _looked_at(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()

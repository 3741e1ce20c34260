"""The asyncio worker: lease due work in batches, deliver it, record results in batches.

One worker runs one event loop. Three loops share it:

* **leasing** takes due recipients from the store in batches. After a small batch, while
  deliveries are in flight, it waits a few milliseconds so that the next lease collects
  what arrived meanwhile, instead of one write transaction per message. It never leases
  more than ``max(4 * max_connections, lease_batch)`` recipients ahead of delivery, and
  counts capacity per recipient: a stalled server holds only its own slots.
* **recording** writes results as soon as they exist, all that finished while the last
  write ran in one transaction (group commit), so the window in which a crash could make a
  delivered recipient be sent again stays one write long.
* **heartbeat** extends the leases of work still in progress, so that a slow delivery is
  not taken over by another worker.

The store may fail for a while (a database restart, a write lock held by another process):
the worker keeps every result in memory, retries with backoff and goes on by itself; it
stops only for a :class:`~mailstrom.errors.StoreCorrupt` store or a bug, and
:attr:`Worker.status` says so. When idle it sleeps until the next due time, a wake-up
(:meth:`wake`, or the store's ``watch`` callback when mail is enqueued, from any process for
stores that can tell), or ``Config.poll_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from mailstrom.config import Config
from mailstrom.errors import StoreCorrupt, StoreError
from mailstrom.routing import Router
from mailstrom.runtime.attemptlog import log_attempt
from mailstrom.runtime.dispatch import Dispatcher
from mailstrom.runtime.outcomes import Outcomes
from mailstrom.status import RecipientState, WorkerStatus
from mailstrom.stores.base import Lease, RecipientResult, Store

log = logging.getLogger("mailstrom.worker")

_COALESCE = 0.005
"""Seconds to let work accumulate before the next lease, after a small one."""
_SMALL_LEASE = 32
"""A lease of fewer recipients than this is small."""
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 5.0
"""Bounds of the wait between retries of a failing store call."""
_FINAL_RECORD = 30.0
"""Seconds a stopping worker keeps retrying a failing store, with no drain timeout set."""


def utc_now() -> datetime:
    return datetime.now(UTC)


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


@dataclass(slots=True, eq=False)
class _LeaseState:
    lease: Lease
    unrecorded: int


class _Backoff:
    """Exponential waits between retries of a failing store call, reset on success."""

    def __init__(self) -> None:
        self._next = _BACKOFF_FIRST

    def reset(self) -> None:
        self._next = _BACKOFF_FIRST

    def take(self) -> float:
        wait, self._next = self._next, min(self._next * 2, _BACKOFF_MAX)
        return wait


class Worker:
    """Delivers everything due in ``store`` until stopped.

    >>> worker = Worker(Config(), store)           # doctest: +SKIP
    >>> await worker.run()                         # doctest: +SKIP
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        router: Router | None = None,
        clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
        on_result: Callable[[RecipientResult], None] | None = None,
    ) -> None:
        """``on_result`` is called (on the worker's loop) with each result once the store
        has recorded it: a hook for metrics, logging or tests."""
        self.config = config
        self.store = store
        self._clock = clock
        self._router = router or Router.for_config(config)
        self._rng = rng or random.Random()
        self._on_result = on_result
        self._counters = _Counters()
        self._running = False
        self._stopping = False
        self._drain_timeout: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._results_ready: asyncio.Event | None = None
        self._dispatcher: Dispatcher | None = None
        self._leases: dict[str, _LeaseState] = {}
        self._pending: list[RecipientResult] = []
        self._starved = False
        self._fatal: BaseException | None = None
        self._stopped = threading.Event()

    # --- control, callable from any thread -------------------------------------------------

    def wake(self) -> None:
        """Look for due work now (thread-safe)."""
        loop, event = self._loop, self._wake
        if loop is None or event is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed since the check
            loop.call_soon_threadsafe(event.set)

    def request_stop(self, drain_timeout: float | None = None) -> None:
        """Stop leasing (thread-safe). In-flight deliveries get ``drain_timeout`` seconds
        to finish (None: as long as they take); what is unfinished then is given back to
        the store, due at once, and ``run`` returns."""
        self._drain_timeout = drain_timeout
        self._stopping = True
        self.wake()

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
            unrecorded=len(self._pending),
            sessions=dispatcher.sessions if dispatcher is not None else 0,
        )

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until ``run`` has returned (for whatever reason); False on timeout."""
        return self._stopped.wait(timeout)

    # --- the loops ---------------------------------------------------------------------

    async def run(
        self, *, once: bool = False, on_started: Callable[[], None] | None = None
    ) -> None:
        """Deliver until :meth:`request_stop`; with ``once``, until nothing is due now.

        ``on_started`` is called once the worker is set up and can take wake-ups.
        """
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._results_ready = asyncio.Event()
        self._running = True
        self._fatal = None
        self._stopped.clear()
        self._counters.started_at = self._clock()
        outcomes = Outcomes(self.config, clock=self._clock, rng=self._rng)
        dispatcher = self._dispatcher = Dispatcher(
            self.config, router=self._router, outcomes=outcomes, on_done=self._on_done
        )
        unwatch: Callable[[], None] | None = None
        recorder = asyncio.create_task(self._record_loop(), name="mailstrom-recorder")
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="mailstrom-heartbeat")
        try:
            unwatch = self.store.watch(self.wake)
            if on_started is not None:
                on_started()
            await self._lease_loop(dispatcher, recorder, once=once)
            await self._drain(dispatcher, self._drain_timeout)
        except BaseException as exc:
            self._counters.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            if unwatch is not None:
                unwatch()
            self._stopping = True
            await dispatcher.close()
            await self._finish_recording(recorder)
            await self._release_unfinished()
            self._running = False
            self._stopped.set()

    async def _lease_loop(
        self, dispatcher: Dispatcher, recorder: asyncio.Task[None], *, once: bool
    ) -> None:
        assert self._wake is not None
        config = self.config
        # Keep enough work in flight to fill every session, but no more: work leased and
        # waiting in memory is work no other worker can take.
        high_water = max(config.max_connections * 4, config.lease_batch)
        backoff = _Backoff()
        while not self._stopping:
            if self._fatal is not None:
                raise self._fatal
            if recorder.done():
                recorder.result()  # re-raises what stopped it
                raise RuntimeError("the result recorder stopped")
            self._wake.clear()
            room = high_water - dispatcher.in_flight
            self._starved = room <= 0
            lease = None
            if room > 0:
                try:
                    lease = await asyncio.to_thread(
                        self.store.lease,
                        now=self._clock(),
                        limit=min(room, config.lease_batch),
                        lease_for=config.lease_for,
                    )
                except StoreCorrupt:
                    raise
                except StoreError as exc:
                    self._store_trouble("lease", exc)
                    await self._sleep(backoff.take())
                    continue
                backoff.reset()
                self._store_fine()
            if lease is not None:
                count = self._start(lease, dispatcher)
                if count < _SMALL_LEASE and dispatcher.in_flight:
                    await asyncio.sleep(_COALESCE)  # a timer: let a batch gather
                continue
            if once and dispatcher.idle.is_set() and not self._pending:
                return
            dispatcher.prune()
            await self._sleep_until_due(dispatcher, once=once)

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def _sleep_until_due(self, dispatcher: Dispatcher, *, once: bool) -> None:
        assert self._wake is not None
        timeout = self.config.poll_interval
        if dispatcher.idle.is_set() and not self._starved:
            try:
                due = await asyncio.to_thread(self.store.next_due, now=self._clock())
            except StoreCorrupt:
                raise
            except StoreError as exc:
                self._store_trouble("next_due", exc)
                due = None
            if due is not None:
                timeout = min(timeout, max(0.0, (due - self._clock()).total_seconds()))
            elif once:
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    def _start(self, lease: Lease, dispatcher: Dispatcher) -> int:
        count = sum(len(item.recipients) for item in lease.items)
        self._leases[lease.token] = _LeaseState(lease=lease, unrecorded=count)
        for item in lease.items:
            dispatcher.submit(item)
        return count

    def _on_done(self, results: list[RecipientResult]) -> None:
        """An item's results: to the recorder at once (the duplicate window starts now)."""
        self._pending.extend(results)
        assert self._results_ready is not None
        self._results_ready.set()
        if self._starved and self._wake is not None:
            self._wake.set()  # room for more work

    async def _record_loop(self) -> None:
        """Write results in batches: whatever finished while the last write ran goes in
        the next one (group commit). A failing store is retried with backoff; results stay
        in memory meanwhile and are never dropped."""
        assert self._results_ready is not None
        backoff = _Backoff()
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    recorded = await asyncio.to_thread(self.store.record, batch)
                except StoreCorrupt as exc:
                    self._pending[:0] = batch
                    self._fatal = exc
                    self.wake()
                    return
                except StoreError as exc:
                    self._pending[:0] = batch
                    self._store_trouble("record", exc)
                    await asyncio.sleep(backoff.take())  # a timer between retries
                    continue
                except Exception as exc:  # a bug: stop the worker, say why
                    self._pending[:0] = batch
                    self._fatal = exc
                    self.wake()
                    return
                backoff.reset()
                self._store_fine()
                self._recorded(batch, recorded)
                dispatcher = self._dispatcher
                if dispatcher is not None and dispatcher.idle.is_set():
                    # Recorded results may have made work due (a retry soon): the lease
                    # loop, which slept without a due time while work was in flight, looks.
                    self.wake()
            if self._stopping and not self._pending:
                return

    def _recorded(self, batch: list[RecipientResult], recorded: list[RecipientResult]) -> None:
        ignored = len(batch) - len(recorded)
        for result in batch:
            state = self._leases.get(result.lease_token)
            if state is not None:
                state.unrecorded -= 1
                if state.unrecorded <= 0:
                    del self._leases[result.lease_token]
        if ignored:
            # The lease expired and another worker took these recipients over (or they
            # were cancelled): its outcome stands; the message may have gone out twice.
            log.warning("%d of %d results ignored: taken over or cancelled", ignored, len(batch))
        for result in recorded:
            self._count(result)

    def _count(self, result: RecipientResult) -> None:
        c = self._counters
        c.last_activity_at = result.attempt.at
        if result.state is RecipientState.DELIVERED:
            c.delivered += 1
        elif result.state is RecipientState.DEFERRED:
            c.deferred += 1
        else:
            c.failed += 1
        log_attempt(result)
        if self._on_result is not None:
            self._on_result(result)

    async def _heartbeat_loop(self) -> None:
        """Keep extending the leases of work still in progress, so that a delivery that
        takes long (slow peers, several MX hosts timing out) is not taken over and sent
        twice by another worker. A worker that dies stops extending, and its leases expire
        as before."""
        lease_for = self.config.lease_for
        interval = lease_for.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)  # a timer, not synchronisation
            until = self._clock() + lease_for
            for state in list(self._leases.values()):
                try:
                    await asyncio.to_thread(self.store.extend, state.lease, until=until)
                except StoreError as exc:  # a passing hiccup; the next beat tries again
                    self._store_trouble("extend", exc)

    def _store_trouble(self, doing: str, exc: StoreError) -> None:
        c = self._counters
        first = c.store_error is None
        c.store_error = f"{doing}: {exc}"
        c.store_errors += 1
        if first:
            log.warning("store failing (%s): %s; retrying with backoff", doing, exc)

    def _store_fine(self) -> None:
        c = self._counters
        if c.store_error is not None:
            log.warning("store working again after %d failed calls", c.store_errors)
            c.store_error = None
            c.store_errors = 0

    # --- stopping ----------------------------------------------------------------------

    async def _drain(self, dispatcher: Dispatcher, timeout: float | None) -> None:
        if not dispatcher.idle.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dispatcher.idle.wait(), timeout=timeout)

    async def _finish_recording(self, recorder: asyncio.Task[None]) -> None:
        """Let the recorder write what is pending, retrying a failing store for as long as
        the drain timeout allows; what still cannot be written is reported, not hidden."""
        assert self._results_ready is not None
        self._results_ready.set()
        timeout = self._drain_timeout if self._drain_timeout is not None else _FINAL_RECORD
        if not recorder.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(recorder), timeout=timeout)
            recorder.cancel()
        with contextlib.suppress(BaseException):
            await recorder
        if self._pending:
            log.error(
                "%d results could not be recorded before stopping; those recipients are "
                "tried again when their lease expires",
                len(self._pending),
            )

    async def _release_unfinished(self) -> None:
        """Give back, due at once, what was leased and never attempted. A lease holding
        results that could not be recorded is kept: releasing it would resend at once
        what may have been delivered; it expires instead."""
        unrecorded = {result.lease_token for result in self._pending}
        for state in list(self._leases.values()):
            if state.lease.token in unrecorded:
                continue
            try:
                await asyncio.to_thread(self.store.release, state.lease)
            except StoreError as exc:
                log.warning("could not give back lease %s: %s", state.lease.token, exc)
        self._leases.clear()

"""The asyncio worker: lease due work, deliver it concurrently, record results in batches.

One worker runs one event loop. It never polls busily: when nothing is due it sleeps until
the store's next due time, a wake-up (``wake()``, or the store's ``watch`` callback when mail
is enqueued), or ``Config.poll_interval`` — the fallback for stores that cannot tell about
other processes' changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mailstrom.config import Config
from mailstrom.routing import Router
from mailstrom.runtime.attemptlog import log_attempt
from mailstrom.runtime.delivery import Deliverer
from mailstrom.runtime.pool import ConnectionPool
from mailstrom.status import RecipientState, WorkerStatus
from mailstrom.stores.base import Lease, RecipientResult, Store, WorkItem

log = logging.getLogger("mailstrom.worker")


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


@dataclass(slots=True)
class _LeaseProgress:
    lease: Lease
    open_items: int
    pending: list[RecipientResult] = field(default_factory=list)


class Worker:
    """Delivers everything due in ``store`` until stopped.

    >>> worker = Worker(Config(), store)           # doctest: +SKIP
    >>> await worker.run_until_stopped()           # doctest: +SKIP
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
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._leases: dict[str, _LeaseProgress] = {}
        self._recorded: asyncio.Event | None = None
        self._recorder_closing = False
        self._drain_timeout: float | None = None
        self._stopped = threading.Event()

    # --- control, callable from any thread -----------------------------------------------

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
        return WorkerStatus(
            running=self._running,
            started_at=c.started_at,
            error=c.error,
            in_flight=sum(len(p.lease.items) for p in self._leases.values()),
            delivered=c.delivered,
            deferred=c.deferred,
            failed=c.failed,
            last_activity_at=c.last_activity_at,
        )

    # --- the loop ------------------------------------------------------------------------

    async def run(
        self, *, once: bool = False, on_started: Callable[[], None] | None = None
    ) -> None:
        """Deliver until :meth:`request_stop`; with ``once``, until nothing is due now.

        ``on_started`` is called once the worker is set up and can take wake-ups.
        """
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._recorded = asyncio.Event()
        self._recorder_closing = False
        self._running = True
        self._stopped.clear()
        self._counters.started_at = self._clock()
        config = self.config
        pool = ConnectionPool(
            max_connections=config.max_connections,
            max_per_destination=config.max_per_destination,
            max_messages_per_connection=config.max_messages_per_connection,
            idle_seconds=config.connection_idle,
        )
        deliverer = Deliverer(
            config, router=self._router, pool=pool, clock=self._clock, rng=self._rng
        )
        unwatch: Callable[[], None] | None = None
        recorder = asyncio.create_task(self._record_loop())
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        try:
            unwatch = self.store.watch(self.wake)
            if on_started is not None:
                on_started()
            await self._lease_loop(deliverer, pool, recorder, once=once)
            await self._drain(self._drain_timeout)
        except BaseException as exc:
            self._counters.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            if unwatch is not None:
                unwatch()
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._stopping = True
            # Not cancel(): a write in progress in its thread would go on unawaited, and
            # _release_unfinished could then give back recipients it is recording.
            self._recorder_closing = True
            self._recorded.set()
            await asyncio.gather(recorder, return_exceptions=True)
            await self._flush()
            await self._release_unfinished()
            await pool.close()
            self._running = False
            self._stopped.set()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until ``run`` has returned (for whatever reason); False on timeout."""
        return self._stopped.wait(timeout)

    async def _lease_loop(
        self,
        deliverer: Deliverer,
        pool: ConnectionPool,
        recorder: asyncio.Task[None],
        *,
        once: bool,
    ) -> None:
        assert self._wake is not None
        config = self.config
        # Keep enough work in flight to fill every session, but no more: work leased and
        # waiting in memory is work no other worker can take.
        high_water = max(config.max_connections * 4, config.lease_batch)
        while not self._stopping:
            if recorder.done():
                recorder.result()  # a store that cannot record must stop the worker
                raise RuntimeError("result recorder stopped")
            self._wake.clear()
            room = high_water - self._in_flight_recipients()
            lease = None
            if room > 0:
                lease = await asyncio.to_thread(
                    self.store.lease,
                    now=self._clock(),
                    limit=min(room, config.lease_batch),
                    lease_for=config.lease_for,
                )
            if lease is not None:
                self._start(lease, deliverer)
                continue
            if once and not self._tasks:
                return
            pool.prune()
            await self._sleep_until_due(once=once)

    def _in_flight_recipients(self) -> int:
        return sum(len(i.recipients) for p in self._leases.values() for i in p.lease.items)

    async def _sleep_until_due(self, *, once: bool) -> None:
        assert self._wake is not None
        timeout = self.config.poll_interval
        if not self._tasks:
            due = await asyncio.to_thread(self.store.next_due, now=self._clock())
            if due is not None:
                timeout = min(timeout, max(0.0, (due - self._clock()).total_seconds()))
            elif once:
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    def _start(self, lease: Lease, deliverer: Deliverer) -> None:
        self._leases[lease.token] = _LeaseProgress(lease=lease, open_items=len(lease.items))
        for item in lease.items:
            task = asyncio.create_task(self._deliver(lease, item, deliverer))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._wake is not None:
            self._wake.set()

    async def _deliver(self, lease: Lease, item: WorkItem, deliverer: Deliverer) -> None:
        try:
            results = await deliverer.deliver(item)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not lose the lease's other work
            log.exception("delivery of %s to %s crashed", item.message_id, item.domain)
            return
        progress = self._leases[lease.token]
        progress.pending.extend(results)
        progress.open_items -= 1
        assert self._recorded is not None
        self._recorded.set()

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
        takes long (slow peers, several MX hosts timing out, a queue behind one
        destination's session limit) is not taken over and sent twice by another worker.
        A worker that dies stops extending, and its leases expire as before."""
        lease_for = self.config.lease_for
        interval = lease_for.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)  # a timer, not synchronisation
            until = self._clock() + lease_for
            for progress in list(self._leases.values()):
                if not progress.open_items:
                    continue
                try:
                    await asyncio.to_thread(self.store.extend, progress.lease, until=until)
                except Exception:  # a passing store hiccup; the next beat tries again
                    log.warning("could not extend lease %s", progress.lease.token, exc_info=True)

    async def _record_loop(self) -> None:
        """Write results in batches: whatever finished while the last write ran goes in
        the next one (group commit), so the store sees one transaction per batch."""
        assert self._recorded is not None
        while True:
            await self._recorded.wait()
            self._recorded.clear()
            await self._flush()
            if self._recorder_closing:
                return

    async def _flush(self) -> None:
        for token, progress in list(self._leases.items()):
            batch, progress.pending = progress.pending, []
            if batch:
                recorded = await asyncio.to_thread(self.store.record, progress.lease, batch)
                if recorded < len(batch):
                    # The lease expired and another worker took these recipients over;
                    # its outcome stands (the message may have gone out twice).
                    log.warning(
                        "lease %s: %d of %d results ignored, taken over by another worker",
                        token,
                        len(batch) - recorded,
                        len(batch),
                    )
                for result in batch:
                    self._count(result)
            if progress.open_items == 0 and not progress.pending:
                del self._leases[token]
        if self._wake is not None:
            self._wake.set()

    async def _drain(self, timeout: float | None) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _release_unfinished(self) -> None:
        for progress in list(self._leases.values()):
            await asyncio.to_thread(self.store.release, progress.lease)
        self._leases.clear()

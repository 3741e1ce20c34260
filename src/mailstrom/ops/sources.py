"""What ``mailstrom worker --metrics`` serves, from before its store opens.

The command listens before it opens its store, so that while it waits for a database that
does not answer yet (PostgreSQL restarting, or not up at boot; see
:mod:`mailstrom.runtime.store_opening`) a probe or a scrape gets an answer that says so
rather than "connection refused", which it could not tell from a dead process:
``/healthz`` answers 503 with ``"status": "waiting"`` and the last error of the store,
``/metrics`` ``mailstrom_worker_up 0``, ``mailstrom_store_waiting 1`` and the failed tries
so far. The queue's counts need the store, so their families are left out until it opens
(as they are whenever the store does not answer).

Once the store opened, :meth:`WorkerSources.attach` hands over the worker and its store,
and both pages answer as they always did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from mailstrom.ops.server import Health, HealthCheck
from mailstrom.runtime.metrics import QueueStatsCache
from mailstrom.status import MetricsSnapshot, WorkerStatus
from mailstrom.stores.base import Store

if TYPE_CHECKING:
    from mailstrom.runtime.store_opening import StoreOpener
    from mailstrom.runtime.worker import Worker

WAITING = "the worker waits for its store to open"
"""The reason ``/healthz`` gives while the store is not open yet."""
NOT_ANSWERED = "opening the store: no answer yet"
"""The store's error before the first try has failed (or been slow)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreWait:
    """Whether a worker still waits for its store to open, and how many tries failed
    (the count stays once the store opened)."""

    waiting: bool
    failed_tries: int


class WorkerSources:
    """The sources of ``/metrics`` and ``/healthz`` for ``mailstrom worker``: a worker
    waiting for its store (``opener``) until :meth:`attach` hands over the worker.

    Callable from any thread: the server's thread reads one attribute that
    :meth:`attach` sets in one assignment, so it sees either the waiting worker or the
    running one, never half of each.

    >>> sources = WorkerSources(opener)   # doctest: +SKIP
    >>> OpsServer(host, port, snapshot=sources.snapshot, health=sources.health,
    ...           store_wait=sources.store_wait)   # doctest: +SKIP
    >>> sources.attach(worker, store)   # once the store opened  # doctest: +SKIP
    """

    def __init__(self, opener: StoreOpener) -> None:
        self._opener = opener
        self._attached: tuple[Callable[[], MetricsSnapshot], HealthCheck] | None = None

    def attach(self, worker: Worker, store: Store, *, queue: bool = True) -> None:
        """Serve ``worker`` and ``store`` from now on; without ``queue``, none of the
        store's counts (every worker on the store has the same: one may export them, and
        the others need not count the queue for each scrape)."""
        hook = worker.config.hook is not None
        cache = QueueStatsCache(store, hook_backlog=hook) if queue else None

        def snapshot() -> MetricsSnapshot:
            if cache is None:
                return MetricsSnapshot(worker=worker.status)
            stats, read_at, workers = cache.reading()
            return MetricsSnapshot(
                worker=worker.status, queue=stats, queue_read_at=read_at, workers=workers
            )

        health = HealthCheck(
            status=lambda: worker.status, responsive=worker.responsive, store=store
        )
        self._attached = (snapshot, health)

    def snapshot(self) -> MetricsSnapshot:
        """The worker's numbers; while it waits: not running, the store failing, no queue."""
        attached = self._attached
        if attached is not None:
            return attached[0]()
        return MetricsSnapshot(worker=WorkerStatus(running=False, store_error=self._error()))

    def health(self) -> Health:
        """The worker's health check; while it waits: failed, saying what it waits for."""
        attached = self._attached
        if attached is not None:
            return attached[1]()
        return Health(
            ok=False,
            details={
                "status": "waiting",
                "reason": WAITING,
                "time": datetime.now(UTC).isoformat(),
                "worker": {"running": False, "loop": "not started"},
                "store": {
                    "ok": False,
                    "error": self._error(),
                    "failed_tries": self._opener.failures,
                },
            },
        )

    def store_wait(self) -> StoreWait:
        """Whether the worker still waits for its store, for ``mailstrom_store_waiting``."""
        return StoreWait(waiting=self._attached is None, failed_tries=self._opener.failures)

    def _error(self) -> str:
        # The opener's error is one line with every password redacted (it is logged too).
        return self._opener.error or NOT_ANSWERED

"""What the worker counts about its own work, for ``WorkerStatus.metrics`` and Prometheus.

Plain integers and lists on the worker's loop, not metric objects with a lock each: the
worker observes every recorded result (about a microsecond) and copies the numbers into an
immutable :class:`~mailstrom.status.WorkerMetrics` only when someone asks (a status
snapshot, twice a second from a worker process; a scrape). Label values are bounded here,
where they are made, so a hostile or chatty peer cannot grow the number of series.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TypeVar

from mailstrom.errors import StoreError
from mailstrom.status import (
    QUEUE_SECONDS,
    AttemptOutcome,
    Histogram,
    QueueStats,
    RecipientState,
    WorkerMetrics,
)
from mailstrom.stores.base import RecipientResult, Store, domain_of
from mailstrom.stores.dead_holders import live_workers
from mailstrom.stores.url import redact_url

ATTEMPT_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Bucket bounds of the attempt-duration histogram: a loopback delivery takes
milliseconds, a distant server a second or two, a stalled one up to the RFC timeouts."""
OTHER = "other"
"""The label value that stands for everything outside a bounded set."""
NO_REASON = "none"
"""The reason class of an attempt that has none."""
MAX_REASON_CLASSES = 32
"""Distinct reason classes counted under their own name; later ones count as ``other``."""
_REASON_CLASS = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Label values by member: a dict lookup, not the enum's ``value`` property, per result.
_OUTCOME_LABELS = {outcome: outcome.value for outcome in AttemptOutcome}
_STATE_LABELS = {state: state.value for state in RecipientState}
K = TypeVar("K")
log = logging.getLogger("mailstrom.metrics")
READ_WAIT = 3.0
"""Seconds a caller of :class:`QueueStatsCache` waits for the store to give the queue's
counts before it takes the last reading (as ``/healthz`` waits for its store check)."""
READER = "mailstrom-queue-stats"
"""The name of the thread that reads the queue's counts for :class:`QueueStatsCache`."""
QueueReading = tuple[QueueStats | None, datetime | None, int | None]
"""One reading of :class:`QueueStatsCache`: the queue's counts, when they were read, and
how many workers run on the store."""


class _Buckets:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus' "le").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def freeze(self) -> Histogram:
        return Histogram(bounds=self.bounds, counts=tuple(self.counts), sum=self.total)


def reason_class_of(result: RecipientResult) -> str:
    """The reason class of a result's attempt (a :class:`ReasonClass`, or the plain string a
    hand-built attempt may carry), or ``none``."""
    value = result.attempt.reason_class
    if value is None:
        return NO_REASON
    return str(getattr(value, "value", value))


class MetricsRecorder:
    """Counts recorded results; :meth:`snapshot` gives the numbers as a value.

    ``domains`` are the destination domains counted under their own name (lower-case);
    every other domain counts as ``other``.
    """

    def __init__(self, *, domains: Iterable[str] = ()) -> None:
        self._domains = frozenset(d.lower() for d in domains)
        self._attempts: dict[tuple[str, str], int] = {}
        self._domain_results: dict[tuple[str, str], int] = {}
        self._durations: dict[str, _Buckets] = {}
        self._queue_delay = _Buckets(QUEUE_SECONDS)
        self._reasons: set[str] = set()
        self.store_errors = 0
        self.ignored_results = 0
        self.hook_events_sent = 0
        self.hook_failures = 0

    def observe(self, result: RecipientResult) -> None:
        """Count one result the store recorded."""
        attempt = result.attempt
        outcome = _OUTCOME_LABELS[attempt.outcome]
        key = (outcome, self._reason_label(reason_class_of(result)))
        self._attempts[key] = self._attempts.get(key, 0) + 1
        buckets = self._durations.get(outcome)
        if buckets is None:
            buckets = self._durations[outcome] = _Buckets(ATTEMPT_SECONDS)
        buckets.observe(attempt.duration)
        if result.state is RecipientState.DELIVERED and result.queued_at is not None:
            self._queue_delay.observe(max(0.0, (attempt.at - result.queued_at).total_seconds()))
        if self._domains:
            domain = domain_of(result.address)
            label = domain if domain in self._domains else OTHER
            dkey = (label, _STATE_LABELS[result.state])
            self._domain_results[dkey] = self._domain_results.get(dkey, 0) + 1

    def _reason_label(self, reason: str) -> str:
        if reason == NO_REASON or reason in self._reasons:
            return reason
        if len(self._reasons) >= MAX_REASON_CLASSES or not _REASON_CLASS.fullmatch(reason):
            return OTHER
        self._reasons.add(reason)
        return reason

    def snapshot(self) -> WorkerMetrics:
        """The numbers so far, as an immutable value (safe to hand to another thread)."""
        return WorkerMetrics(
            attempts=dict(self._attempts),
            domain_results=dict(self._domain_results),
            # list(): one step (no Python code runs in it, so no thread switch), where
            # iterating the dict itself fails when the loop adds an outcome meanwhile.
            attempt_duration={k: b.freeze() for k, b in list(self._durations.items())},
            queue_delay=self._queue_delay.freeze(),
            store_errors=self.store_errors,
            ignored_results=self.ignored_results,
            hook_events_sent=self.hook_events_sent,
            hook_failures=self.hook_failures,
        )


class QueueStatsCache:
    """``store.stats()`` read at most once per ``max_age`` seconds (thread-safe).

    Counting a queue of a million recipients takes a noticeable fraction of a second (an
    index scan on SQLite, see benchmarks/README.md), so scrapes and ``metrics()`` callers
    share one reading. A failing store gives None (and its error in :attr:`error`) rather
    than an exception: a metrics scrape should report the trouble, not fail with it.

    One caller reads at a time; a caller that comes while another reads takes the last
    reading (None before the first) at once rather than wait for it: a store that does
    not answer (a PostgreSQL server cut off by the network holds a read up to TCP's
    timeout, a minute) then holds the one reader, not every scrape behind it, which
    took every thread of the metrics server and refused ``/healthz`` with them.

    Nor does the reader wait longer than ``wait`` seconds: the read goes on in a thread of
    its own, and past that the reader too takes the last reading. A PostgreSQL server that
    is down held each read for the pool's whole timeout (30 s), and so every scrape that
    read, past Prometheus' own timeout (10 s) through the outage. The next read begins
    ``max_age`` seconds after the last one ended, so a store that fails is not asked again
    at every scrape, each of which had the pool try to reconnect.

    With ``hook_backlog`` (a worker with a hook) each reading also counts the events its
    outbox has not sent (:attr:`QueueStats.unsent_events`, an index read as long as the
    backlog); without, it stays None: with ``events`` on alone no hook sends them, and they
    are no backlog.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_age: float = 5.0,
        hook_backlog: bool = False,
        wait: float = READ_WAIT,
    ) -> None:
        self._store = store
        self._max_age = max_age
        self._wait = wait
        self._hook_backlog = hook_backlog
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._failed_with: type[Exception] | None = None
        _CACHES.add(self)  # renewed in a forked child (see _renew_after_fork)
        # The counts with their time and the workers, one value set once all are read: a
        # caller that does not wait for the reader sees the last reading or the new one,
        # never half of each (the new counts beside the last reading's workers).
        self._reading: QueueReading = (None, None, None)
        self._read_mono = -math.inf
        self.error: str | None = None

    def reading(self) -> QueueReading:
        """The queue's counts, when they were read, and how many workers run on the
        store, all of one reading (None, None, None if never read); the workers are None
        when the store cannot tell which run, or failed to, or did not give the counts."""
        self._refresh()
        return self._reading

    def get(self) -> tuple[QueueStats | None, datetime | None]:
        """The queue's counts and when they were read (None, None if never read)."""
        stats, read_at, _ = self.reading()
        return stats, read_at

    def workers(self) -> int | None:
        """How many workers run on the store, read with the counts (see :meth:`reading`;
        a snapshot takes both from one call of it)."""
        return self.reading()[2]

    def _refresh(self) -> None:
        if time.monotonic() - self._read_mono < self._max_age:
            return
        # The read under way is its thread, not a lock handed from the caller to it: a
        # process forked meanwhile (gunicorn --preload) kept that lock held for good,
        # with nobody to release it, and never read the queue again; and an interrupt in
        # Thread.start() released it twice, two reads at once. The lock here is held only
        # to look at the read under way and start the next (renewed in a forked child),
        # and never waited for: whoever holds it is starting a read, or finding one.
        if not self._lock.acquire(blocking=False):
            return
        try:
            reader = self._reader
            if reader is not None and reader.is_alive():
                return  # another caller's read: take the last reading
            if time.monotonic() - self._read_mono < self._max_age:
                return  # read meanwhile
            # A daemon thread: a read hanging on a dead database must not hold up exit.
            reader = self._reader = threading.Thread(target=self._read, name=READER, daemon=True)
            try:
                reader.start()
            except RuntimeError:
                # No thread to be had (a container's pids limit reached): the counts
                # are still read, here, under the lock, and unbounded, rather than every
                # scrape failing (a caller meanwhile takes the last reading).
                self._reader = None
                self._read()
                return
        finally:
            self._lock.release()
        reader.join(self._wait)

    def _after_fork(self) -> None:
        """In a forked child: no read of the parent's goes on here, and the lock may
        have been copied held."""
        self._lock = threading.Lock()
        self._reader = None

    def _read(self) -> None:
        try:
            self._do_read()
        except Exception as exc:
            # Not a StoreError (a driver's own, a bug): in the reading thread it went to
            # threading.excepthook at every read, and the last good counts stayed
            # exported with no error, for as long as it lasted.
            self._reading = (None, None, None)
            error = redact_url(f"{type(exc).__name__}: {exc}")
            if type(exc) is not self._failed_with:  # a bug, not an outage: said once
                log.warning("reading the queue's counts failed: %s", error, exc_info=True)
            self._failed_with = type(exc)
            self.error = error
        finally:
            # From the end of the read: one that failed after the pool's whole timeout
            # counts as recent, not as due again at once.
            self._read_mono = time.monotonic()

    def _do_read(self) -> None:
        try:
            stats = self._store.stats()
            if self._hook_backlog:
                stats = replace(stats, unsent_events=self._store.unsent_events())
            read_at = datetime.now(UTC)
        except StoreError as exc:
            self._reading = (None, None, None)
            self.error = str(exc)
            return
        # Only beside counts the store gave: SQLite finds its workers by their lock
        # files, which answer (none) even once the database file is gone, and a 0 there
        # would tell an alert that no worker runs when the store only did not answer.
        live = live_workers(self._store)
        self._reading = (stats, read_at, None if live is None else len(live))
        self.error = None
        # Only counts read end a fault: a store error between two of its reads (a flaky
        # outage) did, and each of them logged its traceback again.
        self._failed_with = None


_CACHES: weakref.WeakSet[QueueStatsCache] = weakref.WeakSet()
"""Every live :class:`QueueStatsCache`: one fork handler for all of them, since a handler
can never be removed (one per cache kept each cache's for the life of the process)."""


def _renew_after_fork() -> None:
    for cache in list(_CACHES):
        cache._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_after_fork)


def add_metrics(a: WorkerMetrics, b: WorkerMetrics) -> WorkerMetrics:
    """The numbers of ``a`` and ``b`` added up: what a facade reports for the worker
    processes it started one after another (each counts from 0)."""
    durations = dict(a.attempt_duration)
    for outcome, h in b.attempt_duration.items():
        durations[outcome] = _add_histograms(durations.get(outcome), h)
    queue_delay = a.queue_delay
    if b.queue_delay is not None:
        queue_delay = _add_histograms(queue_delay, b.queue_delay)
    return WorkerMetrics(
        attempts=_add_counts(a.attempts, b.attempts),
        domain_results=_add_counts(a.domain_results, b.domain_results),
        attempt_duration=durations,
        queue_delay=queue_delay,
        store_errors=a.store_errors + b.store_errors,
        ignored_results=a.ignored_results + b.ignored_results,
        hook_events_sent=a.hook_events_sent + b.hook_events_sent,
        hook_failures=a.hook_failures + b.hook_failures,
    )


def _add_counts(a: Mapping[K, int], b: Mapping[K, int]) -> dict[K, int]:
    total = dict(a)
    for key, n in b.items():
        total[key] = total.get(key, 0) + n
    return total


def _add_histograms(a: Histogram | None, b: Histogram) -> Histogram:
    if a is None or a.bounds != b.bounds:  # the bounds are constants: equal in one version
        return b
    counts = tuple(x + y for x, y in zip(a.counts, b.counts, strict=True))
    return Histogram(bounds=b.bounds, counts=counts, sum=a.sum + b.sum)

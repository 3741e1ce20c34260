"""Prometheus metrics from a :class:`~mailstrom.status.MetricsSnapshot` (needs the
``metrics`` extra: ``pip install 'mailstrom[metrics]'``).

The collector reads a snapshot when Prometheus scrapes and turns it into metric families;
nothing in the worker touches prometheus-client, and the numbers are the ones
``Mailstrom.metrics()`` returns. It goes into a registry of its own, never the process-wide
default one, so an application's own metrics and ours do not collide::

    from prometheus_client import CollectorRegistry
    from mailstrom.ops.exporter import MailstromCollector

    registry = CollectorRegistry()
    registry.register(MailstromCollector(ms.metrics))

Every label has a bounded set of values (see ``docs/guide.md``, "Metrics and health").
"""

from __future__ import annotations

import heapq
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from mailstrom._version import __version__
from mailstrom.arguments import check_limit, shown
from mailstrom.errors import InvalidArgument
from mailstrom.runtime.metrics import OTHER
from mailstrom.status import Histogram, MetricsSnapshot, RecipientState

if TYPE_CHECKING:
    from mailstrom.ops.sources import StoreWait

_STORE_WIDE = "; the whole store's, alike from every worker on it (aggregate with max)"
"""Said by the help of each family that counts the store rather than the worker: a
``sum()`` over the workers on one store counted the queue once per worker."""
TOP_DOMAINS = 10
"""Destination domains with the most pending recipients shown by name in
``mailstrom_queue_pending_recipients``; the rest add up under ``other``."""


def _histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    buckets = [("+Inf" if b == float("inf") else repr(b), float(n)) for b, n in h.cumulative()]
    family.add_metric(labels, buckets, sum_value=h.sum)


class MailstromCollector(Collector):
    """Metric families from ``snapshot()``, called once per scrape: a facade's
    ``metrics``, an :class:`~mailstrom.AsyncMailstrom`'s too (a scrape takes its reading
    without awaiting it); :class:`~mailstrom.errors.InvalidArgument` for what cannot be
    called, or another coroutine function.

    ``top_domains``: how many destination domains the pending-queue gauge names (an
    ``int`` from 0; :class:`~mailstrom.errors.InvalidArgument` otherwise).
    """

    def __init__(
        self, snapshot: Callable[[], MetricsSnapshot], *, top_domains: int = TOP_DOMAINS
    ) -> None:
        self._snapshot = plain_snapshot(snapshot)
        # Checked here, where the value enters: it is only sliced with at scrape time,
        # where a negative one quietly named the wrong domains and a float failed every
        # scrape.
        self._top = check_limit(top_domains, "top_domains")

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        status, m = snap.worker, snap.worker.metrics

        info = GaugeMetricFamily("mailstrom_info", "mailstrom version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "mailstrom_worker_up", "1 while the worker runs", value=int(status.running)
        )
        yield GaugeMetricFamily(
            "mailstrom_worker_draining",
            "1 while the running worker was asked to stop and finishes what it holds "
            "(it takes no new work; /healthz answers 503 draining)",
            value=int(status.running and status.stopping),
        )
        if status.started_at is not None:
            yield GaugeMetricFamily(
                "mailstrom_worker_start_time_seconds",
                "When the worker started (Unix time)",
                value=status.started_at.timestamp(),
            )

        attempts = CounterMetricFamily(
            "mailstrom_attempts",
            "Delivery attempts recorded, by outcome and reason class",
            labels=["outcome", "reason_class"],
        )
        for (outcome, reason), n in sorted(m.attempts.items()):
            attempts.add_metric([outcome, reason], n)
        yield attempts

        results = CounterMetricFamily(
            "mailstrom_results",
            "Recorded results by the recipient's new state: deliveries, deferrals, failures",
            labels=["state"],
        )
        results.add_metric([RecipientState.DELIVERED.value], status.delivered)
        results.add_metric([RecipientState.DEFERRED.value], status.deferred)
        results.add_metric([RecipientState.FAILED.value], status.failed)
        yield results

        if m.domain_results:
            by_domain = CounterMetricFamily(
                "mailstrom_domain_results",
                "Recorded results by configured destination domain (others: other) and state",
                labels=["domain", "state"],
            )
            for (domain, state), n in sorted(m.domain_results.items()):
                by_domain.add_metric([domain, state], n)
            yield by_domain

        durations = HistogramMetricFamily(
            "mailstrom_attempt_duration_seconds",
            "Seconds per delivery attempt, by outcome",
            labels=["outcome"],
        )
        for outcome, h in sorted(m.attempt_duration.items()):
            _histogram(durations, [outcome], h)
        yield durations

        if m.queue_delay is not None:
            delay = HistogramMetricFamily(
                "mailstrom_queue_delay_seconds",
                "Seconds from queueing to delivery, per delivered recipient",
            )
            _histogram(delay, [], m.queue_delay)
            yield delay

        for name, doc, value in (
            (
                "mailstrom_sessions",
                "SMTP sessions running (connecting or sending)",
                status.sessions,
            ),
            (
                "mailstrom_idle_connections",
                "SMTP connections kept for reuse",
                status.idle_connections,
            ),
            (
                "mailstrom_in_flight_transactions",
                "Work items (one SMTP transaction each) in delivery",
                status.transactions,
            ),
            ("mailstrom_in_flight_recipients", "Recipients in delivery", status.in_flight),
            (
                "mailstrom_unrecorded_results",
                "Results waiting in memory for the store",
                status.unrecorded,
            ),
            (
                "mailstrom_record_lag_seconds",
                "How long the oldest result of the last recorded batch waited for its record",
                status.record_lag,
            ),
            (
                "mailstrom_leased_bytes",
                "Octets of message data the worker's leases hold (Config.max_leased_bytes)",
                status.leased_bytes,
            ),
            (
                "mailstrom_store_up",
                "1 while the worker's store calls succeed",
                int(status.store_error is None),
            ),
            (
                "mailstrom_leasing_paused",
                "1 while the running worker takes no new work (its clock is too far from the "
                "store server's, or it has not reached its store for most of dead_after)",
                # Only while it runs: the reason stays in ``paused`` once the worker
                # ended (``--once`` exits 75 by it), and a stopped worker is not paused.
                int(status.running and status.paused is not None),
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        if status.clock_skew is not None:
            yield GaugeMetricFamily(
                "mailstrom_clock_skew_seconds",
                "Seconds the worker's clock is ahead of the store server's (negative: behind)",
                value=status.clock_skew,
            )
        for name, doc, count in (
            ("mailstrom_store_errors", "Store calls that failed and were retried", m.store_errors),
            (
                "mailstrom_ignored_results",
                "Results the store ignored (lease taken over, or cancelled)",
                m.ignored_results,
            ),
            ("mailstrom_hook_events_sent", "Events the hook acknowledged", m.hook_events_sent),
            ("mailstrom_hook_failures", "Hook requests that failed", m.hook_failures),
            (
                "mailstrom_worker_restarts",
                "Times the facade started its worker process again after it died",
                status.restarts,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=count)

        if snap.workers is not None:
            yield GaugeMetricFamily(
                "mailstrom_workers",
                f"Workers running on the store, as mailstrom workers lists them{_STORE_WIDE}",
                value=snap.workers,
            )
        yield from self._queue(snap)

    def _queue(self, snap: MetricsSnapshot) -> Iterator[Metric]:
        queue = snap.queue
        if queue is None:
            return
        by_state = GaugeMetricFamily(
            "mailstrom_queue_recipients",
            f"Recipients in the store by state{_STORE_WIDE}",
            labels=["state"],
        )
        for state in RecipientState:
            by_state.add_metric([state.value], queue.by_state.get(state, 0))
        yield by_state
        pending = GaugeMetricFamily(
            "mailstrom_queue_pending_recipients",
            f"Queued or deferred recipients of the {self._top} busiest destination domains "
            f"(the rest: other){_STORE_WIDE}",
            labels=["domain"],
        )
        busiest, rest = _busiest(queue.pending_by_domain, self._top)
        for domain, n in busiest:
            pending.add_metric([domain], n)
        if rest:
            pending.add_metric([OTHER], rest)
        yield pending
        yield GaugeMetricFamily(
            "mailstrom_queue_messages", f"Messages in the store{_STORE_WIDE}", queue.messages
        )
        yield GaugeMetricFamily(
            "mailstrom_queue_held_messages", f"Messages on hold{_STORE_WIDE}", queue.held
        )
        if queue.unsent_events is not None:
            yield GaugeMetricFamily(
                "mailstrom_hook_backlog_events",
                f"Events in the store's outbox the hook has not sent yet{_STORE_WIDE}",
                queue.unsent_events,
            )
        if snap.queue_read_at is not None:
            yield GaugeMetricFamily(
                "mailstrom_queue_read_time_seconds",
                f"When the queue counts were read from the store (Unix time){_STORE_WIDE}",
                value=snap.queue_read_at.timestamp(),
            )


def _busiest(pending: Mapping[str, int], top: int) -> tuple[list[tuple[str, int]], int]:
    """The ``top`` domains with the most pending recipients (most first, then by name)
    and what the others add up to.

    In one pass over the domains, not a sort of all of them: a scrape does this each
    time, in the worker's process, and a queue may hold a million domains (subdomains of
    a wildcard whose MX never answers), whose sort held the GIL for over a second.
    """
    # A recipient's domain may be "other" itself (a single label, as an address such as
    # user@other has): it counts with the rest, so that "other" is one series that
    # always means the rest, never a second one beside it (Prometheus keeps one sample
    # of a duplicated series and drops the other).
    named = ((d, n) for d, n in pending.items() if d != OTHER)
    busiest = heapq.nsmallest(top, named, key=lambda kv: (-kv[1], kv[0]))
    return busiest, sum(pending.values()) - sum(n for _, n in busiest)


def plain_snapshot(snapshot: object) -> Callable[[], MetricsSnapshot]:
    """``snapshot`` as a scrape calls it: once, without awaiting. An AsyncMailstrom's
    ``metrics`` is a coroutine function: each scrape got a coroutine, never awaited, and
    failed with an AttributeError. It only awaits its facade's blocking reading in a
    thread (thread-safe, as a Mailstrom's ``metrics`` is), which a scrape takes itself."""
    if inspect.iscoroutinefunction(snapshot):
        reading = getattr(getattr(snapshot, "__self__", None), "_metrics_snapshot", None)
        if callable(reading) and not inspect.iscoroutinefunction(reading):
            return reading  # type: ignore[no-any-return]
        raise InvalidArgument(
            f"snapshot: a coroutine function is called by each scrape, never awaited; pass a "
            f"plain function returning a MetricsSnapshot, got {shown(snapshot)}",
            argument="snapshot",
        )
    if not callable(snapshot):
        raise InvalidArgument(
            f"snapshot: expected a function returning a MetricsSnapshot, got {shown(snapshot)}",
            argument="snapshot",
        )
    return snapshot


class StoreWaitCollector(Collector):
    """Whether a worker still waits for its store to open, from ``store_wait()`` (what
    ``mailstrom worker --metrics`` adds: it serves before its store opens)."""

    def __init__(self, store_wait: Callable[[], StoreWait]) -> None:
        self._store_wait = store_wait

    def collect(self) -> Iterator[Metric]:
        wait = self._store_wait()
        yield GaugeMetricFamily(
            "mailstrom_store_waiting",
            "1 while the worker waits for its store to open (it delivers nothing meanwhile)",
            value=int(wait.waiting),
        )
        yield CounterMetricFamily(
            "mailstrom_store_open_failures",
            "Failed tries to open the store as the worker started",
            value=wait.failed_tries,
        )


def registry_for(
    snapshot: Callable[[], MetricsSnapshot],
    *,
    store_wait: Callable[[], StoreWait] | None = None,
) -> CollectorRegistry:
    """A registry of its own holding one :class:`MailstromCollector` (and a
    :class:`StoreWaitCollector` with ``store_wait``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MailstromCollector(snapshot))
    if store_wait is not None:
        registry.register(StoreWaitCollector(store_wait))
    return registry

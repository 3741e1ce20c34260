"""``/metrics`` while the PostgreSQL server is down: a scrape answers within seconds with
the worker's own numbers, rather than wait out the pool's timeout reading the queue's
counts (30 s by default, past Prometheus' 10 s scrape timeout: every scrape of the outage
failed, when the metrics mattered most).

The test stops a server of the module's own (``own_postgres``).
"""

from __future__ import annotations

import time

import pytest

from mailstrom.ops.server import Health, OpsServer
from mailstrom.runtime.metrics import QueueStatsCache
from mailstrom.status import MetricsSnapshot, WorkerStatus
from mailstrom.stores.postgres import PostgresStore
from tests.contract.support import NOW, message
from tests.fixtures.postgres import ThrowawayPostgres
from tests.support.ops_http import Samples, scrape, value
from tests.support.waiting import eventually

pytestmark = pytest.mark.postgres

POOL_WAIT = 6.0
"""The store's pool timeout here: longer than a scrape may take, shorter than the
default 30 s, so that the failed read ends within the test."""
MAX_AGE = 3.0
"""Long enough that a stalled machine does not start a new read before the second scrape."""
ANSWERED_WITHIN = 4.5
"""The longest a scrape may take: the 3 s the cache waits for the store, and some."""


def _timed_scrape(url: str) -> tuple[float, Samples]:
    began = time.monotonic()
    samples = scrape(url)
    return time.monotonic() - began, samples


def test_a_scrape_answers_within_seconds_while_postgres_is_down(
    own_postgres: ThrowawayPostgres,
) -> None:
    store = PostgresStore(own_postgres.create_database(), timeout=POOL_WAIT)
    cache = QueueStatsCache(store, max_age=MAX_AGE)

    def snapshot() -> MetricsSnapshot:
        stats, read_at, workers = cache.reading()
        return MetricsSnapshot(
            worker=WorkerStatus(running=True), queue=stats, queue_read_at=read_at, workers=workers
        )

    server = OpsServer(
        "127.0.0.1", 0, snapshot=snapshot, health=lambda: Health(ok=True, details={})
    )
    server.start()
    try:
        store.enqueue(message("a@example.org"), now=NOW)
        up = scrape(server.url)
        assert value(up, "mailstrom_queue_messages") == 1
        read_at = value(up, "mailstrom_queue_read_time_seconds")

        own_postgres.take_down()
        time.sleep(MAX_AGE)  # the reading ages: the next scrape reads the store again
        took, samples = _timed_scrape(server.url)
        assert took < ANSWERED_WITHIN, f"the scrape took {took:.1f} s"
        assert value(samples, "mailstrom_worker_up") == 1
        # The last reading, dated as such: the counts are not read anew.
        assert value(samples, "mailstrom_queue_read_time_seconds") == read_at

        # Once the read failed, the store's counts are left out, and a scrape within
        # max_age of the failure does not ask the store again.
        assert eventually(lambda: cache.error is not None, within=POOL_WAIT + 5)
        took, samples = _timed_scrape(server.url)
        assert took < 2.0, f"the scrape took {took:.1f} s"  # not the 3 s of a read
        assert value(samples, "mailstrom_worker_up") == 1
        assert not any(name.startswith("mailstrom_queue_messages") for name, _ in samples)
    finally:
        server.close()
        store.close()

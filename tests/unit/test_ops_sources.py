"""What ``mailstrom worker --metrics`` serves while it waits for its store, and after
(ops/sources.py); the HTTP side: tests/cli/test_worker_metrics_wait.py."""

from __future__ import annotations

from prometheus_client import generate_latest

from mailstrom.config import Config
from mailstrom.errors import StoreError
from mailstrom.ops.exporter import registry_for
from mailstrom.ops.server import Health
from mailstrom.ops.sources import NOT_ANSWERED, StoreWait, WorkerSources
from mailstrom.runtime.store_opening import StoreOpener
from mailstrom.runtime.worker import Worker
from mailstrom.status import MetricsSnapshot
from mailstrom.stores import MemoryStore
from mailstrom.stores.base import Store


class FailsOnce:
    """Fails once with ``error``, then opens a MemoryStore."""

    def __init__(self, error: StoreError) -> None:
        self.error = error
        self.tries = 0

    def __call__(self) -> Store:
        self.tries += 1
        if self.tries == 1:
            raise self.error
        return MemoryStore()


def test_before_the_first_try_the_worker_is_waiting() -> None:
    sources = WorkerSources(StoreOpener(FailsOnce(StoreError("x"))))
    health = sources.health()
    assert not health.ok
    assert health.details["status"] == "waiting"
    assert health.details["store"] == {"ok": False, "error": NOT_ANSWERED, "failed_tries": 0}
    assert sources.store_wait() == StoreWait(waiting=True, failed_tries=0)
    snap = sources.snapshot()
    assert not snap.worker.running and snap.worker.store_error == NOT_ANSWERED
    assert snap.queue is None


def test_while_waiting_the_last_error_is_served_without_its_password() -> None:
    """Seen by the opener's on_change, as a scrape would see it between two tries."""
    seen: list[tuple[Health, MetricsSnapshot, StoreWait]] = []
    error = StoreError("cannot reach postgresql://app:s3cret@db/mail: refused")

    def served() -> None:
        seen.append((sources.health(), sources.snapshot(), sources.store_wait()))

    opener = StoreOpener(FailsOnce(error), on_change=served)
    sources = WorkerSources(opener)
    store = opener.open()
    assert store is not None
    health, snap, wait = seen[0]
    assert health.details["store"] == {
        "ok": False,
        "error": "opening the store: cannot reach postgresql://app:***@db/mail: refused",
        "failed_tries": 1,
    }
    assert "s3cret" not in str(health.details) and "s3cret" not in str(snap)
    assert wait == StoreWait(waiting=True, failed_tries=1)
    store.close()


def test_once_attached_the_worker_and_its_store_are_served() -> None:
    opener = StoreOpener(FailsOnce(StoreError("refused")))
    sources = WorkerSources(opener)
    store = opener.open()
    assert store is not None
    try:
        sources.attach(Worker(Config(helo_name="client.test"), store), store)
        health = sources.health()
        # The worker's own check now: not started yet (it runs after attach), store ok.
        assert health.details["status"] == "fail"
        assert health.details["worker"]["loop"] == "stopped"
        assert health.details["store"] == {"ok": True}
        assert sources.snapshot().queue is not None
        assert sources.store_wait() == StoreWait(waiting=False, failed_tries=1)
    finally:
        store.close()


def test_the_wait_is_exported() -> None:
    def snapshot() -> MetricsSnapshot:
        return WorkerSources(StoreOpener(MemoryStore)).snapshot()

    text = generate_latest(
        registry_for(snapshot, store_wait=lambda: StoreWait(waiting=True, failed_tries=3))
    ).decode()
    assert "\nmailstrom_store_waiting 1.0\n" in text
    assert "\nmailstrom_store_open_failures_total 3.0\n" in text
    assert "\nmailstrom_worker_up 0.0\n" in text
    assert "\nmailstrom_store_up 0.0\n" in text
    # No reading of the queue (the worker's queue-delay histogram, empty, is none).
    assert "mailstrom_queue" not in text.replace("mailstrom_queue_delay_seconds", "")
    assert "mailstrom_store_waiting" not in generate_latest(registry_for(snapshot)).decode()

"""The worker's own counters (runtime/metrics.py) and the settings that shape them."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from tests.support.threads import refuse_thread

from mailstrom import Email, Mailstrom
from mailstrom.config import Config, HookConfig
from mailstrom.errors import ConfigError, StoreError
from mailstrom.ops.server import parse_listen
from mailstrom.runtime.metrics import MAX_REASON_CLASSES, READER, MetricsRecorder, QueueStatsCache
from mailstrom.settings import load_settings
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, WorkerStatus
from mailstrom.stores import MemoryStore
from mailstrom.stores.base import RecipientResult
from mailstrom.stores.dead_holders import DeadHolderReaper, HolderInfo

AT = datetime(2030, 1, 1, tzinfo=UTC)


def result(
    address: str = "bob@example.org",
    state: RecipientState = RecipientState.DELIVERED,
    *,
    duration: float = 0.3,
    reason_class: str | None = None,
) -> RecipientResult:
    outcome = {
        RecipientState.DELIVERED: AttemptOutcome.DELIVERED,
        RecipientState.DEFERRED: AttemptOutcome.TEMPORARY,
        RecipientState.FAILED: AttemptOutcome.PERMANENT,
    }[state]
    attempt: Attempt = Attempt(at=AT, outcome=outcome, duration=duration)
    if reason_class is not None:
        attempt = _WithReason(at=AT, outcome=outcome, duration=duration, reason_class=reason_class)
    return RecipientResult(
        message_id="m",
        address=address,
        state=state,
        attempt=attempt,
        lease_token="t",
        queued_at=AT - timedelta(seconds=90),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _WithReason(Attempt):
    """An attempt as it looks once attempts carry a reason class."""

    reason_class: str | None = None


def test_counts_and_histograms() -> None:
    m = MetricsRecorder(domains=["Example.ORG"])
    m.observe(result(duration=0.05))
    m.observe(result("carol@elsewhere.test", duration=0.07))
    m.observe(result(state=RecipientState.DEFERRED, duration=2.0, reason_class="rate_limited"))
    snap = m.snapshot()
    assert snap.attempts == {("delivered", "none"): 2, ("temporary", "rate_limited"): 1}
    assert snap.domain_results == {
        ("example.org", "delivered"): 1,
        ("other", "delivered"): 1,
        ("example.org", "deferred"): 1,
    }
    delivered = snap.attempt_duration["delivered"]
    assert delivered.count == 2
    # 0.05 is at most the first bound (le="0.05"); 0.07 in the next bucket.
    assert delivered.cumulative()[:2] == [(0.05, 1), (0.1, 2)]
    assert delivered.cumulative()[-1] == (float("inf"), 2)
    assert snap.queue_delay is not None
    assert (snap.queue_delay.count, snap.queue_delay.sum) == (2, 180.0)


def test_a_snapshot_taken_while_the_loop_counts_a_new_outcome_does_not_fail() -> None:
    """The worker's loop counts results while a scrape's thread takes a snapshot: the
    loop's first result of an outcome adds a histogram, and a snapshot iterating the
    histograms at that moment failed ("dictionary changed size during iteration"),
    failing the scrape (500) or the application's ``ms.metrics()``.

    The interleaving is made exact: a trace function runs the loop's ``observe`` in the
    middle of the snapshot, where a thread switch can put it."""
    m = MetricsRecorder()
    m.observe(result())
    injected = False

    def loop_runs_now(frame: FrameType, event: str, arg: object) -> Any:
        # At the first histogram's freeze(): half-way through the histograms.
        nonlocal injected
        if event == "call" and frame.f_code.co_name == "freeze" and not injected:
            injected = True
            m.observe(result(state=RecipientState.DEFERRED))
        return None

    sys.settrace(loop_runs_now)
    try:
        snap = m.snapshot()
    finally:
        sys.settrace(None)
    assert injected
    assert "delivered" in snap.attempt_duration


def test_reason_class_labels_are_bounded() -> None:
    m = MetricsRecorder()
    for i in range(MAX_REASON_CLASSES + 5):
        m.observe(result(state=RecipientState.FAILED, reason_class=f"class_{i}"))
    m.observe(result(state=RecipientState.FAILED, reason_class="Not A Class!"))
    labels = {reason for _, reason in m.snapshot().attempts}
    assert len(labels) == MAX_REASON_CLASSES + 1
    assert "other" in labels
    assert m.snapshot().attempts[("permanent", "other")] == 6


def test_no_domain_series_without_configured_domains() -> None:
    m = MetricsRecorder()
    m.observe(result())
    assert m.snapshot().domain_results == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9466", ("127.0.0.1", 9466)),
        (":9466", ("127.0.0.1", 9466)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:9466", ("::1", 9466)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:x", "1:70000", "[::1]"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(text)


@pytest.mark.parametrize("text", ["::1", "::", "fe80::1", "::1:9466", "::ffff:127.0.0.1:80"])
def test_parse_listen_wants_an_ipv6_address_in_brackets(text: str) -> None:
    """A bare IPv6 address was split at its last colon: "::1" became host ":" on port 1
    (a token demanded for a non-loopback host, then a bind failing on ":"), and whether
    "::1:9466" names port 9466 or the address ::1:9466 was a guess."""
    with pytest.raises(ValueError, match=r"HOST:PORT.*in brackets.*\[::1\]:9466"):
        parse_listen(text)


def test_settings_for_hooks_and_metrics() -> None:
    env = {
        "HOME": "/nonexistent",
        "MAILSTROM_HOOK_URL": "https://app.example/mail-events",
        "MAILSTROM_HOOK_SECRET": "s3cret-s3cret-s3cret",
        "MAILSTROM_HOOK_BATCH": "20",
        "MAILSTROM_HOOK_CONCURRENCY": "8",
        "MAILSTROM_METRICS_LISTEN": "127.0.0.1:9466",
        "MAILSTROM_METRICS_DOMAINS": "gmail.com, outlook.com",
    }
    s = load_settings(env=env, search=False)
    assert s.config.hook == HookConfig(
        url="https://app.example/mail-events",
        secret="s3cret-s3cret-s3cret",
        batch=20,
        concurrency=8,
    )
    assert s.config.outbox
    assert s.metrics_listen == "127.0.0.1:9466"
    assert s.config.metrics_domains == ("gmail.com", "outlook.com")
    assert "s3cret-s3cret-s3cret" not in repr(s) and "s3cret-s3cret-s3cret" not in repr(s.config)


def test_hook_needs_a_secret_and_a_web_url() -> None:
    env = {"HOME": "/nonexistent", "MAILSTROM_HOOK_URL": "https://app.example/h"}
    with pytest.raises(ConfigError, match=r"hook\.secret"):
        load_settings(env=env, search=False)
    with pytest.raises(ConfigError, match=r"hook\.url"):
        HookConfig(url="ftp://app.example/h", secret="x")
    assert not Config().outbox
    assert Config(events=True).outbox


@pytest.mark.parametrize("top_domains", [-1, 2.5, "10", True, None])
def test_the_exporter_refuses_a_top_domains_that_is_not_a_count(top_domains: Any) -> None:
    # Before, these were kept and sliced with at scrape time: -1 named every domain but
    # the last, 2.5 failed each scrape with a TypeError.
    from mailstrom.errors import InvalidArgument
    from mailstrom.ops.exporter import MailstromCollector
    from mailstrom.status import MetricsSnapshot, WorkerStatus

    def snapshot() -> MetricsSnapshot:
        return MetricsSnapshot(worker=WorkerStatus(running=False))

    with pytest.raises(InvalidArgument, match="top_domains") as raised:
        MailstromCollector(snapshot, top_domains=top_domains)
    assert raised.value.argument == "top_domains"
    assert MailstromCollector(snapshot, top_domains=0) is not None  # a count: all are other


async def test_the_exporter_takes_an_async_facades_metrics_as_the_guide_shows() -> None:
    """docs/guide.md exports ``MailstromCollector(ms.metrics)``; with an AsyncMailstrom,
    ``metrics`` is a coroutine function: each scrape got a coroutine (never awaited) and
    failed with "AttributeError: 'coroutine' object has no attribute 'worker'"."""
    from prometheus_client import CollectorRegistry

    from mailstrom import AsyncMailstrom
    from mailstrom.ops.exporter import MailstromCollector

    config = Config(helo_name="mail.example.com")
    async with AsyncMailstrom(config, store=MemoryStore(), worker="task") as ms:
        later = datetime.now(UTC) + timedelta(days=1)  # queued, not attempted
        email = Email(from_="app@sender.test", to=["bob@example.org"], text="x")
        await ms.send_email(email, send_at=later)
        registry = CollectorRegistry()
        registry.register(MailstromCollector(ms.metrics))
        assert registry.get_sample_value("mailstrom_worker_up") == 1
        assert registry.get_sample_value("mailstrom_queue_messages") == 1


def test_the_exporter_refuses_a_snapshot_it_cannot_call() -> None:
    """Any other coroutine function (or what cannot be called) failed each scrape, not
    where it was given."""
    from mailstrom.errors import InvalidArgument
    from mailstrom.ops.exporter import MailstromCollector
    from mailstrom.status import MetricsSnapshot, WorkerStatus

    async def snapshot() -> MetricsSnapshot:
        return MetricsSnapshot(worker=WorkerStatus(running=False))

    for bad in (snapshot, None, "metrics"):
        with pytest.raises(InvalidArgument, match="snapshot") as raised:
            MailstromCollector(bad)  # type: ignore[arg-type]
        assert raised.value.argument == "snapshot"


def test_configured_domains_count_recipients_as_the_store_spells_their_domain() -> None:
    """``metrics_domains`` were only lower-cased, while a recipient's domain is stored as
    an A-label without a final dot: a domain configured as ``Bücher.Example`` (or
    ``example.org.``, the absolute form) never matched one of its recipients, whose
    results all counted as ``other``."""
    config = Config(metrics_domains=("Bücher.Example", "example.org."))
    ms = Mailstrom(config, store=MemoryStore(), worker=None)
    sent = ms.send_email(
        Email(from_="app@sender.test", to=["Bob@Bücher.Example", "carol@EXAMPLE.org"], text="x")
    )
    stored = [r.address for r in ms.query_status(sent).recipients]
    m = MetricsRecorder(domains=config.metrics_domains)
    for address in stored:
        m.observe(result(address))
    assert m.snapshot().domain_results == {
        ("xn--bcher-kva.example", "delivered"): 1,
        ("example.org", "delivered"): 1,
    }


class _WorkersSlowToTell(MemoryStore):
    """A store that tells which workers run (as SQLite and PostgreSQL do), whose answer
    waits for ``released`` once ``slow`` is set (a PostgreSQL round trip)."""

    reap_every = 60.0
    dead_after = None

    def __init__(self) -> None:
        super().__init__()
        self.slow = False
        self.asked = threading.Event()
        self.released = threading.Event()

    def release_dead_holders(self, alive: str | None = None) -> int:
        return 0

    def live_holders(self, *, leases: bool = True) -> list[HolderInfo]:
        if self.slow:
            self.asked.set()
            assert self.released.wait(10)
        info = HolderInfo(holder="a", host=None, pid=None, started_at=None, seen_at=None, leased=0)
        return [info]


def test_a_snapshot_never_has_the_queue_counts_of_one_reading_and_the_workers_of_another() -> None:
    """The worker count is read with the queue's counts and left out with them
    (docs/guide.md), but the two were kept apart: a ``metrics()`` call made while another
    one was still asking which workers run got the new counts with the last reading's
    workers (none, before the first), and a scrape had queue counts without
    ``mailstrom_workers`` beside them, or the workers of five seconds before."""
    store = _WorkersSlowToTell()
    assert isinstance(store, DeadHolderReaper)
    ms = Mailstrom(Config(), store=store, worker=None)
    store.slow = True
    reader = threading.Thread(target=ms.metrics)
    reader.start()
    try:
        assert store.asked.wait(10)  # the counts are read; the workers are being asked
        snap = ms.metrics()  # takes the last reading at once
        assert (snap.queue is None) == (snap.workers is None), snap
    finally:
        store.released.set()
        reader.join(10)
    snap = ms.metrics()
    assert snap.queue is not None and snap.workers == 1


def test_the_queue_is_counted_when_no_thread_can_be_started_to_count_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The counts are read on a thread of their own, so that a store that does not answer
    holds no scrape past a few seconds; where no thread can be started (a pids limit)
    they are read by the caller, rather than every scrape failing."""
    store = MemoryStore()
    refuse_thread(monkeypatch, READER)
    stats, read_at = QueueStatsCache(store).get()
    assert stats is not None and stats.messages == 0 and read_at is not None


def test_every_exported_family_is_in_the_guides_table_and_every_one_there_is_exported() -> None:
    """docs/guide.md's table is where an operator looks up what a family means before
    writing an alert on it; ``mailstrom_queue_read_time_seconds`` (when the queue's
    counts were read: how stale they are) was exported but not in it."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from mailstrom.ops.exporter import registry_for
    from mailstrom.ops.sources import StoreWait
    from mailstrom.status import Histogram, MetricsSnapshot, QueueStats, WorkerMetrics
    from mailstrom.status import WorkerStatus as Status

    metrics = WorkerMetrics(
        attempts={("delivered", "none"): 1},
        domain_results={("example.org", "delivered"): 1},
        attempt_duration={"delivered": Histogram(bounds=(1.0,), counts=(1, 0), sum=0.5)},
        queue_delay=Histogram(bounds=(1.0,), counts=(1, 0), sum=0.5),
    )
    # Every family at once: the optional ones need a start, a skew, the queue (with a
    # hook's backlog) and workers.
    snapshot = MetricsSnapshot(
        worker=Status(running=True, started_at=AT, clock_skew=0.5, metrics=metrics),
        queue=QueueStats(
            by_state={}, pending_by_domain={"example.org": 1}, messages=1, unsent_events=2
        ),
        queue_read_at=AT,
        workers=1,
    )
    registry = registry_for(
        lambda: snapshot, store_wait=lambda: StoreWait(waiting=True, failed_tries=0)
    )
    text = generate_latest(registry).decode()
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
    }
    guide = (Path(__file__).parents[2] / "docs" / "guide.md").read_text()
    table = guide.partition("| metric | type | labels |")[2].partition("\n\n")[0]
    documented = set(re.findall(r"`(mailstrom_[a-z_]+)`", table))
    assert exported - documented == set()
    assert documented - exported == set()


def test_the_guides_metrics_example_runs_before_any_worker_has_counted() -> None:
    """docs/guide.md reads ``snap.worker.metrics.queue_delay.count`` straight off
    ``ms.metrics()``. Before a worker had reported (a queue-only facade, ``worker=None``,
    or a worker process in its first half second) ``queue_delay`` was None, where every
    other counter was empty, and the example failed with AttributeError."""
    from prometheus_client import CollectorRegistry

    from mailstrom.ops.exporter import MailstromCollector

    config = Config(helo_name="mail.example.com")
    with Mailstrom(config, store=MemoryStore(), worker=None) as ms:
        snap = ms.metrics()
        assert snap.worker.metrics.queue_delay is not None
        assert snap.worker.metrics.queue_delay.count == 0
        assert snap.worker.metrics.queue_delay.cumulative()[-1] == (float("inf"), 0)
        # The same family a worker exports, with nothing counted in it yet.
        registry = CollectorRegistry()
        registry.register(MailstromCollector(ms.metrics))
        assert registry.get_sample_value("mailstrom_queue_delay_seconds_count") == 0


@pytest.mark.parametrize(
    ("status", "draining"),
    [
        (WorkerStatus(running=True), 0),
        (WorkerStatus(running=True, stopping=True), 1),
        (WorkerStatus(running=False), 0),
    ],
    ids=["running", "draining", "stopped"],
)
def test_the_exporter_says_whether_the_worker_drains(status: WorkerStatus, draining: int) -> None:
    """``mailstrom_worker_up`` stays 1 until a worker told to stop has drained, and no
    family said it was going away: ``mailstrom_worker_draining`` is 1 meanwhile, from the
    ``stopping`` that makes /healthz answer 503 "draining"."""
    from mailstrom.ops.exporter import registry_for
    from mailstrom.status import MetricsSnapshot

    registry = registry_for(lambda: MetricsSnapshot(worker=status))
    assert registry.get_sample_value("mailstrom_worker_draining") == draining
    assert registry.get_sample_value("mailstrom_worker_up") == int(status.running)


class _SlowStats(MemoryStore):
    """Its first count waits for ``go``; ``fail`` makes counts raise instead."""

    fail: Exception | None = None

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def stats(self) -> Any:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            self.go.wait(10)
        if self.fail is not None:
            raise self.fail
        return super().stats()


def test_an_error_that_is_no_store_error_is_told_and_the_counts_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The counts are read in a thread of their own: an error there that is no
    StoreError (a driver's own, a bug) went to threading.excepthook at every read, and
    the last good counts stayed, with no error, for as long as it lasted."""
    store = _SlowStats()
    store.go.set()
    cache = QueueStatsCache(store, max_age=0)
    assert cache.get()[0] is not None
    with caplog.at_level(logging.WARNING, logger="mailstrom.metrics"):
        for n in range(3):  # the same fault, in words that differ at each read
            store.fail = ValueError(f"the driver broke on row {n}")
            assert cache.get() == (None, None)
            store.fail = StoreError("the pool timed out")  # a flaky outage between
            assert cache.get() == (None, None)
        store.fail = ValueError("the driver broke on row 2")
        assert cache.get() == (None, None)
    assert cache.error == "ValueError: the driver broke on row 2"
    said = [r for r in caplog.records if "reading the queue's counts failed" in r.message]
    assert len(said) == 1 and said[0].exc_info is not None  # once, with its traceback


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_process_forked_while_the_counts_are_read_reads_them_itself() -> None:
    """The caller waits a while for the read and then takes the last reading, the read
    going on in its thread. A process forked meanwhile (gunicorn --preload) kept the
    lock that read held, with no thread to release it: the child never read the queue
    again. Now the child, where that thread is not alive, reads for itself."""
    store = _SlowStats()
    cache = QueueStatsCache(store, max_age=0, wait=0.05)
    assert cache.get() == (None, None)  # the read waits for go, in its thread
    assert store.entered.wait(10)  # there, whatever the machine's load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # the child: counts within a few reads (its first count is its own), or 1
        try:
            ok = any(cache.get()[0] is not None or time.sleep(0.2) for _ in range(25))
        finally:
            os._exit(0 if ok else 1)
    store.go.set()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_process_forked_while_a_read_is_being_started_reads_all_the_same() -> None:
    """Another thread holds the cache's lock for the moment it takes to start a read when
    the process forks: the child's copy of the lock was held for good, and its every
    reading waited for it, or gave nothing, for the life of the process."""
    store = _SlowStats()
    store.go.set()
    cache = QueueStatsCache(store, max_age=0)
    with cache._lock, warnings.catch_warnings():  # as that thread holds it
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
        if pid == 0:
            signal.alarm(5)  # a child that waits for the lock is killed, not left hanging
            os._exit(0 if cache.get()[0] is not None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

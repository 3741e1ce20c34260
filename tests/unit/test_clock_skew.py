"""Clock skew between a worker and its store's server: the measurement's arithmetic, the
thresholds, and the worker's reaction, against a memory store whose "server" clock is the
real one (tests/support/skew.py; PostgreSQL: tests/integration/test_postgres_clock_skew.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import loopback_config
from tests.support.skew import ClockedMemoryStore, SkewedClock, eventually

from mailstrom import Config
from mailstrom.errors import StoreError, StoreLocked
from mailstrom.message.prepared import PreparedMessage
from mailstrom.runtime.worker import Worker
from mailstrom.runtime.worker_clock import WARN_SKEW, ClockVerdict, lease_margin, verdict_for
from mailstrom.status import RecipientState
from mailstrom.stores import MemoryStore
from mailstrom.stores.base import Lease
from mailstrom.stores.clock import ClockReading, ServerClock, reading_between

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
SHORT_LEASE = timedelta(seconds=30)
"""A third of it, 10 s, is the skew from which a worker stops leasing."""


@pytest.fixture
def mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> Any:
    """A loopback SMTP server, the MX host of example.test."""
    server = smtp_server(starttls=False)
    dns_server.mx("example.test", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


@contextlib.asynccontextmanager
async def running(worker: Worker, *, stop_within: float) -> AsyncIterator[None]:
    """``worker`` running for the block, then stopped (within ``stop_within`` seconds)."""
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=stop_within)


def held_by_another(store: MemoryStore) -> Lease:
    """A message in ``store`` that another worker, in step, is delivering under the
    default 15-minute lease."""
    store.enqueue(message(), now=datetime.now(UTC))
    other = store.lease(now=datetime.now(UTC), limit=10, lease_for=timedelta(minutes=15))
    assert other is not None
    return other


def checking_worker(
    dns: LoopbackDNS, mx: Any, store: MemoryStore, clock: SkewedClock, poll_interval: float = 0.01
) -> Worker:
    """A worker delivering to ``mx`` that checks its clock against ``store``'s."""
    config = loopback_config(dns, mx.port, poll_interval=poll_interval)
    return Worker(config, store, clock=clock, check_clock=True)


async def paused_or_taken_over(worker: Worker, mx: Any) -> None:
    """Until the worker has paused its leasing, or the server got the message."""
    await eventually(
        lambda: worker.status.paused is not None or bool(mx.received),
        "the worker to pause or to take the message over",
    )


def seconds(n: float) -> timedelta:
    return timedelta(seconds=n)


def test_the_round_trip_is_not_counted_as_skew() -> None:
    # Asked at T0, answered 4 s later; the server read its clock at what was T0 + 2 s here.
    reading = reading_between(T0, T0 + seconds(2), T0 + seconds(4), server="db")
    assert (reading.skew, reading.uncertainty, reading.certain_skew) == (0.0, 2.0, 0.0)


@pytest.mark.parametrize(
    ("server_at", "skew", "side"),
    [(T0 - seconds(60), 61.0, "ahead of"), (T0 + seconds(62), -61.0, "behind")],
)
def test_the_skew_is_the_local_midpoint_less_the_server_time(
    server_at: datetime, skew: float, side: str
) -> None:
    reading = reading_between(T0, server_at, T0 + seconds(2), server="db:5432")
    assert (reading.skew, reading.uncertainty, reading.certain_skew) == (skew, 1.0, 60.0)
    assert reading.describe() == f"61.0 s {side} db:5432 (± 1.000 s)"


def reading(skew: float, uncertainty: float = 0.0) -> ClockReading:
    return ClockReading(skew=skew, uncertainty=uncertainty, server="db")


@pytest.mark.parametrize(
    ("skew", "uncertainty", "lease_for", "verdict"),
    [
        (0.5, 0.0, timedelta(minutes=15), ClockVerdict.FINE),
        (WARN_SKEW, 0.0, timedelta(minutes=15), ClockVerdict.FINE),
        (-WARN_SKEW - 1, 0.0, timedelta(minutes=15), ClockVerdict.WARN),
        (300.0, 0.0, timedelta(minutes=15), ClockVerdict.WARN),  # a third of 15 min: not beyond
        (301.0, 0.0, timedelta(minutes=15), ClockVerdict.STOP),
        (-301.0, 0.0, timedelta(minutes=15), ClockVerdict.STOP),
        (11.0, 0.0, SHORT_LEASE, ClockVerdict.STOP),  # the danger is below the warning here
        (12.0, 3.0, SHORT_LEASE, ClockVerdict.FINE),  # a slow round trip explains it away
    ],
)
def test_verdicts(
    skew: float, uncertainty: float, lease_for: timedelta, verdict: ClockVerdict
) -> None:
    assert verdict_for(reading(skew, uncertainty), lease_for) is verdict


@pytest.mark.parametrize(
    ("previous", "skew", "verdict"),
    [
        # A paused worker (15 min leases: the danger is past 300 s) resumes under 270 s.
        (ClockVerdict.STOP, 299.0, ClockVerdict.STOP),
        (ClockVerdict.STOP, 271.0, ClockVerdict.STOP),
        (ClockVerdict.STOP, -271.0, ClockVerdict.STOP),
        (ClockVerdict.STOP, 269.0, ClockVerdict.WARN),
        (ClockVerdict.STOP, 20.0, ClockVerdict.FINE),
        # A warning (past 30 s) ends under 27 s; one not given yet starts past 30 s.
        (ClockVerdict.WARN, 28.0, ClockVerdict.WARN),
        (ClockVerdict.WARN, 26.0, ClockVerdict.FINE),
        (ClockVerdict.FINE, 28.0, ClockVerdict.FINE),
        (ClockVerdict.WARN, 299.0, ClockVerdict.WARN),  # a warning is no pause
        (ClockVerdict.STOP, 28.0, ClockVerdict.WARN),
    ],
)
def test_a_verdict_holds_until_the_skew_is_a_tenth_below_its_threshold(
    previous: ClockVerdict, skew: float, verdict: ClockVerdict
) -> None:
    """NTP slews a clock back at half a millisecond a second: near a threshold for
    minutes, where each reading's round trip tips it either way. Without a margin the
    worker paused and resumed (a log line each) at many checks."""
    assert verdict_for(reading(skew), timedelta(minutes=15), previous) is verdict


@pytest.mark.parametrize(("skew", "margin"), [(-45.0, 45.0), (45.0, 0.0), (0.0, 0.0)])
def test_a_worker_behind_extends_its_leases_by_its_lag(skew: float, margin: float) -> None:
    """Extended to its own ``now + lease_for``, a lease of a worker 45 s behind would look
    45 s shorter to the others."""
    assert lease_margin(reading(skew)) == seconds(margin)
    assert lease_margin(None) == seconds(0)


def test_only_stores_on_other_hosts_are_asked() -> None:
    assert not isinstance(MemoryStore(), ServerClock)
    assert isinstance(ClockedMemoryStore(), ServerClock)


def message() -> PreparedMessage:
    return PreparedMessage(
        data=b"From: a@client.test\r\nTo: b@example.test\r\nSubject: x\r\n\r\nx\r\n",
        envelope_from="a@client.test",
        recipients=("b@example.test",),
    )


def worker_for(store: MemoryStore, clock: SkewedClock) -> Worker:
    config = Config(helo_name="client.test", lease_for=SHORT_LEASE, poll_interval=0.01)
    return Worker(config, store, clock=clock, check_clock=True)


def clock_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """The lines about the worker's clock (not those about a failing store call)."""
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    return [(level, line) for level, line in lines if "this worker's clock" in line]


async def test_a_worker_too_far_off_leases_nothing_and_once_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = ClockedMemoryStore()
    mid = store.enqueue(message(), now=datetime.now(UTC))
    worker = worker_for(store, SkewedClock(45.0))
    await asyncio.wait_for(worker.run(once=True), timeout=5)
    status = worker.status
    assert status.paused is not None and status.paused.startswith("clock: 45.0 s ahead of")
    assert status.clock_skew == pytest.approx(45.0, abs=0.5) and status.clock_warning
    [recipient] = store.status(mid).recipients
    assert (recipient.state, recipient.attempts) == (RecipientState.QUEUED, 0)
    [(level, line)] = clock_lines(caplog)
    assert level == logging.ERROR
    assert "beyond 10 s (a third of lease_for)" in line and "takes no new work" in line


async def test_each_change_is_logged_once_and_the_worker_resumes_by_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = ClockedMemoryStore()
    clock = SkewedClock(-45.0)
    worker = worker_for(store, clock)
    async with running(worker, stop_within=5):
        await eventually(lambda: store.checks >= 5, "five checks")  # paused: one per poll
        assert worker.status.paused is not None
        clock.set(0.0)
        await eventually(lambda: worker.status.paused is None, "the pause to end")
    assert [level for level, _ in clock_lines(caplog)] == [logging.ERROR, logging.WARNING]
    assert "45.0 s behind the test server" in clock_lines(caplog)[0][1]
    assert clock_lines(caplog)[1][1].endswith(": leasing again")
    assert worker.status.clock_skew == pytest.approx(0.0, abs=0.5)
    assert not worker.status.clock_warning


async def test_a_clock_hovering_at_the_threshold_pauses_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A clock slewed back slowly sits near the danger (10 s with these leases) while
    the readings go a little either way: the worker pauses once and stays paused, and
    resumes once the clock is a tenth inside."""
    store = ClockedMemoryStore()
    clock = SkewedClock(10.5)
    worker = worker_for(store, clock)
    async with running(worker, stop_within=5):
        await eventually(lambda: worker.status.paused is not None, "the pause")
        for skew in (9.7, 10.2, 9.5, 10.1, 9.3):
            checks = store.checks
            clock.set(skew)
            await eventually(lambda c=checks: store.checks >= c + 2, "two more checks")
            assert worker.status.paused is not None, skew
        clock.set(8.5)
        await eventually(lambda: worker.status.paused is None, "the pause to end")
    assert [level for level, _ in clock_lines(caplog)] == [logging.ERROR, logging.WARNING]


async def test_a_clock_stepped_between_checks_is_checked_before_the_next_lease(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    """NTP steps the host's clock an hour ahead a moment after a check. With the default
    lease the next timed check is a minute away; until then every lease another worker
    holds looked expired to this one, which took the recipient over while the other was
    delivering it and sent it a second time."""
    store = ClockedMemoryStore()
    other = held_by_another(store)
    clock = SkewedClock(0.0)
    worker = checking_worker(dns_server, mx, store, clock)
    async with running(worker, stop_within=5):
        await eventually(lambda: store.checks >= 1, "the first check")
        clock.set(3600.0)
        worker.wake()
        await paused_or_taken_over(worker, mx)
        assert mx.received == []
        assert worker.status.paused is not None
        assert worker.status.paused.startswith("clock: 3600.0 s ahead of")
        assert store.extend(other, until=datetime.now(UTC) + timedelta(minutes=15)) == 1


class FailsOnce(ClockedMemoryStore):
    """Its next clock check fails once ``fail_next`` is set (a pooled connection gone
    stale), then the checks answer again."""

    fail_next = False

    def measure_clock(self, clock: Callable[[], datetime]) -> ClockReading:
        if self.fail_next:
            self.fail_next = False
            self.checks += 1
            raise StoreError("connection reset")
        return super().measure_clock(clock)


async def test_a_clock_stepped_whose_check_fails_is_not_trusted_with_a_lease(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    """The check a step calls for fails once. The step was forgotten with it, and the next
    lease trusted the clock an hour ahead: it took over the recipient another worker was
    delivering, and sent it a second time. Now no lease comes before a check succeeds."""
    store = FailsOnce()
    held_by_another(store)
    clock = SkewedClock(0.0)
    worker = checking_worker(dns_server, mx, store, clock)
    async with running(worker, stop_within=5):
        await eventually(lambda: store.checks >= 1, "the first check")
        checks = store.checks
        store.fail_next = True
        clock.set(3600.0)
        worker.wake()
        await paused_or_taken_over(worker, mx)
        assert mx.received == []
        assert worker.status.paused is not None
        assert store.checks >= checks + 2  # the failed one, and one that answered


async def test_a_step_seen_after_a_first_check_that_failed_is_checked_before_a_lease(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    """The database is not up yet when the worker starts (its first check fails), and
    chrony then steps the clock an hour ahead: with no check answered, no step was looked
    for, and the next lease took over the recipient another worker was delivering."""
    store = ClockedMemoryStore()
    store.failing = True
    held_by_another(store)
    clock = SkewedClock(0.0)
    worker = checking_worker(dns_server, mx, store, clock, poll_interval=2)
    async with running(worker, stop_within=5):
        await eventually(lambda: store.checks >= 1, "the first check")
        store.failing = False
        clock.set(3600.0)
        worker.wake()
        await paused_or_taken_over(worker, mx)
        assert mx.received == []


async def test_a_beat_whose_step_check_fails_extends_by_the_clock_before_the_step(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    """The clock steps an hour back, and the check before the beat fails (a pooled
    connection gone stale) while the extension goes through: extended by the stepped
    clock, the lease ended 45 minutes before the server's now, for another worker to
    take over while this one delivered it."""
    mx.data_delay = 1.5
    store = ExtendsSeen()
    store.enqueue(message(), now=datetime.now(UTC))
    clock = SkewedClock(0.0)
    worker = checking_worker(dns_server, mx, store, clock)
    async with running(worker, stop_within=10):
        await asyncio.to_thread(mx.wait_for_received, 1)  # the reply is 1.5 s away
        store.fail_next = True
        clock.set(-3600.0)
        worker.check_leases()
        await eventually(lambda: bool(store.untils), "the beat")
        assert store.untils[0] >= datetime.now(UTC) + timedelta(minutes=14)


class HangingCheck(ClockedMemoryStore):
    """Called off the event loop, as PostgreSQL is; its clock check hangs once ``hang``
    is set, until ``release``."""

    in_process = False

    def __init__(self) -> None:
        super().__init__()
        self.hang = False
        self.release = threading.Event()

    def measure_clock(self, clock: Callable[[], datetime]) -> ClockReading:
        if self.hang:
            self.release.wait(20)
        return super().measure_clock(clock)


class FencesSeen(Worker):
    """Keeps why each lease was fenced, and when (the loop's time)."""

    fences: list[tuple[float, str]]

    def _fence(self, state: Any, why: str) -> None:
        self.fences.append((asyncio.get_running_loop().time(), why))
        super()._fence(state, why)


async def test_a_beat_whose_clock_check_hangs_is_fenced(mx: Any, dns_server: LoopbackDNS) -> None:
    """A step calls for a check before the beat, and that check hangs (a half-open
    connection after the host resumed). It ran before the beat counted as under way, so
    the fencing, which acts only while a beat fails or is under way, never fenced the
    lease as it ran out: another worker could take it over while this one went on."""
    mx.data_delay = 6
    store = HangingCheck()
    store.enqueue(message(), now=datetime.now(UTC))
    clock = SkewedClock(0.0)
    config = loopback_config(
        dns_server, mx.port, poll_interval=0.01, lease_for=timedelta(seconds=3)
    )
    worker = FencesSeen(config, store, clock=clock, check_clock=True)
    worker.fences = []
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.to_thread(mx.wait_for_received, 1)  # the reply is 6 s away
        store.hang = True
        clock.set(5.0)  # stepped: the next beat checks the clock first
        worker.check_leases()
        await eventually(lambda: bool(worker.fences), "the lease fenced", timeout=4)
        assert worker.fences[0][1] == "could not be extended in time"
    finally:
        store.release.set()
        worker.request_stop()
        await asyncio.wait_for(task, timeout=15)


class ExtendsSeen(FailsOnce):
    """Keeps the ``until`` of every extension the worker's heartbeat asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.untils: list[datetime] = []

    def extend(self, lease: Lease, *, until: datetime) -> int:
        self.untils.append(until)
        return super().extend(lease, until=until)


async def test_a_clock_stepped_back_is_checked_before_the_next_beat(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    """NTP steps the host's clock ten minutes back while the worker delivers. Its next
    beat extended the lease to its own ``now + lease_for`` by the margin of the last
    check (none): five minutes by the server's clock, and another worker took the
    recipient over then, while this one was still delivering it."""
    mx.data_delay = 1.5
    store = ExtendsSeen()
    store.enqueue(message(), now=datetime.now(UTC))
    clock = SkewedClock(0.0)
    worker = checking_worker(dns_server, mx, store, clock)
    async with running(worker, stop_within=10):
        await asyncio.to_thread(mx.wait_for_received, 1)  # the reply is 1.5 s away
        clock.set(-600.0)
        worker.check_leases()  # a beat now, not in five minutes
        await eventually(lambda: bool(store.untils), "the beat")
        [until] = store.untils
        # By the server's clock: the whole lease_for, as for a worker in step.
        assert until >= datetime.now(UTC) + timedelta(minutes=14)


async def test_a_failing_check_is_store_trouble_not_skew(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = ClockedMemoryStore()
    store.failing = True
    worker = worker_for(store, SkewedClock(45.0))
    async with running(worker, stop_within=5):
        await eventually(lambda: store.checks >= 3, "three checks")
        status = worker.status
        assert (status.paused, status.clock_skew) == (None, None)
        assert status.metrics.store_errors >= 3  # counted as the store's, like any call
        store.failing = False
        await eventually(lambda: worker.status.paused is not None, "the check to answer")
    assert "store failing (clock check): connection to the test server lost" in caplog.text
    assert [level for level, _ in clock_lines(caplog)] == [logging.ERROR]


def test_a_clock_check_that_answers_does_not_clear_a_failing_write() -> None:
    # store_error read None (and the log said "store working again") at every clock
    # check that answered, while results still waited for a store refusing their writes
    # (a lock held elsewhere, a full disk).
    worker = worker_for(ClockedMemoryStore(), SkewedClock(0.0))
    worker._store_trouble("record", StoreLocked("a lock held by another session"))
    worker._store_fine("clock check")
    assert worker.status.store_error == "record: a lock held by another session"
    worker._store_fine()  # the results written: fine again
    assert worker.status.store_error is None
    worker._store_trouble("clock check", StoreError("connection lost"))
    worker._store_fine("clock check")
    assert worker.status.store_error is None


async def test_a_stopped_worker_is_not_exported_as_paused() -> None:
    """``mailstrom_leasing_paused`` is 1 while the *running* worker takes no new work
    (docs/guide.md). The pause's reason stays in ``status.paused`` once the worker ends
    (``mailstrom worker --once`` exits 75 by it), and the gauge read it alone: a worker
    that had stopped was exported as paused, beside ``mailstrom_worker_up 0``, for as long
    as the application ran."""
    from mailstrom.ops.exporter import registry_for
    from mailstrom.status import MetricsSnapshot

    store = ClockedMemoryStore()
    worker = worker_for(store, SkewedClock(45.0))
    async with running(worker, stop_within=5):
        await eventually(lambda: worker.status.paused is not None, "the pause")
        live = registry_for(lambda: MetricsSnapshot(worker=worker.status))
        assert live.get_sample_value("mailstrom_leasing_paused") == 1
    assert worker.status.paused is not None  # kept: why the last run took nothing
    stopped = registry_for(lambda: MetricsSnapshot(worker=worker.status))
    assert stopped.get_sample_value("mailstrom_worker_up") == 0
    assert stopped.get_sample_value("mailstrom_leasing_paused") == 0

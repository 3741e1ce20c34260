"""Scheduling and expiry against a loopback receiver: a message sent with ``send_at`` goes
at that time (the worker wakes for it by itself, without polling or spinning), and one
past its ``expires_at`` fails as ``expired`` without another connection."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailstrom import (
    DestinationRule,
    Email,
    Mailstrom,
    ReasonClass,
    RetryPolicy,
    ShapingConfig,
    Timeouts,
)
from mailstrom.status import RecipientState
from mailstrom.stores import Lease, MemoryStore, SQLiteStore
from mailstrom.stores.base import RecipientResult
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import FakeClock, Results, loopback_config
from tests.support.stores import LeaseWatchingStore


def counting_store() -> tuple[LeaseWatchingStore, list[int]]:
    """A store that counts the worker's lease attempts (a spinning worker makes thousands
    a second), and the count."""
    leases: list[int] = []
    store = LeaseWatchingStore(lambda _now, limit, _lease: leases.append(limit) if limit else None)
    return store, leases


def time_taking_store(clock: FakeClock) -> LeaseWatchingStore:
    """A store whose every lease takes a millisecond of the worker's clock: time moves on
    while the store looks for due work, as it does on a loaded machine."""

    def took(_now: datetime, limit: int, _lease: Lease | None) -> None:
        if limit > 0:
            clock.advance(timedelta(milliseconds=1))

    return LeaseWatchingStore(took)


def hello(to: str) -> Email:
    return Email(from_="app@sender.test", to=[to], subject="Hi", text="Hello")


def test_a_scheduled_message_goes_at_its_time_without_polling_or_spinning(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    store, leases = counting_store()
    results = Results()
    # A poll interval far beyond the test: only the due time can wake the worker.
    config = loopback_config(dns_server, mx.port, poll_interval=60.0)
    with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
        now = datetime.now(UTC)
        later = ms.send_email(hello("later@example.org"), send_at=now + timedelta(seconds=1.5))
        soon = ms.send_email(hello("soon@example.org"))
        results.wait_final({"soon@example.org"})
        assert ms.query_status(later).recipients[0].state is RecipientState.QUEUED
        [result] = [r for r in results.wait_final({"later@example.org"}) if r.message_id == later]
        assert result.state is RecipientState.DELIVERED
        assert ms.query_status(soon).state is RecipientState.DELIVERED
    sent_at = result.attempt.at
    assert sent_at >= now + timedelta(seconds=1.5)
    assert sent_at - (now + timedelta(seconds=1.5)) < timedelta(seconds=1)
    assert len(leases) < 20, f"{len(leases)} lease attempts: the worker spun"


def test_a_message_coming_due_while_a_lease_looks_is_not_left_for_the_poll(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """A lease that looks just before a scheduled message's time and finds nothing, but
    ends after it, must still let the due time wake the worker. It once counted the
    message as seen and not taken, and slept until the poll: now and then, when a timer
    (uvloop's, rounded to the millisecond) woke the worker a hair before the due time."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    clock = FakeClock()
    store = time_taking_store(clock)
    results = Results()
    config = loopback_config(dns_server, mx.port, poll_interval=60.0)
    ms = Mailstrom(config, store=store, worker="thread", clock=clock, on_result=results)
    # Queued before the worker starts, so its first lease is the one that looks a
    # millisecond early and ends at the due time.
    due = clock() + timedelta(milliseconds=1)
    later = ms.send_email(hello("later@example.org"), send_at=due)
    with ms:
        [result] = results.wait_final({"later@example.org"}, timeout=10)
    assert result.message_id == later
    assert result.state is RecipientState.DELIVERED
    assert result.attempt.at >= due


class SlowClock:
    """Wall time at half speed: every timer the worker sets for a due time fires before
    that time by its clock, as uvloop's (rounded to the millisecond) sometimes do."""

    def __init__(self) -> None:
        self._start = datetime.now(UTC)
        self._t0 = time.monotonic()

    def __call__(self) -> datetime:
        return self._start + timedelta(seconds=(time.monotonic() - self._t0) / 2)


def test_a_timer_firing_before_the_due_time_makes_no_empty_lease(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """Woken before the due time it waited for, the worker sleeps the rest instead of
    leasing: a lease that can find nothing is a write transaction for nothing."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    started, queued = threading.Event(), threading.Event()
    empty: list[datetime] = []

    def watch(now: datetime, limit: int, lease: Lease | None) -> None:
        if queued.is_set() and limit and lease is None and now < due:
            empty.append(now)
        started.set()

    clock = SlowClock()
    results = Results()
    config = loopback_config(dns_server, mx.port, poll_interval=60.0)
    due = clock() + timedelta(milliseconds=300)
    with Mailstrom(
        config, store=LeaseWatchingStore(watch), worker="thread", clock=clock, on_result=results
    ) as ms:
        assert started.wait(10)  # the worker's first lease, before the message
        later = ms.send_email(hello("later@example.org"), send_at=due)
        queued.set()
        [result] = results.wait_final({"later@example.org"}, timeout=10)
    assert result.message_id == later
    assert result.attempt.at >= due
    # At most the lease the enqueue's wake-up asked for, which may come after the flag.
    assert len(empty) <= 1, f"{len(empty)} empty leases before the due time"


def test_a_message_past_its_expiry_fails_as_expired_without_a_connection(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    mx = smtp_server()
    mx.rcpt_replies["grey@example.org"] = "451 4.7.1 Greylisted, try again later"
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    results = Results()
    # The retry policy would try again in an hour; the message expires within a second.
    retry = RetryPolicy(min_delay=timedelta(hours=1), max_delay=timedelta(hours=2))
    config = loopback_config(dns_server, mx.port, retry=retry, poll_interval=60.0)
    with Mailstrom(config, store=MemoryStore(), worker="thread", on_result=results) as ms:
        mid = ms.send_email(hello("grey@example.org"), max_age=timedelta(seconds=1))
        deferred, expired = results.wait_count(2)
        status = ms.query_status(mid)
    assert deferred.state is RecipientState.DEFERRED
    assert deferred.next_attempt_at == status.expires_at  # not an hour later
    assert expired.state is RecipientState.FAILED
    assert expired.attempt.reason_class is ReasonClass.EXPIRED
    recipient = status.recipients[0]
    assert recipient.state is RecipientState.FAILED
    assert recipient.reason == "expired"
    assert recipient.reason_class is ReasonClass.EXPIRED
    # The expiry asked no server: the greylisting was the one attempt.
    assert [a.reason_class for a in recipient.history] == [ReasonClass.GREYLISTED]
    assert recipient.attempts == 1
    assert mx.connections == 1  # the expiry made no connection


def test_a_scheduled_message_is_not_held_up_by_a_slow_delivery_in_flight(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """While a delivery hangs on a stalled server, the worker still wakes at the due time
    of a scheduled message (it remembers the store's next due time), instead of waiting
    for the slow delivery to end or for the poll."""
    mx = smtp_server()
    mx.stall_rcpts.add("stuck@slow.example")
    for domain in ("example.org", "slow.example"):
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    store, leases = counting_store()
    results = Results()
    timeouts = Timeouts(connect=2, greeting=2, command=4, data_init=2, data_block=2, data_end=2)
    config = loopback_config(dns_server, mx.port, poll_interval=60.0, timeouts=timeouts)
    with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
        ms.send_email(hello("stuck@slow.example"))
        due = datetime.now(UTC) + timedelta(seconds=1)
        later = ms.send_email(hello("later@example.org"), send_at=due)
        [result] = [r for r in results.wait_final({"later@example.org"}) if r.message_id == later]
        stuck = {r.address for r in results.all}
    assert result.state is RecipientState.DELIVERED
    assert due <= result.attempt.at < due + timedelta(seconds=1)
    assert "stuck@slow.example" not in stuck  # it was still hanging then
    assert len(leases) < 20, f"{len(leases)} lease attempts: the worker spun"


def test_a_retry_due_before_the_poll_is_not_held_up_by_a_slow_delivery_in_flight(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A recipient greylisted (451) while a delivery hangs on a stalled server is retried
    at its due time, a second later. The worker remembered the store's next due time read
    before the deferral was recorded (none: everything was leased) while the slow delivery
    kept it busy, so the retry waited for the poll (30 s here) instead."""
    mx = smtp_server()
    mx.stall_rcpts.add("stuck@slow.example")
    mx.rcpt_replies["grey@example.org"] = "451 4.7.1 Greylisted, try again later"
    for domain in ("example.org", "slow.example"):
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    results = Results()
    timeouts = Timeouts(connect=2, greeting=2, command=25, data_init=2, data_block=2, data_end=2)
    config = loopback_config(
        dns_server,
        mx.port,
        poll_interval=30.0,
        timeouts=timeouts,
        retry=RetryPolicy(min_delay=timedelta(seconds=1), jitter=0.0),
    )
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
        ms.send_email(hello("stuck@slow.example"))
        ms.send_email(hello("grey@example.org"))

        def retried(rs: list[RecipientResult]) -> bool:
            return sum(r.address == "grey@example.org" for r in rs) >= 2

        # Long before the poll (30 s) or the stalled command's timeout (25 s).
        seen = results.wait_for(retried, timeout=15)
        ms.stop(timeout=0)  # the stalled delivery is cut off, not waited for
    first, second = [r for r in seen if r.address == "grey@example.org"][:2]
    assert first.state is RecipientState.DEFERRED and first.next_attempt_at is not None
    assert second.attempt.at >= first.next_attempt_at
    assert "stuck@slow.example" not in {r.address for r in seen}  # still hanging then


def test_work_given_back_for_a_pause_is_not_held_up_by_a_slow_delivery_in_flight(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A message waiting for its destination's rate when that destination is paused (by
    another worker of the store, for a second) goes back to the store due at the pause's
    end, and is delivered then while a delivery hangs on a stalled server. The worker
    remembered the store's next due time read before it was given back (none: everything
    was leased) while the slow delivery kept it busy, so it waited for the poll (30 s here)
    instead."""
    mx = smtp_server()
    mx.stall_rcpts.add("stuck@slow.example")
    for domain in ("paused.example", "slow.example"):
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    results = Results()
    timeouts = Timeouts(connect=2, greeting=2, command=25, data_init=2, data_block=2, data_end=2)
    # One message every 3 s to paused.example: the second waits for the rate, long enough
    # for the pause to reach this worker (the pauses are read every 0.2 s).
    rule = DestinationRule(match="paused.example", messages_per_minute=20)
    shaping = ShapingConfig(rules=(rule,), provider_defaults=False, refresh=0.2)
    config = loopback_config(
        dns_server, mx.port, poll_interval=30.0, timeouts=timeouts, shaping=shaping
    )
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
        ms.send_email(hello("stuck@slow.example"))
        ms.send_emails([hello("a@paused.example"), hello("b@paused.example")])
        [first] = results.wait_count(1)
        # Another worker of the store is told to slow down by paused.example.
        pause = store.throttle(
            "paused.example",
            now=datetime.now(UTC),
            reply="421 4.7.0 Try again later",
            first=timedelta(seconds=1),
            maximum=timedelta(seconds=1),
        )

        def both(rs: list[RecipientResult]) -> bool:
            return {r.address for r in rs} >= {"a@paused.example", "b@paused.example"}

        # Long before the poll (30 s) or the stalled command's timeout (25 s).
        seen = results.wait_for(both, timeout=15)
        ms.stop(timeout=0)  # the stalled delivery is cut off, not waited for
    assert first.state is RecipientState.DELIVERED
    [second] = [r for r in seen if r.address != first.address]
    assert second.state is RecipientState.DELIVERED
    assert second.attempt.at >= pause.until  # given back, not sent in the pause
    assert "stuck@slow.example" not in {r.address for r in seen}  # still hanging then


def test_a_message_scheduled_past_the_retry_window_is_retried_after_its_time(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """The retry policy's max_age (5 days) counts from when the message could first go:
    one scheduled 6 days ahead and greylisted at its time is deferred, not failed for
    good at its first attempt."""
    mx = smtp_server()
    mx.rcpt_replies["grey@example.org"] = "451 4.7.1 Greylisted, try again later"
    for domain in ("example.org", "sender.test"):
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    clock = FakeClock()
    results = Results()
    config = loopback_config(
        dns_server,
        mx.port,
        poll_interval=60.0,
        delay_warning=timedelta(hours=4),
        bounce_notices=True,
    )
    ms = Mailstrom(config, store=MemoryStore(), worker="thread", clock=clock, on_result=results)
    mid = ms.send_email(hello("grey@example.org"), send_at=clock() + timedelta(days=6))
    clock.advance(timedelta(days=6))
    with ms:
        [result] = results.wait_count(1)
        queued = ms.query_recent()
    assert result.message_id == mid
    assert result.state is RecipientState.DEFERRED
    assert result.next_attempt_at is not None
    # Nor is a delay warning due (4 hours): the message has waited minutes, not 6 days.
    assert [m.id for m in queued] == [mid]


def test_a_message_that_expires_while_queued_behind_others_is_not_sent(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    # One session to a slow server: the last of six messages waits in the worker about
    # 1.5 s for its turn, and expires after 0.6 s. It fails as expired, and is not sent.
    mx = smtp_server()
    mx.data_delay = 0.3
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    results = Results()
    config = loopback_config(dns_server, mx.port, max_per_destination=1)
    with Mailstrom(config, store=MemoryStore(), worker=None) as queue_only:
        store = queue_only.store
        for i in range(5):
            queue_only.send_email(hello(f"u{i}@example.org"))
        late = queue_only.send_email(hello("late@example.org"), max_age=timedelta(seconds=0.6))
        with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
            results.wait_count(6)
            status = ms.query_status(late)
    assert "late@example.org" not in {a for m in mx.received for a in m.rcpt_tos}
    recipient = status.recipients[0]
    assert (recipient.state, recipient.reason_class) == (
        RecipientState.FAILED,
        ReasonClass.EXPIRED,
    )


def test_a_retry_across_a_change_to_summer_time_is_due_after_its_backoff(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """Was: a worker's clock in a zone with summer time (``ZoneInfo``) had the backoff
    added on its wall clock: 01:50 CET plus two hours is 03:50 CEST, one hour on, so a
    recipient deferred for two hours was due again after one."""
    from zoneinfo import ZoneInfo

    mx = smtp_server()
    mx.rcpt_replies["grey@example.org"] = "451 4.7.1 Greylisted, try again later"
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    results = Results()
    clock = FakeClock(datetime(2026, 3, 29, 1, 50, tzinfo=ZoneInfo("Europe/Berlin")))
    retry = RetryPolicy(min_delay=timedelta(hours=2), max_delay=timedelta(hours=4), jitter=0.0)
    config = loopback_config(dns_server, mx.port, retry=retry, poll_interval=60.0)
    with Mailstrom(config, store=MemoryStore(), clock=clock, on_result=results) as ms:
        ms.send_email(hello("grey@example.org"))
        [deferred] = results.wait_count(1)
    assert deferred.state is RecipientState.DEFERRED
    assert deferred.next_attempt_at == datetime(2026, 3, 29, 2, 50, tzinfo=UTC)

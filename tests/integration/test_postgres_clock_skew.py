"""Workers whose clocks differ from the PostgreSQL server's (each given a clock that is the
real time plus an offset, tests/support/skew.py; no host's time changes).

* In step: nothing is logged about the clock and the mail goes.
* A minute ahead, with the default 15-minute lease: a warning, the skew in
  ``worker_status`` and in ``mailstrom_clock_skew_seconds``, and the mail goes.
* Beyond a third of ``lease_for`` (30 s here: 10 s): a worker does not take over the
  recipient another worker is delivering slowly, nothing is sent twice, and it leases
  again by itself once its clock is right. Its clock is 45 s ahead, beyond the whole
  lease: a worker without the check takes the recipient over at once, so the test needs
  no wait for a lease to run out to show the difference.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.ops.exporter import registry_for
from mailstrom.runtime.worker import Worker
from mailstrom.status import MetricsSnapshot, RecipientState
from mailstrom.stores.clock import ServerClock
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ReceivingServer, ServerFactory
from tests.support.delivery import Results, loopback_config
from tests.support.skew import SkewedClock, eventually

pytestmark = pytest.mark.postgres

DOMAIN = "example.org"
SHORT_LEASE = timedelta(seconds=30)


@pytest.fixture
def receiver(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> ReceivingServer:
    mx = smtp_server(starttls=False)
    dns_server.mx(DOMAIN, [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    return mx


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url) as store:
        yield store


def message(local: str) -> PreparedMessage:
    address = f"{local}@{DOMAIN}"
    return PreparedMessage(
        data=f"From: app@sender.test\r\nTo: {address}\r\nSubject: hi\r\n\r\nHello.\r\n".encode(),
        envelope_from="app@sender.test",
        recipients=(address,),
    )


def clock_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    return [(level, line) for level, line in lines if "this worker's clock" in line]


def test_the_postgresql_store_measures_a_callers_clock(store: PostgresStore) -> None:
    assert isinstance(store, ServerClock)
    in_step = store.measure_clock(SkewedClock(0.0))
    ahead = store.measure_clock(SkewedClock(45.0))
    assert abs(in_step.skew) < 0.5 and in_step.uncertainty < 0.5
    assert ahead.skew == pytest.approx(45.0, abs=0.5)
    assert ahead.server.startswith("PostgreSQL server ")


async def test_in_step_nothing_is_logged_and_the_mail_goes(
    store: PostgresStore,
    receiver: ReceivingServer,
    dns_server: LoopbackDNS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store.enqueue(message("bob"), now=datetime.now(UTC))
    worker = Worker(
        loopback_config(dns_server, receiver.port), store, clock=SkewedClock(0.0), check_clock=True
    )
    await asyncio.wait_for(worker.run(once=True), timeout=20)
    status = worker.status
    assert status.delivered == 1
    assert status.clock_skew is not None and abs(status.clock_skew) < 0.5
    assert status.paused is None
    assert clock_lines(caplog) == []


async def test_a_clock_passed_in_is_a_tests_and_is_not_checked(
    store: PostgresStore,
    receiver: ReceivingServer,
    dns_server: LoopbackDNS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A test's fixed time, a year before the server's: its worker stopped leasing (the
    suite's PostgreSQL tests with a fake clock delivered nothing). Only the host's own
    clock is checked unless a caller asks (``check_clock=True``, as the tests above do)."""
    then = datetime.now(UTC) - timedelta(days=365)
    store.enqueue(message("bob"), now=then)
    worker = Worker(loopback_config(dns_server, receiver.port), store, clock=lambda: then)
    await asyncio.wait_for(worker.run(once=True), timeout=20)
    status = worker.status
    assert status.delivered == 1
    assert status.clock_skew is None and status.paused is None
    assert clock_lines(caplog) == []


async def test_a_minute_ahead_warns_shows_the_skew_and_delivers(
    store: PostgresStore,
    receiver: ReceivingServer,
    dns_server: LoopbackDNS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store.enqueue(message("bob"), now=datetime.now(UTC))
    config = loopback_config(dns_server, receiver.port)
    assert config.lease_for == timedelta(minutes=15)  # the default: 5 minutes is the danger
    worker = Worker(config, store, clock=SkewedClock(60.0), check_clock=True)
    await asyncio.wait_for(worker.run(once=True), timeout=20)
    status = worker.status
    assert status.delivered == 1 and status.paused is None
    assert status.clock_skew == pytest.approx(60.0, abs=0.5) and status.clock_warning
    [(level, line)] = clock_lines(caplog)
    assert level == logging.WARNING
    assert (
        "60.0 s ahead of PostgreSQL server" in line
        and "past 300 s (a third of lease_for) it stops leasing" in line
    )
    metrics = registry_for(lambda: MetricsSnapshot(worker=status))
    skew = metrics.get_sample_value("mailstrom_clock_skew_seconds")
    assert skew == pytest.approx(60.0, abs=0.5)
    assert metrics.get_sample_value("mailstrom_leasing_paused") == 0


async def test_a_worker_too_far_ahead_takes_nothing_over_and_resumes_once_right(
    postgres_url: str,
    store: PostgresStore,
    receiver: ReceivingServer,
    dns_server: LoopbackDNS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.data_delay = 1.0  # the first worker delivers slowly
    first = store.enqueue(message("first"), now=datetime.now(UTC))
    results_a, results_b = Results(), Results()
    in_step, ahead = SkewedClock(0.0), SkewedClock(45.0)
    # Two stores: the two workers might as well be on two hosts.
    with PostgresStore(postgres_url) as store_b:
        a = Worker(
            loopback_config(
                dns_server, receiver.port, lease_for=SHORT_LEASE, helo_name="a.client.test"
            ),
            store,
            clock=in_step,
            check_clock=True,
            on_result=results_a,
        )
        b = Worker(
            loopback_config(
                dns_server,
                receiver.port,
                lease_for=SHORT_LEASE,
                poll_interval=0.1,
                helo_name="b.client.test",
            ),
            store_b,
            clock=ahead,
            check_clock=True,
            on_result=results_b,
        )
        running_a = asyncio.create_task(a.run())
        running_b: asyncio.Task[None] | None = None
        try:
            # A is delivering: the message is in, its reply a second away.
            await asyncio.to_thread(receiver.wait_for_received, 1)
            running_b = asyncio.create_task(b.run())
            # B has checked its clock; a worker that does not check leases at once, and
            # sends the message again.
            await eventually(
                lambda: getattr(b.status, "paused", None) is not None or len(receiver.received) > 1,
                "the second worker to pause or to take the message over",
            )
            assert [m.helo for m in receiver.received] == ["a.client.test"]
            assert b.status.paused is not None and "beyond 10 s" in b.status.paused
            await asyncio.to_thread(results_a.wait_count, 1)  # A's lease was never lost
            a.request_stop()
            await asyncio.wait_for(running_a, timeout=10)

            # B is the only worker left. Once its clock is right it leases by itself.
            receiver.data_delay = 0.0
            second = store.enqueue(message("second"), now=datetime.now(UTC))
            ahead.set(0.0)
            [result] = await asyncio.to_thread(results_b.wait_count, 1)
            assert (result.message_id, result.state) == (second, RecipientState.DELIVERED)
            assert b.status.paused is None
        finally:
            a.request_stop()
            b.request_stop()
            await asyncio.gather(
                running_a, *([running_b] if running_b else []), return_exceptions=True
            )
    assert Counter(r for m in receiver.received for r in m.rcpt_tos) == {
        f"first@{DOMAIN}": 1,
        f"second@{DOMAIN}": 1,
    }
    [recipient] = store.status(first).recipients
    assert (recipient.state, recipient.attempts) == (RecipientState.DELIVERED, 1)
    levels = [level for level, _ in clock_lines(caplog)]
    assert levels == [logging.ERROR, logging.WARNING]  # paused, then leasing again

"""Chaos: a worker process frozen (SIGSTOP) past its lease while another takes its work
over, then let go on (SIGCONT).

Real ``mailstrom worker`` processes share one store and deliver to one aiosmtpd receiver
that counts every copy of every recipient and which worker sent it. The frozen worker's
lease expires and the other worker delivers what it held; when the frozen one resumes,
only the transactions it had already started may go out again (runtime/worker.py's
``_may_start``), and the store ends with every recipient delivered once on record.
"""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from mailstrom.stores import open_store
from tests.fixtures.postgres import ThrowawayPostgres
from tests.fixtures.smtp_server import ReceivingServer
from tests.integration.test_chaos import (  # noqa: F401 (fixtures: pytest finds them here)
    all_delivered,
    assert_settled,
    copies,
    fleet_for,
    prepared,
    receiver,
    recipient,
    stop_gracefully,
    store_url,
)
from tests.support.fleet import Fleet

pytestmark = pytest.mark.slow

MESSAGES = 1200
LEASE = "3s"
FROZEN_FOR = 6.0
"""Past the lease: the other worker takes the frozen one's work over meanwhile."""
DEADLINE = 60.0
IN_FLIGHT = 4 * 3
"""What the frozen worker may have started and still finish when it resumes: its
connections (max_connections) times the transactions each keeps submitted (dispatch.py's
_DEPTH)."""


def test_a_worker_frozen_past_its_lease_sends_only_what_it_had_started(
    store_url: str,  # noqa: F811
    receiver: ReceivingServer,  # noqa: F811
    fleet_for: Any,  # noqa: F811
) -> None:
    store = open_store(store_url)
    fleet: Fleet = fleet_for(store_url)
    receiver.data_delay = 0.02  # slow enough that the frozen worker holds much unstarted
    try:
        ids = store.enqueue_many([prepared(i) for i in range(MESSAGES)], now=datetime.now(UTC))
        frozen, other = fleet.start(2, lease_for=LEASE)
        fleet.wait_until(
            lambda: sum(m.helo == frozen.helo for m in receiver.messages) >= 40,
            DEADLINE,
            "the first worker delivering",
        )
        frozen.proc.send_signal(signal.SIGSTOP)
        time.sleep(FROZEN_FOR)
        frozen.proc.send_signal(signal.SIGCONT)
        fleet.wait_until(lambda: all_delivered(store), DEADLINE, "all recorded delivered")
        time.sleep(1.0)  # anything the resumed worker still sends arrives by now
        stop_gracefully([frozen, other])

        received = receiver.messages
        counts = copies(received)
        assert set(counts) == {recipient(i) for i in range(MESSAGES)}  # none lost
        assert_settled(store, ids)
        duplicated = {rcpt for rcpt, n in counts.items() if n > 1}
        # Only what it had started when frozen can have gone out from both workers.
        assert len(duplicated) <= IN_FLIGHT, sorted(duplicated)
        assert max(counts.values()) <= 2
    finally:
        store.close()


@pytest.mark.postgres
def test_workers_cut_off_by_a_long_postgres_restart_lose_and_repeat_nothing(
    receiver: ReceivingServer,  # noqa: F811
    fleet_for: Any,  # noqa: F811
) -> None:
    """PostgreSQL down for longer than three quarters of dead_after: every worker counts
    itself cut off and fences its leases; nobody may take anybody for dead (the looks'
    runs broke), and both go on by themselves once it is back."""
    with ThrowawayPostgres() as server:
        url = server.create_database() + "?dead_after=2s"
        store = open_store(url)
        fleet: Fleet = fleet_for(url)
        receiver.data_delay = 0.01
        try:
            ids = store.enqueue_many([prepared(i) for i in range(MESSAGES)], now=datetime.now(UTC))
            workers = fleet.start(2)
            fleet.wait_until(lambda: len(receiver.messages) >= MESSAGES // 4, DEADLINE, "a quarter")
            store.close()
            server.restart(down_for=3.0)  # past 3/4 of dead_after
            assert all(w.proc.poll() is None for w in workers), "a worker died of the outage"
            store = open_store(url)
            fleet.wait_until(lambda: all_delivered(store), DEADLINE, "all recorded delivered")
            stop_gracefully(workers)
            counts = copies(receiver.messages)
            assert set(counts) == {recipient(i) for i in range(MESSAGES)}
            assert_settled(store, ids)
            assert max(counts.values()) == 1, [r for r, n in counts.items() if n > 1]
        finally:
            store.close()

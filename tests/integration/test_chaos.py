"""Chaos: workers killed at random, and a database restarted, under load.

Real ``mailstrom worker`` processes share one store (SQLite, then PostgreSQL) and deliver to
one aiosmtpd receiver through the loopback DNS server; the receiver counts every copy of
every recipient and which worker (by EHLO name) sent it. Checked, for the engine v2 and
hardening issues:

* workers SIGKILLed at random moments, replaced by new ones: no recipient is lost, the
  store ends with every recipient delivered, recorded once and leased by nobody, and a
  recipient arrives twice only when a killed worker had sent it without recording it,
  i.e. the transaction was in flight at the kill;
* PostgreSQL restarted under running workers: they ride out the outage by themselves
  (nothing lost, nothing sent twice, both still running afterwards).
"""

from __future__ import annotations

import random
import signal
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores import open_store
from mailstrom.stores.base import Store
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.postgres import ThrowawayPostgres
from tests.fixtures.smtp_server import ReceivedMessage, ReceivingServer, ServerFactory
from tests.support.fleet import (
    Fleet,
    WorkerProcess,
    fleet_env,
    numbered_message,
    numbered_recipient,
)

pytestmark = pytest.mark.slow

MESSAGES = 1200
DOMAINS = ("a.example", "b.example", "c.example")
MAX_CONNECTIONS = 4
LEASE_BATCH = 40
HIGH_WATER = max(4 * MAX_CONNECTIONS, LEASE_BATCH)
"""What a worker keeps leased and not yet recorded at most (runtime/worker.py): in flight,
or delivered and waiting for its write. The bound on a killed worker's duplicates: see
``test_workers_killed_at_random_lose_nothing``."""
LEASE = "3s"
"""Short, so a killed worker's work comes back within the test."""
KILLS = 4
DEADLINE = 50.0


def recipient(i: int) -> str:
    return numbered_recipient(i, DOMAINS)


def prepared(i: int) -> PreparedMessage:
    return numbered_message(i, DOMAINS)


@pytest.fixture
def receiver(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> ReceivingServer:
    server = smtp_server(starttls=False)
    for domain in DOMAINS:
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


def copies(messages: list[ReceivedMessage]) -> Counter[str]:
    return Counter(rcpt for m in messages for rcpt in m.rcpt_tos)


def all_delivered(store: Store) -> bool:
    return store.stats().by_state[RecipientState.DELIVERED] == MESSAGES


def assert_settled(store: Store, ids: list[str]) -> None:
    """Every recipient delivered, with exactly one recorded attempt."""
    for mid in ids:
        [r] = store.status(mid).recipients
        assert (r.state, r.attempts, len(r.history)) == (RecipientState.DELIVERED, 1, 1), r
    assert store.next_due(now=datetime.now(UTC)) is None  # nothing pending, nothing leased


def stop_gracefully(workers: list[WorkerProcess]) -> None:
    for worker in workers:
        worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        code = worker.finish(timeout=30)
        assert code == 0, f"{worker.name} exited {code}:\n{worker.log()}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def fleet_for(receiver: ReceivingServer, dns_server: LoopbackDNS, tmp_path: Path) -> Iterator[Any]:
    fleets: list[Fleet] = []

    def make(url: str) -> Fleet:
        env = fleet_env(
            url,
            smtp_port=receiver.port,
            dns=dns_server,
            home=tmp_path,
            lease_batch=str(LEASE_BATCH),
            max_connections=str(MAX_CONNECTIONS),
            poll_interval="0.5",
        )
        fleet = Fleet(env)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop_all()


def test_workers_killed_at_random_lose_nothing(
    store_url: str, receiver: ReceivingServer, fleet_for: Any
) -> None:
    """Chaos: SIGKILL a random worker four times while two deliver, each replaced by a
    new one. Nothing is lost; a duplicate is only ever a copy a killed worker had sent but
    not recorded (in flight at the kill), and there are few of them.

    What a killed worker can have sent and not recorded, all of it leased by it:

    * on the wire: content the receiver took whose final reply the worker had not read,
      at most ``MAX_CONNECTIONS`` sessions times the transactions each pipelines (3);
    * replied to and not yet committed: results gathering for their write (4 ms), or
      waiting for the write before theirs, and those of the write under way.

    The second is not a number of sessions: it is every reply of the last few
    milliseconds (issue #8's window, at most 10 ms at full speed on an idle machine), and
    four pipelining sessions reply in bursts. Seen: 9 results come back within 2 ms on
    SQLite; 24 during one 23 ms PostgreSQL write on a loaded machine (25 duplicates at
    that kill). A bound of sessions times depth counts only the first (12 here; with 8
    more for the second, as this test once had, still under 25). What bounds both without
    a clock is the worker's lease high-water mark: it never holds more leased and
    unrecorded than ``HIGH_WATER``. How long results wait for their commit is measured,
    not asserted (benchmarks/README.md)."""
    store = open_store(store_url)
    fleet: Fleet = fleet_for(store_url)
    rng = random.Random(1234)
    try:
        ids = store.enqueue_many([prepared(i) for i in range(MESSAGES)], now=datetime.now(UTC))
        alive = fleet.start(2, lease_for=LEASE)
        killed: list[WorkerProcess] = []
        for n in range(1, KILLS + 1):
            # Kill at a random point of the n-th slice of the run.
            target = int(MESSAGES * (n - rng.random()) / (KILLS + 2))
            fleet.wait_until(
                lambda t=target: len(receiver.messages) >= t, DEADLINE, f"{target} delivered"
            )
            victim = alive.pop(rng.randrange(len(alive)))
            victim.proc.send_signal(signal.SIGKILL)
            assert victim.finish(timeout=10) == -signal.SIGKILL
            killed.append(victim)
            alive += fleet.start(1, lease_for=LEASE)
        fleet.wait_until(lambda: all_delivered(store), DEADLINE, "all recorded delivered")
        stop_gracefully(alive)

        received = receiver.messages
        counts = copies(received)
        assert set(counts) == {recipient(i) for i in range(MESSAGES)}  # none lost
        assert_settled(store, ids)
        duplicated = {rcpt for rcpt, n in counts.items() if n > 1}
        in_flight_at_kills: set[str] = set()
        for victim in killed:
            sent = {r for m in received if m.helo == victim.helo for r in m.rcpt_tos}
            unrecorded = sent - victim.recorded_delivered()
            # A killed worker can have sent without recording at most what it held: on
            # the wire, or delivered and waiting for a write that had not committed.
            assert len(unrecorded & duplicated) <= HIGH_WATER, victim.name
            in_flight_at_kills |= unrecorded
        assert duplicated <= in_flight_at_kills
        assert all(n <= 1 + KILLS for n in counts.values())
        for worker in alive:  # never killed: sent each once, recorded all it sent
            sent = copies([m for m in received if m.helo == worker.helo])
            assert set(sent.values()) <= {1}, worker.name
            assert worker.recorded_delivered() == set(sent), worker.name
    finally:
        store.close()


@pytest.mark.postgres
def test_workers_ride_out_a_postgres_restart(receiver: ReceivingServer, fleet_for: Any) -> None:
    """Engine v2 #7: PostgreSQL restarted (fast shutdown, down for two seconds) while two
    workers deliver. They keep their results, reconnect, and finish by themselves: all
    delivered once, both workers still running (they used to exit 75 within seconds)."""
    with ThrowawayPostgres() as server:
        url = server.create_database()
        store = open_store(url)
        fleet: Fleet = fleet_for(url)
        try:
            ids = store.enqueue_many([prepared(i) for i in range(MESSAGES)], now=datetime.now(UTC))
            workers = fleet.start(2)  # long leases: nothing expires during the outage
            fleet.wait_until(
                lambda: len(receiver.messages) >= MESSAGES // 4, DEADLINE, "a quarter delivered"
            )
            store.close()
            server.restart(down_for=2.0)
            assert all(w.proc.poll() is None for w in workers), "a worker died of the outage"
            store = open_store(url)
            fleet.wait_until(lambda: all_delivered(store), DEADLINE, "all recorded delivered")
            assert all(w.proc.poll() is None for w in workers)
            stop_gracefully(workers)
            assert copies(receiver.messages) == {recipient(i): 1 for i in range(MESSAGES)}
            assert_settled(store, ids)
            assert any(w.events("attempt") for w in workers)
        finally:
            store.close()

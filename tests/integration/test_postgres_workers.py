"""One PostgreSQL queue shared by several worker processes.

Four ``python -m mailstrom worker`` processes (separate OS processes, as on separate hosts)
share one database and deliver 2,000 messages to one aiosmtpd receiver through the loopback
DNS server. Each worker says a different EHLO name, so the receiver knows which process sent
each copy it got. Checked:

* every recipient arrives exactly once, every recipient is recorded DELIVERED with exactly
  one attempt, no lease is left behind, and every worker took part;
* after one worker is killed with SIGKILL mid-run, every recipient still arrives: only
  what the dead worker had sent but not yet recorded arrives twice (at most one lease's
  worth), its leases expire and the survivors deliver the rest. The lease duration is
  per worker (``MAILSTROM_LEASE_FOR``): the one to be killed leases for seconds, the
  others for minutes, so a stall of a live worker on a loaded machine cannot expire its
  lease and cause a duplicate the test would blame on the kill;
* the survivors stop gracefully on SIGTERM and exit 0.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ReceivedMessage, ReceivingServer
from tests.support.fleet import (
    Fleet,
    WorkerProcess,
    fleet_env,
    numbered_message,
    numbered_recipient,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

MESSAGES = 2000
WORKERS = 4
DOMAINS = ("a.example", "b.example", "c.example", "d.example")
LEASE_BATCH = 50
MAX_CONNECTIONS = 10
# The worker keeps at most max(4 * max_connections, lease_batch) recipients leased at
# once, so a killed worker can have had at most this many sent but not recorded.
MOST_IN_FLIGHT = max(4 * MAX_CONNECTIONS, LEASE_BATCH)
LONG_LEASE = "10m"
"""No lease of a live worker expires during a test, however loaded the machine: a live
worker's work is never taken over, so only the killed worker can cause a duplicate."""
SHORT_LEASE = "6s"
"""The worker that is killed leases for this long, so its work comes back within the test."""
KILL_AFTER = 500
DEADLINE = 60.0


def recipient(i: int) -> str:
    return numbered_recipient(i, DOMAINS)


def prepared(i: int) -> PreparedMessage:
    return numbered_message(i, DOMAINS)


@pytest.fixture
def receiver(
    smtp_server: Callable[..., ReceivingServer], dns_server: LoopbackDNS
) -> ReceivingServer:
    """The MX of every test domain: ``mx.test`` → 127.0.0.1."""
    # Plaintext: what is tested is the shared queue, and TLS (covered elsewhere) would
    # only add handshake CPU to the receiver thread in this process.
    server = smtp_server(starttls=False)
    for domain in DOMAINS:
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


@pytest.fixture
def fleet(
    postgres_url: str, receiver: ReceivingServer, dns_server: LoopbackDNS, tmp_path: Path
) -> Iterator[Fleet]:
    env = fleet_env(
        postgres_url,
        smtp_port=receiver.port,
        dns=dns_server,
        home=tmp_path,
        lease_batch=str(LEASE_BATCH),
        max_connections=str(MAX_CONNECTIONS),
        poll_interval="1",
    )
    fleet = Fleet(env)
    try:
        yield fleet
    finally:
        fleet.stop_all()


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url) as store:
        yield store


def enqueue_all(store: PostgresStore) -> dict[str, str]:
    """Enqueue MESSAGES one-recipient messages in batches; recipient → message id."""
    now = datetime.now(UTC)
    by_recipient: dict[str, str] = {}
    for start in range(0, MESSAGES, 500):
        batch = range(start, min(start + 500, MESSAGES))
        ids = store.enqueue_many([prepared(i) for i in batch], now=now)
        by_recipient.update(zip((recipient(i) for i in batch), ids, strict=True))
    return by_recipient


def copies(messages: list[ReceivedMessage]) -> Counter[str]:
    return Counter(rcpt for m in messages for rcpt in m.rcpt_tos)


def short_leased(url: str) -> set[str]:
    """Recipients under a short lease: the work the worker started with SHORT_LEASE holds
    (every other worker's leases run for minutes)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT address FROM recipients WHERE lease_token IS NOT NULL"
            " AND state IN ('queued', 'deferred')"
            " AND lease_expires_at < now() + interval '1 minute'"
        ).fetchall()
    return {address for (address,) in rows}


def all_delivered(store: PostgresStore) -> bool:
    return store.stats().by_state[RecipientState.DELIVERED] == MESSAGES


def assert_store_settled(url: str, by_recipient: dict[str, str]) -> None:
    """Every recipient DELIVERED with exactly one recorded attempt, none still leased."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT r.message_id, r.address, r.state, r.lease_token, r.attempts,"
            " (SELECT count(*) FROM attempts a"
            "   WHERE a.message_id = r.message_id AND a.address = r.address)"
            " FROM recipients r"
        ).fetchall()
    assert sorted((m, a) for m, a, *_ in rows) == sorted((m, a) for a, m in by_recipient.items())
    assert Counter(state for _, _, state, *_ in rows) == {"delivered": MESSAGES}
    assert [r for r in rows if r[3] is not None] == []
    assert Counter((attempts, history) for *_, attempts, history in rows) == {(1, 1): MESSAGES}


def stop_gracefully(workers: list[WorkerProcess]) -> None:
    for worker in workers:
        worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        code = worker.finish(timeout=30)
        assert code == 0, f"{worker.name} exited {code}:\n{worker.log()}"
        assert worker.events("worker stopped"), worker.log()


def test_four_workers_deliver_every_recipient_exactly_once(
    fleet: Fleet, store: PostgresStore, receiver: ReceivingServer, postgres_url: str
) -> None:
    workers = fleet.start(WORKERS)
    # Enqueued after the workers listen: LISTEN/NOTIFY wakes them all.
    by_recipient = enqueue_all(store)

    receiver.wait_for_messages(MESSAGES, timeout=DEADLINE)
    fleet.wait_until(lambda: all_delivered(store), DEADLINE, "all recorded delivered")
    stop_gracefully(workers)

    received = receiver.messages
    assert copies(received) == dict.fromkeys(by_recipient, 1)
    assert len(received) == MESSAGES
    # Every process took part, and each logged what the receiver got from it.
    by_helo = Counter(m.helo for m in received)
    for worker in workers:
        assert by_helo[worker.helo] > 0, f"{worker.name} delivered nothing"
        assert len(worker.recorded_delivered()) == by_helo[worker.helo]
    assert_store_settled(postgres_url, by_recipient)


def test_killed_worker_loses_nothing_and_duplicates_only_its_in_flight_mail(
    fleet: Fleet, store: PostgresStore, receiver: ReceivingServer, postgres_url: str
) -> None:
    [victim] = fleet.start(1, lease_for=SHORT_LEASE)
    survivors = fleet.start(WORKERS - 1)
    by_recipient = enqueue_all(store)

    # Kill the victim mid-run: the receiver has mail from it, and it holds leased work.
    def victim_busy() -> bool:
        got = receiver.messages
        return (
            len(got) >= KILL_AFTER
            and any(m.helo == victim.helo for m in got)
            and bool(short_leased(postgres_url))
        )

    # Frozen (SIGSTOP) between the check and the kill, so that what it holds leased
    # cannot change in between: a fast victim used to record its last lease first.
    for _ in range(20):
        fleet.wait_until(victim_busy, DEADLINE, "the victim was mid-run")
        victim.proc.send_signal(signal.SIGSTOP)
        if short_leased(postgres_url):
            break
        victim.proc.send_signal(signal.SIGCONT)
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.finish(timeout=10) == -signal.SIGKILL
    orphaned = short_leased(postgres_url)
    assert orphaned, "the victim held no lease when killed; the test proves nothing"
    assert len(orphaned) <= MOST_IN_FLIGHT

    # The dead worker's leases expire and the survivors deliver what it held.
    fleet.wait_until(lambda: all_delivered(store), DEADLINE, "all recorded delivered")
    stop_gracefully(survivors)

    received = receiver.messages
    counts = copies(received)
    assert set(counts) == set(by_recipient)
    duplicated = {rcpt for rcpt, n in counts.items() if n > 1}
    assert all(counts[rcpt] == 2 for rcpt in duplicated), Counter(counts.values())
    # A duplicate is a copy the victim sent without recording it, sent again by a
    # survivor after the victim's lease expired: never two survivors, never anything
    # the victim had recorded.
    from_victim = {r for m in received if m.helo == victim.helo for r in m.rcpt_tos}
    assert duplicated <= from_victim - victim.recorded_delivered()
    # ...and only what it held leased when it died.
    assert duplicated <= orphaned
    for worker in survivors:
        sent = copies([m for m in received if m.helo == worker.helo])
        assert set(sent.values()) <= {1}, f"{worker.name} sent some recipient twice"
        assert len(worker.recorded_delivered()) == sum(sent.values())
    assert_store_settled(postgres_url, by_recipient)

"""Fairness between destinations in one lane, against loopback receivers: a backlog at a
slow destination, which can use only ``max_per_destination`` connections, does not fill
the worker's leases and hold back mail to another destination queued after it (Postfix
serves its active queue's destinations round-robin for the same reason)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Email, Mailstrom
from mailstrom.status import RecipientState
from mailstrom.stores import Lease, MemoryStore, RecipientResult, SQLiteStore, Store
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import loopback_config

BIG = 2000


class Progress:
    """Counts big.example's delivered recipients, and how many there were when the one to
    small.example was delivered."""

    def __init__(self) -> None:
        self.big = 0
        self.big_at_small: int | None = None
        self.small: RecipientResult | None = None
        self.cond = threading.Condition()

    def __call__(self, result: RecipientResult) -> None:
        with self.cond:
            if result.address.endswith("@small.example"):
                self.small = result
                self.big_at_small = self.big
            elif result.state is RecipientState.DELIVERED:
                self.big += 1
            self.cond.notify_all()

    def wait(self, check: object, timeout: float = 60) -> None:
        with self.cond:
            assert self.cond.wait_for(check, timeout), "timed out"  # type: ignore[arg-type]


def news(n: int) -> Email:
    return Email(from_="news@sender.test", to=[f"reader{n}@big.example"], subject="News", text="x")


def open_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "q.db")
    return PostgresStore(request.getfixturevalue("postgres_url"))


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
def test_a_slow_destination_backlog_does_not_hold_back_another_destination(
    kind: str,
    request: pytest.FixtureRequest,
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    tmp_path: Path,
) -> None:
    big = smtp_server()
    big.data_delay = 0.005  # slow enough that its backlog is leased and waiting in flight
    small = smtp_server(host="127.0.0.2", port=big.port)
    dns_server.mx("big.example", [(10, "mx.big.test")])
    dns_server.a("mx.big.test", big.host)
    dns_server.mx("small.example", [(10, "mx.small.test")])
    dns_server.a("mx.small.test", small.host)
    # 2 sessions can carry a handful of big.example's messages at once; the worker leases
    # up to 500 recipients (the larger of 4 * max_connections and lease_batch).
    config = loopback_config(dns_server, big.port, max_connections=8, max_per_destination=2)
    store = open_store(kind, request, tmp_path)
    progress = Progress()
    with Mailstrom(config, store=store, worker="thread", on_result=progress) as ms:
        ms.send_emails(news(n) for n in range(BIG))
        progress.wait(lambda: progress.big >= 20)  # big.example's backlog is in flight
        with progress.cond:
            before = progress.big
        ms.send_email(
            Email(from_="shop@sender.test", to=["me@small.example"], subject="Reset", text="x")
        )
        progress.wait(lambda: progress.small is not None)
        after = progress.big_at_small
        ms.stop(timeout=0)
    store.close()
    assert progress.small is not None and progress.small.state is RecipientState.DELIVERED
    assert after is not None
    behind = after - before
    # Unfair, the message waits until all of the backlog but what one worker leases
    # (about BIG - 500) is delivered; fair, for about what big.example has in flight.
    assert behind < (BIG - before) // 2, (
        f"small.example's message was delivered after {behind} of big.example's"
        f" {BIG - before} waiting"
    )


class SlowBusyLease(PostgresStore):
    """A PostgreSQL store whose leases that pass over busy destinations answer only once
    everything leased before is recorded: as a slow lease does while the worker's
    deliveries all end meanwhile."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.leased = 0
        self.recorded = 0
        self.cond = threading.Condition()

    def record_and_lease(  # type: ignore[override]
        self, results: Sequence[RecipientResult], **kwargs: Any
    ) -> tuple[list[RecipientResult], Lease | None]:
        if not results and kwargs.get("busy"):
            with self.cond:
                self.cond.wait_for(lambda: self.recorded >= self.leased, timeout=10)
        recorded, lease = super().record_and_lease(results, **kwargs)
        with self.cond:
            self.recorded += len(recorded)
            if lease is not None:
                self.leased += sum(len(item.recipients) for item in lease.items)
            self.cond.notify_all()
        return recorded, lease


def test_an_empty_lease_past_busy_destinations_leases_again_once_they_drain(
    postgres_url: str, smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    # A lease that passed over the worker's busy destinations and found nothing else due
    # answers after every delivery has ended: the work it passed over is leasable now, and
    # the worker leases again rather than sleep out its poll_interval.
    server = smtp_server()
    dns_server.mx("big.example", [(10, "mx.big.test")])
    dns_server.a("mx.big.test", server.host)
    config = loopback_config(
        dns_server, server.port, max_connections=8, max_per_destination=2, poll_interval=60
    )
    store = SlowBusyLease(postgres_url)
    progress = Progress()
    count = 400
    with Mailstrom(config, store=store, worker="thread", on_result=progress) as ms:
        ms.send_emails(news(n) for n in range(count))
        with progress.cond:
            progress.cond.wait_for(lambda: progress.big >= count, timeout=15)
        delivered = progress.big
        ms.stop(timeout=0)
    store.close()
    assert delivered == count, f"{delivered} of {count} delivered in 15 s (poll_interval 60 s)"

"""Priority lanes against a loopback receiver: with thousands of bulk messages queued and
being delivered, a transactional message sent afterwards is delivered within a second,
and bulk never holds more than its share of the connections."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from mailstrom import Email, Lane, Mailstrom
from mailstrom.status import RecipientState
from mailstrom.stores import RecipientResult, SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import loopback_config

BULK = 3000


class Watch:
    """Counts delivered bulk recipients and notes when the transactional one is done."""

    def __init__(self) -> None:
        self.bulk = 0
        self.transactional_at: float | None = None
        self.cond = threading.Condition()

    def __call__(self, result: RecipientResult) -> None:
        with self.cond:
            if result.address.startswith("now@"):
                self.transactional_at = time.monotonic()
            elif result.state is RecipientState.DELIVERED:
                self.bulk += 1
            self.cond.notify_all()

    def wait(self, check: object, timeout: float = 60) -> None:
        with self.cond:
            assert self.cond.wait_for(check, timeout), "timed out"  # type: ignore[arg-type]


def bulk(n: int, domain: str = "example.org") -> Email:
    return Email(
        from_="news@sender.test",
        to=[f"reader{n}@{domain}"],
        subject=f"News {n}",
        text="x",
        priority="bulk",
    )


def test_a_transactional_message_overtakes_a_bulk_backlog(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    watch = Watch()
    config = loopback_config(dns_server, mx.port, max_connections=8, max_per_destination=8)
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config, store=store, worker="thread", on_result=watch) as ms:
        ids = ms.send_emails(bulk(n) for n in range(BULK))
        watch.wait(lambda: watch.bulk >= 200)  # bulk is flowing
        sent = time.monotonic()
        mid = ms.send_email(
            Email(from_="shop@sender.test", to=["now@example.org"], subject="Reset", text="x")
        )
        watch.wait(lambda: watch.transactional_at is not None)
        assert watch.transactional_at is not None
        latency = watch.transactional_at - sent
        backlog = BULK - watch.bulk
        status = ms.query_status(mid)
    store.close()
    assert status.priority == "transactional"
    assert status.state is RecipientState.DELIVERED
    assert backlog > 1000, "the backlog drained before the test could tell"
    assert latency < 1.0, f"transactional took {latency:.3f} s behind {backlog} bulk"
    assert len(ids) == BULK


def test_bulk_takes_at_most_its_share_of_the_connections(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # Every bulk domain has a receiver of its own; with 4 connections and bulk's share at
    # one half, no more than 2 bulk sessions are ever open at once.
    mx = smtp_server()
    domains = [f"d{i}.example" for i in range(6)]
    for domain in domains:
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(
        dns_server,
        mx.port,
        max_connections=4,
        lanes=(Lane(name="transactional"), Lane(name="bulk", share=0.5)),
    )
    done = threading.Event()
    seen: list[RecipientResult] = []
    peak = [0]
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config, store=store, worker="thread")

    def on_result(result: RecipientResult) -> None:
        # Called on the worker's loop for every result: the open sessions right then.
        worker = ms.worker
        assert worker is not None
        peak[0] = max(peak[0], worker.status.sessions)
        seen.append(result)
        if len(seen) == len(domains) * 20:
            done.set()

    ms.worker._on_result = on_result  # type: ignore[union-attr]
    with ms:
        ms.send_emails(bulk(n, domain) for n in range(20) for domain in domains)
        assert done.wait(60)
    store.close()
    assert 1 <= peak[0] <= 2, f"{peak[0]} bulk sessions at once; the share allows 2"
    assert all(r.state is RecipientState.DELIVERED for r in seen)

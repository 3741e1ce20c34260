"""A session started for a higher lane does not go on to carry a lower lane's backlog
past that lane's share of the connections (docs/guide.md, "Priority lanes")."""

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


def test_a_transactional_session_does_not_take_bulk_past_its_share(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # Two connections, bulk's share one: a bulk backlog to a slow domain holds one. A
    # password reset to that domain opens the other; once it is delivered, that session
    # must not carry the bulk backlog on, or a reset to any other domain finds no
    # connection until the backlog is done.
    fast = smtp_server()
    slow = smtp_server(host="127.0.0.2", port=fast.port)
    slow.data_delay = 0.15
    dns_server.mx("slow.example", [(10, "slow.test")])
    dns_server.a("slow.test", slow.host)
    dns_server.mx("fast.example", [(10, "fast.test")])
    dns_server.a("fast.test", fast.host)
    config = loopback_config(
        dns_server,
        fast.port,
        max_connections=2,
        max_per_destination=2,
        lanes=(Lane(name="transactional"), Lane(name="bulk", share=0.5)),
    )
    done: dict[str, float] = {}
    bulk_done = [0]
    cond = threading.Condition()

    def on_result(result: RecipientResult) -> None:
        with cond:
            if result.address.startswith("now"):
                done[result.address] = time.monotonic()
            elif result.state is RecipientState.DELIVERED:
                bulk_done[0] += 1
            cond.notify_all()

    def wait(check: object) -> None:
        with cond:
            assert cond.wait_for(check, 30), "timed out"  # type: ignore[arg-type]

    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config, store=store, worker="thread", on_result=on_result) as ms:
        ms.send_emails(
            Email(
                from_="news@sender.test",
                to=[f"reader{n}@slow.example"],
                subject=f"News {n}",
                text="x",
                priority="bulk",
            )
            for n in range(40)
        )
        wait(lambda: bulk_done[0] >= 2)  # the bulk session is at it

        def reset(to: str) -> None:
            ms.send_email(Email(from_="shop@sender.test", to=[to], subject="Reset", text="x"))

        reset("now@slow.example")
        wait(lambda: "now@slow.example" in done)
        sent = time.monotonic()
        reset("now@fast.example")
        wait(lambda: "now@fast.example" in done)
        latency = done["now@fast.example"] - sent
        backlog = 40 - bulk_done[0]
    store.close()
    assert latency < 1.5, f"a reset to another domain waited {latency:.2f} s for bulk"
    assert backlog > 10, "the backlog drained before the test could tell"

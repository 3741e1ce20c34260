"""A facade in a process forked from the application: the parent's worker thread does
not exist there, and the fork may start its own (see Mailstrom._after_fork)."""

from __future__ import annotations

import time
from pathlib import Path

from mailstrom import Email, Mailstrom, RecipientState
from mailstrom.errors import WorkerError
from mailstrom.stores import MemoryStore, SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import loopback_config
from tests.support.forking import in_fork


def test_a_fork_of_an_application_with_a_worker_thread_can_start_its_own(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The parent's worker thread does not exist in the fork: its status said running
    while nothing there delivered, and start() said "already started"."""
    server = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    config = loopback_config(dns_server, server.port)
    with Mailstrom(config, store=SQLiteStore(tmp_path / "q.db"), worker="thread") as ms:

        def child() -> str:
            before = ms.worker_status.running
            ms.start()
            mid = ms.send_email(
                Email(from_="app@sender.test", to=["u@example.org"], subject="s", text="hi")
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if ms.query_status(mid).state is RecipientState.DELIVERED:
                    break
                time.sleep(0.02)
            running = ms.worker_status.running
            ms.stop()
            return f"{before} {ms.query_status(mid).state.name} {running}"

        assert in_fork(child) == "False DELIVERED True"
        assert ms.worker_status.running  # the parent's, untouched


def test_a_fork_does_not_deliver_its_copy_of_a_queue_in_memory(
    dns_server: LoopbackDNS,
) -> None:
    config = loopback_config(dns_server, 9)
    with Mailstrom(config, store=MemoryStore(), worker="thread") as ms:

        def child() -> str:
            running = ms.worker_status.running
            try:
                ms.start()
            except WorkerError as exc:
                return f"{running} {exc}"
            return f"{running} started"

        said = in_fork(child)
        assert said.startswith("False this process was forked"), said

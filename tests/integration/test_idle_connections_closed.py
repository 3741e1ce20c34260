"""A connection kept for reuse is closed once ``connection_idle`` has passed, also when no
more work comes: the worker looks for idle ones on a timer, not only as it leases."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mailstrom import Mailstrom
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_out_of_descriptors import _child
from tests.integration.test_worker_modes import config, hello, mx
from tests.support.delivery import Results
from tests.support.open_files import open_sockets

__all__ = ["mx"]  # the fixture, found by pytest under this name


def test_a_connection_idle_past_its_time_is_closed_when_the_queue_is_empty(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Was: idle connections were looked for only in the store loop's turns that leased
    work, which b48d4ce7 left without the look: once the queue was empty, the connection
    of the last delivery to each destination stayed open (here past 10 s against a
    ``connection_idle`` of 0.5 s) until the server's own timeout closed it."""
    dns_server.mx("a.example", [(10, "mx.test")])
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    cfg = config(dns_server, mx.port, connection_idle=0.5)
    ms = Mailstrom(cfg, store=store, on_result=results, worker="process")
    ms.start()
    try:
        pid = _child(ms)
        before = open_sockets(pid)
        ms.send_email(hello("u@a.example"))
        results.wait_count(1)
        deadline = time.monotonic() + 10  # only a bound for a connection never closed
        while open_sockets(pid) > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_sockets(pid) == before
    finally:
        ms.stop()
    assert [m.rcpt_tos for m in mx.messages] == [("u@a.example",)]
    store.close()

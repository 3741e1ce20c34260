"""A stop and the mail queued in memory for a free session, against a real aiosmtpd
receiver that answers each message slowly and the loopback DNS server, with the worker
in a thread and in a process.

A destination's leased mail waits in its queue for one of its few sessions. That mail is
not on the wire: a stop waits for the transactions in flight (its drain timeout is for
them), and gives the queued mail back to the store at once, untried and due at once, so
that a restart takes seconds, not the time the slow server needs for the whole backlog."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Email, Mailstrom, RecipientState
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import loopback_config

SESSIONS = 2
DEPTH = 3
"""Transactions one connection keeps submitted (dispatch._DEPTH): in flight at a stop."""
SENT = 60
DELAY = 0.5
"""Seconds the server takes to answer each message's final dot."""


def hello(to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject="Hi", text="Hello")


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_stop_waits_for_the_transactions_on_the_wire_not_the_queue(
    smtp_server: Any, dns_server: LoopbackDNS, tmp_path: Path, mode: str
) -> None:
    """Was: every leased recipient queued for one of the destination's two sessions
    counted as a delivery in flight, so the stop sent the whole backlog (half a second a
    message) before it returned, up to its whole drain timeout."""
    mx = smtp_server(host="127.0.0.35")
    mx.data_delay = DELAY
    dns_server.mx("slowmx.test", [(10, "mx.slowmx.test")])
    dns_server.a("mx.slowmx.test", mx.host)
    config = loopback_config(dns_server, mx.port, max_per_destination=SESSIONS)
    store = SQLiteStore(str(tmp_path / "queue.db"))
    try:
        ms = Mailstrom(config, store=store, worker=mode)
        ms.start()
        try:
            ids = ms.send_emails([hello(f"r{i}@slowmx.test") for i in range(SENT)])
            mx.wait_for_messages(1, timeout=15)  # the rest waits for a session
        finally:
            before = len(mx.received)
            began = time.monotonic()
            ms.stop(timeout=120)
            took = time.monotonic() - began
            stopped = datetime.now(UTC)
        recipients = [store.status(i).recipients[0] for i in ids]
    finally:
        store.close()
    received = [r for m in mx.received for r in m.rcpt_tos]
    assert len(received) == len(set(received)), received  # none went twice
    # What the sessions had on the wire as the stop began, and no new transaction.
    after = len(received) - before
    assert after <= SESSIONS * DEPTH + 1, (
        f"{after} messages went after the stop began ({took:.1f} s): the stop sent "
        f"the queue, not just what was in flight"
    )
    delivered = {r.address for r in recipients if r.state is RecipientState.DELIVERED}
    assert delivered == set(received)  # every transaction sent was recorded
    left = [r for r in recipients if r.state is not RecipientState.DELIVERED]
    assert len(left) == SENT - len(delivered)
    for r in left:  # given back untried, due at once, nothing lost
        assert r.state is RecipientState.QUEUED and r.attempts == 0, r
        assert r.next_attempt_at is not None and r.next_attempt_at <= stopped, r

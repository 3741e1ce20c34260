"""A stop and the mail a destination's rate holds back, against a real aiosmtpd receiver
and the loopback DNS server, with the worker in a thread and in a process.

The worker keeps a few seconds of a rate's mail queued in memory. That mail is not on
the wire: a stop does not wait for the rate to let it go (its drain timeout is for the
deliveries under way), and gives it back to the store at once, each message due at its
place in the rate's schedule so that the next worker does not take it all at once."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailstrom import DestinationRule, Email, Mailstrom, RecipientState, ShapingConfig
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import loopback_config

RATE = 60
"""Messages a minute: one a second."""
SENT = 8


def hello(to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject="Hi", text="Hello")


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_stop_gives_back_what_the_rate_holds_and_does_not_wait_for_it(
    smtp_server: Any, dns_server: LoopbackDNS, tmp_path: Path, mode: str
) -> None:
    """Was: the messages queued for the rate counted as deliveries in flight, so the stop
    waited for the rate to send them (a second each here), up to its whole drain
    timeout, and what was left then went back due at once."""
    mx = smtp_server(host="127.0.0.33")
    dns_server.mx("slowrate.test", [(10, "mx.slowrate.test")])
    dns_server.a("mx.slowrate.test", mx.host)
    rule = DestinationRule(match="slowrate.test", messages_per_minute=RATE)
    shaping = ShapingConfig(rules=(rule,), provider_defaults=False, refresh=0.2)
    config = loopback_config(dns_server, mx.port, shaping=shaping)
    path = tmp_path / "queue.db"
    store = SQLiteStore(str(path))
    try:
        ms = Mailstrom(config, store=store, worker=mode)
        ms.start()
        try:
            ids = ms.send_emails([hello(f"r{i}@slowrate.test") for i in range(SENT)])
            mx.wait_for_messages(1, timeout=15)  # the rest waits for the rate
        finally:
            stopped_at = datetime.now(UTC)
            began = time.monotonic()
            ms.stop(timeout=60)
            took = time.monotonic() - began
        statuses = [store.status(i) for i in ids]
    finally:
        store.close()
    received = [r for m in mx.messages for r in m.rcpt_tos]
    assert len(received) == len(set(received)), received  # none went twice
    recipients = [s.recipients[0] for s in statuses]
    delivered = {r.address for r in recipients if r.state is RecipientState.DELIVERED}
    assert delivered == set(received)
    left = [r for r in recipients if r.state is not RecipientState.DELIVERED]
    # Not the rate's seconds for what it held (nor the 60 s drain timeout).
    assert took < 3, f"the stop waited {took:.1f} s for the rate: {len(left)} of {SENT} left"
    assert len(left) >= 4, received
    for r in left:  # given back untried, nothing lost
        assert r.state is RecipientState.QUEUED and r.attempts == 0, r
        assert r.next_attempt_at is not None and r.next_attempt_at > stopped_at, r
    # Each at its place in the rate's schedule, a second apart, not all due at once.
    due = sorted(r.next_attempt_at for r in left if r.next_attempt_at is not None)
    assert len(set(due)) == len(due), due


def test_a_stop_does_not_wait_for_a_connection_rate(
    smtp_server: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """One message a connection, one connection a minute: the session waiting for the
    next connection is woken by the stop, and its queue goes back untried, due at once
    (a connection rate sets no place for a message), rather than hold the stop for
    the minute, up to its whole drain timeout."""
    mx = smtp_server(host="127.0.0.34")
    dns_server.mx("fewconn.test", [(10, "mx.fewconn.test")])
    dns_server.a("mx.fewconn.test", mx.host)
    rule = DestinationRule(
        match="fewconn.test", connections_per_minute=1, messages_per_connection=1
    )
    shaping = ShapingConfig(rules=(rule,), provider_defaults=False, refresh=30)
    config = loopback_config(dns_server, mx.port, shaping=shaping, max_per_destination=1)
    store = SQLiteStore(str(tmp_path / "queue.db"))
    try:
        ms = Mailstrom(config, store=store, worker="thread")
        ms.start()
        try:
            ids = ms.send_emails([hello(f"r{i}@fewconn.test") for i in range(3)])
            mx.wait_for_messages(1, timeout=15)  # the rest waits for a connection
        finally:
            began = time.monotonic()
            ms.stop(timeout=20)
            took = time.monotonic() - began
        recipients = [store.status(i).recipients[0] for i in ids]
    finally:
        store.close()
    assert took < 3, f"the stop waited {took:.1f} s for the connection rate"
    assert len(mx.messages) == 1
    left = [r for r in recipients if r.state is not RecipientState.DELIVERED]
    assert len(left) == 2
    for r in left:
        assert r.state is RecipientState.QUEUED and r.attempts == 0, r

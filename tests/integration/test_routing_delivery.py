"""Routing policy seen through the whole path (send_email → worker → router → status):
with the default Config, mail is never delivered to this host (hardening finding #6)."""

from __future__ import annotations

from typing import Any

from mailstrom import Config, Email, RecipientState, Timeouts
from mailstrom.client import Mailstrom
from mailstrom.stores import MemoryStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import Results

FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=2, data_end=2)


def test_default_config_does_not_deliver_to_loopback(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """Hardening #6: an MX on 127.0.0.1 and an address literal [127.0.0.1] fail
    permanently (5.4.4) with the default Config; the receiver there sees no connection."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", "127.0.0.1")
    results = Results()
    config = Config(
        helo_name="client.test", smtp_port=mx.port, dns=dns_server.dns_config, timeouts=FAST
    )
    recipients = ["bob@example.org", "eve@[127.0.0.1]"]
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(
            Email(from_="app@sender.test", to=recipients, subject="Hi", text="Hello")
        )
        results.wait_final(set(recipients))
        status = ms.query_status(mid)
    for address in recipients:
        recipient = status.recipient(address)
        assert recipient.state is RecipientState.FAILED
        assert recipient.attempts == 1
        assert "127.0.0.1" in recipient.reason
        assert "allow_loopback" in recipient.reason
    assert mx.connections == 0


def test_allow_loopback_delivers_there(smtp_server: Any, dns_server: LoopbackDNS) -> None:
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", "127.0.0.1")
    results = Results()
    config = Config(
        helo_name="client.test",
        smtp_port=mx.port,
        dns=dns_server.dns_config,
        timeouts=FAST,
        allow_loopback=True,
    )
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(
            Email(from_="app@sender.test", to=["bob@example.org"], subject="Hi", text="Hello")
        )
        results.wait_final({"bob@example.org"})
        assert ms.query_status(mid).state is RecipientState.DELIVERED
    assert len(mx.wait_for_messages(1)) == 1

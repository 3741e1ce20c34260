"""Routing policy seen through the whole path (send_email → worker → router → status):
with the default Config, mail is never delivered to this host (hardening finding #6)."""

from __future__ import annotations

from typing import Any

from mailstrom import Config, Email, RecipientState, Timeouts
from mailstrom.client import Mailstrom
from mailstrom.stores import MemoryStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import Results, loopback_config

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
    mx.wait_for_messages(1)
    assert len(mx.messages) == 1


def test_an_address_source_address_cannot_reach_is_skipped(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """An IPv4 ``source_address`` cannot reach an MX host's IPv6 address: that address is
    no outcome of the destination. Was: it was tried after the IPv4 one, and its error
    ("cannot connect to ::1 port 25: no matching local address with family=AF_INET6
    found") was the recipient's reason, hiding what the server had said, and the address
    was remembered as unreachable."""
    refusing = smtp_server(greeting="554 5.7.1 No service for you")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", refusing.host)
    dns_server.aaaa("mx.test", "::1")
    config = loopback_config(dns_server, refusing.port, source_address="127.0.0.1")
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(Email(from_="app@sender.test", to=["bob@example.org"], text="Hi"))
        results.wait_final({"bob@example.org"})
        bob = ms.query_status(mid).recipient("bob@example.org")
    assert bob.state is RecipientState.DEFERRED, bob
    assert (bob.ip, bob.reply and bob.reply.code) == ("127.0.0.1", 554), bob
    assert [a.ip for a in bob.history] == ["127.0.0.1"]


def test_a_route_without_an_address_of_source_addresss_family_says_so(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """An MX host with IPv6 addresses alone, and an IPv4 ``source_address``: nothing is
    tried, and the reason names the setting rather than an address it never went to."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.aaaa("mx.test", "::1")
    config = loopback_config(dns_server, mx.port, source_address="127.0.0.1")
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(Email(from_="app@sender.test", to=["bob@example.org"], text="Hi"))
        results.wait_final({"bob@example.org"})
        bob = ms.query_status(mid).recipient("bob@example.org")
    assert bob.state is RecipientState.DEFERRED, bob
    assert "source_address" in bob.reason and "IPv4" in bob.reason, bob.reason
    assert mx.connections == 0


def test_an_address_literal_of_the_other_ip_version_says_so(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """An address literal is its own route, with no lookup to leave the address out:
    the dispatcher skips it, and the reason names ``source_address`` rather than the
    error of a connection that could not be made ("no matching local address")."""
    mx = smtp_server()
    config = loopback_config(dns_server, mx.port, source_address="127.0.0.1")
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(Email(from_="app@sender.test", to=["bob@[IPv6:::1]"], text="Hi"))
        results.wait_final({"bob@[ipv6:::1]"})
        [bob] = ms.query_status(mid).recipients
    assert bob.state is RecipientState.DEFERRED, bob
    assert "source_address" in bob.reason and "IPv4" in bob.reason, bob.reason
    assert bob.history[0].ip is None, bob.history


def test_a_source_address_this_host_does_not_have_is_no_attempt(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """A ``source_address`` that is a well-formed IP address but not one of this host's
    (moved to another machine, a typo for a neighbour) cannot be bound: this host's
    trouble, as running out of sockets is. Was: every MX address was tried and failed
    with "cannot connect to 127.0.0.1 port N: Cannot assign requested address", blaming
    the server, remembering it as unreachable, and counting an attempt each round, so
    that max_attempts bounced the mail for a local setting."""
    first = smtp_server()
    second = smtp_server(host="127.0.0.2", port=first.port)
    dns_server.mx("example.org", [(10, "mx1.test"), (20, "mx2.test")])
    dns_server.a("mx1.test", first.host)
    dns_server.a("mx2.test", second.host)
    # 192.0.2.0/24 is for documentation (RFC 5737): no host has it, so bind() fails.
    config = loopback_config(dns_server, first.port, source_address="192.0.2.55")
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(Email(from_="app@sender.test", to=["bob@example.org"], text="Hi"))
        results.wait_final({"bob@example.org"})
        bob = ms.query_status(mid).recipient("bob@example.org")
    assert bob.state is RecipientState.DEFERRED, bob
    assert bob.attempts == 0, bob
    assert "source_address 192.0.2.55" in bob.reason, bob.reason
    assert "local" in bob.reason, bob.reason
    assert first.connections == second.connections == 0

"""The doctor's socket probes on loopback: routing, a greeting, silence, a refusal."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from mailstrom.doctor import SocketNetwork
from tests.fixtures.smtp_server import ReceivingServer, ServerFactory, free_loopback_port


@pytest.fixture
def silent() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_local_address_follows_the_route_and_the_source() -> None:
    network = SocketNetwork()
    assert network.local_address("127.0.0.1", 25, None) == "127.0.0.1"
    assert network.local_address("127.0.0.1", 25, "127.0.0.2") == "127.0.0.2"


def test_probe_reads_the_greeting(smtp_server: ServerFactory) -> None:
    server: ReceivingServer = smtp_server()
    probe = SocketNetwork().probe("127.0.0.1", server.port, "127.0.0.1", 5)
    assert probe.connected
    assert probe.greeting is not None and probe.greeting.startswith("220 ")


def test_probe_silence_and_refusal(silent: int) -> None:
    quiet = SocketNetwork().probe("127.0.0.1", silent, None, 0.3)
    assert quiet.connected and quiet.timed_out and quiet.greeting is None
    assert "no greeting" in (quiet.error or "")

    refused = SocketNetwork().probe("127.0.0.1", free_loopback_port(), None, 2)
    assert not refused.connected and not refused.timed_out
    assert refused.error

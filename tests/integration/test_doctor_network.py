"""The doctor's socket probes on loopback: routing, a greeting, silence, a refusal."""

from __future__ import annotations

import socket
import threading
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


@pytest.fixture
def dripping() -> Iterator[int]:
    """A port whose server sends its greeting one octet at a time, each well within the
    probe's timeout (as an SMTP tarpit, OpenBSD's spamd for one, stutters), for 20 s."""
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                for octet in b"220 " + b"x" * 96 + b"\r\n":
                    if stop.wait(0.2):
                        return
                    try:
                        conn.sendall(bytes([octet]))
                    except OSError:
                        return

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        stop.set()
        thread.join()


def test_probe_waits_for_the_greeting_timeout_in_all(dripping: int) -> None:
    # Each octet comes within the timeout, the greeting line not: the timeout bounds the
    # wait for the greeting, not each read of it (4096 reads of up to the timeout each).
    slow = SocketNetwork().probe("127.0.0.1", dripping, None, 1)
    assert slow.connected and slow.timed_out and slow.greeting is None
    assert "no greeting within 1 s" in (slow.error or "")


@pytest.fixture
def hanging_up() -> Iterator[int]:
    """A port whose server closes each connection at once, without a word (as some
    networks that intercept port 25 do)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve() -> None:
            conn, _ = listener.accept()
            conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        thread.join()


def test_probe_closed_without_a_greeting_is_no_greeting(hanging_up: int) -> None:
    probe = SocketNetwork().probe("127.0.0.1", hanging_up, None, 5)
    assert probe.connected and probe.greeting is None and not probe.timed_out
    assert "closed" in (probe.error or "")

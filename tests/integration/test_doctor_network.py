"""The doctor's socket probes on loopback: routing, a greeting, silence, a refusal."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest

from mailstrom.doctor import DNSResolver, SenderSetup, SocketNetwork, Status, run_doctor
from mailstrom.testing.dns import LoopbackDNS
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


@pytest.fixture
def greeting_on_ipv6() -> Iterator[int]:
    """A port on ::1 whose server greets each connection, then closes it."""
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen()
        stop = threading.Event()

        def serve() -> None:
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.sendall(b"220 mx.probe.test ESMTP\r\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        stop.set()
        thread.join()


def test_an_ipv6_source_address_is_probed_over_ipv6(
    dns_server: LoopbackDNS, greeting_on_ipv6: int
) -> None:
    # Delivery bound to an IPv6 source_address reaches MX hosts over IPv6 only (an IPv4
    # address is skipped, as an MTA limited to one protocol skips it). The doctor took
    # the probe target's IPv4 address all the same, could not bind the IPv6 source to
    # it, and failed "no route", with every check of the address skipped.
    dns_server.a("mx.probe.test", "127.0.0.1")
    dns_server.aaaa("mx.probe.test", "::1")
    setup = SenderSetup(
        domain="example.com",
        helo_name="mail.example.com",
        source_address="::1",
        probe=f"mx.probe.test:{greeting_on_ipv6}",
        dnsbls=(),
    )
    report = run_doctor(setup, DNSResolver(dns_server.dns_config), SocketNetwork())
    [outgoing] = report.find("outgoing-ip")
    assert report.ip == "::1", outgoing.summary
    [port25] = report.find("port-25")
    assert port25.status is Status.PASS, port25.summary
    assert "::1" in port25.subject, port25.subject
    # A target without an address of that version is none to probe.
    dns_server.a("v4only.probe.test", "127.0.0.1")
    report = run_doctor(
        replace(setup, probe="v4only.probe.test"),
        DNSResolver(dns_server.dns_config),
        SocketNetwork(),
    )
    [port25] = report.find("port-25")
    assert port25.status is Status.FAIL, port25.summary
    assert "AAAA record" in port25.summary and "source_address ::1" in port25.summary

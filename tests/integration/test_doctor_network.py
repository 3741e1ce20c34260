"""The doctor's socket probes on loopback: routing, a greeting, silence, a refusal."""

from __future__ import annotations

import socket
import threading
import time
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
        allow_loopback=True,  # the MX host is on loopback, as the router takes it then
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


def _silent_zone(dns: LoopbackDNS) -> None:
    """A zone whose server answers for the outgoing address and the HELO name, and never
    for the sending domain, its DMARC record or the blocklist's query name."""
    dns.ptr("127.0.0.1", "mail.example.com")
    dns.a("mail.example.com", "127.0.0.1")
    dns.txt("mail.example.com", "v=spf1 a -all")
    for name in ("example.com", "_dmarc.example.com", "1.0.0.127.bl.test"):
        dns.drop(name)


def test_a_run_ends_by_its_time_limit(dns_server: LoopbackDNS, smtp_server: ServerFactory) -> None:
    # Each lookup was bounded (dns.timeout), the run not: the domain's SPF record (read,
    # then evaluated), its MX, its DMARC record and the blocklist each waited out a
    # silent server, 25 s here with a 5 s dns.timeout (minutes with the default). The
    # checks the limit cuts short, or leaves unstarted, are warnings that say so; those
    # finished before it keep their verdict.
    _silent_zone(dns_server)
    server: ReceivingServer = smtp_server()
    setup = SenderSetup(
        domain="example.com",
        helo_name="mail.example.com",
        probe=f"127.0.0.1:{server.port}",
        dnsbls=("bl.test",),
        time_limit=1.5,
    )
    config = replace(dns_server.dns_config, timeout=5.0)
    started = time.monotonic()
    report = run_doctor(setup, DNSResolver(config), SocketNetwork())
    took = time.monotonic() - started
    statuses = {(c.name, c.subject): (c.status, c.summary) for c in report.checks}
    unfinished = (Status.WARN, "not finished (time limit)")
    assert statuses[("spf", "example.com")] == unfinished
    assert statuses[("mx", "example.com")] == unfinished
    assert statuses[("dmarc", "_dmarc.example.com")] == unfinished
    assert statuses[("dnsbl", "bl.test")] == unfinished
    for check in report.checks:
        if check.summary == "not finished (time limit)":
            assert check.fix is not None and "--time-limit" in check.fix
    assert statuses[("ptr", "127.0.0.1")][0] is Status.PASS
    assert statuses[("port-25", f"127.0.0.1:{server.port}")][0] is Status.PASS
    assert report.worst is Status.WARN  # a verdict (exit 1), not "run again" or a crash
    # The bound itself, far from any scheduling noise: one dropped lookup alone is 5 s.
    assert took < 5.0, took


def test_the_port_25_probe_ends_by_the_time_limit(silent: int) -> None:
    # A probe waits its timeout for the connection and again for the greeting: within
    # what is left of the run, a silent receiver is no finding about port 25 (the probe
    # was cut short, not timed out at its own 10 s).
    setup = SenderSetup(
        domain="example.com",
        helo_name="mail.example.com",
        ip="127.0.0.1",
        probe=f"127.0.0.1:{silent}",
        dnsbls=(),
        time_limit=1.0,
    )
    with LoopbackDNS() as dns:
        report = run_doctor(setup, DNSResolver(dns.dns_config), SocketNetwork())
    [port25] = report.find("port-25")
    assert (port25.status, port25.summary) == (Status.WARN, "not finished (time limit)")


def test_a_probe_target_the_time_limit_leaves_unfound(dns_server: LoopbackDNS) -> None:
    # The address is found by routing towards the probe target: a target whose lookup
    # the limit cut short leaves the address, and the checks of it, not finished.
    dns_server.drop("probe.test")
    setup = SenderSetup(
        domain="example.com",
        helo_name="mail.example.com",
        probe="probe.test",
        dnsbls=(),
        time_limit=1.0,
    )
    resolver = DNSResolver(dns_server.dns_config)
    report = run_doctor(setup, resolver, SocketNetwork())
    for name in ("outgoing-ip", "port-25", "ptr", "helo", "spf", "spf-helo"):
        [check] = report.find(name)
        assert (check.status, check.summary) == (Status.WARN, "not finished (time limit)"), name
    # An address given with --ip is known all the same.
    report = run_doctor(replace(setup, ip="127.0.0.1"), resolver, SocketNetwork())
    [outgoing] = report.find("outgoing-ip")
    assert outgoing.status is Status.PASS, outgoing.summary
    [port25] = report.find("port-25")
    assert port25.summary == "not finished (time limit)"


@pytest.fixture
def greeting_on_both() -> Iterator[int]:
    """A port on both 127.0.0.1 and ::1 whose servers greet each connection, then close
    it: a receiver with an IPv4 and an IPv6 address."""
    listeners: list[socket.socket] = []
    for _ in range(20):  # the IPv4 port may be taken on ::1 by another test's socket
        v4 = socket.socket()
        v4.bind(("127.0.0.1", 0))
        v6 = socket.socket(socket.AF_INET6)
        try:
            v6.bind(("::1", v4.getsockname()[1]))
        except OSError:
            v4.close()
            v6.close()
            continue
        listeners = [v4, v6]
        break
    assert listeners, "no port free on both 127.0.0.1 and ::1"
    stop = threading.Event()

    def serve(listener: socket.socket) -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"220 mx.probe.test ESMTP\r\n")

    threads = []
    for listener in listeners:
        listener.listen()
        threads.append(threading.Thread(target=serve, args=(listener,), daemon=True))
        threads[-1].start()
    yield listeners[0].getsockname()[1]
    stop.set()
    for thread in threads:
        thread.join()
    for listener in listeners:
        listener.close()


def test_a_dual_stack_host_is_judged_by_each_address(
    dns_server: LoopbackDNS, greeting_on_both: int
) -> None:
    # Without source_address, delivery reaches a receiver over IPv4 or IPv6 (IPv6 when
    # IPv4 fails, or is all the receiver has), and receivers judge each address by
    # itself: Gmail refuses IPv6 mail from an address without PTR. The doctor judged the
    # IPv4 address only, and passed a host whose IPv6 mail is refused.
    dns_server.a("mx.probe.test", "127.0.0.1")
    dns_server.aaaa("mx.probe.test", "::1")
    dns_server.ptr("127.0.0.1", "mail.example.com")  # ::1 has no PTR
    dns_server.a("mail.example.com", "127.0.0.1")
    dns_server.aaaa("mail.example.com", "::1")
    dns_server.txt("mail.example.com", "v=spf1 a -all")
    dns_server.txt("example.com", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.a(
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.bl.test", "127.0.0.2"
    )
    setup = SenderSetup(
        domain="example.com",
        helo_name="mail.example.com",
        probe=f"mx.probe.test:{greeting_on_both}",
        dnsbls=("bl.test",),
        allow_loopback=True,  # the MX host is on loopback, as the router takes it then
    )
    report = run_doctor(setup, DNSResolver(dns_server.dns_config), SocketNetwork())
    outgoing = {c.subject: c.status for c in report.find("outgoing-ip")}
    assert outgoing == {"127.0.0.1": Status.WARN, "::1": Status.WARN}  # loopback: NAT?
    ports = {c.subject: c.status for c in report.find("port-25")}
    assert ports == {
        f"mx.probe.test (127.0.0.1):{greeting_on_both}": Status.PASS,
        f"mx.probe.test (::1):{greeting_on_both}": Status.PASS,
    }, report.find("port-25")
    ptr = {c.subject: c.status for c in report.find("ptr")}
    assert ptr == {"127.0.0.1": Status.PASS, "::1": Status.FAIL}, report.find("ptr")
    [v4, v6] = report.find("spf")
    assert v4.status is Status.PASS, v4.summary
    assert v6.status is Status.FAIL and "::1" in v6.summary, v6.summary
    assert v6.fix is not None and "ip6:::1" in v6.fix
    listed = {c.summary.split()[0]: c.status for c in report.find("dnsbl")}
    assert listed == {"127.0.0.1": Status.PASS, "::1": Status.FAIL}, report.find("dnsbl")
    assert report.ips == ("127.0.0.1", "::1")
    # Bound to one address, delivery leaves over its IP version only: judged alone.
    for source in ("127.0.0.1", "::1"):
        report = run_doctor(
            replace(setup, source_address=source),
            DNSResolver(dns_server.dns_config),
            SocketNetwork(),
        )
        assert [c.subject for c in report.find("ptr")] == [source]
        assert report.ips == (source,)

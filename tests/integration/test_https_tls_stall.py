"""A host that takes the TCP connection and never answers the TLS handshake: the MTA-STS
policy fetch and the TLS report POST end that connection by httpx's connect timeout, well
before their deadline, try the host's next address with the time left, say what happened,
and leave no socket behind.

Both hosts are a remote domain's choice. The callers' deadline used to cancel httpcore in
the middle of the handshake, where it closes the connection only on an ``Exception``
(not on a cancellation): each stalled fetch or POST left its socket open, in a reference
cycle, until the cyclic garbage collector ran, minutes apart in a busy worker. These tests
turn the collector off, so a socket left to it is still open when they count.

A connect timeout then ended the whole fetch or POST as if the deadline had passed: the
host's second address was never tried, and the reason said "took more than 10 s" after
4.5. A timeout once the request is sent still ends it (a report must not be posted twice).
"""

from __future__ import annotations

import asyncio
import gc
import re
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator

import dns.asyncresolver
import pytest

from mailstrom.config import MTASTSConfig
from mailstrom.mtasts import https
from mailstrom.mtasts.fetch import FETCH_ERROR, WELL_KNOWN, fetch_policy
from mailstrom.mtasts.https import CONNECT_SHARE
from mailstrom.mtasts.policy import Mode, PolicyError
from mailstrom.routing import make_resolver
from mailstrom.routing.policy import RoutePolicy
from mailstrom.tlsrpt.deliver import post_report, post_reports
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.https_server import Answer, HTTPSFactory
from tests.integration.test_tlsrpt_post import REPORT
from tests.support.open_files import open_sockets

STALLS = 8
"""Fetches (and POSTs) made to the silent host at once."""
DEADLINE = 3.0
"""The callers' deadline. httpx's connect timeout (CONNECT_SHARE of the time left when an
address is tried) must fire first: 55 % of that time lies between the two. STALLS requests
started at once on a loaded machine spent much of a 1 s deadline on their lookups (0.4 s
was left as some connected), and a loop late by the 0.2 s between the two let the deadline
come first, the reason saying so. That room grows with the deadline; the lateness does
not."""
DEADLINE_FIRST = 1.0
"""The deadline of the tests where it comes first by design, and is waited out."""
TWO_ADDRESS_DEADLINE = 1.0
"""The deadline of the tests where a second address answers: room for its handshake after
the first one's connect timeout, on a loaded machine."""
HOST = "mta-sts.example.org"
COLLECTOR = "collector.example.test"
POLICY = "version: STSv1\nmode: enforce\nmx: mx1.example.org\nmax_age: 86400\n"


@pytest.fixture
def resolver(dns_server: LoopbackDNS) -> dns.asyncresolver.Resolver:
    return make_resolver(dns_server.dns_config)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose connections the kernel completes (they wait in the
    backlog) and nobody ever reads or answers: every TLS handshake stalls."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=STALLS * 2)
    yield listener.getsockname()[1]
    listener.close()


StallAt = Callable[[int], socket.socket]


@pytest.fixture
def stall_at() -> Iterator[StallAt]:
    """``stall_at(port)``: a silent listener (as :func:`silent_port`) on 127.0.0.2 at
    ``port``, the port of an HTTPS server on 127.0.0.1, so that one name can have an
    address that stalls and one that answers. Non-blocking, for :func:`hung_up`."""
    listeners: list[socket.socket] = []

    def listen(port: int) -> socket.socket:
        listener = socket.create_server(("127.0.0.2", port))
        listener.setblocking(False)
        listeners.append(listener)
        return listener

    yield listen
    for listener in listeners:
        listener.close()


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector off for the test, so that what only it would close
    is still open when the test counts; back on (and run) afterwards."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def resource_warnings_of_garbage() -> list[str]:
    """The ResourceWarnings (unclosed socket or transport) that collecting the garbage
    left so far gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def hung_up(listener: socket.socket) -> bool:
    """Whether a connection waits in ``listener``'s backlog that its client has closed
    (what it sent can be read, then the end): one left open, to the garbage collector or
    for good, is not. (Counting this process's sockets cannot tell: the HTTPS server on
    the other address is in it too, and closes its side when its thread gets to it.)"""
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return False
    with conn:
        conn.settimeout(1.0)
        try:
            while conn.recv(65536):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return True


def connect_limit(reason: str, prefix: str) -> float:
    """The limit a "connecting took more than" ``reason`` gives, after ``prefix``."""
    found = re.fullmatch(re.escape(prefix) + r"connecting took more than ([0-9.]+) s", reason)
    assert found is not None, reason
    return float(found[1])


async def fetch_reason(
    resolver: dns.asyncresolver.Resolver, port: int, deadline: float = DEADLINE
) -> tuple[str, str]:
    config = MTASTSConfig(port=port, timeout=deadline)
    try:
        await fetch_policy(
            "example.org",
            resolver=resolver,
            config=config,
            route_policy=RoutePolicy(allow_loopback=True),
        )
    except PolicyError as exc:
        return exc.reason, exc.result_type
    raise AssertionError("a policy from a host that never answered")


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_stalled_policy_fetches_leave_no_socket_open(
    dns_server: LoopbackDNS, resolver: dns.asyncresolver.Resolver, silent_port: int
) -> None:
    dns_server.a(HOST, "127.0.0.1")
    before = open_sockets()
    reasons = await asyncio.gather(*(fetch_reason(resolver, silent_port) for _ in range(STALLS)))
    assert open_sockets() <= before
    assert resource_warnings_of_garbage() == []
    # Said as it happened: the address, and the connect timeout it went past (a share of
    # the time left after the lookup), not "took more than 0.3 s".
    for reason, result_type in reasons:
        assert result_type == FETCH_ERROR
        limit = connect_limit(reason, f"cannot fetch https://{HOST}{WELL_KNOWN}: 127.0.0.1: ")
        assert 0 < limit <= round(DEADLINE * CONNECT_SHARE, 3)


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_a_handshake_the_deadline_cancels_leaves_no_socket_open(
    dns_server: LoopbackDNS,
    resolver: dns.asyncresolver.Resolver,
    silent_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx's connect timeout ends a stalled handshake first, closing its socket, only
    when the event loop is on time: on a loaded machine the caller's deadline, a tenth of
    the time later, came first as often (both due in one turn of a late loop), cancelled
    httpcore half-way through the handshake, and left the socket open until the garbage
    collector ran. Here the deadline always comes first."""
    monkeypatch.setattr(https, "CONNECT_SHARE", 1.0)
    dns_server.a(HOST, "127.0.0.1")
    before = open_sockets()
    reasons = await asyncio.gather(
        *(fetch_reason(resolver, silent_port, DEADLINE_FIRST) for _ in range(STALLS))
    )
    assert open_sockets() <= before
    assert resource_warnings_of_garbage() == []
    assert {result_type for _, result_type in reasons} == {FETCH_ERROR}


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_stalled_report_posts_leave_no_socket_open(
    resolver: dns.asyncresolver.Resolver, silent_port: int
) -> None:
    before = open_sockets()
    problems = await post_reports(
        [(REPORT, f"https://127.0.0.1:{silent_port}/tlsrpt")] * STALLS,
        resolver=resolver,
        allow_loopback=True,
        timeout=DEADLINE,
    )
    assert open_sockets() <= before
    assert resource_warnings_of_garbage() == []
    for problem in problems:
        assert problem is not None
        assert 0 < connect_limit(problem, "127.0.0.1: ") <= round(DEADLINE * CONNECT_SHARE, 3)


async def test_the_next_address_gets_the_time_left_after_a_refused_one(
    dns_server: LoopbackDNS,
    resolver: dns.asyncresolver.Resolver,
    https_server: HTTPSFactory,
    client_tls_context: ssl.SSLContext,
) -> None:
    # The request's timeouts come from the time left to the fetch's deadline, taken when
    # each address is tried: the first refuses at once, the second has nearly all of it.
    server = https_server(names=(HOST,))
    server.policy(POLICY)
    dns_server.a(HOST, "127.0.0.2", "127.0.0.1")  # nothing listens on 127.0.0.2
    config = MTASTSConfig(port=server.port, tls_context=client_tls_context, timeout=DEADLINE)
    policy = await fetch_policy(
        "example.org",
        resolver=resolver,
        config=config,
        route_policy=RoutePolicy(allow_loopback=True),
    )
    assert policy.mode is Mode.ENFORCE
    assert server.count() == 1


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_a_policy_is_fetched_from_the_next_address_when_the_first_stalls(
    dns_server: LoopbackDNS,
    resolver: dns.asyncresolver.Resolver,
    https_server: HTTPSFactory,
    client_tls_context: ssl.SSLContext,
    stall_at: StallAt,
) -> None:
    # The first address's connect timeout ended the whole fetch: a host with a second
    # address that works had no policy, with more than half the time left.
    server = https_server(names=(HOST,))
    server.policy(POLICY)
    stalled = stall_at(server.port)
    dns_server.a(HOST, "127.0.0.2", "127.0.0.1")
    config = MTASTSConfig(
        port=server.port, tls_context=client_tls_context, timeout=TWO_ADDRESS_DEADLINE
    )
    started = time.monotonic()
    policy = await fetch_policy(
        "example.org",
        resolver=resolver,
        config=config,
        route_policy=RoutePolicy(allow_loopback=True),
    )
    took = time.monotonic() - started
    assert hung_up(stalled)  # tried first, and its connection closed, not left to the gc
    assert resource_warnings_of_garbage() == []
    assert policy.mode is Mode.ENFORCE
    assert server.count() == 1
    # The stall cost its connect timeout, about 45 % of the deadline, not all of it.
    assert CONNECT_SHARE * TWO_ADDRESS_DEADLINE * 0.8 < took < 0.8 * TWO_ADDRESS_DEADLINE


async def test_a_policy_host_that_never_answers_the_request_takes_the_deadline(
    dns_server: LoopbackDNS,
    resolver: dns.asyncresolver.Resolver,
    https_server: HTTPSFactory,
    client_tls_context: ssl.SSLContext,
) -> None:
    # Connected, request sent, no answer: that one did reach the fetch's deadline, and
    # the reason says so.
    server = https_server(names=(HOST,))
    server.policy(POLICY, hang=True)
    dns_server.a(HOST, "127.0.0.1")
    config = MTASTSConfig(port=server.port, tls_context=client_tls_context, timeout=DEADLINE_FIRST)
    with pytest.raises(PolicyError) as caught:
        await fetch_policy(
            "example.org",
            resolver=resolver,
            config=config,
            route_policy=RoutePolicy(allow_loopback=True),
        )
    took = f"fetching https://{HOST}{WELL_KNOWN} took more than {DEADLINE_FIRST:g} s"
    assert caught.value.reason == took


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_a_report_is_posted_to_the_next_address_when_the_first_stalls(
    dns_server: LoopbackDNS,
    resolver: dns.asyncresolver.Resolver,
    https_server: HTTPSFactory,
    client_tls_context: ssl.SSLContext,
    stall_at: StallAt,
) -> None:
    # Nothing was sent to the stalled address, so the next one may have the report: once.
    collector = https_server(names=(COLLECTOR,))
    collector.routes["/tlsrpt"] = Answer(status=202)
    stalled = stall_at(collector.port)
    dns_server.a(COLLECTOR, "127.0.0.2", "127.0.0.1")
    started = time.monotonic()
    problem = await post_report(
        REPORT,
        f"https://{COLLECTOR}:{collector.port}/tlsrpt",
        resolver=resolver,
        allow_loopback=True,
        context=client_tls_context,
        timeout=TWO_ADDRESS_DEADLINE,
    )
    took = time.monotonic() - started
    assert hung_up(stalled)
    assert resource_warnings_of_garbage() == []
    assert problem is None
    [post] = collector.requests
    assert post.body == REPORT.gzipped()
    assert CONNECT_SHARE * TWO_ADDRESS_DEADLINE * 0.8 < took < 0.8 * TWO_ADDRESS_DEADLINE

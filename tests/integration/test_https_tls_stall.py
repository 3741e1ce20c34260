"""A host that takes the TCP connection and never answers the TLS handshake: the MTA-STS
policy fetch and the TLS report POST fail at their deadline with the reason they always
gave, and leave no socket behind.

Both hosts are a remote domain's choice. The callers' deadline used to cancel httpcore in
the middle of the handshake, where it closes the connection only on an ``Exception``
(not on a cancellation): each stalled fetch or POST left its socket open, in a reference
cycle, until the cyclic garbage collector ran, minutes apart in a busy worker. These tests
turn the collector off, so a socket left to it is still open when they count.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import warnings
from collections.abc import Iterator

import dns.asyncresolver
import pytest

from mailstrom.config import MTASTSConfig
from mailstrom.mtasts.fetch import FETCH_ERROR, WELL_KNOWN, fetch_policy
from mailstrom.mtasts.policy import Mode, PolicyError
from mailstrom.routing import make_resolver
from mailstrom.routing.policy import RoutePolicy
from mailstrom.tlsrpt.deliver import post_reports
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.https_server import HTTPSFactory
from tests.integration.test_tlsrpt_post import REPORT
from tests.support.open_files import open_sockets

STALLS = 8
"""Fetches (and POSTs) made to the silent host at once."""
DEADLINE = 0.3
HOST = "mta-sts.example.org"
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


async def fetch_reason(resolver: dns.asyncresolver.Resolver, port: int) -> tuple[str, str]:
    config = MTASTSConfig(port=port, timeout=DEADLINE)
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
    took = f"fetching https://{HOST}{WELL_KNOWN} took more than {DEADLINE:g} s"
    assert reasons == [(took, FETCH_ERROR)] * STALLS


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
    no_answer = f"no answer within {DEADLINE:g} s (lookup, connection, request and answer head)"
    assert problems == [no_answer] * STALLS


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

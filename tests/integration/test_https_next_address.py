"""Which of httpx's timeouts let the MTA-STS fetch and the TLS report POST try the host's
next address: a ``ConnectTimeout`` only (nothing was sent). After any other, the request
may have arrived, and a report posted again would count twice.

httpx's own transport is replaced by one that raises the timeout for the first address:
a real read timeout cannot come before the deadline that cancels the request (both end
at the same moment), so only this way does the test see what each kind of timeout does.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import dns.asyncresolver
import httpx
import pytest

from mailstrom.config import MTASTSConfig
from mailstrom.mtasts import https
from mailstrom.mtasts.fetch import WELL_KNOWN, fetch_policy
from mailstrom.mtasts.policy import Mode, PolicyError
from mailstrom.routing import make_resolver
from mailstrom.routing.policy import RoutePolicy
from mailstrom.tlsrpt.deliver import post_report
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_tlsrpt_post import REPORT
from tests.support.resolver import ScriptedResolver

HOST = "mta-sts.example.org"
COLLECTOR = "collector.example.test"
FIRST, SECOND = "127.0.0.2", "127.0.0.3"
POLICY = b"version: STSv1\nmode: enforce\nmx: mx1.example.org\nmax_age: 86400\n"
TIMEOUT = 2.0
AFTER_SENDING = [httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout]


@pytest.fixture
def resolver(dns_server: LoopbackDNS) -> dns.asyncresolver.Resolver:
    dns_server.a(HOST, FIRST, SECOND)
    dns_server.a(COLLECTOR, FIRST, SECOND)
    return make_resolver(dns_server.dns_config)


class FirstAddressTimesOut:
    """Requests made through :func:`https.client`, answered without a network: the first
    address raises ``timeout``, the others answer 200 with the policy."""

    def __init__(self, timeout: type[httpx.TimeoutException]) -> None:
        self.timeout = timeout
        self.tried: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.tried.append(request.url.host)
        if request.url.host == FIRST:
            raise self.timeout("timed out", request=request)
        return httpx.Response(
            200, headers={"Content-Type": "text/plain"}, stream=httpx.ByteStream(POLICY)
        )

    def client(
        self, verify: ssl.SSLContext, timeout: float, source_address: str | None = None
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))


Install = Callable[[type[httpx.TimeoutException]], FirstAddressTimesOut]


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Install:
    """``network(timeout)``: :class:`FirstAddressTimesOut` in place of httpx's network
    for the test."""

    def install(timeout: type[httpx.TimeoutException]) -> FirstAddressTimesOut:
        fake = FirstAddressTimesOut(timeout)
        monkeypatch.setattr(https, "client", fake.client)
        return fake

    return install


async def fetch(resolver: dns.asyncresolver.Resolver) -> Mode:
    policy = await fetch_policy(
        "example.org",
        resolver=resolver,
        config=MTASTSConfig(timeout=TIMEOUT),
        route_policy=RoutePolicy(allow_loopback=True),
    )
    return policy.mode


async def post(resolver: dns.asyncresolver.Resolver) -> str | None:
    return await post_report(
        REPORT,
        f"https://{COLLECTOR}/tlsrpt",
        resolver=resolver,
        allow_loopback=True,
        timeout=TIMEOUT,
    )


async def test_a_fetch_whose_connect_timed_out_tries_the_next_address(
    resolver: dns.asyncresolver.Resolver, network: Install
) -> None:
    fake = network(httpx.ConnectTimeout)
    assert await fetch(resolver) is Mode.ENFORCE
    assert fake.tried == [FIRST, SECOND]


@pytest.mark.parametrize("timeout", AFTER_SENDING)
async def test_a_fetch_that_timed_out_after_connecting_ends_there(
    resolver: dns.asyncresolver.Resolver,
    network: Install,
    timeout: type[httpx.TimeoutException],
) -> None:
    fake = network(timeout)
    with pytest.raises(PolicyError) as caught:
        await fetch(resolver)
    assert caught.value.reason == f"fetching https://{HOST}{WELL_KNOWN} took more than 2 s"
    assert fake.tried == [FIRST]


async def test_a_post_whose_connect_timed_out_goes_to_the_next_address(
    resolver: dns.asyncresolver.Resolver, network: Install
) -> None:
    fake = network(httpx.ConnectTimeout)
    assert await post(resolver) is None
    assert fake.tried == [FIRST, SECOND]


@pytest.mark.parametrize("timeout", AFTER_SENDING)
async def test_a_post_that_timed_out_after_connecting_is_not_made_again(
    resolver: dns.asyncresolver.Resolver,
    network: Install,
    timeout: type[httpx.TimeoutException],
) -> None:
    fake = network(timeout)
    problem = await post(resolver)
    assert problem == "no answer within 2 s (lookup, connection, request and answer head)"
    assert fake.tried == [FIRST]


class CountingPolicy:
    """A route policy (loopback allowed) that counts the addresses it is asked about."""

    def __init__(self) -> None:
        self.policy = RoutePolicy(allow_loopback=True)
        self.asked = 0

    @property
    def ip_version(self) -> int | None:
        return self.policy.ip_version

    def refused(self, address: str) -> str | None:
        self.asked += 1
        return self.policy.refused(address)


async def test_thousands_of_addresses_cost_only_the_ones_that_can_be_tried() -> None:
    """A zone answering with thousands of addresses for the policy host (a 64 KB answer
    over TCP) costs work for the few addresses a fetch may try, not for all of them (the
    list once kept every address and searched it for each new one: quadratic)."""
    resolver = ScriptedResolver()
    resolver.a(HOST, *(f"127.{i // 250}.{i % 250}.1" for i in range(4000)))
    resolver.aaaa(HOST, *(f"2001:db8::{i + 1:x}" for i in range(2000)))
    policy = CountingPolicy()
    found = await https.usable_addresses(resolver, HOST, policy)  # type: ignore[arg-type]
    assert found == [f"127.0.{i}.1" for i in range(https.MAX_ADDRESSES)]
    assert policy.asked == https.MAX_ADDRESSES

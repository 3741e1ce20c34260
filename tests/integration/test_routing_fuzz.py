"""No zone a domain's owner can publish makes :class:`Router` misbehave.

The DNS of any domain an application mails to is controlled by whoever owns it. Here a
real DNS server on loopback (:class:`~mailstrom.testing.dns.LoopbackDNS`) serves a
hypothesis-generated zone for the destination domain and the hosts it names: any mix of
MX records (equal preferences, preference 65535, IP-literal-looking exchanges, odd but
legal labels such as ``\\000`` or ``-``, the root, the domain itself, more records than the
limits), null MX, CNAMEs (chains, loops, MX to an alias), A and AAAA records (loopback,
unspecified, link-local, multicast, broadcast, IPv4-mapped, ordinary, or many), empty
answers, SERVFAIL, NXDOMAIN, a wildcard MX and queries never answered; with TTLs from 0 to
2**31-1. A router built as the worker builds it (with both values of ``allow_loopback``
and various limits) then routes the domain, asks its cache, and routes it again:

1. every call returns a :class:`Route` or raises a :class:`TemporaryFailure` /
   :class:`PermanentFailure`, never another exception, with a short message;
2. every address of a route is one the policy allows, the route holds at most
   ``mx_address_limit`` of them, every host has one, preferences never decrease;
3. the DNS work is bounded: no more (name, type) pairs are queried than the MX query plus
   A and AAAA of the hosts considered (each at most twice: UDP, then TCP after a
   truncated answer), and never more than ``max_dns_queries`` are in flight;
4. each call ends within a bound set by the (short) DNS timeout.

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (120 by default), for a longer
search by hand (pytest-timeout's 120 s is for the whole test, so lift it):
``MAILSTROM_FUZZ_EXAMPLES=3000 pytest --timeout=0 tests/integration/test_routing_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import dns.asyncresolver
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailstrom import Config
from mailstrom.errors import PermanentFailure, TemporaryFailure
from mailstrom.routing import Route, Router, make_resolver
from mailstrom.routing.lookup import MAX_TTL
from mailstrom.testing.dns import LoopbackDNS

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "120"))
TIMEOUT = 0.5
"""DNS seconds per route (``DNSConfig.timeout``): what a dropped query costs."""
BOUND = TIMEOUT + 2.0
"""Longest one call may take: the route's DNS time plus room for a loaded machine."""
LONGEST_MESSAGE = 2000
"""An error names a few hosts and addresses at most, never the whole hostile answer."""

TARGET = "target.test"
HOSTS = tuple(f"h{i}.{TARGET}" for i in range(6))
ODD_NAMES = (
    TARGET,  # the domain is its own MX
    "192.0.2.1",  # an MX "exchange" that is an address written as a name
    "127.0.0.1",
    "\\000.target.test",
    "-.target.test",
    "a\\.b.target.test",  # a label holding a dot
    "\\195\\169\\032.target.test",  # UTF-8 and a space (dnslib drops non-UTF-8 names)
    "x" * 63 + ".target.test",
    ".".join(["y" * 63] * 3) + ".test",  # 253 octets
    "localhost",
    "absent.test",  # never in the zone: NXDOMAIN
)
NAMES = HOSTS + ODD_NAMES
V4 = (
    "0.0.0.0",
    "0.1.2.3",
    "127.0.0.1",
    "127.255.255.254",
    "169.254.1.1",
    "255.255.255.255",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "10.0.0.1",
    "192.0.2.1",
    "198.51.100.7",
)
V6 = (
    "::",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:0.0.0.0",
    "::ffff:169.254.0.1",
    "fe80::1",
    "ff02::1",
    "::127.0.0.1",
    "64:ff9b::7f00:1",
    "2001:db8::1",
    "fc00::1",
)
TTLS = (0, 1, 300, 2**31 - 1, 2**32 - 1)  # the last has the bit RFC 2181 §8 forbids


# --- the zone ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Op:
    """One call on the server's zone: ``getattr(dns, method)(*args, **kwargs)``."""

    method: str
    args: tuple[Any, ...]
    ttl: int | None = None

    def apply(self, server: LoopbackDNS) -> None:
        kwargs = {} if self.ttl is None else {"ttl": self.ttl}
        getattr(server, self.method)(*self.args, **kwargs)


names = st.sampled_from(NAMES)
ttls = st.sampled_from(TTLS) | st.integers(0, 2**31 - 1)
preferences = st.sampled_from((0, 1, 10, 65535)) | st.integers(0, 65535)
# Mostly the hosts that the zone gives a shape, so that routes are found.
exchanges = st.sampled_from(HOSTS[:3]) | st.sampled_from(HOSTS[:3]) | names | st.just(".")
v4 = st.sampled_from(V4) | st.ip_addresses(v=4).map(str)
v6 = st.sampled_from(V6) | st.ip_addresses(v=6).map(str)
mx_lists = st.lists(st.tuples(preferences, exchanges), max_size=30)
# Many records of one preference: beyond every limit, often a truncated answer.
crowds = st.integers(6, 60).map(lambda n: [(10, h) for h in HOSTS] * (n // len(HOSTS)))


def _mx(name: str, hosts: list[tuple[int, str]], ttl: int) -> Op:
    # "." is the root: LoopbackDNS.mx serves "" as the root name.
    return Op("mx", (name, [(p, "" if h == "." else h) for p, h in hosts]), ttl)


def _a(name: str, ips: list[str], ttl: int) -> Op:
    return Op("a", (name, *ips), ttl)


def _aaaa(name: str, ips: list[str], ttl: int) -> Op:
    return Op("aaaa", (name, *ips), ttl)


def addresses(name: str) -> st.SearchStrategy[list[Op]]:
    """A and AAAA records (either may be an empty answer or missing)."""
    a = st.builds(_a, st.just(name), st.lists(v4, max_size=12), ttls)
    aaaa = st.builds(_aaaa, st.just(name), st.lists(v6, max_size=12), ttls)
    return st.lists(a | aaaa, min_size=1, max_size=2)


def trouble(name: str) -> st.SearchStrategy[list[Op]]:
    """Anything but addresses: an alias, a failure, nothing."""
    one = st.one_of(
        st.builds(lambda to, t: Op("cname", (name, to), t), names, ttls),
        st.builds(
            lambda ty: Op("servfail", (name, ty)), st.sampled_from((None, "MX", "A", "AAAA"))
        ),
        st.just(Op("nxdomain", (name,))),
        st.just(Op("txt", (name, "v=spf1 -all"))),  # exists, with nothing useful
        st.builds(lambda t: Op("null_mx", (name,), t), ttls),
    )
    return st.lists(one, min_size=1, max_size=2)


def node(name: str) -> st.SearchStrategy[list[Op]]:
    """What the zone holds for ``name``: usually addresses, else trouble or nothing."""
    return st.one_of(addresses(name), addresses(name), trouble(name), st.just([]))


def target() -> st.SearchStrategy[list[Op]]:
    mx = st.builds(_mx, st.just(TARGET), mx_lists | crowds, ttls).map(lambda op: [op])
    return st.one_of(mx, mx, mx, node(TARGET))


# Any single change on top: a record of any kind for any name, or a wildcard MX.
ops = st.one_of(
    st.builds(_mx, names, mx_lists, ttls),
    names.flatmap(addresses).map(lambda ops: ops[0]),
    names.flatmap(trouble).map(lambda ops: ops[0]),
    st.builds(lambda hosts, t: Op("wildcard_mx", (hosts,), t), mx_lists, ttls),
)
# A dropped query costs the whole DNS timeout: rare, so the default run stays short.
drops = st.builds(lambda n: Op("drop", (n,)), names)


@st.composite
def zones(draw: st.DrawFn) -> list[Op]:
    zone = draw(target())
    for name in draw(st.lists(names, max_size=5, unique=True)) + list(HOSTS[:3]):
        zone += draw(node(name))
    zone += draw(st.lists(ops, max_size=3))
    if draw(st.integers(0, 14)) == 0:
        zone.append(draw(drops))
    return zone


@dataclass(frozen=True, slots=True)
class Setup:
    allow_loopback: bool
    mx_address_limit: int
    mx_host_limit: int | None
    max_dns_queries: int | None
    """None: build the router with ``Router.for_config``, as the worker does."""
    domain: str


LITERALS = (
    tuple(f"[{ip}]" for ip in V4)
    + tuple(f"[IPv6:{ip}]" for ip in V6)
    + (
        "[IPv6:fe80::1%eth0]",
        "[IPv6:2001:db8::1%lo]",
        "[::1]",
        "[127.1]",
        "[IPv6:127.0.0.1]",
        "[]",
    )
)
domains = st.one_of(
    st.sampled_from((TARGET, "TARGET.Test.", "h0.target.test", " target.test", "target.test..")),
    st.sampled_from(LITERALS),
    st.sampled_from(NAMES),
    st.text(max_size=40),
)
setups = st.builds(
    Setup,
    allow_loopback=st.booleans(),
    mx_address_limit=st.integers(1, 6),
    mx_host_limit=st.none() | st.integers(1, 12),
    max_dns_queries=st.none() | st.integers(2, 12),
    domain=st.one_of(st.just(TARGET), st.just(TARGET), st.just(TARGET), domains),
)


# --- the run -------------------------------------------------------------------------------


class SkewedClock:
    """The monotonic clock, plus however far the test has skipped ahead."""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skew


class Counting:
    """Wraps a resolver's ``resolve`` to see how many queries are in flight at once."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolve = resolver.resolve
        self.in_flight = 0
        self.most = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            return await self.resolve(*args, **kwargs)
        finally:
            self.in_flight -= 1


def make_router(server: LoopbackDNS, setup: Setup, clock: SkewedClock) -> tuple[Router, Counting]:
    config = Config(
        helo_name="client.test",
        dns=replace(server.dns_config, timeout=TIMEOUT),
        allow_loopback=setup.allow_loopback,
        mx_address_limit=setup.mx_address_limit,
    )
    resolver = make_resolver(config.dns)
    counting = Counting(resolver)
    resolver.resolve = counting  # type: ignore[method-assign]
    if setup.max_dns_queries is None and setup.mx_host_limit is None:
        return Router.for_config(config, resolver=resolver, clock=clock), counting
    router = Router(
        config.dns,
        allow_loopback=setup.allow_loopback,
        mx_address_limit=setup.mx_address_limit,
        mx_host_limit=setup.mx_host_limit,
        max_dns_queries=setup.max_dns_queries or 10,
        resolver=resolver,
        clock=clock,
    )
    return router, counting


def check_route(router: Router, route: Route) -> None:
    policy = router.policy
    assert route.hosts, route
    assert len(route.addresses) <= policy.mx_address_limit, route
    for host in route.hosts:
        assert host.addresses, route
        assert 0 <= host.preference <= 65535
    preferences = [h.preference for h in route.hosts]
    assert preferences == sorted(preferences), route
    for address in route.addresses:
        ipaddress.ip_address(address)  # a real address, not text that looks like one
        assert policy.refused(address) is None, (address, route)


def check_error(exc: TemporaryFailure | PermanentFailure) -> str:
    assert len(str(exc)) <= LONGEST_MESSAGE, str(exc)[:300]
    first = "4" if isinstance(exc, TemporaryFailure) else "5"
    assert exc.enhanced is None or exc.enhanced.startswith(first), exc.enhanced
    return type(exc).__name__


def check_queries(server: LoopbackDNS, router: Router, counting: Counting) -> None:
    policy = router.policy
    pairs = 1 + 2 * policy.hosts_considered  # MX, then A and AAAA of each host
    counts = server.query_counts()
    assert len(counts) <= pairs, counts
    assert all(n <= 2 for n in counts.values()), counts  # UDP, then TCP if truncated
    assert counting.most <= policy.max_dns_queries, counting.most
    server.reset_counts()
    counting.most = 0


async def call(what: str, router: Router, domain: str) -> str:
    started = time.monotonic()
    try:
        if what == "cached":
            route = router.cached(domain)
            if route is None:
                return "not cached"
        else:
            route = await asyncio.wait_for(router.route(domain), BOUND * 2)
    except (TemporaryFailure, PermanentFailure) as exc:
        return check_error(exc)
    except TimeoutError:
        raise AssertionError(f"route({domain!r}) hung") from None
    finally:
        elapsed = time.monotonic() - started
        assert elapsed <= BOUND, f"{what}({domain!r}) took {elapsed:.2f} s"
    check_route(router, route)
    return "route"


async def run(server: LoopbackDNS, setup: Setup) -> list[str]:
    clock = SkewedClock()
    router, counting = make_router(server, setup, clock)
    outcomes = []
    for what in ("route", "cached", "route"):
        outcomes.append(await call(what, router, setup.domain))
        check_queries(server, router, counting)
    # Whatever TTL the zone gave, DNS is asked again after MAX_TTL (address literals,
    # which no DNS answer can change, are the only routes known for good).
    clock.skew += MAX_TTL + 1
    after = await call("cached", router, setup.domain)
    assert after == "not cached" or setup.domain.startswith("["), after
    return outcomes


@pytest.fixture(scope="module")
def server() -> Iterator[LoopbackDNS]:
    # One server for every example (starting one costs more than the example itself).
    with LoopbackDNS() as dns_server:
        yield dns_server


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(zone=zones(), setup=setups)
def test_no_zone_makes_the_router_misbehave(
    server: LoopbackDNS, zone: list[Op], setup: Setup
) -> None:
    server.reset()
    for op in zone:
        op.apply(server)
    server.reset_counts()
    outcomes = asyncio.run(run(server, setup))
    event(" / ".join(outcomes))


def test_the_fuzz_zone_serves_odd_names_as_they_are(server: LoopbackDNS) -> None:
    """What the generators rely on: LoopbackDNS puts odd labels on the wire unchanged."""
    server.reset()
    server.mx(TARGET, [(10, name) for name in ODD_NAMES[3:7]])
    for name in ODD_NAMES[3:7]:
        server.a(name, "192.0.2.9")
    router = Router(replace(server.dns_config, timeout=2.0), rng=random.Random(0))
    route = asyncio.run(router.route(TARGET))
    assert sorted(h.name for h in route.hosts) == sorted(ODD_NAMES[3:7])

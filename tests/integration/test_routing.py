"""The router against a real DNS server on loopback (tests/fixtures/dns_server.py)."""

from __future__ import annotations

import asyncio
import fcntl
import random
import select
import socket
import struct
import termios
import threading
import time
from dataclasses import replace

import dns.asyncquery
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from mailstrom.config import Config
from mailstrom.errors import PermanentFailure, TemporaryFailure
from mailstrom.routing import Route, Router
from mailstrom.routing.lookup import NEGATIVE_TTL
from mailstrom.testing.dns import _TCPServer
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.deadline import Hang, hang_guard


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def names(route: Route) -> list[str]:
    return [h.name for h in route.hosts]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def router(dns_server: LoopbackDNS, clock: FakeClock) -> Router:
    # These tests use 127.0.0.x as stand-ins for real addresses (nothing connects).
    return Router(dns_server.dns_config, allow_loopback=True, clock=clock, rng=random.Random(0))


async def test_mx_hosts_come_in_preference_order(dns_server: LoopbackDNS, router: Router) -> None:
    dns_server.mx("example.org", [(30, "mx3.example.org"), (10, "mx1.example.org"),
                                  (20, "mx2.example.net")])  # fmt: skip
    dns_server.a("mx1.example.org", "127.0.0.1")
    dns_server.a("mx2.example.net", "127.0.0.2")
    dns_server.a("mx3.example.org", "127.0.0.3")
    route = await router.route("example.org")
    assert route.domain == "example.org"
    assert not route.implicit
    assert names(route) == ["mx1.example.org", "mx2.example.net", "mx3.example.org"]
    assert [h.preference for h in route.hosts] == [10, 20, 30]
    assert route.addresses == ("127.0.0.1", "127.0.0.2", "127.0.0.3")


async def test_equal_preferences_are_shuffled_with_the_rng(dns_server: LoopbackDNS) -> None:
    dns_server.mx("example.org", [(10, "a.example.org"), (10, "b.example.org"),
                                  (10, "c.example.org"), (5, "first.example.org")])  # fmt: skip
    for host in ("a", "b", "c", "first"):
        dns_server.a(f"{host}.example.org", "127.0.0.1")

    async def orders(seed: int) -> list[tuple[str, ...]]:
        router = Router(dns_server.dns_config, allow_loopback=True, rng=random.Random(seed))
        return [tuple(names(await router.route("example.org"))) for _ in range(30)]

    seen = await orders(42)
    assert all(order[0] == "first.example.org" for order in seen)
    assert {frozenset(order[1:]) for order in seen} == {
        frozenset({"a.example.org", "b.example.org", "c.example.org"})
    }
    # Shuffled on every call, although the route is cached after the first lookup...
    assert len(set(seen)) > 1
    assert dns_server.queries("example.org", "MX") == 1
    # ...and reproducibly for a seeded rng.
    assert await orders(42) == seen


async def test_a_hosts_addresses_are_shuffled_on_every_use(dns_server: LoopbackDNS) -> None:
    """The addresses of one host are as equal as hosts of one preference (RFC 5321 §5.1
    wants load spread over them; Postfix's smtp_randomize_addresses shuffles them). They
    kept the order of the one DNS answer the cached route came from, so every new
    connection for up to a day went to the same first address of a single-MX domain.
    IPv4 still comes before IPv6, and an implicit MX is shuffled the same way."""
    dns_server.mx("example.org", [(10, "mx.example.org")])
    dns_server.a("mx.example.org", "127.0.0.1", "127.0.0.2", "127.0.0.3")
    dns_server.aaaa("mx.example.org", "::1", "::2")
    dns_server.a("direct.example.org", "127.0.0.4", "127.0.0.5")
    router = Router(dns_server.dns_config, allow_loopback=True, rng=random.Random(7))
    routes = [await router.route("example.org") for _ in range(30)]
    assert dns_server.queries("example.org", "MX") == 1
    assert {r.addresses[0] for r in routes} == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}
    assert {r.addresses[3] for r in routes} == {"::1", "::2"}
    assert {frozenset(r.addresses[:3]) for r in routes} == {
        frozenset({"127.0.0.1", "127.0.0.2", "127.0.0.3"})
    }
    implicit = [await router.route("direct.example.org") for _ in range(30)]
    assert {r.addresses for r in implicit} == {
        ("127.0.0.4", "127.0.0.5"),
        ("127.0.0.5", "127.0.0.4"),
    }


async def test_hosts_without_addresses_are_skipped_for_backups(
    dns_server: LoopbackDNS, router: Router
) -> None:
    dns_server.mx("example.org", [(10, "gone.example.org"), (20, "empty.example.org"),
                                  (30, "backup.example.org")])  # fmt: skip
    dns_server.txt("empty.example.org", "a name without addresses")
    dns_server.a("backup.example.org", "127.0.0.9")
    route = await router.route("example.org")
    assert names(route) == ["backup.example.org"]
    assert route.addresses == ("127.0.0.9",)


async def test_mx_hosts_all_without_addresses_is_temporary(
    dns_server: LoopbackDNS, router: Router
) -> None:
    dns_server.mx("example.org", [(10, "gone.example.org"), (20, "gone2.example.org")])
    with pytest.raises(TemporaryFailure) as info:
        await router.route("example.org")
    assert info.value.enhanced == "4.4.4"
    # Not cached: the next call asks again.
    with pytest.raises(TemporaryFailure):
        await router.route("example.org")
    assert dns_server.queries("example.org", "MX") == 2


async def test_ipv4_and_ipv6_addresses_are_all_kept_ipv4_first(
    dns_server: LoopbackDNS, router: Router
) -> None:
    dns_server.mx("example.org", [(10, "mx.example.org")])
    dns_server.aaaa("mx.example.org", "::1", "fe80::1")
    dns_server.a("mx.example.org", "127.0.0.1", "127.0.0.2")
    route = await router.route("example.org")
    assert route.hosts[0].addresses == ("127.0.0.1", "127.0.0.2", "::1", "fe80::1")


async def test_ipv6_only_host(dns_server: LoopbackDNS, router: Router) -> None:
    dns_server.mx("example.org", [(10, "mx.example.org")])
    dns_server.aaaa("mx.example.org", "::1")
    route = await router.route("example.org")
    assert route.addresses == ("::1",)


async def test_no_mx_uses_the_domains_own_addresses(
    dns_server: LoopbackDNS, router: Router
) -> None:
    dns_server.a("example.org", "127.0.0.5")
    dns_server.aaaa("example.org", "::1")
    route = await router.route("Example.ORG")
    assert route.implicit
    assert names(route) == ["example.org"]
    assert route.hosts[0].preference == 0
    assert route.addresses == ("127.0.0.5", "::1")


async def test_no_mx_and_no_address_is_permanent(dns_server: LoopbackDNS, router: Router) -> None:
    dns_server.txt("example.org", "v=spf1 -all")
    with pytest.raises(PermanentFailure) as info:
        await router.route("example.org")
    assert info.value.enhanced == "5.4.4"


async def test_null_mx_is_permanent(dns_server: LoopbackDNS, router: Router) -> None:
    dns_server.null_mx("example.org")
    dns_server.a("example.org", "127.0.0.1")  # must not be used as an implicit MX
    with pytest.raises(PermanentFailure, match=r"accepts no mail \(null MX\)") as info:
        await router.route("example.org")
    assert info.value.code == 556
    assert info.value.enhanced == "5.1.10"


async def test_several_null_mx_records_are_a_null_mx(
    dns_server: LoopbackDNS, router: Router
) -> None:
    """Found while fuzzing: "MX 0 ." and "MX 10 ." together were read as MX hosts without
    addresses, a temporary failure retried for days, not as the refusal they spell."""
    dns_server.mx("example.org", [(0, "."), (10, ".")])
    with pytest.raises(PermanentFailure, match=r"accepts no mail \(null MX\)") as info:
        await router.route("example.org")
    assert info.value.code == 556
    assert info.value.enhanced == "5.1.10"


async def test_null_mx_beside_real_mx_is_ignored(dns_server: LoopbackDNS, router: Router) -> None:
    dns_server.mx("example.org", [(0, "."), (10, "mx.example.org")])
    dns_server.a("mx.example.org", "127.0.0.1")
    assert names(await router.route("example.org")) == ["mx.example.org"]


async def test_nxdomain_is_permanent(dns_server: LoopbackDNS, router: Router) -> None:
    with pytest.raises(PermanentFailure, match="does not exist") as info:
        await router.route("nowhere.example")
    assert info.value.enhanced == "5.1.2"


async def test_servfail_is_temporary(dns_server: LoopbackDNS, router: Router) -> None:
    dns_server.servfail("example.org")
    with pytest.raises(TemporaryFailure) as info:
        await router.route("example.org")
    assert info.value.enhanced == "4.4.3"


async def test_a_referral_is_no_answer_and_is_temporary(
    dns_server: LoopbackDNS, router: Router
) -> None:
    """A server that does not resolve recursively (Windows DNS with recursion off, an
    authoritative-only server) answers with a referral: NOERROR, no records, NS records
    in the authority section. That is no NODATA (RFC 2308 §2.2), but dnspython raises
    NoAnswer for it: taken for "no MX", then for "no address", every recipient of every
    domain failed at once with 5.4.4 "no MX and no address records"."""
    dns_server.referral("example.org")
    with pytest.raises(TemporaryFailure, match="referral") as info:
        await router.route("example.org")
    assert info.value.enhanced == "4.4.3"
    dns_server.mx("example.org", [(10, "mx.example.org")])
    dns_server.a("mx.example.org", "192.0.2.25")
    assert names(await router.route("example.org")) == ["mx.example.org"]  # not cached


def tcp_overflow(count: int) -> list[str]:
    """``count`` distinct IPv4 addresses (192.0.2.0 onwards, within 192.0.0.0/8): 4,200
    A records take 16 octets each, more than the 65,535 a TCP message holds."""
    return [f"192.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(512, 512 + count)]


async def test_an_answer_truncated_over_tcp_too_is_no_answer_and_is_temporary(
    dns_server: LoopbackDNS, router: Router
) -> None:
    """An answer truncated over UDP (the TC bit) is asked again over TCP, where it comes
    whole; one truncated over TCP too (longer than a TCP message holds, or a broken
    server) holds no records, and dnspython raised NoAnswer for it: taken for "no MX",
    mail went to the domain's web server (the implicit MX); taken for "no address",
    every recipient failed at once with 5.4.4. Both are failed lookups, as SERVFAIL."""
    dns_server.mx("example.org", [(10, f"mx{i}.example.org") for i in range(3000)])
    dns_server.a("example.org", "192.0.2.80")  # the web server, no mail host
    with pytest.raises(TemporaryFailure, match="truncated") as info:
        await router.route("example.org")
    assert info.value.enhanced == "4.4.3"
    assert dns_server.queries("example.org", "MX") == 2  # over UDP, then over TCP
    dns_server.a("example.net", *tcp_overflow(4200))  # no MX: the domain is its host
    with pytest.raises(TemporaryFailure, match="truncated") as info:
        await router.route("example.net")
    assert info.value.enhanced == "4.4.3"
    assert dns_server.queries("example.net", "A") == 2
    dns_server.a("example.net", "192.0.2.25")
    assert names(await router.route("example.net")) == ["example.net"]  # not cached


async def test_timeout_is_temporary_and_not_cached(
    dns_server: LoopbackDNS, clock: FakeClock
) -> None:
    dns_server.drop("example.org")
    router = Router(replace(dns_server.dns_config, timeout=0.3), clock=clock)
    with pytest.raises(TemporaryFailure, match="timed out") as info:
        await router.route("example.org")
    assert info.value.enhanced == "4.4.3"
    asked = dns_server.queries("example.org", "MX")
    assert asked >= 1
    with pytest.raises(TemporaryFailure):
        await router.route("example.org")
    assert dns_server.queries("example.org", "MX") > asked


async def test_one_host_failing_temporarily_leaves_the_others_cached_briefly(
    dns_server: LoopbackDNS, router: Router, clock: FakeClock
) -> None:
    dns_server.mx("example.org", [(10, "broken.example.org"), (20, "ok.example.org")])
    dns_server.servfail("broken.example.org")
    dns_server.a("ok.example.org", "127.0.0.1")
    assert names(await router.route("example.org")) == ["ok.example.org"]
    assert names(await router.route("example.org")) == ["ok.example.org"]
    assert dns_server.queries("example.org", "MX") == 1
    dns_server.a("broken.example.org", "127.0.0.2")
    clock.now += NEGATIVE_TTL  # incomplete: remembered no longer than a negative answer
    assert names(await router.route("example.org")) == ["broken.example.org", "ok.example.org"]


async def test_a_host_whose_aaaa_query_times_out_is_used_over_ipv4_and_cached_briefly(
    dns_server: LoopbackDNS, clock: FakeClock
) -> None:
    """A server (or middlebox) that loses AAAA queries while it answers A queries: the
    route holds the IPv4 addresses that answered, but was not cached, so every message
    to the domain waited out the AAAA query again (dns.timeout, 10 s by default). It is
    cached as briefly as a negative answer, then asked again whole, so that a host with
    only IPv6 addresses is left out no longer than that."""
    dns_server.mx("example.org", [(10, "mx6.example.org"), (20, "mx.example.org")])
    dns_server.a("mx.example.org", "192.0.2.25")
    dns_server.aaaa("mx.example.org", "2001:db8::25")
    dns_server.aaaa("mx6.example.org", "2001:db8::6")  # its only address
    dns_server.drop("mx.example.org", "AAAA")
    dns_server.drop("mx6.example.org", "AAAA")
    router = Router(replace(dns_server.dns_config, timeout=0.3), clock=clock)
    route = await router.route("example.org")
    assert [(h.name, h.addresses) for h in route.hosts] == [("mx.example.org", ("192.0.2.25",))]
    asked = dns_server.query_counts()
    assert router.cached("example.org") == route  # the next message waits for no query
    assert await router.route("example.org") == route
    assert dns_server.query_counts() == asked
    clock.now += NEGATIVE_TTL - 1
    assert router.cached("example.org") == route
    for host in ("mx.example.org", "mx6.example.org"):  # the AAAA queries are answered
        dns_server.delete(host)
    dns_server.a("mx.example.org", "192.0.2.25")
    dns_server.aaaa("mx.example.org", "2001:db8::25")
    dns_server.aaaa("mx6.example.org", "2001:db8::6")
    clock.now += 1
    assert router.cached("example.org") is None
    route = await router.route("example.org")
    assert [(h.name, h.addresses) for h in route.hosts] == [
        ("mx6.example.org", ("2001:db8::6",)),
        ("mx.example.org", ("192.0.2.25", "2001:db8::25")),
    ]
    assert dns_server.queries("example.org", "MX") == 2


async def test_an_implicit_mx_whose_aaaa_query_times_out_is_cached_briefly(
    dns_server: LoopbackDNS, clock: FakeClock
) -> None:
    """As for an MX host: a domain without MX records whose AAAA query times out."""
    dns_server.a("example.org", "192.0.2.25")
    dns_server.drop("example.org", "AAAA")
    router = Router(replace(dns_server.dns_config, timeout=0.3), clock=clock)
    route = await router.route("example.org")
    assert route.implicit and route.addresses == ("192.0.2.25",)
    assert router.cached("example.org") == route
    clock.now += NEGATIVE_TTL
    assert router.cached("example.org") is None


async def test_idn_domain_is_queried_as_a_label(dns_server: LoopbackDNS, router: Router) -> None:
    dns_server.mx("bücher.example", [(10, "mx.bücher.example")])
    dns_server.a("mx.xn--bcher-kva.example", "127.0.0.1")
    route = await router.route("BÜCHER.example")
    assert route.domain == "xn--bcher-kva.example"
    assert names(route) == ["mx.xn--bcher-kva.example"]
    assert dns_server.queries("xn--bcher-kva.example", "MX") == 1


@pytest.mark.parametrize(
    ("written", "why"),
    [
        ("exa\\mple.org", "backslash"),
        ("ex\\097mple.org", "backslash"),
        ("\\097.example.org", "backslash"),
        ("@", "root"),
    ],
)
async def test_master_file_syntax_in_a_domain_is_refused_not_read_as_another_name(
    dns_server: LoopbackDNS, router: Router, written: str, why: str
) -> None:
    """A backslash is no character of a domain (RFC 5321 §4.1.2), but dnspython reads it
    as a master-file escape: ``exa\\mple.org`` and ``ex\\097mple.org`` were routed to
    example.org's MX hosts, ``Route.domain`` saying example.org; and ``@`` as the origin,
    the root zone, whose MX and address records were asked for."""
    dns_server.mx("example.org", [(10, "mx.example.org")])
    dns_server.a("mx.example.org", "127.0.0.1")
    dns_server.mx("a.example.org", [(10, "mx.example.org")])
    with pytest.raises(PermanentFailure, match=why) as info:
        await router.route(written)
    assert info.value.enhanced == "5.1.2"
    assert dns_server.query_counts() == {}


async def test_unicode_spellings_that_lower_alike_are_not_one_cache_entry(
    dns_server: LoopbackDNS, router: Router
) -> None:
    # str.lower() writes a capital sigma before a digit as the final sigma ("\u039b\u03a31"
    # becomes "\u03bb\u03c21"), but IDNA maps it to the plain sigma ("\u03bb\u03c31"):
    # another domain than the "\u03bb\u03c21" a user may write.
    upper, sigma, final = "\u039b\u03a31.example", "\u03bb\u03c31.example", "\u03bb\u03c21.example"
    assert upper.lower() == final
    dns_server.mx(sigma, [(10, "mx.sigma.example")])
    dns_server.a("mx.sigma.example", "127.0.0.1")
    dns_server.mx(final, [(10, "mx.final-sigma.example")])
    dns_server.a("mx.final-sigma.example", "127.0.0.2")
    assert names(await router.route(upper)) == ["mx.sigma.example"]
    assert names(await router.route(final)) == ["mx.final-sigma.example"]
    cached = router.cached(upper)
    assert cached is not None and names(cached) == ["mx.sigma.example"]


async def test_mx_pointing_at_a_cname_is_followed(dns_server: LoopbackDNS, router: Router) -> None:
    dns_server.mx("example.org", [(10, "alias.example.org")])
    dns_server.cname("alias.example.org", "real.example.net")
    dns_server.a("real.example.net", "127.0.0.7")
    route = await router.route("example.org")
    assert names(route) == ["alias.example.org"]
    assert route.addresses == ("127.0.0.7",)


async def test_domain_that_is_a_cname_uses_its_targets_mx(
    dns_server: LoopbackDNS, router: Router
) -> None:
    dns_server.cname("example.org", "example.net")
    dns_server.mx("example.net", [(10, "mx.example.net")])
    dns_server.a("mx.example.net", "127.0.0.1")
    assert names(await router.route("example.org")) == ["mx.example.net"]


async def test_route_is_cached_for_the_smallest_ttl(
    dns_server: LoopbackDNS, router: Router, clock: FakeClock
) -> None:
    dns_server.mx("example.org", [(10, "mx.example.org")], ttl=300)
    dns_server.a("mx.example.org", "127.0.0.1", ttl=100)
    first = await router.route("example.org")
    # The zone changes, but within the TTL the cached route is used.
    dns_server.a("mx.example.org", "127.0.0.2", ttl=100)
    clock.now += 99
    assert await router.route("EXAMPLE.org.") == first
    assert dns_server.queries("example.org", "MX") == 1
    assert dns_server.queries("mx.example.org", "A") == 1
    clock.now += 2
    second = await router.route("example.org")
    assert second.addresses == ("127.0.0.2",)
    assert dns_server.queries("example.org", "MX") == 2
    assert dns_server.queries("mx.example.org", "A") == 2


async def test_a_huge_ttl_is_believed_for_one_day_at_most(
    dns_server: LoopbackDNS, router: Router, clock: FakeClock
) -> None:
    """Found by tests/integration/test_routing_fuzz.py: a route whose answers carry TTL
    2**31-1 (a hijacked zone's parting gift) was cached for 68 years."""
    dns_server.mx("example.org", [(10, "mx.example.org")], ttl=2**31 - 1)
    dns_server.a("mx.example.org", "127.0.0.1", ttl=2**31 - 1)
    await router.route("example.org")
    dns_server.a("mx.example.org", "127.0.0.2")  # the owner takes the domain back
    clock.now += 86_400 - 1
    assert router.cached("example.org") is not None
    clock.now += 2
    assert router.cached("example.org") is None
    assert (await router.route("example.org")).addresses == ("127.0.0.2",)


async def test_nxdomain_is_cached_briefly(
    dns_server: LoopbackDNS, router: Router, clock: FakeClock
) -> None:
    for _ in range(3):
        with pytest.raises(PermanentFailure):
            await router.route("nowhere.example")
    assert dns_server.queries("nowhere.example", "MX") == 1
    dns_server.mx("nowhere.example", [(10, "mx.nowhere.example")])
    dns_server.a("mx.nowhere.example", "127.0.0.1")
    clock.now += 61
    assert names(await router.route("nowhere.example")) == ["mx.nowhere.example"]
    assert dns_server.queries("nowhere.example", "MX") == 2


async def test_a_negative_answer_is_believed_no_longer_than_its_zone_says(
    dns_server: LoopbackDNS, router: Router, clock: FakeClock
) -> None:
    """NXDOMAIN, and "no MX records", were remembered for NEGATIVE_TTL (60 s) whatever
    the zone's negative TTL (RFC 2308 §5: the smaller of its SOA's TTL and MINIMUM): a
    domain created just after it was asked about had its mail bounced (5.1.2) for a
    minute, and one given MX records had its mail go to its own address meanwhile."""
    dns_server.soa("example.org", minimum=5)
    with pytest.raises(PermanentFailure, match="NXDOMAIN"):
        await router.route("new.example.org")
    dns_server.mx("new.example.org", [(10, "mx.example.org")])
    dns_server.a("mx.example.org", "127.0.0.25")
    clock.now += 6
    assert names(await router.route("new.example.org")) == ["mx.example.org"]

    dns_server.a("plain.example.org", "127.0.0.26")  # no MX: the implicit MX
    assert (await router.route("plain.example.org")).implicit
    dns_server.mx("plain.example.org", [(10, "mx.example.org")])
    clock.now += 6
    assert names(await router.route("plain.example.org")) == ["mx.example.org"]


async def test_forget_drops_the_cached_route(dns_server: LoopbackDNS, router: Router) -> None:
    dns_server.a("example.org", "127.0.0.1")
    await router.route("example.org")
    router.forget("example.org")
    await router.route("example.org")
    assert dns_server.queries("example.org", "MX") == 2


async def test_concurrent_lookups_share_one_query(dns_server: LoopbackDNS, router: Router) -> None:
    dns_server.mx("example.org", [(10, "mx.example.org")])
    dns_server.a("mx.example.org", "127.0.0.1")
    routes = await asyncio.gather(*(router.route("example.org") for _ in range(20)))
    assert {r.addresses for r in routes} == {("127.0.0.1",)}
    assert dns_server.queries("example.org", "MX") == 1
    assert dns_server.queries("mx.example.org", "A") == 1


async def test_concurrent_temporary_failures_share_one_query(
    dns_server: LoopbackDNS, router: Router
) -> None:
    dns_server.servfail("example.org")
    results = await asyncio.gather(
        *(router.route("example.org") for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, TemporaryFailure) for r in results)
    # dnspython asks each nameserver once per SERVFAIL; one lookup in all.
    assert dns_server.queries("example.org", "MX") == 1


async def test_a_cancelled_caller_does_not_cancel_the_others(
    dns_server: LoopbackDNS, router: Router
) -> None:
    dns_server.mx("example.org", [(10, "mx.example.org")])
    dns_server.a("mx.example.org", "127.0.0.1")
    quitter = asyncio.ensure_future(router.route("example.org"))
    stayer = asyncio.ensure_future(router.route("example.org"))
    await asyncio.sleep(0)  # one loop turn (not a timed wait): both join the same lookup
    quitter.cancel()
    assert (await stayer).addresses == ("127.0.0.1",)
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert dns_server.queries("example.org", "MX") == 1


async def test_a_caller_arriving_as_the_last_one_quits_starts_a_new_lookup(
    dns_server: LoopbackDNS, router: Router
) -> None:
    # The last waiter's cancellation cancels the shared lookup, which ends only a loop
    # turn later: a caller arriving in between must not join it and inherit its
    # CancelledError (a cancellation it never asked for).
    dns_server.mx("example.org", [(10, "mx.example.org")])
    dns_server.a("mx.example.org", "127.0.0.1")
    quitter = asyncio.ensure_future(router.route("example.org"))
    await asyncio.sleep(0)  # the quitter starts the lookup and awaits it
    quitter.cancel()
    newcomer = asyncio.ensure_future(router.route("example.org"))
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert (await newcomer).addresses == ("127.0.0.1",)


async def test_address_literal_needs_no_dns(dns_server: LoopbackDNS, router: Router) -> None:
    route = await router.route("[127.0.0.1]")
    assert route.addresses == ("127.0.0.1",)
    assert dns_server.queries("[127.0.0.1]", "MX") == 0


@pytest.mark.parametrize("spelling", ["[192.0.2.7].", " [192.0.2.7] "])
async def test_an_address_literal_with_a_final_dot_is_that_literal_not_a_dns_name(
    dns_server: LoopbackDNS, router: Router, spelling: str
) -> None:
    """A final dot or white space is taken off a domain before it is looked up, and so
    off a literal: "[192.0.2.7]." was looked up in DNS as a name, and what DNS said of it
    was cached under "[192.0.2.7]", the literal's own key, then served for the literal
    itself (here: another host). It is the literal, asked of no server."""
    dns_server.mx("[192.0.2.7]", [(10, "mx.elsewhere.test")])
    dns_server.a("mx.elsewhere.test", "192.0.2.66")
    route = await router.route(spelling)
    assert route.addresses == ("192.0.2.7",)
    assert (await router.route("[192.0.2.7]")).addresses == ("192.0.2.7",)
    assert dns_server.queries("[192.0.2.7]", "MX") == 0


async def test_fixture_answers_over_tcp_on_the_same_port(dns_server: LoopbackDNS) -> None:
    dns_server.a("tcp.example", "127.0.0.1")
    query = dns.message.make_query("tcp.example", "A")
    response = await dns.asyncquery.tcp(query, "127.0.0.1", port=dns_server.port, timeout=2)
    assert response.rcode() == dns.rcode.NOERROR
    assert [r.address for r in response.answer[0]] == ["127.0.0.1"]
    assert dns_server.queries("tcp.example", "A") == 1


async def test_loopback_dns_truncates_udp_answers_as_a_real_server_does(
    dns_server: LoopbackDNS,
) -> None:
    """An answer over UDP longer than 512 octets, or than the EDNS payload size the query
    offers (RFC 6891 §6.2.5), comes back truncated: no records, the TC bit set, the
    question kept (RFC 2181 §9). It came back whole, so a client's fall-back to TCP, which
    every real server makes it take for such an answer, was never exercised."""
    hosts = [(10, f"mx{i:02}-{'x' * 40}.big.test") for i in range(20)]
    dns_server.mx("big.test", hosts)
    plain = dns.message.make_query("big.test", "MX")
    udp = await dns.asyncquery.udp(plain, "127.0.0.1", port=dns_server.port, timeout=2)
    assert udp.flags & dns.flags.TC
    assert udp.answer == [] and udp.question == plain.question
    assert plain.is_response(udp)
    roomy = dns.message.make_query("big.test", "MX", use_edns=0, payload=4096)
    whole = await dns.asyncquery.udp(roomy, "127.0.0.1", port=dns_server.port, timeout=2)
    assert not whole.flags & dns.flags.TC
    assert len(whole.answer[0]) == 20
    small = dns.message.make_query("big.test", "MX", use_edns=0, payload=600)
    cut = await dns.asyncquery.udp(small, "127.0.0.1", port=dns_server.port, timeout=2)
    assert cut.flags & dns.flags.TC
    # The router's resolver takes the truncated answer and asks again over TCP.
    dns_server.reset_counts()
    for _, host in hosts:
        dns_server.a(host, "127.0.0.1")
    route = await Router(dns_server.dns_config, allow_loopback=True).route("big.test")
    assert route.hosts and {h.name for h in route.hosts} <= {name for _, name in hosts}
    assert dns_server.queries("big.test", "MX") == 2  # over UDP, truncated; then TCP


@pytest.mark.parametrize(
    ("hosts", "ttl"),
    [([(70000, "mx.test")], 300), ([(10, "mx.test")], -1), ([(10, "mx.test")], 2**32)],
)
async def test_a_wildcard_mx_no_answer_can_hold_is_refused_when_set(
    dns_server: LoopbackDNS, hosts: list[tuple[int, str]], ttl: int
) -> None:
    """The other record methods refuse a preference or TTL DNS cannot carry at once;
    wildcard_mx took one, and every MX query of a name it covers then went unanswered
    (a traceback on the server's thread, a timeout and a deferral in the test). It is
    refused now, and the wildcard set before stays."""
    dns_server.wildcard_mx([(10, "good.test")])
    with pytest.raises(ValueError, match="must be between"):
        dns_server.wildcard_mx(hosts, ttl=ttl)
    query = dns.message.make_query("any.test", "MX")
    answer = await dns.asyncquery.udp(query, "127.0.0.1", port=dns_server.port, timeout=2)
    assert [r.exchange.to_text() for r in answer.answer[0]] == ["good.test."]


def test_loopback_dns_outside_pytest_fixtures() -> None:
    server = LoopbackDNS().start()
    try:
        assert server.port > 0
        assert server.dns_config.port == server.port
    finally:
        server.stop()
    server.stop()  # idempotent


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_loopback_dns_stop_closes_the_tcp_clients_still_connected() -> None:
    """A TCP client that never finishes its query (one octet a second, each within the
    handler's 5 s idle timeout) held its request thread, and stop(), which joins them,
    waited as long as it went on: stop() ends such connections itself."""
    server = LoopbackDNS().start()
    server.a("tcp.example", "127.0.0.1")
    done = threading.Event()
    slow = socket.create_connection(("127.0.0.1", server.port))
    idle = socket.create_connection(("127.0.0.1", server.port))  # says nothing at all
    slow.sendall(b"\xff\xff\x00")  # a 65535-octet query, begun

    def trickle() -> None:
        while not done.wait(1.0):
            try:
                slow.sendall(b"\x00")
            except OSError:
                return

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        # Accepted in turn: once a later connection is answered, both are being served.
        query = dns.message.make_query("tcp.example", "A")
        answer = dns.query.tcp(query, "127.0.0.1", port=server.port, timeout=5)
        assert [r.address for r in answer.answer[0]] == ["127.0.0.1"]
        try:
            with hang_guard(15):
                server.stop()
        except Hang:
            done.set()
            server.stop()
            raise
        assert _closed_by_peer(slow) and _closed_by_peer(idle)
    finally:
        done.set()
        trickler.join()
        slow.close()
        idle.close()
        server.stop()


def _consumed(server: LoopbackDNS, client: socket.socket) -> None:
    """Wait until the server has read all that its one TCP client sent (or has closed
    the connection)."""
    tcp = next(s.server for s in server._servers if isinstance(s.server, _TCPServer))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with tcp._clients_lock:
            clients = list(tcp._clients)
        if clients and all(_unread(c) == 0 for c in clients):
            return
        if select.select([client], [], [], 0.001)[0]:
            return  # closed (or answered) already
    raise AssertionError("the server did not read what was sent")


def _unread(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {len(data)} of {size} octets"
        data += chunk
    return data


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_loopback_dns_takes_a_tcp_query_in_pieces(cut: int) -> None:
    """dnslib read the 2-octet length and the query in one recv(): a query whose length
    came split (its first octet alone) was dropped, the connection closed unanswered.
    The length is read whole, then the query, however the octets arrive."""
    with LoopbackDNS() as server:
        server.a("tcp.example", "127.0.0.1")
        query = dns.message.make_query("tcp.example", "A")
        wire = query.to_wire()
        framed = struct.pack("!H", len(wire)) + wire
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.sendall(framed[:cut])
            _consumed(server, client)
            client.sendall(framed[cut:])
            (length,) = struct.unpack("!H", _read_exactly(client, 2))
            answer = dns.message.from_wire(_read_exactly(client, length))
        assert query.is_response(answer)
        assert [r.address for r in answer.answer[0]] == ["127.0.0.1"]


def _tcp_answer(client: socket.socket) -> dns.message.Message:
    (length,) = struct.unpack("!H", _read_exactly(client, 2))
    return dns.message.from_wire(_read_exactly(client, length))


def _framed(query: dns.message.Message) -> bytes:
    wire = query.to_wire()
    return struct.pack("!H", len(wire)) + wire


def test_loopback_dns_answers_several_queries_on_one_tcp_connection() -> None:
    """RFC 7766 §6.2.1: a server should process several queries on one TCP connection,
    sent one after another or pipelined. The server answered the first and closed the
    connection, so a client reusing it (dnspython may) got no second answer."""
    with LoopbackDNS() as server:
        server.a("one.example", "127.0.0.1")
        server.a("two.example", "127.0.0.2")
        first = dns.message.make_query("one.example", "A")
        second = dns.message.make_query("two.example", "A")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
            client.sendall(_framed(first))
            assert first.is_response(_tcp_answer(client))
            client.sendall(_framed(second))
            answer = _tcp_answer(client)
            assert second.is_response(answer)
            assert [r.address for r in answer.answer[0]] == ["127.0.0.2"]
            # Pipelined: both sent before either answer is read; answered in turn.
            client.sendall(_framed(second) + _framed(first))
            assert second.is_response(_tcp_answer(client))
            assert first.is_response(_tcp_answer(client))
        assert server.queries("one.example", "A") == 2
        assert server.queries("two.example", "A") == 2


def test_loopback_dns_bounds_a_tcp_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection kept for several queries is bounded (RFC 7766 §6.2.3): it is closed
    after so many queries, and when the client says nothing for the idle time."""
    monkeypatch.setattr("mailstrom.testing.dns._TCP_MAX_QUERIES", 2)
    monkeypatch.setattr("mailstrom.testing.dns._TCP_IDLE_TIMEOUT", 0.2)
    with LoopbackDNS() as server:
        server.a("one.example", "127.0.0.1")
        query = dns.message.make_query("one.example", "A")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
            client.sendall(_framed(query) * 3)
            assert query.is_response(_tcp_answer(client))
            assert query.is_response(_tcp_answer(client))
            assert _closed_by_peer(client)  # the third is not answered
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
            client.sendall(_framed(query))
            assert query.is_response(_tcp_answer(client))
            assert _closed_by_peer(client)  # idle after its answer: closed


def test_loopback_dns_truncates_a_tcp_answer_no_tcp_message_can_hold() -> None:
    """An answer longer than the 65535 octets a TCP message can hold failed to be framed
    (struct.error, a traceback on the server's thread) and the connection was closed
    unanswered. It comes back truncated, as over UDP: the TC bit, no records, the
    question kept."""
    with LoopbackDNS() as server:
        server.a("huge.test", *(f"10.{i // 256 % 256}.{i % 256}.1" for i in range(4200)))
        query = dns.message.make_query("huge.test", "A")
        answer = dns.query.tcp(query, "127.0.0.1", port=server.port, timeout=5)
        assert answer.flags & dns.flags.TC
        assert answer.answer == [] and answer.question == query.question
        server.a("huge.test", "10.0.0.1")
        answer = dns.query.tcp(query, "127.0.0.1", port=server.port, timeout=5)
        assert [r.address for r in answer.answer[0]] == ["10.0.0.1"]


# --- hardening #6: bounded fan-out, refused targets (the default policy) --------------


async def test_a_domain_with_100_mx_hosts_yields_at_most_5_addresses(
    dns_server: LoopbackDNS,
) -> None:
    """Hardening #6: a domain with 100 MX hosts of 10 addresses each yields at most 5 addresses,
    and addresses are looked up for at most 5 of its hosts (today: 1,000 addresses after
    200 queries at once)."""
    hosts = [f"mx{i:03}.many.test" for i in range(100)]
    dns_server.mx("many.test", [(10, host) for host in hosts])
    for i, host in enumerate(hosts):
        dns_server.a(host, *(f"10.{i}.0.{j}" for j in range(1, 11)))
    route = await Router(dns_server.dns_config).route("many.test")
    assert len(route.addresses) == 5
    [host] = route.hosts  # the first host in line has 10 addresses: it fills the limit
    assert sorted(host.addresses) == [f"10.{hosts.index(host.name)}.0.{j}" for j in range(1, 6)]
    asked = [h for h in hosts if dns_server.queries(h, "A") or dns_server.queries(h, "AAAA")]
    assert 1 <= len(asked) <= 5
    assert host.name in asked


async def test_mx_host_on_loopback_fails_permanently(dns_server: LoopbackDNS) -> None:
    """Hardening #6: an MX host resolving only to 127.0.0.0/8 and ::1 is not delivered
    to; with nothing else left the domain fails permanently, naming the address."""
    dns_server.mx("loop.test", [(10, "mx.loop.test")])
    dns_server.a("mx.loop.test", "127.0.0.1")
    dns_server.aaaa("mx.loop.test", "::1")
    router = Router(dns_server.dns_config)
    with pytest.raises(PermanentFailure) as info:
        await router.route("loop.test")
    assert info.value.enhanced == "5.4.4"
    assert "127.0.0.1 (loopback, MX mx.loop.test)" in info.value.text
    assert "::1" in info.value.text
    assert "allow_loopback" in info.value.text
    assert info.value.host == "mx.loop.test"
    # A permanent answer: remembered like NXDOMAIN, not asked again at once.
    with pytest.raises(PermanentFailure):
        await router.route("loop.test")
    assert dns_server.queries("loop.test", "MX") == 1
    # With allow_loopback the same zone routes to loopback.
    allowed = await Router(dns_server.dns_config, allow_loopback=True).route("loop.test")
    assert allowed.addresses == ("127.0.0.1", "::1")


async def test_a_refused_host_beside_one_without_an_address_is_a_temporary_failure(
    dns_server: LoopbackDNS,
) -> None:
    """One MX host resolves to loopback only, the other to nothing yet: the router takes a
    host without an address for a DNS change in progress (temporary), and it may soon
    have one. The domain failed at once with 5.4.4, "every address it routes to is
    refused", which was not so; it is deferred now, naming both."""
    dns_server.mx("half.test", [(10, "mx1.half.test"), (20, "mx2.half.test")])
    dns_server.a("mx1.half.test", "127.0.0.1")
    dns_server.txt("mx2.half.test", "no address yet")  # the name exists, with no A/AAAA
    with pytest.raises(TemporaryFailure) as info:
        await Router(dns_server.dns_config).route("half.test")
    assert info.value.enhanced == "4.4.4"
    assert "127.0.0.1 (loopback, MX mx1.half.test)" in info.value.text, info.value.text
    assert "mx2.half.test" in info.value.text, info.value.text
    # Every host refused, none without an address: refused for good, as before.
    dns_server.a("mx2.half.test", "0.0.0.0")
    with pytest.raises(PermanentFailure):
        await Router(dns_server.dns_config).route("half.test")


async def test_refused_hosts_before_the_cut_are_no_proof_that_none_is_usable(
    dns_server: LoopbackDNS,
) -> None:
    """Only the 10 best MX hosts are looked up (twice mx_address_limit). When all 10
    resolve to refused addresses, the hosts past the cut were never looked up: here the
    11th has a usable one. The domain was bounced with 5.4.4, "every address it routes
    to is refused"; it is deferred now, naming the cut and the setting that moves it."""
    refused = ["127.0.0.1", "0.0.0.0", "169.254.1.1"]
    dns_server.mx("cut.test", [(i, f"mx{i}.cut.test") for i in range(12)])
    for i in range(10):
        dns_server.a(f"mx{i}.cut.test", refused[i % 3])
    dns_server.a("mx10.cut.test", "192.0.2.10")
    dns_server.a("mx11.cut.test", "192.0.2.11")
    with pytest.raises(TemporaryFailure) as info:
        await Router(dns_server.dns_config).route("cut.test")
    assert info.value.enhanced == "4.4.4"
    text = info.value.text
    assert "127.0.0.1 (loopback, MX mx0.cut.test)" in text, text
    assert "2 more MX hosts were not looked up" in text, text
    assert "mx_address_limit" in text, text
    assert dns_server.queries("mx10.cut.test", "A") == 0  # the cut itself is kept
    # Once the operator moves the cut, the deferred mail has its route.
    route = await Router(dns_server.dns_config, mx_host_limit=12).route("cut.test")
    assert route.addresses == ("192.0.2.10", "192.0.2.11")
    # No host left out: every MX host is refused, and that is for good, as before.
    dns_server.mx("all.test", [(i, f"mx{i}.cut.test") for i in range(10)])
    with pytest.raises(PermanentFailure):
        await Router(dns_server.dns_config).route("all.test")


async def test_which_equal_hosts_the_cut_keeps_is_drawn_so_none_is_refused_for_good(
    dns_server: LoopbackDNS,
) -> None:
    """12 MX hosts of one preference, 10 on loopback: the 10 looked up are drawn (RFC
    5321 §5.1), and a draw without the 2 usable ones proves nothing of them. Each lookup
    finds a usable host or is deferred, never bounced (with these seeds, 1 of 40 draws
    left both out, and was bounced before)."""
    hosts = [f"h{i:02}.equal.test" for i in range(12)]
    dns_server.mx("equal.test", [(10, host) for host in hosts])
    for host in hosts[:10]:
        dns_server.a(host, "127.0.0.1")
    dns_server.a(hosts[10], "192.0.2.10")
    dns_server.a(hosts[11], "192.0.2.11")
    failures: list[str] = []
    for seed in range(40):
        router = Router(dns_server.dns_config, rng=random.Random(seed))
        try:
            route = await router.route("equal.test")
        except TemporaryFailure as exc:
            failures.append(exc.text)
            continue
        assert set(route.addresses) <= {"192.0.2.10", "192.0.2.11"}, route
        assert route.addresses
    assert len(failures) < 40
    assert all("2 more MX hosts were not looked up" in text for text in failures), failures


async def test_the_mx_host_cut_is_a_config_setting(dns_server: LoopbackDNS) -> None:
    """The refusal of a domain whose 10 best MX hosts are refused names the setting that
    moves the cut, and a Config user can set it: ``Config.mx_host_limit`` reaches the
    Router of ``Router.for_config``, the router of the worker and the command line.
    Was: only a Router made by hand took ``mx_host_limit``; Config had no such field."""
    dns_server.mx("twelve.test", [(i, f"mx{i}.twelve.test") for i in range(12)])
    for i in range(12):
        dns_server.a(f"mx{i}.twelve.test", "127.0.0.1" if i != 10 else "192.0.2.10")
    config = Config(helo_name="client.test", dns=dns_server.dns_config)
    with pytest.raises(TemporaryFailure) as info:
        await Router.for_config(config).route("twelve.test")
    assert "mx_host_limit" in info.value.text, info.value.text
    assert "twice mx_address_limit, which is 5" in info.value.text, info.value.text
    router = Router.for_config(replace(config, mx_host_limit=12))
    route = await router.route("twelve.test")
    assert (names(route), route.addresses) == (["mx10.twelve.test"], ("192.0.2.10",))


async def test_address_literal_exchanges_before_the_cut_are_no_proof_either(
    dns_server: LoopbackDNS,
) -> None:
    """MX hosts written as address literals are no hosts (RFC 5321 §5.1); beside 10
    refused hosts, the one past the cut was never looked up: deferred, not bounced."""
    hosts = [(i, f"mx{i}.lit.test") for i in range(11)]
    dns_server.mx("lit.test", [(0, "[192.0.2.1]"), *hosts])
    for i in range(10):
        dns_server.a(f"mx{i}.lit.test", "127.0.0.1")
    dns_server.a("mx10.lit.test", "192.0.2.10")
    with pytest.raises(TemporaryFailure) as info:
        await Router(dns_server.dns_config).route("lit.test")
    assert "[192.0.2.1]" in info.value.text, info.value.text
    assert "1 more MX host was not looked up" in info.value.text, info.value.text


async def test_refused_addresses_are_dropped_and_others_kept(dns_server: LoopbackDNS) -> None:
    """Hardening #6: refused addresses leave the route; the host's and the other hosts'
    usable addresses stay, in order."""
    dns_server.mx("mixed.test", [(10, "mx1.mixed.test"), (20, "mx2.mixed.test"),
                                 (30, "mx3.mixed.test")])  # fmt: skip
    dns_server.a("mx1.mixed.test", "127.0.0.1")
    dns_server.a("mx2.mixed.test", "0.0.0.0", "169.254.1.1", "192.0.2.2")
    dns_server.aaaa("mx2.mixed.test", "fe80::2", "::ffff:127.0.0.1")
    dns_server.a("mx3.mixed.test", "192.0.2.3")
    route = await Router(dns_server.dns_config).route("mixed.test")
    assert names(route) == ["mx2.mixed.test", "mx3.mixed.test"]
    assert route.addresses == ("192.0.2.2", "192.0.2.3")


@pytest.mark.parametrize("exchange", ["localhost", "mail.LOCALHOST"])
async def test_an_mx_host_named_under_localhost_is_loopback_whatever_dns_says(
    dns_server: LoopbackDNS, exchange: str
) -> None:
    """RFC 6761 §6.3: a localhost name is the loopback address, and resolution libraries
    should not ask DNS about it. "MX 0 localhost." is the old way to say "no mail here"
    (before the null MX), still published; resolvers disagree on it: 8.8.8.8 answers
    NXDOMAIN, 1.1.1.1 127.0.0.1, and a forwarder may answer anything. Asked, the domain
    bounced on one resolver, was deferred until max_age on the other ("no MX host has an
    address"), and went to whatever address a third gave. It is refused as loopback now,
    without a query; where loopback is allowed (tests, demos) it is this host."""
    dns_server.mx("nomail.test", [(0, exchange)])
    dns_server.nxdomain("localhost")  # as Google Public DNS answers
    dns_server.a("mail.localhost", "192.0.2.25")  # a forwarder's answer
    router = Router(dns_server.dns_config)
    with pytest.raises(PermanentFailure) as info:
        await router.route("nomail.test")
    assert info.value.enhanced == "5.4.4"
    assert f"127.0.0.1 (loopback, MX {exchange.lower()})" in info.value.text, info.value.text
    assert dns_server.queries(exchange, "A") == dns_server.queries(exchange, "AAAA") == 0
    allowed = await Router(dns_server.dns_config, allow_loopback=True).route("nomail.test")
    assert allowed.addresses == ("127.0.0.1", "::1")


@pytest.mark.parametrize(
    ("rtype", "address"),
    [("A", "127.0.0.2"), ("AAAA", "::1"), ("AAAA", "::ffff:127.0.0.1"), ("A", "0.0.0.0"),
     ("AAAA", "::"), ("A", "169.254.169.254"), ("AAAA", "fe80::1")],
)  # fmt: skip
async def test_implicit_mx_to_a_refused_address_fails_permanently(
    dns_server: LoopbackDNS, rtype: str, address: str
) -> None:
    """Hardening #6: no MX, and the domain's own address names this host or its link."""
    getattr(dns_server, rtype.lower())("direct.test", address)
    with pytest.raises(PermanentFailure) as info:
        await Router(dns_server.dns_config).route("direct.test")
    assert info.value.enhanced == "5.4.4"
    assert "direct.test" in info.value.text


@pytest.mark.parametrize(("rtype", "address"), [("A", "224.0.0.1"), ("AAAA", "ff02::1"),
                                                ("A", "255.255.255.255")])  # fmt: skip
async def test_an_mx_at_a_multicast_or_reserved_address_fails_permanently(
    dns_server: LoopbackDNS, rtype: str, address: str
) -> None:
    """Even where loopback is allowed (tests, demos): no server has such an address. Such
    a route used to be tried, and retried until max_age, as a connection failure."""
    dns_server.mx("group.test", [(10, "mx.group.test")])
    getattr(dns_server, rtype.lower())("mx.group.test", address)
    with pytest.raises(PermanentFailure) as info:
        await Router(dns_server.dns_config, allow_loopback=True).route("group.test")
    assert info.value.enhanced == "5.4.4"
    assert address in info.value.text


@pytest.mark.parametrize("literal", ["[127.0.0.4]", "[IPv6:::1]", "[IPv6:::ffff:127.0.0.1]"])
async def test_address_literal_to_loopback_fails_permanently(
    dns_server: LoopbackDNS, literal: str
) -> None:
    """Hardening #6: a@[127.0.0.4] and a@[IPv6:::1] are refused without any DNS query."""
    router = Router(dns_server.dns_config)
    with pytest.raises(PermanentFailure) as info:
        await router.route(literal)
    assert info.value.enhanced == "5.4.4"
    assert dns_server.queries(literal, "MX") == 0
    allowed = await Router(dns_server.dns_config, allow_loopback=True).route(literal)
    assert len(allowed.addresses) == 1


async def test_an_mx_naming_an_ip_address_is_used_as_that_address(
    dns_server: LoopbackDNS,
) -> None:
    """RFC 5321 §5.1 wants a name there, but zones with "MX 10 192.0.2.25" exist and
    Postfix delivers to them (it warns "numeric domain name in resource data of MX
    record" and uses the address). Looked up as a name instead, the host had no address
    and the domain's mail was deferred until max_age; the address obeys the policy all
    the same, without a DNS query."""
    dns_server.mx("numeric.test", [(10, "127.0.0.5"), (20, "mx2.numeric.test")])
    dns_server.a("mx2.numeric.test", "127.0.0.6")
    route = await Router(dns_server.dns_config, allow_loopback=True).route("numeric.test")
    assert route.addresses == ("127.0.0.5", "127.0.0.6")
    assert route.hosts[0].name == "127.0.0.5"
    assert dns_server.queries("127.0.0.5", "A") == 0
    assert dns_server.queries("127.0.0.5", "AAAA") == 0
    dns_server.mx("numeric-loop.test", [(10, "127.0.0.7")])
    with pytest.raises(PermanentFailure) as info:
        await Router(dns_server.dns_config).route("numeric-loop.test")
    assert info.value.enhanced == "5.4.4"
    assert "127.0.0.7 (loopback, MX 127.0.0.7)" in info.value.text


@pytest.mark.parametrize("literal", ["[127.0.0.5]", "[IPv6:::1]"])
async def test_an_mx_written_as_an_address_literal_is_skipped_and_named(
    dns_server: LoopbackDNS, literal: str
) -> None:
    """RFC 5321 §5.1: an MX record's exchange is a host name, and "[127.0.0.5]." is none.
    It was looked up as a name (an A and an AAAA query for nothing), had no address, and
    its domain's mail was deferred until max_age as "no MX host ... has an address",
    saying nothing of the record. It is skipped without a query, as Postfix skips it; a
    domain left with no host fails permanently (5.4.4, as Postfix bounces it), naming
    the record, and is remembered no longer than a refused target."""
    dns_server.mx("bracket.test", [(10, literal), (20, "mx2.bracket.test")])
    dns_server.a("mx2.bracket.test", "127.0.0.6")
    router = Router(dns_server.dns_config, allow_loopback=True)
    route = await router.route("bracket.test")
    assert names(route) == ["mx2.bracket.test"]
    assert route.addresses == ("127.0.0.6",)
    dns_server.mx("only-bracket.test", [(10, literal)])
    with pytest.raises(PermanentFailure) as info:
        await router.route("only-bracket.test")
    assert info.value.enhanced == "5.4.4"
    assert f"{literal.lower()} is an address literal, not a host name" in info.value.text
    assert "only-bracket.test" in info.value.text
    counts = dns_server.query_counts()
    assert not [key for key in counts if key[0].startswith("[")], counts
    # A permanent answer, remembered: not asked again at once.
    with pytest.raises(PermanentFailure):
        await router.route("only-bracket.test")
    assert dns_server.queries("only-bracket.test", "MX") == 1


async def test_mx_records_written_as_address_literals_take_no_place_of_a_host(
    dns_server: LoopbackDNS,
) -> None:
    """Only the first MX hosts by preference are considered (twice the address limit),
    and records written as address literals were counted among them before they were
    skipped: two such records at the best preference, with an address limit of 1, left
    no place for the real backup host, and the domain's mail bounced (5.4.4, "no MX
    host can be used") although a host was there. They are no hosts (as the null MX
    "." is none): they are set aside before the cut."""
    dns_server.mx(
        "brackets.test",
        [(10, "[127.0.0.5]"), (10, "[127.0.0.6]"), (20, "backup.brackets.test")],
    )
    dns_server.a("backup.brackets.test", "127.0.0.7")
    router = Router(dns_server.dns_config, allow_loopback=True, mx_address_limit=1)
    route = await router.route("brackets.test")
    assert names(route) == ["backup.brackets.test"]
    assert route.addresses == ("127.0.0.7",)


@pytest.mark.parametrize("fail", ["servfail", "drop", "nxdomain"])
async def test_records_set_for_a_name_made_to_fail_are_served(
    dns_server: LoopbackDNS, fail: str
) -> None:
    """mailstrom.testing's LoopbackDNS: records set after servfail(), drop() or
    nxdomain() were never served (the name kept failing until delete()), so a test that
    "fixes" the zone saw the old failure. Setting records now ends it; a SERVFAIL for one
    type stays that type's."""
    getattr(dns_server, fail)("fixed.test")
    dns_server.mx("fixed.test", [(10, "mx.fixed.test")])
    dns_server.a("mx.fixed.test", "127.0.0.1")
    route = await Router(dns_server.dns_config, allow_loopback=True).route("fixed.test")
    assert route.addresses == ("127.0.0.1",)
    dns_server.servfail("fixed.test", "MX")
    dns_server.a("fixed.test", "127.0.0.1")
    with pytest.raises(TemporaryFailure):
        await Router(dns_server.dns_config, allow_loopback=True).route("fixed.test")


class WallClockSteppedOnQuery:
    """Stands in for the ``time`` module of dnspython's resolvers: the real clocks, with
    the wall clock stepped by ``step`` seconds once ``server`` has had a ``rdtype`` query
    for ``name`` (NTP or an operator stepping it while the resolver waits for that
    answer)."""

    def __init__(self, server: LoopbackDNS, name: str, rdtype: str, step: float) -> None:
        self.server, self.name, self.rdtype, self.step = server, name, rdtype, step

    def time(self) -> float:
        stepped = self.server.queries(self.name, self.rdtype) > 0
        return time.time() + (self.step if stepped else 0.0)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.mark.parametrize("step", [3600.0, -3600.0])
async def test_a_route_is_not_failed_by_a_wall_clock_step(
    dns_server: LoopbackDNS, monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    # dnspython measures a lookup's lifetime on the wall clock: stepped during the first
    # query of a lookup that needs a second one (here the TCP query after a truncated UDP
    # answer, as for a domain with many MX hosts), the lookup failed at once with "The
    # resolution lifetime expired", and the recipients were deferred ("timed out").
    import dns.asyncresolver
    import dns.resolver

    hosts = [(10, f"mx{i:02}-{'x' * 40}.big.test") for i in range(20)]
    dns_server.mx("big.test", hosts)
    for _, host in hosts:
        dns_server.a(host, "127.0.0.1")
    stepped = WallClockSteppedOnQuery(dns_server, "big.test", "MX", step)
    monkeypatch.setattr(dns.resolver, "time", stepped)
    monkeypatch.setattr(dns.asyncresolver, "time", stepped)
    route = await Router(dns_server.dns_config, allow_loopback=True).route("big.test")
    assert route.hosts and {h.name for h in route.hosts} <= {name for _, name in hosts}
    assert dns_server.queries("big.test", "MX") >= 2  # over UDP, then over TCP


@pytest.mark.parametrize("step", [3600.0, -3600.0])
async def test_every_resolver_mailstrom_makes_keeps_its_lifetime_on_a_steady_clock(
    dns_server: LoopbackDNS, monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    # The router asked again when dnspython gave up early, but DANE's TLSA lookups, the
    # MTA-STS TXT and HTTPS host lookups and the command line's checks call the resolver
    # make_resolver builds directly: a wall clock step while such a lookup needed a second
    # query failed it at once (a DANE host unusable, its mail deferred).
    import dns.asyncresolver
    import dns.resolver

    from mailstrom.routing import make_resolver

    dns_server.txt("_mta-sts.big.test", "v=STSv1; id=" + "x" * 600)  # too long for UDP
    stepped = WallClockSteppedOnQuery(dns_server, "_mta-sts.big.test", "TXT", step)
    monkeypatch.setattr(dns.resolver, "time", stepped)
    monkeypatch.setattr(dns.asyncresolver, "time", stepped)
    answer = await make_resolver(dns_server.dns_config).resolve(
        "_mta-sts.big.test", "TXT", search=False
    )
    assert b"".join(answer[0].strings).startswith(b"v=STSv1; id=xxx")
    assert dns_server.queries("_mta-sts.big.test", "TXT") >= 2  # over UDP, then over TCP


async def test_a_lookup_of_a_resolver_mailstrom_makes_ends_at_its_lifetime(
    dns_server: LoopbackDNS,
) -> None:
    """dnspython looks at a lookup's lifetime only between rounds of queries, after a
    back-off that doubles up to 2 s: a lookup of the resolver make_resolver builds (DANE's
    alias lookups, MTA-STS's TXT ones) ran that far past its lifetime, ``dns.timeout``.
    Here rounds of 0.05 s make the back-off 1.6 s when the lifetime of 2 s is nearly
    spent: the lookup ended at 3.35 s at the earliest (its back-offs and query waits,
    which only a loaded host makes longer)."""
    import dns.resolver

    from mailstrom.routing import make_resolver

    dns_server.drop("_mta-sts.slow.test")
    resolver = make_resolver(replace(dns_server.dns_config, timeout=2.0))
    resolver.timeout = 0.05  # one query's wait: many short rounds
    started = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await resolver.resolve("_mta-sts.slow.test", "TXT", search=False)
    assert time.monotonic() - started < 3.0  # the room above 2 s is a loaded host's


async def test_a_better_host_without_addresses_is_looked_at_again_soon(
    dns_server: LoopbackDNS, router: Router, clock: FakeClock
) -> None:
    # A route that skipped a better MX host for want of addresses ("usually a DNS change
    # in progress") was cached for the TTLs of the answers it used, up to a day: once the
    # host had its addresses, mail still went to the backup until then.
    dns_server.mx("example.org", [(10, "new.example.org"), (20, "backup.example.org")],
                  ttl=3600)  # fmt: skip
    dns_server.a("backup.example.org", "127.0.0.9", ttl=3600)
    assert names(await router.route("example.org")) == ["backup.example.org"]
    dns_server.a("new.example.org", "127.0.0.1", ttl=3600)  # the change is done
    clock.now += 61  # as long as a name found without addresses is remembered (NEGATIVE_TTL)
    route = await router.route("example.org")
    assert names(route) == ["new.example.org", "backup.example.org"]


async def test_a_failure_says_which_mx_hosts_were_left_out_by_the_cap(
    dns_server: LoopbackDNS, router: Router
) -> None:
    # Only the 10 best MX hosts are considered (twice mx_address_limit): a domain whose
    # only host with an address is its 11th was deferred as "no MX host of example.org
    # has an address", which is false, and named neither the hosts looked up nor the cap.
    dns_server.mx("example.org", [(i, f"mx{i}.example.org") for i in range(11)])
    dns_server.a("mx10.example.org", "127.0.0.1")
    with pytest.raises(TemporaryFailure) as info:
        await router.route("example.org")
    text = str(info.value)
    assert "mx0.example.org" in text
    assert "1 more MX host" in text
    assert "mx_address_limit" in text

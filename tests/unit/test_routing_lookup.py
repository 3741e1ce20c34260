"""Route lookups against a scripted resolver (no sockets): how much DNS work one route may
cost and how the address limit meets the equal-preference shuffle (hardening finding #6)."""

from __future__ import annotations

import asyncio
import errno
from collections import Counter

import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import pytest
from tests.support.resolver import ScriptedResolver, hosts_in, make_router

from mailstrom.config import DNSConfig
from mailstrom.errors import LocalResourceShortage, TemporaryFailure
from mailstrom.routing import Router
from mailstrom.routing.lookup import NEGATIVE_TTL, lookup_route
from mailstrom.routing.policy import RoutePolicy

# --- hardening #6: bounded DNS work ---------------------------------------------------


async def test_addresses_are_looked_up_only_for_hosts_the_limit_can_use() -> None:
    """Hardening #6: a domain with 100 MX hosts costs address lookups of at most 5 hosts."""
    resolver = ScriptedResolver()
    resolver.mx("many.test", [(10, f"mx{i}.many.test") for i in range(100)])
    for i in range(100):
        resolver.a(f"mx{i}.many.test", f"192.0.2.{i + 1}")
    route = await make_router(resolver).route("many.test")
    assert len(route.addresses) == 5
    assert len(resolver.looked_up()) == 5
    assert set(hosts_in(route)) == resolver.looked_up()


async def test_hosts_without_usable_addresses_do_not_fill_the_limit() -> None:
    """Hardening #6: hosts with no (or only refused) addresses are passed over, and the
    next hosts are looked up until the limit is filled, in preference order."""
    resolver = ScriptedResolver()
    resolver.mx("example.test", [(p, f"mx{p}.example.test") for p in range(1, 8)])
    resolver.aaaa("mx1.example.test", "fe80::1")  # link-local: refused
    resolver.a("mx2.example.test", "127.0.0.1")  # loopback: refused
    # mx3 has no records at all
    resolver.a("mx4.example.test", "192.0.2.4", "192.0.2.44")
    resolver.a("mx5.example.test", "192.0.2.5", "192.0.2.55")
    resolver.a("mx6.example.test", "192.0.2.6", "192.0.2.66")
    resolver.a("mx7.example.test", "192.0.2.7")
    route = await make_router(resolver).route("example.test")
    assert hosts_in(route) == ["mx4.example.test", "mx5.example.test", "mx6.example.test"]
    # A host's addresses come in a random order on each use: mx6 keeps one of its two.
    assert [set(h.addresses) for h in route.hosts[:2]] == [
        {"192.0.2.4", "192.0.2.44"},
        {"192.0.2.5", "192.0.2.55"},
    ]
    assert len(route.addresses) == 5
    assert route.addresses[4] in {"192.0.2.6", "192.0.2.66"}
    # First 5 hosts at once (5 places to fill), then the 1 place left asked of 1 more host.
    assert "mx7.example.test" not in resolver.looked_up()
    assert len(resolver.looked_up()) == 6


async def test_only_the_first_mx_hosts_by_preference_are_considered() -> None:
    """Hardening #6: of 100 MX hosts only the 10 best are considered, so a domain whose
    hosts have no addresses costs 10 host lookups, not 100."""
    resolver = ScriptedResolver()
    resolver.mx("example.test", [(i, f"mx{i}.example.test") for i in range(100)])
    resolver.a("mx50.example.test", "192.0.2.50")  # the only host with an address
    with pytest.raises(TemporaryFailure) as info:
        await make_router(resolver).route("example.test")
    assert info.value.enhanced == "4.4.4"
    assert resolver.looked_up() == {f"mx{i}.example.test" for i in range(10)}


@pytest.mark.parametrize("max_dns_queries", [None, 2, 4])
async def test_dns_queries_in_flight_are_bounded(max_dns_queries: int | None) -> None:
    """Hardening #6: one route lookup never has more than max_dns_queries (default 10)
    queries in flight (today: every host's A and AAAA at once, 200 for 100 hosts)."""
    resolver = ScriptedResolver()
    resolver.mx("example.test", [(10, f"mx{i}.example.test") for i in range(100)])
    options = {} if max_dns_queries is None else {"max_dns_queries": max_dns_queries}
    with pytest.raises(TemporaryFailure):
        await make_router(resolver, **options).route("example.test")
    assert resolver.most_in_flight == (max_dns_queries or 10)
    assert len(resolver.looked_up()) == 10


async def test_all_queries_of_a_route_share_one_deadline() -> None:
    """Hardening #6: the MX query and every address query of one route are bounded by one
    budget (DNSConfig.timeout): each query gets only what is left of it, and no query
    starts once it is spent."""
    resolver = ScriptedResolver(lifetime=10.0, seconds_per_query=3.0)
    resolver.mx("slow.test", [(10, f"mx{i}.slow.test") for i in range(10)])
    start = resolver.clock()
    with pytest.raises(TemporaryFailure, match="timed out") as info:
        await make_router(resolver).route("slow.test")
    assert info.value.enhanced == "4.4.3"
    assert all(q.lifetime is not None and q.lifetime > 0 for q in resolver.queries)
    assert all(q.at + (q.lifetime or 0) <= start + 10.0 for q in resolver.queries)
    # The MX query, then one batch of 5 hosts; the budget is gone before a second batch.
    assert len(resolver.looked_up()) == 5


class _Unanswered:
    """A resolver that looks at its lifetime only when it is too late, as dnspython does
    after its pause between rounds (up to 2 s): here, never."""

    lifetime = 0.2

    async def resolve(self, *args: object, **kwargs: object) -> None:
        await asyncio.Event().wait()


async def test_the_deadline_holds_even_when_the_resolver_overruns_its_lifetime() -> None:
    router = Router(DNSConfig(), resolver=_Unanswered())  # type: ignore[arg-type]
    async with asyncio.timeout(10):  # a hang fails the test instead of holding it
        with pytest.raises(TemporaryFailure, match="timed out") as info:
            await router.route("example.test")
    assert info.value.enhanced == "4.4.3"


async def test_a_route_cut_by_the_deadline_is_used_and_cached_briefly() -> None:
    """Hardening #6: hosts found before the budget ran out are tried; the route is
    incomplete, so it is remembered no longer than a negative answer (not at all, each
    message to the domain spent the whole budget again), then looked up again."""
    resolver = ScriptedResolver(lifetime=10.0, seconds_per_query=4.0)
    resolver.mx("slow.test", [(p, f"mx{p}.slow.test") for p in range(1, 8)])
    resolver.a("mx1.slow.test", "192.0.2.1")  # the others have none: a second batch is due
    router = make_router(resolver)
    route = await router.route("slow.test")
    assert route.addresses == ("192.0.2.1",)
    assert router.cached("slow.test") == route
    resolver.clock.now += NEGATIVE_TTL
    await router.route("slow.test")
    assert len([q for q in resolver.queries if q.rdtype == "MX"]) == 2


# --- the address limit and the equal-preference shuffle -------------------------------


async def test_the_limit_cuts_inside_a_host_and_keeps_ipv4_first() -> None:
    """Hardening #6: a host with 10 addresses contributes 5 (IPv4 first, in random order)."""
    resolver = ScriptedResolver()
    resolver.mx("example.test", [(10, "big.example.test"), (20, "backup.example.test")])
    resolver.a("big.example.test", *(f"192.0.2.{i}" for i in range(1, 9)))
    resolver.aaaa("big.example.test", "2001:db8::1", "2001:db8::2")
    resolver.a("backup.example.test", "192.0.2.100")
    route = await make_router(resolver).route("example.test")
    assert hosts_in(route) == ["big.example.test"]
    assert sorted(route.addresses) == [f"192.0.2.{i}" for i in range(1, 6)]


async def test_thousands_of_addresses_for_one_host_keep_the_limit_per_family() -> None:
    """A zone answering with thousands of addresses (a 64 KB answer over TCP) costs no
    quadratic work: a host keeps the limit's worth of each family, IPv4 first."""
    resolver = ScriptedResolver()
    resolver.mx("big.test", [(10, "mx.big.test")])
    resolver.a("mx.big.test", *(f"10.{i // 250}.{i % 250}.1" for i in range(4000)))
    resolver.aaaa("mx.big.test", *(f"2001:db8::{i + 1:x}" for i in range(2300)))
    found = await lookup_route(resolver, dns.name.from_text("big.test"), policy=RoutePolicy())  # type: ignore[arg-type]
    assert found.route is not None
    [host] = found.route.hosts
    assert host.addresses == (
        *(f"10.0.{i}.1" for i in range(5)),
        *(f"2001:db8::{i + 1:x}" for i in range(5)),
    )
    route = await make_router(resolver).route("big.test")
    assert sorted(route.addresses) == [f"10.0.{i}.1" for i in range(5)]


async def test_mx_address_limit_is_configurable() -> None:
    resolver = ScriptedResolver()
    resolver.mx("example.test", [(10, f"mx{i}.example.test") for i in range(20)])
    for i in range(20):
        resolver.a(f"mx{i}.example.test", f"192.0.2.{i + 1}")
    route = await make_router(resolver, mx_address_limit=12).route("example.test")
    assert len(route.addresses) == 12
    assert len(resolver.looked_up()) == 12


async def test_equal_preferences_cut_by_the_limit_are_chosen_at_random() -> None:
    """Hardening #6: when the limit cuts a preference in two, which of its hosts are
    looked up is random (equal preferences are shuffled before the cut), not the first
    ones by name; preference order still comes first."""
    chosen: Counter[str] = Counter()
    for seed in range(40):
        resolver = ScriptedResolver()
        resolver.mx("example.test", [(5, "best.example.test")] + [
            (10, f"mx{i:02}.example.test") for i in range(20)])  # fmt: skip
        resolver.a("best.example.test", "192.0.2.200")
        for i in range(20):
            resolver.a(f"mx{i:02}.example.test", f"192.0.2.{i + 1}")
        route = await make_router(resolver, seed=seed).route("example.test")
        assert hosts_in(route)[0] == "best.example.test"
        assert len(route.addresses) == 5
        chosen.update(hosts_in(route)[1:])
    assert len(chosen) == 20  # every host of the cut preference had its chance


async def test_cached_route_shuffles_equal_preferences_then_applies_the_limit() -> None:
    """Hardening #6 with the cache: three equal hosts of two addresses each exceed the
    limit of 5; on every call they are reshuffled and the last one in line is cut."""
    resolver = ScriptedResolver()
    resolver.mx("example.test", [(10, "a.test"), (10, "b.test"), (10, "c.test")])
    for host, net in (("a.test", 1), ("b.test", 2), ("c.test", 3)):
        resolver.a(host, f"192.0.{net}.1", f"192.0.{net}.2")
    router = make_router(resolver)
    await router.route("example.test")
    orders = set()
    for _ in range(60):
        route = await router.route("example.test")
        assert len(route.addresses) == 5
        assert [len(h.addresses) for h in route.hosts] == [2, 2, 1]
        orders.add(tuple(hosts_in(route)))
    assert len(orders) == 6  # every order of the three hosts turns up
    assert len([q for q in resolver.queries if q.rdtype == "MX"]) == 1


# --- source_address: addresses of its IP version only ---------------------------------


def _router_from(resolver: ScriptedResolver, source: str, **overrides: object) -> Router:
    from mailstrom.config import Config

    config = Config(helo_name="client.test", source_address=source, **overrides)  # type: ignore[arg-type]
    return Router.for_config(config, resolver=resolver, clock=resolver.clock)  # type: ignore[arg-type]


async def test_addresses_source_address_cannot_reach_take_no_place_in_a_route() -> None:
    """With an IPv4 ``source_address`` an IPv6 address is never tried, so it must not
    fill one of the ``mx_address_limit`` places (Postfix drops them at the lookup, by
    ``inet_protocols``). Was: Google's five MX hosts, an A and an AAAA record each, made a
    route of three hosts, the backups pushed out by addresses that could not be reached."""
    resolver = ScriptedResolver()
    resolver.mx("example.test", [(10 * i, f"mx{i}.example.test") for i in range(1, 6)])
    for i in range(1, 6):
        resolver.a(f"mx{i}.example.test", f"192.0.2.{i}")
        resolver.aaaa(f"mx{i}.example.test", f"2001:db8::{i}")
    route = await _router_from(resolver, "198.51.100.7").route("example.test")
    assert route.addresses == tuple(f"192.0.2.{i}" for i in range(1, 6))
    route = await _router_from(resolver, "2001:db8:ff::7").route("example.test")
    assert route.addresses == tuple(f"2001:db8::{i}" for i in range(1, 6))


async def test_a_domain_with_addresses_only_of_the_other_ip_version_is_deferred() -> None:
    """Nothing to try is a temporary failure naming the reason, for MX hosts and for the
    domain's own addresses (no MX) alike: not "no MX and no address records", which
    would fail the mail for good although another source_address reaches it."""
    resolver = ScriptedResolver()
    resolver.mx("mx6.test", [(10, "mx.mx6.test")])
    resolver.aaaa("mx.mx6.test", "2001:db8::1")
    resolver.aaaa("implicit6.test", "2001:db8::2")
    router = _router_from(resolver, "198.51.100.7")
    for domain in ("mx6.test", "implicit6.test"):
        with pytest.raises(TemporaryFailure, match="IPv4") as raised:
            await router.route(domain)
        assert raised.value.enhanced == "4.4.4"


class _OutOfDescriptors(ScriptedResolver):
    """Every query fails as dnspython tells a socket this host could not make: in the
    list of each server's error, under "All nameservers failed to answer"."""

    async def resolve(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, **_: object
    ) -> dns.resolver.Answer:
        shortage = OSError(errno.EMFILE, "Too many open files")
        raise dns.resolver.NoNameservers(
            request=dns.message.make_query(qname, rdtype),
            errors=[("127.0.0.1", False, 53, shortage, None)],
        )


async def test_a_lookup_out_of_descriptors_blames_this_host_not_the_dns_server() -> None:
    """It said "Server 127.0.0.1 answered [Errno 24] Too many open files" (4.4.3): a DNS
    server blamed for a socket this host could not make."""
    with pytest.raises(LocalResourceShortage) as caught:
        await lookup_route(
            _OutOfDescriptors(),  # type: ignore[arg-type]
            dns.name.from_text("example.org"),
            policy=RoutePolicy(),
        )
    assert caught.value.enhanced == "4.3.0"
    assert caught.value.text == (
        "local resource shortage: DNS lookup of example.org. MX failed on this host: "
        "Too many open files (no server was asked)"
    )


async def test_a_tlsa_lookup_out_of_descriptors_is_this_hosts_shortage() -> None:
    """DANE's TLSA lookup said "DANE: TLSA lookup of ... failed: ... Server 127.0.0.1
    answered [Errno 24]" (4.7.5), which TLS reports then counted as the domain's
    dnssec-invalid: a socket this host could not make."""
    from mailstrom.tls.dane import lookup_tlsa

    resolver = _OutOfDescriptors()
    resolver.timeout = 2.0  # type: ignore[attr-defined]  # read by lookup_tlsa's reserve
    with pytest.raises(LocalResourceShortage) as caught:
        await lookup_tlsa(resolver, "mx.example.org")  # type: ignore[arg-type]
    assert caught.value.enhanced == "4.3.0"
    assert caught.value.text.startswith("local resource shortage: DANE: TLSA lookup of")

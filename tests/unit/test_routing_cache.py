"""The route cache (engine v2): cached by the domain string, prepared once, and read
synchronously through ``Router.cached``. A scripted resolver stands in for DNS."""

from __future__ import annotations

import dataclasses
import random

import dns.name
import pytest
from tests.support.resolver import ScriptedResolver, make_router

from mailstrom.errors import PermanentFailure
from mailstrom.routing import MXHost, Route
from mailstrom.routing import router as router_module
from mailstrom.routing.lookup import Lookup


async def test_cached_route_costs_no_name_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine v2: a cached route is found by the domain string; dns.name.from_text (via
    to_qname) runs once per spelling, not on every call."""
    resolver = ScriptedResolver()
    resolver.mx("example.test", [(10, "mx.example.test")])
    resolver.a("mx.example.test", "192.0.2.1")
    router = make_router(resolver)
    await router.route("example.test")
    await router.route("Example.TEST")  # another spelling: parsed once, then remembered
    calls = 0
    real = router_module.to_qname

    def counting(domain: str) -> dns.name.Name:
        nonlocal calls
        calls += 1
        return real(domain)

    monkeypatch.setattr(router_module, "to_qname", counting)
    for _ in range(3):
        await router.route("example.test")
        await router.route("Example.TEST")
    assert calls == 0
    assert router.cached("EXAMPLE.test") is not None
    assert calls == 0
    assert len([q for q in resolver.queries if q.rdtype == "MX"]) == 1


async def test_cached_is_a_synchronous_fast_path() -> None:
    """Engine v2: Router.cached answers without a coroutine: None when unknown, the route
    when cached, and the cached permanent failure raised."""
    resolver = ScriptedResolver()
    resolver.mx("example.test", [(10, "mx.example.test")])
    resolver.a("mx.example.test", "192.0.2.1")
    resolver.zone[("nomail.test", "MX")] = ["0 ."]  # null MX (RFC 7505)
    router = make_router(resolver)
    assert router.cached("example.test") is None
    assert resolver.queries == []
    await router.route("example.test")
    route = router.cached("example.test")
    assert route is not None and route.addresses == ("192.0.2.1",)
    with pytest.raises(PermanentFailure):
        await router.route("nomail.test")
    with pytest.raises(PermanentFailure, match="null MX"):
        router.cached("nomail.test")
    # Address literals need no DNS: always known.
    literal = router.cached("[192.0.2.9]")
    assert literal is not None and literal.addresses == ("192.0.2.9",)
    # Expired entries are not handed out.
    resolver.clock.now += 301
    assert router.cached("example.test") is None


async def test_a_route_with_nothing_to_shuffle_is_prepared_once() -> None:
    """Engine v2: one host, or hosts of distinct preferences, need no shuffle: every call
    hands out the same prepared route instead of building a new one."""
    resolver = ScriptedResolver()
    resolver.mx("one.test", [(10, "mx.one.test")])
    resolver.a("mx.one.test", "192.0.2.1")
    resolver.mx("distinct.test", [(10, "mx1.distinct.test"), (20, "mx2.distinct.test")])
    resolver.a("mx1.distinct.test", "192.0.2.1")
    resolver.a("mx2.distinct.test", "192.0.2.2")
    router = make_router(resolver)
    for domain in ("one.test", "distinct.test"):
        first = await router.route(domain)
        assert await router.route(domain) is first
        assert router.cached(domain) is first


async def test_forget_drops_every_spelling() -> None:
    resolver = ScriptedResolver()
    resolver.mx("example.test", [(10, "mx.example.test")])
    resolver.a("mx.example.test", "192.0.2.1")
    router = make_router(resolver)
    await router.route("example.test")
    await router.route("EXAMPLE.test.")
    router.forget("Example.Test")
    assert router.cached("example.test") is None
    assert router.cached("EXAMPLE.test.") is None


@pytest.mark.parametrize("limit", [10, 3])
def test_a_shuffled_route_keeps_everything_but_its_hosts_order(limit: int) -> None:
    """A route whose hosts are shuffled on each use (equal preferences), cut to the address
    limit or not, keeps what the lookup found about the domain: DANE depends on it."""
    hosts = tuple(
        MXHost(name=f"mx{i}.example.org", preference=10, addresses=(f"192.0.2.{i}", f"::{i}"))
        for i in range(1, 4)
    )
    route = Route(
        domain="shop.example", hosts=hosts, implicit=False, secure=True, canonical="example.org"
    )
    entry = router_module._prepare(
        Lookup(route=route, ttl=60.0), canonical="shop.example", expires=60.0, limit=limit
    )
    assert entry.template is not None  # the path that rebuilds the route on each use
    finished = entry.finish(random.Random(7))
    # Every field but the hosts, whichever fields Route has: a new one with a default must
    # be set to something else above, or leaving it out of finish() would go unnoticed.
    others = [f for f in dataclasses.fields(Route) if f.name != "hosts"]
    unset = [f.name for f in others if getattr(route, f.name) == f.default]
    assert unset == [], f"give {unset} a non-default value in this test"
    assert {f.name: getattr(finished, f.name) for f in others} == {
        f.name: getattr(route, f.name) for f in others
    }
    assert {h.name for h in finished.hosts} <= {h.name for h in hosts}
    assert len(finished.addresses) == min(limit, 6)


async def test_a_full_cache_drops_expired_routes_then_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the limit, a new domain takes the place of an expired route first, and only
    when none has expired the place of the oldest one."""
    monkeypatch.setattr(router_module, "MAX_CACHED", 4)
    resolver = ScriptedResolver()
    for i in range(7):
        resolver.mx(f"d{i}.test", [(10, "mx.test")])
    resolver.a("mx.test", "192.0.2.1")
    router = make_router(resolver)
    for name in ("d0.test", "d1.test"):
        await router.route(name)
    resolver.clock.now += 200
    for name in ("d2.test", "d3.test"):
        await router.route(name)
    resolver.clock.now += 150  # d0 and d1 (TTL 300) have expired, d2 and d3 have not
    for name in ("d4.test", "d5.test", "d6.test"):
        await router.route(name)
    cached = [f"d{i}.test" for i in range(7) if router.cached(f"d{i}.test") is not None]
    assert cached == ["d3.test", "d4.test", "d5.test", "d6.test"]  # d2 was the oldest
    mx_queries = [q.name for q in resolver.queries if q.rdtype == "MX"]
    assert len(mx_queries) == 7  # nothing was looked up twice


def test_a_full_cache_takes_a_new_domain_without_reading_every_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the cache is full, each new domain read the expiry of every cached route (a
    scan of 10,000 entries per new domain, on the event loop) to find an expired one.
    The cost of a new domain must not grow with the size of the cache."""
    size = 1000
    monkeypatch.setattr(router_module, "MAX_CACHED", size)
    slot = router_module._Entry.__dict__["expires"]
    reads = 0

    def read(entry: object) -> float:
        nonlocal reads
        reads += 1
        return slot.__get__(entry)  # type: ignore[no-any-return]

    monkeypatch.setattr(
        router_module._Entry, "expires", property(read, lambda e, v: slot.__set__(e, v))
    )
    router = make_router(ScriptedResolver())
    for i in range(size):  # address literals: cached without DNS, never expiring
        assert router.cached(f"[10.0.{i // 256}.{i % 256}]") is not None
    reads = 0
    extra = 200
    for i in range(extra):
        assert router.cached(f"[10.1.{i // 256}.{i % 256}]") is not None
    assert reads <= 10 * extra, reads

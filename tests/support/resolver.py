"""A scripted stand-in for dnspython's async resolver, for routing tests without sockets."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from mailstrom.config import DNSConfig
from mailstrom.routing import Route, Router

IN = dns.rdataclass.IN


class FakeClock:
    """A monotonic clock in seconds that only the test (or the resolver) moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Query:
    name: str
    rdtype: str
    at: float
    lifetime: float | None


@dataclass
class ScriptedResolver:
    """Stands in for ``dns.asyncresolver.Resolver``: answers from ``zone``, records every
    query, and lets the event loop run between a query's start and its answer so that
    concurrent queries really overlap."""

    clock: FakeClock = field(default_factory=FakeClock)
    lifetime: float = 10.0
    seconds_per_query: float = 0.0
    """How far each query moves the clock, as if the server took that long."""
    zone: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    queries: list[Query] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0

    def mx(self, domain: str, hosts: Iterable[tuple[int, str]]) -> None:
        self.zone[(domain, "MX")] = [f"{pref} {host}." for pref, host in hosts]

    def a(self, name: str, *addresses: str) -> None:
        self.zone[(name, "A")] = list(addresses)

    def aaaa(self, name: str, *addresses: str) -> None:
        self.zone[(name, "AAAA")] = list(addresses)

    def looked_up(self) -> set[str]:
        """Host names whose addresses were asked for."""
        return {q.name for q in self.queries if q.rdtype in ("A", "AAAA")}

    async def resolve(
        self,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        *,
        search: bool | None = None,
        lifetime: float | None = None,
    ) -> dns.resolver.Answer:
        name = qname.to_text(omit_final_dot=True)
        self.queries.append(Query(name, rdtype.name, self.clock(), lifetime))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            for _ in range(3):
                await asyncio.sleep(0)  # loop turns, not time: let the others start
            self.clock.now += self.seconds_per_query
        finally:
            self.in_flight -= 1
        texts = self.zone.get((name, rdtype.name))
        if texts is None:
            if not any(key[0] == name for key in self.zone):
                raise dns.resolver.NXDOMAIN(qnames=[qname])
            raise dns.resolver.NoAnswer()
        query = dns.message.make_query(qname, rdtype)
        response = dns.message.make_response(query)
        rrset = response.find_rrset(response.answer, qname, IN, rdtype, create=True)
        for text in texts:
            rrset.add(dns.rdata.from_text(IN, rdtype, text), 300)
        return dns.resolver.Answer(qname, rdtype, IN, response)


def make_router(resolver: ScriptedResolver, seed: int = 0, **policy: object) -> Router:
    """A router asking ``resolver``, on its clock, with a seeded rng and ``policy``."""
    return Router(
        DNSConfig(),
        resolver=resolver,  # type: ignore[arg-type]
        clock=resolver.clock,
        rng=random.Random(seed),
        **policy,  # type: ignore[arg-type]
    )


def hosts_in(route: Route) -> list[str]:
    return [h.name for h in route.hosts]

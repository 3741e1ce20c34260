"""The :class:`Router`: MX lookups with a TTL cache and one query per domain in flight."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.resolver

from mailstrom.config import Config, DNSConfig
from mailstrom.routing.lookup import Lookup, literal_lookup, lookup_route, to_qname
from mailstrom.routing.policy import MAX_DNS_QUERIES, MX_ADDRESS_LIMIT, RoutePolicy
from mailstrom.routing.route import Route, equal_preference_spans, limit_addresses, shuffle_spans

MAX_CACHED = 10_000
"""Domains remembered at most; beyond it expired entries, then the oldest, are dropped."""


def make_resolver(config: DNSConfig) -> dns.asyncresolver.Resolver:
    """A dnspython async resolver as ``config`` says: its nameservers and port, or the
    system's (resolv.conf) when it names none. ``config.timeout`` becomes its ``lifetime``,
    which the router spends on each route as a whole (every query of one lookup)."""
    try:
        resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
    except dns.resolver.NoResolverConfiguration:
        # No resolv.conf: start anyway; every lookup then fails temporarily ("no
        # nameservers"), which is visible in each recipient's status and retried.
        resolver = dns.asyncresolver.Resolver(configure=False)
    if config.nameservers:
        resolver.port = config.port
        resolver.nameservers = list(config.nameservers)
    resolver.lifetime = config.timeout
    return resolver


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    lookup: Lookup


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task[Lookup]
    waiters: int = field(default=0)


class Router:
    """Finds the hosts that take mail for a domain, with dnspython's async resolver.

    Routes and permanent failures (NXDOMAIN, null MX, refused targets) are cached by
    domain for the smallest TTL of the answers used, measured with ``clock``; temporary
    failures are not cached. Concurrent calls for one domain share one lookup. Hosts of
    equal MX preference are shuffled with ``rng`` on every call, so load spreads over them
    even while the route is cached.

    Every route holds at most ``mx_address_limit`` addresses (Postfix's
    ``smtp_mx_address_limit``) and no loopback, unspecified or link-local address unless
    ``allow_loopback``. One lookup considers at most ``mx_host_limit`` MX hosts (default:
    twice the address limit), keeps at most ``max_dns_queries`` queries in flight, and
    spends at most ``dns.timeout`` seconds in all.

    The router's :class:`~mailstrom.routing.policy.RoutePolicy` comes from the keyword
    arguments; :meth:`for_config` takes it from a :class:`~mailstrom.config.Config`.

    >>> router = Router(DNSConfig(nameservers=("127.0.0.1",), port=5353))
    >>> # route = await router.route("example.org")
    """

    def __init__(
        self,
        dns: DNSConfig,
        *,
        allow_loopback: bool = False,
        mx_address_limit: int = MX_ADDRESS_LIMIT,
        mx_host_limit: int | None = None,
        max_dns_queries: int = MAX_DNS_QUERIES,
        resolver: dns.asyncresolver.Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = RoutePolicy(
            allow_loopback=allow_loopback,
            mx_address_limit=mx_address_limit,
            mx_host_limit=mx_host_limit,
            max_dns_queries=max_dns_queries,
        )
        self._resolver = resolver if resolver is not None else make_resolver(dns)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, _Flight] = {}

    @classmethod
    def for_config(
        cls,
        config: Config,
        *,
        resolver: dns.asyncresolver.Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> Router:
        """The router ``config`` asks for: its DNS settings, ``allow_loopback`` and
        ``mx_address_limit``. This is how the worker and the command line build theirs."""
        return cls(
            config.dns,
            allow_loopback=config.allow_loopback,
            mx_address_limit=config.mx_address_limit,
            resolver=resolver,
            clock=clock,
            rng=rng,
        )

    async def route(self, domain: str) -> Route:
        """The route for ``domain`` (Unicode or A-label, any case).

        Raises :class:`~mailstrom.errors.PermanentFailure` when mail cannot ever go there
        (NXDOMAIN 5.1.2, null MX 556 5.1.10, no MX and no address 5.4.4, every address
        refused by the policy 5.4.4) and
        :class:`~mailstrom.errors.TemporaryFailure` when it cannot go there now (DNS
        server failure or timeout 4.4.3, MX hosts without addresses 4.4.4).
        """
        literal = literal_lookup(domain, self.policy)
        if literal is not None:
            return self._finish(literal)
        qname = to_qname(domain)
        key = qname.to_text()
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > self._clock():
                return self._finish(entry.lookup)
            del self._cache[key]
        flight = self._inflight.get(key)
        if flight is None or flight.task.get_loop() is not asyncio.get_running_loop():
            # (A flight of another, since closed, event loop cannot be awaited here.)
            task = asyncio.ensure_future(self._lookup(key, qname))
            flight = self._inflight[key] = _Flight(task=task)
            task.add_done_callback(lambda t: self._landed(key, t))
        flight.waiters += 1
        try:
            # shield: one caller giving up must not cancel the lookup the others await.
            lookup = await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()  # nobody wants it any more
        return self._finish(lookup)

    def forget(self, domain: str | None = None) -> None:
        """Drop the cached route of ``domain``, or of every domain."""
        if domain is None:
            self._cache.clear()
        else:
            self._cache.pop(to_qname(domain).to_text(), None)

    def _finish(self, lookup: Lookup) -> Route:
        """Equal preferences shuffled, then cut to the address limit in that order."""
        route = lookup.unwrap()
        hosts = list(route.hosts)
        shuffle_spans(hosts, equal_preference_spans(route.hosts), self._rng)
        limited = limit_addresses(hosts, self.policy.mx_address_limit)
        return Route(domain=route.domain, hosts=limited, implicit=route.implicit)

    async def _lookup(self, key: str, qname: dns.name.Name) -> Lookup:
        lookup = await lookup_route(
            self._resolver, qname, policy=self.policy, rng=self._rng, clock=self._clock
        )
        if lookup.ttl is not None and lookup.ttl > 0:
            self._remember(key, _Entry(expires=self._clock() + lookup.ttl, lookup=lookup))
        return lookup

    def _remember(self, key: str, entry: _Entry) -> None:
        if len(self._cache) >= MAX_CACHED:
            now = self._clock()
            for stale in [k for k, e in self._cache.items() if e.expires <= now]:
                del self._cache[stale]
            while len(self._cache) >= MAX_CACHED:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = entry

    def _landed(self, key: str, task: asyncio.Task[Lookup]) -> None:
        if self._inflight.get(key) is not None and self._inflight[key].task is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not logged

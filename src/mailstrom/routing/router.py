"""The :class:`Router`: MX lookups with a TTL cache and one query per domain in flight."""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import itertools
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import dns.asyncresolver
import dns.flags
import dns.name
import dns.rdata
import dns.resolver

from mailstrom.config import Config, DNSConfig
from mailstrom.dnsclock import SteadyResolver
from mailstrom.routing.lookup import (
    FOREVER,
    MAX_TTL,
    Lookup,
    Refusal,
    is_literal,
    literal_lookup,
    lookup_route,
    to_qname,
)
from mailstrom.routing.policy import MAX_DNS_QUERIES, MX_ADDRESS_LIMIT, RoutePolicy
from mailstrom.routing.route import (
    Route,
    address_spans,
    cache_key,
    equal_preference_spans,
    limit_addresses,
    shuffle_addresses,
    shuffle_spans,
)

MAX_CACHED = 10_000
"""Domains remembered at most; beyond it expired entries, then the oldest, are dropped."""


def _load_record_types() -> None:
    """Import dnspython's class of every record type now, while files can be opened.

    dnspython imports the class of a type when an answer first holds one, and a reply it
    cannot parse is skipped while it waits for another: out of descriptors, the import
    failed (EMFILE), and a lookup whose socket was opened with the last free descriptor
    waited out its whole budget and was told as a DNS server's timeout, an attempt spent.
    Once imported, a class is looked up in dnspython's table (no file opened). Dynamic
    loading stays on, and no type without a class of dnspython's is entered as generic:
    an application's own class registered later still applies."""
    dns.rdata.load_all_types(disable_dynamic_load=False)  # type: ignore[no-untyped-call]


def make_resolver(config: DNSConfig) -> dns.asyncresolver.Resolver:
    """A dnspython async resolver as ``config`` says: its nameservers, or the system's
    (resolv.conf) when it names none, on its port. ``config.timeout`` becomes its ``lifetime``,
    which the router spends on each route as a whole (every query of one lookup), kept on
    the monotonic clock (:class:`~mailstrom.dnsclock.SteadyResolver`)."""
    _load_record_types()
    try:
        resolver = SteadyResolver(configure=not config.nameservers)
    except dns.resolver.NoResolverConfiguration:
        # No resolv.conf: start anyway; every lookup then fails temporarily ("no
        # nameservers"), which is visible in each recipient's status and retried.
        resolver = SteadyResolver(configure=False)
    # The port applies to resolv.conf's servers too: set alone, it was silently ignored.
    resolver.port = config.port
    if config.nameservers:
        resolver.nameservers = list(config.nameservers)
    resolver.lifetime = config.timeout
    if config.dnssec:
        # Ask for DNSSEC (the DO bit) and for the AD bit in answers (RFC 6840 §5.7), which
        # a validating resolver sets on what it validated.
        resolver.use_edns(0, dns.flags.DO, 1232)
        resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver


@dataclass(frozen=True, slots=True, kw_only=True)
class _Entry:
    """A lookup prepared so that each use costs as little as possible."""

    canonical: str
    """The lower-case A-label the lookup was made for (several spellings may share it)."""
    expires: float
    """Clock time after which the entry is stale (-inf: never to be cached)."""
    refusal: Refusal | None = None
    ready: Route | None = None
    """The route to hand out as it is, when there is nothing to shuffle."""
    template: Route | None = None
    """Otherwise: the hosts to shuffle within ``spans`` and then cut to ``limit``."""
    spans: tuple[tuple[int, int], ...] = ()
    address_spans: tuple[tuple[int, int, int], ...] = ()
    """(host, start, stop) of the addresses of one family to shuffle within a host."""
    limit: int | None = None
    """Address limit to apply after shuffling; None when the hosts are within it."""

    def finish(self, rng: random.Random) -> Route:
        """The route to try now, or raise the cached permanent failure."""
        if self.ready is not None:
            return self.ready
        if self.refusal is not None:
            raise self.refusal.error()
        assert self.template is not None
        hosts = list(self.template.hosts)
        # Addresses first: their spans index the hosts in the template's order.
        shuffle_addresses(hosts, self.address_spans, rng)
        shuffle_spans(hosts, self.spans, rng)
        template = self.template
        # Only the hosts change. Built field by field, not with dataclasses.replace (0.65
        # µs more per call, benchmarks/route_cache.py); the unit test
        # test_a_shuffled_route_keeps_everything_but_its_hosts_order catches a field left out.
        return Route(
            domain=template.domain,
            hosts=tuple(hosts) if self.limit is None else limit_addresses(hosts, self.limit),
            implicit=template.implicit,
            secure=template.secure,
            canonical=template.canonical,
        )


def _prepare(lookup: Lookup, *, canonical: str, expires: float, limit: int) -> _Entry:
    if lookup.refusal is not None:
        return _Entry(canonical=canonical, expires=expires, refusal=lookup.refusal)
    route = lookup.unwrap()
    spans = equal_preference_spans(route.hosts)
    addresses = address_spans(route.hosts)
    over = sum(len(h.addresses) for h in route.hosts) > limit
    if not spans and not addresses:
        hosts = limit_addresses(route.hosts, limit) if over else route.hosts
        ready = replace(route, hosts=hosts)
        return _Entry(canonical=canonical, expires=expires, ready=ready)
    return _Entry(
        canonical=canonical,
        expires=expires,
        template=route,
        spans=spans,
        address_spans=addresses,
        limit=limit if over else None,
    )


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task[_Entry]
    waiters: int = field(default=0)


class Router:
    """Finds the hosts that take mail for a domain, with dnspython's async resolver.

    Routes and permanent failures (NXDOMAIN, null MX, refused targets) are cached for the
    smallest TTL of the answers used, one day at most (``lookup.MAX_TTL``: a hostile zone's
    TTL of 2**31-1 s must not pin its route), measured with ``clock``, by the domain string as
    given (lower-cased if ASCII, see :func:`cache_key`) so that a cached route costs one
    dict lookup; temporary failures are not cached, and a route one of whose queries failed
    (an AAAA query timed out) is cached for ``lookup.NEGATIVE_TTL`` (60 s) at most, then
    looked up whole again (:class:`~mailstrom.routing.lookup.Lookup`). Concurrent calls
    for one domain share one lookup. Hosts of equal MX preference, and each host's
    addresses of one family, are shuffled with ``rng`` on every call, so load spreads over
    them even while the route is cached.

    Every route holds at most ``mx_address_limit`` addresses (Postfix's
    ``smtp_mx_address_limit``), only of ``ip_version`` when given (4 or 6), and no
    loopback, unspecified or link-local address unless ``allow_loopback`` (see
    :class:`~mailstrom.routing.policy.RoutePolicy`). One lookup
    considers at most ``mx_host_limit`` MX hosts (default: twice the address limit), keeps
    at most ``max_dns_queries`` queries in flight, and spends at most ``dns.timeout``
    seconds in all.

    >>> router = Router(DNSConfig(nameservers=("127.0.0.1",), port=5353))
    >>> # route = router.cached("example.org") or await router.route("example.org")
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
        ip_version: int | None = None,
    ) -> None:
        self.policy = RoutePolicy(
            allow_loopback=allow_loopback,
            mx_address_limit=mx_address_limit,
            mx_host_limit=mx_host_limit,
            max_dns_queries=max_dns_queries,
            ip_version=ip_version,
        )
        self._resolver = resolver if resolver is not None else make_resolver(dns)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        """Oldest first: the first to drop at the limit when none has expired."""
        self._expiries: list[tuple[float, int, str, _Entry]] = []
        """A heap of (expiry, order, key, entry) of every cached entry, and of some no
        longer cached (skipped when met): finds an expired entry without a scan."""
        self._order = itertools.count()
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
        """The router ``config`` asks for: its DNS settings, ``allow_loopback``,
        ``mx_address_limit``, ``mx_host_limit``, and the IP version of ``source_address``
        (routes hold no address of the other). This is how the worker and the command
        line build theirs."""
        source = config.source_address
        return cls(
            config.dns,
            allow_loopback=config.allow_loopback,
            mx_address_limit=config.mx_address_limit,
            mx_host_limit=config.mx_host_limit,
            resolver=resolver,
            clock=clock,
            rng=rng,
            ip_version=None if source is None else ipaddress.ip_address(source).version,
        )

    def cached(self, domain: str) -> Route | None:
        """The route for ``domain`` if it is known now, without a coroutine; else None.

        Raises the cached :class:`~mailstrom.errors.PermanentFailure` if ``domain`` is
        known to take no mail. Address literals are always known. The delivery engine
        calls this first and awaits :meth:`route` only on None.
        """
        key = cache_key(domain)
        entry = self._cache.get(key)
        if entry is None:
            if not is_literal(key):
                return None
            entry = self._literal(key)
        elif entry.expires <= self._clock():
            return None
        return entry.finish(self._rng)

    async def route(self, domain: str) -> Route:
        """The route for ``domain`` (Unicode or A-label, any case).

        Raises :class:`~mailstrom.errors.PermanentFailure` when mail cannot ever go there
        (NXDOMAIN 5.1.2, null MX 556 5.1.10, no MX and no address 5.4.4, every address
        refused by the policy 5.4.4) and :class:`~mailstrom.errors.TemporaryFailure` when
        it cannot go there now (DNS server failure or timeout 4.4.3, MX hosts without
        addresses, or refused ones while MX hosts past the cut, ``hosts_considered``, were
        not looked up, 4.4.4).
        """
        key = cache_key(domain)
        entry = self._cache.get(key)
        if entry is None or entry.expires <= self._clock():
            entry = await self._resolve(domain, key)
        return entry.finish(self._rng)

    def forget(self, domain: str | None = None) -> None:
        """Drop the cached route of ``domain`` (every spelling of it), or of every domain."""
        if domain is None:
            self._cache.clear()
            self._expiries.clear()
            return
        key = cache_key(domain)
        canonical = key if is_literal(key) else to_qname(domain).to_text(omit_final_dot=True)
        for stale in [k for k, e in self._cache.items() if e.canonical == canonical]:
            del self._cache[stale]

    def _literal(self, key: str) -> _Entry:
        lookup = literal_lookup(key, self.policy)
        assert lookup is not None
        entry = _prepare(lookup, canonical=key, expires=FOREVER, limit=self.policy.mx_address_limit)
        self._remember(key, entry)
        return entry

    async def _resolve(self, domain: str, key: str) -> _Entry:
        """The slow path: ``key`` (:func:`cache_key` of ``domain``) is not cached or is stale."""
        if is_literal(key):
            return self._literal(key)
        self._cache.pop(key, None)
        qname = to_qname(domain)
        canonical = qname.to_text(omit_final_dot=True)
        if is_literal(canonical):
            # A literal with a final dot or white space, which to_qname takes off: that
            # literal, not a DNS name, whose answers were cached under the literal's key.
            literal = self._literal(canonical)
            self._remember(key, literal)
            return literal
        entry = self._cache.get(canonical)
        if entry is not None and entry.expires > self._clock():
            self._remember(key, entry)  # another spelling of a cached domain
            return entry
        flight = self._inflight.get(canonical)
        if flight is None or flight.task.get_loop() is not asyncio.get_running_loop():
            # (A flight of another, since closed, event loop cannot be awaited here.)
            task = asyncio.ensure_future(self._lookup(canonical, qname))
            flight = self._inflight[canonical] = _Flight(task=task)
            task.add_done_callback(lambda t: self._landed(canonical, t))
        flight.waiters += 1
        try:
            # shield: one caller giving up must not cancel the lookup the others await.
            entry = await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()  # nobody wants it any more
                # Forgotten now, not when it lands: it ends (cancelled) only a loop turn
                # later, and a caller arriving in between must start a lookup of its own
                # rather than join this one and get its CancelledError.
                if self._inflight.get(canonical) is flight:
                    del self._inflight[canonical]
        if key != canonical and entry.expires > self._clock():
            self._remember(key, entry)
        return entry

    async def _lookup(self, canonical: str, qname: dns.name.Name) -> _Entry:
        lookup = await lookup_route(
            self._resolver, qname, policy=self.policy, rng=self._rng, clock=self._clock
        )
        ttl = min(lookup.ttl, MAX_TTL)
        cacheable = ttl > 0
        expires = self._clock() + ttl if cacheable else -FOREVER
        entry = _prepare(
            lookup, canonical=canonical, expires=expires, limit=self.policy.mx_address_limit
        )
        if cacheable:
            self._remember(canonical, entry)
        return entry

    def _remember(self, key: str, entry: _Entry) -> None:
        """Cache ``entry`` under ``key``; at the limit, an expired entry makes room, or
        the oldest when none has expired. Amortised O(log n): a scan of every entry for
        each new domain (10,000 of them) held the event loop up once the cache was full."""
        cache = self._cache
        if key not in cache:
            while len(cache) >= MAX_CACHED:
                self._drop_one()
        cache[key] = entry
        expiries = self._expiries
        heapq.heappush(expiries, (entry.expires, next(self._order), key, entry))
        if len(expiries) > 2 * len(cache) + 64:
            # Mostly entries no longer cached (looked up again, forgotten): rebuilt, at a
            # cost the pushes since the last rebuild have paid for.
            expiries[:] = [(e.expires, next(self._order), k, e) for k, e in cache.items()]
            heapq.heapify(expiries)

    def _drop_one(self) -> None:
        """Drop an expired entry, else the oldest one."""
        cache = self._cache
        expiries = self._expiries
        now = self._clock()
        while expiries:
            expires, _, key, entry = expiries[0]
            if cache.get(key) is not entry:
                heapq.heappop(expiries)  # no longer cached under that key
            elif expires <= now:
                heapq.heappop(expiries)
                del cache[key]
                return
            else:
                break  # the soonest to expire has not: none has
        cache.popitem(last=False)

    def _landed(self, key: str, task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(key) is not None and self._inflight[key].task is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not logged

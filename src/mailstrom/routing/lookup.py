"""Turning DNS answers into a :class:`Lookup` (RFC 5321 §5.1, RFC 7505), without caching.

One function, :func:`lookup_route`, asks a dnspython async resolver for a domain's MX
records and the hosts' addresses and decides what they mean under a
:class:`~mailstrom.routing.policy.RoutePolicy`. It returns a :class:`Lookup`: the hosts
found or a permanent failure, each with how long it may be cached. Temporary failures
(SERVFAIL, timeouts, no reachable nameserver) are raised as
:class:`~mailstrom.errors.TemporaryFailure` and must not be cached.

The DNS work of one lookup is bounded (hardening finding #6): every query shares one
deadline (the resolver's ``lifetime``, i.e. ``DNSConfig.timeout``, for the whole route,
not per query), at most ``hosts_considered`` MX hosts (10 by default) are considered,
addresses are looked up only for as many hosts as the address limit can still use, and
at most ``max_dns_queries`` queries are in flight.

This module decides; the rest lives beside it: reading DNS names and answers in
:mod:`~mailstrom.routing.answers`, the queries of one lookup under its deadline in
:mod:`~mailstrom.routing.resolution`, what a lookup gives and the failures it words in
:mod:`~mailstrom.routing.result`. Every name in ``__all__`` is importable from here.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from itertools import groupby

import dns.asyncresolver
import dns.name
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from mailstrom.domains import literal_address
from mailstrom.errors import TemporaryFailure
from mailstrom.routing.answers import (
    LOCALHOST,
    LOOPBACK,
    REFERRAL,
    TRUNCATED,
    authenticated,
    expanded_name,
    is_literal,
    is_referral_response,
    literal_exchange,
    localhost_addresses,
    numeric_exchange,
    to_qname,
    unanswered,
    unanswered_response,
)
from mailstrom.routing.policy import RoutePolicy
from mailstrom.routing.resolution import _Missing, _Resolution, negative_ttl
from mailstrom.routing.result import (
    _NAMED_REFUSALS,
    _NO_ROUTE,
    FOREVER,
    MAX_TTL,
    NEGATIVE_TTL,
    Lookup,
    Refusal,
    _named,
    _no_host_names,
    _other_version,
    _refused,
    _refused_why,
)
from mailstrom.routing.route import MXHost, Route

__all__ = [
    "FOREVER",
    "LOCALHOST",
    "LOOPBACK",
    "MAX_TTL",
    "NEGATIVE_TTL",
    "REFERRAL",
    "TRUNCATED",
    "Lookup",
    "Refusal",
    "authenticated",
    "expanded_name",
    "is_literal",
    "is_referral_response",
    "literal_exchange",
    "literal_lookup",
    "localhost_addresses",
    "lookup_route",
    "negative_ttl",
    "numeric_exchange",
    "to_qname",
    "unanswered",
    "unanswered_response",
]


def literal_lookup(domain: str, policy: RoutePolicy) -> Lookup | None:
    """The route for an address literal (RFC 5321 §4.1.3), which names its host directly;
    None for an ordinary domain. Nothing here depends on DNS, so it never expires."""
    if not is_literal(domain):
        return None
    ip = literal_address(domain)
    if ip is None:
        refusal = Refusal(text=f"invalid address literal {domain!r}", enhanced="5.1.2")
        return Lookup(refusal=refusal, ttl=FOREVER)
    address = str(ip)
    kind = policy.refused(address)
    if kind is not None:
        return Lookup(refusal=_refused(domain, [(None, address, kind)]), ttl=FOREVER)
    host = MXHost(name=domain, preference=0, addresses=(address,))
    return Lookup(route=Route(domain=domain, hosts=(host,), implicit=True), ttl=FOREVER)


async def lookup_route(
    resolver: dns.asyncresolver.Resolver,
    qname: dns.name.Name,
    *,
    policy: RoutePolicy | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Lookup:
    """Look up where mail for ``qname`` goes. Hosts come in preference order; which hosts
    of equal preference are looked up (when not all are needed) is chosen with ``rng``.
    ``clock`` measures the deadline (``resolver.lifetime`` seconds for the whole lookup).
    """
    policy = policy if policy is not None else RoutePolicy()
    resolution = _Resolution(resolver, policy, clock)
    domain = qname.to_text(omit_final_dot=True)
    answer = await resolution.query(qname, dns.rdatatype.MX)
    if isinstance(answer, _Missing):
        if answer.nxdomain:
            refusal = Refusal(text=f"domain {domain} does not exist (NXDOMAIN)", enhanced="5.1.2")
            return Lookup(refusal=refusal, ttl=answer.ttl)
        return await _implicit(resolution, qname, domain, answer.ttl)
    assert isinstance(answer, dns.resolver.Answer)
    records = [rdata for rdata in answer if isinstance(rdata, MX)]
    if any(r.exchange == dns.name.root for r in records):
        if all(r.exchange == dns.name.root for r in records):
            # RFC 7505: "MX 0 ." alone says the domain accepts no mail. Any preference, and
            # several such records, are read the same way: "." has no address, so nothing
            # else could be meant (and "no MX host has an address" would retry for days).
            refusal = Refusal(
                text=f"domain {domain} accepts no mail (null MX)", code=556, enhanced="5.1.10"
            )
            return Lookup(
                refusal=refusal, ttl=min(NEGATIVE_TTL, answer.chaining_result.minimum_ttl)
            )
        # A null MX mixed with real ones is a misconfiguration; use the real ones.
        records = [r for r in records if r.exchange != dns.name.root]
    # Exchanges written as address literals are no hosts either: set aside before the cut
    # to ``hosts_considered``, so that they take no place of a host (they are only named
    # when no host is left), in preference order.
    literals: dict[str, None] = {}
    for record in sorted(records, key=lambda r: r.preference):
        if literal_exchange(record.exchange):
            literals[record.exchange.canonicalize().to_text(omit_final_dot=True)] = None
    if literals:
        records = [r for r in records if not literal_exchange(r.exchange)]
    candidates = _candidates(records, policy.hosts_considered, rng or random.Random())
    return await _mx_route(
        resolution,
        domain,
        candidates,
        answer.chaining_result.minimum_ttl,
        mx_secure=authenticated(answer),
        canonical=expanded_name([answer]),
        literals=list(literals),
        left_out=len({r.exchange.canonicalize() for r in records}) - len(candidates),
    )


def _candidates(
    records: list[MX], limit: int, rng: random.Random
) -> list[tuple[dns.name.Name, int]]:
    """The first ``limit`` MX hosts (name, preference) in the order to try them: by
    preference, equal preferences shuffled (RFC 5321 §5.1) *before* the cut, so that every
    host of a preference cut in two has the same chance of being kept."""
    best: dict[dns.name.Name, int] = {}
    for record in records:
        exchange = record.exchange.canonicalize()
        best[exchange] = min(record.preference, best.get(exchange, record.preference))
    ordered = sorted(best.items(), key=lambda item: (item[1], item[0].to_text()))
    shuffled: list[tuple[dns.name.Name, int]] = []
    for _, same in groupby(ordered, key=lambda item: item[1]):
        group = list(same)
        rng.shuffle(group)
        shuffled.extend(group)
        if len(shuffled) >= limit:
            break
    return shuffled[:limit]


async def _mx_route(
    resolution: _Resolution,
    domain: str,
    candidates: list[tuple[dns.name.Name, int]],
    mx_ttl: float,
    *,
    mx_secure: bool = False,
    canonical: str | None = None,
    literals: list[str] | None = None,
    left_out: int = 0,
) -> Lookup:
    """The route through ``candidates``; ``literals`` are the MX hosts skipped as address
    literals (:func:`literal_exchange`), named when no host is left, and so is the number
    of hosts ``left_out`` by the cut to ``hosts_considered``."""
    policy = resolution.policy
    literals = literals or []
    hosts: list[MXHost] = []
    ttls = [mx_ttl]
    refused: list[tuple[str | None, str, str]] = []
    addressless: list[str] = []  # hosts with no address records at all
    skipped = False  # some of them have addresses of the IP version not kept
    temporary: TemporaryFailure | None = None
    found: set[str] = set()  # distinct: an address two hosts share fills one place
    next_host = 0
    # Each host that has a usable address fills at least one place, so a batch never needs
    # more hosts than places are left; later batches look further only when hosts had
    # none (no records, refused, a failed lookup, or only addresses another host has).
    while next_host < len(candidates) and len(found) < policy.mx_address_limit:
        if resolution.spent:
            temporary = resolution.timed_out(f"the MX hosts of {domain}")
            break
        size = min(policy.mx_address_limit - len(found), policy.max_dns_queries // 2)
        batch = candidates[next_host : next_host + size]
        next_host += len(batch)
        results = await asyncio.gather(*(resolution.exchange_addresses(name) for name, _ in batch))
        for (name, preference), result in zip(batch, results, strict=True):
            host_name = name.to_text(omit_final_dot=True)
            temporary = temporary or result.temporary
            if result.ttl is not None:
                ttls.append(result.ttl)
            refused.extend((host_name, address, kind) for address, kind in result.refused)
            if not result.addresses:
                if result.skipped:
                    # Its addresses are of the other IP version: as a host without any,
                    # not one refused (another source_address reaches it).
                    addressless.append(host_name)
                    skipped = True
                elif not result.refused and result.temporary is None:
                    addressless.append(host_name)
                    # A negative answer: remembered only briefly, and so is a route
                    # without this host, which may have its addresses in a minute.
                    ttls.append(
                        NEGATIVE_TTL if result.negative_ttl is None else result.negative_ttl
                    )
                continue  # a host without usable addresses cannot be tried; others can
            hosts.append(
                MXHost(
                    name=host_name,
                    preference=preference,
                    addresses=result.addresses,
                    secure=result.secure,
                    canonical=result.canonical,
                )
            )
            found.update(result.addresses)
    if not hosts:
        if temporary is not None:
            raise temporary
        # The hosts past the cut were never looked up: a failure that said only "no MX
        # host has an address" was false of a domain whose 11th host has one.
        cut = _cut(left_out, policy) if left_out else ""
        if (literals or refused) and not addressless:
            # No host to wait for: every MX host is refused or no host name at all.
            refusal = (
                _no_host_names(domain, literals, refused) if literals else _refused(domain, refused)
            )
            if not left_out:
                return Lookup(refusal=refusal, ttl=min([NEGATIVE_TTL, *ttls]))
            # But for the hosts past the cut, never looked up: one may have a usable
            # address, so nothing is proven. A bounce lost mail that a larger cut (or
            # another draw of equal preferences) would deliver.
            text = (
                refusal.text
                if literals
                else f"no MX host of {domain} looked up has a usable address: "
                f"every address found is refused: {_refused_why(refused)}"
            )
            raise TemporaryFailure(text + cut, enhanced=_NO_ROUTE)
        # MX hosts without addresses are a temporary failure: it is usually a DNS change
        # in progress, and the retry policy's max_age bounds the wait. (Postfix bounces
        # here by default; this is its smtp_defer_if_no_mx_address_found = yes.) So is a
        # domain whose other hosts' addresses are refused: the next look may find one.
        if skipped:
            error = _other_version(f"no MX host of {domain} has an", policy)
            raise TemporaryFailure(error.text + cut, enhanced=_NO_ROUTE)
        none_for = ", ".join(addressless[:_NAMED_REFUSALS])
        if len(addressless) > _NAMED_REFUSALS:
            none_for += f" and {len(addressless) - _NAMED_REFUSALS} more"
        if refused:
            raise TemporaryFailure(
                f"no MX host of {domain} has a usable address: none found for {none_for}, "
                f"and the others' are refused: {_named(refused)}{cut}",
                enhanced=_NO_ROUTE,
            )
        raise TemporaryFailure(
            f"no MX host of {domain} has an address: none found for {none_for}{cut}",
            enhanced=_NO_ROUTE,
        )
    route = Route(
        domain=domain, hosts=tuple(hosts), implicit=False, secure=mx_secure, canonical=canonical
    )
    # An incomplete route (a query failed) is used, and remembered briefly (Lookup).
    return Lookup(route=route, ttl=min(ttls) if temporary is None else min([NEGATIVE_TTL, *ttls]))


def _cut(left_out: int, policy: RoutePolicy) -> str:
    """The words saying that ``left_out`` MX hosts, past the first ``hosts_considered``
    by preference, were not looked up, and the setting that moves the cut."""
    hosts = "host was" if left_out == 1 else "hosts were"
    # Named as Config names it: mx_host_limit alone moves the cut, where a larger
    # mx_address_limit also lets each attempt try more addresses.
    setting = "mx_host_limit"
    if policy.mx_host_limit is None:
        setting += f", by default twice mx_address_limit, which is {policy.mx_address_limit}"
    return (
        f"; {left_out} more MX {hosts} not looked up: at most {policy.hosts_considered} "
        f"are considered, the first by preference, drawn among equal ones ({setting})"
    )


async def _implicit(
    resolution: _Resolution, qname: dns.name.Name, domain: str, no_mx_ttl: float
) -> Lookup:
    """No MX records (an answer to be believed for ``no_mx_ttl`` seconds): the domain
    itself is the mail host (RFC 5321 §5.1)."""
    result = await resolution.addresses(qname)
    if not result.addresses:
        if result.temporary is not None:
            raise result.temporary
        if result.skipped:
            raise _other_version(f"domain {domain} has no MX and no", resolution.policy)
        if result.refused:
            refused: list[tuple[str | None, str, str]] = [
                (None, address, kind) for address, kind in result.refused
            ]
            ttl = no_mx_ttl if result.ttl is None else min(result.ttl, no_mx_ttl)
            return Lookup(refusal=_refused(domain, refused), ttl=ttl)
        refusal = Refusal(
            text=f"domain {domain} has no MX and no address records", enhanced="5.4.4"
        )
        ttl = no_mx_ttl if result.negative_ttl is None else min(result.negative_ttl, no_mx_ttl)
        return Lookup(refusal=refusal, ttl=ttl)
    host = MXHost(
        name=domain,
        preference=0,
        addresses=result.addresses,
        secure=result.secure,
        canonical=result.canonical,
    )
    route = Route(domain=domain, hosts=(host,), implicit=True, secure=result.secure)
    # The absence of MX records is a negative answer: remember it only briefly, as long
    # as a route one of whose address queries failed (Lookup) may be at most.
    ttl = no_mx_ttl if result.ttl is None else min(result.ttl, no_mx_ttl)
    return Lookup(route=route, ttl=ttl)

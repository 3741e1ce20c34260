"""Turning DNS answers into a :class:`Route` (RFC 5321 §5.1, RFC 7505), without caching.

One function, :func:`lookup_route`, asks a dnspython async resolver for a domain's MX
records and each host's addresses and decides what they mean. It returns a
:class:`Lookup`: a route or a permanent failure, each with how long it may be cached.
Temporary failures (SERVFAIL, timeouts, no reachable nameserver) are raised as
:class:`~mailstrom.errors.TemporaryFailure` and must not be cached.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from enum import Enum

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from mailstrom.errors import PermanentFailure, TemporaryFailure
from mailstrom.routing.route import MXHost, Route

NEGATIVE_TTL = 60.0
"""Seconds a nonexistent domain, a null MX or a domain without MX records is remembered.
Short, so a domain whose owner fixes its DNS gets mail again soon; long enough that a
burst of mail to one bad domain costs one lookup."""

_TEMPORARY_DNS = "4.4.3"  # RFC 3463: directory server failure
_NO_ROUTE = "4.4.4"  # RFC 3463: unable to route


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """A permanent routing failure, kept as data so each caller raises a fresh error."""

    text: str
    enhanced: str
    code: int | None = None

    def error(self) -> PermanentFailure:
        return PermanentFailure(self.text, code=self.code, enhanced=self.enhanced)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookup:
    """What one lookup found: a route or a refusal, cacheable for ``ttl`` seconds
    (None: do not cache, because part of the answer was a temporary failure)."""

    route: Route | None = None
    refusal: Refusal | None = None
    ttl: float | None = None

    def unwrap(self) -> Route:
        """The route, or raise the refusal."""
        if self.refusal is not None:
            raise self.refusal.error()
        assert self.route is not None
        return self.route


class _Missing(Enum):
    """Why a query gave no records."""

    NXDOMAIN = "nxdomain"
    NO_ANSWER = "no answer"


def to_qname(domain: str) -> dns.name.Name:
    """The absolute DNS name for ``domain``; Unicode (IDN) labels become A-labels.

    Raises PermanentFailure (5.1.2) for text that is no valid domain name.
    """
    text = domain.strip().rstrip(".")
    try:
        if not text:
            raise ValueError("empty domain")
        return dns.name.from_text(text).canonicalize()
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise PermanentFailure(
            f"invalid recipient domain {domain!r}: {exc}", enhanced="5.1.2"
        ) from exc


def literal_route(domain: str) -> Route | None:
    """A route for an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``, RFC 5321
    §4.1.3), which names its host directly; None for an ordinary domain."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        ip = ipaddress.ip_address(inner)
    except ValueError as exc:
        raise PermanentFailure(f"invalid address literal {domain!r}", enhanced="5.1.2") from exc
    host = MXHost(name=domain, preference=0, addresses=(str(ip),))
    return Route(domain=domain, hosts=(host,), implicit=True)


async def _query(
    resolver: dns.asyncresolver.Resolver, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> dns.resolver.Answer | _Missing:
    """Answer for (name, type), or why there is none; temporary trouble is raised."""
    try:
        return await resolver.resolve(name, rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        return _Missing.NXDOMAIN
    except dns.resolver.NoAnswer:
        return _Missing.NO_ANSWER
    except dns.exception.Timeout as exc:
        raise TemporaryFailure(
            f"DNS lookup of {name} {rdtype.name} timed out", enhanced=_TEMPORARY_DNS
        ) from exc
    except (dns.exception.DNSException, OSError) as exc:
        # NoNameservers (SERVFAIL/REFUSED everywhere), no configuration, network errors.
        raise TemporaryFailure(
            f"DNS lookup of {name} {rdtype.name} failed: {exc}", enhanced=_TEMPORARY_DNS
        ) from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class _Addresses:
    addresses: tuple[str, ...]
    ttl: float | None
    """Minimum TTL of the answers; None when there was no answer to bound it."""
    temporary: TemporaryFailure | None = None
    """Set when a family could not be looked up: the result is incomplete."""


async def _addresses(resolver: dns.asyncresolver.Resolver, name: dns.name.Name) -> _Addresses:
    """IPv4 then IPv6 addresses of ``name``, looked up concurrently.

    IPv4 comes first because many networks that have IPv6 addresses cannot route IPv6
    mail well (missing reverse DNS, stricter receiver policies, broken paths); IPv6
    addresses are still tried when every IPv4 address fails.
    """
    results = await asyncio.gather(
        _query(resolver, name, dns.rdatatype.A),
        _query(resolver, name, dns.rdatatype.AAAA),
        return_exceptions=True,
    )
    addresses: list[str] = []
    ttls: list[float] = []
    temporary: TemporaryFailure | None = None
    for result in results:
        if isinstance(result, TemporaryFailure):
            temporary = result
        elif isinstance(result, BaseException):
            raise result
        elif isinstance(result, dns.resolver.Answer):
            ttls.append(result.chaining_result.minimum_ttl)
            for rdata in result:
                if rdata.address not in addresses:
                    addresses.append(rdata.address)
    return _Addresses(
        addresses=tuple(addresses), ttl=min(ttls) if ttls else None, temporary=temporary
    )


async def lookup_route(resolver: dns.asyncresolver.Resolver, qname: dns.name.Name) -> Lookup:
    """Look up where mail for ``qname`` goes. Hosts come sorted by (preference, name);
    shuffling equal preferences is left to the caller, so a cached route is not stuck in
    one order."""
    domain = qname.to_text(omit_final_dot=True)
    answer = await _query(resolver, qname, dns.rdatatype.MX)
    if answer is _Missing.NXDOMAIN:
        refusal = Refusal(text=f"domain {domain} does not exist (NXDOMAIN)", enhanced="5.1.2")
        return Lookup(refusal=refusal, ttl=NEGATIVE_TTL)
    if answer is _Missing.NO_ANSWER:
        return await _implicit(resolver, qname, domain)
    assert isinstance(answer, dns.resolver.Answer)
    records = [rdata for rdata in answer if isinstance(rdata, MX)]
    if any(r.exchange == dns.name.root for r in records):
        if len(records) == 1:
            # RFC 7505: "MX 0 ." alone says the domain accepts no mail. Any preference is
            # read the same way: "." has no address, so nothing else could be meant.
            refusal = Refusal(
                text=f"domain {domain} accepts no mail (null MX)", code=556, enhanced="5.1.10"
            )
            return Lookup(
                refusal=refusal, ttl=min(NEGATIVE_TTL, answer.chaining_result.minimum_ttl)
            )
        # A null MX mixed with real ones is a misconfiguration; use the real ones.
        records = [r for r in records if r.exchange != dns.name.root]
    return await _mx_route(resolver, domain, records, answer.chaining_result.minimum_ttl)


async def _mx_route(
    resolver: dns.asyncresolver.Resolver, domain: str, records: list[MX], mx_ttl: float
) -> Lookup:
    best: dict[dns.name.Name, int] = {}
    for record in records:
        exchange = record.exchange.canonicalize()
        best[exchange] = min(record.preference, best.get(exchange, record.preference))
    ordered = sorted(best.items(), key=lambda item: (item[1], item[0].to_text()))
    found = await asyncio.gather(*(_addresses(resolver, name) for name, _ in ordered))
    hosts: list[MXHost] = []
    ttls = [mx_ttl]
    temporary: TemporaryFailure | None = None
    for (name, preference), result in zip(ordered, found, strict=True):
        temporary = temporary or result.temporary
        if not result.addresses:
            continue  # a host without addresses cannot be tried; the others can
        if result.ttl is not None:
            ttls.append(result.ttl)
        hosts.append(
            MXHost(
                name=name.to_text(omit_final_dot=True),
                preference=preference,
                addresses=result.addresses,
            )
        )
    if not hosts:
        if temporary is not None:
            raise temporary
        # Like Postfix, MX hosts without addresses are a temporary failure: it is usually
        # a DNS change in progress, and the retry policy's max_age bounds the wait.
        raise TemporaryFailure(f"no MX host of {domain} has an address", enhanced=_NO_ROUTE)
    route = Route(domain=domain, hosts=tuple(hosts), implicit=False)
    # An incomplete route (a host's lookup failed) is used now but not remembered.
    return Lookup(route=route, ttl=None if temporary else min(ttls))


async def _implicit(
    resolver: dns.asyncresolver.Resolver, qname: dns.name.Name, domain: str
) -> Lookup:
    """No MX records: the domain itself is the mail host (RFC 5321 §5.1)."""
    result = await _addresses(resolver, qname)
    if not result.addresses:
        if result.temporary is not None:
            raise result.temporary
        refusal = Refusal(
            text=f"domain {domain} has no MX and no address records", enhanced="5.4.4"
        )
        return Lookup(refusal=refusal, ttl=NEGATIVE_TTL)
    host = MXHost(name=domain, preference=0, addresses=result.addresses)
    route = Route(domain=domain, hosts=(host,), implicit=True)
    if result.temporary is not None:
        return Lookup(route=route, ttl=None)
    # The absence of MX records is a negative answer: remember it only briefly.
    ttl = min(result.ttl, NEGATIVE_TTL) if result.ttl is not None else NEGATIVE_TTL
    return Lookup(route=route, ttl=ttl)

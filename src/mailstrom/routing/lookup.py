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
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from mailstrom.dnsanswer import TRUNCATED as TRUNCATED  # re-exported
from mailstrom.dnsanswer import is_truncated, whole
from mailstrom.dnsclock import Deadline, resolve_steadily
from mailstrom.domains import literal_address
from mailstrom.errors import (
    LocalResourceShortage,
    PermanentFailure,
    TemporaryFailure,
    local_shortage,
)
from mailstrom.routing.policy import RoutePolicy
from mailstrom.routing.route import MXHost, Route

NEGATIVE_TTL = 60.0
"""Seconds a nonexistent domain, a null MX or a domain without MX records is remembered
at most; less when the zone says so (:func:`negative_ttl`). Short, so a domain whose
owner fixes its DNS gets mail again soon; long enough that a burst of mail to one bad
domain costs one lookup. An incomplete route (a query of it failed, :class:`Lookup`) is
remembered no longer either."""

MAX_TTL = 86_400.0
"""Seconds any route found through DNS is remembered at most, whatever TTL its answers
carry. A hostile or hijacked zone can publish a TTL of 2**31-1 s (68 years, RFC 2181
§8); believed as it is, a route to the hijacker's hosts would outlive the hijack until
the worker restarts. One day is what recursive resolvers cap their caches to (Unbound's
``cache-max-ttl``), and one MX lookup a day per domain costs nothing."""

FOREVER = float("inf")
"""The TTL of what no DNS answer can change (address literals)."""

LOCALHOST = dns.name.from_text("localhost.")
LOOPBACK = ("127.0.0.1", "::1")
"""What a name under :data:`LOCALHOST` resolves to (RFC 6761 §6.3), without a query."""


def localhost_addresses(name: dns.name.Name | str) -> tuple[str, ...] | None:
    """:data:`LOOPBACK` when ``name`` is ``localhost`` or a name under it, which are this
    host's own, asked of no server (RFC 6761 §6.3): resolvers disagree on them (NXDOMAIN,
    127.0.0.1, or what a forwarder makes of them), and "MX 0 localhost." says "no mail
    here". None for any other name. The router and the doctor both ask this.

    >>> localhost_addresses("Mail.LocalHost."), localhost_addresses("localhost.example")
    (('127.0.0.1', '::1'), None)
    """
    if isinstance(name, str):
        try:
            name = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return None
    return LOOPBACK if name.is_subdomain(LOCALHOST) else None


_TEMPORARY_DNS = "4.4.3"  # RFC 3463: directory server failure
_NO_ROUTE = "4.4.4"  # RFC 3463: unable to route
_REFUSED_TARGET = "5.4.4"  # RFC 3463: unable to route (see _refused below)
_NAMED_REFUSALS = 3  # refused addresses named in a failure's text


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """A permanent routing failure, kept as data so each caller raises a fresh error."""

    text: str
    enhanced: str
    code: int | None = None
    host: str | None = None

    def error(self) -> PermanentFailure:
        return PermanentFailure(self.text, code=self.code, enhanced=self.enhanced, host=self.host)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookup:
    """What one lookup found: a route or a refusal, cacheable for ``ttl`` seconds (0:
    not at all).

    A route is incomplete when a query of it failed for now (a host's AAAA query timed
    out while its A query answered, a host's SERVFAIL, the lookup's time spent before the
    last hosts): it holds what was found and is cached for :data:`NEGATIVE_TTL` at most,
    after which every query is asked again. Not cached at all, every message to the
    domain waited out the failed query again (``dns.timeout``, 10 s by default); cached
    longer, a host reachable only over the family that failed (an IPv6-only MX host)
    would be left out of the route for that long.

    The route's hosts come in preference order and may hold more addresses than the
    policy's ``mx_address_limit``: shuffling equal preferences and cutting to the limit is
    left to the :class:`~mailstrom.routing.Router`, on every use of the route.
    """

    route: Route | None = None
    refusal: Refusal | None = None
    ttl: float = 0.0

    def unwrap(self) -> Route:
        """The route, or raise the refusal."""
        if self.refusal is not None:
            raise self.refusal.error()
        assert self.route is not None
        return self.route


@dataclass(frozen=True, slots=True, kw_only=True)
class _Missing:
    """A query that gave no records: the name does not exist (NXDOMAIN) or has none of
    the type (NODATA)."""

    nxdomain: bool
    ttl: float
    """How long that may be believed (:func:`negative_ttl`)."""


def negative_ttl(response: object) -> float:
    """How long the negative answer ``response`` (NXDOMAIN or NODATA) may be believed:
    its negative TTL (RFC 2308 §5: the smaller of its SOA record's TTL and MINIMUM, and
    of any CNAME on the way), at most :data:`NEGATIVE_TTL`, which is also what an answer
    without an SOA record gets. Remembered for NEGATIVE_TTL whatever the zone said, a
    domain created just after it was asked about had its mail bounced for that long."""
    if isinstance(response, dns.message.QueryMessage):
        try:
            return min(NEGATIVE_TTL, float(response.resolve_chaining().minimum_ttl))
        except dns.exception.DNSException:
            pass
    return NEGATIVE_TTL


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


def authenticated(answer: dns.resolver.Answer) -> bool:
    """Whether the resolver set the AD bit on ``answer`` (RFC 4035 §3.2.3: it validated
    it). Believe it only from a resolver trusted to validate (``DNSConfig.dnssec``)."""
    return bool(answer.response.flags & dns.flags.AD)


REFERRAL = "the DNS server answered with a referral (it does not resolve recursively)"
"""What a lookup :func:`unanswered` tells of a referral failed with."""


def unanswered(no_answer: dns.resolver.NoAnswer) -> str | None:
    """Why the response dnspython raised ``no_answer`` for (NOERROR without the records
    asked for) says nothing of whether the records exist: :data:`REFERRAL`
    (:func:`is_referral_response`), :data:`TRUNCATED`, or None when it is NODATA, which may be
    believed. Every lookup that reads NoAnswer as "no such records" asks this first
    (routes, DANE's TLSA, MTA-STS's record and policy host, the command line's checks),
    and fails as for SERVFAIL when it has a reason."""
    return unanswered_response(no_answer.kwargs.get("response"))  # absent when by hand


def unanswered_response(response: object) -> str | None:
    """:func:`unanswered` of a response read without dnspython's NoAnswer.

    A truncated answer (the TC bit) asked again over TCP is read whole there; one that
    is truncated over TCP too (longer than the 64 KiB a TCP message holds, or a broken
    server or middlebox) holds some of the records at most, and none as this server
    truncates (RFC 2181 §9: ignore it). dnspython hands it on as it came, and read as
    NODATA it made a domain one without MX records (mail went to its A record, the
    implicit MX) or without addresses (every recipient failed with 5.4.4). One with
    some of the records is raised as NoAnswer too (:func:`~mailstrom.dnsanswer.whole`)."""
    if is_truncated(response):
        return TRUNCATED
    return REFERRAL if is_referral_response(response) else None


def is_referral_response(response: object) -> bool:
    """Whether ``response`` (NOERROR without the records asked for) is a referral: NS
    records and no SOA in its authority section, not authoritative (RFC 2308 §2.2). A
    server that does not resolve recursively answers so (Windows DNS with recursion off,
    an authoritative server asked about another zone): "ask these servers", which says
    nothing of whether the records exist. NODATA carries an SOA, or no NS records.

    dnspython raises NoAnswer for both; taken for NODATA, a referral made every domain
    one without MX records, then one without addresses: a permanent failure (5.4.4).
    Lookups ask :func:`unanswered`, which asks this."""
    if not isinstance(response, dns.message.Message) or response.flags & dns.flags.AA:
        return False
    types = {rrset.rdtype for rrset in response.authority}
    return dns.rdatatype.NS in types and dns.rdatatype.SOA not in types


def is_literal(domain: str) -> bool:
    """Whether ``domain`` is an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``)."""
    return domain.startswith("[") and domain.endswith("]")


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


def _refused(domain: str, refused: list[tuple[str | None, str, str]]) -> Refusal:
    """Every address found for ``domain`` is refused by the policy: (MX host or None,
    address, kind).

    A permanent failure, as the mature MTAs make it: Exim's dnslookup router *declines*
    when ``ignore_target_hosts`` discards every address ("Unrouteable address", bounced),
    and Postfix bounces mail whose best MX is itself with 5.4.6 "loops back to myself".
    We use 5.4.4 "unable to route" (RFC 3463) rather than 5.4.6 "routing loop detected":
    nothing shows that the target is this very mail system, only that it is no mail
    server elsewhere. Retrying could only help a domain that repoints its MX, and the
    refusal is cached no longer than :data:`NEGATIVE_TTL`.
    """
    return Refusal(
        text=(
            f"refusing to deliver to {domain}: every address it routes to is refused: "
            f"{_named(refused)} (allow_loopback is off)"
        ),
        enhanced=_REFUSED_TARGET,
        host=refused[0][0] or domain,
    )


def _no_host_names(
    domain: str, literals: list[str], refused: list[tuple[str | None, str, str]]
) -> Refusal:
    """``domain``'s MX hosts are address literals (:func:`literal_exchange`), but for
    those whose addresses are all refused: a permanent failure, as Postfix makes it (5.4.4),
    remembered no longer than :data:`NEGATIVE_TTL` like the refusal of :func:`_refused`."""
    named = ", ".join(literals[:_NAMED_REFUSALS])
    more = f" and {len(literals) - _NAMED_REFUSALS} more" if len(literals) > _NAMED_REFUSALS else ""
    others = f"; the other MX hosts' addresses are refused: {_named(refused)}" if refused else ""
    what = (
        "is an address literal, not a host name"
        if len(literals) == 1
        else "are address literals, not host names"
    )
    return Refusal(
        text=f"no MX host of {domain} can be used: {named}{more} {what} (RFC 5321 §5.1){others}",
        enhanced=_REFUSED_TARGET,
        host=literals[0],
    )


def _named(refused: list[tuple[str | None, str, str]]) -> str:
    """The first refused addresses, each with why and its MX host, and how many more."""
    named = ", ".join(
        f"{address} ({kind}{f', MX {host}' if host else ''})"
        for host, address, kind in refused[:_NAMED_REFUSALS]
    )
    more = f" and {len(refused) - _NAMED_REFUSALS} more" if len(refused) > _NAMED_REFUSALS else ""
    return named + more


@dataclass(frozen=True, slots=True, kw_only=True)
class _Addresses:
    addresses: tuple[str, ...]
    """Usable addresses, IPv4 first, without the refused ones."""
    refused: tuple[tuple[str, str], ...] = ()
    """(address, kind) the policy refused."""
    ttl: float | None = None
    """Minimum TTL of the answers; None when there was no answer to bound it."""
    temporary: TemporaryFailure | None = None
    """Set when a family could not be looked up: the result is incomplete."""
    secure: bool = False
    """Every answer found carried the AD bit (DNSSEC-validated by the resolver)."""
    canonical: str | None = None
    """The CNAME-expanded name the answers came from, when the name is an alias."""
    skipped: int = 0
    """Addresses of the IP version the policy does not keep (``RoutePolicy.ip_version``)."""
    negative_ttl: float | None = None
    """The smallest :attr:`_Missing.ttl` of the families that had no records, if any."""


def expanded_name(answers: list[dns.resolver.Answer]) -> str | None:
    """The name ``answers`` (A and AAAA of one name, or its MX records) reached through
    CNAMEs, or None when the name is no alias or the two families disagree (then only the
    name as given is safe to build on). dnspython follows the chain inside the answer the
    server sent, so the expansion costs no query and is bounded by that answer's size."""
    reached = {answer.canonical_name.canonicalize() for answer in answers}
    if len(reached) != 1:
        return None
    (name,) = reached
    if name == answers[0].qname.canonicalize():
        return None
    return name.to_text(omit_final_dot=True)


def numeric_exchange(name: dns.name.Name) -> str | None:
    """The address an MX record's exchange spells, when it is an IP address rather than a
    host name (``MX 10 192.0.2.25``); None for a name.

    RFC 5321 §5.1 wants a name there, but such zones exist, and Postfix uses the address
    (with the warning "numeric domain name in resource data of MX record"). Looked up as a
    name, it has no address records, and its domain's mail would wait until max_age.
    """
    text = name.to_text(omit_final_dot=True)
    if "%" in text:  # a zone index means nothing to another host
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def literal_exchange(name: dns.name.Name) -> bool:
    """Whether an MX record's exchange is written as an address literal
    (``MX 10 [192.0.2.25].``, ``[IPv6:2001:db8::25].``): no host name (RFC 5321 §5.1),
    and no name a DNS lookup can find.

    Postfix skips such a record ("malformed domain name in resource data of MX record")
    and bounces mail of a domain left without any (5.4.4); unlike a numeric exchange
    (:func:`numeric_exchange`), which it uses. Looked up as a name, its A and AAAA
    queries went out for nothing and its domain's mail was deferred until max_age as
    that of a host without an address ("a DNS change in progress"), saying nothing of
    the record."""
    return is_literal(name.to_text(omit_final_dot=True))


class _Resolution:
    """The queries of one route lookup: one deadline for all of them, one policy."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        policy: RoutePolicy,
        clock: Callable[[], float],
    ) -> None:
        self.resolver = resolver
        self.policy = policy
        self.clock = clock
        # dnspython's lifetime bounds one resolve() call (all its retries and servers);
        # a route needs several, so the same budget is shared by all of them here.
        self.budget = float(resolver.lifetime)
        self.deadline = clock() + self.budget

    def timed_out(self, what: str) -> TemporaryFailure:
        return TemporaryFailure(
            f"DNS lookup of {what} timed out (the route's {self.budget:g} s were spent)",
            enhanced=_TEMPORARY_DNS,
        )

    @property
    def spent(self) -> bool:
        return self.clock() >= self.deadline

    async def query(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.resolver.Answer | _Missing:
        """Answer for (name, type), or why there is none; temporary trouble is raised."""
        remaining = self.deadline - self.clock()
        if remaining <= 0:
            raise self.timed_out(f"{name} {rdtype.name}")
        try:
            # dnspython looks at lifetime only between its rounds of queries, after a
            # pause of up to 2 s: the route's budget would be overrun by that much.
            async with asyncio.timeout(remaining):
                return await self._resolve(name, rdtype, remaining)
        except TimeoutError as exc:
            raise self.timed_out(f"{name} {rdtype.name}") from exc
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            return _Missing(nxdomain=True, ttl=negative_ttl(next(iter(responses.values()), None)))
        except dns.resolver.NoAnswer as exc:
            why = unanswered(exc)
            if why is not None:
                raise TemporaryFailure(
                    f"DNS lookup of {name} {rdtype.name} failed: {why}",
                    enhanced=_TEMPORARY_DNS,
                ) from exc
            return _Missing(nxdomain=False, ttl=negative_ttl(exc.kwargs.get("response")))
        except dns.exception.Timeout as exc:
            raise self.timed_out(f"{name} {rdtype.name}") from exc
        except (dns.exception.DNSException, OSError) as exc:
            shortage = local_shortage(exc)
            if shortage is not None:
                # No query could be sent (no socket): no DNS server failed to answer.
                raise LocalResourceShortage(
                    f"DNS lookup of {name} {rdtype.name}", shortage
                ) from exc
            # NoNameservers (SERVFAIL/REFUSED everywhere), no configuration, network errors.
            raise TemporaryFailure(
                f"DNS lookup of {name} {rdtype.name} failed: {exc}", enhanced=_TEMPORARY_DNS
            ) from exc

    async def _resolve(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, lifetime: float
    ) -> dns.resolver.Answer:
        """dnspython's answer in ``lifetime`` seconds, kept on the route's clock: asked
        again in what is left of the route's deadline when a wall clock step made
        dnspython give up early (:mod:`mailstrom.dnsclock`): its ``LifetimeTimeout``
        deferred the recipients of DNS that answered."""
        answer = await resolve_steadily(
            lambda left: self.resolver.resolve(name, rdtype, search=False, lifetime=left),
            lifetime,
            Deadline(self.deadline, clock=self.clock),
        )
        return whole(answer)  # any resolver's: Router takes one given

    async def exchange_addresses(self, name: dns.name.Name) -> _Addresses:
        """The addresses of MX host ``name``: the one it spells when it is an IP address
        (:func:`numeric_exchange`, no query, judged by the policy all the same), else
        :meth:`addresses`."""
        address = numeric_exchange(name)
        if address is None:
            return await self.addresses(name)
        return self.judged((address,))

    def judged(self, addresses: tuple[str, ...]) -> _Addresses:
        """``addresses``, known without a query, as the policy keeps, refuses or skips
        them (another IP version than ``ip_version``)."""
        kept: list[str] = []
        refused: list[tuple[str, str]] = []
        skipped = 0
        version = self.policy.ip_version
        for address in addresses:
            kind = self.policy.refused(address)
            if kind is not None:
                refused.append((address, kind))
            elif version is not None and ipaddress.ip_address(address).version != version:
                skipped += 1
            else:
                kept.append(address)
        return _Addresses(addresses=tuple(kept), refused=tuple(refused), skipped=skipped)

    async def addresses(self, name: dns.name.Name) -> _Addresses:
        """IPv4 then IPv6 addresses of ``name``, looked up concurrently.

        IPv4 comes first because many networks that have IPv6 addresses cannot route IPv6
        mail well (missing reverse DNS, stricter receiver policies, broken paths); IPv6
        addresses are still tried when every IPv4 address fails.

        A localhost name is the loopback address, asked of no server
        (:func:`localhost_addresses`).
        """
        local = localhost_addresses(name)
        if local is not None:
            return self.judged(local)
        results = await asyncio.gather(
            self.query(name, dns.rdatatype.A),
            self.query(name, dns.rdatatype.AAAA),
            return_exceptions=True,
        )
        addresses: list[str] = []
        refused: list[tuple[str, str]] = []
        ttls: list[float] = []
        temporary: TemporaryFailure | None = None
        answers = [r for r in results if isinstance(r, dns.resolver.Answer)]
        missing = [r.ttl for r in results if isinstance(r, _Missing)]
        secure = bool(answers)
        # A route never uses more than the limit of one family's addresses (it is cut to
        # the limit over all hosts), and a hostile zone can answer with thousands: keep
        # that many usable (and as many refused, for the reason) per family, no more.
        limit = self.policy.mx_address_limit
        version = self.policy.ip_version
        skipped = 0
        for result in results:
            if isinstance(result, TemporaryFailure):
                temporary = result
            elif isinstance(result, BaseException):
                raise result
            elif isinstance(result, dns.resolver.Answer):
                secure = secure and authenticated(result)
                ttls.append(result.chaining_result.minimum_ttl)
                if version is not None and version != (
                    4 if result.rdtype == dns.rdatatype.A else 6
                ):
                    skipped += len(result)  # unreachable from source_address: no place
                    continue
                kept: dict[str, None] = {}  # insertion-ordered, and no quadratic "in" test
                refused_here = 0
                for rdata in result:
                    address: str = rdata.address
                    kind = self.policy.refused(address)
                    if kind is None:
                        kept[address] = None
                        if len(kept) >= limit:
                            break
                    elif refused_here < limit:
                        refused.append((address, kind))
                        refused_here += 1
                addresses.extend(kept)
        return _Addresses(
            addresses=tuple(addresses),
            refused=tuple(refused),
            ttl=min(ttls) if ttls else None,
            temporary=temporary,
            secure=secure,
            canonical=expanded_name(answers),
            skipped=skipped,
            negative_ttl=min(missing) if missing else None,
        )


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
) -> Lookup:
    """The route through ``candidates``; ``literals`` are the MX hosts skipped as address
    literals (:func:`literal_exchange`), named when no host is left."""
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
        if literals and not addressless:
            # No host to wait for: every MX host is refused or no host name at all.
            return Lookup(
                refusal=_no_host_names(domain, literals, refused),
                ttl=min([NEGATIVE_TTL, *ttls]),
            )
        if refused and not addressless:
            return Lookup(refusal=_refused(domain, refused), ttl=min([NEGATIVE_TTL, *ttls]))
        # MX hosts without addresses are a temporary failure: it is usually a DNS change
        # in progress, and the retry policy's max_age bounds the wait. (Postfix bounces
        # here by default; this is its smtp_defer_if_no_mx_address_found = yes.) So is a
        # domain whose other hosts' addresses are refused: the next look may find one.
        if skipped:
            raise _other_version(f"no MX host of {domain} has an", policy)
        if refused:
            raise TemporaryFailure(
                f"no MX host of {domain} has a usable address: none found for "
                f"{', '.join(addressless[:_NAMED_REFUSALS])}"
                f"{' and more' if len(addressless) > _NAMED_REFUSALS else ''}, "
                f"and the others' are refused: {_named(refused)}",
                enhanced=_NO_ROUTE,
            )
        raise TemporaryFailure(f"no MX host of {domain} has an address", enhanced=_NO_ROUTE)
    route = Route(
        domain=domain, hosts=tuple(hosts), implicit=False, secure=mx_secure, canonical=canonical
    )
    # An incomplete route (a query failed) is used, and remembered briefly (Lookup).
    return Lookup(route=route, ttl=min(ttls) if temporary is None else min([NEGATIVE_TTL, *ttls]))


def _other_version(text: str, policy: RoutePolicy) -> TemporaryFailure:
    """The failure of a route whose addresses are all of the IP version that
    ``source_address`` cannot reach (``text``, the words before the version it can):
    temporary (4.4.4), as for hosts without addresses, since the setting, not the domain,
    is in the way."""
    return TemporaryFailure(
        f"{text} IPv{policy.ip_version} address (the IP version of source_address)",
        enhanced=_NO_ROUTE,
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

"""The DNS queries of one route lookup (:class:`_Resolution`): one deadline and one
policy for all of them, each answer or failure read as the lookup needs it (a record
set, a negative answer with how long to believe it, or a temporary failure raised), and
a host's addresses as the policy keeps them (:class:`_Addresses`).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from mailstrom.dnsanswer import whole
from mailstrom.dnsclock import Deadline, resolve_steadily
from mailstrom.errors import LocalResourceShortage, TemporaryFailure, local_shortage
from mailstrom.routing.answers import (
    authenticated,
    expanded_name,
    localhost_addresses,
    numeric_exchange,
    unanswered,
)
from mailstrom.routing.policy import RoutePolicy
from mailstrom.routing.result import NEGATIVE_TTL

_TEMPORARY_DNS = "4.4.3"  # RFC 3463: directory server failure


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

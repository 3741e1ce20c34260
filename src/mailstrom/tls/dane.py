"""The DANE policy source (RFC 7672 §2.2): TLSA records of an MX host, when DNSSEC says so.

DANE applies only when the resolver is trusted to validate (``DNSConfig.dnssec``) and the
MX host was reached through validated records: the MX RRset (or the domain's own address
records, for an implicit MX) and the host's address records. Then ``_25._tcp.<host>``
TLSA is looked up:

* a validated answer with usable records (DANE-TA or DANE-EE) → TLS is mandatory and the
  chain must match them (:class:`~mailstrom.tls.requirement.TLSMode` ``DANE``);
* a validated answer with only unusable records → TLS is mandatory, unauthenticated
  (RFC 7672 §2.2: ``REQUIRED``);
* NXDOMAIN or no records, or an answer without the AD bit → DANE does not apply (None);
* any other failure (SERVFAIL, timeout) → :class:`~mailstrom.errors.TemporaryFailure`:
  the host is not used now, never reached in plaintext (RFC 7672 §2.2).

Answers are cached for their TTL (at most :data:`MAX_TTL`), failures are not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from mailstrom.config import Config
from mailstrom.errors import ConfigError, TemporaryFailure
from mailstrom.tls.decide import Destination
from mailstrom.tls.requirement import PolicySource, TLSARecord, TLSMode, TLSRequirement

MAX_TTL = 3600.0
"""Longest time a TLSA answer is reused without asking again."""
NEGATIVE_TTL = 300.0
"""How long "no TLSA records" is remembered (a host that publishes them soon gets DANE)."""
MAX_RECORDS = 32
"""TLSA records of one host looked at; more is no sane configuration."""
MAX_CACHED = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSALookup:
    """What ``_25._tcp.<host>`` TLSA gave: the records, and whether DNSSEC validated it."""

    host: str
    records: tuple[TLSARecord, ...] = ()
    secure: bool = False
    """The resolver set the AD bit (only meaningful when it is trusted)."""
    exists: bool = False
    """There was an answer with records (validated or not)."""
    ttl: float = NEGATIVE_TTL
    """Seconds the answer may be reused (its TTL, at most :data:`MAX_TTL`)."""


def tlsa_name(host: str, port: int = 25) -> str:
    """The owner name of ``host``'s TLSA records for SMTP (RFC 7672 §2.2)."""
    return f"_{port}._tcp.{host.rstrip('.')}."


async def lookup_tlsa(resolver: dns.asyncresolver.Resolver, host: str) -> TLSALookup:
    """Look up ``host``'s TLSA records; raise TemporaryFailure for anything but an answer,
    NXDOMAIN or NODATA (RFC 7672 §2.2: such a host is unusable, never plaintext)."""
    name = tlsa_name(host)
    try:
        answer = await resolver.resolve(name, dns.rdatatype.TLSA, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return TLSALookup(host=host)
    except (dns.exception.DNSException, OSError) as exc:
        raise TemporaryFailure(
            f"DANE: TLSA lookup of {name} failed: {exc}; not delivering to {host} without it",
            enhanced="4.7.5",
            host=host,
        ) from exc
    secure = bool(answer.response.flags & dns.flags.AD)
    records = tuple(
        TLSARecord(
            usage=int(rdata.usage),
            selector=int(rdata.selector),
            matching=int(rdata.mtype),
            data=bytes(rdata.cert),
        )
        for rdata in list(answer)[:MAX_RECORDS]
    )
    ttl = min(float(answer.rrset.ttl), MAX_TTL) if answer.rrset is not None else NEGATIVE_TTL
    return TLSALookup(host=host, records=records, secure=secure, exists=bool(records), ttl=ttl)


def requirement_for(lookup: TLSALookup) -> TLSRequirement | None:
    """The DANE requirement a (validated) lookup makes, or None when DANE does not apply."""
    if not lookup.secure or not lookup.exists:
        return None
    usable = tuple(r for r in lookup.records if r.usable)
    if not usable:
        return TLSRequirement(
            mode=TLSMode.REQUIRED,
            source=PolicySource.DANE,
            reason=f"DANE: {lookup.host} has TLSA records but none usable for SMTP: TLS "
            "required, unauthenticated (RFC 7672 §2.2)",
        )
    return TLSRequirement(
        mode=TLSMode.DANE,
        source=PolicySource.DANE,
        reason=f"DANE: {len(usable)} usable TLSA record(s) at {tlsa_name(lookup.host)}",
        tlsa=usable,
    )


class DaneSource:
    """The DANE policy source for :class:`~mailstrom.tls.decide.TLSDecider`."""

    name = "dane"

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self._cache: dict[str, tuple[float, TLSALookup]] = {}

    @classmethod
    def for_config(cls, config: Config) -> DaneSource:
        """A source asking the resolver ``config.dns`` names, with DNSSEC answers asked
        for (the DO and AD bits)."""
        from mailstrom.routing import make_resolver
        from mailstrom.tls.danematch import available

        if not available():
            raise ConfigError(
                "dns.dnssec (DANE) needs the cryptography package: pip install 'mailstrom[dane]'"
            )
        return cls(make_resolver(config.dns))

    async def lookup(self, host: str) -> TLSALookup:
        """``host``'s TLSA records, cached (see the module docstring)."""
        cached = self._cache.get(host)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await lookup_tlsa(self._resolver, host)
        ttl = found.ttl
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[host] = (now + ttl, found)
        return found

    async def requirement(
        self, destination: Destination, default: TLSRequirement
    ) -> TLSRequirement | None:
        if not (destination.mx_secure and destination.host_secure):
            return None  # RFC 7672 §2.2.1/§2.2.2: insecure MX or address records
        return requirement_for(await self.lookup(destination.mx_host))

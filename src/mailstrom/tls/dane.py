"""The DANE policy source (RFC 7672 §2.2): TLSA records of an MX host, when DNSSEC says so.

DANE applies only when the resolver is trusted to validate (``DNSConfig.dnssec``) and the
MX host was reached through validated records: the MX RRset (or the domain's own address
records, for an implicit MX) and the host's address records. Then ``_25._tcp.<host>``
TLSA is looked up:

* a validated answer with usable records (DANE-TA or DANE-EE) → TLS is mandatory and the
  chain must match them (:class:`~mailstrom.tls.requirement.TLSMode` ``DANE``);
* a validated answer with only unusable records → TLS is mandatory, unauthenticated
  (RFC 7672 §2.2: ``REQUIRED``);
* malformed records (a SHA-256 or SHA-512 digest of the wrong length, which dnspython
  2.9.1 and later refuse with the whole answer; full data that is no DER certificate or
  key) are unusable too: the lookup asks again and reads the answer without those
  dnspython refuses (:mod:`mailstrom.tls.tlsa_lenient`), and sets the others aside
  (:attr:`~mailstrom.tls.requirement.TLSARecord.fits_matching_type`), counting them in
  :attr:`TLSALookup.malformed`; they are never matched, but they are published records,
  so an RRset of nothing else means ``REQUIRED`` as above, not "no TLSA records";
* NXDOMAIN or no records, or an answer without the AD bit → DANE does not apply (None);
  so too for a host whose TLSA name would exceed 255 octets (none can be published);
* any other failure (SERVFAIL, timeout) → :class:`~mailstrom.errors.TemporaryFailure`:
  the host is not used now, never reached in plaintext (RFC 7672 §2.2).

When the MX host name is an alias (a CNAME chain the address lookup followed), the TLSA
base domain depends on how far DNSSEC reaches (RFC 7672 §2.2.3, :func:`tlsa_base_domains`):

* the whole chain validated → the fully expanded name first, and the MX host name only
  when no validated TLSA records exist at the expanded name;
* the chain did not validate, but the alias itself (the host's own CNAME record, asked
  for separately) did → the MX host name only;
* not even the alias validated → DANE does not apply.

A DANE-TA(2) certificate may then name the TLSA base domain, the other of the two names
(when that one was validated too): :func:`reference_names`; or the next-hop domain whose
validated MX records named the host, or that domain's CNAME expansion when it is an alias
(the MX answer's chain validated with it: RFC 7672 §3.2.2). Those are checked last, since a
connection accepted through them alone serves that domain only.

Answers are cached for their TTL (at most :data:`MAX_TTL`), failures are not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from mailstrom.config import Config
from mailstrom.dnsanswer import TRUNCATED, is_truncated
from mailstrom.domains import IDNA
from mailstrom.errors import ConfigError, LocalResourceShortage, TemporaryFailure, local_shortage
from mailstrom.routing.lookup import unanswered, unanswered_response
from mailstrom.tls.decide import Destination
from mailstrom.tls.requirement import PolicySource, TLSARecord, TLSMode, TLSRequirement
from mailstrom.tls.tlsa_lenient import Malformed, ask_leniently

log = logging.getLogger("mailstrom.tls")

MAX_TTL = 3600.0
"""Longest time a TLSA answer is reused without asking again."""
NEGATIVE_TTL = 300.0
"""How long "no TLSA records" is remembered (a host that publishes them soon gets DANE)."""
MAX_RECORDS = 32
"""TLSA records of one host looked at; more is no sane configuration."""
MAX_CACHED = 10_000

V = TypeVar("V")


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
    malformed: int = 0
    """Records left out because their data does not fit their matching type: unusable
    (RFC 7672 §2.2), never matched, but counted in :attr:`exists`."""


def tlsa_name(host: str, port: int = 25) -> str:
    """The owner name of ``host``'s TLSA records for SMTP (RFC 7672 §2.2)."""
    return f"_{port}._tcp.{host.rstrip('.')}."


def _failure(name: str, host: str, why: object, *, what: str = "TLSA") -> TemporaryFailure:
    shortage = local_shortage(why) if isinstance(why, BaseException) else None
    if shortage is not None:
        # No query could be sent (no socket): this host's trouble, which TLS reports
        # must not count against the domain's DNSSEC (on_failure's dnssec-invalid).
        return LocalResourceShortage(f"DANE: {what} lookup of {name}", shortage, host=host)
    return TemporaryFailure(
        f"DANE: {what} lookup of {name} failed: {why}; not delivering to {host} without it",
        enhanced="4.7.5",
        host=host,
    )


async def _ask(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: dns.rdatatype.RdataType, host: str
) -> dns.resolver.Answer | None:
    """The answer for ``name``, None for NXDOMAIN or NODATA; any other failure raises
    TemporaryFailure (RFC 7672 §2.2: such a host is unusable, never plaintext)."""
    try:
        return await resolver.resolve(name, rdtype, search=False)
    except dns.resolver.NoAnswer as exc:
        if (why := unanswered(exc)) is not None:  # no NODATA: a referral, truncated
            raise _failure(name, host, why, what=dns.rdatatype.to_text(rdtype)) from exc
        return None
    except dns.resolver.NXDOMAIN:
        return None
    except (dns.exception.DNSException, OSError) as exc:
        raise _failure(name, host, exc, what=dns.rdatatype.to_text(rdtype)) from exc


def _ttl(answer: dns.resolver.Answer) -> float:
    """How long ``answer`` may be reused: the smallest TTL of its records and of the
    CNAMEs that led to them, at most :data:`MAX_TTL`.

    A provider's TLSA records are often reached through a CNAME at the host's TLSA name
    (RFC 7671 §7), and the provider rolls its keys over by moving that CNAME: believed for
    the TLSA records' own TTL, the old records outlive the alias that named them."""
    if answer.rrset is None:
        return NEGATIVE_TTL
    return min(float(answer.rrset.ttl), _aliases_ttl(answer))


def _aliases_ttl(answer: dns.resolver.Answer) -> float:
    """The smallest TTL of the CNAMEs ``answer`` followed, at most :data:`MAX_TTL`."""
    return min([MAX_TTL, *(float(cname.ttl) for cname in answer.chaining_result.cnames)])


def _validated(answer: dns.resolver.Answer) -> bool:
    return bool(answer.response.flags & dns.flags.AD)


def _retry_reserve(resolver: dns.asyncresolver.Resolver) -> float:
    """Seconds of the lookup's lifetime kept for asking again (:func:`lookup_tlsa`): one
    query's worth (the resolver's per-server timeout), at most half of the lifetime."""
    return min(float(resolver.timeout), float(resolver.lifetime) / 2)


def _may_have_refused(exc: Exception) -> bool:
    """Whether ``exc`` may be dnspython refusing an answer it cannot parse: over UDP it
    drops the datagram and waits (a timeout); over TCP it gives up on the server, a
    FormError among the errors of NoNameservers."""
    if isinstance(exc, (dns.exception.Timeout, TimeoutError)):
        return True
    if isinstance(exc, dns.resolver.NoNameservers):
        errors = exc.kwargs.get("errors") or ()
        return any(isinstance(error[3], dns.exception.FormError) for error in errors)
    return False


def _found(host: str, answer: dns.resolver.Answer, malformed: Malformed) -> TLSALookup:
    read = [
        TLSARecord(
            usage=int(rdata.usage),
            selector=int(rdata.selector),
            matching=int(rdata.mtype),
            data=bytes(rdata.cert),
        )
        for rdata in answer
    ]
    # dnspython before 2.9.1 reads a digest of the wrong size, which later versions refuse
    # (ask_leniently then leaves it out): set it aside here just the same. So too full
    # data that is no DER certificate or key, which every version reads.
    fitting = [record for record in read if record.fits_matching_type]
    left_out = malformed.count + len(read) - len(fitting)
    # At most MAX_RECORDS are kept, the usable ones first: cut in the answer's order, a
    # usable record behind as many unusable ones was never seen, and the host was used
    # over unauthenticated TLS ("none usable") whatever certificate it showed. (An
    # answer holds a few thousand records at most: a DNS message is 64 KiB.)
    fitting.sort(key=lambda record: not record.usable)  # stable: the answer's order
    records = tuple(fitting[:MAX_RECORDS])
    ttl = _ttl(answer)
    if malformed.ttl is not None:
        ttl = min(malformed.ttl, ttl if answer.rrset is not None else _aliases_ttl(answer))
    if left_out:
        log.warning(
            "DANE: %d malformed TLSA record(s) at %s ignored (unusable, RFC 7672 §2.2); "
            "%d other record(s)",
            left_out,
            tlsa_name(host),
            len(records),
        )
    return TLSALookup(
        host=host,
        records=records,
        secure=_validated(answer),
        exists=bool(records) or left_out > 0,
        ttl=float(ttl),
        malformed=left_out,
    )


async def _ask_again(
    resolver: dns.asyncresolver.Resolver, name: str, host: str, deadline: float
) -> TLSALookup:
    """The failure path of :func:`lookup_tlsa`: ask once more, reading the answer without
    its malformed records, by ``deadline`` (the event loop's clock)."""
    qname = dns.name.from_text(name, idna_codec=IDNA)
    try:
        response, malformed = await ask_leniently(resolver, qname, deadline)
    except (OSError, ValueError) as exc:
        raise _failure(name, host, exc) from exc
    if is_truncated(response):  # some of the records at most, as dnspython's (whole())
        raise _failure(name, host, TRUNCATED)
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return TLSALookup(host=host)
    if rcode != dns.rcode.NOERROR:
        raise _failure(name, host, f"the resolver answered {dns.rcode.to_text(rcode)}")
    try:
        answer = dns.resolver.Answer(qname, dns.rdatatype.TLSA, dns.rdataclass.IN, response)
    except dns.exception.DNSException as exc:
        raise _failure(name, host, exc) from exc
    if answer.rrset is None and not malformed.count:
        if (why := unanswered_response(response)) is not None:
            raise _failure(name, host, why)
        return TLSALookup(host=host)  # NODATA
    return _found(host, answer, malformed)


async def lookup_tlsa(resolver: dns.asyncresolver.Resolver, host: str) -> TLSALookup:
    """Look up ``host``'s TLSA records; raise TemporaryFailure for anything but an answer,
    NXDOMAIN or NODATA (RFC 7672 §2.2: such a host is unusable, never plaintext).

    One deadline, the resolver's lifetime, bounds the whole lookup. The resolver asks
    first, keeping :func:`_retry_reserve` of it: when it fails in a way that may hide an
    answer dnspython refused (a malformed record), the rest goes to asking again and
    reading that answer without its malformed records (:func:`_ask_again`)."""
    name = tlsa_name(host)
    try:
        dns.name.from_text(name, idna_codec=IDNA)
    except dns.name.NameTooLong:
        # "_25._tcp." before a host of 245 octets or more makes a name over DNS's 255: no
        # TLSA records can exist there (NODATA, as for any host without them), and a
        # failed lookup would have the host deferred for good.
        return TLSALookup(host=host)
    deadline = asyncio.get_running_loop().time() + float(resolver.lifetime)
    first_try = float(resolver.lifetime) - _retry_reserve(resolver)
    try:
        # dnspython's lifetime alone may overrun by its back-off between tries.
        async with asyncio.timeout(first_try):
            answer = await resolver.resolve(
                name, dns.rdatatype.TLSA, search=False, lifetime=first_try
            )
    except dns.resolver.NoAnswer as exc:
        if (why := unanswered(exc)) is not None:  # no NODATA: a referral, truncated
            raise _failure(name, host, why) from exc
        return TLSALookup(host=host)
    except dns.resolver.NXDOMAIN:
        return TLSALookup(host=host)
    except (dns.exception.DNSException, OSError) as exc:
        if local_shortage(exc) is not None or not _may_have_refused(exc):
            raise _failure(name, host, exc) from exc
        return await _ask_again(resolver, name, host, deadline)
    return _found(host, answer, Malformed())


def tlsa_base_domains(
    host: str, canonical: str | None, *, chain_secure: bool, alias_secure: bool = False
) -> tuple[str, ...]:
    """The names whose ``_25._tcp`` TLSA records may apply to MX ``host``, in the order
    to try them (RFC 7672 §2.2.3); the first with validated records wins.

    ``canonical`` is the CNAME-expanded name when ``host`` is an alias, ``chain_secure``
    whether the host's address records (the whole chain, for an alias) validated, and
    ``alias_secure`` whether the alias's own CNAME record did.

    >>> tlsa_base_domains("mx.example.org", None, chain_secure=True)
    ('mx.example.org',)
    >>> tlsa_base_domains("mx.example.org", "smtp.provider.net", chain_secure=True)
    ('smtp.provider.net', 'mx.example.org')
    >>> tlsa_base_domains("mx.example.org", "smtp.provider.net", chain_secure=False,
    ...                   alias_secure=True)
    ('mx.example.org',)
    """
    if canonical is None or canonical == host:
        return (host,) if chain_secure else ()
    if chain_secure:
        return (canonical, host)
    # An insecure expansion proves nothing about the target: only the name the (signed)
    # MX records gave is trusted, and only when its own zone vouches for the alias.
    return (host,) if alias_secure else ()


def reference_names(
    base: str, host: str, canonical: str | None, *, chain_secure: bool
) -> tuple[str, ...]:
    """The names of MX ``host`` a DANE-TA(2) certificate may be issued for (RFC 7672
    §3.2.2), TLSA base domain ``base`` first (it is also the SNI name): the MX host name,
    and its CNAME expansion when the whole chain validated. The next-hop domain, which may
    be named too, travels beside them (:func:`requirement_for`): these depend on the host
    alone, so connections accepted through them serve every domain the host receives for.

    >>> reference_names("smtp.provider.net", "mx.example.org", "smtp.provider.net",
    ...                 chain_secure=True)
    ('smtp.provider.net', 'mx.example.org')
    >>> reference_names("mx.example.org", "mx.example.org", "smtp.provider.net",
    ...                 chain_secure=False)
    ('mx.example.org',)
    """
    names = [base]
    for name in (host, canonical if chain_secure else None):
        if name is not None and name not in names:
            names.append(name)
    return tuple(names)


async def lookup_alias_secure(
    resolver: dns.asyncresolver.Resolver, host: str
) -> tuple[bool, float]:
    """Ask for ``host``'s own CNAME record: whether it validated, and for how many seconds
    that may be believed. Only the alias's zone answers this, whatever the target's zones
    do. Raises TemporaryFailure for anything but an answer, NXDOMAIN or NODATA (then
    ``host`` is no alias any more: not secure), as :func:`lookup_tlsa` does."""
    answer = await _ask(resolver, f"{host.rstrip('.')}.", dns.rdatatype.CNAME, host)
    if answer is None:
        return False, NEGATIVE_TTL
    return _validated(answer), _ttl(answer)


def requirement_for(
    lookup: TLSALookup, *, names: tuple[str, ...] = (), next_hops: tuple[str, ...] = ()
) -> TLSRequirement | None:
    """The DANE requirement a (validated) lookup makes, or None when DANE does not apply.
    ``names`` are the reference identifiers for DANE-TA(2) of the MX host
    (:func:`reference_names`), ``next_hops`` the recipient domain and its CNAME
    expansion, acceptable as well."""
    if not lookup.secure or not lookup.exists:
        return None
    usable = tuple(r for r in lookup.records if r.usable)
    malformed = f"; {lookup.malformed} malformed record(s) ignored" if lookup.malformed else ""
    if not usable:
        # RFC 7672 §2.2: a validated RRset whose records are all unusable (unsupported
        # parameters, or malformed data) still says the host does TLS: mandatory, but
        # unauthenticated. Only NXDOMAIN or NODATA leave DANE out (None above).
        return TLSRequirement(
            mode=TLSMode.REQUIRED,
            source=PolicySource.DANE,
            reason=f"DANE: {lookup.host} has TLSA records but none usable for SMTP: TLS "
            f"required, unauthenticated (RFC 7672 §2.2){malformed}",
        )
    return TLSRequirement(
        mode=TLSMode.DANE,
        source=PolicySource.DANE,
        reason=f"DANE: {len(usable)} usable TLSA record(s) at {tlsa_name(lookup.host)}{malformed}",
        tlsa=usable,
        dane_names=names,
        dane_next_hops=tuple(name for name in next_hops if name not in names),
    )


class DaneSource:
    """The DANE policy source for :class:`~mailstrom.tls.decide.TLSDecider`."""

    name = "dane"

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[Destination, TemporaryFailure], None] | None = None,
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self.on_failure = on_failure
        """Told of each destination whose TLSA (or alias) lookup failed, which makes its
        host unusable: for TLS reports, RFC 8460's ``dnssec-invalid``; and, by
        :class:`~mailstrom.tls.decide.TLSDecider`, of each host ``dane-only`` refused for
        want of usable validated TLSA records (:class:`~mailstrom.errors.DaneRequired`,
        RFC 8460's ``dane-required``)."""
        self._cache: dict[str, tuple[float, TLSALookup]] = {}
        self._aliases: dict[str, tuple[float, bool]] = {}

    @classmethod
    def for_config(
        cls,
        config: Config,
        *,
        on_failure: Callable[[Destination, TemporaryFailure], None] | None = None,
    ) -> DaneSource:
        """A source asking the resolver ``config.dns`` names, with DNSSEC answers asked
        for (the DO and AD bits); ``on_failure`` as :attr:`on_failure`."""
        from mailstrom.routing import make_resolver
        from mailstrom.tls.danematch import available

        if not available():
            raise ConfigError(
                "dns.dnssec (DANE) needs the cryptography package: pip install 'mailstrom[dane]'"
            )
        return cls(make_resolver(config.dns), on_failure=on_failure)

    async def lookup(self, host: str) -> TLSALookup:
        """``host``'s TLSA records, cached (see the module docstring)."""

        async def ask() -> tuple[TLSALookup, float]:
            found = await lookup_tlsa(self._resolver, host)
            return found, found.ttl

        return await self._remembered(self._cache, host, ask)

    async def alias_secure(self, host: str) -> bool:
        """Whether alias ``host``'s own CNAME record validated, cached for its TTL."""
        return await self._remembered(
            self._aliases, host, lambda: lookup_alias_secure(self._resolver, host)
        )

    async def _remembered(
        self,
        cache: dict[str, tuple[float, V]],
        host: str,
        ask: Callable[[], Awaitable[tuple[V, float]]],
    ) -> V:
        """``cache``'s answer for ``host`` while fresh, else ``ask()``'s, kept for the TTL
        it comes with (a full cache starts again: at most :data:`MAX_CACHED` hosts)."""
        now = self._clock()
        cached = cache.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        value, ttl = await ask()
        if len(cache) >= MAX_CACHED:
            cache.clear()
        cache[host] = (now + ttl, value)
        return value

    async def requirement(
        self, destination: Destination, default: TLSRequirement
    ) -> TLSRequirement | None:
        if not destination.mx_secure:
            return None  # RFC 7672 §2.2.1: insecure MX records
        try:
            return await self._requirement(destination)
        except TemporaryFailure as exc:
            # The host is not used (RFC 7672 §2.2), and no connection says why: the
            # failure is this session's, as an MTA-STS policy's refusal of a host is.
            if self.on_failure is not None:
                self.on_failure(destination, exc)
            raise

    async def _requirement(self, destination: Destination) -> TLSRequirement | None:
        host, canonical = destination.mx_host, destination.mx_canonical
        chain_secure = destination.host_secure
        alias_secure = False
        if canonical is not None and not chain_secure:
            alias_secure = await self.alias_secure(host)
        bases = tlsa_base_domains(
            host, canonical, chain_secure=chain_secure, alias_secure=alias_secure
        )
        for base in bases:
            found = await self.lookup(base)
            if found.secure and found.exists:
                names = reference_names(base, host, canonical, chain_secure=chain_secure)
                return requirement_for(found, names=names, next_hops=destination.next_hops)
        return None  # RFC 7672 §2.2.2/§2.2.3: insecure address records, or no TLSA

"""DNS lookups as the doctor needs them: every answer a value, never an exception.

The checks take any :class:`Resolver`; :class:`DNSResolver` asks the servers of a
:class:`~mailstrom.config.DNSConfig` (the loopback test server in tests), and unit tests
pass a dict-backed fake. Answers keep what a check compares: addresses as text, names
without the final dot, and each TXT record's character-strings joined into one string
(RFC 7208 §3.3, RFC 6376 §3.6.2.2).
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import dns.exception
import dns.name
import dns.rdtypes.ANY.TXT
import dns.resolver
import dns.reversename

from mailstrom.config import DNSConfig
from mailstrom.dnsanswer import whole
from mailstrom.dnsclock import Deadline
from mailstrom.routing.lookup import localhost_addresses, unanswered
from mailstrom.routing.policy import RoutePolicy


class Outcome(StrEnum):
    ANSWER = "answer"
    NXDOMAIN = "nxdomain"
    """The name does not exist."""
    NODATA = "nodata"
    """The name exists but has no record of that type."""
    ERROR = "error"
    """SERVFAIL, timeout, no server reachable: the answer is unknown for now."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    name: str
    rdtype: str
    outcome: Outcome
    records: tuple[str, ...] = ()
    error: str | None = None

    @property
    def failed(self) -> bool:
        """True when the lookup itself failed (the records are unknown, not absent)."""
        return self.outcome is Outcome.ERROR


class Resolver(Protocol):
    """Answers one query; ``rdtype`` is ``A``, ``AAAA``, ``MX``, ``PTR`` or ``TXT``."""

    def lookup(self, name: str, rdtype: str) -> Answer: ...


class DNSResolver:
    """A :class:`Resolver` over dnspython, asking the servers ``config`` names (or the
    system's), each query given ``config.timeout`` seconds."""

    def __init__(self, config: DNSConfig) -> None:
        try:
            self._resolver = dns.resolver.Resolver(configure=not config.nameservers)
        except dns.resolver.NoResolverConfiguration:
            self._resolver = dns.resolver.Resolver(configure=False)
        self._resolver.port = config.port  # resolv.conf's servers' too, as delivery's
        if config.nameservers:
            self._resolver.nameservers = list(config.nameservers)
        self._resolver.lifetime = config.timeout

    @property
    def nameservers(self) -> tuple[str, ...]:
        """The servers asked: ``config.nameservers``, else the system's (resolv.conf);
        empty when neither names one, and every lookup then fails."""
        return tuple(str(server) for server in self._resolver.nameservers)

    def lookup(self, name: str, rdtype: str, *, timeout: float | None = None) -> Answer:
        """The answer, waited for ``config.timeout`` seconds, or ``timeout`` when shorter
        (what is left of a larger bound, such as an SPF evaluation's)."""
        lifetime = self._resolver.lifetime
        if timeout is not None and 0 < timeout < lifetime:
            lifetime = timeout
        try:
            answer = self._resolve(name, rdtype, lifetime)
        except dns.resolver.NXDOMAIN:
            return Answer(name=name, rdtype=rdtype, outcome=Outcome.NXDOMAIN)
        except dns.resolver.NoAnswer as exc:
            if (why := unanswered(exc)) is not None:  # no NODATA: a referral, truncated
                return Answer(name=name, rdtype=rdtype, outcome=Outcome.ERROR, error=why)
            return Answer(name=name, rdtype=rdtype, outcome=Outcome.NODATA)
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel):
            # A name DNS cannot hold (``_dmarc.`` before a 253-character domain, an
            # address's labels before a long blocklist zone): nothing is there, now or
            # later, and no receiver finds more; not a lookup that failed for now.
            return Answer(name=name, rdtype=rdtype, outcome=Outcome.NXDOMAIN)
        except (dns.exception.DNSException, OSError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return Answer(name=name, rdtype=rdtype, outcome=Outcome.ERROR, error=reason)
        return Answer(
            name=name,
            rdtype=rdtype,
            outcome=Outcome.ANSWER,
            records=tuple(_text(rdata) for rdata in answer),
        )

    def _resolve(self, name: str, rdtype: str, lifetime: float) -> dns.resolver.Answer:
        """dnspython's answer in ``lifetime`` seconds, kept on the monotonic clock: asked
        again in what is left when a wall clock step made dnspython give up early
        (:mod:`mailstrom.dnsclock`)."""
        deadline = Deadline.after(lifetime)
        while True:
            try:
                return whole(self._resolver.resolve(name, rdtype, search=False, lifetime=lifetime))
            except dns.resolver.LifetimeTimeout:
                left = deadline.ask_again()
                if left is None:
                    raise
                lifetime = left


NOT_FINISHED = "not finished (time limit)"
"""What a check cut short by the run's time limit says (and a lookup asked after it)."""


class TimeLimited:
    """A :class:`Resolver` whose lookups all end by one deadline, ``seconds`` from now:
    the doctor's run bound as a whole. Each lookup waits no longer than what is left
    (and, asked with a ``timeout``, no longer than that); one asked when nothing is left
    fails at once, without a query. :meth:`ran_out` tells whether a lookup failed so
    (unanswered because the time ran out), for the run to tell a check cut short from
    one whose lookups failed of themselves."""

    def __init__(self, resolver: Resolver, seconds: float) -> None:
        self._resolver = resolver
        self._deadline = time.monotonic() + seconds
        self._ran_out = False

    def left(self) -> float:
        """Seconds left before the deadline (0 or less: none)."""
        return self._deadline - time.monotonic()

    def ran_out(self) -> bool:
        """Whether a lookup was left unanswered because the deadline came first, since
        the last call: each check of the run asks after it is made."""
        ran_out, self._ran_out = self._ran_out, False
        return ran_out

    def lookup(self, name: str, rdtype: str, *, timeout: float | None = None) -> Answer:
        left = self.left()
        if left <= 0:
            self._ran_out = True
            return Answer(name=name, rdtype=rdtype, outcome=Outcome.ERROR, error=NOT_FINISHED)
        answer = lookup_within(
            self._resolver, name, rdtype, left if timeout is None else min(timeout, left)
        )
        if answer.failed and self.left() <= 0:
            self._ran_out = True
        return answer


def lookup_within(resolver: Resolver, name: str, rdtype: str, timeout: float | None) -> Answer:
    """``resolver``'s answer, waited for at most ``timeout`` seconds when it can be told
    so. Only DNSResolver's and TimeLimited's own lookup() take a timeout: another
    Resolver, or a subclass that overrides lookup(name, rdtype), is asked as the protocol
    says."""
    ours = type(resolver).lookup in (DNSResolver.lookup, TimeLimited.lookup)
    if ours and isinstance(resolver, DNSResolver | TimeLimited) and timeout is not None:
        return resolver.lookup(name, rdtype, timeout=timeout)
    return resolver.lookup(name, rdtype)


def _text(rdata: object) -> str:
    if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
        # Non-UTF-8 octets survive the round trip (the SPF adapter encodes them back).
        return b"".join(rdata.strings).decode("utf-8", "surrogateescape")
    text = rdata.to_text()  # type: ignore[attr-defined]
    return str(text).removesuffix(".") if text != "." else text


def reverse_name(ip: str) -> str:
    """The PTR name of an address: ``4.3.2.1.in-addr.arpa`` (or its ip6.arpa nibbles)."""
    return dns.reversename.from_address(ip).to_text(omit_final_dot=True)


def normal_name(name: str) -> str:
    r"""A DNS name compared the way DNS compares it: lower case, no final dot.

    The name is in DNS text form, as answers give it: a dot after an odd number of
    backslashes is part of its label (``mail\.`` is one label, ``mail.``), and stays.

    >>> normal_name("Mail.Example.COM."), normal_name("mail\\..")
    ('mail.example.com', 'mail\\.')
    """
    name = name.strip().lower()
    while name.endswith(".") and not _escaped_last(name):
        name = name[:-1]
    return name


def _escaped_last(text: str) -> bool:
    """Whether the last character of ``text`` is escaped (an odd run of backslashes)."""
    body = text[:-1]
    return (len(body) - len(body.rstrip("\\"))) % 2 == 1


def address_family(ip: str) -> str:
    """``A`` for an IPv4 address, ``AAAA`` for IPv6 (the record type that names it)."""
    return "A" if ipaddress.ip_address(ip).version == 4 else "AAAA"


def public_form(ip: str) -> str:
    """``ip`` as receivers would see it, in its normal text form: an IPv4-mapped address
    (``::ffff:192.0.2.1``, how a dual-stack socket shows an IPv4 one) is the IPv4 address
    it maps, which is what goes on the wire. :class:`ValueError` for text that is no IP
    address, or one with a zone index (``fe80::1%eth0``), which names an interface of this
    host and means nothing to another (and has no reverse name).

    >>> public_form(" 2001:DB8::1 "), public_form("::ffff:c000:20a")
    ('2001:db8::1', '192.0.2.10')
    """
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        raise ValueError(f"not an IP address: {ip!r:.80}") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise ValueError(f"an address with a zone index is seen by no receiver: {ip!r:.80}")
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
    return str(address)


MOST_MX_HOSTS = 5
"""MX hosts of a domain whose addresses are looked up at most (two queries each), for one
with an address mail goes to."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HostAddresses:
    """A mail host's addresses as the router judges them (:func:`host_addresses`)."""

    kept: dict[str, str]
    """Usable addresses, each with its record type, in the order found."""
    refused: tuple[str, ...] = ()
    """Addresses the router refuses, each as ``address (kind)``."""
    error: str | None = None
    """Why a lookup failed, if one did."""


def host_addresses(
    resolver: Resolver, host: str, rtypes: tuple[str, ...], policy: RoutePolicy
) -> HostAddresses:
    """The addresses of MX host ``host`` (a name in :func:`normal_name` form, or an
    address where the exchange spells one) of the record types ``rtypes``, judged as the
    router judges them: a localhost name is the loopback address without a query
    (:func:`~mailstrom.routing.lookup.localhost_addresses`), and an address ``policy``
    refuses (loopback, unless ``allow_loopback``) is no place mail goes. At most the first
    usable one of each type is kept."""
    spelled: tuple[str, ...] | None = None
    # A zone index means nothing to another host, as to the router.
    if "%" not in host:
        with contextlib.suppress(ValueError):
            spelled = (str(ipaddress.ip_address(host)),)
    if spelled is None:
        spelled = localhost_addresses(host)
    answers: list[tuple[str, tuple[str, ...]]]
    error = None
    if spelled is not None:
        answers = [(address_family(a), (a,)) for a in spelled]
    else:
        answers = []
        for rtype in rtypes:
            answer = resolver.lookup(host, rtype)
            answers.append((rtype, answer.records))
            error = error or answer.error
    kept: dict[str, str] = {}
    refused: list[str] = []
    for rtype, records in answers:
        if rtype not in rtypes:
            continue
        for address in records:
            kind = policy.refused(address)
            if kind is not None:
                refused.append(f"{address} ({kind})")
            elif rtype not in kept.values():
                kept[address] = rtype
    return HostAddresses(kept=kept, refused=tuple(refused), error=error)


def same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False

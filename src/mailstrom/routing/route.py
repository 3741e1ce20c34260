"""Where mail for one domain goes: the value types the router returns, and grouping."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import groupby


@dataclass(frozen=True, slots=True, kw_only=True)
class MXHost:
    """One mail exchanger: its name (lower-case A-label), MX preference and addresses.

    ``addresses`` hold IPv4 addresses first, then IPv6 ones (see :mod:`mailstrom.routing`).
    """

    name: str
    preference: int
    addresses: tuple[str, ...]
    secure: bool = False
    """The address records were DNSSEC-validated (the resolver set the AD bit); only
    meaningful with ``DNSConfig.dnssec`` (for DANE, RFC 7672 §2.2.2). When the name is an
    alias, this covers the whole CNAME chain: the resolver sets the AD bit only then."""
    canonical: str | None = None
    """The CNAME-expanded name when ``name`` is an alias whose chain the address lookup
    followed (lower-case A-label), else None. DANE looks for TLSA records there first when
    the chain validated (RFC 7672 §2.2.3)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """The hosts to try for ``domain``, best first.

    ``domain`` is the name that was looked up (lower-case A-label). ``implicit`` is True
    when the domain has no MX records and its own address records stand in for one
    (RFC 5321 §5.1); the single host then bears the domain's own name and preference 0.
    """

    domain: str
    hosts: tuple[MXHost, ...]
    implicit: bool
    secure: bool = False
    """The MX records (for an implicit MX, the domain's address records) were
    DNSSEC-validated; only meaningful with ``DNSConfig.dnssec`` (RFC 7672 §2.2.1). When
    ``domain`` is an alias, this covers the whole CNAME chain to the MX records."""
    canonical: str | None = None
    """The CNAME-expanded name when ``domain`` is an alias and its MX records were found at
    the end of the chain (lower-case A-label), else None. For an implicit MX the host's
    own :attr:`MXHost.canonical` says it instead."""

    @property
    def next_hops(self) -> tuple[str, ...]:
        """The names of the next-hop domain a DANE-TA(2) certificate of one of its MX hosts
        may carry besides the host's own (RFC 7672 §3.2.2): ``domain`` and its CNAME
        expansion. Empty for an implicit MX, whose one host bears those names already.

        >>> Route(domain="example.org", hosts=(), implicit=False,
        ...       canonical="mail.provider.net").next_hops
        ('example.org', 'mail.provider.net')
        """
        if self.implicit:
            return ()
        if self.canonical is None:
            return (self.domain,)
        return (self.domain, self.canonical)

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address of every host, in the order to try them."""
        return tuple(ip for host in self.hosts for ip in host.addresses)


def equal_preference_spans(hosts: Sequence[MXHost]) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of every run of two or more hosts of equal preference: what
    :func:`shuffle_spans` must shuffle. Empty when there is nothing to shuffle (one host,
    or distinct preferences), so a caller can tell once and skip the work on every use.

    >>> equal_preference_spans([MXHost(name=n, preference=p, addresses=())
    ...                         for n, p in [("a", 5), ("b", 10), ("c", 10)]])
    ((1, 3),)
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for _, same in groupby(hosts, key=lambda h: h.preference):
        stop = start + sum(1 for _ in same)
        if stop - start > 1:
            spans.append((start, stop))
        start = stop
    return tuple(spans)


def shuffle_spans(
    hosts: list[MXHost], spans: Iterable[tuple[int, int]], rng: random.Random
) -> None:
    """Shuffle hosts of equal preference in place (RFC 5321 §5.1); ``spans`` come from
    :func:`equal_preference_spans`, so the order between preferences is kept."""
    for start, stop in spans:
        part = hosts[start:stop]
        rng.shuffle(part)
        hosts[start:stop] = part


def address_spans(hosts: Sequence[MXHost]) -> tuple[tuple[int, int, int], ...]:
    """``(host, start, stop)`` of every run of two or more addresses of one family
    (IPv4, then IPv6) in a host's addresses: what :func:`shuffle_addresses` must shuffle.
    Empty when no host has two addresses of one family.

    >>> address_spans([MXHost(name="a", preference=0, addresses=("192.0.2.1",)),
    ...                MXHost(name="b", preference=0,
    ...                       addresses=("192.0.2.2", "192.0.2.3", "2001:db8::1"))])
    ((1, 0, 2),)
    """
    spans: list[tuple[int, int, int]] = []
    for index, host in enumerate(hosts):
        start = 0
        for _, same in groupby(host.addresses, key=lambda address: ":" in address):
            stop = start + sum(1 for _ in same)
            if stop - start > 1:
                spans.append((index, start, stop))
            start = stop
    return tuple(spans)


def shuffle_addresses(
    hosts: list[MXHost], spans: Iterable[tuple[int, int, int]], rng: random.Random
) -> None:
    """Shuffle each host's addresses within each family in place (``spans`` come from
    :func:`address_spans`): they are equal destinations as much as hosts of one
    preference are, and RFC 5321 §5.1 wants load spread over those (Postfix's
    ``smtp_randomize_addresses``). IPv4 stays before IPv6."""
    for index, start, stop in spans:
        host = hosts[index]
        addresses = list(host.addresses)
        part = addresses[start:stop]
        rng.shuffle(part)
        addresses[start:stop] = part
        hosts[index] = replace(host, addresses=tuple(addresses))


def limit_addresses(hosts: Iterable[MXHost], limit: int) -> tuple[MXHost, ...]:
    """The first ``limit`` distinct addresses of ``hosts``, in order, still grouped by
    host: later hosts are dropped and the last one kept may lose its later addresses.

    An address several hosts share counts once: it is one machine, and counted under each
    name it pushed other machines (a backup MX host) out of the route. It stays under
    each name, as TLS may go differently by name (SNI, certificate, TLSA records)."""
    kept: list[MXHost] = []
    seen: set[str] = set()
    for host in hosts:
        if len(seen) >= limit:
            break
        addresses: list[str] = []
        for address in host.addresses:
            if address not in seen:
                if len(seen) >= limit:
                    break
                seen.add(address)
            addresses.append(address)
        if len(addresses) < len(host.addresses):
            host = replace(host, addresses=tuple(addresses))
        kept.append(host)
    return tuple(kept)


def cache_key(domain: str) -> str:
    """The key ``domain`` is cached and grouped under: lower-cased when ASCII, as given
    otherwise.

    ``str.lower()`` is no IDNA mapping: it turns a capital sigma into the final sigma
    (U+03C2) where a label ends or a digit or hyphen follows, but IDNA maps it to the plain
    sigma (U+03C3), and IDNA keeps a final sigma as written: lambda, capital sigma, "1" is
    xn--1-jmby, but lambda, final sigma, "1" (its ``lower()``) is xn--1-jmbv, another
    domain. Each Unicode spelling is parsed once and remembered on its own.
    """
    return domain.lower() if domain.isascii() else domain


def group_by_domain(addresses: Iterable[str]) -> dict[str, list[str]]:
    """Group addr-specs by their domain (the part after the last ``@``), lower-cased when
    ASCII (:func:`cache_key`: a Unicode domain's ``lower()`` may name another domain).

    Addresses keep their own spelling and first-seen order inside each group.

    >>> group_by_domain(["a@Example.org", "b@example.ORG", "c@example.net"])
    {'example.org': ['a@Example.org', 'b@example.ORG'], 'example.net': ['c@example.net']}
    """
    groups: dict[str, list[str]] = {}
    for address in addresses:
        domain = cache_key(address.rpartition("@")[2])
        groups.setdefault(domain, []).append(address)
    return groups

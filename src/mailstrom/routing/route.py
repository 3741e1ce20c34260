"""Where mail for one domain goes: the value types the router returns, and grouping."""

from __future__ import annotations

import random
from collections.abc import Iterable
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

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address of every host, in the order to try them."""
        return tuple(ip for host in self.hosts for ip in host.addresses)


def shuffle_equal_preferences(route: Route, rng: random.Random) -> Route:
    """``route`` with hosts of equal preference in random order (RFC 5321 §5.1).

    Expects hosts sorted by preference; the order between preferences is kept.
    """
    hosts: list[MXHost] = []
    for _, same in groupby(route.hosts, key=lambda h: h.preference):
        group = list(same)
        rng.shuffle(group)
        hosts.extend(group)
    return replace(route, hosts=tuple(hosts))


def group_by_domain(addresses: Iterable[str]) -> dict[str, list[str]]:
    """Group addr-specs by their lower-cased domain (the part after the last ``@``).

    Addresses keep their own spelling and first-seen order inside each group.

    >>> group_by_domain(["a@Example.org", "b@example.ORG", "c@example.net"])
    {'example.org': ['a@Example.org', 'b@example.ORG'], 'example.net': ['c@example.net']}
    """
    groups: dict[str, list[str]] = {}
    for address in addresses:
        domain = address.rpartition("@")[2].lower()
        groups.setdefault(domain, []).append(address)
    return groups

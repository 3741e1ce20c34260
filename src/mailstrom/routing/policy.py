"""What a route may contain: which target addresses are refused, and how much DNS work
one route may cost (hardening finding #6).

A hostile or broken domain can list 100 MX hosts of 10 addresses each, or point its MX at
127.0.0.1. :class:`RoutePolicy` bounds the first (like Postfix's ``smtp_mx_address_limit``)
and refuses the second (like Exim's ``ignore_target_hosts``, whose usual setting is
``0.0.0.0 : 127.0.0.0/8``).

>>> RoutePolicy().refused("127.0.0.4")
'loopback'
>>> RoutePolicy().refused("::ffff:169.254.1.1")
'link-local'
>>> RoutePolicy(allow_loopback=True).refused("127.0.0.4") is None
True
>>> RoutePolicy(allow_loopback=True).refused("224.0.0.1")
'multicast'
>>> RoutePolicy().refused("10.1.2.3") is None, RoutePolicy(refuse_private=True).refused("10.1.2.3")
(True, 'private')
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mailstrom.bounds import check_int
from mailstrom.errors import ConfigError

MX_ADDRESS_LIMIT = 5
"""Addresses a route holds at most, over all its hosts (Postfix ``smtp_mx_address_limit``)."""

MX_HOSTS_PER_ADDRESS = 2
"""MX hosts considered at most, per address of the limit: 10 with the default limit, the
first by preference. Postfix admits at most 100 DNS records into any list
(``dns_rr_list_limit``, "20x the default limit on the number of address records") and
looks up every MX host it admitted. We look up only as many hosts as the address limit
needs, so more hosts matter only when the better ones have no usable address; twice the
address limit covers that without letting a domain with hundreds of address-less MX hosts
cost hundreds of lookups."""

MAX_DNS_QUERIES = 10
"""DNS queries one route lookup has in flight at once (A and AAAA of five hosts)."""


NEVER_A_SERVER = frozenset({"multicast", "reserved"})
"""Kinds of address that no mail server can have, refused even with ``allow_loopback``."""


NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
"""The NAT64 Well-Known Prefix (RFC 6052 §2.1): the IPv4 address is the last 32 bits."""

NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")
"""The NAT64 local-use prefix (RFC 8215), from which an operator picks its own
translation prefix: for use inside one network, so one of the private ones."""

IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
"""IPv4-compatible IPv6 addresses ``::a.b.c.d`` (deprecated, RFC 4291 §2.5.5.1), of which
``::`` and ``::1`` are not: those are the unspecified and loopback addresses."""


NOT_GLOBAL_NETWORKS = tuple(
    (ipaddress.ip_network(network), kind)
    for network, kind in (
        # IANA IPv4 Special-Purpose Address Registry (RFC 6890), "Globally Reachable:
        # False", but for those target_kind() names already (0/8, 127/8, 169.254/16,
        # 240/4 and the broadcast address).
        ("10.0.0.0/8", "private"),  # RFC 1918
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "private"),  # shared address space (carrier-grade NAT), RFC 6598
        ("192.0.0.0/24", "special-purpose"),  # IETF protocol assignments, RFC 6890
        ("192.0.2.0/24", "documentation"),  # TEST-NET-1, RFC 5737
        ("198.51.100.0/24", "documentation"),  # TEST-NET-2
        ("203.0.113.0/24", "documentation"),  # TEST-NET-3
        ("198.18.0.0/15", "benchmarking"),  # RFC 2544
        # The IPv6 registry likewise; ::1, ::, fe80::/10 and the forms carrying an IPv4
        # address are target_kind()'s and embedded_ipv4()'s.
        ("fc00::/7", "private"),  # unique local addresses, RFC 4193
        (str(NAT64_LOCAL_USE), "private"),  # a translator of the sender's own network
        ("fec0::/10", "site-local"),  # deprecated, RFC 3879: still routed inside sites
        ("2001:db8::/32", "documentation"),  # RFC 3849
        ("3fff::/20", "documentation"),  # RFC 9637
        ("2001:2::/48", "benchmarking"),  # RFC 5180
        ("100::/64", "special-purpose"),  # discard-only, RFC 6666
        ("100:0:0:1::/64", "special-purpose"),  # dummy prefix, RFC 9780
        ("2001:10::/28", "special-purpose"),  # deprecated ORCHID, RFC 4843
        ("5f00::/16", "special-purpose"),  # SRv6 SIDs, RFC 9602
    )
)
"""Networks no host on the Internet has an address in, which
:attr:`RoutePolicy.refuse_private` refuses, each with the kind it is refused as: the
IANA special-purpose registries' entries that are not globally reachable, and the
deprecated site-local prefix. A hand list rather than ``ipaddress``'s ``is_global``, whose
tables change between Python releases (3.11.7's calls ``fec0::1``, ``3fff::1`` and
``5f00::1`` global, and no Teredo address), so that one policy holds on every Python
mailstrom runs on. Not the registry's few globally reachable addresses inside these
(:data:`GLOBAL_INSIDE`)."""

GLOBAL_INSIDE = tuple(
    ipaddress.ip_network(network)
    for network in (
        "192.0.0.9/32",  # Port Control Protocol anycast, RFC 7723
        "192.0.0.10/32",  # TURN anycast, RFC 8155
    )
)
"""Globally reachable addresses in a :data:`NOT_GLOBAL_NETWORKS` network (IANA)."""

PRIVATE_NETWORKS = tuple(network for network, kind in NOT_GLOBAL_NETWORKS if kind == "private")
"""The networks of private use among :data:`NOT_GLOBAL_NETWORKS`: behind a translator of
the sender's own network."""


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses a connection to ``ip`` may end up at, when ``ip`` is one of the
    IPv6 forms that carry an IPv4 address; ``()`` for any other.

    A hostile domain can give its MX (or its MTA-STS or TLS-RPT host) an AAAA record of
    one of these forms to reach 127.0.0.1 or the sender's own network past a check that
    looks only at the IPv6 address. Each form is judged by where its packets go:

    - IPv4-mapped ``::ffff:a.b.c.d`` (RFC 4291 §2.5.5.2): this host's own stack connects
      to ``a.b.c.d`` over IPv4.
    - NAT64, Well-Known Prefix ``64:ff9b::a.b.c.d`` (RFC 6052): a translator on the
      sender's network connects to ``a.b.c.d``. Not refused as such: on an IPv6-only host
      behind DNS64 every IPv4-only MX has an address of this form.
    - Not the NAT64 local-use prefix ``64:ff9b:1::/48`` (RFC 8215): where the IPv4 part
      sits in it is the operator's choice (RFC 6052 §2.2 has six layouts; /64 and /96
      ones are deployed), which the address does not tell, and any one reading refuses
      valid addresses of another layout: ``x.y.z.127`` in a /64 layout reads as
      ``127.0.0.0`` in the /96 one, and its mail would bounce. The prefix is for use
      inside one network, so its addresses lead only where the sender's own translator
      takes them, like an MX on 10.0.0.0/8: it is one of the :data:`PRIVATE_NETWORKS`.
    - 6to4 ``2002:a.b.c.d::/48`` (RFC 3056): a 6to4 router or relay sends the packets,
      in IPv4, to ``a.b.c.d``.
    - Teredo ``2001::/32`` (RFC 4380 §4): a relay sends the packets over UDP to the
      client's IPv4 address (stored inverted, which :attr:`~ipaddress.IPv6Address.teredo`
      undoes), and its first bubbles through the client's Teredo server: both are judged.
    - IPv4-compatible ``::a.b.c.d`` (RFC 4291 §2.5.5.1, deprecated): a stack that still
      has automatic tunnels (Linux's ``sit0``) sends them to ``a.b.c.d`` in IPv4.
    """
    if ip.ipv4_mapped is not None:
        return (ip.ipv4_mapped,)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip.teredo is not None:
        server, client = ip.teredo
        return (client, server)
    if ip in NAT64_WELL_KNOWN or (ip in IPV4_COMPATIBLE and int(ip) > 1):
        return (ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF),)
    return ()


def target_kind(ip: Address) -> str | None:
    """``"loopback"``, ``"unspecified"`` or ``"link-local"`` for addresses that name this
    host or its own link rather than a mail server elsewhere; ``"multicast"`` (224.0.0.0/4,
    ff00::/8) or ``"reserved"`` (240.0.0.0/4 and the broadcast address 255.255.255.255),
    to which no TCP connection can be made; None for any other address.

    IPv6 addresses that carry an IPv4 address (``::ffff:127.0.0.1``, ``64:ff9b::7f00:1``,
    ``2002:7f00:1::``, see :func:`embedded_ipv4`) are judged by that IPv4 address, the
    first of them that is refused when there are two. (Python 3.11's ``is_loopback`` does
    not look inside them.)
    """
    if isinstance(ip, ipaddress.IPv6Address):
        inside = embedded_ipv4(ip)
        if inside:
            return next(filter(None, map(_own_kind, inside)), None)
    return _own_kind(ip)


def _own_kind(ip: Address) -> str | None:
    """:func:`target_kind` of ``ip`` itself, not looking inside an IPv6 address."""
    if ip.is_loopback:
        return "loopback"  # 127.0.0.0/8, ::1
    # 0.0.0.0/8 is "this host on this network" (RFC 1122 §3.2.1.3): never a destination,
    # and Linux connects 0.0.0.0 to the local host.
    if ip.is_unspecified or (ip.version == 4 and int(ip) >> 24 == 0):
        return "unspecified"
    if ip.is_link_local:
        return "link-local"  # 169.254.0.0/16, fe80::/10
    if ip.is_multicast:
        return "multicast"
    if ip.version == 4 and ip.is_reserved:
        return "reserved"
    return None


def not_global_kind(ip: Address) -> str | None:
    """The kind of the :data:`NOT_GLOBAL_NETWORKS` network ``ip`` is in (``"private"``,
    ``"documentation"``...), also when it carries an IPv4 address that is (see
    :func:`embedded_ipv4`); None for an address of the Internet.

    >>> not_global_kind(ipaddress.ip_address("198.18.0.1"))
    'benchmarking'
    """
    candidates: tuple[Address, ...] = (ip,)
    if isinstance(ip, ipaddress.IPv6Address):
        candidates += embedded_ipv4(ip)
    for candidate in candidates:
        if any(candidate in network for network in GLOBAL_INSIDE):
            continue
        for network, kind in NOT_GLOBAL_NETWORKS:
            if candidate in network:
                return kind
    return None


def is_private(ip: Address) -> bool:
    """Whether ``ip`` is in one of the :data:`PRIVATE_NETWORKS`, or carries an IPv4
    address that is (see :func:`embedded_ipv4`)."""
    return not_global_kind(ip) == "private"


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutePolicy:
    """Limits and refusals the :class:`~mailstrom.routing.Router` applies to every route.

    The defaults are safe for delivery on the Internet; tests and demos that deliver to a
    receiver on 127.0.0.1 set ``allow_loopback=True``.
    """

    allow_loopback: bool = False
    """Keep loopback, unspecified and link-local targets (see :func:`target_kind`);
    multicast and reserved ones are refused all the same."""
    refuse_private: bool = False
    """Refuse :data:`NOT_GLOBAL_NETWORKS` addresses too (as their kind: ``"private"``,
    ``"documentation"``, ``"benchmarking"``...): the sender's own network, or one no host
    on the Internet is in. Not for mail
    routes (an MX on 10.0.0.0/8 is a normal internal relay) but for requests a remote
    domain chooses the target of, like TLS report POSTs: a collector for a public domain
    has no business on the sender's own network. ``allow_loopback`` lifts this refusal
    too: a test or demo whose servers are on this host may well have some on a private
    network."""
    mx_address_limit: int = MX_ADDRESS_LIMIT
    """Addresses a route holds at most, in the order they are to be tried."""
    mx_host_limit: int | None = None
    """MX hosts considered at most (the first by preference, equal ones shuffled);
    None: :data:`MX_HOSTS_PER_ADDRESS` times ``mx_address_limit``."""
    max_dns_queries: int = MAX_DNS_QUERIES
    """DNS queries in flight at once for one route (at least 2: a host's A and AAAA)."""
    ip_version: int | None = None
    """Keep only addresses of this IP version (4 or 6): that of ``Config.source_address``,
    as a socket bound there reaches no other. The others are skipped before the cut to
    ``mx_address_limit``, as Postfix's ``inet_protocols`` leaves them out of the lookup.
    None: both."""

    def __post_init__(self) -> None:
        # Whole numbers (bounds.check_int): ``value < 1`` is false for NaN, which took
        # every address out of every route, and passes 1.5, which failed each lookup.
        check_int(self.mx_address_limit, "mx_address_limit")
        if self.mx_host_limit is not None:
            check_int(self.mx_host_limit, "mx_host_limit")
        check_int(self.max_dns_queries, "max_dns_queries", minimum=2)
        if self.ip_version not in (None, 4, 6):
            raise ConfigError(f"ip_version must be 4, 6 or None, got {self.ip_version!r}")

    @property
    def hosts_considered(self) -> int:
        """MX hosts considered at most."""
        if self.mx_host_limit is not None:
            return self.mx_host_limit
        return MX_HOSTS_PER_ADDRESS * self.mx_address_limit

    def refused(self, address: str) -> str | None:
        """Why mail must not go to ``address`` (its :func:`target_kind`), or None."""
        ip = ipaddress.ip_address(address)
        kind = target_kind(ip)
        if kind is None and self.refuse_private:
            kind = not_global_kind(ip)
        if self.allow_loopback and kind not in NEVER_A_SERVER:
            return None
        return kind

"""Which targets a route may hold, and the settings that say so (hardening finding #6)."""

from __future__ import annotations

import ipaddress

import pytest

from mailstrom.errors import ConfigError, PermanentFailure
from mailstrom.routing import RoutePolicy
from mailstrom.routing.lookup import literal_lookup
from mailstrom.routing.policy import target_kind


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.0.0.4", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("169.254.0.1", "link-local"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("febf::1", "link-local"),
        ("::ffff:169.254.1.1", "link-local"),
    ],
)
def test_targets_that_are_this_host_or_its_link_are_refused(address: str, kind: str) -> None:
    """Hardening #6: loopback, unspecified and link-local targets, IPv4-mapped included."""
    assert target_kind(ipaddress.ip_address(address)) == kind
    assert RoutePolicy().refused(address) == kind
    assert RoutePolicy(allow_loopback=True).refused(address) is None


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::ffff:255.255.255.255", "reserved"),
    ],
)
def test_targets_no_server_can_have_are_refused_always(address: str, kind: str) -> None:
    """No TCP connection goes to a multicast or reserved address: a route to one was
    retried until max_age instead of failing. Refused even where loopback is allowed."""
    assert target_kind(ipaddress.ip_address(address)) == kind
    assert RoutePolicy().refused(address) == kind
    assert RoutePolicy(allow_loopback=True).refused(address) == kind


@pytest.mark.parametrize(
    "address",
    ["192.0.2.1", "10.0.0.1", "126.255.255.255", "128.0.0.1", "1.0.0.0", "169.253.0.1",
     "2001:db8::1", "fec0::1", "::ffff:192.0.2.1", "223.255.255.255", "100.64.0.1"],
)  # fmt: skip
def test_other_targets_are_kept(address: str) -> None:
    assert target_kind(ipaddress.ip_address(address)) is None
    assert RoutePolicy().refused(address) is None


@pytest.mark.parametrize(
    "address",
    ["10.0.0.5", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.1.1",
     "100.64.0.1", "100.127.255.254", "fc00::1", "fd12:3456::1", "::ffff:10.0.0.5",
     "::ffff:192.168.0.1"],
)  # fmt: skip
def test_private_targets_are_refused_only_when_asked(address: str) -> None:
    """TLS report POSTs refuse private networks (a collector of a public domain has no
    business there); mail routes keep them (an internal relay on 10/8 is normal), and
    ``allow_loopback`` (tests, demos) lifts the refusal as it lifts loopback's."""
    assert RoutePolicy().refused(address) is None
    assert RoutePolicy(refuse_private=True).refused(address) == "private"
    assert RoutePolicy(refuse_private=True, allow_loopback=True).refused(address) is None


@pytest.mark.parametrize(
    "address", ["172.15.255.255", "172.32.0.1", "100.63.255.255", "100.128.0.1", "fe00::1",
                "192.169.0.1", "11.0.0.1", "2001:db9::1", "8.8.8.8"],
)  # fmt: skip
def test_addresses_next_to_private_networks_are_kept(address: str) -> None:
    assert RoutePolicy(refuse_private=True).refused(address) is None


def test_refusing_private_keeps_the_other_refusals() -> None:
    policy = RoutePolicy(refuse_private=True)
    assert policy.refused("127.0.0.1") == "loopback"
    assert policy.refused("169.254.169.254") == "link-local"
    assert RoutePolicy(refuse_private=True, allow_loopback=True).refused("224.0.0.1") == (
        "multicast"
    )


@pytest.mark.parametrize(
    ("literal", "address"),
    [
        ("[127.0.0.4]", "127.0.0.4"),
        ("[IPv6:::1]", "::1"),
        # Python 3.13 spells an IPv4-mapped address ::ffff:127.0.0.1, 3.11 and 3.12
        # ::ffff:7f00:1: the route carries the interpreter's spelling.
        ("[IPv6:::ffff:127.0.0.1]", str(ipaddress.ip_address("::ffff:127.0.0.1"))),
        ("[0.0.0.0]", "0.0.0.0"),
        ("[169.254.0.1]", "169.254.0.1"),
        ("[IPv6:fe80::1]", "fe80::1"),
    ],
)
def test_address_literals_naming_this_host_fail_permanently(literal: str, address: str) -> None:
    """Hardening #6: a@[127.0.0.4] is not delivered to unless allow_loopback."""
    lookup = literal_lookup(literal, RoutePolicy())
    assert lookup is not None
    with pytest.raises(PermanentFailure) as info:
        lookup.unwrap()
    assert info.value.enhanced == "5.4.4"
    assert address in info.value.text
    assert "allow_loopback" in info.value.text
    allowed = literal_lookup(literal, RoutePolicy(allow_loopback=True))
    assert allowed is not None
    assert allowed.unwrap().addresses == (address,)


@pytest.mark.parametrize(
    "options",
    [{"mx_address_limit": 0}, {"mx_host_limit": 0}, {"max_dns_queries": 1}],
)
def test_policy_limits_are_validated(options: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        RoutePolicy(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"mx_address_limit": float("nan")},
        {"mx_address_limit": 1.5},
        {"mx_address_limit": True},
        {"mx_host_limit": float("inf")},
        {"max_dns_queries": 2.5},
        {"max_dns_queries": float("nan")},
    ],
)
def test_policy_limits_that_are_no_whole_numbers_are_refused(options: dict[str, object]) -> None:
    # ``value < 1`` is false for NaN and passes 1.5 or True: NaN took every address out
    # of every route ("no MX host of ... has an address", deferred until max_age), and a
    # float limit raised TypeError in the lookup (a slice by a float), not at Router(...).
    with pytest.raises(ConfigError, match=next(iter(options))):
        RoutePolicy(**options)  # type: ignore[arg-type]


def test_policy_defaults() -> None:
    policy = RoutePolicy()
    assert not policy.allow_loopback
    assert policy.mx_address_limit == 5
    assert policy.hosts_considered == 10
    assert RoutePolicy(mx_address_limit=20).hosts_considered == 40
    assert RoutePolicy(mx_host_limit=3).hosts_considered == 3


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 Well-Known Prefix, RFC 6052
        ("64:ff9b::a9fe:a9fe", "link-local"),  # 169.254.169.254, a cloud's metadata
        ("2002:7f00:1::", "loopback"),  # 6to4, RFC 3056
        ("2002:7f00:1:abcd::1", "loopback"),
        ("2002:a9fe:a9fe::", "link-local"),
        ("2002::1", "unspecified"),  # 6to4 of 0.0.0.0
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo client, inverted
        ("2001:0:7f00:1::f7f7:f7f7", "loopback"),  # Teredo server 127.0.0.1, client 8.8.8.8
        ("::7f00:1", "loopback"),  # IPv4-compatible, deprecated
        ("::127.0.0.2", "loopback"),
        ("::169.254.0.1", "link-local"),
    ],
)
def test_ipv6_forms_carrying_an_ipv4_address_are_judged_by_it(address: str, kind: str) -> None:
    """An AAAA record of 64:ff9b::7f00:1 or 2002:7f00:1:: led past the refusal of
    loopback targets: only IPv4-mapped addresses were looked inside."""
    assert target_kind(ipaddress.ip_address(address)) == kind
    assert RoutePolicy().refused(address) == kind
    assert RoutePolicy(refuse_private=True).refused(address) == kind
    assert RoutePolicy(allow_loopback=True).refused(address) is None


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("64:ff9b::e000:1", "multicast"),
        ("64:ff9b::ffff:ffff", "reserved"),
        ("2002:f000:1::", "reserved"),
        ("2002:e000:1::", "multicast"),
        ("::240.0.0.1", "reserved"),
    ],
)
def test_ipv6_forms_carrying_no_server_address_are_refused_always(address: str, kind: str) -> None:
    assert RoutePolicy(allow_loopback=True).refused(address) == kind


@pytest.mark.parametrize(
    "address",
    ["64:ff9b::a00:5", "64:ff9b::c0a8:101", "2002:a00:5::", "2002:c0a8:101:1::1",
     "::ffff:172.16.0.1", "2001:0:4136:e378:8000:63bf:f5ff:fffa", "::10.0.0.5",
     "64:ff9b:1::808:808", "64:ff9b:1:ff::1", "64:ff9b:1::7f00:1", "64:ff9b:1:0:5d:b8d8:7f00:0"],
)  # fmt: skip
def test_ipv6_forms_carrying_a_private_ipv4_address_are_private(address: str) -> None:
    """The TLS report POST and MTA-STS fetch guard (refuse_private) looks inside too. The
    NAT64 local-use prefix is a translator on the sender's own network, whatever it
    carries: its layout is the operator's, so 93.184.216.127 in a /64 one (the last
    address) is not read as 127.0.0.0. Mail routes keep them, as they keep 10.0.0.5."""
    assert RoutePolicy().refused(address) is None
    assert RoutePolicy(refuse_private=True).refused(address) == "private"


@pytest.mark.parametrize(
    "address",
    ["64:ff9b::808:808", "64:ff9b::c000:301", "2002:808:808::1", "::8.8.8.8",
     "2001:0:4136:e378:8000:63bf:f7f7:f7f7", "2001:1::7f00:1", "2003::7f00:1",
     "64:ff9b:2::7f00:1", "::2:0:7f00:1", "::ffff:0:7f00:1:0"],
)  # fmt: skip
def test_ipv6_forms_carrying_a_public_ipv4_address_are_kept(address: str) -> None:
    """A host behind DNS64 reaches every IPv4-only MX through 64:ff9b::/96, so the
    prefix itself is not refused; neither are addresses merely next to these prefixes."""
    assert target_kind(ipaddress.ip_address(address)) is None
    assert RoutePolicy(refuse_private=True).refused(address) is None


def test_ipv6_unspecified_and_loopback_are_not_ipv4_compatible() -> None:
    """:: and ::1 lie in ::/96 but are IPv6's own, not 0.0.0.0 and 0.0.0.1."""
    assert target_kind(ipaddress.ip_address("::")) == "unspecified"
    assert target_kind(ipaddress.ip_address("::1")) == "loopback"


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("198.18.0.1", "benchmarking"),
        ("198.19.255.254", "benchmarking"),
        ("2001:2::1", "benchmarking"),
        ("fec0::1", "site-local"),
        ("feff:ffff::1", "site-local"),
        ("192.0.0.8", "special-purpose"),
        ("192.0.0.170", "special-purpose"),
        ("192.0.2.1", "documentation"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.9", "documentation"),
        ("2001:db8::1", "documentation"),
        ("3fff::1", "documentation"),
        ("100::1", "special-purpose"),
        ("100:0:0:1::1", "special-purpose"),
        ("2001:10::1", "special-purpose"),
        ("5f00::1", "special-purpose"),
        ("::ffff:198.18.0.1", "benchmarking"),
        ("64:ff9b::c000:201", "documentation"),  # NAT64 of 192.0.2.1
        ("2002:c612:1::", "benchmarking"),  # 6to4 of 198.18.0.1
        ("2001:db8::7f00:1", "documentation"),
    ],
)
def test_networks_no_internet_host_is_in_are_refused_only_when_asked(
    address: str, kind: str
) -> None:
    """The MTA-STS fetch and the TLS report POST refused the private networks but went to
    198.18.0.0/15 (benchmarking, often a lab or a provider's own network), fec0::/10
    (site-local, still routed inside sites) and the rest of the IANA special-purpose
    registries' networks that are not globally reachable. Mail routes keep them, and
    ``allow_loopback`` lifts the refusal, as for the private networks."""
    assert RoutePolicy().refused(address) is None
    assert RoutePolicy(refuse_private=True).refused(address) == kind
    assert RoutePolicy(refuse_private=True, allow_loopback=True).refused(address) is None


@pytest.mark.parametrize(
    "address",
    ["192.0.0.9", "192.0.0.10", "192.0.1.1", "198.17.255.255", "198.20.0.1", "192.0.3.1",
     "198.51.99.255", "203.0.114.1", "2001:db9::1", "3fff:1000::1", "fe7f::1", "2001:3::1",
     "2001:4:112::1", "2620:4f:8000::1", "100:0:0:2::1", "5eff::1", "2001:20::1"],
)  # fmt: skip
def test_globally_reachable_addresses_beside_those_networks_are_kept(address: str) -> None:
    """What the registries call globally reachable (PCP and TURN anycast inside
    192.0.0.0/24, AMT, AS112, ORCHIDv2) and the edges of each refused network."""
    assert RoutePolicy(refuse_private=True).refused(address) is None


@pytest.mark.parametrize("allow_loopback", [False, True])
@pytest.mark.parametrize("literal", ["[224.0.0.1]", "[240.0.0.1]", "[IPv6:ff02::1]"])
def test_a_target_no_setting_allows_does_not_blame_allow_loopback(
    literal: str, allow_loopback: bool
) -> None:
    """Multicast and reserved targets are refused whatever allow_loopback says, so the
    failure must not say "allow_loopback is off": with it on, that was false, and with it
    off it sent the operator to a setting that would not have helped."""
    lookup = literal_lookup(literal, RoutePolicy(allow_loopback=allow_loopback))
    assert lookup is not None
    with pytest.raises(PermanentFailure) as info:
        lookup.unwrap()
    assert "allow_loopback" not in info.value.text
    assert "no mail server" in info.value.text

"""Routing pieces that need no DNS: grouping, shuffling, names, address literals."""

from __future__ import annotations

import random

import pytest

from mailstrom.errors import PermanentFailure
from mailstrom.routing import MXHost, Route, group_by_domain
from mailstrom.routing.lookup import literal_lookup, to_qname
from mailstrom.routing.policy import RoutePolicy
from mailstrom.routing.route import equal_preference_spans, limit_addresses, shuffle_spans


def test_group_by_domain_lowercases_domains_and_keeps_order() -> None:
    groups = group_by_domain(["a@Example.ORG", "b@x.net", "c@example.org", 'd"@"q@x.NET'])
    assert groups == {
        "example.org": ["a@Example.ORG", "c@example.org"],
        "x.net": ["b@x.net", 'd"@"q@x.NET'],
    }
    assert list(groups) == ["example.org", "x.net"]


def test_group_by_domain_keys_name_the_domain_the_address_names() -> None:
    """str.lower() turns a capital sigma before a digit, a hyphen or a label's end into a
    final sigma, which IDNA keeps as written: "λΣ1.example" is xn--1-jmby.example, but
    its lower() "λς1.example" is xn--1-jmbv.example, another domain. A key made that way
    and handed to Router.route sent the group's mail to the other domain's MX hosts."""
    domain = "λΣ1.example"
    [key] = group_by_domain([f"a@{domain}", f"b@{domain}"])
    assert to_qname(key) == to_qname(domain)
    assert to_qname(domain).to_text() == "xn--1-jmby.example."


def host(name: str, preference: int) -> MXHost:
    return MXHost(name=name, preference=preference, addresses=("127.0.0.1",))


def test_shuffle_keeps_preference_order_and_mixes_equal_ones() -> None:
    route = Route(
        domain="example.org",
        hosts=(host("a", 5), host("b", 10), host("c", 10), host("d", 10), host("e", 20)),
        implicit=False,
    )
    spans = equal_preference_spans(route.hosts)
    assert spans == ((1, 4),)
    seen = set()
    rng = random.Random(3)
    for _ in range(50):
        hosts = list(route.hosts)
        shuffle_spans(hosts, spans, rng)
        names = [h.name for h in hosts]
        assert names[0] == "a"
        assert names[4] == "e"
        assert sorted(names[1:4]) == ["b", "c", "d"]
        seen.add(tuple(names))
    assert len(seen) == 6  # every order of the three equal hosts turns up


def test_route_addresses_flattens_in_order() -> None:
    route = Route(
        domain="d",
        hosts=(
            MXHost(name="a", preference=1, addresses=("127.0.0.1", "::1")),
            MXHost(name="b", preference=2, addresses=("127.0.0.2",)),
        ),
        implicit=False,
    )
    assert route.addresses == ("127.0.0.1", "::1", "127.0.0.2")


@pytest.mark.parametrize(
    ("domain", "text"),
    [
        ("Example.ORG", "example.org."),
        ("example.org.", "example.org."),
        ("bücher.example", "xn--bcher-kva.example."),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example."),
    ],
)
def test_to_qname(domain: str, text: str) -> None:
    assert to_qname(domain).to_text() == text


@pytest.mark.parametrize("domain", ["", ".", "a..b", "x" * 64 + ".org"])
def test_invalid_domains_fail_permanently(domain: str) -> None:
    with pytest.raises(PermanentFailure) as info:
        to_qname(domain)
    assert info.value.enhanced == "5.1.2"


def test_address_literals_route_to_themselves() -> None:
    policy = RoutePolicy(allow_loopback=True)
    assert literal_lookup("example.org", policy) is None
    v4 = literal_lookup("[127.0.0.1]", policy)
    assert v4 is not None
    assert v4.unwrap().addresses == ("127.0.0.1",)
    assert v4.unwrap().implicit
    v6 = literal_lookup("[IPv6:0:0::1]", policy)
    assert v6 is not None
    assert v6.unwrap().addresses == ("::1",)
    bad = literal_lookup("[not-an-ip]", policy)
    assert bad is not None
    with pytest.raises(PermanentFailure):
        bad.unwrap()


@pytest.mark.parametrize("literal", ["[IPv6:127.0.0.1]", "[::1]", "[IPv6:fe80::1%eth0]", "[]"])
def test_address_literals_need_the_right_tag(literal: str) -> None:
    """RFC 5321 §4.1.3: IPv6 needs its tag and IPv4 has none; a zone index names nothing
    to another host. Each is refused rather than read as some other address."""
    lookup = literal_lookup(literal, RoutePolicy(allow_loopback=True))
    assert lookup is not None
    with pytest.raises(PermanentFailure, match="invalid address literal"):
        lookup.unwrap()


def test_nothing_to_shuffle_has_no_spans() -> None:
    assert equal_preference_spans([host("a", 10)]) == ()
    assert equal_preference_spans([host("a", 10), host("b", 20), host("c", 30)]) == ()
    assert equal_preference_spans([host("a", 1), host("b", 1), host("c", 2), host("d", 2)]) == (
        (0, 2),
        (2, 4),
    )


def test_limit_addresses_keeps_the_first_in_order() -> None:
    """Hardening #6: the address limit cuts in try order, inside a host if need be."""
    hosts = (
        MXHost(name="a", preference=1, addresses=("192.0.2.1", "192.0.2.2")),
        MXHost(name="b", preference=2, addresses=("192.0.2.3", "192.0.2.4", "2001:db8::1")),
        MXHost(name="c", preference=3, addresses=("192.0.2.5",)),
    )
    kept = limit_addresses(hosts, 3)
    assert [h.name for h in kept] == ["a", "b"]
    assert kept[1].addresses == ("192.0.2.3",)
    assert limit_addresses(hosts, 6) == hosts
    assert limit_addresses(hosts, 1)[0].addresses == ("192.0.2.1",)


def test_limit_addresses_counts_an_address_hosts_share_once() -> None:
    hosts = (
        MXHost(name="a", preference=1, addresses=("192.0.2.1",)),
        MXHost(name="b", preference=2, addresses=("192.0.2.1", "192.0.2.2")),
        MXHost(name="c", preference=3, addresses=("192.0.2.3", "192.0.2.1")),
    )
    kept = limit_addresses(hosts, 2)
    assert [h.addresses for h in kept] == [("192.0.2.1",), ("192.0.2.1", "192.0.2.2")]
    assert limit_addresses(hosts, 3) == hosts


def test_next_hops_are_the_domain_and_its_expansion_unless_the_mx_is_implicit() -> None:
    host = MXHost(name="mx.example.org", preference=10, addresses=("192.0.2.1",))
    plain = Route(domain="example.org", hosts=(host,), implicit=False)
    aliased = Route(domain="shop.example", hosts=(host,), implicit=False, canonical="example.org")
    implicit = Route(domain="example.org", hosts=(host,), implicit=True)
    assert plain.next_hops == ("example.org",)
    assert aliased.next_hops == ("shop.example", "example.org")
    assert implicit.next_hops == ()

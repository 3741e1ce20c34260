"""DNS blocklists (RFC 5782): is the outgoing address listed?

An IPv4 address ``192.0.2.99`` is looked up as ``99.2.0.192.<zone>`` (IPv6: its 32
nibbles reversed); an A record in 127.0.0.0/8 means listed, NXDOMAIN means not listed,
and the TXT record at the same name usually says why and where to ask for removal.
Spamhaus answers 127.255.255.x instead when it refuses the query (typically because it
came through a large public resolver), which says nothing about the address; others
(URIBL, whose refusals SpamAssassin reports as URIBL_BLOCKED) answer 127.0.0.1 instead,
an address that is never a listing code (the conventional listing is 127.0.0.2, and
RFC 5782 §5 keeps 127.0.0.1 itself out of every list as its "not listed" test entry).
"""

from __future__ import annotations

import ipaddress

from mailstrom.doctor.lookup import Outcome, Resolver
from mailstrom.doctor.report import Check, Status, listed, piece
from mailstrom.domains import ldh_domain_name
from mailstrom.safetext import safe_decode

DEFAULT_DNSBLS = ("zen.spamhaus.org", "bl.spamcop.net", "b.barracudacentral.org")
"""Widely used lists with free query access for modest volumes."""


def query_name(ip: str, zone: str) -> str:
    """The name to look up for ``ip`` in ``zone``; :class:`ValueError` for an ``ip`` that
    is no address or a ``zone`` that is no letter-digit-hyphen domain name (a lookup of
    ``zen..spamhaus.org`` could only fail, and look like a temporary DNS error)."""
    address = ipaddress.ip_address(ip)
    if address.version == 4:
        labels = str(address).split(".")
    else:
        labels = list(address.exploded.replace(":", ""))
    return ".".join([*reversed(labels), ldh_domain_name(zone)])


def check_dnsbl(resolver: Resolver, *, ip: str, zone: str) -> Check:
    name = query_name(ip, zone)

    def check(status: Status, summary: str, fix: str | None = None, *details: str) -> Check:
        return Check(
            name="dnsbl", subject=zone, status=status, summary=summary, details=details, fix=fix
        )

    answer = resolver.lookup(name, "A")
    if answer.outcome in (Outcome.NXDOMAIN, Outcome.NODATA):
        return check(Status.PASS, f"{ip} is not listed")
    if answer.outcome is Outcome.ERROR:
        return check(Status.UNKNOWN, f"could not query {zone}: {answer.error}")
    codes = list(answer.records)
    shown = f"A {name}: {listed(codes, 20)}"
    loopback = [c for c in codes if _in_127(c)]
    if not loopback:
        return check(
            Status.WARN,
            f"{zone} answered {listed(codes)}, which is no listing code: the resolver "
            "seems to rewrite unknown names",
            "use a resolver that returns NXDOMAIN unchanged for blocklist queries",
            shown,
        )
    listings = [c for c in loopback if not _no_listing(c)]
    refusals = [c for c in loopback if c.startswith("127.255.255.")]
    if not listings and refusals:
        why, fix = _REFUSALS.get(refusals[0], _REFUSALS["127.255.255.254"])
        return check(
            Status.WARN,
            f"{zone} refused the query ({listed(loopback)}): {why}",
            f"{fix}; then run the doctor again ({zone})",
            shown,
        )
    if not listings:
        return check(
            Status.WARN,
            f"{zone} answered 127.0.0.1, which is no listing code: lists answer it to "
            "queries they refuse or cannot serve",
            f"check that {zone} is still in service and takes your queries (its web site "
            "says how), then run the doctor again",
            shown,
        )
    reasons = resolver.lookup(name, "TXT")
    # The list's own words, shown to the operator: whatever octets it published, made safe.
    reason = (
        "; ".join(safe_decode(r.encode("utf-8", "surrogateescape")) for r in reasons.records)
        if reasons.outcome is Outcome.ANSWER
        else ""
    )
    # A list's reason is a line with a URL; a longer one is cut (the whole is in DNS).
    summary = f"{ip} is LISTED ({listed(listings)})" + (f": {piece(reason, 300)}" if reason else "")
    return check(
        Status.FAIL,
        summary,
        f"find out why (the reason above; an open relay, a compromised account or "
        f"a neighbour on the same network), stop it, then request removal from {zone}"
        + (" at the address in the reason" if "http" in reason else "")
        + "; until then send through a relay",
        shown,
    )


_REFUSALS = {
    "127.255.255.252": (
        "the zone asked is not a name the list serves (Spamhaus's answer to a typing error in it)",
        "check the zone name (doctor.dnsbls, --dnsbl) against the list's documentation",
    ),
    "127.255.255.254": (
        "it does not answer queries relayed by public resolvers",
        "query from your own recursive resolver (not 8.8.8.8, 1.1.1.1 and the like), "
        "or use the list's registered query service",
    ),
    "127.255.255.255": (
        "your resolver sent it too many queries, over its free use limit",
        "use the list's registered query service (for Spamhaus, its Data Query Service), "
        "or a resolver of your own that sends fewer queries",
    ),
}
"""Spamhaus's answers that refuse a query (its "return codes" for errors), each with
what it means and what to do: an unknown 127.255.255.x is taken as the common .254.
Each asks for something else; one piece of advice for all sent an operator with a
mistyped zone or a rate limit to change resolvers, which changed nothing."""


def _no_listing(code: str) -> bool:
    """Whether ``code`` (in 127/8) is an answer lists give for something else than a
    listing: a refused or failed query (127.0.0.1, Spamhaus's 127.255.255.x)."""
    return code == "127.0.0.1" or code.startswith("127.255.255.")


def _in_127(text: str) -> bool:
    try:
        return ipaddress.ip_address(text) in ipaddress.ip_network("127.0.0.0/8")
    except ValueError:
        return False

"""Reading DNS names and answers: what a response says beyond dnspython's answer.

Whether a NoAnswer may be believed as NODATA (:func:`unanswered`: not after a referral or
a truncated answer), whether the resolver validated an answer (:func:`authenticated`),
the name CNAMEs led to (:func:`expanded_name`), a recipient domain as a query name
(:func:`to_qname`), the localhost names no server is asked about
(:func:`localhost_addresses`), and MX exchanges that are no host names
(:func:`numeric_exchange`, :func:`literal_exchange`). Route lookups
(:mod:`mailstrom.routing.lookup`), DANE, MTA-STS, the doctor and the command line share
them.
"""

from __future__ import annotations

import ipaddress

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from mailstrom.dnsanswer import TRUNCATED as TRUNCATED  # re-exported
from mailstrom.dnsanswer import is_truncated
from mailstrom.domains import IDNA
from mailstrom.errors import PermanentFailure

LOCALHOST = dns.name.from_text("localhost.")
LOOPBACK = ("127.0.0.1", "::1")
"""What a name under :data:`LOCALHOST` resolves to (RFC 6761 §6.3), without a query."""


def localhost_addresses(name: dns.name.Name | str) -> tuple[str, ...] | None:
    """:data:`LOOPBACK` when ``name`` is ``localhost`` or a name under it, which are this
    host's own, asked of no server (RFC 6761 §6.3): resolvers disagree on them (NXDOMAIN,
    127.0.0.1, or what a forwarder makes of them), and "MX 0 localhost." says "no mail
    here". None for any other name. The router and the doctor both ask this.

    >>> localhost_addresses("Mail.LocalHost."), localhost_addresses("localhost.example")
    (('127.0.0.1', '::1'), None)
    """
    if isinstance(name, str):
        try:
            name = dns.name.from_text(name, idna_codec=IDNA)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return None
    return LOOPBACK if name.is_subdomain(LOCALHOST) else None


def to_qname(domain: str) -> dns.name.Name:
    """The absolute DNS name for ``domain``; Unicode (IDN) labels become A-labels.

    Raises PermanentFailure (5.1.2) for text that is no valid domain name, and for the
    master-file syntax dnspython reads in it: a backslash, no character of a domain (RFC
    5321 §4.1.2), is an escape there, so that ``exa\\mple.org`` and ``ex\\097mple.org``
    named example.org, and ``@`` alone is the origin, the root.
    """
    text = domain.strip().rstrip(".")
    try:
        if not text:
            raise ValueError("empty domain")
        if "\\" in text:
            raise ValueError("a backslash is no character of a domain name")
        name = dns.name.from_text(text, idna_codec=IDNA)
        if name == dns.name.root:
            raise ValueError("the root is no domain")
        return name.canonicalize()
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise PermanentFailure(
            f"invalid recipient domain {domain!r}: {exc}", enhanced="5.1.2"
        ) from exc


def authenticated(answer: dns.resolver.Answer) -> bool:
    """Whether the resolver set the AD bit on ``answer`` (RFC 4035 §3.2.3: it validated
    it). Believe it only from a resolver trusted to validate (``DNSConfig.dnssec``)."""
    return bool(answer.response.flags & dns.flags.AD)


REFERRAL = "the DNS server answered with a referral (it does not resolve recursively)"
"""What a lookup :func:`unanswered` tells of a referral failed with."""


def unanswered(no_answer: dns.resolver.NoAnswer) -> str | None:
    """Why the response dnspython raised ``no_answer`` for (NOERROR without the records
    asked for) says nothing of whether the records exist: :data:`REFERRAL`
    (:func:`is_referral_response`), :data:`TRUNCATED`, or None when it is NODATA, which may be
    believed. Every lookup that reads NoAnswer as "no such records" asks this first
    (routes, DANE's TLSA, MTA-STS's record and policy host, the command line's checks),
    and fails as for SERVFAIL when it has a reason."""
    return unanswered_response(no_answer.kwargs.get("response"))  # absent when by hand


def unanswered_response(response: object) -> str | None:
    """:func:`unanswered` of a response read without dnspython's NoAnswer.

    A truncated answer (the TC bit) asked again over TCP is read whole there; one that
    is truncated over TCP too (longer than the 64 KiB a TCP message holds, or a broken
    server or middlebox) holds some of the records at most, and none as this server
    truncates (RFC 2181 §9: ignore it). dnspython hands it on as it came, and read as
    NODATA it made a domain one without MX records (mail went to its A record, the
    implicit MX) or without addresses (every recipient failed with 5.4.4). One with
    some of the records is raised as NoAnswer too (:func:`~mailstrom.dnsanswer.whole`)."""
    if is_truncated(response):
        return TRUNCATED
    return REFERRAL if is_referral_response(response) else None


def is_referral_response(response: object) -> bool:
    """Whether ``response`` (NOERROR without the records asked for) is a referral: NS
    records and no SOA in its authority section, not authoritative (RFC 2308 §2.2). A
    server that does not resolve recursively answers so (Windows DNS with recursion off,
    an authoritative server asked about another zone): "ask these servers", which says
    nothing of whether the records exist. NODATA carries an SOA, or no NS records.

    dnspython raises NoAnswer for both; taken for NODATA, a referral made every domain
    one without MX records, then one without addresses: a permanent failure (5.4.4).
    Lookups ask :func:`unanswered`, which asks this."""
    if not isinstance(response, dns.message.Message) or response.flags & dns.flags.AA:
        return False
    types = {rrset.rdtype for rrset in response.authority}
    return dns.rdatatype.NS in types and dns.rdatatype.SOA not in types


def is_literal(domain: str) -> bool:
    """Whether ``domain`` is an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``)."""
    return domain.startswith("[") and domain.endswith("]")


def expanded_name(answers: list[dns.resolver.Answer]) -> str | None:
    """The name ``answers`` (A and AAAA of one name, or its MX records) reached through
    CNAMEs, or None when the name is no alias or the two families disagree (then only the
    name as given is safe to build on). dnspython follows the chain inside the answer the
    server sent, so the expansion costs no query and is bounded by that answer's size."""
    reached = {answer.canonical_name.canonicalize() for answer in answers}
    if len(reached) != 1:
        return None
    (name,) = reached
    if name == answers[0].qname.canonicalize():
        return None
    return name.to_text(omit_final_dot=True)


def numeric_exchange(name: dns.name.Name) -> str | None:
    """The address an MX record's exchange spells, when it is an IP address rather than a
    host name (``MX 10 192.0.2.25``); None for a name.

    RFC 5321 §5.1 wants a name there, but such zones exist, and Postfix uses the address
    (with the warning "numeric domain name in resource data of MX record"). Looked up as a
    name, it has no address records, and its domain's mail would wait until max_age.
    """
    text = name.to_text(omit_final_dot=True)
    if "%" in text:  # a zone index means nothing to another host
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def literal_exchange(name: dns.name.Name) -> bool:
    """Whether an MX record's exchange is written as an address literal
    (``MX 10 [192.0.2.25].``, ``[IPv6:2001:db8::25].``): no host name (RFC 5321 §5.1),
    and no name a DNS lookup can find.

    Postfix skips such a record ("malformed domain name in resource data of MX record")
    and bounces mail of a domain left without any (5.4.4); unlike a numeric exchange
    (:func:`numeric_exchange`), which it uses. Looked up as a name, its A and AAAA
    queries went out for nothing and its domain's mail was deferred until max_age as
    that of a host without an address ("a DNS change in progress"), saying nothing of
    the record."""
    return is_literal(name.to_text(omit_final_dot=True))

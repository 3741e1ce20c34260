"""Domain names as mailstrom is configured with them and writes them into messages.

A leaf module (it imports nothing of mailstrom but the errors) so that the configuration,
the message layer and DKIM can all use it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket

import dns.exception
import dns.name

from mailstrom.message.chars import shorten

IDNA = dns.name.IDNA_2008_Practical
"""The codec every domain name is read with: IDNA 2008 with the UTS #46 mapping, named
rather than left to dnspython's default, which is IDNA 2003 before dnspython 2.9 (there
``Straße.de`` is ``strasse.de``, another domain)."""

PRIVATE_SUFFIXES = frozenset({"localhost", "localdomain", "local", "internal", "lan", "invalid"})
"""Last labels of names that mean something only inside one host or network: localhost
(RFC 6761 §6.3), mDNS's ``local`` (RFC 6762), ``internal`` (set aside for private use by
ICANN in 2024), ``invalid`` (RFC 6761 §6.4), and the ``localdomain`` and ``lan`` that
installers and home routers give machines. ``home.arpa`` (RFC 8375) is checked apart."""


def domain_name(value: object) -> str:
    """``value`` as a lower-case A-label domain name with at least one dot, without the
    final dot: ``"Bücher.Example."`` → ``"xn--bcher-kva.example"``.

    Raises :class:`ValueError` saying why for anything else (an address literal, a name
    with an empty or over-long label, a single label, white space, a character no
    Message-ID's domain can hold such as ``,`` or ``:``).
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a domain name, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("[") or not text.strip("."):
        raise ValueError(f"not a domain name: {shown(value)}")
    name = dns_name(value)
    # RFC 5322 specials (§3.2.3) that dnspython does not escape with a backslash: none can
    # be in a Message-ID's id-right (§3.6.4), which prepare() refuses ("a,b.example").
    if any(c in name for c in " \t\\@<>,:[]") or "." not in name:
        raise ValueError(f"not a fully qualified domain name: {shown(value)}")
    return name.lower()


def dns_name(value: str) -> str:
    """``value`` as dnspython writes the name, without the final dot. Raises
    :class:`ValueError` saying why when DNS cannot hold it: an empty label, a label of
    more than 63 octets, a name of more than 255 (RFC 1035 §2.3.4).
    """
    try:
        name: str = dns.name.from_text(value.strip(), idna_codec=IDNA).to_text(omit_final_dot=True)
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise ValueError(f"not a domain name: {shown(value)} ({exc})") from None
    return name


def a_label(name: str) -> str:
    """``name`` in lower case with its U-labels as A-labels: ``"Straße.de"`` →
    ``"xn--strae-oqa.de"``; an ASCII name is only lowered, a final dot kept off if absent.

    IDNA 2008 with the UTS #46 mapping, as email-validator spells a recipient's domain
    and dnspython the names routing looks up. Not the standard library's ``"idna"``
    codec: that is IDNA 2003, which maps ``ß`` to ``ss`` and so names another domain.
    Raises :class:`ValueError` for a name that has no A-label form.

    >>> a_label("Straße.DE"), a_label("Example.COM")
    ('xn--strae-oqa.de', 'example.com')
    """
    if name.isascii():
        return name.lower()
    try:
        text: str = dns.name.from_text(name, origin=None, idna_codec=IDNA).to_text(
            omit_final_dot=True
        )
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise ValueError(f"no A-label form for {shown(name)} ({exc})") from None
    return text.lower()


def ldh_domain_name(value: object) -> str:
    """``value`` as :func:`domain_name` gives it, but only if it is an RFC 5321 §4.1.2
    ``Domain``: labels of letters, digits and inner hyphens, at most :data:`MAX_DOMAIN`
    characters in all (a U-label is taken in the A-label form :func:`domain_name` makes).

    :func:`domain_name` takes whatever DNS can hold (``ex=ample.com``), as a Message-ID's
    domain may be; DKIM's ``d=`` (RFC 6376 §3.5 takes RFC 5321's ``Domain``) and the
    domain ``mailstrom doctor`` judges must be this.

    >>> ldh_domain_name("Bücher.Example.")
    'xn--bcher-kva.example'
    >>> ldh_domain_name("ex=ample.com")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: not a letter-digit-hyphen domain name: 'ex=ample.com' (label 'ex=ample' is ...)
    """
    if isinstance(value, str) and value.isascii():
        # Judged as written, before dnspython reads "\\065" as "A" or ";" as a character
        # to escape, so the message names what is wrong.
        problem = _name_problem(value.strip().removesuffix("."))
        if problem is not None:
            raise ValueError(f"not a letter-digit-hyphen domain name: {shown(value)} ({problem})")
    name = domain_name(value)
    problem = _name_problem(name)  # a U-label's A-label form
    if problem is not None:
        raise ValueError(f"not a letter-digit-hyphen domain name: {shown(value)} ({problem})")
    return name


def shown(value: object, limit: int = 80) -> str:
    """``value`` quoted for an error message and cut to about ``limit`` characters
    (:func:`~mailstrom.message.chars.shorten`); a value that is no string by its type's
    name."""
    if not isinstance(value, str):
        return type(value).__name__
    return shorten(value, limit)


_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
MAX_DOMAIN = 253
"""Characters of a domain name written without the final dot: 255 octets on the wire
(RFC 1035 §2.3.4) hold 253 in text."""
FALLBACK_HELO_NAME = "localhost"
"""EHLO name when the machine's own name is not a valid domain (see
:func:`default_helo_name`)."""


def helo_name_problem(value: object) -> str | None:
    """Why ``value`` cannot be sent in EHLO, or None when it can: it must be an RFC 5321
    §4.1.2 ``Domain`` (letter-digit-hyphen labels of at most 63 octets, at most 253 in all,
    no final dot; U-labels allowed, as the session sends their IDNA form) or an address
    literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``, §4.1.3).

    >>> helo_name_problem("mail.example.com") is None, helo_name_problem("[IPv6:::1]") is None
    (True, True)
    >>> helo_name_problem("mail@example.com")
    "label 'mail@example' is not letters, digits and inner hyphens"
    """
    if not isinstance(value, str):
        return f"expected a string, not {type(value).__name__}"
    if value.startswith("["):
        return _literal_problem(value)
    name = value
    if not name.isascii():
        try:
            name = a_label(name)  # what smtp/session.py sends for a U-label name
        except ValueError:
            return "not a valid internationalized domain name"
    return _name_problem(name)


def _name_problem(name: str) -> str | None:
    """Why ``name`` (ASCII, no final dot) is not letter-digit-hyphen labels, or None."""
    if not name or len(name) > MAX_DOMAIN:
        return f"expected 1 to {MAX_DOMAIN} characters, got {len(name)}"
    for label in name.split("."):
        if not label:
            return "empty label (two dots, or a dot at either end)"
        if len(label) > 63:
            return f"label {label[:20]!r}... has {len(label)} characters; at most 63"
        if not _LDH_LABEL.match(label):
            return f"label {label!r} is not letters, digits and inner hyphens"
    last = name.rpartition(".")[2]
    if last.isdigit():
        # No top-level label is all digits (RFC 1123 §2.1, RFC 3696 §2): "192.0.2.1" is an
        # address written bare, which names no host; EHLO takes it as [192.0.2.1] (§4.1.3).
        return f"last label {last!r} is all digits: an IP address is no host name"
    return None


def literal_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an RFC 5321 §4.1.3 address literal names, or None when ``text`` is none:
    ``[192.0.2.1]`` is IPv4, ``[IPv6:2001:db8::1]`` (tag in any case) IPv6. An untagged
    IPv6 address, a tagged IPv4 one or a zone index (which means nothing to another host)
    is no literal.

    >>> literal_address("[IPv6:::1]"), literal_address("[IPv6:192.0.2.1]")
    (IPv6Address('::1'), None)
    """
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            if "%" in inner:
                return None
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def _literal_problem(text: str) -> str | None:
    if literal_address(text) is None:
        return "not an address literal like [192.0.2.1] or [IPv6:2001:db8::1]"
    return None


def default_helo_name() -> str:
    """The machine's fully qualified name (``socket.getfqdn()``) when it is a valid EHLO
    domain, else :data:`FALLBACK_HELO_NAME`: a host named ``my_laptop`` must not make every
    ``Config()`` fail, and a name servers would refuse is no better than ``localhost``."""
    name = socket.getfqdn()
    return name if helo_name_problem(name) is None else FALLBACK_HELO_NAME


@functools.lru_cache(maxsize=1024)
def is_public_name(domain: str) -> bool:
    """True when ``domain`` is a fully qualified name that can mean the same thing on every
    host: not an address literal, not a single label, not under :data:`PRIVATE_SUFFIXES`
    or ``home.arpa``.

    >>> is_public_name("mail.example.com"), is_public_name("localhost"), is_public_name("db.lan")
    (True, False, False)
    """
    try:
        name = domain_name(domain)
    except ValueError:
        return False
    return name.rpartition(".")[2] not in PRIVATE_SUFFIXES and not (
        name == "home.arpa" or name.endswith(".home.arpa")
    )

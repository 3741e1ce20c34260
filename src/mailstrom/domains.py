"""Domain names as mailstrom is configured with them and writes them into messages.

A leaf module (it imports nothing of mailstrom but the errors) so that the configuration,
the message layer and DKIM can all use it.
"""

from __future__ import annotations

import functools

import dns.exception
import dns.name

PRIVATE_SUFFIXES = frozenset({"localhost", "localdomain", "local", "internal", "lan", "invalid"})
"""Last labels of names that mean something only inside one host or network: localhost
(RFC 6761 §6.3), mDNS's ``local`` (RFC 6762), ``internal`` (set aside for private use by
ICANN in 2024), ``invalid`` (RFC 6761 §6.4), and the ``localdomain`` and ``lan`` that
installers and home routers give machines. ``home.arpa`` (RFC 8375) is checked apart."""


def domain_name(value: object) -> str:
    """``value`` as a lower-case A-label domain name with at least one dot, without the
    final dot: ``"Bücher.Example."`` → ``"xn--bcher-kva.example"``.

    Raises :class:`ValueError` saying why for anything else (an address literal, a name
    with an empty or over-long label, a single label, white space).
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a domain name, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("[") or not text.strip("."):
        raise ValueError(f"not a domain name: {value!r}")
    try:
        name: str = dns.name.from_text(text).to_text(omit_final_dot=True)
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise ValueError(f"not a domain name: {value!r} ({exc})") from None
    if any(c in name for c in " \t\\@<>") or "." not in name:
        raise ValueError(f"not a fully qualified domain name: {value!r}")
    return name.lower()


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

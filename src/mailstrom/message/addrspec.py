"""One addr-spec, validated once: syntax by ``email-validator``, plus what SMTP can carry.

``email-validator`` is the authority on syntax (never DNS). Its domain check is the
expensive part (IDNA, UTS-46, special-use names) and depends on the domain alone, so its
verdict is cached per domain; a plain ASCII dot-atom local part, which email-validator
accepts unchanged, is then checked here with the same regular expression. Anything else
(quoted or non-ASCII local parts) goes to ``validate_email`` whole.

On top of syntax, an address is refused when SMTP could not carry it as given, so that
one bad address fails at submission instead of in the worker (where it would block every
recipient at its domain):

- a local part over 64 octets (RFC 5321 §4.5.3.1.1);
- a quoted-pair other than ``\\`` + printable ASCII (RFC 5321 ``quoted-pairSMTP`` is
  ``%d92 %d32-126``; RFC 6531 does not extend it);
- ``<`` or ``>`` in a quoted local part: valid in RFC 5321 but refused by our SMTP
  session's path encoder (and mis-parsed by many servers);
- an RFC 2047 encoded word anywhere in the local part (RFC 2047 §5 forbids them in an
  addr-spec; the stdlib parser would decode ``=?utf-8?q?a?=b`` into ``ab``).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailstrom.errors import InvalidAddress
from mailstrom.message.chars import shorten

if TYPE_CHECKING:
    from email_validator import ValidatedEmail

# email-validator is imported where an address is first validated, not with this module:
# it costs ~20 ms and a process that only delivers queued mail never validates one.

MAX_LOCAL_PART = 64
"""Octets in a local part (RFC 5321 §4.5.3.1.1)."""
MAX_ADDRESS = 254
"""Octets in an addr-spec: a 256-octet path less its angle brackets (RFC 5321 §4.5.3.1.3)."""


_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")


@functools.cache
def _role_names() -> frozenset[str]:
    from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

    return frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


@dataclass(frozen=True, slots=True)
class ValidAddress:
    """An addr-spec that passed every check, in the forms the message needs."""

    envelope: str
    """``local@domain`` for MAIL/RCPT: the domain as a lower-case A-label."""
    header: str
    """The addr-spec as a generated header writes it: with an ASCII local part the domain
    is an A-label (an RFC 2047 word is not allowed in an addr-spec, RFC 2047 §5); with a
    UTF-8 local part the message needs SMTPUTF8 anyway and a Unicode domain is its U-labels
    (NFC, lower case, dots for ``。``: what IDNA 2008 maps it to; as typed, a reader would
    see another domain, or none). An ASCII domain stays as given."""
    smtputf8: bool
    """The local part is not ASCII (RFC 6531 §3.3)."""
    written: str
    """``local@domain`` as it was given."""


def envelope_key(address: str) -> tuple[str, str]:
    """What tells two envelope addresses apart: the local part exactly, the domain
    without case (RFC 5321 §2.4)."""
    local, _, domain = address.rpartition("@")
    return local, domain.lower()


def validate_address(text: str) -> ValidAddress:
    """Validate ``local@domain`` (no display name, no comments).

    >>> validate_address("Bob@Bücher.Example").envelope
    'Bob@xn--bcher-kva.example'
    """
    local, at, domain = text.rpartition("@")
    if not at:
        raise InvalidAddress(f"invalid address {shorten(text)}: it has no @-sign", address=text)
    return validate(local, domain)


@functools.lru_cache(maxsize=16384)
def validate(local: str, domain: str) -> ValidAddress:
    """Validate the addr-spec ``local@domain`` as written (a quoted local part keeps its
    quotes) and return its forms; :class:`InvalidAddress` with the reason otherwise."""
    from email_validator import EmailNotValidError

    address = f"{local}@{domain}"
    opening = local.find("=?")
    # "=?" and a later "?=": two finds, where a regular expression (=\?.*\?=) ran to
    # the end and back from every "=?" (60,000 characters of "=?a": 6 s).
    if opening != -1 and local.find("?=", opening + 2) != -1:
        raise _invalid(address, "an RFC 2047 encoded word may not appear in an addr-spec")
    if local.startswith('"'):
        _check_quoted_pairs(address, local)
    unicode_domain = domain  # only used when the local part is UTF-8: set below then
    try:
        if _DOT_ATOM.fullmatch(local):
            # What validate_email does for a dot-atom local part, without its domain cost.
            ascii_domain, longest = _domain(domain)
            lower = local.lower()
            normal = lower if lower in _role_names() else local
            # The local part is ASCII here: its octets are its characters.
            if len(local) + 1 + longest > MAX_ADDRESS:
                raise _invalid(address, f"it is longer than {MAX_ADDRESS} octets")
        else:
            valid = _validate_email(address)
            normal, ascii_domain = valid.local_part, valid.ascii_domain
            unicode_domain = valid.domain
    except EmailNotValidError as exc:
        raise _invalid(address, str(exc)) from None
    if len(normal.encode("utf-8")) > MAX_LOCAL_PART:
        raise _invalid(
            address,
            f"the part before the @-sign is {len(normal.encode('utf-8'))} octets; SMTP "
            f"allows {MAX_LOCAL_PART} (RFC 5321 §4.5.3.1.1)",
        )
    if "<" in normal or ">" in normal:
        raise _invalid(address, "'<' and '>' cannot be sent in an SMTP path, even quoted")
    utf8 = not normal.isascii()
    if not ascii_domain.startswith("["):
        # An address literal comes normalised ([IPv6:2001:db8::1]) and keeps its tag's
        # case: email-validator before 2.4 refuses [ipv6:...] when the address comes back.
        ascii_domain = ascii_domain.lower()
        if ascii_domain.rpartition(".")[2].isdigit():
            raise _invalid(address, _numeric_domain(normal, ascii_domain))
    header_domain = domain if domain.isascii() else unicode_domain if utf8 else ascii_domain
    return ValidAddress(
        envelope=f"{normal}@{ascii_domain}",
        header=f"{normal}@{header_domain}",
        smtputf8=utf8,
        written=address,
    )


@functools.lru_cache(maxsize=8192)
def _domain(domain: str) -> tuple[str, int]:
    """(A-label form of a domain, octets of the longest of its forms: as given, normalised
    Unicode, A-label); EmailNotValidError if bad."""
    valid = _validate_email(f"x@{domain}")
    forms = (domain, valid.domain, valid.ascii_domain)
    return valid.ascii_domain, max(len(form.encode("utf-8")) for form in forms)


def _validate_email(address: str) -> ValidatedEmail:
    from email_validator import validate_email

    return validate_email(
        address,
        check_deliverability=False,
        allow_smtputf8=True,
        allow_quoted_local=True,
        allow_domain_literal=True,
        # Syntax only: a dotless or `.test` domain is well-formed; whether it can be
        # reached is the router's question, answered by DNS at delivery time.
        globally_deliverable=False,
        test_environment=True,
    )


def _numeric_domain(local: str, domain: str) -> str:
    """Why ``domain``, whose last label is all digits, names no host. No top-level domain
    is all digits (RFC 1123 §2.1, RFC 3696 §2): email-validator takes one when it checks
    syntax alone, and the worker then looked the name up and failed it as NXDOMAIN."""
    try:
        ip = ipaddress.IPv4Address(domain)
    except ValueError:
        return (
            f"the domain's last label {domain.rpartition('.')[2]!r} is all digits, and no "
            "top-level domain is (RFC 1123 §2.1, RFC 3696 §2)"
        )
    return (
        f"{domain} is an IP address written as a domain name, which names no host; an "
        f"address at an IP address is written with brackets: {local}@[{ip}] (RFC 5321 §4.1.3)"
    )


def _check_quoted_pairs(address: str, local: str) -> None:
    index = local.find("\\")
    while index != -1:
        escaped = local[index + 1 : index + 2]
        if not escaped or not " " <= escaped <= "~":
            raise _invalid(
                address,
                f"the quoted-pair '\\{escaped}' is not allowed in SMTP: only printable ASCII "
                "may follow a backslash (RFC 5321 §4.1.2 quoted-pairSMTP)",
            )
        index = local.find("\\", index + 2)


def _invalid(address: str, why: str) -> InvalidAddress:
    return InvalidAddress(f"invalid address {shorten(address)}: {why}", address=address)

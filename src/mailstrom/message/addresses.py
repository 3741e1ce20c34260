"""Addresses: parsing header address lists, validating addr-specs, envelope forms.

Header syntax (display names, groups, comments) is parsed by the stdlib header registry;
each addr-spec is then checked by ``email-validator`` (syntax only, never DNS).

The *envelope form* of an address is ``local-part@domain`` with the domain as an
A-label (punycode), lower-cased. Routing needs the ASCII domain for DNS anyway, and it
means an IDN domain with an ASCII local part never needs SMTPUTF8; only a non-ASCII local
part does (RFC 6531 §3.3).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from email import errors as email_errors
from email.header import Header
from email.headerregistry import Address, AddressHeader, BaseHeader, Group
from typing import cast

from email_validator import EmailNotValidError, validate_email

from mailstrom.errors import HeaderInjection, InvalidAddress
from mailstrom.message.policies import HEADER_FACTORY

ADDRESS_FIELDS = ("from", "sender", "reply-to", "to", "cc", "bcc")
"""Header fields whose values are address lists (lower-case)."""


def check_no_line_breaks(field: str, value: str) -> None:
    """Raise :class:`HeaderInjection` if ``value`` of header ``field`` holds CR or LF."""
    if "\r" in value or "\n" in value:
        raise HeaderInjection(
            f"{field} header value contains a CR or LF character: {value!r}", header=field
        )


_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
"""RFC 5322 §3.2.3 atext, one or more."""

# The common shapes "local@domain" and "Plain Name <local@domain>", which need no parser.
_ATOMS = rf"{_ATEXT}(?:\.{_ATEXT})*"
_SIMPLE = re.compile(
    rf"(?:(?P<name>[A-Za-z0-9]+(?: [A-Za-z0-9]+)*) <(?P<l1>{_ATOMS})@(?P<d1>{_ATOMS})>"
    rf"|(?P<l2>{_ATOMS})@(?P<d2>{_ATOMS}))"
)


@functools.lru_cache(maxsize=4096)
def parse_address_list(field: str, value: str) -> tuple[Group, ...]:
    """Parse one address-list header value into groups (lone mailboxes are nameless groups).

    Raises :class:`InvalidAddress` when the stdlib parser reports the value as malformed
    (for instance an unquoted comma in a display name), since guessing could send mail to
    the wrong place. Results are cached: senders repeat the same few addresses, and the
    stdlib parser costs a few hundred microseconds per call.
    """
    # Parsers see values unfolded, as the stdlib's own header_fetch_parse does.
    unfolded = value.replace("\r\n", "").replace("\n", "")
    simple = _SIMPLE.fullmatch(unfolded.strip())
    if simple is not None:
        if simple["name"] is not None:
            box = Address(simple["name"], simple["l1"], simple["d1"])
        else:
            box = Address("", simple["l2"], simple["d2"])
        return (Group(None, [box]),)
    try:
        header = HEADER_FACTORY(field, unfolded)
    except Exception as exc:  # the stdlib parser can crash on malformed input (a@)
        raise InvalidAddress(
            f"{field} header cannot be parsed ({exc!r}): {value!r}", address=value
        ) from exc
    assert isinstance(header, AddressHeader)
    return checked_groups(field, header, original=unfolded)


def checked_groups(
    field: str, header: AddressHeader, *, original: str | None = None
) -> tuple[Group, ...]:
    """The groups of a parsed address header; :class:`InvalidAddress` if it is malformed.

    The error quotes ``original`` (what the user wrote) when given: the parsed header's
    own rendering of a malformed value can be unrecognisable (``<>`` for ``a@@b``).
    """
    # At run time every registry header is also a BaseHeader; the stubs cannot say so.
    for defect in cast(BaseHeader, header).defects:
        if isinstance(defect, email_errors.InvalidHeaderDefect):
            shown = original if original is not None else str(header)
            raise InvalidAddress(
                f"{field} header is malformed ({defect}): {shown!r}", address=shown
            )
    return header.groups


@functools.lru_cache(maxsize=4096)
def envelope_form(address: str) -> str:
    """Validate one addr-spec and return its envelope form (``local@a-label-domain``).

    >>> envelope_form("Bob@Bücher.Example")
    'Bob@xn--bcher-kva.example'

    The local part keeps its case (RFC 5321 §2.4); the domain is lower-cased. Raises
    :class:`InvalidAddress` with email-validator's explanation when the syntax is wrong.
    """
    check_no_line_breaks("address", address)
    try:
        valid = validate_email(
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
    except EmailNotValidError as exc:
        raise InvalidAddress(f"invalid address {address!r}: {exc}", address=address) from exc
    return f"{valid.local_part}@{valid.ascii_domain.lower()}"


def mailboxes(groups: Iterable[Group]) -> list[Address]:
    """All mailboxes of ``groups``, group members included, in order."""
    return [address for group in groups for address in group.addresses]


def needs_smtputf8(envelope_address: str) -> bool:
    """True when an envelope address has a non-ASCII local part (RFC 6531)."""
    return not envelope_address.isascii()


def for_header(address: Address) -> Address:
    """The mailbox as it should appear in a header generated without SMTPUTF8.

    With an ASCII local part the domain is written as its A-label, because the stdlib
    would otherwise encode the U-label as an RFC 2047 word, which is not allowed inside
    an addr-spec. A non-ASCII local part is kept as is (the message then needs SMTPUTF8).
    """
    if not address.username.isascii() or address.domain.isascii():
        return address
    domain = envelope_form(address.addr_spec).rpartition("@")[2]
    return Address(display_name=address.display_name, username=address.username, domain=domain)


def dedupe(addresses: Iterable[str]) -> tuple[str, ...]:
    """Drop repeated envelope addresses, first seen wins.

    The domain is compared case-insensitively, the local part exactly (RFC 5321 §2.4).
    Envelope forms already have lower-case domains, but callers may pass others.
    """
    seen: set[tuple[str, str]] = set()
    kept: list[str] = []
    for address in addresses:
        local, _, domain = address.rpartition("@")
        key = (local, domain.lower())
        if key not in seen:
            seen.add(key)
            kept.append(f"{local}@{domain.lower()}")
    return tuple(kept)


# RFC 5322 atext plus space: a display name made only of these needs no quoting.
_PLAIN_PHRASE = re.compile(rf"{_ATEXT}(?: {_ATEXT})*")
_FOLD_AT = 78
"""Preferred line length (RFC 5322 §2.1.1 SHOULD)."""


def format_address_field(name: str, groups: Sequence[Group], *, utf8: bool) -> str:
    """Render an address header line (without the final CRLF), folded near 78 octets.

    Written here rather than by the stdlib policy because Python 3.11's folder can put the
    separating comma inside an RFC 2047 word when it folds a list with encoded display
    names, silently merging two addresses. Non-ASCII display names become RFC 2047
    words of at most 76 characters, or stay raw UTF-8 when ``utf8`` (RFC 6532).
    """
    tokens: list[str] = []
    for group in groups:
        boxes = [_mailbox(box, utf8=utf8) for box in group.addresses]
        if group.display_name is None:
            tokens.extend(boxes)
        elif not boxes:
            tokens.append(f"{_phrase(group.display_name, utf8=utf8)}:;")
        else:
            boxes[0] = f"{_phrase(group.display_name, utf8=utf8)}: {boxes[0]}"
            boxes[-1] += ";"
            tokens.extend(boxes)
    done: list[str] = []
    line = f"{name}:"
    for index, token in enumerate(tokens):
        first_segment = token.split("\r\n", 1)[0]
        if index > 0 and len(line) + 2 + len(first_segment) > _FOLD_AT:
            done.append(line + ",")
            line = " " + token
        else:
            line += (", " if index > 0 else " ") + token
        if "\r\n" in token:
            # A long encoded display name spans lines; keep measuring from its last one.
            head, _, line = line.rpartition("\r\n")
            done.append(head)
    done.append(line)
    return "\r\n".join(done)


def _mailbox(box: Address, *, utf8: bool) -> str:
    if not box.display_name:
        return box.addr_spec
    return f"{_phrase(box.display_name, utf8=utf8)} <{box.addr_spec}>"


def _phrase(text: str, *, utf8: bool) -> str:
    # "=?" would be read as the start of an RFC 2047 word, so such text gets quoted.
    if _PLAIN_PHRASE.fullmatch(text) and "=?" not in text:
        return text
    printable = all(" " <= ch != "\x7f" for ch in text)
    if printable and (text.isascii() or utf8):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return Header(text, "utf-8").encode(linesep="\r\n", maxlinelen=76)

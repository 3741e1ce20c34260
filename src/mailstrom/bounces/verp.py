"""VERP: an envelope sender per recipient, so a bounce names what bounced.

An ``envelope_from`` holding ``{token}`` in its local part
(``bounces+{token}@example.com``; no hex digit next to it, see
:func:`check_verp_template`) is a template: each recipient gets its own envelope sender
with ``{token}`` replaced by ``<message id>-<digest>``, the message's 32-hex-digit id and
ten hex digits of a BLAKE2s digest of the recipient's lower-cased address, keyed with the
store's secret (:meth:`~mailstrom.stores.base.Store.verp_key`). A bounce sent to that
address (or an ARF report quoting it as ``Original-Mail-From``) then says which message
and which recipient failed, however the receiving system rewrote the recipient's address.
The token is 43 characters: with ``bounces+`` and the local part stays within RFC 5321's
64 octets.

The key is what makes a token evidence: every recipient sees their own envelope sender
(``Return-Path``) and the message id in it (it is in the Message-ID header too), and the
other recipients in To and Cc. Unkeyed, a digest of a co-recipient's address could be
computed by any of them, and a bounce forged with it would fail and suppress that
co-recipient. Keyed, only the store can make a token, so a report that carries a valid
one came back from the envelope sender that recipient's copy was sent with.

Since the envelope sender differs per recipient, each recipient of a VERP message is its
own SMTP transaction (the worker splits such work items; see :func:`per_recipient`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace

from mailstrom.errors import InvalidAddress
from mailstrom.message.addrspec import MAX_ADDRESS, MAX_LOCAL_PART
from mailstrom.stores.base import Lease, WorkItem

TOKEN_FIELD = "{token}"  # noqa: S105 (a placeholder, not a secret)
_TOKEN_LENGTH = 43
_TOKEN = re.compile(r"(?<![0-9a-f])([0-9a-f]{32})-([0-9a-f]{10})(?![0-9a-f])")
# What _TOKEN must not see next to a token (texts are lower-cased before it reads them).
_HEX_END = re.compile(r"[0-9a-fA-F]\Z")
_HEX_START = re.compile(r"[0-9a-fA-F]")


def is_verp_template(envelope_from: str) -> bool:
    """Whether ``envelope_from`` asks for a per-recipient envelope sender."""
    return TOKEN_FIELD in envelope_from


def check_verp_template(envelope_from: str) -> None:
    """Raise :class:`~mailstrom.errors.InvalidAddress` unless ``envelope_from`` holds
    ``{token}`` once, in its local part, not next to a hex digit, and once the token is
    in, that local part stays within 64 octets and the address within 254."""
    local, at, _ = envelope_from.rpartition("@")
    if not at or envelope_from.count(TOKEN_FIELD) != 1 or TOKEN_FIELD not in local:
        raise InvalidAddress(
            "a VERP envelope sender needs {token} once, in its local part "
            "(bounces+{token}@example.com)",
            address=envelope_from,
        )
    before, _, after = local.partition(TOKEN_FIELD)
    if _HEX_END.search(before) or _HEX_START.match(after):
        # find_tokens() reads a token only where no hex digit touches it (so that it is
        # not read out of a longer hex string): the bounces would never match.
        raise InvalidAddress(
            "a VERP envelope sender needs a character other than a hex digit (0-9, a-f) "
            "on each side of {token} (bounces+{token}@example.com)",
            address=envelope_from,
        )
    grows = _TOKEN_LENGTH - len(TOKEN_FIELD)
    # "surrogatepass": a lone surrogate, which no address may hold, raised
    # UnicodeEncodeError here, before prepare() refuses it as ForbiddenCharacter, as it
    # does in an envelope sender without {token}. Counted as the three octets it takes.
    size = len(_octets(local)) + grows
    if size > MAX_LOCAL_PART:
        raise InvalidAddress(
            f"the VERP local part would be {size} octets with its token; at most {MAX_LOCAL_PART}",
            address=envelope_from,
        )
    # The template was validated as an address of its own length: with its token, one
    # of a long domain could pass the 256 octets of an SMTP path (RFC 5321 §4.5.3.1.3),
    # and every envelope sender made of it too.
    size = len(_octets(envelope_from)) + grows
    if size > MAX_ADDRESS:
        raise InvalidAddress(
            f"the VERP envelope sender would be {size} octets with its token; "
            f"at most {MAX_ADDRESS}",
            address=envelope_from,
        )


def _octets(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def address_digest(message_id: str, address: str, *, key: bytes) -> str:
    """Ten hex digits standing for ``address`` (case-insensitive) as a recipient of
    ``message_id``: a BLAKE2s MAC under ``key``, so a token is good for one message only
    and nobody without the key can make one."""
    if not key:  # without one, anybody could make a token
        raise ValueError("a VERP token needs the store's VERP key")
    data = f"{message_id.lower()}\0{address.lower()}".encode()
    return hashlib.blake2s(data, digest_size=5, key=key).hexdigest()


def recipient_token(message_id: str, address: str, *, key: bytes) -> str:
    """The token of one recipient of one message, under the store's VERP ``key``.

    >>> recipient_token("0190f3a2c4e1b7d08a4f2c6e9b1d3f57", "bob@example.org", key=b"k")[:33]
    '0190f3a2c4e1b7d08a4f2c6e9b1d3f57-'
    """
    return f"{message_id}-{address_digest(message_id, address, key=key)}"


def verp_address(template: str, message_id: str, address: str, *, key: bytes) -> str:
    """``template`` with ``{token}`` replaced for this recipient of this message."""
    return template.replace(TOKEN_FIELD, recipient_token(message_id, address, key=key))


def wants_verp_key(lease: Lease) -> bool:
    """Whether a message of ``lease`` has a VERP template as its envelope sender."""
    return any(is_verp_template(item.envelope_from) for item in lease.items)


def per_recipient(item: WorkItem, *, key: bytes) -> list[WorkItem]:
    """``item`` as transactions: itself, or one item per recipient with its own VERP
    envelope sender (tokens under ``key``) when its envelope sender is a template."""
    if TOKEN_FIELD not in item.envelope_from:
        return [item]
    return [
        replace(
            item,
            envelope_from=verp_address(item.envelope_from, item.message_id, r.address, key=key),
            recipients=(r,),
        )
        for r in item.recipients
    ]


def is_verp_address(address: str) -> bool:
    """Whether ``address`` holds a token: the return path of one recipient of one message
    (a bounce notice goes there). Suppressing it, as a hard bounce of a notice or a
    report about one would, adds an entry without an end, never pruned, that fails the
    next notice to it unsent (a recipient's delay warning and its failure notice go to
    the same address). Older versions wrote such entries; the upgrade to SQLite schema
    15 (PostgreSQL 17) drops them."""
    return _TOKEN.search(address.lower()) is not None


def find_tokens(texts: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Every (message id, address digest) a token in ``texts`` names, in order, once."""
    seen: set[tuple[str, str]] = set()
    for text in texts:
        for match in _TOKEN.finditer(text.lower()):
            pair = (match.group(1), match.group(2))
            if pair not in seen:
                seen.add(pair)
                yield pair

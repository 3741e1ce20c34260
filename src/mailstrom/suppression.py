"""The suppression list: addresses and domains that mail is not sent to again.

An entry is kept in the store, so every worker of a queue shares it. The worker looks up
the recipients of each lease (one query per lease, by primary key) and fails a suppressed
recipient at once with the reason ``suppressed since <date>: <original reply>``, without a
connection; the other recipients of the message go on. Entries come from hard bounces the
worker sees (:attr:`~mailstrom.config.Config.suppress_on`), from asynchronous bounces and
complaints read by ``mailstrom bounce``, and from operators (``mailstrom suppress add``,
:meth:`~mailstrom.Mailstrom.suppress`).

A target is a whole address (``bob@example.org``) or a domain (``example.org``: every
address there). Both are kept lower-cased: local parts are case-sensitive in theory, but
no large mailbox provider treats them so, and a list that missed ``Bob@`` after a bounce
for ``bob@`` would be no list at all. A UTF-8 local part is kept in NFC, as ``prepare()``
stores it. A domain is kept as its A-labels
(``xn--bcher-kva.example`` for ``bücher.example``), the form ``prepare()`` stores
recipients in, since the lookup compares strings. A quoted local part is kept as
``prepare()`` stores it too: quoted only where it must be (``"john doe"@example.com``,
``"a@b"@example.org``), so ``"john"@example.com`` is ``john@example.com`` (RFC 5321
§4.1.2 makes them one mailbox).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from mailstrom.bounds import EARLIEST_TIME, LATEST_TIME
from mailstrom.domains import a_label
from mailstrom.errors import InvalidAddress, InvalidSuppression
from mailstrom.safetext import is_safe

MAX_TARGET = 320
"""Octets of an address (64 for the local part, "@", 255 for the domain) or a domain."""
MAX_REPLY = 2048
"""Characters of an entry's reply or note (as much as a recipient's reply keeps)."""


class SuppressionSource(StrEnum):
    """Why a target is on the list (the values are what the stores write)."""

    HARD_BOUNCE = "hard_bounce"
    """The receiving server refused the address permanently during delivery."""
    ASYNC_BOUNCE = "async_bounce"
    """A delivery status notification came back after the server had accepted the mail."""
    COMPLAINT = "complaint"
    """The recipient marked the mail as spam (an ARF feedback report)."""
    MANUAL = "manual"
    """An operator or the application added it."""


BYPASSABLE = frozenset({SuppressionSource.HARD_BOUNCE, SuppressionSource.ASYNC_BOUNCE})
"""The sources whose entries a lane may send past
(:attr:`~mailstrom.config.Lane.bypass_suppression`): bounces, which say the address did
not work then, never a complaint or an operator's entry (an unsubscribe, a block), which
say that the recipient or the operator wants no mail."""


def check_reply(reply: str, *, what: str = "the reply", line: int | None = None) -> str:
    """``reply``, an entry's reason as someone gave it, when it is at most
    :data:`MAX_REPLY` characters of text without control characters but TAB and LF (it is
    shown in status lines and bounce reasons, and a NUL cannot be stored in PostgreSQL;
    LF is how a multi-line SMTP reply is kept, so an exported entry imports again);
    :class:`~mailstrom.errors.InvalidSuppression` otherwise."""
    if not isinstance(reply, str):
        raise InvalidSuppression(f"{what} must be a string, not {type(reply).__name__}", line=line)
    if len(reply) > MAX_REPLY:
        raise InvalidSuppression(f"{what} is longer than {MAX_REPLY} characters", line=line)
    if not is_safe(reply.replace("\n", " ")):
        raise InvalidSuppression(f"{what} holds control characters: {reply[:60]!r}", line=line)
    return reply


def check_entry_time(when: datetime, *, what: str, line: int | None = None) -> datetime:
    """``when`` (timezone-aware) when a store gives it back as it was: from 1900 to before
    9000 (:data:`~mailstrom.bounds.LATEST_TIME`); an entry kept with an ``expires_at`` of
    9999-12-31 (another system's "never") read back as unreadable, its time lost.
    :class:`~mailstrom.errors.InvalidSuppression` otherwise."""
    if not EARLIEST_TIME <= when < LATEST_TIME:
        raise InvalidSuppression(
            f"{what} {when.isoformat()} is outside the times kept "
            f"({EARLIEST_TIME.year} to {LATEST_TIME.year - 1}; no time means never)",
            line=line,
        )
    return when


def normalize_target(text: str) -> str:
    """``text`` as a suppression target: an address or a domain, stripped and lower-cased,
    the domain as A-labels (IDNA 2008, :func:`~mailstrom.domains.a_label`).

    Raises :class:`~mailstrom.errors.InvalidSuppression` for anything else.

    >>> normalize_target(" Bob@Example.ORG ")
    'bob@example.org'
    >>> normalize_target("example.org")
    'example.org'
    >>> normalize_target("Jörg@Bücher.example")
    'jörg@xn--bcher-kva.example'
    """
    if not isinstance(text, str):
        # None, bytes or a list name no address: say which type, never its repr.
        raise InvalidSuppression(
            f"an address or domain must be a string, not {type(text).__name__}"
        )
    target = _folded(text.strip())
    if target.startswith("<") and target.endswith(">"):
        target = target[1:-1].strip()
    if not target:
        raise InvalidSuppression("an empty address or domain")
    if len(target.encode("utf-8", "surrogatepass")) > MAX_TARGET:
        raise InvalidSuppression(f"longer than {MAX_TARGET} octets: {target[:40]!r}...")
    if target.startswith('"'):
        # From the text as written, as a U-label domain below: lowered first, a capital
        # sigma before a hyphen or a digit became a final sigma, another domain's letter.
        target = _unquoted_form(_written(text))
        if target.startswith('"'):
            # Its local part needs its quotes (a space, an "@", a quoted-pair):
            # message.addrspec checked it as it checks a recipient, so the checks of
            # unquoted text below, which refuse those characters, do not apply.
            if not is_safe(target):
                raise InvalidSuppression(f"not an address or a domain: {target!r}")
            return target
    # Unsafe characters (C1 controls, bidirectional overrides: safetext) as for a reply:
    # no address holds one, and the list is shown to operators.
    if not is_safe(target) or any(c.isspace() or c in '<>,;"' for c in target):
        raise InvalidSuppression(f"not an address or a domain: {target!r}")
    local, at, domain = target.rpartition("@")
    if at and not local:
        raise InvalidSuppression(f"an address without a local part: {target!r}")
    if not domain or domain.startswith(".") or domain.endswith(".") or ".." in domain:
        raise InvalidSuppression(f"not an address or a domain: {target!r}")
    if "#" in domain:
        # No domain name holds one (RFC 1035 §2.3.1), and a CSV row whose first cell
        # starts with "#" and is no target is a comment (suppression_csv): "###" is one.
        raise InvalidSuppression(f"not an address or a domain: {target!r}")
    if "*" in domain:
        # Entries are found by a recipient's own address and domain, and no recipient's
        # domain holds a "*": "*.example.com" (a wildcard as tls_domains and shaping
        # rules write one) was listed and suppressed nobody.
        raise InvalidSuppression(
            f"no wildcards: {target!r} (an entry is one address or one domain, "
            "e.g. example.com; suppress each domain)"
        )
    if "@" in local:
        raise InvalidSuppression(f"more than one @: {target!r}")
    if domain.startswith("["):
        # An address literal as prepare() stores it: bob@[IPv6:2001:DB8:0::1] is queued
        # as bob@[IPv6:2001:db8::1], and an entry kept as typed never applied.
        literal = stored_literal(domain)
        if literal is None:
            raise InvalidSuppression(f"not a valid address literal: {domain!r}")
        return f"{local}{at}{literal}"
    if not domain.isascii():
        # Recipients are stored with A-label domains (prepare() writes
        # bob@xn--bcher-kva.example for bob@bücher.example) and entries are found by
        # string: an entry kept as typed would be listed but never apply. From the domain
        # as written, which IDNA maps to lower case: folded by str.lower(), a capital
        # sigma before a hyphen or a digit became a final sigma, another domain's letter.
        try:
            domain = a_label(_written(text).rpartition("@")[2])
        except ValueError:
            raise InvalidSuppression(f"not a valid domain name: {domain!r}") from None
        target = f"{local}{at}{domain}"
        if len(target.encode("utf-8", "surrogatepass")) > MAX_TARGET:
            raise InvalidSuppression(f"longer than {MAX_TARGET} octets: {target[:40]!r}...")
    return target


def _written(text: str) -> str:
    """``text`` (an address or a domain, perhaps in angle brackets) stripped and out of
    its brackets, as written, not folded."""
    written = text.strip()
    if written.startswith("<") and written.endswith(">"):
        written = written[1:-1].strip()
    return written


def page_after(text: str) -> str:
    """``text`` as where a listing of the entries starts (``after``): a whole target as
    :func:`normalize_target` keeps it, other text (a prefix) stripped and lower-cased, as
    every target is. Compared as given, "Bob@example.org" sorted before every lower-case
    target and "bücher.example" after every ASCII one, and the page started elsewhere.

    >>> page_after("Bob@Bücher.example"), page_after("B")
    ('bob@xn--bcher-kva.example', 'b')
    """
    try:
        return normalize_target(text)
    except InvalidSuppression:
        return text.strip().lower()


def _unquoted_form(target: str) -> str:
    """``target``, an address whose local part starts with a quote, as ``prepare()``
    stores the recipient (:func:`~mailstrom.message.addrspec.validate_address`: quotes
    and quoted-pairs kept only where the local part needs them, ``"john"@x`` being
    ``john@x``, RFC 5321 §4.1.2; the domain as A-labels), folded as every target is;
    InvalidSuppression for an address that is not one."""
    # Imported here: only a quoted local part needs the address checks.
    from mailstrom.message.addrspec import validate_address

    try:
        envelope = validate_address(target).envelope
    except InvalidAddress as exc:
        raise InvalidSuppression(f"not an address or a domain: {exc}") from None
    return _folded(envelope)


def stored_forms(text: str) -> list[str]:
    """The targets that taking ``text`` off the list deletes: :func:`normalize_target`'s
    form and, when they differ from it, the forms earlier builds stored, so that such an
    entry (it never applied) can be removed: the lower-cased form as given, and the one
    whose U-label domain was lower-cased before IDNA (a capital sigma before a hyphen or
    a digit made a final sigma, another A-label).

    >>> stored_forms("bob@Bücher.example")
    ['bob@xn--bcher-kva.example', 'bob@bücher.example']
    """
    try:
        target = normalize_target(text)
    except InvalidSuppression:
        # A wildcard, which earlier builds took (such an entry never applied): its
        # lower-cased form as given, so that it can be removed.
        if isinstance(text, str) and "*" in text.rpartition("@")[2]:
            return [_typed(text)]
        raise
    try:
        lowered = normalize_target(text.lower())
    except InvalidSuppression:
        lowered = target  # str.lower() made it no target: no earlier build stored one
    return list(dict.fromkeys((target, lowered, _typed(text))))


def _typed(text: str) -> str:
    """``text`` stripped, lower-cased and out of its angle brackets, as earlier builds
    stored a target."""
    typed = text.strip().lower()
    if typed.startswith("<") and typed.endswith(">"):
        typed = typed[1:-1].strip()
    return typed


def domain_of_target(address: str) -> str:
    """The domain an address's domain entry would be filed under (as A-labels)."""
    return _domain_key(address.rpartition("@")[2])


def address_key(address: str) -> str:
    """``address`` as entries and stored recipients spell it: lower-cased, its domain
    as A-labels (a domain that has none stays as it is, lower-cased: it matches nothing).

    >>> address_key("Bob@Bücher.example")
    'bob@xn--bcher-kva.example'
    """
    if address.startswith('"'):
        # A quoted local part as normalize_target keeps it: what prepare() stores, so a
        # report naming "john"@x finds the recipient john@x.
        try:
            return _unquoted_form(address)
        except InvalidSuppression:
            pass  # stored data, not an address prepare() made: as written, it matches none
    if address.isascii() and "[" not in address:
        return address.lower()
    local, at, domain = address.rpartition("@")
    return f"{_folded(local)}{at}{_domain_key(domain)}"


def stored_literal(domain: str) -> str | None:
    """``domain``, an address literal (``[192.0.2.1]``, ``[IPv6:2001:DB8:0::1]``), as
    ``prepare()`` stores a recipient's (``[ipv6:2001:db8::1]``: email_validator writes an
    IPv6 address in its shortest form), lower-cased; None when it is no valid literal.
    Suppression targets and destinations (:mod:`mailstrom.stores.operator`) both use it."""
    # Imported here: only an address literal needs the address checks (email-validator).
    from mailstrom.message.addrspec import validate_address

    try:
        envelope = validate_address(f"x@{domain}").envelope
    except InvalidAddress:
        return None
    return envelope.rpartition("@")[2].lower()


def _folded(text: str) -> str:
    """``text`` lower-cased and, when it is not ASCII, in NFC: ``prepare()`` stores a
    UTF-8 local part so (email_validator), and "jo\u0308rg" (o and a combining
    diaeresis, as macOS input writes it) is the mailbox it stores as "j\u00f6rg"."""
    text = text.lower()
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def _domain_key(domain: str) -> str:
    if domain.startswith("["):
        return stored_literal(domain) or domain.lower()
    try:
        return a_label(domain)
    except ValueError:
        return domain.lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class Suppression:
    """One entry of the suppression list.

    >>> from datetime import UTC
    >>> entry = Suppression(target="bob@example.org", source=SuppressionSource.HARD_BOUNCE,
    ...                     reply="550 5.1.1 no such user",
    ...                     created_at=datetime(2026, 11, 30, 9, 0, tzinfo=UTC))
    >>> entry.reason
    'suppressed since 2026-11-30T09:00:00Z: 550 5.1.1 no such user'
    """

    target: str
    """A lower-case address, or a domain (no "@") that covers every address there."""
    source: SuppressionSource | None
    """None: unknown (a stored entry whose source no version of mailstrom here knows)."""
    reply: str
    """The reply or report that put it there (or an operator's note); may be empty."""
    created_at: datetime | None
    """None: unknown (a stored entry whose time cannot be read: it still applies)."""
    expires_at: datetime | None = None
    """When the entry stops applying (None: never). Expired entries are ignored, and
    replaced by the next entry for the same target."""
    message_id: str | None = None
    """The message whose bounce or complaint added it, if any."""

    @property
    def is_domain(self) -> bool:
        """Whether the entry covers a whole domain."""
        return "@" not in self.target

    @property
    def reason(self) -> str:
        """What a suppressed recipient's status says: ``suppressed since <date>: <reply>``."""
        if self.created_at is None:
            head = "suppressed since an unknown time"
        else:
            # In UTC, as the "Z" says: an entry may carry any offset (a clock or a store
            # that keeps the one it was given). A naive time is taken as UTC, as before.
            when = self.created_at
            if when.tzinfo is not None:
                when = when.astimezone(UTC)
            head = f"suppressed since {when.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        return f"{head}: {self.reply}" if self.reply else head

    def active(self, now: datetime) -> bool:
        """Whether the entry applies at ``now``."""
        return self.expires_at is None or self.expires_at > now

    def stands_against(self, other: Suppression) -> bool:
        """Whether this entry, in the store, stays when a bounce's or a complaint's
        ``other`` comes (``keep_longer``): an operator's entry in force at ``other``'s
        time (its reason and end are the operator's choice, which no automatic entry
        overrides), or one that :meth:`outlasts` it, unless it is a bounce's
        (:data:`BYPASSABLE`) and ``other``, a complaint's, lasts as long."""
        if self.source is SuppressionSource.MANUAL and (
            other.created_at is None or self.active(other.created_at)
        ):
            return True
        if self.source in BYPASSABLE and other.source not in BYPASSABLE and other.outlasts(self):
            # A complaint as long as a bounce's entry (both without end, the default)
            # takes its place: kept, the bounce's let a lane that sends past bounces
            # (bypass_suppression) go on mailing the address that complained.
            return False
        return self.outlasts(other)

    def outlasts(self, other: Suppression) -> bool:
        """Whether this entry lasts at least as long as ``other`` (no end lasts longest):
        an entry in force that a bounce's or a complaint's would only shorten."""
        if self.expires_at is None:
            return True
        return other.expires_at is not None and self.expires_at >= other.expires_at


def lookup_targets(addresses: Iterable[str]) -> list[str]:
    """The targets to look up for ``addresses``: each address and each domain, once."""
    seen: dict[str, None] = {}
    for address in addresses:
        seen.setdefault(address_key(address), None)
        seen.setdefault(domain_of_target(address), None)
    return list(seen)


def match(
    address: str,
    found: Mapping[str, Suppression],
    *,
    bypass: frozenset[SuppressionSource] = frozenset(),
) -> Suppression | None:
    """The entry that suppresses ``address`` among ``found`` (an address entry before
    its domain's), or None; an entry of a source in ``bypass`` suppresses nothing, so
    the domain's entry is looked at after an address's bypassed one."""
    if not bypass:
        return found.get(address_key(address)) or found.get(domain_of_target(address))
    for target in (address_key(address), domain_of_target(address)):
        entry = found.get(target)
        if entry is not None and entry.source not in bypass:
            return entry
    return None

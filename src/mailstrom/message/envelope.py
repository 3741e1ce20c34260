"""The envelope: who the message is from and to, as SMTP sees it.

Pure rules over the already validated address headers (RFC 5322 §3.6.2, RFC 6854) and
the caller's explicit envelope, shared by builder, EmailMessage and raw-bytes input.
Nothing is validated twice: every mailbox arrives here as a
:class:`~mailstrom.message.addresses.Mailbox` carrying its envelope form.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mailstrom.arguments import shown
from mailstrom.errors import (
    InvalidAddress,
    InvalidMessage,
    MissingFrom,
    MultipleFromWithoutSender,
    NoRecipients,
    TooManyRecipients,
)
from mailstrom.message.addresses import (
    Group,
    Mailbox,
    dedupe,
    mailboxes,
    parse_address_list,
    parse_mailbox,
)
from mailstrom.message.addrspec import ValidAddress
from mailstrom.message.headers import Field, HeaderSection, split_header_section

DEFAULT_MAX_RECIPIENTS = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressFields:
    """The address headers of a message, parsed and validated (``None`` = header absent).

    ``resent`` holds the Resent-To/Cc/Bcc fields of raw input's newest resent block (RFC
    5322 §3.6.6); when any is present the message is being resent and they name its
    recipients, and
    ``resent_from`` and ``resent_sender`` hold the newest resent block's Resent-From and
    Resent-Sender (the first of each: a block is prepended at each resend; a Resent-Sender
    past the block's end, an older block's, does not count), which name who resends it.
    """

    from_: tuple[Group, ...] | None
    sender: tuple[Group, ...] | None = None
    reply_to: tuple[Group, ...] = ()
    to: tuple[Group, ...] = ()
    cc: tuple[Group, ...] = ()
    bcc: tuple[Group, ...] = ()
    resent: tuple[Group, ...] | None = None
    resent_from: tuple[Group, ...] | None = None
    resent_sender: tuple[Group, ...] | None = None

    @property
    def utf8(self) -> bool:
        """True when a header mailbox has a non-ASCII local part (RFC 6532 raw UTF-8)."""
        groups = (*(self.from_ or ()), *(self.sender or ()), *self.reply_to, *self.to, *self.cc)
        return any(box.address.smtputf8 for box in mailboxes(groups))


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """The SMTP envelope: reverse-path and forward-paths, as addr-specs."""

    sender: str
    """Envelope form of the reverse-path, ``""`` for the null reverse-path."""
    recipients: tuple[str, ...]
    id_domain: str
    """Domain of the first From mailbox (the Sender's when From is a group), for a new
    Message-ID."""
    from_domains: tuple[str, ...] = ()
    """Domains of the From mailboxes, lower-case A-labels without repeats: what DKIM
    signatures must align with (DMARC, RFC 7489 §3.1)."""
    smtputf8: bool
    """An envelope address has a non-ASCII local part (RFC 6531)."""


MAX_OTHER_MAILBOXES = 10_240
"""Mailboxes that the address fields of a raw message may name beyond ``max_recipients``:
From, Sender, Reply-To, repeats, and To/Cc/Bcc when the envelope is given explicitly.

Each is parsed and validated, at tens of µs apiece, so without a bound a 35 MiB message
of address fields costs a minute of CPU. Postfix similarly stops reading an address
header after ``header_address_token_limit`` (10,240) tokens."""


def too_many_mailboxes(count: int, max_recipients: int) -> TooManyRecipients:
    """The error for address fields naming ``count`` mailboxes, past ``max_recipients`` +
    :data:`MAX_OTHER_MAILBOXES`."""
    limit = max_recipients + MAX_OTHER_MAILBOXES
    return TooManyRecipients(
        f"the address header fields name more than {limit} mailboxes; the limit is "
        f"Config.max_recipients ({max_recipients}) + {MAX_OTHER_MAILBOXES}",
        count=count,
        limit=limit,
    )


class MailboxCount:
    """The mailboxes of one header section's address fields, counted as they are first
    parsed, before prepare() reads them (sendmail's qualifying of bare names, an
    EmailMessage's fields checked before it is written): past the bound prepare() holds
    them to (``max_recipients`` + :data:`MAX_OTHER_MAILBOXES`) the message is refused with
    its error at the field that passes it, before the rest are read. A header section of
    1 MB holds half a million bare names, each read by two parsers at tens of µs: parsed
    and qualified whole first, it was refused only after 16 seconds. Every address field
    read counts, an older resent block's Resent-From too (which prepare() does not read;
    real ones name a mailbox or two)."""

    def __init__(self, max_recipients: int = DEFAULT_MAX_RECIPIENTS) -> None:
        self.max_recipients = max_recipients
        self.count = 0

    def add(self, groups: Sequence[Group]) -> None:
        """Count the mailboxes of one field's ``groups``; TooManyRecipients when the
        fields read so far name too many."""
        for group in groups:
            self.count += len(group.mailboxes)
        if self.count > self.max_recipients + MAX_OTHER_MAILBOXES:
            raise too_many_mailboxes(self.count, self.max_recipients)


def too_many_recipients(count: int, max_recipients: int, named_by: str = "To") -> TooManyRecipients:
    """The error for recipients counted as they are read: ``count`` different addresses
    before the rest, past ``max_recipients``, named by ``named_by``: "To" (To, Cc and
    Bcc), "Resent-To" (Resent-To, Resent-Cc and Resent-Bcc) or "envelope_to"."""
    if named_by == "envelope_to":
        return TooManyRecipients(
            f"envelope_to names more than {max_recipients} different addresses "
            f"({count} before the rest are read); the limit is {max_recipients} "
            "(Config.max_recipients)",
            count=count,
            limit=max_recipients,
        )
    prefix = named_by.removesuffix("To")
    return TooManyRecipients(
        f"the message has more than {max_recipients} recipients: its "
        f"{prefix}To, {prefix}Cc and {prefix}Bcc fields name {count} "
        "different addresses before the rest are read; the limit is "
        f"{max_recipients} (Config.max_recipients)",
        count=count,
        limit=max_recipients,
    )


class RecipientCount:
    """The different envelope addresses a message is to be sent to, counted as each field
    or address is read: past ``max_recipients``, :class:`TooManyRecipients` before the
    rest are validated. Envelope forms have lower-case domains, so a set de-duplicates
    as :func:`decide` does."""

    __slots__ = ("max_recipients", "seen")

    def __init__(self, max_recipients: int) -> None:
        self.max_recipients = max_recipients
        self.seen: set[str] = set()

    def add(self, groups: Iterable[Group], named_by: str = "To") -> None:
        """Count the mailboxes of ``groups``, named by ``named_by`` (see
        :func:`too_many_recipients`)."""
        seen = self.seen
        for group in groups:
            for box in group.mailboxes:
                seen.add(box.address.envelope)
        if len(seen) > self.max_recipients:
            raise too_many_recipients(len(seen), self.max_recipients, named_by)

    def add_address(self, address: ValidAddress) -> None:
        """Count one address of ``envelope_to``."""
        self.seen.add(address.envelope)
        if len(self.seen) > self.max_recipients:
            raise too_many_recipients(len(self.seen), self.max_recipients, "envelope_to")


def fields_from_section(
    section: HeaderSection,
    *,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    recipients_from_headers: bool = True,
) -> AddressFields:
    """Read and validate the address headers of a raw header section.

    From, Sender, Reply-To, To and Cc may each appear once (:class:`InvalidMessage`).
    Counting as it parses, it stops at the first field that takes the recipient fields
    (To, Cc, Bcc, or the Resent- ones when present) past ``max_recipients`` different
    addresses, when the envelope is to be read from them (``recipients_from_headers``),
    or all address fields together past ``max_recipients`` + :data:`MAX_OTHER_MAILBOXES`
    mailboxes: :class:`TooManyRecipients`, before the rest is parsed.
    """
    reader = _AddressReader(section, max_recipients)
    count = recipients_from_headers
    # Read first: when a message has any Resent- recipient field, those of its newest
    # resent block are its recipients; an older block's were the recipients of an
    # earlier resend (RFC 5322 §3.6.6), read and checked but not sent to again.
    newest = newest_block_end(section)
    resent: list[Group] = []
    resending = False
    for name in ("Resent-To", "Resent-Cc", "Resent-Bcc"):
        key = name.lower()
        for index, field in enumerate(section.fields):
            if field.name == key:
                resending = True
                groups = reader.parse(name, _unfolded(field), recipients=count and index < newest)
                resent.extend(groups if index < newest else ())
    count = count and not resending
    # RFC 5322 §3.6 allows one of each field sent but the Resent- ones (a block per
    # resend): Gmail refuses a message with two To, Cc or Reply-To fields at the end of
    # DATA. Bcc is never sent, and several are read as one.
    return AddressFields(
        from_=reader.groups("From", single=True),
        sender=reader.groups("Sender", single=True),
        reply_to=reader.groups("Reply-To", single=True) or (),
        to=reader.groups("To", single=True, recipients=count) or (),
        cc=reader.groups("Cc", single=True, recipients=count) or (),
        bcc=reader.groups("Bcc", recipients=count) or (),
        resent=tuple(resent) if resending else None,
        resent_from=reader.groups("Resent-From", first=True) if resending else None,
        resent_sender=(
            reader.groups("Resent-Sender", first=True)
            if resending and _in_newest_block(section, "resent-sender")
            else None
        ),
    )


_ONCE_PER_BLOCK = frozenset({"resent-date", "resent-from", "resent-sender", "resent-message-id"})
"""Resent- fields a resent block holds at most once (RFC 5322 §3.6): a second one starts
the block of an older resend."""


def newest_block_end(section: HeaderSection) -> int:
    """Where the newest resent block of ``section`` ends: the index of the first field of
    an older block (a repeat of a field a block holds once), or the number of fields;
    the block is the Resent- fields from the first on (see :func:`_in_newest_block`)."""
    seen: set[str] = set()
    for index, field in enumerate(section.fields):
        if field.name in _ONCE_PER_BLOCK:
            if field.name in seen:
                return index
            seen.add(field.name)
    return len(section.fields)


def newest_block_value(section: HeaderSection, name: str) -> str | None:
    """The unfolded value of the ``name`` field (lower-case, one a block holds once) of the
    newest resent block of ``section``, None when that block has none."""
    for field in section.fields[: newest_block_end(section)]:
        if field.name == name:
            return _unfolded(field)
    return None


def _unfolded(field: Field) -> str:
    """The value of ``field``, unfolded (the line breaks removed only, RFC 5322 §2.2.3),
    as :meth:`HeaderSection.values` reads it."""
    return b"".join(field.lines).decode("utf-8").partition(":")[2].strip(" \t")


def _in_newest_block(section: HeaderSection, name: str) -> bool:
    """Whether the first ``name`` field (lower-case) of ``section`` is in its newest
    resent block: the Resent- fields from the first on, up to one that a block holds once
    and that repeats (each resend prepends its block, RFC 5322 §3.6.6). An older block's
    Resent-Sender names who answered for that resend, not for this one."""
    seen: set[str] = set()
    for field in section.fields:
        if field.name == name:
            return True
        if field.name in _ONCE_PER_BLOCK:
            if field.name in seen:
                return False
            seen.add(field.name)
    return False


class _AddressReader:
    """Parses the address fields of one header section, counting what they name."""

    def __init__(self, section: HeaderSection, max_recipients: int) -> None:
        self.section = section
        self.mailboxes = MailboxCount(max_recipients)
        self.recipients = RecipientCount(max_recipients)

    def groups(
        self, name: str, *, single: bool = False, first: bool = False, recipients: bool = False
    ) -> tuple[Group, ...] | None:
        """The groups of every ``name`` field (None when there is none), of the one field
        allowed (``single``) or of the first one (``first``); ``recipients``: they name
        envelope recipients, to be counted against ``max_recipients``."""
        if single:
            one = self.section.value(name)
            values = [] if one is None else [one]
        else:
            values = self.section.values(name)
            if first:
                del values[1:]
        if not values:
            return None
        found: list[Group] = []
        for value in values:
            found.extend(self.parse(name, value, recipients=recipients))
        return tuple(found)

    def parse(self, name: str, value: str, *, recipients: bool) -> tuple[Group, ...]:
        """The groups of one ``name`` field's ``value``, counted (see :meth:`groups`)."""
        parsed = parse_address_list(name, value)
        self.mailboxes.add(parsed)
        if recipients:
            self.recipients.add(parsed, "Resent-To" if name.startswith("Resent-") else "To")
        return parsed


def _explicit(envelope_to: object) -> Sequence[str]:
    """``envelope_to`` as a list of strings (one string is one address); InvalidAddress
    for anything else: bytes would iterate as ints, None reach the address parser."""
    if isinstance(envelope_to, str):
        return [envelope_to]
    if isinstance(envelope_to, bytes | bytearray) or not isinstance(envelope_to, Iterable):
        raise InvalidAddress(
            f"envelope_to must be a str or a list of str, not {type(envelope_to).__name__}",
            address=shown(envelope_to),
        )
    found = list(envelope_to)
    for item in found:
        if not isinstance(item, str):
            raise InvalidAddress(
                f"envelope_to addresses must be str, not {type(item).__name__}",
                address=shown(item),
            )
    return found


def _explicit_addresses(envelope_to: object, max_recipients: int) -> list[ValidAddress]:
    """The addresses of ``envelope_to``, each validated, and counted as it is: past
    ``max_recipients`` different ones, :class:`TooManyRecipients` before the rest are
    read (a list of 200,000 was validated whole, 2.4 s, before it was refused)."""
    found: list[ValidAddress] = []
    counted = RecipientCount(max_recipients)
    for text in _explicit(envelope_to):
        address = parse_mailbox("envelope_to", text).address
        found.append(address)
        counted.add_address(address)
    return found


def decide(
    fields: AddressFields,
    *,
    envelope_from: str | None,
    envelope_to: Sequence[str] | None,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
) -> Envelope:
    """Check the originator fields and work out the envelope.

    - From must name a mailbox; several From mailboxes need a Sender (RFC 5322 §3.6.2);
      a group in From (RFC 6854) also needs a Sender, which then names the responsible
      mailbox. Without one, :class:`MultipleFromWithoutSender` is raised.
    - Reverse-path: ``envelope_from`` (``""`` is the null reverse-path), else Sender,
      else the single From mailbox; for a message being resent, whoever resends it is
      responsible (RFC 5322 §3.6.6): its newest Resent-Sender, else its Resent-From,
      checked as Sender and From are (a resent message without Resent-From is
      :class:`MissingFrom`).
    - Forward-paths: ``envelope_to``, else Resent-To + Resent-Cc + Resent-Bcc of the
      newest resent block when the message has any of them (as Postfix's cleanup does
      for ``sendmail -t``; an older block's named an earlier resend's), else
      To + Cc + Bcc; de-duplicated, at most ``max_recipients`` (:class:`TooManyRecipients`).
    """
    author, from_boxes = _responsible(fields.from_, fields.sender, "")
    responsible = author
    if fields.resent is not None:
        # The resender answers for this delivery: its bounces are theirs, not the author's.
        responsible, _ = _responsible(fields.resent_from, fields.resent_sender, "Resent-")
    if envelope_from is None:
        sender = responsible.envelope
        sender_utf8 = responsible.smtputf8
    elif not isinstance(envelope_from, str):
        raise InvalidAddress(
            f"envelope_from must be a str, not {type(envelope_from).__name__}",
            address=shown(envelope_from),
        )
    elif envelope_from in ("", "<>"):
        sender, sender_utf8 = "", False
    else:
        explicit = parse_mailbox("envelope_from", envelope_from).address
        sender, sender_utf8 = explicit.envelope, explicit.smtputf8

    if envelope_to is None:
        if fields.resent is not None:
            boxes = mailboxes(fields.resent)
            where = "the newest resent block's Resent-To, Resent-Cc or Resent-Bcc"
        else:
            boxes = mailboxes((*fields.to, *fields.cc, *fields.bcc))
            where = "To, Cc or Bcc"
        addresses = [box.address for box in boxes]
    else:
        addresses = _explicit_addresses(envelope_to, max_recipients)
        where = "envelope_to"
    recipients = dedupe(address.envelope for address in addresses)
    if not recipients:
        raise NoRecipients(f"no recipients: {where} names no address")
    if len(recipients) > max_recipients:
        raise TooManyRecipients(
            f"the message has {len(recipients)} recipients; the limit is {max_recipients} "
            "(Config.max_recipients)",
            count=len(recipients),
            limit=max_recipients,
        )
    from_domains = domains_of(from_boxes)
    return Envelope(
        sender=sender,
        recipients=recipients,
        id_domain=from_domains[0] if from_domains else author.envelope.rpartition("@")[2],
        smtputf8=sender_utf8 or any(address.smtputf8 for address in addresses),
        from_domains=from_domains,
    )


def domains_of(boxes: Iterable[Mailbox]) -> tuple[str, ...]:
    """The domains of ``boxes`` as their envelope forms have them (lower-case A-labels),
    without repeats: of the From mailboxes, :attr:`Envelope.from_domains`."""
    return tuple(dict.fromkeys(box.address.envelope.rpartition("@")[2] for box in boxes))


def from_domains_of(head: bytes) -> tuple[str, ...]:
    """The :attr:`Envelope.from_domains` of a prepared message whose header section is
    ``head``, read back from its From field; empty when it has none that parses (it was
    checked as it was prepared). What the DKIM keys that sign it are chosen by."""
    try:
        value = split_header_section(head).value("From")
        return () if value is None else domains_of(mailboxes(parse_address_list("From", value)))
    except InvalidMessage:
        return ()


def _responsible(
    from_: tuple[Group, ...] | None, sender: tuple[Group, ...] | None, prefix: str
) -> tuple[ValidAddress, list[Mailbox]]:
    """The address of the mailbox responsible for a message, and the From mailboxes,
    from its From and Sender fields (``prefix`` "Resent-": its newest resent block's),
    checked as RFC 5322 §3.6.2 and RFC 6854 ask."""
    if from_ is None:
        if prefix:
            raise MissingFrom(
                "the message is being resent (it has Resent-To, Resent-Cc or Resent-Bcc) "
                "but has no Resent-From header naming who resends it (RFC 5322 §3.6.6 "
                "requires one)"
            )
        raise MissingFrom("the message has no From header (RFC 5322 §3.6 requires one)")
    from_boxes = mailboxes(from_)
    from_group = next((g for g in from_ if g.name is not None), None)
    if not from_boxes and from_group is None:
        raise MissingFrom(f"the {prefix}From header names no address")
    sender_boxes = mailboxes(sender or ())
    if sender is not None:
        if len(sender_boxes) != 1 or any(g.name is not None for g in sender):
            raise InvalidMessage(
                f"the {prefix}Sender header must be exactly one mailbox (RFC 5322 §3.6.2), "
                f"got {len(sender_boxes)} mailboxes"
                + (" in a group" if any(g.name is not None for g in sender) else "")
            )
    elif from_group is not None:
        raise MultipleFromWithoutSender(
            f"the {prefix}From header is the group {from_group.name!r}; a {prefix}From group "
            f"needs a {prefix}Sender header naming the responsible mailbox (RFC 6854 §2)"
        )
    elif len(from_boxes) > 1:
        raise MultipleFromWithoutSender(
            f"the {prefix}From header has {len(from_boxes)} mailboxes but there is no "
            f"{prefix}Sender header; RFC 5322 §3.6.2 requires {prefix}Sender to say which "
            "one is responsible"
        )
    return (sender_boxes[0] if sender_boxes else from_boxes[0]).address, from_boxes

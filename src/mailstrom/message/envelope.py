"""The envelope: who the message is from and to, as SMTP sees it.

Pure rules over the address headers (RFC 5322 §3.6.2, RFC 6854) and the caller's
explicit envelope, shared by builder, EmailMessage and raw-bytes input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from email.headerregistry import Group

from mailstrom.errors import (
    InvalidAddress,
    InvalidMessage,
    MissingFrom,
    MultipleFromWithoutSender,
    NoRecipients,
)
from mailstrom.message.addresses import (
    check_no_line_breaks,
    dedupe,
    envelope_form,
    mailboxes,
    parse_address_list,
)
from mailstrom.message.headers import HeaderSection


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressFields:
    """The address headers of a message, parsed into groups (``None`` = header absent)."""

    from_: tuple[Group, ...] | None
    sender: tuple[Group, ...] | None = None
    reply_to: tuple[Group, ...] = ()
    to: tuple[Group, ...] = ()
    cc: tuple[Group, ...] = ()
    bcc: tuple[Group, ...] = ()

    def all_mailboxes(self) -> list[str]:
        """Every addr-spec named in any address header, for validation."""
        groups = (
            *(self.from_ or ()),
            *(self.sender or ()),
            *self.reply_to,
            *self.to,
            *self.cc,
            *self.bcc,
        )
        return [box.addr_spec for box in mailboxes(groups)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """The SMTP envelope: reverse-path and forward-paths, as addr-specs."""

    sender: str
    """Envelope form of the reverse-path, ``""`` for the null reverse-path."""
    recipients: tuple[str, ...]
    id_domain: str
    """Domain of the responsible mailbox (From, else Sender), for a new Message-ID."""


def fields_from_section(section: HeaderSection) -> AddressFields:
    """Read the address headers of a raw header section."""

    def groups(name: str, *, single: bool = False) -> tuple[Group, ...] | None:
        values = section.values(name)
        if not values:
            return None
        if single and len(values) > 1:
            raise InvalidMessage(
                f"the message has {len(values)} {name} header fields; RFC 5322 §3.6 allows one"
            )
        return tuple(group for value in values for group in parse_address_list(name, value))

    return AddressFields(
        from_=groups("From", single=True),
        sender=groups("Sender", single=True),
        reply_to=groups("Reply-To") or (),
        to=groups("To") or (),
        cc=groups("Cc") or (),
        bcc=groups("Bcc") or (),
    )


def explicit_address(value: str, *, role: str) -> str:
    """Envelope form of a caller-given envelope address; a display name is dropped.

    Accepts a bare addr-spec or ``Name <addr>``; the envelope only ever gets the addr-spec.
    """
    check_no_line_breaks(role, value)
    if "<" not in value:
        return envelope_form(value.strip())
    boxes = mailboxes(parse_address_list("To", value))
    if len(boxes) != 1:
        raise InvalidAddress(f"{role} must be exactly one address, got {value!r}", address=value)
    return envelope_form(boxes[0].addr_spec)


def decide(
    fields: AddressFields,
    *,
    envelope_from: str | None,
    envelope_to: Sequence[str] | None,
) -> Envelope:
    """Check the originator fields and work out the envelope.

    - From must name a mailbox; several From mailboxes need a Sender (RFC 5322 §3.6.2);
      a group in From (RFC 6854) also needs a Sender, which then names the responsible
      mailbox. Without one, :class:`MultipleFromWithoutSender` is raised.
    - Reverse-path: ``envelope_from`` (``""`` is the null reverse-path), else Sender,
      else the single From mailbox.
    - Forward-paths: ``envelope_to``, else To + Cc + Bcc; de-duplicated.
    """
    if fields.from_ is None:
        raise MissingFrom("the message has no From header (RFC 5322 §3.6 requires one)")
    from_boxes = mailboxes(fields.from_)
    from_group = next((g for g in fields.from_ if g.display_name is not None), None)
    if not from_boxes and from_group is None:
        raise MissingFrom("the From header names no address")
    sender_boxes = mailboxes(fields.sender or ())
    if fields.sender is not None:
        if len(sender_boxes) != 1 or any(g.display_name is not None for g in fields.sender):
            raise InvalidMessage(
                "the Sender header must be exactly one mailbox (RFC 5322 §3.6.2), got "
                f"{', '.join(str(g) for g in fields.sender) or 'nothing'}"
            )
    elif from_group is not None:
        raise MultipleFromWithoutSender(
            f"the From header is the group {str(from_group)!r}; a From group needs a Sender "
            "header naming the responsible mailbox (RFC 6854 §2)"
        )
    elif len(from_boxes) > 1:
        raise MultipleFromWithoutSender(
            f"the From header has {len(from_boxes)} mailboxes but there is no Sender header; "
            "RFC 5322 §3.6.2 requires Sender to say which one is responsible"
        )
    for address in fields.all_mailboxes():
        envelope_form(address)

    responsible = sender_boxes[0] if sender_boxes else from_boxes[0]
    responsible_form = envelope_form(responsible.addr_spec)
    if envelope_from is None:
        sender = responsible_form
    elif envelope_from in ("", "<>"):
        sender = ""
    else:
        sender = explicit_address(envelope_from, role="envelope_from")

    if envelope_to is None:
        boxes = mailboxes((*fields.to, *fields.cc, *fields.bcc))
        recipients = dedupe(envelope_form(box.addr_spec) for box in boxes)
        where = "To, Cc or Bcc"
    else:
        if isinstance(envelope_to, str):
            envelope_to = [envelope_to]
        recipients = dedupe(explicit_address(a, role="envelope_to") for a in envelope_to)
        where = "envelope_to"
    if not recipients:
        raise NoRecipients(f"no recipients: {where} names no address")
    return Envelope(
        sender=sender,
        recipients=recipients,
        id_domain=responsible_form.rpartition("@")[2],
    )

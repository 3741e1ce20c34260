"""The :class:`Email` builder and its MIME composition with the stdlib ``email`` package.

Bodies are always encoded 7-bit safe (quoted-printable or base64 when needed), so a built
message never needs 8BITMIME. Address headers are written with A-label domains when the
local part is ASCII, so only a UTF-8 local part makes a built message need SMTPUTF8.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import BaseHeader, ContentTypeHeader, Group
from email.message import EmailMessage
from email.utils import format_datetime
from typing import cast

from mailstrom.errors import InvalidAddress, InvalidMessage
from mailstrom.message.addresses import (
    check_no_line_breaks,
    envelope_form,
    for_header,
    format_address_field,
    mailboxes,
    parse_address_list,
)
from mailstrom.message.encoding import serialise
from mailstrom.message.envelope import AddressFields
from mailstrom.message.headers import check_field_name
from mailstrom.message.policies import BUILD_POLICY, HEADER_FACTORY

_PLAIN_SUBJECT = re.compile(r"[!-~]+(?: [!-~]+)*")
_PLAIN_SUBJECT_MAX = 69
"""``Subject: `` plus this many octets fits the 78-octet line RFC 5322 §2.1.1 prefers."""

# Headers the Email fields own; setting them through ``headers`` would be ambiguous.
_OWNED = {
    "from": "from_",
    "sender": "sender",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
    "reply-to": "reply_to",
    "subject": "subject",
    "date": "date",
    "message-id": "message_id",
    "mime-version": "text/html/attachments",
    "content-type": "text/html/attachments",
    "content-transfer-encoding": "text/html/attachments",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    """A file attached to an :class:`Email`.

    ``inline=True`` with a ``content_id`` lets the HTML body refer to it as
    ``cid:<content_id>`` (the attachment then goes in a multipart/related part).
    """

    filename: str
    content: bytes
    content_type: str = "application/octet-stream"
    inline: bool = False
    content_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Email:
    """A message to send, built from parts.

    >>> Email(from_="App <app@example.com>", to=["bob@example.org"], subject="Hi",
    ...       text="Hello")  # doctest: +ELLIPSIS
    Email(...)

    ``from_`` is the From header; ``sender`` is the RFC 5322 Sender header, needed only
    when From has several mailboxes or is a group. Address fields accept one string or a
    sequence; each string may carry a display name (``"Bob <bob@example.org>"``).
    ``bcc`` recipients get the message but never appear in it.
    """

    from_: str | Sequence[str]
    to: str | Sequence[str] = ()
    cc: str | Sequence[str] = ()
    bcc: str | Sequence[str] = ()
    reply_to: str | Sequence[str] = ()
    sender: str | None = None
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: Sequence[Attachment] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra headers; may not name a header that a field above sets."""
    date: datetime | None = None
    """Date header; default: the time of submission. A naive datetime is taken as UTC."""
    message_id: str | None = None
    """Message-ID header, with or without angle brackets; default: a fresh unique one."""


def address_fields(email: Email) -> AddressFields:
    """Parse and validate the address fields of ``email`` into header-ready groups.

    Raises :class:`HeaderInjection` for CR/LF and :class:`InvalidAddress` for bad syntax.
    """
    sender = None if email.sender is None else _groups("Sender", email.sender)
    return AddressFields(
        from_=_groups("From", email.from_),
        sender=sender,
        reply_to=_groups("Reply-To", email.reply_to),
        to=_groups("To", email.to),
        cc=_groups("Cc", email.cc),
        bcc=_groups("Bcc", email.bcc),
    )


def needs_utf8_headers(fields: AddressFields) -> bool:
    """True when a header mailbox has a non-ASCII local part (raw UTF-8, RFC 6532)."""
    groups = (*(fields.from_ or ()), *(fields.sender or ()), *fields.reply_to)
    return any(not box.username.isascii() for box in mailboxes((*groups, *fields.to, *fields.cc)))


def render(
    email: Email, fields: AddressFields, *, date: datetime, message_id: str, utf8: bool
) -> bytes:
    """Serialise ``email`` (without Bcc) once, CRLF line endings.

    The address headers are rendered by :func:`format_address_field`; everything else,
    body included, by the stdlib. ``utf8`` writes headers as raw UTF-8 (RFC 6532).
    """
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    lines = [f"Date: {format_datetime(date)}"]
    for name, groups in (
        ("From", fields.from_),
        ("Sender", fields.sender),
        ("Reply-To", fields.reply_to),
        ("To", fields.to),
        ("Cc", fields.cc),
    ):
        if groups:
            lines.append(format_address_field(name, groups, utf8=utf8))
    check_no_line_breaks("Subject", email.subject)
    # Short plain subjects need neither encoding nor folding; the stdlib's header
    # machinery (a few dozen microseconds a header) is kept for the rest.
    simple_subject = (
        len(email.subject) <= _PLAIN_SUBJECT_MAX
        and _PLAIN_SUBJECT.fullmatch(email.subject) is not None
        and "=?" not in email.subject  # would read as an RFC 2047 word; let the stdlib quote
    )
    if simple_subject:
        lines.append(f"Subject: {email.subject}")
    lines.append(f"Message-ID: {message_id}")
    head = "".join(f"{line}\r\n" for line in lines).encode("utf-8" if utf8 else "ascii")
    subject = "" if simple_subject else email.subject
    return head + serialise(_compose(email, subject=subject), utf8=utf8)


def _compose(email: Email, *, subject: str) -> EmailMessage:
    message = EmailMessage(policy=BUILD_POLICY)
    if subject:
        message["Subject"] = subject
    for name, value in email.headers.items():
        check_field_name(name)
        check_no_line_breaks(name, value)
        if name.lower() in _OWNED:
            raise InvalidMessage(
                f"header {name!r} is set by the Email field {_OWNED[name.lower()]!r}, "
                "not through headers"
            )
        message[name] = value
    _set_body(message, email)
    for part in message.walk():
        # The stdlib marks parts it creates with MIME-Version too; it belongs only at the
        # top (RFC 2045 §4), so drop the noise.
        if part is not message:
            del part["MIME-Version"]
    return message


def normalise_message_id(value: str) -> str:
    """``value`` as a msg-id in angle brackets; :class:`InvalidMessage` if it cannot be."""
    check_no_line_breaks("Message-ID", value)
    inner = value.strip().removeprefix("<").removesuffix(">")
    if not inner or not inner.isascii() or any(c in inner for c in " \t<>"):
        raise InvalidMessage(f"invalid Message-ID {value!r}: expected <id-left@id-right>")
    return f"<{inner}>"


def _groups(name: str, value: str | Sequence[str]) -> tuple[Group, ...]:
    values = [value] if isinstance(value, str) else list(value)
    out: list[Group] = []
    for item in values:
        check_no_line_breaks(name, item)
        parsed = parse_address_list(name, item)
        if not parsed:
            raise InvalidAddress(f"empty address in {name}: {item!r}", address=item)
        for group in parsed:
            boxes = []
            for box in group.addresses:
                envelope_form(box.addr_spec)
                boxes.append(for_header(box))
            out.append(Group(group.display_name, boxes))
    return tuple(out)


def _set_body(message: EmailMessage, email: Email) -> None:
    if email.text is not None:
        message.set_content(email.text)
    if email.html is not None:
        if email.text is None:
            message.set_content(email.html, subtype="html")
        else:
            message.add_alternative(email.html, subtype="html")
    elif email.text is None and not email.attachments:
        message.set_content("")
    html_part = _html_part(message) if email.html is not None else None
    # Related (inline, referenced by the HTML) parts first: once the message has become
    # multipart/mixed, the HTML part could no longer be turned into multipart/related.
    related = [a for a in email.attachments if a.inline and html_part is not None]
    others = [a for a in email.attachments if not (a.inline and html_part is not None)]
    for attachment in (*related, *others):
        maintype, subtype, params = _content_type(attachment)
        check_no_line_breaks("filename", attachment.filename)
        cid = None
        if attachment.content_id is not None:
            cid = normalise_message_id(attachment.content_id)
        if attachment.inline and html_part is not None:
            html_part.add_related(
                attachment.content,
                maintype,
                subtype,
                disposition="inline",
                filename=attachment.filename,
                cid=cid,
                params=params,
            )
        else:
            disposition = "inline" if attachment.inline else "attachment"
            message.add_attachment(
                attachment.content,
                maintype,
                subtype,
                disposition=disposition,
                filename=attachment.filename,
                cid=cid,
                params=params,
            )


def _html_part(message: EmailMessage) -> EmailMessage:
    if message.get_content_type() == "text/html":
        return message
    for part in message.iter_parts():
        if part.get_content_type() == "text/html":
            assert isinstance(part, EmailMessage)
            return part
    raise AssertionError("an HTML body was set but no text/html part exists")


def _content_type(attachment: Attachment) -> tuple[str, str, dict[str, str]]:
    check_no_line_breaks("Content-Type", attachment.content_type)
    header = HEADER_FACTORY("Content-Type", attachment.content_type)
    assert isinstance(header, ContentTypeHeader)
    text = attachment.content_type.split(";", 1)[0].strip().lower()
    defects = cast(BaseHeader, header).defects
    if defects or text != header.content_type or header.maintype == "multipart":
        raise InvalidMessage(
            f"attachment {attachment.filename!r} has an invalid content type "
            f"{attachment.content_type!r}: expected type/subtype, not multipart"
        )
    return header.maintype, header.subtype, dict(header.params)

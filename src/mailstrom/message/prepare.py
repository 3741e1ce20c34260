"""``prepare``: validate a message once and serialise it to the bytes the worker sends.

Three inputs, one result. An :class:`Email` is composed and serialised by the stdlib
generator; an ``EmailMessage`` is serialised by it once; raw bytes are not re-serialised
at all. The last two then have their header section rewritten at the octet level (Bcc
removed, Date and Message-ID added), so bodies are never decoded and re-encoded.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from email.headerregistry import AddressHeader
from email.message import Message
from email.utils import format_datetime

from mailstrom.errors import (
    HeaderInjection,
    InvalidAddress,
    InvalidMessage,
    MessageTooLarge,
)
from mailstrom.message import builder
from mailstrom.message.addresses import (
    ADDRESS_FIELDS,
    check_no_line_breaks,
    checked_groups,
    mailboxes,
    needs_smtputf8,
    parse_address_list,
)
from mailstrom.message.builder import Email
from mailstrom.message.encoding import check_line_lengths, serialise
from mailstrom.message.envelope import Envelope, decide, fields_from_section
from mailstrom.message.headers import check_field_name, decode_text, split_header_section
from mailstrom.message.prepared import PreparedMessage

DEFAULT_MAX_SIZE = 35 * 1024 * 1024


def prepare(
    message: Email | Message | bytes,
    *,
    envelope_from: str | None = None,
    envelope_to: Sequence[str] | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    now: datetime | None = None,
    id_domain: str | None = None,
) -> PreparedMessage:
    """Validate ``message`` and serialise it once into a :class:`PreparedMessage`.

    >>> p = prepare(Email(from_="App <app@example.com>", to="bob@example.org", text="Hi"))
    >>> p.envelope_from, p.recipients
    ('app@example.com', ('bob@example.org',))

    ``envelope_from`` overrides the reverse-path (``""`` for the null one, as bounces
    use); by default it is the Sender address, else the single From address.
    ``envelope_to`` overrides the recipients (by default To + Cc + Bcc). ``now`` is used
    for a missing Date (default: the current UTC time); a missing Message-ID becomes
    ``<random@id_domain>``, ``id_domain`` defaulting to the From (or Sender) domain.

    The result has CRLF line endings, no Bcc header, and lines of at most 998 octets.
    Raises a subclass of :class:`~mailstrom.errors.InvalidMessage` saying what is wrong.
    """
    if now is None:
        now = datetime.now(UTC)
    if id_domain is not None:
        check_no_line_breaks("id_domain", id_domain)
        if not id_domain.isascii() or not id_domain or any(c in id_domain for c in " \t<>@"):
            raise InvalidMessage(f"id_domain {id_domain!r} is not an ASCII domain name")
    if isinstance(message, Email):
        return _prepare_email(message, envelope_from, envelope_to, max_size, now, id_domain)
    if isinstance(message, Message):
        data = _serialise(message)
    elif isinstance(message, bytes | bytearray | memoryview):
        data = bytes(message)
    else:
        raise TypeError(f"expected Email, EmailMessage or bytes, not {type(message).__name__}")
    return _prepare_bytes(data, envelope_from, envelope_to, max_size, now, id_domain)


def _prepare_email(
    email: Email,
    envelope_from: str | None,
    envelope_to: Sequence[str] | None,
    max_size: int,
    now: datetime,
    id_domain: str | None,
) -> PreparedMessage:
    fields = builder.address_fields(email)
    envelope = decide(fields, envelope_from=envelope_from, envelope_to=envelope_to)
    if email.message_id is not None:
        message_id = builder.normalise_message_id(email.message_id)
    else:
        message_id = _new_message_id(id_domain or envelope.id_domain)
    utf8 = builder.needs_utf8_headers(fields)
    data = builder.render(email, fields, date=email.date or now, message_id=message_id, utf8=utf8)
    return _finish(
        data,
        envelope,
        utf8_headers=utf8,
        max_size=max_size,
        message_id=message_id,
        subject=email.subject,
    )


def _prepare_bytes(
    data: bytes,
    envelope_from: str | None,
    envelope_to: Sequence[str] | None,
    max_size: int,
    now: datetime,
    id_domain: str | None,
) -> PreparedMessage:
    section = split_header_section(data)
    envelope = decide(
        fields_from_section(section), envelope_from=envelope_from, envelope_to=envelope_to
    )
    add: list[tuple[str, str]] = []
    if not section.values("Date"):
        add.append(("Date", format_datetime(now if now.tzinfo else now.replace(tzinfo=UTC))))
    message_ids = section.values("Message-ID")
    if message_ids:
        message_id = message_ids[0]
    else:
        message_id = _new_message_id(id_domain or envelope.id_domain)
        add.append(("Message-ID", message_id))
    subjects = section.values("Subject")
    return _finish(
        section.rewrite(drop={"bcc"}, add=add),
        envelope,
        utf8_headers=section.utf8,
        max_size=max_size,
        message_id=message_id,
        subject=decode_text(subjects[0]) if subjects else None,
    )


def _finish(
    data: bytes,
    envelope: Envelope,
    *,
    utf8_headers: bool,
    max_size: int,
    message_id: str,
    subject: str | None,
) -> PreparedMessage:
    if len(data) > max_size:
        raise MessageTooLarge(
            f"the encoded message is {len(data)} octets; the limit is {max_size}",
            size=len(data),
            limit=max_size,
        )
    check_line_lengths(data)
    body = data[data.find(b"\r\n\r\n") :]
    smtputf8 = utf8_headers or any(
        needs_smtputf8(address) for address in (envelope.sender, *envelope.recipients)
    )
    return PreparedMessage(
        data=data,
        envelope_from=envelope.sender,
        recipients=envelope.recipients,
        smtputf8=smtputf8,
        eightbit=not body.isascii(),
        header_message_id=message_id,
        subject=subject,
    )


def _serialise(message: Message) -> bytes:
    """Serialise a stdlib message once, refusing headers that would smuggle lines."""
    for name, raw_value in message.raw_items():
        check_field_name(name)
        # Policy-made header objects were checked for CR/LF by the stdlib when set;
        # raw strings (compat32, or parsed source) may only break lines to fold them.
        if not hasattr(raw_value, "defects"):
            _check_folding(name, str(raw_value))
    utf8 = False
    for field in ADDRESS_FIELDS:
        for value in _get_all(message, field):
            if isinstance(value, AddressHeader):
                groups = checked_groups(field, value)
            else:
                groups = parse_address_list(field, str(value))
            utf8 = utf8 or any(not box.addr_spec.isascii() for box in mailboxes(groups))
    # Non-ASCII addr-specs cannot be RFC 2047 encoded, so such a message is written with
    # raw UTF-8 headers (RFC 6532) and will need SMTPUTF8.
    return serialise(message, utf8=utf8)


def _get_all(message: Message, name: str) -> list[object]:
    try:
        return list(message.get_all(name, []))
    except Exception as exc:  # the stdlib parser can crash on malformed input (a@)
        raise InvalidAddress(f"{name} header cannot be parsed ({exc!r})", address=name) from exc


def _check_folding(name: str, value: str) -> None:
    lines = value.replace("\r\n", "\n").split("\n")
    for line in lines[1:]:
        if not line.startswith((" ", "\t")) or "\r" in line:
            raise HeaderInjection(
                f"{name} header value contains a line break that is not folding: {value!r}",
                header=name,
            )
    if "\r" in lines[0]:
        raise HeaderInjection(f"{name} header value contains a bare CR: {value!r}", header=name)


def _new_message_id(domain: str) -> str:
    # 128 random bits: unique without coordination between processes or hosts.
    return f"<{secrets.token_hex(16)}@{domain}>"

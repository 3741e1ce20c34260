"""``prepare``: validate a message once and serialise it to the bytes the worker sends.

Three inputs, one pipeline, each stage handing the next a value:

- an :class:`Email` is checked field by field (:func:`builder.check` → ``Draft``, every
  address validated once), its envelope decided (``Envelope``), and rendered straight
  to bytes (:func:`render.render`);
- raw bytes are split into header fields (``HeaderSection``), their address headers
  parsed and validated, the envelope decided, and the header section rewritten at the
  octet level (Bcc, Resent-Bcc and Return-Path removed, Date and Message-ID added, and
  Resent-Date and Resent-Message-ID to a message being resent). The body is
  never decoded or re-encoded, only given CRLF line ends;
- an ``EmailMessage`` is serialised once by the stdlib and then taken as raw bytes, so
  the envelope is read from exactly the header text that will be sent.

With a :class:`~mailstrom.dkim.DKIMConfig` the bytes are signed last (:func:`_sign`),
after their body has been made 7-bit, so that nothing on the way changes them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import Message

from mailstrom.dkim.config import DKIMConfig
from mailstrom.dkim.signing import DKIMSignature, sign, unlike_ours
from mailstrom.domains import dns_name, domain_name, is_public_name, shown
from mailstrom.errors import (
    ForbiddenCharacter,
    InvalidMessage,
    InvalidMessageType,
    MessageTooLarge,
    NoDKIMKey,
)
from mailstrom.message import builder, mime
from mailstrom.message.builder import Email
from mailstrom.message.chars import check_header_text
from mailstrom.message.encoding import (
    bare_line_ends,
    check_line_lengths,
    downgrade_to_7bit,
    encode_long_lines,
    has_body_signature,
    serialise,
    to_crlf,
)
from mailstrom.message.envelope import (
    DEFAULT_MAX_RECIPIENTS,
    Envelope,
    decide,
    fields_from_section,
    newest_block_value,
)
from mailstrom.message.headers import (
    decode_text,
    split_header_section,
)
from mailstrom.message.identification import check_date, check_message_id, format_date
from mailstrom.message.prepared import PreparedMessage
from mailstrom.message.render import render
from mailstrom.message.trees import (
    check_entity_headers,
    check_payloads,
    check_written_tree,
    least_written_size,
)

DEFAULT_MAX_SIZE = 35 * 1024 * 1024
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_ID_RIGHT = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*|\[[!-Z^-~]*\]")
"""A msg-id's id-right in ASCII: dot-atom-text or no-fold-literal (RFC 5322 §3.6.4)."""
LAST_RESORT_ID_DOMAIN = "mailstrom.invalid"
"""Message-ID domain when neither the From domain nor the host's name is a public name:
``.invalid`` (RFC 6761 §6.4) can never be anyone's real domain, and no local name leaks."""


def prepare(
    message: Email | Message | bytes,
    *,
    envelope_from: str | None = None,
    envelope_to: Sequence[str] | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    now: datetime | None = None,
    id_domain: str | None = None,
    fallback_id_domain: str | None = None,
    dkim: DKIMConfig | None = None,
    require_tls: bool = False,
    send_at: datetime | None = None,
) -> PreparedMessage:
    """Validate ``message`` and serialise it once into a :class:`PreparedMessage`.

    >>> p = prepare(Email(from_="App <app@example.com>", to="bob@example.org", text="Hi"))
    >>> p.envelope_from, p.recipients
    ('app@example.com', ('bob@example.org',))

    ``envelope_from`` overrides the reverse-path (``""`` for the null one, as bounces
    use); by default it is the Sender address, else the single From address, or for a
    raw message being resent its newest Resent-Sender, else Resent-From.
    ``envelope_to`` overrides the recipients (by default To + Cc + Bcc, or the Resent-
    fields of a resent raw message); at most ``max_recipients`` after de-duplication.
    ``now`` is used for a missing Date (default: the current UTC time) and as the DKIM
    signing time. A missing Message-ID becomes ``<random@domain>``: ``domain`` is
    ``id_domain`` when given, else the From domain (the Sender's when From is a group) if
    it is a public name, else ``fallback_id_domain`` (the host's name) if that is, else
    ``mailstrom.invalid`` — never ``localhost``, an address literal or a name private to
    one network (see :func:`~mailstrom.domains.is_public_name`). A raw message being
    resent (it has Resent-To, Resent-Cc or Resent-Bcc) also gets a missing Resent-Date
    (``now``) and Resent-Message-ID (the same way), as RFC 5322 §3.6.6 asks; those of
    its newest resent block, when given, are checked as Date and Message-ID are.

    ``dkim`` signs the message with the keys aligned with its From domain (see
    :class:`~mailstrom.dkim.DKIMConfig`); the signatures made are in the result's
    ``dkim``. A message no key aligns with is left unsigned, or refused with
    :class:`~mailstrom.errors.NoDKIMKey` when ``dkim.required``. ``send_at`` is when the
    message may first be sent, if later than ``now``: ``dkim.expire`` counts from it.

    ``require_tls`` (or ``Email.require_tls``) marks the message for REQUIRETLS (RFC 8689).

    The result has CRLF line endings, no Bcc, Resent-Bcc or Return-Path header (the
    delivering server adds Return-Path from the envelope, RFC 5321 §4.4), lines of at
    most 998 octets and header fields of at most 64 KiB. Raises a subclass of
    :class:`~mailstrom.errors.InvalidMessage` saying what is wrong.
    """
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)  # a naive time is taken as UTC, like Email.date
    if send_at is not None and send_at.tzinfo is None:
        send_at = send_at.replace(tzinfo=UTC)
    if not isinstance(require_tls, bool):
        # As Email.require_tls: read by its truth, "false" asked for REQUIRETLS.
        raise InvalidMessage(f"require_tls must be True or False, not {shown(require_tls)}")
    if id_domain is not None:
        if not isinstance(id_domain, str):
            # As envelope_from and envelope_to are refused: the character check raised
            # TypeError on bytes or an int.
            raise InvalidMessage(f"id_domain must be a str, not {type(id_domain).__name__}")
        check_header_text("id_domain", id_domain)
        if not id_domain.isascii() or not _ID_RIGHT.fullmatch(id_domain):
            # What the new Message-ID's id-right may be (RFC 5322 §3.6.4): "a,b" or "a..b"
            # made one that readers cannot parse.
            raise InvalidMessage(f"id_domain {shown(id_domain)} is not an ASCII domain name")
        # Within DNS's limits, as Config.message_id_domain is (domain_name): a name of
        # 1,000 octets made a Message-ID line longer than RFC 5322 allows, refused as
        # LineTooLong telling the caller to fold it.
        problem = _id_domain_problem(id_domain)
        if problem is not None:
            raise InvalidMessage(f"id_domain: {problem}")
    options = _Options(
        max_size=max_size,
        max_recipients=max_recipients,
        fallback_id_domain=fallback_id_domain,
        dkim=dkim,
        send_at=send_at,
    )
    if isinstance(message, Email):
        prepared = _prepare_email(message, envelope_from, envelope_to, options, now, id_domain)
        if require_tls or message.require_tls:
            prepared = dataclasses.replace(prepared, require_tls=True)
        return prepared
    if isinstance(message, Message):
        data = _serialise(message, options.max_size, options.max_recipients)
    elif isinstance(message, bytes | bytearray | memoryview):
        data = bytes(message)
    else:
        raise InvalidMessageType(
            f"expected Email, EmailMessage or bytes, not {type(message).__name__}"
        )
    prepared = _prepare_bytes(data, envelope_from, envelope_to, options, now, id_domain)
    return dataclasses.replace(prepared, require_tls=True) if require_tls else prepared


class _Options:
    """What the caller asked of this call beyond the message: limits, the Message-ID
    fallback, DKIM and when the message may first be sent."""

    __slots__ = ("dkim", "fallback_id_domain", "max_recipients", "max_size", "send_at")

    def __init__(
        self,
        *,
        max_size: int,
        max_recipients: int,
        fallback_id_domain: str | None,
        dkim: DKIMConfig | None,
        send_at: datetime | None,
    ) -> None:
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.fallback_id_domain = fallback_id_domain
        self.dkim = dkim
        self.send_at = send_at


def _prepare_email(
    email: Email,
    envelope_from: str | None,
    envelope_to: Sequence[str] | None,
    options: _Options,
    now: datetime,
    id_domain: str | None,
) -> PreparedMessage:
    draft = builder.check(
        email, max_recipients=options.max_recipients, recipients_from_headers=envelope_to is None
    )
    least = _least_size(draft)
    if least > options.max_size:
        # Refused before rendering, as raw input is before it is parsed: a 300 MB
        # attachment was base64-encoded (1.8 GB of memory, 3 s) only to be refused.
        raise MessageTooLarge(
            f"the encoded message is at least {least} octets; the limit is {options.max_size}",
            size=least,
            limit=options.max_size,
        )
    envelope = decide(
        draft.fields,
        envelope_from=envelope_from,
        envelope_to=envelope_to,
        max_recipients=options.max_recipients,
    )
    message_id = draft.message_id or _new_message_id(
        id_domain or _id_domain(envelope, options.fallback_id_domain)
    )
    utf8 = draft.fields.utf8
    data = render(draft, date=now, message_id=message_id, utf8=utf8)
    return _finish(
        data,
        envelope,
        utf8_headers=utf8,
        options=options,
        now=now,
        message_id=message_id,
        subject=email.subject,
    )


_ONCE_UNREAD = ("In-Reply-To", "References")
"""Fields RFC 5322 §3.6 allows once that nothing here reads but for that count: Gmail
refuses a message with two ("not RFC 5322 compliant: duplicate headers")."""


def _prepare_bytes(
    data: bytes,
    envelope_from: str | None,
    envelope_to: Sequence[str] | None,
    options: _Options,
    now: datetime,
    id_domain: str | None,
) -> PreparedMessage:
    if len(data) > options.max_size:
        # Checked again once rewritten; refusing early keeps huge input cheap.
        _too_large(len(data), options.max_size)
    section = split_header_section(data)
    fields = fields_from_section(
        section,
        max_recipients=options.max_recipients,
        recipients_from_headers=envelope_to is None,
    )
    envelope = decide(
        fields,
        envelope_from=envelope_from,
        envelope_to=envelope_to,
        max_recipients=options.max_recipients,
    )
    add: list[tuple[str, str]] = []
    date = section.value("Date")
    if date is None:
        add.append(("Date", format_date(now)))
    else:
        check_date(date)
    new_id_domain = id_domain or _id_domain(envelope, options.fallback_id_domain)
    given_id = section.value("Message-ID")
    if given_id is not None:
        message_id = check_message_id(given_id)
    else:
        message_id = _new_message_id(new_id_domain)
        add.append(("Message-ID", message_id))
    if fields.resent is not None:
        # The resend this call makes: its own Resent-Date and Resent-Message-ID are
        # checked as Date and Message-ID are. An older block's are history, carried as
        # they came (as Received fields are), and so are those of a message not resent.
        resent_date = newest_block_value(section, "resent-date")
        if resent_date is not None:
            check_date(resent_date, field="Resent-Date")
        resent_id = newest_block_value(section, "resent-message-id")
        if resent_id is not None:
            check_message_id(resent_id, field="Resent-Message-ID")
        # Being resent: its resent block needs a Resent-Date and should have a
        # Resent-Message-ID (RFC 5322 §3.6.6), which Postfix's cleanup adds as it adds
        # Date and Message-ID. One from an earlier resend counts, as it does there.
        if not section.values("Resent-Date"):
            add.append(("Resent-Date", format_date(now)))
        if not section.values("Resent-Message-ID"):
            add.append(("Resent-Message-ID", _new_message_id(new_id_domain)))
    subject = section.value("Subject")
    for name in _ONCE_UNREAD:
        section.value(name)  # refuses a second one
    section.value("MIME-Version", rule="RFC 2045 §4")  # a part may have its own
    # Return-Path is the final delivery server's to add, from the envelope sender: "a
    # message-originating SMTP system SHOULD NOT send a message that already contains"
    # one (RFC 5321 §4.4), and Postfix's cleanup removes it as it removes Bcc.
    out = section.rewrite(drop={"bcc", "resent-bcc", "return-path"}, add=add)
    if b"\0" in section.body:
        # A NUL can only be sent in binary data, which needs BINARYMIME (RFC 3030); in
        # 7bit and 8bit data it is forbidden (RFC 2045 §2.7, §2.8), and encoded parts
        # never hold one.
        raise ForbiddenCharacter(
            "the message body contains a NUL octet, which 7bit and 8bit data may not carry "
            "(RFC 2045 §2.7, §2.8); encode that part as base64",
            where="body",
        )
    end = out.find(b"\r\n\r\n")
    # One walk of the tree, on what is sent; the body was made CRLF once, by rewrite(),
    # and where that changed a binary part is read from the body as it came.
    part_utf8 = mime.check_structure(out, bare=bare_line_ends(section.body, end + 4))
    # Read from what is sent: a UTF-8 name in a Bcc field that was dropped needs no
    # SMTPUTF8 (its address, if UTF-8, makes the envelope need it).
    head_utf8 = section.utf8 and not (out if end < 0 else out[:end]).isascii()
    return _finish(
        out,
        envelope,
        utf8_headers=head_utf8 or part_utf8,
        options=options,
        now=now,
        message_id=message_id,
        subject=None if subject is None else _shown_subject(subject),
    )


def _shown_subject(value: str) -> str:
    """The Subject field's text as the queue keeps it, for display: its encoded-words
    decoded (RFC 2047), a NUL one carried as U+FFFD. An encoded-word may carry any octet,
    and PostgreSQL text holds no NUL: the store refused the whole message for it."""
    return decode_text(value).replace("\x00", "\ufffd")


def _finish(
    data: bytes,
    envelope: Envelope,
    *,
    utf8_headers: bool,
    options: _Options,
    now: datetime,
    message_id: str,
    subject: str | None,
) -> PreparedMessage:
    max_size = options.max_size
    # Signed or not, DKIM configured or not (a worker may have keys when it sends it), no
    # field the message brought passes for one of ours (dkim.signing.resign_stale).
    data = unlike_ours(data)
    if len(data) > max_size:
        _too_large(len(data), max_size)
    check_line_lengths(data)
    body = data[data.find(b"\r\n\r\n") :]
    signatures: tuple[DKIMSignature, ...] = ()
    unsigned: str | None = None
    if options.dkim is not None:
        data, body, signatures = _sign(data, body, envelope, options.dkim, now, options.send_at)
        if len(data) > max_size:
            _too_large(len(data), max_size)
        if not signatures:
            unsigned = unsigned_reason(envelope.from_domains)
    return PreparedMessage(
        data=data,
        envelope_from=envelope.sender,
        recipients=envelope.recipients,
        smtputf8=utf8_headers or envelope.smtputf8,
        eightbit=not body.isascii(),
        header_message_id=message_id,
        subject=subject,
        dkim=signatures,
        dkim_unsigned=unsigned,
    )


def _sign(
    data: bytes,
    body: bytes,
    envelope: Envelope,
    dkim: DKIMConfig,
    now: datetime,
    send_at: datetime | None,
) -> tuple[bytes, bytes, tuple[DKIMSignature, ...]]:
    """(signed data, its body, the signatures) — or the data as it was when no key aligns.

    An 8-bit body is made 7-bit first: a server without 8BITMIME would otherwise get it
    re-encoded by the worker, which changes the signed body and breaks every signature
    (RFC 6376 §5.3). A 7-bit body reaches every receiver exactly as signed, so the worker's
    downgrade never applies to a signed message. Not one the message came signed with
    (the application's own DKIM or ARC signature): re-encoded here, that broke at every
    receiver; it goes as it came, and a worker that must make it 7-bit for a server
    without 8BITMIME signs ours anew over what it sends (or drops them, without our
    keys). UTF-8 header fields stay as they are: they need SMTPUTF8, which implies
    8BITMIME (RFC 6531 §3.1), and are signed as octets (RFC 8616 §4).
    """
    keys = dkim.keys_for(envelope.from_domains)
    if not keys:
        if dkim.required:
            shown = ", ".join(envelope.from_domains) or "(none: From is a group)"
            raise NoDKIMKey(
                f"no DKIM key is configured for the From domain {shown}, and dkim.required "
                "is set; add a [[dkim.keys]] entry for it or a parent domain",
                domains=envelope.from_domains,
            )
        return data, body, ()
    if not body.isascii() and not has_body_signature(data):
        data = downgrade_to_7bit(data)
        body = data[data.find(b"\r\n\r\n") :]
    signed, signatures = sign(data, keys, now=now, expire=dkim.expire, send_at=send_at)
    return signed, body, signatures


MAX_REASON_DOMAINS = 5
"""From domains named in an unsigned message's reason; a From header may list many."""


def unsigned_reason(from_domains: Sequence[str]) -> str:
    """Why a message with these From domains has no DKIM signature although DKIM is
    configured: what its status shows.

    >>> unsigned_reason(["example.org"])
    'no DKIM key for the From domain example.org'
    """
    if not from_domains:
        return "no From address to align a DKIM key with (From is a group)"
    shown = ", ".join(from_domains[:MAX_REASON_DOMAINS])
    if len(from_domains) > MAX_REASON_DOMAINS:
        shown += f" and {len(from_domains) - MAX_REASON_DOMAINS} more"
    plural = "s" if len(from_domains) > 1 else ""
    return f"no DKIM key for the From domain{plural} {shown}"


def _id_domain(envelope: Envelope, fallback: str | None) -> str:
    """The domain of a new Message-ID: see :func:`prepare`."""
    if is_public_name(envelope.id_domain):
        return envelope.id_domain
    if fallback is not None and is_public_name(fallback):
        return domain_name(fallback)
    return LAST_RESORT_ID_DOMAIN


def _least_size(draft: builder.Draft) -> int:
    """A lower bound on the size of ``draft`` rendered, found without encoding anything:
    base64 writes 4 characters for every 3 octets of an attachment (message/* ones, sent
    7bit or base64, count for nothing here), and a text part holds at least one octet a
    character."""
    size = len(draft.text or "") + len(draft.html or "")
    for part in draft.attachments:
        if part.maintype != "message":
            size += (len(part.content) + 2) // 3 * 4
    return size


@functools.lru_cache(maxsize=64)
def _id_domain_problem(id_domain: str) -> str | None:
    """Why DNS cannot hold ``id_domain``, or None. Remembered: it is the configured
    ``message_id_domain`` for every message, and dnspython's check costs ~7 µs of a
    prepare() that takes ~55."""
    try:
        dns_name(id_domain)
    except ValueError as exc:
        return str(exc)
    return None


def _too_large(size: int, limit: int) -> None:
    raise MessageTooLarge(
        f"the encoded message is {size} octets; the limit is {limit}", size=size, limit=limit
    )


def _serialise(message: Message, max_size: int, max_recipients: int) -> bytes:
    """Serialise a stdlib message once, after :func:`check_entity_headers`, unless it is
    surely larger than ``max_size`` (:class:`MessageTooLarge`).

    Only what decides *how* to serialise is looked at here; everything else is checked
    on the bytes, by the same code as raw input, once they are known to hold the parts
    the tree does (:func:`~mailstrom.message.trees.check_written_tree`).
    """
    utf8 = check_entity_headers(message, max_recipients=max_recipients)
    check_payloads(message)
    least = least_written_size(message)
    if least > max_size:
        # Refused before it is written, as an Email is before it is rendered: a 60 MB
        # attachment was written out (3 s, 250 MB) only to be refused.
        raise MessageTooLarge(
            f"the encoded message is at least {least} octets; the limit is {max_size}",
            size=least,
            limit=max_size,
        )
    # Non-ASCII addr-specs cannot be RFC 2047 encoded, so such a message is written with
    # raw UTF-8 headers (RFC 6532) and will need SMTPUTF8.
    data = to_crlf(serialise(message, utf8=utf8))
    check_written_tree(message, data)
    # The stdlib writes a text part as 7bit or 8bit whatever its lines' length
    # (MIMEText(html, "html") with minified HTML on one line): such a body is encoded as
    # sendmail's input is, not refused with advice to encode what the caller did not.
    # Signed content is refused instead: re-encoded, its signature would not verify, and
    # only the caller can encode it before signing.
    return encode_long_lines(data, keep_signed=True)


def _new_message_id(domain: str) -> str:
    # 128 random bits: unique without coordination between processes or hosts.
    return f"<{secrets.token_hex(16)}@{domain}>"

"""The :class:`Email` builder, and :func:`check`: every field validated once, into a
:class:`Draft` that the renderer turns into bytes without looking back at the ``Email``."""

from __future__ import annotations

import html as html_text
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from mailstrom.arguments import shown
from mailstrom.errors import (
    InvalidAddress,
    InvalidAttachment,
    InvalidHeaderValue,
    InvalidMessage,
    UnknownContentID,
)
from mailstrom.message.addresses import Group, parse_address_list
from mailstrom.message.chars import check_encodable, check_header_text, shorten
from mailstrom.message.dsn import DSN
from mailstrom.message.envelope import (
    DEFAULT_MAX_RECIPIENTS,
    AddressFields,
    MailboxCount,
    RecipientCount,
)
from mailstrom.message.headers import MAX_FIELD, check_field_name, check_field_size
from mailstrom.message.identification import check_message_id, check_msg_ids
from mailstrom.message.provider import provider_fields

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
# Headers that fields for mailbox providers produce; through ``headers`` as well they would
# appear twice.
_PROVIDED = {
    "list-unsubscribe": ("unsubscribe_url", "unsubscribe_mailto"),
    "list-unsubscribe-post": ("unsubscribe_url",),
    "feedback-id": ("feedback_id",),
    "auto-submitted": ("auto_submitted",),
}
# The fields of a resent block (RFC 5322 §3.6.6) belong to raw input, where the envelope
# is read from its address fields; through ``headers`` those would be sent unvalidated,
# and Resent-Bcc would reveal blind copies. Without them a Resent-Date or
# Resent-Message-ID makes a block without Resent-From, which §3.6.6 requires.
_RESENT = {
    "resent-date",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "resent-bcc",
    "resent-message-id",
}
# Fields RFC 5322 §3.6 allows once that ``headers`` may set (the others are owned): keys
# differing in case make two fields, and Gmail refuses a message with two.
_ONCE = {"in-reply-to", "references"}

_TOKEN = r"[!#$%&'*+\-.0-9A-Za-z^_`{|}~]+"  # noqa: S105 (RFC 2045 §5.1 token, not a secret)
_CONTENT_TYPE = re.compile(
    rf"\s*+({_TOKEN})/({_TOKEN})\s*+"
    rf"((?:;\s*+{_TOKEN}\s*+=\s*+(?:{_TOKEN}|\"(?:[^\"\\]|\\.)*+\")\s*+)*+);?\s*+",
    re.DOTALL,
)
"""``type/subtype`` and ``; name=value`` parameters, white space around each. Every run
is possessive: white space given back could only go to the run after it, which the
same values match either way, and backtracking tried every split of a long run of
spaces between two such runs (a parameter's last and the final one): its square in
work, 40 s for 60,000 spaces."""
_PARAMETER = re.compile(rf";\s*({_TOKEN})\s*=\s*(?:({_TOKEN})|\"((?:[^\"\\]|\\.)*)\")", re.DOTALL)
_CID = re.compile("cid:", re.I)
"""A ``cid:`` URL's scheme, in any case: for HTML whose lower-case form is not as long
(see :func:`_cid_urls`); re.I searches some 6 µs per KB, ``str.find`` far less."""
_CID_ID = re.compile(r"""[^"'\s>]*+""")
"""The id of a ``cid:`` URL (RFC 2392: percent-encoded, perhaps with character references
in HTML), which ends at a quote, white space or ``>``."""
_HTML_SPACE = " \t\n\r\f"


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    """A file attached to an :class:`Email`.

    ``inline=True`` with a ``content_id`` lets the HTML body refer to it as
    ``cid:<content_id>`` (the attachment then goes in a multipart/related part); HTML
    naming a ``cid:`` that no attachment has raises :class:`UnknownContentID`. An
    attachment the HTML names goes with it in multipart/related even without
    ``inline=True`` (keeping Content-Disposition attachment): elsewhere, readers showed
    a broken image.
    ``inline=True`` alone shows the attachment after the body (Content-Disposition
    inline, in multipart/mixed).
    The filename is sent as the literal text given (RFC 2231 encoded when needed); it
    may not be empty or blank.
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
    when From has several mailboxes or is a group (a ``sender`` that is the one From
    mailbox, the domain in any case, is not written: RFC 5322 §3.6.2). Address fields
    accept one string or a sequence; each string may carry a display name
    (``"Bob <bob@example.org>"``).
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
    unsubscribe_url: str | None = None
    """An https URL that unsubscribes the recipient with one POST (RFC 8058): sent in
    ``List-Unsubscribe`` together with ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``.
    Gmail and Yahoo require one-click unsubscription of bulk senders."""
    unsubscribe_mailto: str | None = None
    """An address (``unsubscribe@example.com``) or mailto URI
    (``mailto:unsubscribe@example.com?subject=stop``) that unsubscribes by mail; in the same
    ``List-Unsubscribe`` field as ``unsubscribe_url`` when both are given (RFC 2369)."""
    feedback_id: str | None = None
    """``Feedback-ID``: printable ASCII without spaces, e.g. ``spring:c42:newsletter:shop``,
    by which providers report complaints (Gmail's feedback loop)."""
    auto_submitted: str | None = None
    """``Auto-Submitted`` (RFC 3834): ``"auto-generated"`` for mail a program sends on its
    own, ``"auto-replied"`` for an answer to a message, ``"auto-notified"`` for a
    notification; robots then know not to reply."""
    require_tls: bool = False
    """REQUIRETLS (RFC 8689): deliver only over TLS to a server authenticated by DANE,
    MTA-STS (enforce) or certificate verification, with ``REQUIRETLS`` on MAIL FROM, to
    an MX host that DANE, MTA-STS or DNSSEC-validated MX records vouch for (RFC 8689
    §4.2.1); a server that does not offer REQUIRETLS, an MX host nothing vouches for, or a
    destination whose policy allows no authentication, fails the recipient with 5.7.30."""
    tags: Sequence[str] = ()
    """Labels the queue keeps with the message (never sent): shown by ``mailstrom status``,
    copied into delivery events, filterable (``mailstrom queue --tag``). At most 20, each
    1-64 letters, digits and ``. _ : / @ + -``."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Your own key/value strings kept with the message (never sent), returned by
    ``query_status`` and in every delivery event: an order id, a user id. At most 32
    entries, values of at most 1,024 octets, 8 KiB in all."""
    priority: str | None = None
    """The priority lane (``"transactional"`` or ``"bulk"`` by default, see
    ``Config.lanes``); None: ``Config.default_priority``."""
    dsn: DSN | None = None
    """Delivery status notifications to ask receiving servers for (RFC 3461: NOTIFY,
    RET, ENVID, ORCPT), sent only to servers that offer DSN. Not a header: it travels in
    the envelope. See :class:`~mailstrom.message.dsn.DSN`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Part:
    """A checked attachment."""

    filename: str
    content: bytes
    content_type: str
    """``type/subtype``, lower-case."""
    params: tuple[tuple[str, str], ...]
    inline: bool
    content_id: str | None
    """In angle brackets."""

    @property
    def maintype(self) -> str:
        return self.content_type.partition("/")[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class Draft:
    """An :class:`Email` whose every field has been checked and every address validated."""

    fields: AddressFields
    subject: str
    headers: tuple[tuple[str, str], ...]
    text: str | None
    html: str | None
    attachments: tuple[Part, ...]
    date: datetime | None
    """Timezone-aware."""
    message_id: str | None
    """In angle brackets."""
    provided: tuple[str, ...] = ()
    """Header fields from the fields for mailbox providers, written as they are."""
    named: frozenset[str] = frozenset()
    """The Content-IDs (lower case, without angle brackets) the HTML names by ``cid:``."""


def check(
    email: Email,
    *,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    recipients_from_headers: bool = True,
) -> Draft:
    """Validate every field of ``email`` once.

    Raises :class:`HeaderInjection` for CR/LF, :class:`ForbiddenCharacter` for other
    control characters and lone surrogates, :class:`InvalidAddress` for bad addresses,
    :class:`HeaderTooLong` for a field over the limit, :class:`InvalidAttachment` and
    :class:`InvalidMessage` for the rest. The mailboxes of the address fields are counted
    as each address is read, as raw input's are (:class:`MailboxCount`), and so are the
    different addresses of To, Cc and Bcc when the envelope is read from them
    (``recipients_from_headers``): past either bound, :class:`TooManyRecipients` is
    raised before the rest are validated.
    """
    if not isinstance(email.require_tls, bool):
        # Read by its truth, "false" (a setting read as text) asked for REQUIRETLS, and
        # each recipient whose server does not offer it failed with 5.7.30.
        raise InvalidMessage(f"require_tls must be True or False, not {shown(email.require_tls)}")
    counted = MailboxCount(max_recipients)
    from_ = _groups("From", email.from_, counted)
    sender = None if email.sender is None else _groups("Sender", email.sender, counted)
    if sender is not None:
        # RFC 5322 §3.6.2: Sender SHOULD NOT be used when it would be identical to From
        # (the one author's mailbox): the envelope sender is that address either way.
        author = _one_mailbox(from_)
        if author is not None and _one_mailbox(sender) == author:
            sender = None
    recipients = RecipientCount(max_recipients) if recipients_from_headers else None
    fields = AddressFields(
        from_=from_,
        sender=sender,
        reply_to=_groups("Reply-To", email.reply_to, counted),
        to=_groups("To", email.to, counted, recipients),
        cc=_groups("Cc", email.cc, counted, recipients),
        bcc=_groups("Bcc", email.bcc, counted, recipients),
    )
    subject = _text("Subject", email.subject)
    headers = tuple(_header(name, value) for name, value in _header_items(email.headers))
    _check_once(headers)
    for where, body in (("text", email.text), ("html", email.html)):
        if body is not None:
            if not isinstance(body, str):
                raise InvalidMessage(f"{where} must be a str, not {type(body).__name__}")
            check_encodable(where, body)
    date = None if email.date is None else _date(email.date)
    message_id = None if email.message_id is None else normalise_message_id(email.message_id)
    provided: tuple[str, ...] = ()
    if (
        email.unsubscribe_url is not None
        or email.unsubscribe_mailto is not None
        or email.feedback_id is not None
        or email.auto_submitted is not None
    ):
        provided = _provided(email, headers)
    attachments = _parts(email.attachments)
    named: frozenset[str] = frozenset()
    if email.html is not None:
        named = _check_cid_references(email.html, attachments)
    return Draft(
        fields=fields,
        subject=subject,
        headers=headers,
        text=email.text,
        html=email.html,
        attachments=attachments,
        date=date,
        message_id=message_id,
        provided=provided,
        named=named,
    )


def _one_mailbox(groups: tuple[Group, ...]) -> str | None:
    """The envelope form of the one mailbox ``groups`` hold outside any group (its local
    part as given, its domain a lower-case A-label), or None for anything else."""
    if len(groups) != 1 or groups[0].name is not None or len(groups[0].mailboxes) != 1:
        return None
    return groups[0].mailboxes[0].address.envelope


def _check_cid_references(html: str, attachments: tuple[Part, ...]) -> frozenset[str]:
    """The ids (lower case, without angle brackets) of the attachments that a ``src`` or
    ``href`` in ``html`` names by ``cid:``; :class:`UnknownContentID` if one names an id
    that no attachment has: sent as is, it showed as a broken image or link.

    The URL's id is percent-decoded (RFC 2392) after its character references (HTML);
    ids are compared without regard to case, and as written too, so only an id that no
    reader could match is refused."""
    ids = {part.content_id[1:-1].lower() for part in attachments if part.content_id}
    found: set[str] = set()
    for url_id in _cid_urls(html):
        written = html_text.unescape(url_id)
        named = urllib.parse.unquote(written)
        # A reader that does not percent-decode matches the id as written.
        matched = {named.lower(), written.lower()} & ids
        if not matched:
            raise UnknownContentID(
                f"the html refers to {shorten('cid:' + named)}, and no attachment has that "
                f"content_id: attach the part it names with Attachment(..., inline=True, "
                f"content_id={shorten(named)})",
                content_id=named,
            )
        found |= matched
    return frozenset(found)


def _cid_urls(html: str) -> Iterator[str]:
    """The ids of the ``cid:`` URLs that begin a ``src`` or ``href`` attribute's value in
    ``html``, as written. Each ``cid:`` is found as a literal first, then its place told
    by :func:`_in_url_attribute`: a pattern starting at the attribute's name, matched
    without regard to case at every position, cost some 20 µs per KB of HTML."""
    lowered = html.lower()
    if "cid:" not in lowered:
        return
    # lower() makes one character or more of each: of equal length, one each, so that a
    # place in one is the same place in the other (not so for "İ", two in lower case).
    aligned = len(lowered) == len(html)
    at = 0
    while True:
        if aligned:
            start = lowered.find("cid:", at)
        else:
            found = _CID.search(html, at)
            start = -1 if found is None else found.start()
        if start < 0:
            return
        at = start + 4
        if _in_url_attribute(html, start):
            url_id = _CID_ID.match(html, at)
            assert url_id is not None  # it matches the empty string
            at = url_id.end()
            yield url_id[0]


def _in_url_attribute(html: str, at: int) -> bool:
    """Whether the ``cid:`` at ``at`` begins the value of a ``src`` or ``href`` attribute:
    ``src="cid:``, ``href = 'cid:``, ``SRC=cid:`` (white space around ``=`` and inside the
    quote allowed, names in any case). Read backwards from ``at``: the white space it walks
    over ends at the ``cid:`` before it, so all of them together read the HTML once."""
    i = _space_before(html, at)
    if i and html[i - 1] in "\"'":
        i = _space_before(html, i - 1)
    if not i or html[i - 1] != "=":
        return False
    i = _space_before(html, i - 1)
    for name in ("src", "href"):
        start = i - len(name)
        if start >= 0 and html[start:i].lower() == name:
            return start == 0 or not (html[start - 1].isalnum() or html[start - 1] == "_")
    return False


def _space_before(html: str, end: int) -> int:
    """The start of the run of HTML white space that ends at ``end``."""
    while end and html[end - 1] in _HTML_SPACE:
        end -= 1
    return end


def _provided(email: Email, headers: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    for name, _ in headers:
        owners = _PROVIDED.get(name.lower(), ())
        given = [owner for owner in owners if getattr(email, owner) is not None]
        if given:
            raise InvalidMessage(
                f"header {name!r} is set by the Email field {given[0]!r}; give it one way, "
                "not also through headers"
            )
    return provider_fields(
        unsubscribe_url=email.unsubscribe_url,
        unsubscribe_mailto=email.unsubscribe_mailto,
        feedback_id=email.feedback_id,
        auto_submitted=email.auto_submitted,
    )


def normalise_message_id(value: object) -> str:
    """``value``, with or without angle brackets, as a msg-id in them (RFC 5322 §3.6.4);
    :class:`InvalidHeaderValue` if it is not an ASCII one."""
    text = _text("Message-ID", value)
    inner = text.strip().removeprefix("<").removesuffix(">")
    if not inner.isascii():
        raise InvalidHeaderValue(
            f"invalid Message-ID {shorten(text)}: expected ASCII <id-left@id-right> (an "
            "internationalised one needs a raw message with UTF-8 headers)",
            header="Message-ID",
        )
    return check_message_id(f"<{inner}>")


def _date(value: object) -> datetime:
    """``value`` as an aware datetime (a naive one is UTC) that a Date field can hold:
    RFC 5322 §3.3 years are 1900 or later, in four digits (readers take ``0001`` for
    2001), as written: in UTC when its zone's offset has seconds (see
    :func:`~mailstrom.message.identification.format_date`)."""
    if not isinstance(value, datetime):
        raise InvalidMessage(f"date must be a datetime, not {type(value).__name__}")
    date = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    offset = date.utcoffset()
    try:
        written = date.astimezone(UTC) if offset and offset % timedelta(minutes=1) else date
    except OverflowError:  # outside datetime's years once in UTC
        written = None
    if written is None or written.year < 1900:
        raise InvalidHeaderValue(
            f"date {date.isoformat()} cannot be written in a Date field: RFC 5322 §3.3 "
            "years are 1900 or later, in four digits",
            header="Date",
        )
    return date


def _bracketed(field: str, value: object) -> str:
    """``value`` in angle brackets; :class:`InvalidMessage` if it cannot be put in them.

    All a Content-ID needs: ``cid:logo`` works in every reader although RFC 2045 §7 asks
    for msg-id syntax."""
    text = _text(field, value)
    inner = text.strip().removeprefix("<").removesuffix(">")
    if not inner or not inner.isascii() or any(c in inner for c in " \t<>"):
        raise InvalidMessage(f"invalid {field} {shorten(text)}: expected <id-left@id-right>")
    return f"<{inner}>"


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidMessage(f"{name} must be a str, not {type(value).__name__}")
    # Checked before anything else looks at it: octets are at least characters.
    check_field_size(name, len(name) + 2 + len(value))
    check_header_text(name, value)
    return value


def _header(name: object, value: object) -> tuple[str, str]:
    if not isinstance(name, str):
        raise InvalidMessage(f"header names must be str, not {type(name).__name__}")
    check_field_name(name)
    key = name.lower()
    if key in _OWNED:
        raise InvalidMessage(
            f"header {name!r} is set by the Email field {_OWNED[key]!r}, not through headers"
        )
    if key == "return-path":
        raise InvalidMessage(
            "header 'Return-Path' cannot be set: the server that delivers the message adds "
            "it from the envelope sender (RFC 5321 §4.4); give envelope_from instead"
        )
    if key in _RESENT:
        raise InvalidMessage(
            f"header {name!r} cannot be set through headers: resending is for raw messages "
            "(a resent block needs Resent-Date and Resent-From, RFC 5322 §3.6.6, and "
            "Resent-Bcc would be transmitted)"
        )
    text = _text(name, value)
    if key in _ONCE:
        check_msg_ids(text, field=name)
    return name, text


def _check_once(headers: tuple[tuple[str, str], ...]) -> None:
    seen: set[str] = set()
    for name, _ in headers:
        key = name.lower()
        if key in _ONCE and key in seen:
            raise InvalidMessage(
                f"header {key!r} is given twice in headers (names may differ in case); "
                "RFC 5322 §3.6 allows one such field"
            )
        seen.add(key)


def _header_items(headers: object) -> Iterable[tuple[str, str]]:
    try:
        if isinstance(headers, dict | Mapping) or hasattr(headers, "keys"):
            found: dict[str, str] = dict(headers)  # type: ignore[call-overload]
            return found.items()
        # (name, value) pairs, each kept: through dict() a name given twice (two Comments
        # fields) kept only its last value.
        return [(name, value) for name, value in headers]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise InvalidMessage(
            f"headers must be a mapping of header names to values, not {type(headers).__name__}"
        ) from None


def _groups(
    name: str,
    value: str | Sequence[str],
    counted: MailboxCount,
    recipients: RecipientCount | None = None,
) -> tuple[Group, ...]:
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, list | tuple) or (
        # The ABC check costs ~0.3 µs; lists and tuples are nearly all input.
        isinstance(value, Sequence) and not isinstance(value, bytes | bytearray)
    ):
        values = list(value)
    else:
        raise InvalidAddress(
            f"{name} must be a str or a sequence of str, not {type(value).__name__}",
            address=shown(value),
        )
    if not values or values == [""]:
        return ()
    size = 0
    out: list[Group] = []
    for item in values:
        if not isinstance(item, str):
            raise InvalidAddress(
                f"{name} addresses must be str, not {type(item).__name__}", address=shown(item)
            )
        size += len(item) + 2
        # Bounded before parsing, so a huge list costs nothing; Bcc is never written but
        # is held to the same bound.
        check_field_size(name, size)
        parsed = parse_address_list(name, item)
        if not parsed:
            raise InvalidAddress(f"empty address in {name}: {item!r}", address=item)
        # Counted as each is read, to raw input's bound: by 64 KiB a field alone, five
        # fields named 25,000 mailboxes, in bytes that prepare() then refused as raw input.
        counted.add(parsed)
        if recipients is not None:
            recipients.add(parsed)
        out.extend(parsed)
    return tuple(out)


def _parts(attachments: object) -> tuple[Part, ...]:
    # A tuple or a list on the common path: the ABC check only for anything else.
    if not isinstance(attachments, tuple | list) and (
        isinstance(attachments, str | bytes | bytearray) or not isinstance(attachments, Sequence)
    ):
        raise InvalidMessage(
            f"attachments must be a sequence of Attachment, not {type(attachments).__name__}"
        )
    parts = tuple(_part(attachment) for attachment in attachments)
    seen: set[str] = set()
    for part in parts:
        if part.content_id is None:
            continue
        # RFC 2392: a Content-ID names one body part; with two, which one a cid: URL
        # shows is up to each reader.
        if part.content_id in seen:
            raise InvalidAttachment(
                f"attachment {shorten(part.filename)} repeats Content-ID "
                f"{shorten(part.content_id)} of an earlier attachment; each must be unique",
                filename=part.filename,
            )
        seen.add(part.content_id)
    return parts


def _part(attachment: object) -> Part:
    if not isinstance(attachment, Attachment):
        raise InvalidMessage(
            f"attachments must be Attachment values, not {type(attachment).__name__}"
        )
    filename = attachment.filename
    if not isinstance(filename, str):
        raise InvalidMessage(f"attachment filename must be a str, not {type(filename).__name__}")
    if len(filename) > MAX_FIELD:
        check_field_size("Content-Disposition", len(filename))
    check_header_text("attachment filename", filename)
    if not filename.strip():
        # Sent as filename="": readers show a nameless file ("noname") and save it
        # without its type's extension. The name is required; a blank one is a mistake.
        raise InvalidAttachment(
            f"attachment filename is blank ({shorten(filename)}); give the name the "
            "recipient sees, e.g. 'invoice.pdf'",
            filename=filename,
        )
    content = attachment.content
    if not isinstance(content, bytes | bytearray | memoryview):
        raise InvalidAttachment(
            f"attachment {shorten(filename)} content must be bytes, not {type(content).__name__}",
            filename=filename,
        )
    if not isinstance(attachment.inline, bool):
        # Read by its truth, inline="false" sent the file as Content-Disposition inline.
        raise InvalidAttachment(
            f"attachment {shorten(filename)} inline must be True or False, "
            f"not {shown(attachment.inline)}",
            filename=filename,
        )
    content_type, params = _content_type(attachment.content_type, filename)
    cid = None if attachment.content_id is None else _bracketed("Content-ID", attachment.content_id)
    if cid is not None and cid[1:5].lower() == "cid:":
        # The URL the HTML refers to the part by (RFC 2392), not its id: sent as
        # <cid:logo>, no reader matched src="cid:logo" to it, and the image showed broken.
        raise InvalidAttachment(
            f"attachment {shorten(filename)} has Content-ID {shorten(cid)}: give it without "
            f"'cid:' ({shorten(cid[5:-1])}); the HTML refers to it as cid:{shorten(cid[5:-1])}",
            filename=filename,
        )
    return Part(
        filename=filename,
        content=bytes(content),
        content_type=content_type,
        params=params,
        inline=attachment.inline,
        content_id=cid,
    )


def _content_type(value: object, filename: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    def invalid(why: str) -> InvalidAttachment:
        return InvalidAttachment(
            f"attachment {shorten(filename)} has an invalid content type {shorten(str(value))}: "
            f"{why}",
            filename=filename,
        )

    if not isinstance(value, str):
        raise invalid("expected a str")
    check_header_text("attachment content type", value)
    match = _CONTENT_TYPE.fullmatch(value)
    if match is None:
        raise invalid("expected type/subtype, optionally with ; name=value parameters")
    content_type = f"{match[1]}/{match[2]}".lower()
    if content_type.startswith("multipart/"):
        raise invalid("expected type/subtype, not multipart (mailstrom builds those)")
    params = tuple(
        (p[1].lower(), p[2] if p[2] is not None else re.sub(r"\\(.)", r"\1", p[3]))
        for p in _PARAMETER.finditer(match[3])
    )
    if any("*" in name for name, _ in params):
        # RFC 2231 extended or continued parameters are percent-encoded: sent as given, a
        # value could decode to CR LF or anything else. Plain values are encoded here.
        raise invalid("parameter names with '*' (RFC 2231) are not taken; give the plain value")
    seen: set[str] = set()
    for name, _ in params:
        if name in seen:
            # RFC 6838 §4.3. Readers differ on which one counts (the stdlib takes the
            # first): the text would be read in another charset, or saved under another name.
            raise invalid(f"parameter {name!r} is given more than once (RFC 6838 §4.3)")
        seen.add(name)
    return content_type, params

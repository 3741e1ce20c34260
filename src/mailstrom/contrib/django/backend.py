"""``EMAIL_BACKEND = "mailstrom.contrib.django.EmailBackend"``: Django's mail through mailstrom.

Each message is serialised by Django exactly as its SMTP backend would send it
(:func:`smtp_bytes`) and queued as those bytes, with the envelope that backend would use:
the sender from ``from_email``, the recipients from ``recipients()`` (To, Cc and Bcc;
Django keeps Bcc out of the headers). mailstrom checks the bytes and rewrites nothing
(Django already wrote Date, and no Bcc) but the Message-ID Django makes at its host's
name, which is left out for mailstrom to make as for any message (one given in
``headers`` is kept). It also ends the last line with CRLF when Django did not, as
smtplib does too, and folds a MIME part's Content-Type or Content-Disposition that
Django 5.2 writes past SMTP's 998-octet line (a long filename) with RFC 2231
continuations, and a Subject it writes so (a word that long) in RFC 2047 encoded words,
as Django 6 does, and so an ASCII Subject holding a control character (NUL, ESC...); a
line break other than CR and LF (VT, U+2028...) in a Subject is a space, which is what a
reader reads where Django 5.2 folds the Subject at it. A
domain Django 5.2 would write as another domain (IDNA 2003 maps ``ß`` to ``ss``) is
given to it as its A-label, as mailstrom delivers to it. So the receiving server gets
what Django's SMTP backend would have sent it, with mailstrom's Message-ID.
"""

from __future__ import annotations

import contextlib
import copy
import email.charset
import email.encoders
import email.errors
import email.policy
import logging
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from email.header import Header
from email.message import Message
from typing import Any, cast

import django
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.message import BadHeaderError, EmailMessage
from django.core.mail.utils import DNS_NAME
from django.utils.functional import Promise

from mailstrom.client import Mailstrom
from mailstrom.client.common import prepare_for
from mailstrom.config import Config
from mailstrom.contrib.django.conf import UNUSED_CREDENTIALS, UNUSED_TIMEOUT
from mailstrom.contrib.django.params import continued
from mailstrom.contrib.django.shared import discard, get_mailstrom
from mailstrom.errors import (
    HeaderInjection,
    InvalidAddress,
    InvalidMessage,
    MailstromError,
    StoreCorrupt,
)
from mailstrom.message import PreparedMessage
from mailstrom.message.addresses import Group, Mailbox, mailboxes, parse_address_list, parse_mailbox
from mailstrom.message.chars import (
    ASCII_LINE_BREAKS,
    OTHER_LINE_BREAKS,
    bad_header_octet,
    check_header_text,
    replace_controls,
    shorten,
)
from mailstrom.message.encoding import MAX_LINE
from mailstrom.message.envelope import MailboxCount, RecipientCount
from mailstrom.message.headers import check_field_name, check_field_size
from mailstrom.message.trees import check_entity_headers

log = logging.getLogger(__name__)


class EmailBackend(BaseEmailBackend):
    """Queue Django's email in mailstrom's store; its worker delivers it.

    ``send_messages`` returns how many messages were queued. Messages without recipients
    are skipped, as Django's SMTP backend skips them. Invalid input raises mailstrom's
    typed errors (:class:`~mailstrom.InvalidAddress`, :class:`~mailstrom.HeaderInjection`
    (Django's ``BadHeaderError`` too), ... all :class:`~mailstrom.InvalidMessage`, a
    ``ValueError``) and a store that cannot be
    written raises :class:`~mailstrom.StoreError`; the messages of one call are queued
    together or not at all. With ``fail_silently`` those errors are swallowed: an invalid
    message is left out (and not counted), the others are queued. A bad
    ``settings.MAILSTROM`` raises ``ImproperlyConfigured`` either way.

    Each queued message gets the attribute ``mailstrom_id``, for
    ``get_mailstrom().query_status(message.mailstrom_id)``.

    ``timeout``, ``username`` and ``password`` (options of Django's SMTP backend) are not
    used, and a value given for them warns: the store bounds its own waits, and a relay's
    login is ``settings.MAILSTROM["relay"]``.
    """

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        timeout: float | None = None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Django 6.1 deprecates BaseEmailBackend's own fail_silently (reading it warns): a
        # backend that supports it keeps it itself, as Django's SMTP backend does. It comes
        # from get_connection(fail_silently=...) or a MAILERS entry's OPTIONS; the rest
        # (6.1's ``alias``) is the base class's.
        relay = {name: kwargs.pop(name) for name in _SMTP_RELAY_OPTIONS if name in kwargs}
        super().__init__(**kwargs)
        self.fail_silently = fail_silently
        _warn_unused(timeout=timeout, username=username, password=password, relay=relay)

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        messages = [m for m in email_messages if m.recipients()]
        if not messages:
            return 0
        try:
            ms = get_mailstrom()
            now = datetime.now(UTC)
            queued: list[tuple[EmailMessage, PreparedMessage]] = []
            for message in messages:
                try:
                    queued.append((message, prepare_message(message, ms.config, now=now)))
                except MailstromError as exc:
                    if not self.fail_silently:
                        raise
                    # Silent to the caller (Django's AdminEmailHandler sends so), not to
                    # the operator: mail left out leaves a line saying why.
                    log.warning("a message was not queued (fail_silently): %s", exc)
            if not queued:
                return 0
            ids = _enqueue(ms, [prepared for _, prepared in queued], now=now)
        except MailstromError as exc:
            if not self.fail_silently:
                raise
            log.warning("%d message(s) were not queued (fail_silently): %s", len(messages), exc)
            return 0
        for (message, _), message_id in zip(queued, ids, strict=True):
            message.mailstrom_id = message_id  # type: ignore[attr-defined]
        return len(ids)


def _enqueue(ms: Mailstrom, prepared: list[PreparedMessage], *, now: datetime) -> list[str]:
    """Queue ``prepared`` in the store of ``ms``; when that store refuses every call from
    now on (StoreCorrupt: its database file deleted or replaced while open), in the store
    the settings name, opened afresh, once. The process kept its facade, so each send
    failed (or, failing silently, lost its mail) until the web server was restarted;
    a store that still refuses once opened again (a damaged file) raises as before.
    Nothing was written by the refused call: the store refuses before it writes."""
    try:
        return ms.store.enqueue_many(prepared, now=now)
    except StoreCorrupt as exc:
        log.warning("mailstrom's store refuses every call, opening it again: %s", exc)
        discard(ms)
    return get_mailstrom().store.enqueue_many(prepared, now=now)


_SMTP_RELAY_OPTIONS = ("host", "port", "use_tls", "use_ssl", "ssl_keyfile", "ssl_certfile")
"""What Django's SMTP backend takes to name the server it sends through (``get_connection(
host=..., port=..., use_tls=...)``): the base class took them in its ``**kwargs`` and
dropped them, so code written to send through a relay sent straight to each recipient's
MX server without a word."""


def _warn_unused(
    *,
    timeout: float | None,
    username: str | None,
    password: str | None,
    relay: dict[str, object] | None = None,
) -> None:
    """Warn of options of Django's SMTP backend given to this one, which cannot use them:
    ``send_mail(auth_user=..., auth_password=...)`` passes them, and a project moving from
    SMTP keeps them. They were accepted and ignored without a word, the password too. A
    warning, not an error: the mail is still sent (and code written for either backend
    keeps working). ``None``, what Django passes when they are not given, says nothing."""
    if timeout is not None:
        warnings.warn(
            f"mailstrom's EmailBackend does not use timeout={timeout!r}: {UNUSED_TIMEOUT}",
            stacklevel=3,
        )
    given = [name for name, value in (("username", username), ("password", password)) if value]
    if given:
        # The value of neither is shown: a username is often an API key's id.
        warnings.warn(
            f"mailstrom's EmailBackend does not use {' and '.join(given)} (send_mail's "
            f"auth_user, auth_password): {UNUSED_CREDENTIALS}",
            stacklevel=3,
        )
    named = [name for name, value in (relay or {}).items() if value is not None]
    if named:
        # Names only: a key file's path says nothing the warning needs.
        warnings.warn(
            f"mailstrom's EmailBackend does not use {', '.join(named)} (Django's SMTP "
            f"backend's server to send through): {UNUSED_CREDENTIALS}",
            stacklevel=3,
        )


class DjangoHeaderInjection(HeaderInjection, BadHeaderError):
    """:class:`~mailstrom.HeaderInjection` that is Django's ``BadHeaderError`` too: the
    backend raises it where Django's own backends raise ``BadHeaderError``, so that the
    guard Django documents (``except BadHeaderError:`` around ``send_mail``) still
    catches it, and ``except HeaderInjection:`` as well."""


def prepare_message(message: EmailMessage, config: Config, *, now: datetime) -> PreparedMessage:
    """Validate and serialise one Django message as the backend queues it."""
    try:
        return _prepare_message(message, config, now=now)
    except HeaderInjection as exc:
        if isinstance(exc, BadHeaderError):
            raise
        raise DjangoHeaderInjection(exc.reason, header=exc.header) from exc


def _prepare_message(message: EmailMessage, config: Config, *, now: datetime) -> PreparedMessage:
    message = _with_subject_line_breaks_as_spaces(_with_text_header_names(message))
    message = _with_filename_controls_as_underscores(message)
    for name, value in message.extra_headers.items():
        # Django checks header values only: a line break in a name wrote the text after it
        # as header lines of their own (or as the start of the body). Email(headers=...)
        # checks its names with the same function.
        check_field_name(str(name))
        # A value longer than a field may be is longer still as Django writes it (it
        # drops only an address field's comments and white space), and was refused only
        # then: a Cc of 64,000 mailboxes took 7 s to parse and write first.
        written = f"{name}: {value}".encode("utf-8", "surrogatepass")
        check_field_size(str(name), len(written))
    for name, value in _header_values(message):
        if any(character in value for character in ASCII_LINE_BREAKS):
            # Django would raise its BadHeaderError (for CR and LF); this is the same
            # refusal, typed. The email package splits a header's text at the other ASCII
            # line breaks too (Hi<VT>Bcc: ... wrote two lines); the non-ASCII ones
            # (U+0085, U+2028, U+2029) it writes inside encoded words, breaking no line.
            # (The Subject's are spaces by now: _with_subject_line_breaks_as_spaces.)
            raise HeaderInjection(
                f"{name} header value contains a line break: {shorten(value)}", header=name
            )
    for where, text in _mime_header_texts(message):
        check_header_text(where, text)
    # Each address on its own first, so that an error names the one at fault (and the
    # attribute it is in) rather than the whole header Django joins them into.
    count = _AddressCount(config.max_recipients)
    for role, addresses, in_header in _addresses(message):
        for address in addresses:
            if role != "from_email" and address == "":
                # recipients() leaves out an empty entry (a blank User.email, a setting
                # that turns a copy off) and Django's SMTP backend delivers to the rest;
                # the header Django writes with it (``To: bob@example.org, ``) is valid.
                continue
            if in_header:
                mailbox = parse_django_mailbox(role, str(address))
            else:
                mailbox = parse_mailbox(role, str(address))
            count.add(role, mailbox, in_header=in_header)
    if not isinstance(message.body, str | Promise):
        # Django writes the body with str methods: bytes raised AttributeError.
        raise InvalidMessage(
            f"body must be text (str), got {type(message.body).__name__}: decode it first"
        )
    message = _with_a_label_domains(message)
    return prepare_for(
        config,
        _serialised(message, config.max_recipients),
        # Django accepts lazy strings (gettext_lazy) for addresses and writes them as text.
        envelope_from=str(message.from_email),
        envelope_to=[str(address) for address in message.recipients()],
        now=now,
    )


class _AddressCount:
    """The addresses of a message counted as they are first read, and refused as
    prepare() refuses them, before the rest are read: past ``max_recipients`` different
    envelope recipients (To, Cc and Bcc), or past what
    :class:`~mailstrom.message.envelope.MailboxCount` takes in the headers Django writes.
    Each is parsed at tens of µs, and again to write a domain that is not ASCII: 40,000
    entries in ``to`` were all read (4 s) before prepare() refused them."""

    def __init__(self, max_recipients: int) -> None:
        self.recipients = RecipientCount(max_recipients)
        self.in_headers = MailboxCount(max_recipients)

    def add(self, role: str, mailbox: Mailbox, *, in_header: bool) -> None:
        groups = (Group(None, (mailbox,)),)
        if role in ("to", "cc", "bcc"):
            self.recipients.add(groups)
        if in_header:
            self.in_headers.add(groups)


def _with_filename_controls_as_underscores(message: EmailMessage) -> EmailMessage:
    """``message``, or a shallow copy of it in which each attachment's filename has an
    ``_`` for each control character mailstrom refuses in a header (NUL, ESC, DEL, VT,
    U+2028...; see :func:`~mailstrom.message.chars.replace_controls`). The application's
    message is left as it was; a CR or LF is left for the check that refuses it, a
    header injection, as Django refuses it.

    Django writes such a filename as RFC 2231 ``%01`` when it is not ASCII and raw (which
    no header may hold) when it is, and mailstrom refused the message, lost under
    ``fail_silently``. A name taken from an upload or a URL may hold one, and in a file
    name it is hostile to the receiver's file system and terminal: mail clients and
    libraries save it as ``_`` (Thunderbird, go-mail's filename sanitising), so it is
    sent so. A ``MIMEBase`` part the application built is left as it is (and refused)."""
    attachments = message.attachments
    written = [_with_filename_controls_replaced(attachment) for attachment in attachments]
    if all(new is old for new, old in zip(written, attachments, strict=True)):
        return message
    copied = copy.copy(message)
    copied.attachments = written
    return copied


def _with_filename_controls_replaced(attachment: Any) -> Any:
    """One entry of ``attachments``: a ``(filename, content, mimetype)`` whose filename has
    a control character becomes one with ``_`` for it; anything else is itself."""
    if not (isinstance(attachment, tuple) and len(attachment) == 3):
        return attachment  # a MIME part, or an entry of another shape, for Django to refuse
    filename = attachment[0]
    if not isinstance(filename, str | Promise):
        return attachment
    safe = replace_controls(str(filename), "_")
    if safe == str(filename):
        return attachment
    replaced = (safe, *attachment[1:])
    # Django 5.2 and 6 make an EmailAttachment (a named tuple); a plain tuple stays one.
    return attachment._make(replaced) if hasattr(attachment, "_make") else replaced


def _with_subject_line_breaks_as_spaces(message: EmailMessage) -> EmailMessage:
    """``message``, or a shallow copy of it whose subject has a space for each line break
    ``str.splitlines`` sees other than CR and LF (VT, FF, FS, GS, RS, NEL, U+2028,
    U+2029), as Django's SMTP backend sends it. The application's message is left as it
    was; a CR or LF is left for the check that refuses it, as Django refuses it.

    Django's error reports (``mail_admins``, ``AdminEmailHandler``) put an exception's
    text in the subject, replacing only its CR and LF, and fail silently: a VT, FF, FS,
    GS or RS in it was refused as a header injection, and the report lost without a
    trace. Django 5.2 writes the subject in ``email.header.Header``, which folds it at
    each of them (each piece an encoded word when the subject is not ASCII), and a
    reader unfolds a fold to a space; a space breaks no line, so nothing after it can
    become a header field of its own. Django's own backend raises, past
    ``fail_silently``, where Django 5.2 finds that the text after the break reads as a
    header field (``HeaderParseError``) and under Django 6 for any of them (its email
    policy's ``ValueError``): written with a space, that subject is sent too. A line
    break in another header is still refused (the application wrote that header)."""
    subject = str(message.subject)
    if OTHER_LINE_BREAKS.search(subject) is None:
        return message
    spaced = copy.copy(message)
    spaced.subject = OTHER_LINE_BREAKS.sub(" ", subject)
    return spaced


def _with_text_header_names(message: EmailMessage) -> EmailMessage:
    """``message``, or a shallow copy of it whose ``headers`` names that are lazy strings
    (``gettext_lazy``) are their text, as Django's SMTP backend writes them. Django turns
    a lazy value into text, not a name: the message it built held the lazy object as the
    field's name, which the checks of the built message could not read (InvalidMessage
    for a valid field). The application's message is left as it was."""
    headers = message.extra_headers
    if not any(isinstance(name, Promise) for name in headers):
        return message
    text = copy.copy(message)
    text.extra_headers = {
        str(name) if isinstance(name, Promise) else name: value for name, value in headers.items()
    }
    return text


_ADDRESS_FIELDS = frozenset(
    {
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "resent-from",
        "resent-sender",
        "resent-to",
        "resent-cc",
        "resent-bcc",
    }
)
"""The fields Django 5.2 writes as addresses (its ``ADDRESS_HEADERS``), a domain in them
with the standard library's IDNA 2003 codec."""


def _with_a_label_domains(message: EmailMessage) -> EmailMessage:
    """``message``, or a shallow copy of it in whose addresses each domain that Django
    would write as another domain is its A-label, as mailstrom delivers to it.

    Django 5.2 writes a domain that is not ASCII with the standard library's ``"idna"``
    codec, IDNA 2003, which maps ``ß`` to ``ss`` (a final sigma to sigma, and drops the
    joiners): ``bob@faß.example`` was sent to ``xn--fa-hia.example`` (IDNA 2008, see
    :func:`mailstrom.domains.a_label`) under a To naming ``fass.example``, another
    domain, whose owner then got the replies to all; a Reply-To or a From named it alone.
    A domain the codec refuses (Unicode newer than IDNA 2003) made Django raise. Written
    as its A-label, each header names the domain the envelope goes to; every other
    address is left as given. The application's message is left as it was."""
    changes: dict[str, Any] = {}
    for attribute in ("to", "cc", "reply_to"):
        addresses = getattr(message, attribute)
        written = [_a_label_domains(attribute, address) for address in addresses]
        if any(new is not old for new, old in zip(written, addresses, strict=True)):
            changes[attribute] = written
    from_email = _a_label_domains("from_email", message.from_email)
    if from_email is not message.from_email:
        changes["from_email"] = from_email
    headers = {
        name: _a_label_domains(str(name), value) if str(name).lower() in _ADDRESS_FIELDS else value
        for name, value in message.extra_headers.items()
    }
    if any(headers[name] is not value for name, value in message.extra_headers.items()):
        changes["extra_headers"] = headers
    if not changes:
        return message
    copied = copy.copy(message)
    for attribute, value in changes.items():
        setattr(copied, attribute, value)
    return copied


def _a_label_domains(field: str, value: Any) -> Any:
    """``value`` (one address or a list of them, as text), with each domain Django would
    write as another domain written as its A-label; ``value`` itself when there is none.
    A value mailstrom cannot read is left as it is, for the checks to refuse."""
    if not isinstance(value, str | Promise):
        return value
    text = str(value)
    if text.isascii():
        return value
    try:
        found = mailboxes(parse_address_list(field, text))
    except InvalidMessage:
        return value
    written = text
    for mailbox in found:
        domain = mailbox.address.written.rpartition("@")[2]
        a_label = mailbox.address.envelope.rpartition("@")[2]
        if domain.isascii() or _django_domain(domain) == a_label:
            continue
        written = written.replace(f"@{domain}", f"@{a_label}")
    return value if written == text else written


def _django_domain(domain: str) -> str | None:
    """``domain`` as Django 5.2 writes it (``django.utils.encoding.punycode``), in lower
    case; None when it cannot."""
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


def _serialised(message: EmailMessage, max_recipients: int) -> bytes:
    """:func:`smtp_bytes`, with what Django and the standard library raise for input they
    cannot serialise (an unknown charset, a lone surrogate...) turned into
    :class:`InvalidMessage`, so that ``fail_silently`` leaves out that message only. The
    checks above name the common cases more precisely.

    Every MIME part's header fields are checked on the message Django built, before it is
    written: a ``MIMEBase`` part the application attached holds what it was given, and
    neither Django nor (on every Python) the standard library refuses a line break in it.
    """
    with _typed("Django cannot build the message"):
        built = _built(message)
    if not any(str(name).lower() == "message-id" for name in message.extra_headers):
        # Django makes it at the host's name (socket.getfqdn(): localhost, a container's
        # id, an internal name), which leaks that name and which spam filters score, and
        # anew at each message() call, so no application knows it: mailstrom makes it, as
        # for any message (at MAILSTROM["message_id_domain"], else the From domain). One
        # the application gave, in headers or set by its own message(), is kept.
        _drop_djangos_message_id(built)
    check_entity_headers(built, max_recipients=max_recipients)
    with _typed("Django cannot serialise the message"):
        _quote_unsendable_text(built)
        _fold_long_parameters(built)
        return _as_bytes(built)


def _drop_djangos_message_id(built: Message) -> None:
    """Take out of ``built`` the Message-ID Django writes itself, ``make_msgid(
    domain=DNS_NAME)``, and keep any other: one an ``EmailMessage`` subclass's
    ``message()`` set (to thread the replies to it) was dropped too, and mailstrom's sent
    in its place, so the application's record of it named no mail. A subclass that
    added its own beside Django's (``msg["Message-ID"] = ...`` appends) sends its own."""
    found = built.get_all("Message-ID", [])
    django_made = re.compile(rf"<\d+\.\d+\.\d+@{re.escape(str(DNS_NAME))}>")
    kept = [value for value in found if django_made.fullmatch(str(value).strip()) is None]
    if len(kept) == len(found):
        return
    del built["Message-ID"]
    for value in kept:
        # As the email package adds it: Django's part would check and encode anew a
        # value it took already (as in _fold_long_parameters).
        Message.__setitem__(built, "Message-ID", value)


_UNSENDABLE_DATA = re.compile(rf"\0|(?<![^\r\n])[^\r\n]{{{MAX_LINE + 1}}}")
"""What 7bit or 8bit data may not carry (RFC 2045 §2.7, §2.8): a NUL, or a line past 998
octets (a payload written 7bit or 8bit holds one character per octet). A long line is
looked for from line starts only: tried at every offset, a megabyte of 900-character
lines took 3 s."""


def _quote_unsendable_text(built: Message) -> None:
    """Write quoted-printable each text part Django writes as 7bit or 8bit data that holds
    a NUL or a line past 998 octets, which such data may not carry (RFC 2045 §2.7, §2.8)
    and mailstrom refuses (ForbiddenCharacter, LineTooLong); quoted-printable carries a
    NUL as ``=00`` and breaks a long line with soft line breaks, and a reader decodes the
    same text. Any other such leaf part is written base64: Django encodes its own
    attachments so, but keeps the parts of a message it attaches as ``message/rfc822``
    as it parsed them (a saved mail whose JSON or XML body is one long line).

    Django forms refuse a NUL, but not a URL: Django's error report for a bot's
    ``/blog/%00`` (a 500 where the path reaches PostgreSQL, which refuses a NUL) holds
    the path, decoded, in its text and HTML, so that report, failing silently, was lost.
    Django writes a long line quoted-printable itself (its ticket #22561), but only in
    UTF-8: with ``encoding = "us-ascii"`` it wrote the line as it was, which its SMTP
    backend sends and a server refuses (aiosmtpd: ``500 Line too long``). Every other
    part is left as Django writes it; a ``message/rfc822`` part cannot be
    quoted-printable (RFC 2046 §5.2.1) and is still refused.
    """
    for part in built.walk():
        payload = part.get_payload()
        if not isinstance(payload, str) or _UNSENDABLE_DATA.search(payload) is None:
            continue  # (a multipart's payload is its parts)
        encoding = str(part.get("Content-Transfer-Encoding", "7bit")).lower()
        maintype = part.get_content_maintype()
        if encoding not in ("7bit", "8bit") or maintype in ("multipart", "message"):
            continue  # (a message/rfc822 part may not be encoded: RFC 2046 §5.2.1)
        if maintype != "text":
            data = cast(bytes, part.get_payload(decode=True))
            del part["Content-Transfer-Encoding"]
            Message.set_payload(part, data)
            email.encoders.encode_base64(part)
            continue
        name = part.get_content_charset() or "us-ascii"
        charset = email.charset.Charset(name)
        charset.body_encoding = email.charset.QP
        text = cast(bytes, part.get_payload(decode=True)).decode(name)
        del part["Content-Transfer-Encoding"]
        # As the email package sets it, not through Django's part (as below).
        Message.set_payload(part, text, charset)


_REFOLDED_FIELDS = frozenset({"content-type", "content-disposition", "subject"})
"""The fields written afresh when Django 5.2 writes them past 998 octets: the MIME part
fields whose parameters hold what the application gave (a filename), and the Subject,
whose text may hold a word that long (the path in an error report's subject). Not the
others: encoded words in a structured field (a Message-ID, a URL in List-Unsubscribe)
would change what it says, so those are still refused."""


def _fold_long_parameters(built: Message) -> None:
    """Write again, folded with RFC 2231 continuations (``filename*0*=...;
    filename*1*=...``), each Content-Type or Content-Disposition field that Django's
    writer would put on a line past 998 octets, which mailstrom refuses (LineTooLong),
    and each such Subject in RFC 2047 encoded words (``=?utf-8?q?...?=``), which a reader
    decodes to the same text.

    Django 5.2's compat32 writer folds only between parameters, so the filename of an
    attachment goes whole onto one line: about 110 CJK characters (9 octets each as
    ``%E5%A0%B1``) were enough for a message no one could send. Each parameter that does
    not fit a line is split (:func:`.params.continued`), as Django 6's writer does
    itself; every other parameter, field, and each field that fits, is left as Django
    writes it.

    The Subject, folded only at white space by Django 5.2: one word of ~990 characters
    (an error report to ADMINS for a long URL path) was refused, and silently, since
    Django's error reports fail silently. A Subject holding a control character is
    written afresh too (:func:`_afresh`).
    """
    for part in built.walk():
        fields = part.items()
        top = part is built
        if not any(_afresh(part, name, value, top=top) is not None for name, value in fields):
            continue
        for name in {name for name, _ in fields}:
            del part[name]
        # Added back in their order, each field _afresh() names written afresh: the
        # parameter split in pieces (the Subject in encoded words), on one line, which
        # compat32 then folds between them, at each "; " (each space). Added as the
        # email package adds them, not through Django's part: each value is one Django
        # took already, and it refuses a line break, which is in each it folded itself
        # (an encoded From name or header value past 76 characters).
        for name, value in fields:
            afresh = _afresh(part, name, value, top=top)
            Message.__setitem__(part, name, value if afresh is None else afresh)


def _afresh(part: Message, name: str, value: Any, *, top: bool) -> str | None:
    """The value ``name`` is written with instead of ``value``, or None to keep it.

    Besides a field too long (see :func:`_fold_long_parameters`), the message's own
    Subject when it holds a control character mailstrom refuses in a header (NUL, ESC,
    DEL...): Django writes an ASCII subject as it is, and one that is not ASCII in RFC
    2047 encoded words, which carry them. The subject of Django's error report holds the
    request's path, decoded (a bot's ``/blog/%1B`` that ended in a 500): that report,
    failing silently, was lost. It is written in encoded words
    as the one that is not ASCII is. The line breaks (VT, FF...) are spaces by now
    (:func:`_with_subject_line_breaks_as_spaces`)."""
    if top and name.lower() == "subject":
        text = str(value)
        if text.isascii() and bad_header_octet(text.encode("ascii"), 0, len(text)) >= 0:
            return str(Header(text, "utf-8", header_name=name).encode())
    if not _too_long(part, name, value):
        return None
    if name.lower() != "subject":
        # Each parameter that does not fit a line in continuations of its own, which the
        # writer folds between (see .params for why not the SMTP policy's folder).
        return continued(str(value), _FITTING_PARAMETER)
    folded: str = email.policy.SMTP.fold(name, str(value))
    # Unfolded (RFC 5322 §2.2.3: the line breaks taken out, white space kept) and without
    # the name.
    return folded.partition(":")[2].replace("\r\n", "").strip(" ")


_FITTING_PARAMETER = 76
"""The longest parameter a Content-Type or Content-Disposition written afresh keeps as it
was: with the fold's leading space and the ``;`` after it, its line stays within 78."""


def _too_long(part: Message, name: str, value: Any) -> bool:
    if name.lower() not in _REFOLDED_FIELDS:
        return False
    written = part.policy.fold(name, value)
    return any(len(line.encode()) > MAX_LINE for line in written.splitlines())


_BAD_HEADER_NAME = re.compile(r"for header '([^'\r\n]{1,200})'\)$")
"""The header Django names in its ``BadHeaderError`` (``... for header 'In-Reply-To')``)."""


@contextlib.contextmanager
def _typed(what: str) -> Iterator[None]:
    try:
        yield
    except BadHeaderError as exc:
        # Django refused a line break in a header it was given to write, one the checks
        # above do not see (a header an EmailMessage subclass's message() sets): raised
        # as the InvalidMessage below, it went past the guard Django documents (``except
        # BadHeaderError:`` around send_mail), which catches it from Django's backends.
        found = _BAD_HEADER_NAME.search(str(exc))
        header = found.group(1) if found is not None else ""
        raise HeaderInjection(f"{what}: {shorten(str(exc))}", header=header) from exc
    except (
        ValueError,
        LookupError,
        email.errors.MessageError,
        TypeError,
        AttributeError,
        RecursionError,
    ) as exc:
        # ValueError covers UnicodeError; LookupError an unknown ``encoding``;
        # MessageError the email package's HeaderParseError; TypeError and
        # AttributeError a value of a type Django does not write (an attachment's
        # content or type None, an alternative added as a plain tuple);
        # RecursionError what the email package's parsers, which Django runs, raise for
        # input nested past the stack: a message/rfc822 attachment (a received mail
        # forwarded) 2,000 levels deep, or a Reply-To given in headers with 3,000 "(".
        # The stack is unwound by now, so carrying on is safe.
        raise InvalidMessage(f"{what}: {type(exc).__name__}: {shorten(str(exc))}") from exc


def smtp_bytes(message: EmailMessage) -> bytes:
    """The bytes Django's own SMTP backend would send for ``message`` (Date and
    Message-ID are made afresh at each call, MIME boundaries too)."""
    return _as_bytes(_built(message))


def _built(message: EmailMessage) -> Message:
    built: Any = message  # message()'s signature and result type changed in Django 6
    if django.VERSION >= (6, 0):
        return cast(Message, built.message(policy=email.policy.SMTP))
    return cast(Message, built.message())


def _as_bytes(built: Message) -> bytes:
    if django.VERSION >= (6, 0):
        return bytes(built.as_bytes())
    safe: Any = built  # Django 5.2's SafeMIME classes take the line separator
    return bytes(safe.as_bytes(linesep="\r\n"))


def parse_django_mailbox(role: str, address: str) -> Mailbox:
    """:func:`~mailstrom.message.addresses.parse_mailbox`, refusing too the addresses
    Django cannot write: one whose local part is not ASCII.

    Django writes its headers without SMTPUTF8 (``email.policy.SMTP`` from Django 6), so
    Django 5.2 writes such a local part as an RFC 2047 encoded word
    (``=?utf-8?b?asO2?=@example.org``, in its SMTP backend's envelope too), which is no
    address (RFC 2047 §5). mailstrom refused that header, and ``InvalidAddress.address``
    was the encoded word, which the application never wrote; the system check
    (``mailstrom.W001``) said nothing of such a ``SERVER_EMAIL`` or ``ADMINS`` entry.
    """
    mailbox = parse_mailbox(role, address)
    if mailbox.address.smtputf8:
        raise InvalidAddress(
            f"{role}: {mailbox.address.written!r} has a local part that is not ASCII, which "
            "Django cannot write in a header: it makes it an RFC 2047 encoded word, which "
            "is no address (RFC 2047 §5); use an ASCII address",
            address=mailbox.address.written,
        )
    return mailbox


def _addresses(message: EmailMessage) -> Iterable[tuple[str, Sequence[str], bool]]:
    """Each attribute's addresses, and whether Django writes them in a header: never Bcc,
    and not those whose header ``headers`` gives (its key spelt as Django looks it up);
    those are only in the envelope, which mailstrom sends with SMTPUTF8 when need be."""
    given = message.extra_headers
    yield "from_email", [message.from_email], "From" not in given
    yield "to", message.to, "To" not in given
    yield "cc", message.cc, "Cc" not in given
    yield "bcc", message.bcc, False
    yield "reply_to", message.reply_to, "Reply-To" not in given


def _header_values(message: EmailMessage) -> Iterable[tuple[str, str]]:
    """The header values Django refuses line breaks in (``forbid_multi_line_headers``)."""
    yield "Subject", str(message.subject)
    yield "From", str(message.from_email)
    for name, addresses in (("To", message.to), ("Cc", message.cc), ("Reply-To", message.reply_to)):
        for address in addresses:
            yield name, str(address)
    for name, value in message.extra_headers.items():
        yield str(name), str(value)


def _mime_header_texts(message: EmailMessage) -> Iterable[tuple[str, str]]:
    """Attachment filenames and content types, which Django writes into MIME part headers:
    a line break in a filename added header lines to its part (and the standard library
    raised ``HeaderParseError`` for a CRLF), one in a type raised ``BadHeaderError``."""
    # An entry of another shape (appended to the list by hand) is left to Django, whose
    # error _serialised() turns into InvalidMessage: unpacked here, its bare ValueError
    # went past fail_silently.
    for attachment in message.attachments:
        # (filename, content, mimetype); not a MIME part
        if isinstance(attachment, tuple) and len(attachment) == 3:
            filename, _, mimetype = attachment
            if filename:
                yield "attachment filename", str(filename)
            if mimetype:
                yield "attachment content type", str(mimetype)
    for alternative in getattr(message, "alternatives", ()):
        if isinstance(alternative, tuple | list) and len(alternative) == 2:  # (content, mimetype)
            yield "alternative content type", str(alternative[1])

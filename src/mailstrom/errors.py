"""The one error tree of mailstrom, rooted at :class:`MailstromError`.

Input errors (:class:`InvalidMessage` and its subclasses) are raised at the boundary where
bad input enters, before anything is queued. Delivery errors carry the SMTP reply and the
host so the worker can record them; they are split into :class:`TemporaryFailure` (retry
later) and :class:`PermanentFailure` (give up now).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailstrom.status import SMTPReply


class MailstromError(Exception):
    """Base class of every error raised by mailstrom."""

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its class, ``args`` and attributes, rebuilt without calling
        ``__init__``: an error with keyword-only fields (``InvalidAddress(reason,
        address=...)``) was pickled as ``args`` alone, the default, and could not be
        unpickled, so one raised in a process pool's worker broke the pool instead of
        reaching the caller (and ``copy.copy`` failed alike)."""
        return (_rebuilt, (type(self), self.args), self.__dict__ or None)


def _rebuilt(cls: type[MailstromError], args: tuple[Any, ...]) -> MailstromError:
    """An error of ``cls`` holding ``args``; pickle then restores its attributes."""
    error = cls.__new__(cls, *args)
    error.args = args
    return error


# --- bad input at submission -------------------------------------------------------------


class InvalidMessage(MailstromError, ValueError):
    """The message cannot be accepted; ``reason`` says precisely why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidMessageType(InvalidMessage, TypeError):
    """What was given as a message is none: not an :class:`~mailstrom.Email`, an
    :class:`~email.message.EmailMessage` or bytes (a ``str`` neither: encode RFC 5322
    text first), or ``send_emails`` was given one message or something else where it
    takes a collection of them. A TypeError too, as it was before it was typed."""


class MissingFrom(InvalidMessage):
    """The message has no From header (RFC 5322 §3.6 requires one)."""


class MultipleFromWithoutSender(InvalidMessage):
    """Several From mailboxes but no Sender header (RFC 5322 §3.6.2)."""


class NoRecipients(InvalidMessage):
    """Neither the headers nor the explicit envelope name any recipient."""


class InvalidAddress(InvalidMessage):
    """An address is not a valid addr-spec; ``address`` is the offending text."""

    def __init__(self, reason: str, *, address: str) -> None:
        super().__init__(reason)
        self.address = address


class HeaderInjection(InvalidMessage):
    """A header name or value contains CR or LF (an attempt to add headers)."""

    def __init__(self, reason: str, *, header: str) -> None:
        super().__init__(reason)
        self.header = header


class LineTooLong(InvalidMessage):
    """A line is longer than 998 octets (RFC 5322 §2.1.1)."""


class MessageTooLarge(InvalidMessage):
    """The encoded message exceeds the configured maximum size."""

    def __init__(self, reason: str, *, size: int, limit: int) -> None:
        super().__init__(reason)
        self.size = size
        self.limit = limit


class UnencodableHeader(InvalidMessage):
    """A header holds non-ASCII text in a place that cannot be encoded (RFC 2047)."""


class ForbiddenCharacter(InvalidMessage):
    """A character that must not appear there: NUL or another control character in a
    header value, a name or a filename; NUL in a 7bit/8bit body; or a lone surrogate that
    has no UTF-8 form. ``where`` names the field or part."""

    def __init__(self, reason: str, *, where: str) -> None:
        super().__init__(reason)
        self.where = where


class HeaderTooLong(InvalidMessage):
    """A header field, or a whole header section (``header`` is then ``"header
    section"``), is longer than the limit (``size`` and ``limit`` in octets)."""

    def __init__(self, reason: str, *, header: str, size: int, limit: int) -> None:
        super().__init__(reason)
        self.header = header
        self.size = size
        self.limit = limit


class TooManyRecipients(InvalidMessage):
    """More envelope recipients than ``Config.max_recipients`` allows."""

    def __init__(self, reason: str, *, count: int, limit: int) -> None:
        super().__init__(reason)
        self.count = count
        self.limit = limit


class NestingTooDeep(InvalidMessage):
    """MIME parts are nested deeper than the limit (multipart and message/rfc822 levels)."""

    def __init__(self, reason: str, *, limit: int) -> None:
        super().__init__(reason)
        self.limit = limit


class TooManyHeaderFields(InvalidMessage):
    """A header section (the message's own, or a MIME part's) has more fields than the
    limit; ``count`` and ``limit`` are numbers of fields."""

    def __init__(self, reason: str, *, count: int, limit: int) -> None:
        super().__init__(reason)
        self.count = count
        self.limit = limit


class TooManyParts(InvalidMessage):
    """The message has more MIME parts than the limit (every entity counts, nested ones
    and the message itself included); ``limit`` is that number."""

    def __init__(self, reason: str, *, limit: int) -> None:
        super().__init__(reason)
        self.limit = limit


class InvalidAttachment(InvalidMessage):
    """An attachment cannot be sent as given (its content type, or content that its type
    does not allow); ``filename`` names it."""

    def __init__(self, reason: str, *, filename: str) -> None:
        super().__init__(reason)
        self.filename = filename


class UnknownContentID(InvalidMessage):
    """The HTML body refers to ``cid:<content_id>`` (in a ``src`` or ``href``) and no
    attachment has that ``content_id``: readers would show a broken image or link (RFC
    2392). ``content_id`` is the id the HTML names, percent-decoded."""

    def __init__(self, reason: str, *, content_id: str) -> None:
        super().__init__(reason)
        self.content_id = content_id


class InvalidHeaderValue(InvalidMessage):
    """A header value is malformed: one a builder field produces (an unsubscribe URI that
    is not https or mailto, an Auto-Submitted keyword RFC 3834 does not define, a
    Feedback-ID with spaces), a Message-ID that is not ``<id-left@id-right>`` (RFC 5322
    §3.6.4), a raw message's Date that cannot be read, an ``Email.date`` before 1900
    (RFC 5322 §3.3), a stdlib message's MIME parameter name too long for the stdlib
    to write, or a stdlib message's structured field of more tokens than the stdlib
    parses in bounded work (``message.bounds.MAX_STRUCTURED_TOKENS``). ``header`` names
    the field."""

    def __init__(self, reason: str, *, header: str) -> None:
        super().__init__(reason)
        self.header = header


class NoDKIMKey(InvalidMessage):
    """DKIM signing is required (``dkim.required``) but no configured key aligns with the
    From domain, so the message would go out unsigned; ``domains`` names the From
    domains."""

    def __init__(self, reason: str, *, domains: tuple[str, ...]) -> None:
        super().__init__(reason)
        self.domains = domains


class InvalidQueueAttribute(InvalidMessage):
    """A queue attribute given at submission is unusable: a tag, a metadata entry, a
    priority lane, a schedule or an idempotency key; ``field`` names it (``"tags"``,
    ``"metadata"``, ``"priority"``, ``"send_at"``, ``"expires_at"``, ``"max_age"``,
    ``"idempotency_key"``)."""

    def __init__(self, reason: str, *, field: str) -> None:
        super().__init__(reason)
        self.field = field


class InvalidTag(InvalidQueueAttribute):
    """A tag is empty, too long, holds a character outside the allowed set, or there are
    too many tags (see :mod:`mailstrom.message.attributes` for the limits)."""


class InvalidMetadata(InvalidQueueAttribute):
    """A metadata key or value is not a string, is too long or holds a control character,
    or there are too many entries or octets."""


# --- store and queue ---------------------------------------------------------------------


class StoreError(MailstromError):
    """The store failed: by default a passing trouble (database locked or unreachable, a
    connection lost) that is worth trying again later. Its text shows every password of
    a URL or connection string it quotes as ``***``."""

    def __str__(self) -> str:
        # A driver's message may quote the connection string, and this text goes to
        # many places (log lines, worker_status, /healthz, the dashboard, a caller's own
        # logs): hidden here once, rather than by each of them, some of which did not.
        from mailstrom.stores.url import redact_url  # here: url.py imports this module

        return redact_url(super().__str__())

    def __repr__(self) -> str:
        # Each argument redacted before repr() escapes it: redacted after, a password
        # quoted in a message holding both quote marks was written \'sec ret\' and kept.
        from mailstrom.stores.url import redact_url

        shown = (repr(redact_url(a)) if isinstance(a, str) else repr(a) for a in self.args)
        return f"{type(self).__name__}({', '.join(shown)})"


class StoreCorrupt(StoreError):
    """The store cannot be used and trying again will not help: its file is damaged or
    is no database, its schema is from a newer mailstrom, or the database file was deleted
    or replaced while in use (or its ``-shm`` file deleted). Workers stop on it (the
    command line exits 74) instead of retrying forever."""


def newer_schema_advice(*, while_open: bool = False) -> str:
    """What a :class:`StoreCorrupt` for a schema newer than this mailstrom knows tells
    the reader to do (``while_open``: a newer mailstrom migrated it while this process
    had the store open). A process runs the mailstrom it started with: the one installed
    may be the newer one already (a rolling upgrade), and a restart is then what it
    needs. Neither at open nor later can it tell which, so it says both."""
    if while_open:
        return (
            " (a newer mailstrom migrated it while this one had it open); restart this"
            " process, or upgrade mailstrom first where it is not the newer one yet"
        )
    return (
        "; upgrade mailstrom, or restart this process if it is upgraded already (a"
        " process runs the mailstrom it started with)"
    )


class StoreRefusedData(StoreError):
    """The store refused a value it was asked to write (a constraint, a number out of its
    range, text its encoding cannot hold): writing the same again will not help, other
    values may. A worker records a result the store refuses with its details stripped
    rather than retrying it for ever."""


class StoreLocked(StoreError):
    """The store waited its longest for a lock another session holds (PostgreSQL's
    ``lock_timeout``: an operator's ``LOCK TABLE`` left open, a long ``ALTER TABLE`` or
    ``CREATE INDEX``, a stuck migration; SQLite's ``busy_timeout``: another process or
    connection holding the database's write lock, one stopped mid-write among them) and
    gave up: nothing was written. A passing trouble like any :class:`StoreError` (the
    command line exits 75, a worker keeps its results and tries again); the message names
    the lock's holder when the server says."""


class StoreUnreachable(StoreError):
    """The store's server could not be reached, or went away mid-call: a connection
    refused, lost or timed out, a pool with no connection to give, a server shutting
    down. A passing trouble like any :class:`StoreError`; told apart because a worker
    that cannot reach a shared queue's server may be taken for dead by the workers that
    can (see :mod:`mailstrom.stores.postgres.holders`), and so stops starting the work it
    leased."""


class UnreadableRow(StoreError):
    """A queue row the store cannot read back as mailstrom wrote it (changed by hand, by
    a bug in another version sharing the database, by a partial restore or bit rot): a
    column of the wrong type or out of range, bytes that are not the size stored, a
    recipient whose message row is gone. Only that message is affected: the worker fails
    its recipients as "queue row unreadable: ..." and lists of the queue leave it out
    with a warning. Reading it again will not help (the command line exits 65). A cached
    MTA-STS policy's row raises it too (the policy is then fetched again: see
    :mod:`~mailstrom.stores.side_rows`)."""


class StoreAccessDenied(StoreError):
    """The database server answered and would not let this store in: a wrong password,
    a role or database that does not exist, no ``pg_hba.conf`` entry, or a role that may
    not create the tables this mailstrom needs; or a SQLite store's file or directory
    that this user may not read or write, or a path that can never be its file as it
    is (a component that is a file, a symlink loop: see
    :data:`~mailstrom.stores.url.PERMANENT_ERRNOS`). Trying again will not help until an
    operator changes the configuration or the database, so a worker that is starting
    fails on it (the command line exits 78) where it waits out a database that does not
    answer at all."""


class UnknownMessage(MailstromError, KeyError):
    """No message with this id is in the store."""

    def __init__(self, message_id: object) -> None:
        if not isinstance(message_id, str):
            # None, 5 or b"..." name no message: say what was given, briefly, as text
            # (len() of one failed str(), and with it every log of the error).
            from mailstrom.arguments import shown  # it imports this module

            message_id = f"<{type(message_id).__name__} {shown(message_id)}>"
        super().__init__(message_id)
        self.message_id: str = message_id

    def __str__(self) -> str:
        return f"unknown message id: {self.shown_id!r}"

    @property
    def shown_id(self) -> str:
        """``message_id`` as errors quote it: at most 64 characters (an id has 32)."""
        text = self.message_id
        return text if len(text) <= 64 else text[:61] + "..."


class AmbiguousMessageId(UnknownMessage):
    """A short id (a prefix) starts more than one message id; ``candidates`` lists some of
    them (``more`` when there are others). A subclass of :class:`UnknownMessage`: code
    that handles "no such message" handles "no single such message" too."""

    def __init__(self, prefix: str, candidates: list[str], *, more: bool = False) -> None:
        super().__init__(prefix)
        self.candidates = candidates
        self.more = more

    def __str__(self) -> str:
        listed = ", ".join(self.candidates) + (", ..." if self.more else "")
        return f"ambiguous message id {self.shown_id!r}: it starts {listed}"


class InvalidArgument(MailstromError, ValueError):
    """An argument of a queue call cannot be used: a
    :class:`~mailstrom.stores.QueueFilter` field, a limit or cap, an age or duration, a
    time, a destination domain or a timeout, of the wrong type or out of range.
    ``argument`` names it (``"limit"``, ``"older_than"``, ``"timeout"``, ...). A
    ValueError, whatever was wrong with it, so code that catches ValueError for bad
    input keeps working."""

    def __init__(self, reason: str, *, argument: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.argument = argument


class InvalidStoreURL(MailstromError, ValueError):
    """A store URL names no known scheme or is malformed."""


class ConfigError(MailstromError, ValueError):
    """A configuration value is invalid."""


# --- running -----------------------------------------------------------------------------


class WorkerError(MailstromError, RuntimeError):
    """The background worker failed to start or died."""


# --- delivery ----------------------------------------------------------------------------


class DeliveryError(MailstromError):
    """A delivery attempt failed; carries what the peer said and where.

    ``text`` says what happened in mailstrom's words; ``reply``, when a server's reply
    ended the attempt, is that reply as the server sent it (``code`` and ``enhanced`` are
    its codes), which is what the recipients' status records.
    """

    tls_fallback: DeliveryError | None = None
    """The failed TLS handshake this error's plaintext connection was to replace
    (opportunistic TLS), when that connection failed too; for TLS reports. A class
    default: subclasses with an ``__init__`` of their own have it too."""

    def __init__(
        self,
        text: str,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        host: str | None = None,
        recipient: str | None = None,
        reply: SMTPReply | None = None,
    ) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.enhanced = enhanced
        self.host = host
        self.recipient = recipient
        self.reply = reply


class TemporaryFailure(DeliveryError):
    """Try again later (4xx reply, network trouble, DNS SERVFAIL/timeout)."""


class PermanentFailure(DeliveryError):
    """Do not try again (5xx reply, null MX, NXDOMAIN, SMTPUTF8 needed but unsupported)."""


class SMTPProtocolError(TemporaryFailure):
    """The peer broke the protocol: a malformed or unsolicited line, or a bad reply."""


class SMTPTimeout(TemporaryFailure, TimeoutError):
    """The peer did not answer within the configured timeout."""


class SMTPConnectError(TemporaryFailure, ConnectionError):
    """A connection to the peer could not be made or was lost."""


LOCAL_SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""Errors of a socket or file this host could not make (out of file descriptors, socket
buffers or memory): the host's own trouble, whatever peer it was made for."""


class LocalResourceShortage(TemporaryFailure):
    """This host ran out of a resource (``LOCAL_SHORTAGE_ERRNOS``), or could not bind the
    ``source_address`` it was given (not one of its addresses), before any server was
    asked: deferred with 4.3.0 (RFC 3463: other or undefined mail system status), as
    Postfix defers for a "local resource shortage", and held against no server: the
    address is not remembered as unreachable, nor a DNS server blamed. Nor against the
    recipients: no attempt is counted (:attr:`~mailstrom.stores.RecipientResult.attempted`),
    and they come back after ``retry.min_delay`` (a recipient the destination had already
    failed in that round, another MX host refusing it say, is deferred with that failure
    instead, an attempt counted)."""

    def __init__(self, what: str, cause: OSError, *, host: str | None = None) -> None:
        super().__init__(
            f"local resource shortage: {what} failed on this host: "
            f"{cause.strerror or cause} (no server was asked)",
            enhanced="4.3.0",
            host=host,
        )


def local_shortage(exc: BaseException) -> OSError | None:
    """The error of this host's own resource shortage that ``exc`` is or carries (one of
    ``LOCAL_SHORTAGE_ERRNOS``; dnspython keeps each server's error in ``errors``), or
    None."""
    if isinstance(exc, OSError):
        return exc if exc.errno in LOCAL_SHORTAGE_ERRNOS else None
    kwargs = getattr(exc, "kwargs", None)
    errors = kwargs.get("errors") if isinstance(kwargs, dict) else None
    for error in errors or ():
        for part in error if isinstance(error, tuple) else (error,):
            if isinstance(part, OSError) and part.errno in LOCAL_SHORTAGE_ERRNOS:
                return part
    return None


class TLSRequiredError(TemporaryFailure):
    """The TLS policy requires STARTTLS but the peer did not offer it or it failed."""


class DaneRequired(TemporaryFailure):
    """The TLS policy ``dane-only`` refused an MX host without usable DNSSEC-validated
    TLSA records (4.7.5): none were found (``unusable`` False: no records, or records or
    MX records DNSSEC did not validate), or all those found are unusable for SMTP
    (``unusable`` True). TLS reports count it as RFC 8460's ``dane-required``."""

    def __init__(self, text: str, *, unusable: bool, host: str | None = None) -> None:
        super().__init__(text, enhanced="4.7.5", host=host)  # RFC 3463: cryptographic
        self.unusable = unusable


class InvalidShapingRule(ConfigError):
    """A traffic shaping rule or setting is invalid: ``pattern`` names the rule (empty for
    a setting of no one rule), ``field`` the offending key, ``reason`` says why."""

    def __init__(self, reason: str, *, pattern: str, field: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.pattern = pattern
        self.field = field


class RequireTLSFailure(PermanentFailure):
    """A REQUIRETLS message (RFC 8689) cannot be sent as it demands: no authenticated TLS
    is possible to the destination, or its server does not offer REQUIRETLS (5.7.30)."""


# --- suppression and bounces -------------------------------------------------------------


class InvalidSuppression(MailstromError, ValueError):
    """A suppression entry (an address or domain, its reason or its expiry) is invalid, or
    a suppression list being imported is malformed or too large."""

    def __init__(self, reason: str, *, line: int | None = None) -> None:
        super().__init__(f"line {line}: {reason}" if line is not None else reason)
        self.reason = reason
        self.line = line


class InvalidReport(MailstromError, ValueError):
    """A bounce or complaint report (``mailstrom bounce``) is malformed: a
    ``multipart/report`` without the part its report type requires, or one whose MIME
    parts nest deeper than :data:`mailstrom.bounces.reports.MAX_DEPTH`."""

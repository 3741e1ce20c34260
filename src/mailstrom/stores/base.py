"""The store interface, at the level of the domain rather than of SQL.

Every store (memory, SQLite, PostgreSQL) implements :class:`Store`, and one contract test
suite (``tests/contract``) runs unchanged against each. A store is synchronous and safe to
share between threads; the asyncio worker calls it through ``asyncio.to_thread`` in batches.

The unit of leasing is the recipient; a lease groups the leased recipients into
:class:`WorkItem` s, one per (message, destination domain), because one SMTP transaction
carries all recipients of one domain. A lease that is not recorded before
``Lease.expires_at`` becomes due again, so a crashed worker loses nothing; results recorded
under a lease whose recipients were taken over by a newer lease are ignored.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, runtime_checkable

from mailstrom.arguments import check_age, check_key, check_limit, member_of, row_limit, shown
from mailstrom.bounds import MAX_INTEGER
from mailstrom.errors import InvalidArgument, StoreError, StoreRefusedData
from mailstrom.message.dsn import DSN
from mailstrom.policy.throttle import MAX_SHAPING_KEY, TokenBucket, TokenGrant
from mailstrom.status import (
    Attempt,
    DeliveryEvent,
    DestinationThrottle,
    DKIMStatus,
    MessageStatus,
    QueueStats,
    ReasonClass,
    RecipientState,
)
from mailstrom.stores.clock import after, kept_time
from mailstrom.stores.operator import (
    IdPage,
    ListingKey,
    ShapeRow,
    Suspension,
    comparable,
    filter_address,
    filter_domain,
)
from mailstrom.suppression import MAX_TARGET, Suppression

if TYPE_CHECKING:
    # Only named in signatures: a worker, which neither enqueues (but for a bounce
    # notice) nor uses MTA-STS or TLS-RPT without their settings, does not load them.
    from mailstrom.message.attributes import QueueAttributes
    from mailstrom.message.prepared import PreparedMessage
    from mailstrom.mtasts.policy import CachedPolicy
    from mailstrom.tlsrpt.sessions import TLSSessions

MAX_REPLY_TEXT = 2048
"""Octets of a peer's reply text (and of a local error) kept per attempt. A hostile server
may send up to a megabyte per reply; Postfix keeps 2,048 octets too."""
VERP_KEY_SIZE = 32
"""Octets of the store's VERP key (BLAKE2s takes keys of up to 32)."""
MAX_HISTORY = 50
"""Attempts kept in a recipient's history; older ones are dropped as new ones are recorded
(the attempt count itself keeps counting). Fifty covers days of backoff at the defaults."""


MAX_STORED_SIZE = 900 * 1024 * 1024
"""Octets of data one message may have in any store (900 MiB): below SQLite's longest
BLOB and row (``SQLITE_MAX_LENGTH``, 10**9 octets) and PostgreSQL's longest statement
parameters (1 GiB in all), with room for the row's other columns.
``Config.max_message_size`` may be set past it (see :func:`check_storable`)."""


def check_storable(messages: Iterable[PreparedMessage], *, now: datetime | None = None) -> None:
    """StoreRefusedData for a message past :data:`MAX_STORED_SIZE`, before a store sends
    anything. Without it, one past 1 GiB made PostgreSQL drop the connection, which read
    as a passing trouble (StoreUnreachable) and was retried for ever.

    :class:`~mailstrom.errors.InvalidArgument` (``recipients``) for a message naming one
    recipient twice (compared in the form prepare() stores: the domain in lower-case
    A-labels, a local part without needless quotes, a role name in lower case), which only
    a direct caller can give: a SQL store's key refused an exact repeat
    (StoreRefusedData), the memory store merged it, and a repeat with its domain in
    another case was queued twice by all three, to be delivered twice. Likewise for one
    naming no recipient (the facades raise NoRecipients): every store queued it, failed
    with nothing to deliver, and each purged it in its own way (SQLite never). And for
    an address, Message-ID, subject or unsigned reason with a NUL or a lone surrogate
    (``prepare`` makes none): queued by some stores, refused by others. And for one of
    no octets (``data``), which the SQL stores failed at its lease as an unreadable row
    and the memory store had sent as it was.

    InvalidArgument too for a naive ``send_at``, ``expires_at`` or ``idempotency_until``
    (:class:`~mailstrom.message.attributes.QueueAttributes` built by hand), named: the
    SQL stores refused one without saying which, the memory store queued it. And for
    one of them, or ``now``, outside the times every store reads back
    (:func:`~mailstrom.stores.clock.kept_time`)."""
    if now is not None:
        kept_time(now, "now")
    for message in messages:
        _check_recipients(message.recipients)
        if not message.data:
            # No store can tell it from data lost: SQLite and PostgreSQL failed its
            # recipients at their lease as unreadable, the memory store sent nothing.
            raise InvalidArgument(
                "data: the message has no octets; give it at least its header",
                argument="data",
            )
        _check_texts(message)
        _check_times(message.attributes)
        if message.size > MAX_STORED_SIZE:
            raise StoreRefusedData(
                f"a message of {message.size} octets cannot be queued: a store holds at most"
                f" {MAX_STORED_SIZE} octets of one message; set max_message_size below that"
            )


def _check_recipients(recipients: Sequence[str]) -> None:
    if not recipients:
        # The facades refuse one (NoRecipients); a store given one queued a message with
        # nothing to deliver, failed at once, that the stores purged each in its own way.
        raise InvalidArgument(
            "recipients: the message names no recipient; name at least one",
            argument="recipients",
        )
    if len(recipients) < 2:
        return
    seen: set[str] = set()
    for address in recipients:
        # The stored form prepare() writes: two spellings of one mailbox (a U-label domain
        # and its A-labels, '"a"@x' and 'a@x', 'Postmaster' and 'postmaster') are one
        # recipient, which two rows would have had delivered twice.
        key = filter_address(address)
        if key in seen:
            raise InvalidArgument(
                f"recipients: {shown(address)} is named twice (a domain's case or U-labels,"
                " needless quotes do not tell two recipients apart); name each recipient once",
                argument="recipients",
            )
        seen.add(key)


def _check_texts(message: PreparedMessage) -> None:
    """InvalidArgument for a text of ``message`` or of its attributes with a NUL
    (PostgreSQL refused it, the others kept it) or a lone surrogate (the SQL stores
    refused it): ``prepare`` never makes one, and only a message built by hand can hold
    them."""
    attributes = message.attributes
    texts: list[tuple[str, Sequence[str | None]]] = [
        ("recipients", message.recipients),
        ("envelope_from", [message.envelope_from]),
        ("header_message_id", [message.header_message_id]),
        ("subject", [message.subject]),
        ("dkim_unsigned", [message.dkim_unsigned]),
        # Attributes built by hand (queue_attributes refuses these characters): a NUL
        # was queued by the memory store and SQLite and refused by PostgreSQL.
        ("idempotency_key", [attributes.idempotency_key]),
        ("priority", [attributes.priority]),
        ("tags", attributes.tags),
        ("metadata", [*attributes.metadata, *attributes.metadata.values()]),
    ]
    for name, values in texts:
        for value in values:
            if isinstance(value, str) and not comparable(value):
                raise InvalidArgument(
                    f"{name}: {shown(value)} holds a NUL or a lone surrogate, which no store keeps",
                    argument=name,
                )


def _check_times(attributes: QueueAttributes) -> None:
    for name in ("send_at", "expires_at", "idempotency_until"):
        when = getattr(attributes, name)
        if when is not None:
            kept_time(when, name)


def check_result_times(results: Iterable[RecipientResult]) -> None:
    """InvalidArgument for a result whose attempt time or ``next_attempt_at`` is naive or
    outside the times every store reads back (:func:`~mailstrom.stores.clock.kept_time`),
    before a store records any of them."""
    for result in results:
        kept_time(result.attempt.at, "attempt.at")
        if result.next_attempt_at is not None:
            kept_time(result.next_attempt_at, "next_attempt_at")


def pause_reply(reply: str) -> str:
    """A throttling ``reply`` as every store keeps it with a pause: NUL and lone
    surrogates as U+FFFD (:func:`storable_text`), as recorded replies are kept. The
    memory store kept them, SQLite refused a surrogate and PostgreSQL either, losing the
    pause."""
    return storable_text(reply)


def check_destination(destination: str | None) -> None:
    """InvalidArgument for a paused ``destination`` (:meth:`Store.throttle`,
    :meth:`Store.postpone`) that not every store can key a pause by: no string, a NUL
    (kept by the memory store and SQLite, refused by PostgreSQL), a lone surrogate
    (refused by both SQL stores) or more than :data:`MAX_SHAPING_KEY` octets (a
    StoreError from PostgreSQL's index). None (postpone without a pause) passes."""
    if destination is not None:
        check_key(destination, "destination", limit=MAX_SHAPING_KEY)


def check_suspension(domain: str, now: datetime, until: datetime | None) -> datetime | None:
    """InvalidArgument for a suspension (:meth:`Store.suspend`) that not every store
    keeps as given, before a store writes anything: a ``domain`` no store can key
    (:func:`check_destination`'s rule: a NUL was refused by PostgreSQL alone, a lone
    surrogate kept by the memory store alone, more than :data:`MAX_SHAPING_KEY` octets
    failed PostgreSQL's index), or a ``now`` or ``until`` outside
    :func:`~mailstrom.stores.clock.kept_time` (SQLite read a start past year 9000 back as
    none). Returns ``until`` in UTC (None stays None)."""
    check_key(domain, "domain", limit=MAX_SHAPING_KEY)
    kept_time(now, "now")
    return None if until is None else kept_time(until, "until")


def named_recipients(recipients: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (message id, address) pairs of a throttle's ``recipients`` that may name a
    stored recipient: a NUL or a lone surrogate in either (:func:`~.operator.comparable`)
    names none. Given to a SQL store, one made it refuse the whole throttle
    (StoreRefusedData) and the pause was lost, where the memory store skipped the pair
    as it skips any unknown one."""
    return [(m, a) for m, a in recipients if comparable(m) and comparable(a)]


def check_pause_times(
    destination: str, now: datetime, first: timedelta, maximum: timedelta
) -> datetime:
    """InvalidArgument for a throttle (:meth:`Store.throttle`) whose ``destination`` no
    store can key (:func:`check_destination`), or whose ``now``, or whose pause of
    ``first`` or ``maximum`` from it, is no time every store reads back
    (:func:`~mailstrom.stores.clock.after`), before a store marks or writes anything: a
    ``timedelta(days=10**8)`` was a bare OverflowError in two stores and StoreRefusedData
    in SQLite. Returns ``now`` in UTC, which the pause is reckoned from: the SQL stores
    answered a new pause in the zone of ``now``, one read back in UTC."""
    check_destination(destination)
    utc = kept_time(now, "now")
    after(now, first, "first")
    after(now, maximum, "maximum")
    return utc


MAX_TLS_BROKEN = 10_000
"""Hosts with remembered broken TLS that a worker reads at most."""
MAX_TLS_HOST = 1024
"""Octets of a host whose broken TLS a store remembers: far above any host name (253)
or address literal, and a key PostgreSQL's index keeps."""


def check_tls_host(host: str) -> None:
    """InvalidArgument for a ``host`` given to :meth:`Store.note_tls_broken` that not
    every store can key: no string (None was kept by the memory store and SQLite), a NUL
    (refused by PostgreSQL alone), a lone surrogate (by both SQL stores) or more than
    :data:`MAX_TLS_HOST` octets (a StoreError from PostgreSQL's index)."""
    check_key(host, "host", limit=MAX_TLS_HOST)


MAX_REPORT_KEY = 1024
"""Octets of a TLS report's claim key (:meth:`Store.claim_tls_report`): mailstrom's own
are some 70 (``tlsrpt-post-<day>-<digest>``); PostgreSQL's index keeps no key of
several thousand."""


def check_report_key(key: str) -> None:
    """InvalidArgument for a TLS report's ``key`` (:meth:`Store.claim_tls_report`,
    :meth:`Store.hold_tls_report`) that not every store can key: no string, a NUL
    (refused by PostgreSQL alone), a lone surrogate (kept by the memory store alone) or
    more than :data:`MAX_REPORT_KEY` octets (a StoreError from PostgreSQL's index)."""
    check_key(key, "key", limit=MAX_REPORT_KEY)


def check_suppressions(entries: Sequence[Suppression]) -> None:
    """InvalidArgument for an entry of :meth:`Store.suppress` that not every store keeps
    as given, before a store writes any: a target that is no string of at most
    :data:`~mailstrom.suppression.MAX_TARGET` octets without NUL or a lone surrogate
    (:func:`~mailstrom.arguments.check_key`; a longer one failed PostgreSQL's index as a
    passing StoreError), a reply or message id with a NUL (refused by PostgreSQL alone)
    or a lone surrogate (kept by the memory store alone), or a time outside
    :func:`~mailstrom.stores.clock.kept_time` (an expiry of 9999-12-31 or a creation
    before 1900 was kept by the memory store and read back by the SQL stores as none:
    no expiry, an unknown time). An unknown (None) source or creation time is left to
    the stores, which refuse it (StoreRefusedData)."""
    for entry in entries:
        texts = f"{entry.reply}{entry.message_id or ''}"
        if not (texts.isascii() and "\x00" not in texts):
            for name in ("reply", "message_id"):
                value = getattr(entry, name)
                if value is not None and not comparable(value):
                    raise InvalidArgument(
                        f"{name}: {shown(value)} holds a NUL or a lone surrogate, which no"
                        f" store keeps (the entry of {shown(entry.target)})",
                        argument=name,
                    )
        check_key(entry.target, "target", limit=MAX_TARGET)
        for name in ("created_at", "expires_at"):
            when = getattr(entry, name)
            if when is not None:
                kept_time(when, name)


def bounded_text(text: str, limit: int = MAX_REPLY_TEXT) -> str:
    """``text`` cut to at most ``limit`` octets of UTF-8 (at a character boundary)."""
    if len(text) <= limit // 4:  # cannot exceed the limit even at four octets a character
        return text
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", "ignore")


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""NUL, which PostgreSQL refuses in text, and lone surrogates, which no UTF-8 database
driver can encode (an undecodable octet carried by ``errors="surrogateescape"``)."""


def storable_text(text: str, limit: int = MAX_REPLY_TEXT) -> str:
    """``text`` cut to ``limit`` octets, with NUL and lone surrogates as U+FFFD: a result
    whose text a store cannot write would hold its worker up for good. Reply texts come
    without them (:mod:`mailstrom.smtp.replies`); this keeps them out of any other text."""
    text = bounded_text(text, limit)
    if text.isascii() and "\x00" not in text:
        return text  # the usual case, without a regex
    return _UNSTORABLE.sub("\ufffd", text)


MAX_ATTEMPT_DETAIL = 1024
"""Octets kept of an attempt's other texts (MX host, IP address, TLS version, cipher and
policy): each is far shorter when it comes from where it should."""


def bounded_attempt(attempt: Attempt) -> Attempt:
    """``attempt`` as every store can write it: its reply text and error cut to
    :data:`MAX_REPLY_TEXT` octets, its other texts to :data:`MAX_ATTEMPT_DETAIL`, every
    text storable anywhere (:func:`storable_text`), a duration that is a finite number
    and a port that is one. Each comes from a peer, the resolver or the TLS library, and
    none may make a store refuse the result (the worker would then record it without its
    details, see :func:`bare_result`)."""
    reply, error = attempt.reply, attempt.error
    short_reply = reply
    if reply is not None:
        text = storable_text(reply.text)
        if text is not reply.text:
            short_reply = replace(reply, text=text)
    short_error = storable_text(error) if error is not None else None
    duration, port = attempt.duration, attempt.port
    finite = math.isfinite(duration)
    a_port = port is None or 0 <= port <= 65535
    a = attempt
    # The usual case in one check: short ASCII without NUL needs neither a cut nor a change.
    details = f"{a.mx_host}{a.ip}{a.tls_version}{a.tls_cipher}{a.tls_policy}"
    plain = len(details) <= MAX_ATTEMPT_DETAIL // 4 and details.isascii() and "\x00" not in details
    if plain and finite and a_port and short_reply is reply and short_error is error:
        return attempt
    if not plain:
        a = replace(
            a,
            mx_host=_storable_detail(a.mx_host),
            ip=_storable_detail(a.ip),
            tls_version=_storable_detail(a.tls_version),
            tls_cipher=_storable_detail(a.tls_cipher),
            tls_policy=_storable_detail(a.tls_policy),
        )
    return replace(
        a,
        reply=short_reply,
        error=short_error,
        duration=duration if finite else 0.0,
        port=port if a_port else None,
    )


def _storable_detail(text: str | None) -> str | None:
    return None if text is None else storable_text(text, MAX_ATTEMPT_DETAIL)


def bare_result(result: RecipientResult, refused: BaseException) -> RecipientResult:
    """``result`` without the details a store refused to write: its state, outcome,
    timing and reason class stay, the server's reply and every other text go, and the
    error says so, with the reply's code and the store's reason (in ASCII, cut short)."""
    attempt = result.attempt
    reply = attempt.reply
    code = ""
    if reply is not None and 0 <= reply.code <= 999:
        code = f" (the server replied {reply.code})"
    why = str(refused)[:200].encode("ascii", "backslashreplace").decode("ascii")
    bare = Attempt(
        at=attempt.at,
        outcome=attempt.outcome,
        duration=attempt.duration if math.isfinite(attempt.duration) else 0.0,
        error=f"the store refused this attempt's details{code}: {why}",
        uncertain=attempt.uncertain,
        reason_class=attempt.reason_class,
    )
    return replace(result, attempt=bare)


def reason_class_of(value: str | None) -> ReasonClass | None:
    """The class stored as ``value``; a name this version does not know (written by a newer
    mailstrom: classes can be added without a schema change) reads as OTHER."""
    if value is None:
        return None
    try:
        return ReasonClass(value)
    except ValueError:
        return ReasonClass.OTHER


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """``text`` with its ASCII letters in lower case, as SQLite's ``lower()`` folds them
    (the other letters as they are): how :meth:`Store.recipients_by_address` compares."""
    return text.translate(_ASCII_LOWER)


def domain_of(address: str) -> str:
    """The destination domain of ``address``: the part after the last "@", lower-cased
    (the key work items are grouped by)."""
    return address.rpartition("@")[2].lower()


class RecordedNotLeased(StoreError):
    """``record_and_lease`` recorded its results, then its lease failed with ``cause``
    (a store that does the two in transactions of their own). The results are written:
    ``recorded`` is what the record returned, as a call that worked would."""

    def __init__(self, recorded: list[RecipientResult], cause: StoreError) -> None:
        super().__init__(str(cause))
        self.recorded = recorded
        self.cause = cause


def record_then_lease(
    store: Store,
    results: Sequence[RecipientResult],
    *,
    now: datetime,
    limit: int,
    lease_for: timedelta,
    lanes: Sequence[tuple[str, int]] | None = None,
    holder: str | None = None,
    max_bytes: int | None = None,
    busy: Collection[str] = (),
    per_destination: int | None = None,
) -> tuple[list[RecipientResult], Lease | None]:
    """``Store.record_and_lease`` for a store that cannot do both in one transaction. A
    lease that fails once the record is committed raises :class:`RecordedNotLeased`: the
    caller must not write those results again (they would read as taken over)."""
    row_limit(limit)  # refused before anything is recorded
    recorded = store.record(results) if results else []
    if limit <= 0:
        return recorded, None
    try:
        lease = store.lease(
            now=now,
            limit=limit,
            lease_for=lease_for,
            lanes=lanes,
            holder=holder,
            max_bytes=max_bytes,
            busy=busy,
            per_destination=per_destination,
        )
    except StoreError as exc:
        if not results:
            raise
        raise RecordedNotLeased(recorded, exc) from exc
    return recorded, lease


K = TypeVar("K")


class ByteBudget(Generic[K]):
    """What a lease of ``max_bytes`` keeps so far (see :meth:`Store.lease`), offered its
    messages in the lease's order: the longest run from the first whose sizes add up to
    at most ``max_bytes``; the first message always, however large. A message already
    kept is kept again at no cost (another of its recipients); once one does not fit,
    no new one is."""

    __slots__ = ("full", "kept", "left")

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes
        self.kept: set[K] = set()
        self.full = False

    def keeps(self, message: K, size: int) -> bool:
        """Whether the lease keeps ``message`` (its stored size ``size``)."""
        if message in self.kept:
            return True
        if self.full or (self.kept and size > self.left):
            self.full = True
            return False
        self.kept.add(message)
        self.left -= size
        return True


def messages_within(sizes: Iterable[tuple[K, int]], max_bytes: int) -> list[K]:
    """The messages a lease of ``max_bytes`` keeps (:class:`ByteBudget`), of ``sizes``:
    (message, its stored size) in the lease's order, each message once."""
    budget: ByteBudget[K] = ByteBudget(max_bytes)
    kept: list[K] = []
    for message, size in sizes:
        if not budget.keeps(message, size):
            break
        kept.append(message)
    return kept


def byte_budget(max_bytes: int | None) -> int | None:
    """``max_bytes`` as a lease takes it (see :meth:`Store.lease`): None, no bound, for
    one of :data:`~mailstrom.bounds.MAX_INTEGER` or more, which no store holds (900 MiB
    a message, see :data:`MAX_STORED_SIZE`). Every store reads it so: PostgreSQL
    refused one past a bigint (StoreRefusedData, failing every lease), the others took
    it for no bound."""
    if max_bytes is not None and max_bytes >= MAX_INTEGER:
        return None
    return max_bytes


def with_throttles(status: MessageStatus, paused: dict[str, DestinationThrottle]) -> MessageStatus:
    """``status`` with each pending recipient named in ``paused`` (address → the pause of
    its destination) carrying that pause (:attr:`RecipientStatus.throttle`) while it waits
    for it: not one due after the pause ends. (The store remembers which pause held a
    recipient back; one tried since and deferred for a reason of its own is due at its own
    time, which a later pause of its destination may not reach.)"""
    if not paused:
        return status
    recipients = tuple(
        replace(r, throttle=pause)
        if (pause := paused.get(r.address)) is not None
        and not r.state.is_final
        and (r.next_attempt_at is None or r.next_attempt_at <= pause.until)
        else r
        for r in status.recipients
    )
    return replace(status, recipients=recipients)


def with_pauses(
    found: list[MessageStatus], paused: Mapping[str, dict[str, DestinationThrottle]]
) -> list[MessageStatus]:
    """:func:`with_throttles` for each message of a list, as its status shows it:
    ``paused`` maps a message id to its paused recipients (address → pause)."""
    if not paused:
        return found
    return [with_throttles(m, paused[m.id]) if m.id in paused else m for m in found]


_HOLDER = re.compile(r"[0-9a-f]{8,32}")


def new_holder() -> str:
    """A fresh lease holder: 16 random hex digits (see :func:`check_holder`)."""
    return secrets.token_hex(8)


def check_holder(value: object) -> str:
    """``value`` as a lease holder, the identity a worker's lease tokens start with
    (``"<holder>.<random>"``), so that :meth:`Store.release_holder` can give back all of
    them: 8 to 32 lower-case hex digits. Nothing else may appear in it, so that the
    tokens of one holder form a range of their own (``.`` and ``/`` follow each other
    and are no hex digit), found without LIKE and its escapes.

    >>> check_holder("0123abcd")
    '0123abcd'
    """
    if not isinstance(value, str) or not _HOLDER.fullmatch(value):
        raise InvalidArgument(
            f"holder: expected 8 to 32 lower-case hex digits, got {shown(value)}",
            argument="holder",
        )
    return value


def lease_token(holder: str | None) -> str:
    """A fresh lease token: 32 random hex digits, after ``"<holder>."`` when a holder is
    given (checked by its worker, not again here: once per lease), so that
    :func:`holder_range` finds it. Every store makes its tokens here."""
    token = os.urandom(16).hex()
    return f"{holder}.{token}" if holder else token


def holder_range(holder: str) -> tuple[str, str]:
    """The lease tokens of ``holder``: those ≥ the first and < the second of these (in
    byte order: ``.`` is followed by ``/``). ``holder`` is checked first."""
    holder = check_holder(holder)
    return f"{holder}.", f"{holder}/"


def new_message_id() -> str:
    """A fresh message id: 32 hex digits, sortable by creation time (48-bit ms + 80 random bits)."""
    ms = time.time_ns() // 1_000_000
    return f"{ms:012x}{os.urandom(10).hex()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LeasedRecipient:
    """One recipient inside a lease, with what the retry policy needs to decide."""

    address: str
    attempts: int
    """Attempts recorded before this lease."""
    first_attempt_at: datetime | None
    created_at: datetime
    """When its message could first be sent: when it was enqueued, or its ``send_at`` when
    that is later. The retry policy's ``max_age`` and the delay warning count from here
    (a message scheduled a week ahead has its whole retry window after its time)."""
    ref: int | None = None
    """The store's own handle on this recipient (a row id), handed back in the result so
    recording needs no lookup; None for stores that do not use one."""
    last_attempt_at: datetime | None = None
    """When the attempt before this lease was made (None before the first): a delay
    warning is sent by the attempt that first falls past its threshold."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkItem:
    """The leased recipients of one message at one destination domain: one SMTP transaction."""

    message_id: str
    lease_token: str
    """The lease this item was handed out under (results are recorded under it)."""
    domain: str
    """Lower-case ASCII-or-Unicode domain as stored (the part after the last ``@``)."""
    envelope_from: str
    recipients: tuple[LeasedRecipient, ...]
    data: bytes
    smtputf8: bool
    eightbit: bool
    dsn: DSN | None = None
    """The message's delivery status notification request, if any."""
    require_tls: bool = False
    """REQUIRETLS (RFC 8689): deliver only over TLS to an authenticated server offering
    REQUIRETLS (``Email.require_tls``)."""
    expires_at: datetime | None = None
    """The message's expiry: recipients leased at or after it fail as ``expired`` without
    a connection, and a retry is never scheduled past it."""
    priority: str = ""
    """The message's lane ("" when queued before lanes existed)."""
    queued_at: datetime | None = None
    """When the message was enqueued, even if its ``send_at`` is later (the recipients'
    ``created_at`` is when it could first go): the ``Arrival-Date`` of its notices (RFC
    3464 §2.2.5). None from a store that does not say."""
    dkim: DKIMStatus | None = None
    """Set by the worker, never by a store: the signatures of ``data`` when the worker
    signed it anew for this attempt (a key rotated away, an ``x=`` about to pass; see
    :func:`~mailstrom.dkim.signing.resign_stale`). Its results carry them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """Work handed to one worker until ``expires_at``; ``token`` identifies it for record."""

    token: str
    expires_at: datetime
    items: tuple[WorkItem, ...]
    suppressions: Mapping[str, Suppression] | None = None
    """The suppression entries that apply to the lease's recipients (by target, as
    :meth:`Store.suppressions_for` returns them), when the store looked them up in the
    lease's own transaction; None when it did not, and the worker must ask."""
    failed: tuple[RecipientResult, ...] = ()
    """Recipients the lease took and the store set aside: failed for good, in the lease's
    own transaction, because their rows cannot be read back
    (:mod:`~mailstrom.stores.row_checks`), with their attempt history and outbox event
    written. The worker reports them like any other final failure (metrics, the attempt
    log, ``on_result``) and never records them again. A lease may hold only these."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientsFound:
    """What :meth:`Store.recipients_by_address` reads of one message."""

    message: MessageStatus
    """The message as :meth:`Store.status` shows it, but with only the recipients asked
    for (in their order), without history or destination pauses; its ``state`` is
    theirs."""
    single: bool
    """Whether the message has one recipient only: that one is then in
    ``message.recipients``, whether it was asked for or not."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientResult:
    """The outcome of one attempt for one recipient, to record under a lease.

    ``state`` is the recipient's new state: DELIVERED, FAILED, or DEFERRED with
    ``next_attempt_at`` set (the worker has already applied the retry policy).
    ``lease_token`` names the lease the recipient was delivered under: the store records
    the result only while that lease still holds the recipient. ``ref`` is the
    :attr:`LeasedRecipient.ref` the store handed out, if any.
    """

    message_id: str
    address: str
    state: RecipientState
    attempt: Attempt
    lease_token: str
    next_attempt_at: datetime | None = None
    ref: int | None = None
    queued_at: datetime | None = None
    """When the message was enqueued (its work item's ``created_at``): for the attempt log's
    ``delay`` and the queue-delay metric. Stores do not read it."""
    size: int | None = None
    """The message's size in octets as stored, for the attempt log. Stores do not read it."""
    envelope_from: str | None = None
    """The message's envelope sender, for the attempt log. Stores do not read it."""
    own_reply: bool = False
    """The attempt's reply is one mailstrom made itself, not a server's: a refusal with a
    code decided before or without any server's word (SIZE, SMTPUTF8, REQUIRETLS, null
    MX). A notice gives it as an ``X-Mailstrom`` diagnostic, not an ``smtp`` one (RFC 3464
    §2.3.6). Stores do not read it."""
    hard_bounce: bool = False
    """The failure puts the address on the suppression list (a permanent refusal of a
    class in ``Config.suppress_on``); the worker adds it once the result is recorded.
    Stores do not read it."""
    notice: str | None = None
    """For a result whose sender is owed a notice (a FAILED one's bounce, a DEFERRED one's
    delay warning, a DELIVERED one's "relayed" notice): what the notice will say of it
    (the worker's own text, see :mod:`mailstrom.runtime.notices`). The store keeps it
    with the recipient in the same write that records the result (the mark "notice
    owed"), until :meth:`Store.queue_notices` clears it. Recording another result replaces
    it, but for a recipient still on its way (QUEUED or DEFERRED) a result without one
    leaves the mark as it is: a delay warning owed is not lost to the next attempt."""
    relayed: bool = False
    """A DELIVERED result whose message asked to hear of its delivery (NOTIFY=SUCCESS) from
    a server that does not offer DSN, which could not be asked to report it: the sender is
    owed a "relayed" notice (RFC 3461 §5.2.2), which the worker gives it as its
    :attr:`notice`. Stores do not read it."""
    dkim: DKIMStatus | None = None
    """The message's DKIM outcome as this attempt sent it, when the worker signed it anew
    (:attr:`WorkItem.dkim`); None when it went as queued. The store records it as the
    message's DKIM status with the result, so that status shows the signatures a
    receiver last got."""
    attempted: bool = True
    """False for a result that was no attempt at the destination: this host could not
    make one (a local resource shortage, :class:`~mailstrom.errors.LocalResourceShortage`:
    no server was asked), or decided without one (a suppressed or expired recipient).
    The store records its state, reason and next attempt time as any result's, but
    neither counts an attempt nor adds one to the history: a host out of file
    descriptors for an hour must not spend its recipients' ``max_attempts``, and a
    recipient never tried must not read as tried once (``attempts`` 1 in its status and
    its event, where a cancel of it says 0)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OwedNotice:
    """A recipient whose sender is owed a notice for its result (the mark a record left,
    see :attr:`RecipientResult.notice`), as :meth:`Store.owed_notices` finds it."""

    message_id: str
    address: str
    notice: str


MAX_OWED_MESSAGES = 100
"""Messages :meth:`Store.owed_notices` returns the marks of, at most, in one call."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EventBatch:
    """Events of the outbox handed to one sender until ``expires_at``; acknowledged (or
    released) under ``token``. Events not acknowledged before then are leased again."""

    token: str
    expires_at: datetime
    events: tuple[DeliveryEvent, ...]


MAX_FILTER_TEXT = 255
"""Octets of a filter's domain or tag: a domain is at most 255 (a tag 64), so a longer
one could match nothing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueFilter:
    """Which messages :meth:`Store.query` returns (all conditions must hold)."""

    state: RecipientState | None = None
    """Messages whose derived state is this."""
    domain: str | None = None
    """Messages with at least one recipient at this domain (case-insensitive; a U-label
    domain is kept as its A-labels, as recipients' are stored)."""
    older_than: timedelta | None = None
    """Messages enqueued more than this long before ``now``."""
    held: bool | None = None
    """Messages held (True) or not (False), as :attr:`~mailstrom.status.MessageStatus.held`
    says: one that finished while held is not."""
    limit: int = 100
    tag: str | None = None
    """Messages carrying this tag (exact, case-sensitive)."""
    states: frozenset[RecipientState] | None = None
    """Messages whose derived state is one of these (with ``state``, both must hold);
    :data:`~mailstrom.stores.operator.PENDING_STATES` is the queue's default view."""

    def __post_init__(self) -> None:
        """Refuse, with :class:`~mailstrom.errors.InvalidArgument`, what the stores would
        each read their own way: a negative ``limit`` was no limit to SQLite and none to
        the memory store, ``state="queued"`` matched every message in SQLite and none in
        memory. States may be given by their values ("queued"); they are kept as
        :class:`~mailstrom.status.RecipientState`."""
        check_limit(self.limit, "limit")
        if self.older_than is not None:
            check_age(self.older_than, "older_than")
        if self.held is not None and not isinstance(self.held, bool):
            raise InvalidArgument(
                f"held: expected True, False or None, got {shown(self.held)}", argument="held"
            )
        # Text a store compares with its own: no lone surrogate (SQLite refused it as
        # StoreRefusedData) or NUL (PostgreSQL would), and no longer than any domain.
        if self.domain is not None:
            check_key(self.domain, "domain", limit=MAX_FILTER_TEXT)
            # As recipients' domains are stored: U-labels as A-labels (bücher.example is
            # xn--bcher-kva.example), as the command line's and the dashboard's filters.
            object.__setattr__(self, "domain", filter_domain(self.domain))
        if self.tag is not None:
            check_key(self.tag, "tag", limit=MAX_FILTER_TEXT)
        if self.state is not None:
            object.__setattr__(self, "state", _state(self.state, "state"))
        if self.states is not None:
            object.__setattr__(self, "states", _states(self.states))


def _state(value: object, argument: str) -> RecipientState:
    """``value`` as a recipient state (a state, or its value); InvalidArgument if none."""
    found = member_of(RecipientState, value)
    if found is not None:
        return found
    known = ", ".join(s.value for s in RecipientState)
    raise InvalidArgument(
        f"{argument}: expected a RecipientState ({known}), got {shown(value)}",
        argument=argument,
    )


def _states(value: object) -> frozenset[RecipientState]:
    """``value`` (a collection of states) as a frozenset of states."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidArgument(
            f"states: expected a set of RecipientState, got {shown(value)}", argument="states"
        )
    return frozenset(_state(s, "states") for s in value)


@runtime_checkable
class Store(Protocol):
    """Durable queue of prepared messages and per-recipient delivery state.

    All times are timezone-aware UTC datetimes. Methods raise
    :class:`~mailstrom.errors.UnknownMessage` for an id that is not stored and
    :class:`~mailstrom.errors.StoreError` for driver failures.
    """

    in_process: bool
    """True when calls are short local work that never waits on a network (memory,
    SQLite): the worker then calls the store on its event loop, which is cheaper than a
    thread hand-off and never waits for the GIL behind the loop's own work. False
    (PostgreSQL) makes the worker call it from threads."""

    def enqueue(self, message: PreparedMessage, *, now: datetime, hold: bool = False) -> str:
        """Store ``message`` durably (committed before returning) and return its new id.

        Every recipient starts QUEUED and due at ``now``. A held message is not leased
        until :meth:`set_held` releases it.
        """
        ...

    def enqueue_many(self, messages: Sequence[PreparedMessage], *, now: datetime) -> list[str]:
        """Store several messages in one transaction; ids in the same order."""
        ...

    def lease(
        self,
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        lanes: Sequence[tuple[str, int]] | None = None,
        holder: str | None = None,
        max_bytes: int | None = None,
        busy: Collection[str] = (),
        per_destination: int | None = None,
    ) -> Lease | None:
        """Lease up to ``limit`` due recipients (QUEUED or DEFERRED, next attempt ≤ now,
        not held, not under an unexpired lease), oldest due first, grouped into work
        items; the items come in the order their first recipient fell due (ties: the
        queue's order; with ``lanes``, lane by lane), which is the order the worker starts
        them in. Returns None when nothing is due. Two concurrent callers never receive the
        same recipient while its lease is unexpired. A recipient whose rows cannot be read
        back is failed instead (:attr:`Lease.failed`; a lease may hold only those).

        ``holder`` (a checked :func:`check_holder` value, not checked again here: this is
        the worker's hot path) makes the lease token ``"<holder>.<random>"``, so that
        :meth:`release_holder` finds it; without it the token is random only.

        ``lanes`` ((lane name, at most this many), highest first) leases each lane's due
        recipients before the next lane's, each lane up to its own number; recipients of a
        lane not named are leased only when every named lane had room left and nothing
        more due. Each lane is read from an index of its own, so a lane with a deep
        backlog costs the others nothing.

        ``max_bytes`` bounds the message data the lease reads (each message's stored
        size, once however many of its recipients it holds): its messages are the
        longest run, in the lease's order, whose sizes add up to at most ``max_bytes``,
        but never none: the first comes alone when larger. The recipients of the messages
        left out stay due, unleased. The data of those is not read at all, so that a
        queue of large messages cannot make one lease hold ``limit`` of them in memory.

        ``busy`` (domains) and ``per_destination`` make the lease fair between
        destinations (:mod:`~mailstrom.stores.fairness`): no recipient at a busy domain,
        and at most ``per_destination`` recipients of one domain in each lane. The oldest
        due that pass come first; when the ``limit`` oldest due of a lane left room, the
        lease also takes the oldest due of other domains of the lane queued after them,
        however many recipients of busy or full domains are due before those."""
        ...

    def record(self, results: Sequence[RecipientResult]) -> list[RecipientResult]:
        """Record ``results`` (of any number of leases) in one transaction: set each
        recipient's state, clear its lease, count the attempt and append it to the history
        (reply text and error cut to :data:`MAX_REPLY_TEXT` octets, history to the last
        :data:`MAX_HISTORY` attempts); a result that was no attempt
        (:attr:`RecipientResult.attempted` False) is neither counted nor in the history.
        A result whose recipient is no longer held under its ``lease_token`` (taken over,
        cancelled, recorded already) is ignored, but for a delivery to a recipient
        cancelled meanwhile (its transaction was on the wire): that mail went out, and is
        recorded delivered. Returns
        the results that were recorded, in order. A store may commit results without
        waiting for the disk (SQLite does): they survive any process crash, and a power
        failure at worst makes a recipient be delivered once more, never lost."""
        ...

    def owed_notices(
        self, *, message_ids: Sequence[str] | None = None, limit: int = MAX_OWED_MESSAGES
    ) -> list[OwedNotice]:
        """The recipients marked "notice owed" (see :attr:`RecipientResult.notice`) of up
        to ``limit`` messages (of ``message_ids`` only, when given) that are done for this
        pass: none of their recipients is leased or still queued for a first attempt. A
        recipient deferred for a later retry does not hold the notice of the others back,
        nor does one queued at a suspended domain (it waits as long as the operator likes; a
        suspension counts until a lease ends it, one whose end has just passed too)
        (Postfix bounces a queue file's failed recipients once the file is done with, its
        deferred ones staying queued). All the marks of a message come together, ordered
        by message."""
        ...

    def queue_notices(
        self,
        owed: Sequence[OwedNotice],
        notices: Mapping[str, Sequence[PreparedMessage]],
        *,
        now: datetime,
    ) -> list[str]:
        """Clear the marks of ``owed`` and :meth:`enqueue_many` the ``notices`` made from
        them (by message id; a message with none just has its marks cleared), in one
        transaction: a crash leaves either both done or the marks, and the notice is made
        again. A message some of whose marks in ``owed`` are gone or changed since they
        were read (another worker queued its notice meanwhile, a recipient's new result
        replaced its mark) has none of its marks cleared and none of its notices queued:
        the marks it has are handed out again. Returns the queued ids."""
        ...

    def record_and_lease(
        self,
        results: Sequence[RecipientResult],
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        lanes: Sequence[tuple[str, int]] | None = None,
        holder: str | None = None,
        max_bytes: int | None = None,
        busy: Collection[str] = (),
        per_destination: int | None = None,
    ) -> tuple[list[RecipientResult], Lease | None]:
        """:meth:`record` ``results``, then :meth:`lease` up to ``limit`` recipients
        (none when ``limit`` is 0) of ``lanes`` for ``holder``, up to ``max_bytes`` of
        message data, fair with ``busy`` and ``per_destination``; in one transaction where
        the store can (SQLite: one commit, one fsync, for the worker's whole turn)."""
        ...

    def extend(self, lease: Lease, *, until: datetime) -> int:
        """Move the expiry of the lease's unrecorded recipients to ``until`` (a worker's
        heartbeat while deliveries take long). Recipients already taken over by another
        lease are left alone. Returns how many are still held, not counting those of
        messages held since (:meth:`set_held`) nor those of destinations suspended since
        (:meth:`suspend`; a timed suspension counts until a :meth:`lease` or
        :meth:`next_due` past its end has ended it): the worker gives back what it has
        fewer of and has not started, as it does what was cancelled, and lets the rest
        finish."""
        ...

    def release(self, lease: Lease) -> None:
        """Give back every recipient of ``lease`` not yet recorded, due at once, without
        counting an attempt (used by a graceful stop)."""
        ...

    def release_holder(self, holder: str) -> int:
        """Give back every recipient still leased under a token of ``holder`` (see
        :meth:`lease`), of any lease, due at once, without counting an attempt, and wake
        the workers as :meth:`release` does; recorded recipients hold no lease any more
        and are left alone (only pending ones are given back). Returns how many were
        given back.

        For a worker that cannot give back its own leases: a worker process that was
        killed, whose parent knows the holder it gave it. Raises
        :class:`~mailstrom.errors.InvalidArgument` (a ValueError) for a ``holder`` that
        :func:`check_holder` refuses.

        >>> store.release_holder("5f3a9c01d2e4b6a7")   # doctest: +SKIP
        3
        """
        ...

    def status(self, message_id: str) -> MessageStatus:
        """The message's status with every recipient's history."""
        ...

    def query(self, *, now: datetime, where: QueueFilter | None = None) -> list[MessageStatus]:
        """Messages matching ``where`` (None: ``QueueFilter()``), newest first, at most
        its ``limit``, without attempt history."""
        ...

    def select_ids(self, *, now: datetime, where: QueueFilter) -> list[str]:
        """The ids of the messages :meth:`query` lists for ``where``, in its order, found
        by the same conditions without reading the messages' statuses or bytes: what a
        bulk change (``cancel --domain x``, ``ms.cancel_many(QueueFilter(...))``) acts
        on."""
        ...

    def select_page(
        self,
        *,
        now: datetime,
        where: QueueFilter,
        after: ListingKey | None = None,
        examine: int | None = None,
    ) -> IdPage:
        """:meth:`select_ids` from after ``after`` (the :attr:`IdPage.last` of the page
        before, from this store) on: the next ``where.limit`` ids in the same order,
        with where the last of them stands. Pages walk the listing in bounded steps,
        each message listed once however many share an enqueue time, and a message
        deleted meanwhile (the last of the page before, too) moves nothing. A place of
        a kind this store never gives is refused with
        :class:`~mailstrom.errors.InvalidArgument` (SQLite's in the memory store or
        PostgreSQL, theirs in SQLite); one of its own kind is taken as a place in this
        store's order whichever store gave it (the memory store's and PostgreSQL's are
        of one kind, as are two databases' of one backend).

        With ``examine`` (from 1), a walk that steps over many messages it does not list
        goes in bounded steps: one call looks at no more than ``examine`` of the messages
        ``where.older_than`` admits (below ``after``), so its page may hold fewer than
        ``where.limit`` ids, or none, and its ``last`` is where the next page starts,
        None only when no message is left below. PostgreSQL bounds its statement so
        (a statement_timeout cancelled a look past a million kept messages at each try,
        and the walk never went on), and the memory store its walk; SQLite, with no
        statement time limit, may look at more to fill the page."""
        ...

    def recent(self, limit: int = 20) -> list[MessageStatus]:
        """The ``limit`` most recently enqueued messages, newest first."""
        ...

    def retry(self, message_id: str, *, now: datetime) -> int:
        """Make the message's pending (QUEUED/DEFERRED) recipients due at ``now``.
        Returns how many were rescheduled."""
        ...

    def retry_deferred(self, *, now: datetime) -> int:
        """Make every DEFERRED recipient of every message due at ``now``."""
        ...

    def cancel(self, message_id: str, *, now: datetime) -> int:
        """Fail the message's pending recipients with the reason "cancelled"; returns how
        many. Recipients under a lease are cancelled too; a later record for them is
        ignored. A cancelled recipient is owed no notice: a delay warning owed for it
        (its mark, see :attr:`RecipientResult.notice`) is dropped. With events enabled,
        each recipient cancelled gets an event in the same transaction (state FAILED,
        error "cancelled", ``at`` this ``now``, ``attempt`` its attempts so far)."""
        ...

    def set_held(self, message_id: str, held: bool) -> None:
        """Hold (not leased) or release a message. Holding one under a lease tells the
        :meth:`watch_cancels` callbacks, as a cancel does. A hold keeps pending
        recipients from leases: a message with none (finished) is left as it is, not
        held."""
        ...

    def purge(self, *, finished_before: datetime) -> int:
        """Delete messages all of whose recipients are final and whose last attempt was
        before ``finished_before``; returns how many messages were deleted."""
        ...

    def next_due(self, *, now: datetime) -> datetime | None:
        """When the earliest pending, unheld recipient becomes due (a lease expiry counts),
        or None when nothing is pending."""
        ...

    def stats(self) -> QueueStats:
        """Counts of recipients by state and of pending recipients by domain."""
        ...

    # --- the event outbox (schema version 3) ----------------------------------------------

    def enable_events(self) -> None:
        """From now on, :meth:`record` (and :meth:`record_and_lease`) also appends one
        :class:`~mailstrom.status.DeliveryEvent` per recorded result to the store's event
        outbox, in the same transaction as the result: an event exists if and only if its
        result was committed; so do :meth:`cancel` and :meth:`cancel_many`, one per
        recipient they fail. Until called, recording does no extra work."""
        ...

    def lease_events(self, *, now: datetime, limit: int, lease_for: timedelta) -> EventBatch | None:
        """Lease up to ``limit`` events not yet acknowledged and not under an unexpired
        lease, oldest first; None when there are none. Two senders never hold the same
        event at once. An event whose row cannot be read is marked sent instead, with a
        warning (:mod:`~mailstrom.stores.side_rows`), and the lease goes on past it."""
        ...

    def ack_events(self, batch: EventBatch, *, now: datetime) -> int:
        """Mark the batch's events sent (those still under its lease); returns how many.
        Acknowledged events are never leased again. Only the events in ``batch.events``:
        a batch of some of a lease's events (``dataclasses.replace(batch, events=...)``)
        acknowledges those, and the others stay under the lease."""
        ...

    def release_events(self, batch: EventBatch) -> None:
        """Give the batch's unacknowledged events back at once (a failed send); only those
        in ``batch.events``, as :meth:`ack_events`."""
        ...

    def read_events(self, *, after: int = 0, limit: int = 100) -> list[DeliveryEvent]:
        """Up to ``limit`` events with an id above ``after``, oldest first, sent or not
        (for tailing); one whose row cannot be read is left out with a warning, and the
        events after it make up the page (an empty page means none are left).

        Events become visible in id order: one with a lower id than any a reader has seen
        never appears later, so a reader carrying on after the highest id it saw misses
        none."""
        ...

    def last_event_id(self) -> int:
        """The highest event id so far (0 when there are none)."""
        ...

    def unsent_events(self) -> int:
        """How many events are not acknowledged yet: a hook's backlog. A read of the
        outbox's index of unsent events (``events_unsent``), as long as the backlog, not
        as the events kept."""
        ...

    def prune_events(self, *, sent_before: datetime, unsent_before: datetime | None = None) -> int:
        """Delete events acknowledged before ``sent_before``; returns how many. Events not
        yet acknowledged are kept, however old, unless ``unsent_before`` is given: then
        those whose attempt was made before it go too (for a store whose events no hook
        sends, ``events`` on alone, where nothing else ever removes them)."""
        ...

    # --- remembered broken TLS (schema version 8) -----------------------------------------

    def note_tls_broken(self, host: str, *, until: datetime, reason: str, now: datetime) -> None:
        """Remember that ``host``'s TLS handshake failed (``reason``, cut to
        :data:`MAX_REPLY_TEXT` octets) until ``until``; a later ``until`` already known is
        kept. Every worker sharing the store sees it (:meth:`tls_broken`)."""
        ...

    def tls_broken(self, *, now: datetime, limit: int = MAX_TLS_BROKEN) -> dict[str, datetime]:
        """Hosts whose TLS is remembered broken at ``now``, with until when (at most
        ``limit``, those remembered longest first); expired entries are dropped, and so are
        entries whose end cannot be read (with a warning)."""
        ...

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) when work may have become due: mail enqueued
        or retried through this store object, or through any process for stores that can
        tell (PostgreSQL's LISTEN/NOTIFY). Returns a function that stops watching."""
        ...

    def watch_cancels(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) when recipients under a lease were
        cancelled: through this store object, or through any process for stores that can
        tell (SQLite's wake-up sockets, PostgreSQL's NOTIFY); or held (:meth:`set_held`,
        :meth:`hold_many`); or their destination suspended (:meth:`suspend`). A worker
        then checks its leases at once and gives back the cancelled, held or suspended
        work it has not started sending.
        Returns a function that stops watching."""
        ...

    def close(self) -> None:
        """Release connections and threads. Idempotent."""
        ...

    # --- operator tools (schema version 10) -------------------------------------------

    def resolve_id(self, prefix: str) -> str:
        """The one message id starting with ``prefix`` (1 to 32 hex digits, any case),
        found on the id index. Raises :class:`~mailstrom.errors.UnknownMessage` when none
        does and :class:`~mailstrom.errors.AmbiguousMessageId` (with candidates) when
        several do."""
        ...

    def count(self, *, now: datetime, where: QueueFilter, cap: int) -> int:
        """How many messages match ``where`` (its ``limit`` ignored), counting at most
        ``cap``: a count of ``cap`` means "at least that many"."""
        ...

    def retry_many(self, message_ids: Sequence[str], *, now: datetime) -> int:
        """:meth:`retry` for each listed message; unknown ids are skipped. Returns how
        many recipients were rescheduled. Each message changes whole, but a long list may
        be changed in several transactions (SQLite: 500 messages each; the memory store
        500 per hold of its lock), so that enqueues and the workers' writes are not held
        up for the whole list; a failure may leave
        the messages before it changed, and the call repeated changes the rest (as for
        :meth:`cancel_many`, :meth:`hold_many` and :meth:`purge_many`)."""
        ...

    def cancel_many(self, message_ids: Sequence[str], *, now: datetime) -> int:
        """:meth:`cancel` for each listed message (in batches, as :meth:`retry_many`);
        unknown ids are skipped. Returns how many recipients were cancelled."""
        ...

    def hold_many(self, message_ids: Sequence[str], held: bool) -> int:
        """Hold or release the listed messages (in batches, as :meth:`retry_many`);
        returns how many messages changed (those already so, and unknown ids, are not
        counted). A message with no pending recipient (finished) is not held, as for
        :meth:`set_held`, nor counted; a release clears the flag of one that finished
        while held, uncounted (no mail waited for it: such a message is reported as not
        held, by :meth:`status`, :meth:`query` and :meth:`stats`). Holding one under a
        lease tells the :meth:`watch_cancels` callbacks, as a cancel does."""
        ...

    def purge_many(
        self,
        message_ids: Sequence[str],
        *,
        finished_before: datetime | None = None,
        state: RecipientState | None = None,
    ) -> int:
        """Delete the listed messages all of whose recipients are final (and, with
        ``finished_before``, whose last recipient finished before it; with ``state``,
        whose derived state it is, as for :meth:`purge_state`); pending messages are
        never deleted. Returns how many were deleted (in batches, as
        :meth:`retry_many`)."""
        ...

    def purge_state(self, *, finished_before: datetime, state: RecipientState) -> int:
        """:meth:`purge` limited to messages whose derived state is ``state`` (DELIVERED:
        every recipient delivered; FAILED: every recipient final, at least one failed)."""
        ...

    def shape(self, *, now: datetime, edges: Sequence[timedelta]) -> list[ShapeRow]:
        """Pending recipients (held ones included) per destination domain and age of their
        message, bucketed at ``edges`` (ascending ages up to 100 years, else
        InvalidArgument: :func:`~mailstrom.stores.operator.age_edges`), largest domain
        first; one aggregate query."""
        ...

    def message_data(self, message_id: str) -> bytes:
        """The message as stored (what the worker sends)."""
        ...

    def suspend(self, domain: str, *, now: datetime, until: datetime | None = None) -> None:
        """Stop delivery to ``domain`` (lower case) until ``until`` or :meth:`resume`:
        :meth:`lease` hands out none of its recipients and :meth:`next_due` ignores them;
        they keep their state and are not counted as attempted. Recipients a worker has
        leased already are left out of :meth:`extend`'s count, and the
        :meth:`watch_cancels` callbacks are told, so that the worker gives back what it
        has not started (a transaction under way finishes). Suspending again replaces
        the end."""
        ...

    def resume(self, domain: str, *, now: datetime) -> bool:
        """End the suspension of ``domain`` (its pending recipients are due as they were
        scheduled); False when it was not suspended at ``now`` (a timed one that has
        ended is none, though its row is deleted too). Wakes watchers."""
        ...

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        """The suspensions in force at ``now``, by domain."""
        ...

    # --- traffic shaping (schema version 7) -----------------------------------------------

    def throttle(
        self,
        destination: str,
        *,
        now: datetime,
        reply: str,
        first: timedelta,
        maximum: timedelta,
        recipients: Sequence[tuple[str, str]] = (),
    ) -> DestinationThrottle:
        """Pause ``destination`` after a throttling ``reply`` at ``now`` and return the
        pause: a new one (:func:`~mailstrom.policy.throttle.next_pause`: ``first`` long,
        doubling on repeats up to ``maximum``) or, while one runs, that one unchanged. In
        one transaction, so workers reporting at once count one throttle. ``recipients``
        ((message id, address) pairs: those the throttling reply deferred) show the pause
        in their status while they are pending, as postponed ones do. Its times are in
        UTC, whatever the zone of ``now``."""
        ...

    def throttles(self, *, now: datetime) -> list[DestinationThrottle]:
        """The destinations paused at ``now``, soonest end first; a pause whose row cannot
        be read is over (left out with a warning; :mod:`~mailstrom.stores.side_rows`)."""
        ...

    def postpone(
        self, items: Sequence[WorkItem], *, until: datetime, destination: str | None = None
    ) -> int:
        """Give back the recipients of ``items`` still held under their lease, due at
        ``until``, without counting an attempt (their destination is paused or its rate
        is used up). With ``destination``, their status shows that destination's pause
        while it lasts. Returns how many were postponed."""
        ...

    def take_tokens(
        self, buckets: Sequence[TokenBucket], *, want: int, now: datetime
    ) -> TokenGrant:
        """Take up to ``want`` tokens from every one of ``buckets`` at once
        (:func:`~mailstrom.policy.throttle.take_tokens`) in one transaction: every worker
        of the store draws from the same buckets. A bucket whose row cannot be read is
        full (with a warning)."""

    # --- the suppression list (schema version 6) -------------------------------------------

    def suppress(self, entries: Sequence[Suppression], *, keep_longer: bool = False) -> int:
        """Add ``entries`` in one transaction, all or none however many there are (``mailstrom
        suppress import`` gives a whole file, up to a million); an entry replaces the one its
        target had (newest wins, also within ``entries``). Targets must be normalized
        (:func:`~mailstrom.suppression.normalize_target`). Returns how many were given.

        With ``keep_longer`` (the entries of bounces and complaints), an entry is not
        written where its target's entry is an operator's in force at the entry's time or
        lasts at least as long, but for a bounce's that a complaint's lasts as long as
        (:meth:`~mailstrom.suppression.Suppression.stands_against`; also the first of such
        entries within ``entries`` stays): decided in the write itself, so that of two
        writers at once (a bounce's entry of ``suppress_for`` and a complaint's without
        end) the longer entry stands whichever writes last."""
        ...

    def unsuppress(self, targets: Sequence[str]) -> int:
        """Remove the entries of ``targets`` (normalized); returns how many existed."""
        ...

    def suppressions_for(self, targets: Sequence[str], *, now: datetime) -> dict[str, Suppression]:
        """The entries of ``targets`` (normalized addresses and domains) that apply at
        ``now``, by target: one indexed lookup, made by the worker once per lease. An
        entry whose row cannot be read still applies (:mod:`~mailstrom.stores.side_rows`):
        what cannot be read is None, and an expiry that is no time does not expire."""
        ...

    def list_suppressions(
        self, *, now: datetime | None = None, after: str = "", limit: int = 100
    ) -> list[Suppression]:
        """Up to ``limit`` entries with a target after ``after``, in target order (page on
        with the last target seen); with ``now``, only those that apply then."""
        ...

    def prune_suppressions(self, *, expired_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` entries that expired at or before ``expired_before``
        (those soonest expired first), in one short write found by an index on the
        expiry; returns how many. Call it again while it returns ``limit``, so that no
        write holds the store long (the worker prunes so: ``SUPPRESSION_KEPT`` in
        :mod:`~mailstrom.runtime.worker_screening`). An entry whose expiry is no time
        (a damaged row) does not expire, and stays."""
        ...

    def fail_late(self, message_id: str, address: str, attempt: Attempt) -> bool:
        """Mark a DELIVERED recipient FAILED after the fact (a bounce that came back after
        the server had accepted the message): its state, reason and finish time become
        those of ``attempt``, which is appended to its history without counting as a
        delivery attempt. With events enabled, an event is written in the same
        transaction. Returns False, changing nothing, when the message has no such
        recipient (``address`` exactly as stored) or it is not DELIVERED: one no server
        has accepted (queued, deferred, in delivery) cannot have bounced after acceptance,
        and a failed one has failed already. Raises UnknownMessage for an unknown id."""
        ...

    def recipients_by_address(
        self, message_id: str, addresses: Sequence[str] | None
    ) -> RecipientsFound:
        """The recipients of ``message_id`` whose address is one of ``addresses``, or
        differs from one only in the case of ASCII letters (None: every recipient), found
        by index: reading a report about one recipient of a message of 50,000 reads that
        one, not the 50,000 with their histories (:meth:`status`). Raises UnknownMessage
        for an unknown id."""
        ...

    def message_ids_for_header(self, header_message_id: str, *, limit: int = 10) -> list[str]:
        """Ids of the messages whose Message-ID header is ``header_message_id`` (with its
        angle brackets), newest first, at most ``limit``."""
        ...

    def verp_key(self) -> bytes:
        """The store's secret key for VERP tokens (:mod:`mailstrom.bounces.verp`):
        :data:`VERP_KEY_SIZE` random bytes, made the first time any process asks and the
        same ever after for every process sharing the store (workers make tokens with it,
        ``mailstrom bounce`` checks them)."""
        ...

    # --- MTA-STS policies and TLS session counters (schema version 9) -------------------

    def mta_sts_policy(self, domain: str) -> CachedPolicy | None:
        """The MTA-STS policy cached for ``domain`` (lower-case A-label), expired or not,
        or None. Every worker sharing the store sees the same cache. Raises
        :class:`~mailstrom.errors.UnreadableRow` for a cached row that cannot be read (the
        MTA-STS source then fetches the policy again)."""
        ...

    def save_mta_sts_policy(self, cached: CachedPolicy) -> None:
        """Cache ``cached`` for its domain, replacing what was there."""
        ...

    def prune_mta_sts_policies(self, *, expired_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` cached policies that expired at or before
        ``expired_before`` (those soonest expired first), in one short write found by an
        index on the expiry; returns how many. Call it again while it returns ``limit``
        (the worker prunes so: ``MTA_STS_KEPT`` in
        :mod:`~mailstrom.runtime.worker_screening`). A policy is looked up by domain, and
        one per recipient domain that ever published one was otherwise kept for ever."""
        ...

    def add_tls_sessions(self, sessions: Sequence[TLSSessions]) -> None:
        """Add each counter of ``sessions`` to the stored counter with the same key
        (:meth:`TLSSessions.key`), in one transaction; concurrent adds never lose counts."""
        ...

    def tls_sessions(self, day: date) -> list[TLSSessions]:
        """Every session counter of the UTC day ``day`` (for TLS reports); one whose row
        cannot be read is left out with a warning."""
        ...

    def prune_tls_sessions(self, *, before: date) -> int:
        """Delete the counters of days before ``before``; returns how many."""
        ...

    def claim_tls_report(self, key: str, *, now: datetime, until: datetime) -> bool:
        """Take ``key`` (a TLS report's POST: its day, policy domain and URI) until
        ``until``: True when no run of any host sharing the store holds it (none did, or
        its hold ended by ``now``), False when one does. The report is POSTed by the run
        that took it, and once: its hold is made longer after a success and ended after a
        failure (:meth:`hold_tls_report`). Holds ended are deleted on the way."""
        ...

    def hold_tls_report(self, key: str, *, until: datetime) -> None:
        """Hold ``key`` (see :meth:`claim_tls_report`) until ``until``, whoever held it,
        and whether or not one did: an ``until`` not after the next claim's ``now`` lets
        it go."""
        ...

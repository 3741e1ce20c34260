"""What the dashboard reads, and the protocol each store's read model implements.

The :class:`~mailstrom.stores.base.Store` protocol serves the worker and the command line;
the dashboard needs other questions answered fast on a queue of a million messages: one
page of messages in a keyset order (never ``OFFSET`` over millions), the counts of an
overview, per-destination summaries, the stored bytes of one message. Each store has its
own :class:`ReadModel` (``mailstrom.readmodel.sqlite``, ``.postgres``, ``.memory``); one
contract suite (``tests/contract/test_readmodel.py``) runs over all three.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

from mailstrom.arguments import member_of, shown
from mailstrom.bounds import MAX_DURATION
from mailstrom.errors import MailstromError
from mailstrom.status import (
    Attempt,
    DestinationThrottle,
    DKIMStatus,
    MessageStatus,
    ReasonClass,
    RecipientState,
    derive_message_state,
    state_reason,
)
from mailstrom.stores.operator import Suspension, comparable, filter_address, filter_domain

MAX_PAGE = 500
"""The most messages one page may hold."""
THROUGHPUT_BUCKETS = 60
"""The overview's throughput chart: this many buckets of :data:`BUCKET` each, up to now."""
BUCKET = timedelta(minutes=1)
MAX_SEARCH = 320
"""Octets of a search term considered (an address is at most 254)."""

CLOSED = "read model is closed"
"""The :class:`~mailstrom.errors.StoreError` every read model raises after close()."""

_HEX = re.compile(r"^[0-9a-f]{1,32}$")
# ASCII digits only: str.isdigit() also takes "²", which int() refuses.
_CURSOR = re.compile(r"(?P<us>-?[0-9]{1,20})\.(?P<seq>[0-9]{1,19})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_SEQ = 2**63 - 1
"""The largest insertion number a store keeps (SQLite's and PostgreSQL's bigint)."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class InvalidQuery(MailstromError, ValueError):
    """A dashboard query that cannot be answered: a malformed page cursor, a bad limit."""


class QueueView(StrEnum):
    """Which messages the queue page lists (by a message's derived state, or held)."""

    PENDING = "pending"
    """Queued or deferred: what still needs delivering (the default)."""
    ALL = "all"
    QUEUED = "queued"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"
    """Finished with a recipient failed. A message stored with no recipient at all (its
    status says failed; no store queues one now, an older build did) is listed under
    :attr:`ALL` only: no index of the failed recipients holds it, and finding it meant
    walking every message of the queue for each page of this view."""
    HELD = "held"
    """Held messages still waiting (a recipient queued or deferred), those the overview
    counts: one cancelled or finished while held keeps its flag, and is listed under its
    state."""


class SortOrder(StrEnum):
    """The order of the queue page: by the time messages were queued."""

    NEWEST = "newest"
    OLDEST = "oldest"


@dataclass(frozen=True, slots=True, kw_only=True)
class PageCursor:
    """Where the next page starts: just past the message queued at ``created_at`` with the
    store's insertion number ``seq`` (keyset paging: each page is an index range scan)."""

    created_at: datetime
    seq: int

    def __post_init__(self) -> None:
        # As decode() takes one: a seq past a bigint overflowed SQLite's driver (a bare
        # OverflowError), and a negative one is no insertion number.
        check_count(self.seq, "a page cursor's seq")
        object.__setattr__(self, "created_at", check_aware(self.created_at, "a cursor's time"))

    def encode(self) -> str:
        """The cursor as it travels in a URL: ``<microseconds>.<seq>``."""
        return f"{(self.created_at - _EPOCH) // timedelta(microseconds=1)}.{self.seq}"

    @classmethod
    def decode(cls, text: str) -> PageCursor:
        """The cursor :meth:`encode` wrote; :class:`InvalidQuery` for anything else (a
        ``seq`` past a signed 64-bit integer, which no store has and none can compare)."""
        found = _CURSOR.fullmatch(text)
        if found is None or int(found["seq"]) > MAX_SEQ:
            raise InvalidQuery(f"not a page cursor: {text[:40]!r}")
        try:
            created = _EPOCH + timedelta(microseconds=int(found["us"]))
        except OverflowError:
            raise InvalidQuery(f"not a page cursor: {text[:40]!r}") from None
        return cls(created_at=created, seq=int(found["seq"]))


def check_count(value: int, name: str) -> int:
    """``value`` when a store can take it as a LIMIT or an OFFSET: 0 to :data:`MAX_SEQ`.
    :class:`InvalidQuery` otherwise: a negative one was all but the last to the memory
    store's slice, no limit to SQLite and refused by PostgreSQL, and one past a bigint
    overflowed SQLite's driver."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise InvalidQuery(f"{name} must be 0 to {MAX_SEQ}, got {value!r}"[:120])
    return value


def check_aware(value: datetime, name: str) -> datetime:
    """``value`` in UTC when it is a timezone-aware datetime. :class:`InvalidQuery`
    otherwise: a naive one was a bare ValueError on SQLite, a TypeError on the memory
    store (where it met a stored time) and read in the session's time zone by PostgreSQL.

    In UTC because ages and the chart's minutes are subtracted from it, and Python
    subtracts on the wall clock of a ``ZoneInfo`` time: across a change to summer time an
    hour before 03:10 was 02:10, which does not exist and reads as 01:10 UTC, now itself."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidQuery(f"{name} must be a timezone-aware datetime, got {shown(value)}")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01 east of UTC, 9999-12-31 west of it
        raise InvalidQuery(f"{name} has no time in UTC: {shown(value)}") from None


_LATEST = datetime.max.replace(tzinfo=UTC)
_EARLIEST = datetime.min.replace(tzinfo=UTC)


def cursor_after(
    created_at: datetime | None, seq: int, *, late: bool, newest: bool
) -> PageCursor | None:
    """The cursor past a page's last row (``created_at``, ``seq``).

    ``created_at`` is None for a creation time that is no time (a row changed by hand:
    infinity, text, a year past 9999), which sorts after every time (``late``) or before.
    Such a message is left out of the page as unreadable, and so is everything that sorts
    beyond it: the cursor skips to the readable times, or the walk ends there."""
    if created_at is not None:
        return PageCursor(created_at=created_at, seq=seq)
    if late != newest:  # the rest of the walk holds only times that are no time
        return None
    if newest:
        return PageCursor(created_at=_LATEST, seq=MAX_SEQ)
    return PageCursor(created_at=_EARLIEST, seq=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Search:
    """A search term, understood as what it looks like: an address (has an ``@``), the
    beginning of a message id (hex digits), otherwise a destination domain. A domain, and
    an address's domain, are looked for as recipients' are stored: in lower case, U-labels
    as A-labels (:func:`~mailstrom.stores.operator.filter_domain`)."""

    address: str | None = None
    id_prefix: str | None = None
    domain: str | None = None

    def __post_init__(self) -> None:
        # As parse() makes them, for a Search made directly too: "Bücher.example" only
        # lower-cased found nothing of the xn--bcher-kva.example mail the queue held.
        if self.address is not None:
            object.__setattr__(self, "address", filter_address(self.address))
        if self.domain:
            object.__setattr__(self, "domain", filter_domain(self.domain) or self.domain)
        if self.id_prefix is not None:
            object.__setattr__(self, "id_prefix", self.id_prefix.lower())

    @classmethod
    def parse(cls, text: str) -> Search | None:
        """None for an empty term."""
        term = text.strip()[:MAX_SEARCH]
        if not term:
            return None
        if "@" in term:
            return cls(address=filter_address(term))
        if _HEX.match(term.lower()):
            return cls(id_prefix=term.lower())
        # Normalised as a Search made directly is: a term with no domain left ("." less
        # its trailing dot) is kept as typed and finds nothing, where "" was no filter.
        return cls(domain=term)


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueQuery:
    """One page of the queue: the ``mailstrom queue`` filters, a search, an order."""

    view: QueueView = QueueView.PENDING
    domain: str | None = None
    """Messages with a recipient at this domain (case-insensitive)."""
    older_than: timedelta | None = None
    """Messages queued more than this long before ``now``."""
    search: Search | None = None
    order: SortOrder = SortOrder.NEWEST
    after: PageCursor | None = None
    """Start just past this message (from the previous page's ``next``)."""
    limit: int = 50

    def __post_init__(self) -> None:
        # A member, or its name as the dashboard's URL gives it: each store compares the
        # members by identity, so "newest" listed the oldest first, and an unknown view
        # was a different error per store (on SQLite no filter at all).
        view, order = member_of(QueueView, self.view), member_of(SortOrder, self.order)
        if view is None:
            raise InvalidQuery(f"no queue view {shown(self.view)}")
        if order is None:
            raise InvalidQuery(f"no queue order {shown(self.order)}")
        object.__setattr__(self, "view", view)
        object.__setattr__(self, "order", order)
        if self.domain:
            # As recipients' domains are stored (and QueueFilter.domain is taken): lower
            # case, U-labels as A-labels, no trailing dot.
            object.__setattr__(self, "domain", filter_domain(self.domain) or self.domain)
        # A whole number, as check_count() takes one: 2.5 reached the stores (a bare
        # TypeError slicing the memory store's rows, "datatype mismatch" from SQLite).
        if (
            isinstance(self.limit, bool)
            or not isinstance(self.limit, int)
            or not 1 <= self.limit <= MAX_PAGE
        ):
            raise InvalidQuery(f"page size must be 1 to {MAX_PAGE}, got {self.limit!r}"[:120])
        # Subtracted from now: a longer age overflowed (a bare OverflowError on every
        # store), and a negative one reached into the future.
        if self.older_than is not None and not timedelta(0) <= self.older_than <= MAX_DURATION:
            raise InvalidQuery(
                f"older_than must be 0 to {MAX_DURATION.days} days, got {self.older_than}"
            )
        search = self.search or Search()
        for text in (self.domain, search.address, search.domain, search.id_prefix):
            # No stored domain, address or id holds one, and PostgreSQL refuses a NUL in
            # any text it is given (a "refused value" error, where the others find nothing).
            if text is not None and _CONTROL.search(text):
                raise InvalidQuery(f"a control character in {text[:40]!r}")
            # Nor a lone surrogate, which no driver can encode (SQLite raised a bare
            # UnicodeEncodeError, PostgreSQL a "refused value" error).
            if text is not None and not comparable(text):
                raise InvalidQuery(f"not UTF-8 text: {text[:40]!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageSummary:
    """One message as the queue page lists it: the fields of its
    :class:`~mailstrom.status.MessageStatus`, and of its recipients only what one line
    shows. Read as an aggregate per message: reading each recipient's status cost 2.6 s
    for a page of 100 messages of 1,000 recipients each."""

    id: str
    state: RecipientState
    """As :attr:`MessageStatus.state` (from its recipients' states)."""
    envelope_from: str
    created_at: datetime
    size: int
    recipients: int
    """How many recipients it has."""
    first_recipient: str | None
    """Its first recipient's address (None with no recipient at all)."""
    reason: str | None
    """The reason that explains its state (:func:`~mailstrom.status.state_reason`)."""
    header_message_id: str | None = None
    subject: str | None = None
    held: bool = False
    """As :attr:`MessageStatus.held`: flagged and not final."""
    dkim: DKIMStatus | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    priority: str | None = None
    send_at: datetime | None = None
    expires_at: datetime | None = None
    idempotency_key: str | None = None

    @classmethod
    def of(cls, status: MessageStatus) -> MessageSummary:
        """The summary of a whole status (what each read model's summary must equal)."""
        counts: dict[RecipientState, int] = {}
        for r in status.recipients:
            counts[r.state] = counts.get(r.state, 0) + 1
        return summarise(
            status,
            flagged=status.held,
            counts=counts,
            first=status.recipients[0].address if status.recipients else None,
            reason=state_reason(status.recipients),
        )


def summarise(
    head: MessageStatus,
    *,
    flagged: bool,
    counts: Mapping[RecipientState, int],
    first: str | None,
    reason: str | None,
) -> MessageSummary:
    """The summary of the message ``head`` (its recipients not read: its state and
    ``held`` are not its own), held when ``flagged``, with its recipients counted by state
    in ``counts``, its first address and its reason."""
    state, held = whole_state(counts, flagged)
    return MessageSummary(
        id=head.id,
        state=state,
        envelope_from=head.envelope_from,
        created_at=head.created_at,
        size=head.size,
        recipients=sum(counts.values()),
        first_recipient=first,
        reason=reason,
        header_message_id=head.header_message_id,
        subject=head.subject,
        held=held,
        dkim=head.dkim,
        tags=head.tags,
        metadata=head.metadata,
        priority=head.priority,
        send_at=head.send_at,
        expires_at=head.expires_at,
        idempotency_key=head.idempotency_key,
    )


def whole_state(counts: Mapping[RecipientState, int], flagged: bool) -> tuple[RecipientState, bool]:
    """A message's state and ``held`` from all its recipients counted by state and its
    hold flag, when its recipients are not all read (a summary, a page of them)."""
    state = derive_message_state([s for s, n in counts.items() if n])
    # One that finished while held keeps its flag, and is no mail on hold.
    return state, flagged and not state.is_final


REASON_RANK = (
    "CASE WHEN r.state IN ('queued', 'deferred') THEN 0 WHEN r.state = 'failed' THEN 1 ELSE 2 END"
)
""":func:`~mailstrom.status.reason_rank` in SQL (then by position), for a SQL read
model's ``ORDER BY`` over recipients ``r``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueuePage:
    """The messages of one page (summaries) and where the next one starts."""

    messages: tuple[MessageSummary, ...]
    next: PageCursor | None = None
    """None on the last page."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ThroughputBucket:
    """Attempts that ended in one interval, by outcome."""

    start: datetime
    delivered: int = 0
    deferred: int = 0
    """Temporary failures."""
    failed: int = 0
    """Permanent failures."""

    @property
    def total(self) -> int:
        return self.delivered + self.deferred + self.failed


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """Pending mail to one destination domain, and the latest reply that deferred it."""

    domain: str
    pending: int
    """Queued and deferred recipients."""
    deferred: int
    last_reply: str | None = None
    """The reply (or local error) of the newest deferred recipient there."""
    reason_class: ReasonClass | None = None
    last_attempt_at: datetime | None = None
    suspension: Suspension | None = None
    """The suspension in force (looked up when the query is given ``now``); None while
    mail is delivered there."""

    @property
    def suspended(self) -> bool:
        """Whether no worker delivers here now."""
        return self.suspension is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class OldestPending:
    """The message waiting longest: the first queued of those with a pending recipient."""

    id: str
    created_at: datetime | None
    """None when the stored time is no time (a row changed by hand): its age is unknown."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Overview:
    """The numbers on the dashboard's first page."""

    by_state: Mapping[RecipientState, int] = field(default_factory=dict)
    """Recipients by state."""
    messages: int = 0
    held: int = 0
    """Held messages."""
    oldest_pending: OldestPending | None = None
    throughput: tuple[ThroughputBucket, ...] = ()
    """Attempts per minute over the last hour, oldest first."""
    top_deferred: tuple[Destination, ...] = ()
    """The destinations with the most deferred recipients, most first."""
    suspended: tuple[Suspension, ...] = ()
    """The suspended destinations at ``now``, by domain."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageDetail:
    """One message as its dashboard page shows it (:meth:`ReadModel.message_status`)."""

    status: MessageStatus
    """As :meth:`~mailstrom.stores.base.Store.status` gives it, except that each
    recipient's :attr:`~mailstrom.status.RecipientStatus.history` holds only its latest
    attempts, as many as its share of the page's budget (:func:`attempt_shares`)."""
    kept: tuple[int, ...]
    """How many attempts each recipient's whole history holds (the latest
    ``MAX_HISTORY``), in the order of ``status.recipients``: the page says how many it
    does not show."""
    by_state: Mapping[RecipientState, int] = field(default_factory=dict)
    """All its recipients counted by state."""
    next_after: int | None = None
    """The ``after`` of the next page of recipients; None on the last page."""

    @property
    def recipients(self) -> int:
        """How many recipients the whole message has (``status.recipients`` may be a page)."""
        return sum(self.by_state.values())


def attempt_shares(recipients: int, budget: int) -> list[int]:
    """How many of its latest attempts each of ``recipients`` recipients (in their
    order) shows of a page's ``budget`` of attempt rows: alike, the first ones taking
    what does not divide evenly; past ``budget`` recipients, the later ones none.

    >>> attempt_shares(3, 8)
    [3, 3, 2]
    >>> attempt_shares(4, 2)
    [1, 1, 0, 0]
    """
    each, extra = divmod(budget, max(1, recipients))
    return [each + 1 if i < extra else each for i in range(recipients)]


def check_recipient_page(after: int, recipients: int | None) -> None:
    """:class:`InvalidQuery` unless ``after`` is -1 (from the first recipient) or a
    position a store can compare, and ``recipients`` is None (all) or 1 to :data:`MAX_SEQ`."""
    if after != -1:
        check_count(after, "after")
    if recipients is not None and check_count(recipients, "recipients") == 0:
        raise InvalidQuery("a page of recipients holds at least one")


def detail(
    status: MessageStatus,
    histories: Sequence[tuple[Attempt, ...]] | None,
    kept: Sequence[int],
    *,
    flagged: bool,
    counts: Mapping[RecipientState, int],
    next_after: int | None,
) -> MessageDetail:
    """``status`` (its recipients one page) with each recipient's ``histories`` entry as
    its history (None: those it holds), and its ``kept`` count (both in the order of its
    recipients). Its state and ``held`` are the whole message's, from its recipients
    counted by state in ``counts`` and its hold flag ``flagged``: not the page's, which
    may hold only delivered recipients while a later one waits (the actions rely on them)."""
    recipients = (
        status.recipients
        if histories is None
        else tuple(replace(r, history=h) for r, h in zip(status.recipients, histories, strict=True))
    )
    if len(kept) != len(recipients):
        raise ValueError(f"{len(kept)} history counts for {len(recipients)} recipients")
    state, held = whole_state(counts, flagged)
    return MessageDetail(
        status=replace(status, recipients=recipients, state=state, held=held),
        kept=tuple(kept),
        by_state=dict(counts),
        next_after=next_after,
    )


class ReadModel(Protocol):
    """The dashboard's queries over one store. Safe to share between threads.

    Raises :class:`~mailstrom.errors.UnknownMessage` for an id that is not stored,
    :class:`InvalidQuery` for a ``limit``, ``offset`` or ``top`` outside 0 to
    :data:`MAX_SEQ` or a naive ``now``, and :class:`~mailstrom.errors.StoreError` for
    driver failures.
    """

    def overview(self, *, now: datetime, top: int = 10) -> Overview:
        """Counts by state, the oldest pending message, the last hour's throughput (up to
        ``now``) and the ``top`` destinations by deferred recipients."""
        ...

    def queue_page(self, query: QueueQuery, *, now: datetime) -> QueuePage:
        """One page of messages matching ``query``, in its order."""
        ...

    def destinations(
        self,
        *,
        limit: int = 100,
        offset: int = 0,
        domain: str | None = None,
        now: datetime | None = None,
    ) -> list[Destination]:
        """Destinations with pending mail, most pending first (then by name); only
        ``domain`` when given. The list is an aggregate over pending recipients only.
        With ``now``, each carries the suspension in force then (if any)."""
        ...

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        """The suspended destinations at ``now``, by domain (as
        :meth:`~mailstrom.stores.base.Store.suspensions`; the list is small)."""
        ...

    def throttles(self, *, now: datetime, limit: int | None = None) -> list[DestinationThrottle]:
        """The destinations a throttling reply paused, the pause running at ``now``,
        soonest end first (as :meth:`~mailstrom.stores.base.Store.throttles`); the first
        ``limit`` of them only, when given (a hostile domain makes thousands)."""
        ...

    def throttle_count(self, *, now: datetime) -> int:
        """How many pauses run at ``now``: what :meth:`throttles` lists without a
        ``limit``, counted without reading each."""
        ...

    def message_status(
        self, message_id: str, *, attempts: int, after: int = -1, recipients: int | None = None
    ) -> MessageDetail:
        """The message's status, as :meth:`~mailstrom.stores.base.Store.status` gives it
        (pauses by the clock, as there), with each recipient's latest attempts only: as
        many as its share of ``attempts`` (:func:`attempt_shares`), the rest counted
        (:attr:`MessageDetail.kept`), never read. A message to 1,000 recipients tried 30
        times each was 30,000 attempts read for a page that shows 500.

        With ``recipients``, only a page of them: at most that many, those at positions
        past ``after`` (-1: from the first), the next page's ``after`` in
        :attr:`MessageDetail.next_after`; the state, ``held`` and counts stay the whole
        message's. A message to 1,000 recipients made a page of 819 KB.
        :class:`InvalidQuery` for an ``after`` below -1 or a ``recipients`` below 1.
        :class:`~mailstrom.errors.UnreadableRow` for a message whose rows (those read)
        cannot be read back, as the store's status raises it."""
        ...

    def waiting(self, message_id: str, *, at: Collection[str]) -> tuple[int, int]:
        """Of the message's pending recipients, how many are at one of the domains ``at``
        (lower case: the suspended ones), and how many of the others wait for a running
        pause of their destination (:attr:`~mailstrom.status.RecipientStatus.throttle`,
        read by the clock as :meth:`message_status` reads it): what a retry says, counted
        in the store, no recipient's status made (100,000 of them were made per click)."""
        ...

    def message_data(self, message_id: str, *, limit: int | None = None) -> bytes:
        """The message as stored (the bytes the worker transmits); with ``limit``, only
        its first ``limit`` octets, which is all the store reads of a large one (a page
        shows the headers and a part: ``MessageStatus.size`` says how large it is)."""
        ...

    def close(self) -> None:
        """Release connections; every view raises :class:`~mailstrom.errors.StoreError`
        (:data:`CLOSED`) from now on. Idempotent."""
        ...


def with_suspensions(
    found: list[Destination], suspensions: Iterable[Suspension]
) -> list[Destination]:
    """``found`` with each destination's suspension (from the store's short list)."""
    by_domain = {s.domain: s for s in suspensions}
    if not by_domain:
        return found
    return [replace(d, suspension=by_domain.get(d.domain)) for d in found]


def throughput_window(now: datetime) -> tuple[datetime, list[datetime], datetime]:
    """The start of the chart's window, each bucket's start (whole minutes, the last
    bucket holding ``now``) and the window's end. :class:`InvalidQuery` for a ``now``
    whose window leaves ``datetime``'s range (its first hour, its last minute), which was
    a bare OverflowError."""
    last = now.replace(second=0, microsecond=0)
    try:
        starts = [last - BUCKET * i for i in range(THROUGHPUT_BUCKETS - 1, -1, -1)]
        return starts[0], starts, last + BUCKET
    except OverflowError:
        raise InvalidQuery(f"no hour of throughput up to {shown(now)}") from None


def queued_before(now: datetime, query: QueueQuery) -> datetime | None:
    """The time a message of ``query``'s page was queued before (its ``older_than`` back
    from ``now``), None for any. :class:`InvalidQuery` when that is before year 1, which
    was a bare OverflowError."""
    if query.older_than is None:
        return None
    try:
        return now - query.older_than
    except OverflowError:
        raise InvalidQuery(f"{query.older_than} before {shown(now)} is no time") from None


def fill_buckets(
    starts: list[datetime], counts: Mapping[tuple[int, str], int]
) -> tuple[ThroughputBucket, ...]:
    """Buckets from counts keyed by (bucket index, attempt outcome)."""
    return tuple(
        ThroughputBucket(
            start=start,
            delivered=counts.get((i, "delivered"), 0),
            deferred=counts.get((i, "temporary"), 0),
            failed=counts.get((i, "permanent"), 0),
        )
        for i, start in enumerate(starts)
    )


def id_range(prefix: str) -> tuple[str, str]:
    """The ids beginning with ``prefix`` lie between these two (inclusive): ids are 32
    lower-case hex digits, which every collation orders as C does."""
    pad = 32 - len(prefix)
    return prefix + "0" * pad, prefix + "f" * pad

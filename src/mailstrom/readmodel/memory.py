"""The dashboard's queries on a :class:`~mailstrom.stores.memory.MemoryStore`.

A memory store lives in one process, so this read model reads its dictionaries directly
and scans them, a batch of messages per hold of the store's lock (``MemoryStore._walk``):
``send_email`` and the worker wait for one batch, not for the whole queue. It
answers exactly as the SQL read models do (the contract suite checks it).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from datetime import datetime

from mailstrom.errors import StoreError
from mailstrom.readmodel.base import (
    BUCKET,
    CLOSED,
    Destination,
    MessageDetail,
    MessageSummary,
    OldestPending,
    Overview,
    PageCursor,
    QueuePage,
    QueueQuery,
    QueueView,
    SortOrder,
    attempt_shares,
    check_aware,
    check_count,
    check_recipient_page,
    detail,
    fill_buckets,
    id_range,
    queued_before,
    summarise,
    throughput_window,
    with_suspensions,
)
from mailstrom.status import (
    DestinationThrottle,
    ReasonClass,
    RecipientState,
    reason_of,
    reason_rank,
)
from mailstrom.stores.base import with_throttles
from mailstrom.stores.memory import MemoryStore
from mailstrom.stores.memory_records import _Message, _Recipient
from mailstrom.stores.operator import PENDING_STATES, Suspension, filter_domain

_PENDING = (RecipientState.QUEUED, RecipientState.DEFERRED)


class MemoryReadModel:
    """A :class:`~mailstrom.readmodel.base.ReadModel` over ``store``."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._closed = False

    def close(self) -> None:
        """Nothing to release; every view raises StoreError from now on, as the SQL read
        models' do. Idempotent."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(CLOSED)

    def overview(self, *, now: datetime, top: int = 10) -> Overview:
        """See :meth:`ReadModel.overview`."""
        check_count(top, "top")
        now = check_aware(now, "now")
        self._check_open()
        by_state = dict.fromkeys(RecipientState, 0)
        start, starts, end = throughput_window(now)
        counts: dict[tuple[int, str], int] = {}
        tallies: dict[str, _Tally] = {}
        oldest: _Message | None = None
        messages = held = 0

        def visit(batch: list[_Message]) -> bool:
            nonlocal oldest, messages, held
            messages += len(batch)
            for m in batch:
                for r in m.recipients.values():
                    by_state[r.state] += 1
                    for a in r.history:
                        if start <= a.at < end:
                            key = ((a.at - start) // BUCKET, a.outcome.value)
                            counts[key] = counts.get(key, 0) + 1
                if _tally(tallies, m, None) and (oldest is None or m.seq < oldest.seq):
                    oldest = m
                held += m.waiting()
            return False

        self._store._walk(visit, newest=None)
        busiest = sorted(
            (t for t in tallies.values() if t.deferred), key=lambda t: (-t.deferred, t.domain)
        )
        return Overview(
            by_state=by_state,
            messages=messages,
            held=held,
            oldest_pending=None
            if oldest is None
            else OldestPending(id=oldest.id, created_at=oldest.created_at),
            throughput=fill_buckets(starts, counts),
            top_deferred=tuple(t.destination() for t in busiest[:top]),
            suspended=tuple(self.suspensions(now=now)),
        )

    def destinations(
        self,
        *,
        limit: int = 100,
        offset: int = 0,
        domain: str | None = None,
        now: datetime | None = None,
    ) -> list[Destination]:
        """See :meth:`ReadModel.destinations`."""
        check_count(limit, "limit")
        check_count(offset, "offset")
        if now is not None:
            now = check_aware(now, "now")
        self._check_open()
        wanted = None if domain is None else filter_domain(domain)
        tallies: dict[str, _Tally] = {}

        def visit(batch: list[_Message]) -> bool:
            for m in batch:
                _tally(tallies, m, wanted)
            return False

        self._store._walk(visit, newest=None)
        found = [t.destination() for t in tallies.values()]
        found.sort(key=lambda d: (-d.pending, d.domain))
        page = found[offset : offset + limit]
        return page if now is None else with_suspensions(page, self.suspensions(now=now))

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        """See :meth:`ReadModel.suspensions`."""
        now = check_aware(now, "now")
        self._check_open()
        return self._store.suspensions(now=now)

    def throttles(self, *, now: datetime, limit: int | None = None) -> list[DestinationThrottle]:
        """See :meth:`ReadModel.throttles`."""
        now = check_aware(now, "now")
        if limit is not None:
            check_count(limit, "limit")
        self._check_open()
        return self._store.throttles(now=now)[:limit]

    def throttle_count(self, *, now: datetime) -> int:
        """See :meth:`ReadModel.throttle_count`."""
        now = check_aware(now, "now")
        self._check_open()
        return len(self._store.throttles(now=now))

    def queue_page(self, query: QueueQuery, *, now: datetime) -> QueuePage:
        """See :meth:`ReadModel.queue_page`."""
        now = check_aware(now, "now")
        newest = query.order is SortOrder.NEWEST
        cutoff = queued_before(now, query)
        after = None if query.after is None else (query.after.created_at, query.after.seq)
        self._check_open()
        page: list[MessageSummary] = []
        last: _Message | None = None
        more = False

        def visit(batch: list[_Message]) -> bool:
            nonlocal last, more
            for m in batch:
                if not (_matches(m, query) and (cutoff is None or m.created_at < cutoff)):
                    continue
                if len(page) == query.limit:
                    more = True
                    return True
                page.append(_summary(m))
                last = m
            return False

        # From the cursor on (bisection): each page judged the queue up to it, quadratic
        # for a reader paging through it.
        self._store._walk(visit, newest=newest, past=after)
        cursor = None
        if more and last is not None:
            cursor = PageCursor(created_at=last.created_at, seq=last.seq)
        return QueuePage(messages=tuple(page), next=cursor)

    def message_status(
        self, message_id: str, *, attempts: int, after: int = -1, recipients: int | None = None
    ) -> MessageDetail:
        """See :meth:`ReadModel.message_status`."""
        check_count(attempts, "attempts")
        check_recipient_page(after, recipients)
        self._check_open()
        with self._store._lock:
            m = self._store._get(message_id)
            counts: dict[RecipientState, int] = {}
            records: list[_Recipient] = []
            more = False
            # In position order (the order they were queued in): only the page's become
            # statuses, one more tells whether a next page exists.
            for r in m.recipients.values():
                counts[r.state] = counts.get(r.state, 0) + 1
                if r.position <= after or more:
                    continue
                if recipients is not None and len(records) == recipients:
                    more = True
                else:
                    records.append(r)
            page = {r.address: r for r in records}
            head = replace(m, recipients=page)
            status = with_throttles(head.snapshot(with_history=False), self._store._paused_in(head))
            shares = attempt_shares(len(records), attempts)
            histories = [
                tuple(r.history[-k:]) if k else () for r, k in zip(records, shares, strict=True)
            ]
            kept = [len(r.history) for r in records]
            flagged = m.held
        return detail(
            status,
            histories,
            kept,
            flagged=flagged,
            counts=counts,
            next_after=records[-1].position if more else None,
        )

    def waiting(self, message_id: str, *, at: Collection[str]) -> tuple[int, int]:
        """See :meth:`ReadModel.waiting`."""
        self._check_open()
        suspended = paused = 0
        with self._store._lock:
            m = self._store._get(message_id)
            pauses = self._store._paused_in(m)
            for r in m.recipients.values():
                if r.state not in PENDING_STATES:
                    continue
                if r.domain.lower() in at:
                    suspended += 1
                elif (pause := pauses.get(r.address)) is not None and (
                    r.next_attempt_at is None or r.next_attempt_at <= pause.until
                ):
                    paused += 1  # as with_throttles() shows it
        return suspended, paused

    def message_data(self, message_id: str, *, limit: int | None = None) -> bytes:
        """See :meth:`ReadModel.message_data`."""
        if limit is not None:
            check_count(limit, "limit")  # a slice took -5 as all but the last five octets
        self._check_open()
        with self._store._lock:
            data = self._store._get(message_id).prepared.data
        return data if limit is None else data[:limit]


def _summary(m: _Message) -> MessageSummary:
    """``m`` as the queue page lists it (call under the store's lock), read from its
    records: no recipient's status is made."""
    counts: dict[RecipientState, int] = {}
    # As state_reason() ranks them: pending, then failed, then delivered, each in order.
    best: tuple[int, str] | None = None
    for r in m.recipients.values():
        counts[r.state] = counts.get(r.state, 0) + 1
        reason = reason_of(r.reply, r.error)
        rank = reason_rank(r.state)
        if reason and (best is None or rank < best[0]):
            best = (rank, reason)
    first = next(iter(m.recipients.values()), None)
    return summarise(
        replace(m, recipients={}).snapshot(with_history=False),
        flagged=m.held,
        counts=counts,
        first=None if first is None else first.address,
        reason=None if best is None else best[1],
    )


def _matches(m: _Message, query: QueueQuery) -> bool:
    states = [r.state for r in m.recipients.values()]
    view = query.view
    if view is QueueView.HELD:
        # Held and still waiting, as the overview (and stats()) count them: a message
        # cancelled or finished while held keeps its flag, and is no mail on hold.
        if not m.waiting():
            return False
    elif view is QueueView.PENDING:
        if not any(s in _PENDING for s in states):
            return False
    elif view is not QueueView.ALL and m.state().value != view.value:
        return False
    elif view is QueueView.FAILED and not m.recipients:
        return False  # as the SQL stores' index of failed recipients (see QueueView.FAILED)
    search = query.search
    domains = [d.lower() for d in (query.domain, search and search.domain) if d]
    for domain in domains:
        if all(r.domain != domain for r in m.recipients.values()):
            return False
    if search is not None and search.address is not None and search.address not in m.recipients:
        return False
    if search is not None and search.id_prefix is not None:
        low, high = id_range(search.id_prefix)
        if not low <= m.id <= high:
            return False
    return True


class _Tally:
    """A destination's pending and deferred recipients, and its newest deferred one's
    reply (by queue order), as a walk of the messages counts them."""

    __slots__ = ("deferred", "domain", "newest", "pending", "reply")

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.pending = self.deferred = 0
        self.newest: tuple[int, int] | None = None
        self.reply: tuple[str | None, ReasonClass | None, datetime | None] = (None, None, None)

    def destination(self) -> Destination:
        if self.newest is None:
            return Destination(domain=self.domain, pending=self.pending, deferred=self.deferred)
        reply, reason_class, last_attempt_at = self.reply
        return Destination(
            domain=self.domain,
            pending=self.pending,
            deferred=self.deferred,
            last_reply=reply,
            reason_class=reason_class,
            last_attempt_at=last_attempt_at,
        )


def _tally(tallies: dict[str, _Tally], m: _Message, domain: str | None) -> bool:
    """Count ``m``'s pending recipients (those at ``domain`` only, unless None) in their
    destinations' tallies (call under the store's lock); whether it has any."""
    found = False
    for r in m.recipients.values():
        if r.state not in _PENDING:
            continue
        found = True
        if domain is not None and r.domain != domain:
            continue
        tally = tallies.get(r.domain)
        if tally is None:
            tally = tallies[r.domain] = _Tally(r.domain)
        tally.pending += 1
        if r.state is RecipientState.DEFERRED:
            tally.deferred += 1
            key = (m.seq, r.position)
            if tally.newest is None or key > tally.newest:
                tally.newest = key
                # Read now, under the lock: the recipient may change after it.
                last = str(r.reply) if r.reply is not None else r.error
                tally.reply = (last, r.reason_class, r.last_attempt_at)
    return found

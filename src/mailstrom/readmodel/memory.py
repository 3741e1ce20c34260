"""The dashboard's queries on a :class:`~mailstrom.stores.memory.MemoryStore`.

A memory store lives in one process, so this read model reads its dictionaries directly
(under the store's lock) and scans them: the memory store holds test-sized queues. It
answers exactly as the SQL read models do (the contract suite checks it).
"""

from __future__ import annotations

from datetime import datetime

from mailstrom.errors import StoreError
from mailstrom.readmodel.base import (
    BUCKET,
    CLOSED,
    Destination,
    OldestPending,
    Overview,
    PageCursor,
    QueuePage,
    QueueQuery,
    QueueView,
    SortOrder,
    check_aware,
    check_count,
    fill_buckets,
    id_range,
    throughput_window,
    with_suspensions,
)
from mailstrom.status import DestinationThrottle, RecipientState
from mailstrom.stores.memory import MemoryStore
from mailstrom.stores.memory_records import _Message, _Recipient
from mailstrom.stores.operator import Suspension, filter_domain

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

    def _messages(self) -> list[_Message]:
        # Callers hold the store's lock.
        self._check_open()
        return list(self._store._messages.values())

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(CLOSED)

    def overview(self, *, now: datetime, top: int = 10) -> Overview:
        """See :meth:`ReadModel.overview`."""
        check_count(top, "top")
        now = check_aware(now, "now")
        by_state = dict.fromkeys(RecipientState, 0)
        start, starts = throughput_window(now)
        end = starts[-1] + BUCKET
        counts: dict[tuple[int, str], int] = {}
        deferred: dict[str, list[_Recipient]] = {}
        oldest: _Message | None = None
        with self._store._lock:
            messages = self._messages()
            for m in messages:
                for r in m.recipients.values():
                    by_state[r.state] += 1
                    if r.state is RecipientState.DEFERRED:
                        deferred.setdefault(r.domain, []).append(r)
                    for a in r.history:
                        if start <= a.at < end:
                            key = ((a.at - start) // BUCKET, a.outcome.value)
                            counts[key] = counts.get(key, 0) + 1
                if any(r.state in _PENDING for r in m.recipients.values()) and (
                    oldest is None or m.seq < oldest.seq
                ):
                    oldest = m
            busiest = sorted(deferred.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
            top_deferred = tuple(self._destination(d, messages) for d, _ in busiest)
            held = sum(m.waiting() for m in messages)
        return Overview(
            by_state=by_state,
            messages=len(messages),
            held=held,
            oldest_pending=None
            if oldest is None
            else OldestPending(id=oldest.id, created_at=oldest.created_at),
            throughput=fill_buckets(starts, counts),
            top_deferred=top_deferred,
            suspended=tuple(self.suspensions(now=now)),
        )

    @staticmethod
    def _destination(domain: str, messages: list[_Message]) -> Destination:
        """Counts and the newest deferred recipient's reply (by insertion order)."""
        pending = deferred = 0
        newest: tuple[tuple[int, int], _Recipient] | None = None
        for m in messages:
            for r in m.recipients.values():
                if r.domain != domain or r.state not in _PENDING:
                    continue
                pending += 1
                if r.state is RecipientState.DEFERRED:
                    deferred += 1
                    key = (m.seq, r.position)
                    if newest is None or key > newest[0]:
                        newest = (key, r)
        if newest is None:
            return Destination(domain=domain, pending=pending, deferred=deferred)
        r = newest[1]
        return Destination(
            domain=domain,
            pending=pending,
            deferred=deferred,
            last_reply=str(r.reply) if r.reply is not None else r.error,
            reason_class=r.reason_class,
            last_attempt_at=r.last_attempt_at,
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
        wanted = None if domain is None else filter_domain(domain)
        with self._store._lock:
            messages = self._messages()
            names = {
                r.domain
                for m in messages
                for r in m.recipients.values()
                if r.state in _PENDING and (wanted is None or r.domain == wanted)
            }
            found = [self._destination(d, messages) for d in names]
        found.sort(key=lambda d: (-d.pending, d.domain))
        page = found[offset : offset + limit]
        return page if now is None else with_suspensions(page, self.suspensions(now=now))

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        """See :meth:`ReadModel.suspensions`."""
        now = check_aware(now, "now")
        self._check_open()
        return self._store.suspensions(now=now)

    def throttles(self, *, now: datetime) -> list[DestinationThrottle]:
        """See :meth:`ReadModel.throttles`."""
        now = check_aware(now, "now")
        self._check_open()
        return self._store.throttles(now=now)

    def queue_page(self, query: QueueQuery, *, now: datetime) -> QueuePage:
        """See :meth:`ReadModel.queue_page`."""
        now = check_aware(now, "now")
        newest = query.order is SortOrder.NEWEST
        cutoff = None if query.older_than is None else now - query.older_than
        after = None if query.after is None else (query.after.created_at, query.after.seq)
        with self._store._lock:
            chosen = [
                m
                for m in self._messages()
                if _matches(m, query)
                and (cutoff is None or m.created_at < cutoff)
                and (
                    after is None
                    or ((m.created_at, m.seq) < after if newest else (m.created_at, m.seq) > after)
                )
            ]
            chosen.sort(key=lambda m: (m.created_at, m.seq), reverse=newest)
            page = chosen[: query.limit]
            # As the store's lists show them: with the pauses their status shows.
            statuses = tuple(self._store._listed(m) for m in page)
        cursor = None
        if len(chosen) > query.limit:
            last = page[-1]
            cursor = PageCursor(created_at=last.created_at, seq=last.seq)
        return QueuePage(messages=statuses, next=cursor)

    def message_data(self, message_id: str, *, limit: int | None = None) -> bytes:
        """See :meth:`ReadModel.message_data`."""
        self._check_open()
        with self._store._lock:
            data = self._store._get(message_id).prepared.data
        return data if limit is None else data[:limit]


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

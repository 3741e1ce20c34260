"""The memory store's views of the queue (filtered lists, the newest messages, counts by
state) and its operator tools (schema version 10): short ids, counts, bulk changes,
purges, the queue's shape and suspended destinations, as
:mod:`mailstrom.stores.sqlite_operator` does them in SQL."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from mailstrom.arguments import row_limit
from mailstrom.status import DestinationThrottle, MessageStatus, QueueStats, RecipientState
from mailstrom.stores.base import QueueFilter, check_suspension, with_throttles
from mailstrom.stores.clock import before
from mailstrom.stores.memory_due import DueIndex
from mailstrom.stores.memory_records import _PENDING, _Message, writes
from mailstrom.stores.operator import (
    IdPage,
    ListingKey,
    ShapeRow,
    Suspension,
    age_edges,
    bucket_of,
    check_examine,
    earliest,
    foreign_place,
    listed_ids,
    normalize_prefix,
    pick_one,
    shape_rows,
)
from mailstrom.stores.watchers import Watchers

BULK_BATCH = 500
"""Listed messages a bulk change (``retry_many``, ``cancel_many``, ``hold_many``,
``purge_many``) changes per hold of the store's lock at most, each message whole under
one, as SQLite changes them per write transaction
(:data:`~mailstrom.stores.sqlite_operator.BULK_BATCH`): held for the whole list, the
worker, which calls the store on its event loop, and every ``send_email`` waited for
the last of 100,000 messages."""
_BATCH_PAUSE = 0.001
"""Seconds the lock is left free between two batches: a thread waiting for it (the
worker's loop) is woken at once, but the changing thread, still running, took it again
before the waiter could."""
WALK_BATCH = 2000
"""Messages a listing (``query``, ``recent``, ``stats``, the dashboard's views) or a call
over the whole queue (``shape``, ``purge``, ``purge_state``, ``retry_deferred``,
``release_holder``) judges per hold of the store's lock at most
(:meth:`MemoryOperatorMixin._walk`). Sorted and walked whole under one hold, a listing of
100,000 messages kept every ``send_email`` and the worker waiting for it: up to 200 ms
for a ``queue --domain`` matching nothing, 25 s for the dashboard's destinations
(benchmarks/memory_listing.py), 100-230 ms for a ``purge`` (benchmarks/memory_lease.py)."""

_T = TypeVar("_T")


class MemoryOperatorMixin:
    """Over the store's messages and suspensions, under its lock; mixed into
    :class:`MemoryStore`."""

    _lock: threading.Lock
    _messages: dict[str, _Message]
    _order: list[OrderKey]
    _last_seq: int
    _watchers: Watchers
    _cancel_watchers: Watchers
    _suspended: dict[str, Suspension]
    _due: DueIndex

    if TYPE_CHECKING:  # the store's own, in memory.py

        def _get(self, message_id: str) -> _Message: ...

        def _paused_in(self, m: _Message) -> dict[str, DestinationThrottle]: ...

        def _delete(self, message_ids: Sequence[str]) -> None: ...

        def _cancel(self, m: _Message, now: datetime) -> tuple[int, bool]: ...

    # --- views of the queue ------------------------------------------------------------

    def query(self, *, now: datetime, where: QueueFilter | None = None) -> list[MessageStatus]:
        """Messages matching ``where``, newest first, without history."""
        return self._matching(now, where or QueueFilter(), self._listed)

    def select_ids(self, *, now: datetime, where: QueueFilter) -> list[str]:
        """The ids :meth:`query` lists for ``where``, in its order, without making their
        statuses."""
        return self.select_page(now=now, where=where).ids

    def select_page(
        self,
        *,
        now: datetime,
        where: QueueFilter,
        after: ListingKey | None = None,
        examine: int | None = None,
    ) -> IdPage:
        """The ids :meth:`select_ids` lists for ``where`` after ``after`` on, with where the
        last of them stands (its created time and queue order); with ``examine``, from
        no more than that many messages, and where the next page starts. A place whose
        time is no datetime (SQLite's) is refused; PostgreSQL's is of this store's kind
        and taken as a place in this store's order."""
        if examine is None:
            found = self._matching(now, where, _placed, after=after)
            return IdPage(ids=[mid for mid, _ in found], last=found[-1][1] if found else None)
        stop: list[ListingKey | None] = [None]
        found = self._matching(
            now, where, _placed, after=after, examine=check_examine(examine), stop=stop
        )
        ids = [mid for mid, _ in found]
        if ids and len(ids) >= where.limit:
            return IdPage(ids=ids, last=found[-1][1])
        return IdPage(ids=ids, last=stop[0])

    def _matching(
        self,
        now: datetime,
        where: QueueFilter,
        take: Callable[[_Message], _T],
        *,
        after: ListingKey | None = None,
        examine: int | None = None,
        stop: list[ListingKey | None] | None = None,
    ) -> list[_T]:
        """``take`` of each of the newest ``where.limit`` messages matching ``where``
        (below ``after`` in that order, given one), newest first, each judged and taken
        under the lock (:meth:`_walk`). With ``examine``, looking at no more than that
        many messages queued before the filter's cutoff: ``stop[0]`` is then set to the
        place of the last one looked at when it looked at them all (more may follow)."""
        domain = where.domain.lower() if where.domain is not None else None
        cutoff = before(now, where.older_than) if where.older_than is not None else None
        found: list[_T] = []
        if where.limit <= 0:
            return found
        examined = 0

        def visit(batch: list[_Message]) -> bool:
            nonlocal examined
            for m in batch:
                if cutoff is not None and not m.created_at < cutoff:
                    continue
                if examine is not None:
                    if examined >= examine:
                        return True
                    examined += 1
                    if stop is not None and examined == examine:
                        stop[0] = ListingKey(m.created_at, m.seq)
                if where.held is not None and m.waiting() != where.held:
                    continue
                if domain is not None and all(r.domain != domain for r in m.recipients.values()):
                    continue
                if where.state is not None and m.state() is not where.state:
                    continue
                if where.tag is not None and where.tag not in m.prepared.attributes.tags:
                    continue
                if where.states is not None and m.state() not in where.states:
                    continue
                found.append(take(m))
                if len(found) >= where.limit:
                    return True
            return False

        self._walk(visit, past=None if after is None else _place(after))
        return found

    def _walk(
        self,
        visit: Callable[[list[_Message]], bool],
        *,
        newest: bool | None = True,
        past: tuple[datetime, int] | None = None,
    ) -> None:
        """Call ``visit`` with the store's messages in the order of the lists (created
        time, then queue order: newest first, oldest first with ``newest`` False, in no
        order with None; with ``past``, a place in that order (:func:`created_place`),
        only those after it in the walk's direction), at most :data:`WALK_BATCH` of them
        per call, each call under the lock, until it returns True. Each batch is found
        in the store's ordered list by bisection from where the one before ended, so a
        page of a listing costs its own length, not the queue's: copying the whole list
        for each page, paging through 100,000 messages took 4.7 s (a million, minutes).
        The lock is left free between two calls, as :meth:`_in_batches` leaves it:
        ``send_email`` and the worker wait for one batch, not for the whole queue. A
        message purged meanwhile is left out; one enqueued meanwhile is not seen (it
        came after the walk began)."""
        oldest_first = newest is False
        with self._lock:
            last_seq = self._last_seq
        place = past
        while True:
            with self._lock:
                order = self._order
                if oldest_first:
                    start = 0 if place is None else bisect_right(order, place, key=created_place)
                    chunk = order[start : start + WALK_BATCH]
                else:
                    end = (
                        len(order)
                        if place is None
                        else bisect_left(order, place, key=created_place)
                    )
                    chunk = order[max(0, end - WALK_BATCH) : end]
                    chunk.reverse()
                if not chunk:
                    return
                place = created_place(chunk[-1])
                current = self._messages
                batch = [
                    m
                    for _, seq, mid in chunk
                    if seq <= last_seq and (m := current.get(mid)) is not None and m.seq == seq
                ]
                if visit(batch):
                    return
            time.sleep(_BATCH_PAUSE)

    def recent(self, limit: int = 20) -> list[MessageStatus]:
        """The ``limit`` most recently enqueued messages, newest first."""
        # A negative limit is none, as in every store (a slice's -1 dropped the oldest).
        wanted = row_limit(limit)
        found: list[MessageStatus] = []

        def visit(batch: list[_Message]) -> bool:
            found.extend(self._listed(m) for m in batch[: wanted - len(found)])
            return len(found) >= wanted

        if wanted:
            self._walk(visit)
        return found

    def _listed(self, m: _Message) -> MessageStatus:
        """``m`` as a list shows it: without history, with the pauses its status shows."""
        return with_throttles(m.snapshot(with_history=False), self._paused_in(m))

    def stats(self) -> QueueStats:
        """Counts of recipients by state and of pending recipients by domain (in batches:
        :meth:`_walk`)."""
        by_state = dict.fromkeys(RecipientState, 0)
        by_domain: dict[str, int] = {}
        messages = held = 0

        def visit(batch: list[_Message]) -> bool:
            nonlocal messages, held
            messages += len(batch)
            for m in batch:
                for r in m.recipients.values():
                    by_state[r.state] += 1
                    if r.state in _PENDING:
                        by_domain[r.domain] = by_domain.get(r.domain, 0) + 1
                held += m.waiting()
            return False

        self._walk(visit, newest=None)
        return QueueStats(
            by_state=by_state, pending_by_domain=by_domain, messages=messages, held=held
        )

    # --- operator tools ----------------------------------------------------------------

    def resolve_id(self, prefix: str) -> str:
        """The one message id starting with ``prefix`` (see :class:`Store`)."""
        text = normalize_prefix(prefix)
        with self._lock:
            if text in self._messages:
                return text
            found = [mid for mid in self._messages if mid.startswith(text)]
        return pick_one(prefix, found)

    def count(self, *, now: datetime, where: QueueFilter, cap: int) -> int:
        """How many messages match ``where``, at most ``cap``."""
        where = replace(where, limit=row_limit(cap, "cap"))
        return len(self._matching(now, where, _message_id))

    def _in_batches(
        self, message_ids: Sequence[str], change: Callable[[list[_Message]], None]
    ) -> None:
        """Call ``change`` under the lock with the listed messages that exist,
        :data:`BULK_BATCH` listed ids (each once) per hold of the lock, leaving it free
        for :data:`_BATCH_PAUSE` between two: the worker and an enqueue wait for one
        batch, not for the whole list (as ``SQLiteStore._in_batches`` commits them).
        Each message is changed whole under one hold; a failure leaves the batches
        before it changed, and the same call again changes the rest."""
        unique = listed_ids(message_ids)
        for start in range(0, len(unique), BULK_BATCH):
            if start:
                time.sleep(_BATCH_PAUSE)
            with self._lock:
                batch = (self._messages.get(mid) for mid in unique[start : start + BULK_BATCH])
                change([m for m in batch if m is not None])

    @writes
    def retry_many(self, message_ids: Sequence[str], *, now: datetime) -> int:
        """Make the listed messages' pending recipients due at ``now`` (in batches:
        :meth:`_in_batches`)."""
        changed = 0

        def batch(messages: list[_Message]) -> None:
            nonlocal changed
            for m in messages:
                for r in m.recipients.values():
                    if r.state in _PENDING:
                        r.next_attempt_at = now
                        self._due.push(m, r)
                        changed += 1

        try:
            self._in_batches(message_ids, batch)
        finally:
            if changed:
                self._watchers.notify()
        return changed

    @writes
    def cancel_many(self, message_ids: Sequence[str], *, now: datetime) -> int:
        """Fail the listed messages' pending recipients as "cancelled" (in batches:
        :meth:`_in_batches`)."""
        changed, leased = 0, False

        def batch(messages: list[_Message]) -> None:
            nonlocal changed, leased
            # In enqueue order, as the SQL stores cancel a batch (and write its events).
            for m in sorted(messages, key=lambda m: m.seq):
                cancelled, was_leased = self._cancel(m, now)
                changed += cancelled
                leased = leased or was_leased

        try:
            self._in_batches(message_ids, batch)
        finally:
            if leased:
                self._cancel_watchers.notify()
        return changed

    @writes
    def hold_many(self, message_ids: Sequence[str], held: bool) -> int:
        """Hold or release the listed messages (in batches: :meth:`_in_batches`);
        returns how many changed."""
        changed, leased = 0, False

        def batch(messages: list[_Message]) -> None:
            nonlocal changed, leased
            for m in messages:
                if m.hold(held):
                    changed += 1
                    if not held:
                        self._due.push_message(m)
                    leased = leased or (held and m.leased())

        try:
            self._in_batches(message_ids, batch)
        finally:
            if changed and not held:
                self._watchers.notify()
            if leased:
                self._cancel_watchers.notify()  # a worker gives back what it has not started
        return changed

    @writes
    def purge_many(
        self,
        message_ids: Sequence[str],
        *,
        finished_before: datetime | None = None,
        state: RecipientState | None = None,
    ) -> int:
        """Delete the listed messages that are final (finished before the cutoff, in
        ``state``), in batches (:meth:`_in_batches`)."""
        deleted = 0

        def batch(messages: list[_Message]) -> None:
            nonlocal deleted
            doomed = [m.id for m in messages if self._finished(m, finished_before, state)]
            self._delete(doomed)
            deleted += len(doomed)

        self._in_batches(message_ids, batch)
        return deleted

    @writes
    def purge_state(self, *, finished_before: datetime, state: RecipientState) -> int:
        """Delete finished messages in ``state`` finished before the cutoff."""
        return self._purge_finished(finished_before, state)

    def _purge_finished(self, finished_before: datetime, state: RecipientState | None) -> int:
        """Delete the messages finished before the cutoff (in ``state``; None: any), each
        judged and deleted under the lock, a batch per hold of it (:meth:`_walk`): held
        for the whole queue, ``send_email`` and the worker waited 100 ms and more at
        100,000 messages (benchmarks/memory_lease.py)."""
        deleted = 0

        def visit(batch: list[_Message]) -> bool:
            nonlocal deleted
            doomed = [m.id for m in batch if self._finished(m, finished_before, state)]
            self._delete(doomed)
            deleted += len(doomed)
            return False

        self._walk(visit, newest=None)
        return deleted

    @staticmethod
    def _finished(m: _Message, before: datetime | None, state: RecipientState | None) -> bool:
        recipients = m.recipients.values()
        if any(r.finished_at is None for r in recipients):
            return False
        if any(r.notice is not None for r in recipients):
            return False  # its notice is still owed, and is made of the message
        if before is not None and not all(
            r.finished_at is not None and r.finished_at < before for r in recipients
        ):
            return False
        return state is None or m.state() is state

    def shape(self, *, now: datetime, edges: Sequence[timedelta]) -> list[ShapeRow]:
        """Pending recipients per domain and message age, largest domain first."""
        edges = age_edges(edges)
        counts: dict[tuple[str, int], int] = {}

        def visit(batch: list[_Message]) -> bool:
            for m in batch:
                bucket = bucket_of(now - m.created_at, edges)
                for r in m.recipients.values():
                    if r.state in _PENDING:
                        key = (r.domain, bucket)
                        counts[key] = counts.get(key, 0) + 1
            return False

        self._walk(visit, newest=None)  # a batch per hold of the lock
        return shape_rows(counts, len(edges) + 1)

    def message_data(self, message_id: str) -> bytes:
        """The message as stored."""
        with self._lock:
            return self._get(message_id).prepared.data

    @writes
    def suspend(self, domain: str, *, now: datetime, until: datetime | None = None) -> None:
        """Stop delivery to ``domain`` until ``until`` or resume; the workers are told, so
        that they give back what they leased of it and have not started."""
        until = check_suspension(domain, now, until)
        with self._lock:
            self._suspended[domain] = Suspension(domain=domain, suspended_at=now, until=until)
        # Told whether or not a worker leased some of it: finding out would walk every
        # message under the lock, and a worker told of nothing asks its leases once.
        self._cancel_watchers.notify()

    @writes
    def resume(self, domain: str, *, now: datetime) -> bool:
        """End the suspension of ``domain``; False when none was in force at ``now``."""
        with self._lock:
            ended = self._suspended.pop(domain, None)
        found = ended is not None and ended.active(now)
        if found:
            self._watchers.notify()
        return found

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        """The suspensions in force at ``now``, by domain."""
        with self._lock:
            return sorted(
                (s for s in self._suspended.values() if s.active(now)), key=lambda s: s.domain
            )

    def _suspended_domains(self, now: datetime) -> frozenset[str]:
        """Domains suspended at ``now`` (call under the lock, from a lease or next_due).
        The timed suspensions that have ended by then are dropped, as the durable stores
        delete their rows there: :meth:`extend` leaves out the recipients of every
        suspension still kept."""
        if not self._suspended:
            return frozenset()
        for domain in [d for d, s in self._suspended.items() if not s.active(now)]:
            del self._suspended[domain]
        return frozenset(self._suspended)

    def _suspension_end(self, now: datetime) -> datetime | None:
        """When the first timed suspension in force ends (call under the lock): work at
        that domain may become due then."""
        return earliest(*(s.until for s in self._suspended.values() if s.active(now)))


def _message_id(m: _Message) -> str:
    return m.id


OrderKey = tuple[datetime, int, str]
"""A message's place in the store's ordered list: created time, queue order, id."""


def order_key(m: _Message) -> OrderKey:
    """``m``'s entry in the store's ordered list."""
    return m.created_at, m.seq, m.id


def created_place(key: OrderKey) -> tuple[datetime, int]:
    """The order of the lists: created time, then queue order."""
    return key[0], key[1]


def is_live(messages: dict[str, _Message], key: OrderKey) -> bool:
    """Whether the message ``key`` was made for is still in ``messages`` (an id queued
    again is another message, with another queue order)."""
    m = messages.get(key[2])
    return m is not None and m.seq == key[1]


def _placed(m: _Message) -> tuple[str, ListingKey]:
    """``m``'s id and its place in the order of the lists."""
    return m.id, ListingKey(m.created_at, m.seq)


def _place(key: ListingKey) -> tuple[datetime, int]:
    """``key`` as :func:`created_place` makes it; InvalidArgument for a key of a kind
    this store never gives (SQLite's, whose time is an integer), not for PostgreSQL's,
    which is of this kind (:func:`~mailstrom.stores.operator.foreign_place`). A naive
    time or a seq that is no int is refused too: compared with this store's places, it
    raised a bare TypeError."""
    created = key.created
    if not isinstance(created, datetime) or created.utcoffset() is None or type(key.seq) is not int:
        raise foreign_place(key)
    return created, key.seq

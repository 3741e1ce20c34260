"""An in-memory store: dictionaries behind one lock, for tests and throwaway use.

Nothing survives the process. The semantics are exactly those of the durable stores (the
contract suite in ``tests/contract`` runs unchanged against it), so code tested against a
``MemoryStore`` behaves the same on SQLite or PostgreSQL.
"""

from __future__ import annotations

import functools
import heapq
import inspect
import itertools
import secrets
import threading
import time
from bisect import insort
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any, TypeVar

from mailstrom.arguments import row_limit
from mailstrom.errors import StoreError, UnknownMessage
from mailstrom.message.prepared import PreparedMessage
from mailstrom.policy.throttle import BucketState
from mailstrom.status import DestinationThrottle, MessageStatus, RecipientState
from mailstrom.stores.base import (
    MAX_OWED_MESSAGES,
    MAX_TLS_BROKEN,
    VERP_KEY_SIZE,
    Lease,
    LeasedRecipient,
    OwedNotice,
    RecipientResult,
    WorkItem,
    byte_budget,
    check_storable,
    check_tls_host,
    domain_of,
    holder_range,
    lease_token,
    messages_within,
    new_message_id,
    record_then_lease,
    with_throttles,
)
from mailstrom.stores.clock import after, aware_utc, kept_time
from mailstrom.stores.dkim_column import bounded_dkim
from mailstrom.stores.fairness import fairness
from mailstrom.stores.memory_due import DueIndex, Entry
from mailstrom.stores.memory_ends import Ends
from mailstrom.stores.memory_events import MemoryEventsMixin
from mailstrom.stores.memory_operator import (
    WALK_BATCH,
    MemoryOperatorMixin,
    OrderKey,
    created_place,
    is_live,
    order_key,
)
from mailstrom.stores.memory_records import (
    _PENDING,
    _Event,
    _Message,
    _Recipient,
    accepted_after_cancel,
    utc_attempt,
    writes,
)
from mailstrom.stores.memory_shaping import MemoryShapingMixin
from mailstrom.stores.memory_suppressions import MemorySuppressionsMixin
from mailstrom.stores.memory_tls import MemoryTLSMixin
from mailstrom.stores.operator import Suspension, earliest
from mailstrom.stores.watchers import Watchers
from mailstrom.suppression import Suppression, lookup_targets

_Class = TypeVar("_Class", bound=type)

_TIMES = frozenset(["datetime", "datetime | None"])
"""How a keyword argument that takes a time is annotated (as text: every module of the
memory store has ``from __future__ import annotations``)."""


def _times_in_utc(cls: _Class) -> _Class:
    """``cls`` with every public method's time arguments (``now``, ``until``,
    ``finished_before``...) taken in UTC, and refused naive, as the SQL stores do.
    Kept as given, a naive ``now`` was queued with the message, and every lease,
    listing and query from then on compared it with aware times and raised TypeError;
    a ``ZoneInfo`` time was shown back in its own zone, where the others show UTC."""
    for name in dir(cls):
        method = getattr(cls, name)
        if name.startswith("_") or not inspect.isfunction(method):
            continue
        times = tuple(
            parameter.name
            for parameter in inspect.signature(method).parameters.values()
            if parameter.kind is parameter.KEYWORD_ONLY and parameter.annotation in _TIMES
        )
        if times:
            setattr(cls, name, _in_utc(method, times))
    return cls


def _in_utc(method: Callable[..., Any], times: tuple[str, ...]) -> Callable[..., Any]:
    @functools.wraps(method)
    def in_utc(self: object, *args: object, **kwargs: object) -> Any:
        for key in times:
            when = kwargs.get(key)
            if isinstance(when, datetime):
                kwargs[key] = aware_utc(when, key)
        return method(self, *args, **kwargs)

    return in_utc


def _by_lanes(
    lanes: Sequence[tuple[str, int]],
    limit: int,
    lane_due: Callable[[str], Iterator[Entry]],
    others: Callable[[set[str]], Iterator[Entry]],
) -> list[Entry]:
    """The due recipients a lease with ``lanes`` takes: each named lane's earliest
    (``lane_due``), up to its (first) number, highest lane first; then, when every lane
    had room left and nothing more due, the earliest of the lanes not named
    (``others``)."""
    taken: list[Entry] = []
    exhausted = True
    seen: set[str] = set()
    for lane, most in lanes:
        if lane in seen:
            # A lane named twice counts once, with its first number, as in every store:
            # a repeat with no room left held the lanes not named back.
            continue
        seen.add(lane)
        take = min(most, limit - len(taken))
        if take <= 0:
            exhausted = False
            continue
        found = list(itertools.islice(lane_due(lane), take))
        exhausted = exhausted and len(found) < take
        taken += found
    if exhausted and len(taken) < limit:
        taken += itertools.islice(others(seen), limit - len(taken))
    return taken


@_times_in_utc
class MemoryStore(
    MemoryOperatorMixin,
    MemoryShapingMixin,
    MemorySuppressionsMixin,
    MemoryEventsMixin,
    MemoryTLSMixin,
):
    """A :class:`~mailstrom.stores.base.Store` kept in process memory.

    Its sections live beside it (``memory_*.py``), mixed in over the state it keeps here:
    operator tools, traffic shaping, the suppression list, the event outbox, TLS.

    >>> store = MemoryStore()
    >>> mid = store.enqueue(message, now=datetime.now(UTC))  # doctest: +SKIP
    """

    in_process = True
    """Calls never wait: the worker makes them on its event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._messages: dict[str, _Message] = {}
        self._by_header: dict[str, dict[str, _Message]] = {}
        """Message-ID header -> the messages carrying it (by id): what a bounce report is
        matched by, found without walking the store."""
        self._due = DueIndex(self._messages)
        self._seq = itertools.count()
        self._order: list[OrderKey] = []
        """The messages' places in the order of the lists (created time, then queue
        order, then id), and those of messages deleted since the list was last made
        again (not in ``_messages``): a page of a listing is found in it by bisection,
        not by copying and sorting every message for each page. Keys, not the messages:
        a deleted message kept here kept its body (1,500 purged of 1 MB freed nothing)."""
        self._deleted_in_order = 0
        self._last_seq = -1
        """The queue order of the last message queued: a walk sees none queued after it
        began."""
        self._watchers = Watchers()
        self._cancel_watchers = Watchers()
        self._events_on = False
        self._events: dict[int, _Event] = {}
        self._unsent: dict[int, _Event] = {}
        self._event_order: list[int] = []
        # Numbered on from the clock (microseconds since 1970), not from 1: a process started
        # again starts a new memory store, and its events went to the same hook endpoint
        # with ids it already had, which a receiver that de-duplicates on the id (as the
        # guide says to) dropped. Fewer than a million events a second of uptime keep the
        # next run's ids above this one's; JSON readers take them exactly (below 2**53)
        # until the year 2255.
        self._event_ids = itertools.count(time.time_ns() // 1000)
        self._suspended: dict[str, Suspension] = {}
        self._throttles: dict[str, DestinationThrottle] = {}
        self._pause_ends: list[tuple[datetime, str]] = []
        self._buckets: dict[str, BucketState] = {}
        self._init_tls()
        self._tls_broken: dict[str, datetime] = {}
        self._keys: dict[str, tuple[str, datetime]] = {}
        """Idempotency key -> (message id, until when it holds)."""
        self._suppressions: dict[str, Suppression] = {}
        self._suppression_order: list[str] | None = None
        self._expiries: Ends[Suppression] = Ends(attrgetter("expires_at"), slack=1024)
        self._verp_key = secrets.token_bytes(VERP_KEY_SIZE)
        self._owed: dict[str, None] = {}
        """Ids of the messages with a recipient marked "notice owed" (or marked since
        their marks were last found cleared), each once in :attr:`_owed_order`."""
        self._owed_order: list[tuple[int, str]] = []
        """(queue order, id) of each message of :attr:`_owed`, a heap."""

    # --- writing ----------------------------------------------------------------------

    def enqueue(self, message: PreparedMessage, *, now: datetime, hold: bool = False) -> str:
        """Store ``message`` and return its new id (see :class:`Store`)."""
        (mid,) = self._add([message], now=now, hold=hold)
        return mid

    def enqueue_many(self, messages: Sequence[PreparedMessage], *, now: datetime) -> list[str]:
        """Store several messages at once; ids in the same order."""
        return self._add(messages, now=now, hold=False)

    def _add(self, messages: Sequence[PreparedMessage], *, now: datetime, hold: bool) -> list[str]:
        check_storable(messages, now=now)
        ids = []
        with self._lock:
            if self._closed:
                # As a closed durable store refuses it: a facade that closed its queue
                # in memory starts no worker again, and mail queued now would get an id
                # and never go. What is in it can still be read.
                raise StoreError("the store is closed: nothing more can be queued in it")
            for prepared in messages:
                mid = new_message_id()
                attrs = prepared.attributes
                if attrs.metadata:
                    # A copy of its own, as the durable stores write theirs: the caller's
                    # dict, changed after this, changed the queued message's metadata.
                    attrs = replace(attrs, metadata=dict(attrs.metadata))
                    prepared = replace(prepared, attributes=attrs)
                if attrs.send_at or attrs.expires_at or attrs.idempotency_until:
                    # In UTC, as the durable stores keep and show them (checked aware
                    # by check_storable): one in its own zone was shown in that zone.
                    attrs = replace(
                        attrs,
                        send_at=_utc(attrs.send_at),
                        expires_at=_utc(attrs.expires_at),
                        idempotency_until=_utc(attrs.idempotency_until),
                    )
                    prepared = replace(prepared, attributes=attrs)
                key = attrs.idempotency_key
                if key is not None:
                    held_by = self._keys.get(key)
                    if held_by is not None and held_by[1] > now and held_by[0] in self._messages:
                        ids.append(held_by[0])
                        continue
                    self._keys[key] = (mid, attrs.idempotency_until or now)
                due = now if attrs.send_at is None else max(now, attrs.send_at)
                recipients = {
                    address: _Recipient(
                        address=address,
                        domain=domain_of(address),
                        position=i,
                        next_attempt_at=due,
                    )
                    for i, address in enumerate(prepared.recipients)
                }
                m = self._messages[mid] = _Message(
                    id=mid,
                    seq=next(self._seq),
                    prepared=prepared,
                    created_at=now,
                    held=hold,
                    recipients=recipients,
                    dkim=bounded_dkim(prepared.dkim_status),
                )
                # At the end unless the clock went back: a bisection and an append.
                insort(self._order, order_key(m), key=created_place)
                self._last_seq = m.seq
                if prepared.header_message_id is not None:
                    self._by_header.setdefault(prepared.header_message_id, {})[mid] = m
                self._due.push_message(m)
                ids.append(mid)
        if ids and not hold:
            self._watchers.notify()
        return ids

    @writes
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
        """Lease up to ``limit`` due recipients, grouped per (message, domain); with
        ``lanes``, each lane's in turn; up to ``max_bytes`` of message data; fair with
        ``busy`` and ``per_destination`` (see :meth:`Store.lease`)."""
        if row_limit(limit) == 0:
            return None
        token = lease_token(holder)
        expires_at = after(now, lease_for)
        with self._lock:
            # Read off the due index, lane by lane, earliest first: what a whole sort of
            # the due recipients would take, reading only as far as the lease takes.
            fair = fairness({}, busy, per_destination, limit)
            reading = self._due.read(now, self._suspended_domains(now), fair)

            def others(named: set[str]) -> Iterator[Entry]:
                return heapq.merge(*(reading.due(n) for n in self._due.lanes() if n not in named))

            due: list[Entry] = []
            try:
                if lanes is None:
                    chosen = list(itertools.islice(others(set()), limit))
                else:
                    chosen = _by_lanes(lanes, limit, reading.due, others)
                max_bytes = byte_budget(max_bytes)
                if max_bytes is not None:
                    sizes = {t[4].id: t[4].prepared.size for t in chosen}
                    kept = set(messages_within(sizes.items(), max_bytes))
                    chosen = [t for t in chosen if t[4].id in kept]
                due = chosen
            finally:
                # What was read and is not leased goes back, also when the lease failed
                # (a caller's wrong argument): off the index, it was never leased again.
                reading.give_back(due)
            groups: dict[tuple[str, str], list[_Recipient]] = {}
            owners: dict[tuple[str, str], _Message] = {}
            for *_, m, r in due:
                r.lease_token = token
                r.lease_expires_at = expires_at
                self._due.push(m, r)
                groups.setdefault((m.id, r.domain), []).append(r)
                owners[(m.id, r.domain)] = m
            items = []
            for key, recipients in groups.items():
                m = owners[key]
                recipients.sort(key=lambda r: r.position)
                items.append(
                    WorkItem(
                        message_id=m.id,
                        lease_token=token,
                        domain=key[1],
                        envelope_from=m.prepared.envelope_from,
                        recipients=tuple(
                            LeasedRecipient(
                                address=r.address,
                                attempts=r.attempts,
                                first_attempt_at=r.first_attempt_at,
                                created_at=_first_due(m),
                                last_attempt_at=r.last_attempt_at,
                            )
                            for r in recipients
                        ),
                        data=m.prepared.data,
                        smtputf8=m.prepared.smtputf8,
                        eightbit=m.prepared.eightbit,
                        require_tls=m.prepared.require_tls,
                        expires_at=m.prepared.attributes.expires_at,
                        priority=m.prepared.attributes.priority or "",
                        dsn=m.prepared.dsn,
                        queued_at=m.created_at,
                    )
                )
            if not items:
                return None
            # Under the same lock as the lease: the worker needs no lookup of its own.
            targets = lookup_targets(r.address for item in items for r in item.recipients)
            found = {
                t: e
                for t in targets
                if (e := self._suppressions.get(t)) is not None and e.active(now)
            }
        return Lease(token=token, expires_at=expires_at, items=tuple(items), suppressions=found)

    @writes
    def record(self, results: Sequence[RecipientResult]) -> list[RecipientResult]:
        """Record results; those whose recipient its lease no longer holds are ignored."""
        recorded = []
        # Every time checked before anything changes: one naive result records nothing.
        timed = [
            (result, *utc_attempt(result.attempt, result.next_attempt_at)) for result in results
        ]
        with self._lock:
            for result, attempt, next_at in timed:
                m = self._messages.get(result.message_id)
                r = m.recipients.get(result.address) if m is not None else None
                if r is None or not (
                    r.lease_token == result.lease_token or accepted_after_cancel(r, result)
                ):
                    continue
                if result.attempted:  # not this host's own shortage: see RecipientResult
                    r.attempts += 1
                if r.first_attempt_at is None:
                    r.first_attempt_at = attempt.at
                pending = result.state in _PENDING
                was = r.state
                r.take(
                    attempt,
                    result.state,
                    next_attempt_at=(next_at or attempt.at) if pending else None,
                    uncertain=attempt.uncertain,
                    attempted=result.attempted,
                )
                if m is not None:
                    m.moved(was, r.state)
                if pending and m is not None:
                    self._due.push(m, r)
                if result.notice is not None or not pending:
                    # One still on its way keeps a mark its result does not replace (a
                    # delay warning not queued yet: its message was not done).
                    r.notice = result.notice
                if result.dkim is not None and m is not None:
                    m.dkim = bounded_dkim(result.dkim)  # signed anew as it went
                if result.notice is not None and m is not None and m.id not in self._owed:
                    self._owed[m.id] = None
                    heapq.heappush(self._owed_order, (m.seq, m.id))
                recorded.append(result)
                if self._events_on and m is not None:
                    reason = getattr(attempt, "reason_class", None)
                    reason = reason or getattr(result, "reason_class", None)
                    self._append_event(m, r, attempt.at, reason)
        return recorded

    def owed_notices(
        self, *, message_ids: Sequence[str] | None = None, limit: int = MAX_OWED_MESSAGES
    ) -> list[OwedNotice]:
        """The marked recipients of messages done for this pass (see :class:`Store`)."""
        limit = row_limit(limit)  # a negative one is 0, as everywhere
        owed: list[OwedNotice] = []
        with self._lock:
            if message_ids is None:
                return self._all_owed(limit)
            found = 0
            # In queue order, as the durable stores hand them out.
            for mid in sorted(dict.fromkeys(message_ids), key=self._queue_order):
                if found >= limit:
                    break
                m = self._messages.get(mid)
                marks = None if m is None else self._marks_due(m)
                if marks:
                    found += 1
                    owed += marks
        return owed

    def _all_owed(self, limit: int) -> list[OwedNotice]:
        """:meth:`owed_notices` of every marked message (call under the lock): read off
        the heap of marked messages in queue order, as far as it takes ``limit``
        messages done for this pass. Sorted whole at each call, 20,000 messages owing a
        notice cost 20,000 lookups a call, and the worker, which asks again at once
        while it gets a full batch, made 2 million to queue them all."""
        owed: list[OwedNotice] = []
        waiting: list[tuple[int, str]] = []
        heap = self._owed_order
        found = 0
        while heap and found < limit:
            seq, mid = heapq.heappop(heap)
            m = self._messages.get(mid)
            marks = None if m is None or m.seq != seq else self._marks_due(m)
            if marks is None:
                del self._owed[mid]  # purged, or its marks cleared
                continue
            waiting.append((seq, mid))  # marked until queue_notices clears it
            if marks:
                found += 1
                owed += marks
        for item in waiting:
            heapq.heappush(heap, item)
        return owed

    def _marks_due(self, m: _Message) -> list[OwedNotice] | None:
        """The marks of ``m`` if it is done for this pass; [] while it is not, None when
        it has none (call under the lock)."""
        marked = [r for r in m.recipients.values() if r.notice]
        if not marked:
            return None
        if any(
            # One of a suspended domain waits for its first attempt as long as the
            # operator likes: it holds no notice of the others back.
            (r.state is RecipientState.QUEUED and r.domain not in self._suspended)
            or r.lease_token is not None
            for r in m.recipients.values()
            if r.state in _PENDING
        ):
            return []
        return [
            OwedNotice(message_id=m.id, address=r.address, notice=r.notice)
            for r in marked
            if r.notice is not None
        ]

    def _queue_order(self, message_id: str) -> int:
        m = self._messages.get(message_id)
        return -1 if m is None else m.seq

    @writes
    def queue_notices(
        self,
        owed: Sequence[OwedNotice],
        notices: Mapping[str, Sequence[PreparedMessage]],
        *,
        now: datetime,
    ) -> list[str]:
        """Clear the marks of ``owed`` and queue the notices of the messages whose marks
        were all still there as read (see :class:`Store`)."""
        check_storable([n for listed in notices.values() for n in listed], now=now)
        with self._lock:
            gone: set[str] = set()
            marked: list[tuple[str, _Recipient]] = []
            for entry in owed:
                m = self._messages.get(entry.message_id)
                r = m.recipients.get(entry.address) if m is not None else None
                if r is None or r.notice != entry.notice:
                    gone.add(entry.message_id)
                else:
                    marked.append((entry.message_id, r))
            for mid, r in marked:
                if mid not in gone:  # a message's marks are cleared all, or none
                    r.notice = None
        wanted = [n for mid, listed in notices.items() if mid not in gone for n in listed]
        return self._add(wanted, now=now, hold=False) if wanted else []

    def _still_held(self, lease: Lease) -> list[tuple[_Message, _Recipient]]:
        """The lease's recipients not yet recorded nor taken over, each with its message
        (call under the lock)."""
        held = []
        for item in lease.items:
            m = self._messages.get(item.message_id)
            if m is None:
                continue
            for leased in item.recipients:
                r = m.recipients.get(leased.address)
                if r is not None and r.lease_token == lease.token:
                    held.append((m, r))
        return held

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
        """Record, then lease (each under the store's lock; nothing to commit)."""
        return record_then_lease(
            self,
            results,
            now=now,
            limit=limit,
            lease_for=lease_for,
            lanes=lanes,
            holder=holder,
            max_bytes=max_bytes,
            busy=busy,
            per_destination=per_destination,
        )

    @writes
    def extend(self, lease: Lease, *, until: datetime) -> int:
        """Move the expiry of the lease's unrecorded recipients to ``until``; how many,
        those of held messages and suspended destinations left out (see
        :meth:`Store.extend`)."""
        until = kept_time(until, "until")
        with self._lock:
            held = self._still_held(lease)
            for m, r in held:
                r.lease_expires_at = until
                self._due.push(m, r)
            return sum(not m.held and r.domain not in self._suspended for m, r in held)

    @writes
    def release(self, lease: Lease) -> None:
        """Give back the unrecorded recipients of ``lease``, due at once."""
        with self._lock:
            held = self._still_held(lease)
            for m, r in held:
                r.lease_token = r.lease_expires_at = None
                self._due.push(m, r)
        if held:
            self._watchers.notify()

    @writes
    def release_holder(self, holder: str) -> int:
        """Give back every recipient leased under a token of ``holder``, due at once."""
        low, high = holder_range(holder)
        released = 0

        def visit(batch: list[_Message]) -> bool:
            nonlocal released
            for m in batch:
                for r in m.recipients.values():
                    token = r.lease_token
                    if r.state in _PENDING and token is not None and low <= token < high:
                        r.lease_token = r.lease_expires_at = None
                        self._due.push(m, r)
                        released += 1
            return False

        try:
            self._walk(visit, newest=None)  # a batch per hold of the lock
        finally:
            if released:
                self._watchers.notify()
        return released

    @writes
    def retry(self, message_id: str, *, now: datetime) -> int:
        """Make the message's pending recipients due at ``now``; returns how many."""
        with self._lock:
            m = self._get(message_id)
            changed = 0
            for r in m.recipients.values():
                if r.state in _PENDING:
                    r.next_attempt_at = now
                    self._due.push(m, r)
                    changed += 1
        if changed:
            self._watchers.notify()
        return changed

    @writes
    def retry_deferred(self, *, now: datetime) -> int:
        """Make every DEFERRED recipient due at ``now``; returns how many."""
        changed = 0

        def visit(batch: list[_Message]) -> bool:
            nonlocal changed
            for m in batch:
                for r in m.recipients.values():
                    if r.state is RecipientState.DEFERRED:
                        r.next_attempt_at = now
                        self._due.push(m, r)
                        changed += 1
            return False

        try:
            self._walk(visit, newest=None)  # a batch per hold of the lock
        finally:
            if changed:
                self._watchers.notify()
        return changed

    @writes
    def cancel(self, message_id: str, *, now: datetime) -> int:
        """Fail the message's pending recipients (leased ones too) as "cancelled"."""
        with self._lock:
            changed, leased = self._cancel(self._get(message_id), now)
        if leased:
            self._cancel_watchers.notify()
        return changed

    def _cancel(self, m: _Message, now: datetime) -> tuple[int, bool]:
        """Fail ``m``'s pending recipients as "cancelled" (call under the lock); how
        many, and whether one of them was leased. With events on, each gets its event:
        the end of a recipient a listener follows."""
        changed, leased = 0, False
        for r in m.recipients.values():
            if r.state in _PENDING:
                leased = leased or r.lease_token is not None
                m.moved(r.state, RecipientState.FAILED)
                r.state = RecipientState.FAILED
                r.error = "cancelled"
                # The reason must read "cancelled"; the history keeps earlier replies.
                r.reply = None
                r.uncertain = False
                r.reason_class = None
                r.next_attempt_at = None
                r.finished_at = now
                r.lease_token = r.lease_expires_at = None
                # The operator stopped it: no delay warning owed for it is sent.
                r.notice = None
                changed += 1
                if self._events_on:
                    self._append_event(m, r, now, None)
        return changed, leased

    @writes
    def set_held(self, message_id: str, held: bool) -> None:
        """Hold (never leased) or release a message; a worker that leased it is told."""
        with self._lock:
            m = self._get(message_id)
            changed = m.hold(held)
            leased = held and m.leased()
            if changed and not held:
                self._due.push_message(m)
        if changed and not held:  # mail waited for this release (not one that finished)
            self._watchers.notify()
        if leased:
            self._cancel_watchers.notify()

    @writes
    def purge(self, *, finished_before: datetime) -> int:
        """Delete messages whose recipients all became final before ``finished_before``."""
        return self._purge_finished(finished_before, None)

    # --- reading ----------------------------------------------------------------------

    def status(self, message_id: str) -> MessageStatus:
        """The message's status with every recipient's history."""
        with self._lock:
            m = self._get(message_id)
            return with_throttles(m.snapshot(with_history=True), self._paused_in(m))

    def next_due(self, *, now: datetime) -> datetime | None:
        """When the earliest pending, unheld recipient becomes due, or None."""
        with self._lock:
            due = self._due.earliest(self._suspended_domains(now))
            return earliest(due, self._suspension_end(now))

    # --- misc -------------------------------------------------------------------------

    # --- remembered broken TLS ----------------------------------------------------------

    @writes
    def note_tls_broken(self, host: str, *, until: datetime, reason: str, now: datetime) -> None:
        """Remember ``host``'s broken TLS until ``until`` (the later of two is kept)."""
        check_tls_host(host)
        until = kept_time(until, "until")
        with self._lock:
            known = self._tls_broken.get(host)
            self._tls_broken[host] = until if known is None else max(known, until)

    def tls_broken(self, *, now: datetime, limit: int = MAX_TLS_BROKEN) -> dict[str, datetime]:
        """Hosts whose TLS is remembered broken at ``now``; expired entries are dropped."""
        with self._lock:
            for host in [h for h, until in self._tls_broken.items() if until <= now]:
                del self._tls_broken[host]
            longest = sorted(self._tls_broken.items(), key=lambda e: e[1], reverse=True)
        # A negative limit is none, as in every store (a slice's -1 dropped the last).
        return dict(longest[: row_limit(limit)])

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when mail is enqueued or retried through this object."""
        return self._watchers.add(callback)

    def watch_cancels(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when leased recipients are cancelled through this object."""
        return self._cancel_watchers.add(callback)

    def close(self) -> None:
        """Refuse new mail and every other write from now on (StoreError, as a closed
        durable store raises; idempotent: :func:`~mailstrom.stores.memory_records.writes`).
        What it holds can still be read: there is nothing to release."""
        with self._lock:
            self._closed = True

    def _delete(self, message_ids: Sequence[str]) -> None:
        """Delete these messages, and the idempotency keys that name them, as the durable
        stores' foreign keys do (call under the lock): a key left behind was kept for
        good, one per keyed message ever purged."""
        gone = [self._messages.pop(mid) for mid in message_ids]
        # After they are out of _messages: the index tells its entries of them by that.
        self._due.drop(gone)
        for m in gone:
            mid, prepared = m.id, m.prepared
            header = prepared.header_message_id
            if header is not None and (same := self._by_header.get(header)) is not None:
                same.pop(mid, None)
                if not same:
                    del self._by_header[header]
            key = prepared.attributes.idempotency_key
            if key is not None and self._keys.get(key, ("",))[0] == mid:
                del self._keys[key]
        self._deleted_in_order += len(message_ids)
        if self._deleted_in_order > len(self._messages) + WALK_BATCH:
            # Made again once more were deleted than are left: a walk steps over fewer
            # deleted messages than it lists, and the work is paid by the deletions.
            live = self._messages
            self._order = [k for k in self._order if is_live(live, k)]
            self._deleted_in_order = 0

    def _get(self, message_id: str) -> _Message:
        try:
            return self._messages[message_id]
        except (KeyError, TypeError):  # TypeError: unhashable, so no id (a list)
            raise UnknownMessage(message_id) from None


def _utc(when: datetime | None) -> datetime | None:
    return None if when is None else when.astimezone(UTC)


def _first_due(m: _Message) -> datetime:
    """When ``m`` could first go: queued, or its ``send_at`` when later (the retry policy's
    max_age and the delay warning count from there, as a lease says)."""
    send_at = m.prepared.attributes.send_at
    return m.created_at if send_at is None or send_at <= m.created_at else send_at

"""An in-memory store: dictionaries behind one lock, for tests and throwaway use.

Nothing survives the process. The semantics are exactly those of the durable stores (the
contract suite in ``tests/contract`` runs unchanged against it), so code tested against a
``MemoryStore`` behaves the same on SQLite or PostgreSQL.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from mailstrom.errors import UnknownMessage
from mailstrom.message.prepared import PreparedMessage
from mailstrom.policy.throttle import (
    BucketState,
    TokenBucket,
    TokenGrant,
    next_pause,
    take_tokens,
)
from mailstrom.status import (
    Attempt,
    DeliveryEvent,
    DestinationThrottle,
    DKIMStatus,
    MessageStatus,
    QueueStats,
    ReasonClass,
    RecipientState,
    RecipientStatus,
    SMTPReply,
    derive_message_state,
)
from mailstrom.stores.base import (
    MAX_HISTORY,
    MAX_TLS_BROKEN,
    EventBatch,
    Lease,
    LeasedRecipient,
    QueueFilter,
    RecipientResult,
    WorkItem,
    bounded_attempt,
    domain_of,
    new_message_id,
    record_then_lease,
    with_throttles,
)
from mailstrom.stores.dkim_column import bounded_dkim
from mailstrom.stores.memory_tls import MemoryTLSMixin
from mailstrom.stores.operator import (
    ShapeRow,
    Suspension,
    bucket_of,
    earliest,
    normalize_prefix,
    pick_one,
    shape_rows,
)
from mailstrom.stores.watchers import Watchers
from mailstrom.suppression import Suppression, lookup_targets

_PENDING = (RecipientState.QUEUED, RecipientState.DEFERRED)


@dataclass(slots=True, kw_only=True)
class _Recipient:
    # Mutable on purpose: private bookkeeping, only ever touched under the store's lock.
    address: str
    domain: str
    position: int
    state: RecipientState = RecipientState.QUEUED
    attempts: int = 0
    first_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None
    finished_at: datetime | None = None
    lease_token: str | None = None
    lease_expires_at: datetime | None = None
    reply: SMTPReply | None = None
    error: str | None = None
    mx_host: str | None = None
    ip: str | None = None
    tls: bool = False
    uncertain: bool = False
    reason_class: ReasonClass | None = None
    history: list[Attempt] = field(default_factory=list)
    throttled_by: str | None = None

    def due_at(self) -> datetime:
        """When a pending recipient may next be leased: its next attempt, or its lease's
        expiry if that is later."""
        assert self.next_attempt_at is not None
        if self.lease_expires_at is not None and self.lease_expires_at > self.next_attempt_at:
            return self.lease_expires_at
        return self.next_attempt_at

    def snapshot(self, *, with_history: bool) -> RecipientStatus:
        return RecipientStatus(
            address=self.address,
            state=self.state,
            attempts=self.attempts,
            reply=self.reply,
            error=self.error,
            mx_host=self.mx_host,
            ip=self.ip,
            tls=self.tls,
            uncertain=self.uncertain,
            reason_class=self.reason_class,
            first_attempt_at=self.first_attempt_at,
            last_attempt_at=self.last_attempt_at,
            next_attempt_at=self.next_attempt_at,
            history=tuple(self.history) if with_history else (),
        )


@dataclass(slots=True, kw_only=True)
class _Event:
    # Mutable on purpose: delivery bookkeeping, only ever touched under the store's lock.
    event: DeliveryEvent
    sent_at: datetime | None = None
    lease_token: str | None = None
    lease_expires_at: datetime | None = None


@dataclass(slots=True, kw_only=True)
class _Message:
    id: str
    seq: int
    prepared: PreparedMessage
    created_at: datetime
    held: bool
    recipients: dict[str, _Recipient]
    dkim: DKIMStatus | None = None

    def state(self) -> RecipientState:
        return derive_message_state([r.state for r in self.recipients.values()])

    def snapshot(self, *, with_history: bool) -> MessageStatus:
        return MessageStatus(
            id=self.id,
            state=self.state(),
            envelope_from=self.prepared.envelope_from,
            created_at=self.created_at,
            size=self.prepared.size,
            recipients=tuple(
                r.snapshot(with_history=with_history) for r in self.recipients.values()
            ),
            header_message_id=self.prepared.header_message_id,
            subject=self.prepared.subject,
            held=self.held,
            dkim=self.dkim,
            tags=self.prepared.attributes.tags,
            metadata=dict(self.prepared.attributes.metadata),
            priority=self.prepared.attributes.priority,
            send_at=self.prepared.attributes.send_at,
            expires_at=self.prepared.attributes.expires_at,
            idempotency_key=self.prepared.attributes.idempotency_key,
        )


_Due = tuple[datetime, int, int, "_Message", _Recipient]


def _by_lanes(due: list[_Due], lanes: Sequence[tuple[str, int]], limit: int) -> list[_Due]:
    """The due recipients (earliest first) a lease with ``lanes`` takes: each named lane's
    earliest, up to its number, highest lane first; then, when every lane had room left
    and nothing more due, those of lanes not named."""
    per_lane: dict[str, list[_Due]] = {}
    for entry in due:
        per_lane.setdefault(entry[3].prepared.attributes.priority or "", []).append(entry)
    taken: list[_Due] = []
    exhausted = True
    for lane, most in lanes:
        take = min(most, limit - len(taken))
        if take <= 0:
            exhausted = False
            continue
        found = per_lane.pop(lane, [])
        exhausted = exhausted and len(found) < take
        taken += found[:take]
    if exhausted and len(taken) < limit:
        rest = sorted((e for entries in per_lane.values() for e in entries), key=lambda t: t[:3])
        taken += rest[: limit - len(taken)]
    return taken


class MemoryStore(MemoryTLSMixin):
    """A :class:`~mailstrom.stores.base.Store` kept in process memory.

    >>> store = MemoryStore()
    >>> mid = store.enqueue(message, now=datetime.now(UTC))  # doctest: +SKIP
    """

    in_process = True
    """Calls never wait: the worker makes them on its event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: dict[str, _Message] = {}
        self._seq = itertools.count()
        self._watchers = Watchers()
        self._events_on = False
        self._events: dict[int, _Event] = {}
        self._event_ids = itertools.count(1)
        self._suspended: dict[str, Suspension] = {}
        self._throttles: dict[str, DestinationThrottle] = {}
        self._buckets: dict[str, BucketState] = {}
        self._init_tls()
        self._tls_broken: dict[str, datetime] = {}
        self._keys: dict[str, tuple[str, datetime]] = {}
        """Idempotency key -> (message id, until when it holds)."""
        self._suppressions: dict[str, Suppression] = {}

    # --- writing ----------------------------------------------------------------------

    def enqueue(self, message: PreparedMessage, *, now: datetime, hold: bool = False) -> str:
        """Store ``message`` and return its new id (see :class:`Store`)."""
        (mid,) = self._add([message], now=now, hold=hold)
        return mid

    def enqueue_many(self, messages: Sequence[PreparedMessage], *, now: datetime) -> list[str]:
        """Store several messages at once; ids in the same order."""
        return self._add(messages, now=now, hold=False)

    def _add(self, messages: Sequence[PreparedMessage], *, now: datetime, hold: bool) -> list[str]:
        ids = []
        with self._lock:
            for prepared in messages:
                mid = new_message_id()
                attrs = prepared.attributes
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
                self._messages[mid] = _Message(
                    id=mid,
                    seq=next(self._seq),
                    prepared=prepared,
                    created_at=now,
                    held=hold,
                    recipients=recipients,
                    dkim=bounded_dkim(prepared.dkim_status),
                )
                ids.append(mid)
        if ids and not hold:
            self._watchers.notify()
        return ids

    def lease(
        self,
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        lanes: Sequence[tuple[str, int]] | None = None,
    ) -> Lease | None:
        """Lease up to ``limit`` due recipients, grouped per (message, domain); with
        ``lanes``, each lane's in turn (see :meth:`Store.lease`)."""
        if limit <= 0:
            return None
        token = os.urandom(16).hex()
        expires_at = now + lease_for
        with self._lock:
            suspended = self._suspended_domains(now)
            due = [
                (r.due_at(), m.seq, r.position, m, r)
                for m in self._messages.values()
                if not m.held
                for r in m.recipients.values()
                if r.state in _PENDING and r.due_at() <= now and r.domain not in suspended
            ]
            due.sort(key=lambda t: t[:3])
            if lanes is not None:
                due = _by_lanes(due, lanes, limit)
            groups: dict[tuple[str, str], list[_Recipient]] = {}
            owners: dict[tuple[str, str], _Message] = {}
            for _, _, _, m, r in due[:limit]:
                r.lease_token = token
                r.lease_expires_at = expires_at
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
                                created_at=m.created_at,
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

    def record(self, results: Sequence[RecipientResult]) -> list[RecipientResult]:
        """Record results; those whose recipient its lease no longer holds are ignored."""
        recorded = []
        with self._lock:
            for result in results:
                m = self._messages.get(result.message_id)
                r = m.recipients.get(result.address) if m is not None else None
                if r is None or r.lease_token != result.lease_token:
                    continue
                attempt = bounded_attempt(result.attempt)
                r.state = result.state
                r.attempts += 1
                if r.first_attempt_at is None:
                    r.first_attempt_at = attempt.at
                r.last_attempt_at = attempt.at
                if result.state in _PENDING:
                    r.next_attempt_at = result.next_attempt_at or attempt.at
                    r.finished_at = None
                else:
                    r.next_attempt_at = None
                    r.finished_at = attempt.at
                r.lease_token = r.lease_expires_at = None
                r.reply = attempt.reply
                r.error = attempt.error
                r.mx_host = attempt.mx_host
                r.ip = attempt.ip
                r.tls = attempt.tls
                r.uncertain = attempt.uncertain
                r.reason_class = attempt.reason_class
                r.history.append(attempt)
                del r.history[:-MAX_HISTORY]
                recorded.append(result)
                if self._events_on and m is not None:
                    reason = getattr(attempt, "reason_class", None)
                    reason = reason or getattr(result, "reason_class", None)
                    self._append_event(m, r, attempt, reason)
        return recorded

    def _append_event(
        self, m: _Message, r: _Recipient, attempt: Attempt, reason_class: str | None
    ) -> None:
        """The outbox entry of a result just recorded (under the lock)."""
        event_id = next(self._event_ids)
        self._events[event_id] = _Event(
            event=DeliveryEvent(
                id=event_id,
                at=attempt.at,
                message_id=m.id,
                address=r.address,
                state=r.state,
                attempt=r.attempts,
                reply=r.reply,
                error=r.error,
                reason_class=reason_class,
                mx_host=r.mx_host,
                ip=r.ip,
                tls=r.tls,
                uncertain=r.uncertain,
                next_attempt_at=r.next_attempt_at,
                tags=m.prepared.attributes.tags,
                metadata=dict(m.prepared.attributes.metadata),
            )
        )

    # --- the event outbox -------------------------------------------------------------

    def enable_events(self) -> None:
        """Record results into the outbox too, from now on."""
        self._events_on = True

    def lease_events(self, *, now: datetime, limit: int, lease_for: timedelta) -> EventBatch | None:
        """Lease up to ``limit`` unacknowledged, unleased events, oldest first."""
        if limit <= 0:
            return None
        token = os.urandom(16).hex()
        expires_at = now + lease_for
        taken: list[DeliveryEvent] = []
        with self._lock:
            for e in self._events.values():  # insertion order is id order
                if len(taken) >= limit:
                    break
                if e.sent_at is None and (e.lease_expires_at is None or e.lease_expires_at <= now):
                    e.lease_token, e.lease_expires_at = token, expires_at
                    taken.append(e.event)
        if not taken:
            return None
        return EventBatch(token=token, expires_at=expires_at, events=tuple(taken))

    def ack_events(self, batch: EventBatch, *, now: datetime) -> int:
        """Mark the batch's events sent (those it still holds)."""
        acked = 0
        with self._lock:
            for event in batch.events:
                e = self._events.get(event.id)
                if e is not None and e.lease_token == batch.token:
                    e.sent_at, e.lease_token, e.lease_expires_at = now, None, None
                    acked += 1
        return acked

    def release_events(self, batch: EventBatch) -> None:
        """Give the batch's unacknowledged events back at once."""
        with self._lock:
            for event in batch.events:
                e = self._events.get(event.id)
                if e is not None and e.lease_token == batch.token:
                    e.lease_token = e.lease_expires_at = None

    def read_events(self, *, after: int = 0, limit: int = 100) -> list[DeliveryEvent]:
        """Events with an id above ``after``, oldest first."""
        with self._lock:
            found = [e.event for i, e in self._events.items() if i > after]
        return found[: max(limit, 0)]

    def last_event_id(self) -> int:
        """The highest event id so far (0 when none)."""
        with self._lock:
            return max(self._events, default=0)

    def prune_events(self, *, sent_before: datetime) -> int:
        """Delete events acknowledged before ``sent_before``."""
        with self._lock:
            doomed = [
                i
                for i, e in self._events.items()
                if e.sent_at is not None and e.sent_at < sent_before
            ]
            for i in doomed:
                del self._events[i]
        return len(doomed)

    def _still_held(self, lease: Lease) -> list[_Recipient]:
        """The lease's recipients not yet recorded nor taken over (call under the lock)."""
        held = []
        for item in lease.items:
            m = self._messages.get(item.message_id)
            if m is None:
                continue
            for leased in item.recipients:
                r = m.recipients.get(leased.address)
                if r is not None and r.lease_token == lease.token:
                    held.append(r)
        return held

    def record_and_lease(
        self,
        results: Sequence[RecipientResult],
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        lanes: Sequence[tuple[str, int]] | None = None,
    ) -> tuple[list[RecipientResult], Lease | None]:
        """Record, then lease (each under the store's lock; nothing to commit)."""
        return record_then_lease(
            self, results, now=now, limit=limit, lease_for=lease_for, lanes=lanes
        )

    def extend(self, lease: Lease, *, until: datetime) -> int:
        """Move the expiry of the lease's unrecorded recipients to ``until``."""
        with self._lock:
            held = self._still_held(lease)
            for r in held:
                r.lease_expires_at = until
        return len(held)

    def release(self, lease: Lease) -> None:
        """Give back the unrecorded recipients of ``lease``, due at once."""
        with self._lock:
            held = self._still_held(lease)
            for r in held:
                r.lease_token = r.lease_expires_at = None
        if held:
            self._watchers.notify()

    def retry(self, message_id: str, *, now: datetime) -> int:
        """Make the message's pending recipients due at ``now``; returns how many."""
        with self._lock:
            m = self._get(message_id)
            changed = 0
            for r in m.recipients.values():
                if r.state in _PENDING:
                    r.next_attempt_at = now
                    changed += 1
        if changed:
            self._watchers.notify()
        return changed

    def retry_deferred(self, *, now: datetime) -> int:
        """Make every DEFERRED recipient due at ``now``; returns how many."""
        changed = 0
        with self._lock:
            for m in self._messages.values():
                for r in m.recipients.values():
                    if r.state is RecipientState.DEFERRED:
                        r.next_attempt_at = now
                        changed += 1
        if changed:
            self._watchers.notify()
        return changed

    def cancel(self, message_id: str, *, now: datetime) -> int:
        """Fail the message's pending recipients (leased ones too) as "cancelled"."""
        with self._lock:
            m = self._get(message_id)
            changed = 0
            for r in m.recipients.values():
                if r.state in _PENDING:
                    r.state = RecipientState.FAILED
                    r.error = "cancelled"
                    # The reason must read "cancelled"; the history keeps earlier replies.
                    r.reply = None
                    r.uncertain = False
                    r.reason_class = None
                    r.next_attempt_at = None
                    r.finished_at = now
                    r.lease_token = r.lease_expires_at = None
                    changed += 1
        return changed

    def set_held(self, message_id: str, held: bool) -> None:
        """Hold (never leased) or release a message."""
        with self._lock:
            self._get(message_id).held = held
        if not held:
            self._watchers.notify()

    def purge(self, *, finished_before: datetime) -> int:
        """Delete messages whose recipients all became final before ``finished_before``."""
        with self._lock:
            doomed = [
                m.id
                for m in self._messages.values()
                if all(
                    r.finished_at is not None and r.finished_at < finished_before
                    for r in m.recipients.values()
                )
            ]
            for mid in doomed:
                del self._messages[mid]
        return len(doomed)

    # --- reading ----------------------------------------------------------------------

    def status(self, message_id: str) -> MessageStatus:
        """The message's status with every recipient's history."""
        with self._lock:
            m = self._get(message_id)
            return with_throttles(m.snapshot(with_history=True), self._paused_in(m))

    def query(self, *, now: datetime, where: QueueFilter | None = None) -> list[MessageStatus]:
        """Messages matching ``where``, newest first, without history."""
        where = where or QueueFilter()
        domain = where.domain.lower() if where.domain is not None else None
        cutoff = now - where.older_than if where.older_than is not None else None
        found: list[MessageStatus] = []
        with self._lock:
            for m in self._newest_first():
                if len(found) >= where.limit:
                    break
                if where.held is not None and m.held != where.held:
                    continue
                if cutoff is not None and not m.created_at < cutoff:
                    continue
                if domain is not None and all(r.domain != domain for r in m.recipients.values()):
                    continue
                if where.state is not None and m.state() is not where.state:
                    continue
                if where.tag is not None and where.tag not in m.prepared.attributes.tags:
                    continue
                if where.states is not None and m.state() not in where.states:
                    continue
                found.append(m.snapshot(with_history=False))
        return found

    def recent(self, limit: int = 20) -> list[MessageStatus]:
        """The ``limit`` most recently enqueued messages, newest first."""
        with self._lock:
            return [m.snapshot(with_history=False) for m in self._newest_first()[:limit]]

    def next_due(self, *, now: datetime) -> datetime | None:
        """When the earliest pending, unheld recipient becomes due, or None."""
        with self._lock:
            suspended = self._suspended_domains(now)
            due = min(
                (
                    r.due_at()
                    for m in self._messages.values()
                    if not m.held
                    for r in m.recipients.values()
                    if r.state in _PENDING and r.domain not in suspended
                ),
                default=None,
            )
            return earliest(due, self._suspension_end(now))

    def stats(self) -> QueueStats:
        """Counts of recipients by state and of pending recipients by domain."""
        by_state = dict.fromkeys(RecipientState, 0)
        by_domain: dict[str, int] = {}
        with self._lock:
            for m in self._messages.values():
                for r in m.recipients.values():
                    by_state[r.state] += 1
                    if r.state in _PENDING:
                        by_domain[r.domain] = by_domain.get(r.domain, 0) + 1
            return QueueStats(
                by_state=by_state,
                pending_by_domain=by_domain,
                messages=len(self._messages),
                held=sum(m.held for m in self._messages.values()),
            )

    # --- misc -------------------------------------------------------------------------

    # --- remembered broken TLS ----------------------------------------------------------

    def note_tls_broken(self, host: str, *, until: datetime, reason: str, now: datetime) -> None:
        """Remember ``host``'s broken TLS until ``until`` (the later of two is kept)."""
        with self._lock:
            known = self._tls_broken.get(host)
            self._tls_broken[host] = until if known is None else max(known, until)

    def tls_broken(self, *, now: datetime, limit: int = MAX_TLS_BROKEN) -> dict[str, datetime]:
        """Hosts whose TLS is remembered broken at ``now``; expired entries are dropped."""
        with self._lock:
            for host in [h for h, until in self._tls_broken.items() if until <= now]:
                del self._tls_broken[host]
            longest = sorted(self._tls_broken.items(), key=lambda e: e[1], reverse=True)
        return dict(longest[:limit])

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when mail is enqueued or retried through this object."""
        return self._watchers.add(callback)

    def close(self) -> None:
        """Nothing to release; kept for the protocol."""

    def _get(self, message_id: str) -> _Message:
        try:
            return self._messages[message_id]
        except KeyError:
            raise UnknownMessage(message_id) from None

    def _newest_first(self) -> list[_Message]:
        return sorted(self._messages.values(), key=lambda m: (m.created_at, m.seq), reverse=True)

    # --- operator tools (schema version 10) ---------------------------------------------

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
        return len(self.query(now=now, where=replace(where, limit=max(cap, 0))))

    def retry_many(self, message_ids: Sequence[str], *, now: datetime) -> int:
        """Make the listed messages' pending recipients due at ``now``."""
        changed = 0
        with self._lock:
            for r in self._recipients_of(message_ids):
                if r.state in _PENDING:
                    r.next_attempt_at = now
                    changed += 1
        if changed:
            self._watchers.notify()
        return changed

    def cancel_many(self, message_ids: Sequence[str], *, now: datetime) -> int:
        """Fail the listed messages' pending recipients as "cancelled"."""
        changed = 0
        for mid in dict.fromkeys(message_ids):
            try:
                changed += self.cancel(mid, now=now)
            except UnknownMessage:
                continue
        return changed

    def hold_many(self, message_ids: Sequence[str], held: bool) -> int:
        """Hold or release the listed messages; returns how many changed."""
        changed = 0
        with self._lock:
            for mid in dict.fromkeys(message_ids):
                m = self._messages.get(mid)
                if m is not None and m.held != held:
                    m.held = held
                    changed += 1
        if changed and not held:
            self._watchers.notify()
        return changed

    def purge_many(
        self, message_ids: Sequence[str], *, finished_before: datetime | None = None
    ) -> int:
        """Delete the listed messages that are final (finished before the cutoff)."""
        with self._lock:
            doomed = [
                mid
                for mid in dict.fromkeys(message_ids)
                if mid in self._messages
                and self._finished(self._messages[mid], finished_before, None)
            ]
            for mid in doomed:
                del self._messages[mid]
        return len(doomed)

    def purge_state(self, *, finished_before: datetime, state: RecipientState) -> int:
        """Delete finished messages in ``state`` finished before the cutoff."""
        with self._lock:
            doomed = [
                m.id for m in self._messages.values() if self._finished(m, finished_before, state)
            ]
            for mid in doomed:
                del self._messages[mid]
        return len(doomed)

    @staticmethod
    def _finished(m: _Message, before: datetime | None, state: RecipientState | None) -> bool:
        recipients = m.recipients.values()
        if any(r.finished_at is None for r in recipients):
            return False
        if before is not None and not all(
            r.finished_at is not None and r.finished_at < before for r in recipients
        ):
            return False
        return state is None or m.state() is state

    def shape(self, *, now: datetime, edges: Sequence[timedelta]) -> list[ShapeRow]:
        """Pending recipients per domain and message age, largest domain first."""
        counts: dict[tuple[str, int], int] = {}
        with self._lock:
            for m in self._messages.values():
                bucket = bucket_of(now - m.created_at, edges)
                for r in m.recipients.values():
                    if r.state in _PENDING:
                        key = (r.domain, bucket)
                        counts[key] = counts.get(key, 0) + 1
        return shape_rows(counts, len(edges) + 1)

    def message_data(self, message_id: str) -> bytes:
        """The message as stored."""
        with self._lock:
            return self._get(message_id).prepared.data

    def suspend(self, domain: str, *, now: datetime, until: datetime | None = None) -> None:
        """Stop delivery to ``domain`` until ``until`` or resume."""
        with self._lock:
            self._suspended[domain] = Suspension(domain=domain, suspended_at=now, until=until)

    def resume(self, domain: str) -> bool:
        """End the suspension of ``domain``."""
        with self._lock:
            found = self._suspended.pop(domain, None) is not None
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
        """Domains suspended at ``now`` (call under the lock)."""
        if not self._suspended:
            return frozenset()
        return frozenset(d for d, s in self._suspended.items() if s.active(now))

    def _suspension_end(self, now: datetime) -> datetime | None:
        """When the first timed suspension in force ends (call under the lock): work at
        that domain may become due then."""
        return earliest(*(s.until for s in self._suspended.values() if s.active(now)))

    def _recipients_of(self, message_ids: Sequence[str]) -> list[_Recipient]:
        """The recipients of the listed messages that exist (call under the lock)."""
        found: list[_Recipient] = []
        for mid in dict.fromkeys(message_ids):
            m = self._messages.get(mid)
            if m is not None:
                found.extend(m.recipients.values())
        return found

    # --- traffic shaping --------------------------------------------------------------

    def _paused_in(self, m: _Message) -> dict[str, DestinationThrottle]:
        """The message's postponed recipients whose pause still runs (under the lock)."""
        now = datetime.now(UTC)
        paused = {}
        for r in m.recipients.values():
            pause = self._throttles.get(r.throttled_by) if r.throttled_by else None
            if pause is not None and pause.until > now:
                paused[r.address] = pause
        return paused

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
        """Pause ``destination`` (see :class:`Store`)."""
        with self._lock:
            for message_id, address in recipients:
                m = self._messages.get(message_id)
                r = m.recipients.get(address) if m is not None else None
                if r is not None:
                    r.throttled_by = destination
            pause = next_pause(
                self._throttles.get(destination),
                destination=destination,
                now=now,
                first=first,
                maximum=maximum,
                reply=reply,
            )
            self._throttles[destination] = pause
            return pause

    def throttles(self, *, now: datetime) -> list[DestinationThrottle]:
        """The destinations paused at ``now``, soonest end first."""
        with self._lock:
            return sorted(
                (t for t in self._throttles.values() if t.until > now),
                key=lambda t: (t.until, t.destination),
            )

    def postpone(
        self, items: Sequence[WorkItem], *, until: datetime, destination: str | None = None
    ) -> int:
        """Give back the items' still-held recipients, due at ``until``, no attempt counted."""
        postponed = 0
        with self._lock:
            for item in items:
                m = self._messages.get(item.message_id)
                if m is None:
                    continue
                for leased in item.recipients:
                    r = m.recipients.get(leased.address)
                    if r is None or r.lease_token != item.lease_token:
                        continue
                    r.lease_token = r.lease_expires_at = None
                    r.next_attempt_at = until
                    r.throttled_by = destination
                    postponed += 1
        return postponed

    def take_tokens(
        self, buckets: Sequence[TokenBucket], *, want: int, now: datetime
    ) -> TokenGrant:
        """Take up to ``want`` tokens from every bucket at once."""
        with self._lock:
            grant, states = take_tokens(buckets, self._buckets, want=want, now=now)
            self._buckets.update(states)
        return grant

    # --- the suppression list -----------------------------------------------------------

    def suppress(self, entries: Sequence[Suppression]) -> int:
        """Add or replace entries; returns how many were written."""
        with self._lock:
            for entry in entries:
                self._suppressions[entry.target] = entry
        return len(entries)

    def unsuppress(self, targets: Sequence[str]) -> int:
        """Remove the entries of ``targets``; returns how many existed."""
        with self._lock:
            return sum(self._suppressions.pop(t, None) is not None for t in set(targets))

    def suppressions_for(self, targets: Sequence[str], *, now: datetime) -> dict[str, Suppression]:
        """The entries of ``targets`` that apply at ``now``."""
        with self._lock:
            found = {t: self._suppressions.get(t) for t in targets}
        return {t: e for t, e in found.items() if e is not None and e.active(now)}

    def list_suppressions(
        self, *, now: datetime | None = None, after: str = "", limit: int = 100
    ) -> list[Suppression]:
        """Entries after ``after`` in target order (only active ones with ``now``)."""
        with self._lock:
            entries = sorted(
                (e for t, e in self._suppressions.items() if t > after),
                key=lambda e: e.target,
            )
        if now is not None:
            entries = [e for e in entries if e.active(now)]
        return entries[: max(limit, 0)]

    def fail_late(self, message_id: str, address: str, attempt: Attempt) -> bool:
        """Mark a recipient FAILED after the fact (see Store.fail_late)."""
        attempt = bounded_attempt(attempt)
        with self._lock:
            m = self._get(message_id)
            r = m.recipients.get(address)
            if r is None or r.state is RecipientState.FAILED:
                return False
            r.state = RecipientState.FAILED
            r.last_attempt_at = attempt.at
            r.next_attempt_at = None
            r.finished_at = attempt.at
            r.lease_token = r.lease_expires_at = None
            r.reply = attempt.reply
            r.error = attempt.error
            r.mx_host = attempt.mx_host
            r.ip = attempt.ip
            r.tls = attempt.tls
            r.uncertain = False
            r.reason_class = attempt.reason_class
            r.history.append(attempt)
            del r.history[:-MAX_HISTORY]
            if self._events_on:
                self._append_event(m, r, attempt, attempt.reason_class)
        return True

    def message_ids_for_header(self, header_message_id: str, *, limit: int = 10) -> list[str]:
        """Ids of the messages with this Message-ID header, newest first."""
        with self._lock:
            return [
                m.id
                for m in self._newest_first()
                if m.prepared.header_message_id == header_message_id
            ][: max(limit, 0)]

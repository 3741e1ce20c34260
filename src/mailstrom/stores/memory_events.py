"""The memory store's event outbox: an entry per recorded result (once the worker turns
events on), leased, acknowledged and pruned like the durable stores' ``events`` table."""

from __future__ import annotations

import bisect
import itertools
import os
import threading
from dataclasses import replace
from datetime import datetime, timedelta

from mailstrom.arguments import row_after, row_limit
from mailstrom.status import DeliveryEvent
from mailstrom.stores.base import EventBatch
from mailstrom.stores.clock import after
from mailstrom.stores.memory_records import _Event, _Message, _Recipient, writes


class MemoryEventsMixin:
    """Kept in a dict under the store's lock; mixed into :class:`MemoryStore`."""

    _lock: threading.Lock
    _events_on: bool
    _events: dict[int, _Event]
    _unsent: dict[int, _Event]
    """The entries of :attr:`_events` not acknowledged yet, in id order: what a lease looks
    at. Walking ``_events`` instead went past every event sent in the last day (kept for
    ``mailstrom events`` until pruned), under the lock, in each lease and each idle poll:
    with a million kept, 75 ms of the loop every time, and a sender catching up after an
    outage leased a batch at a time."""
    _event_order: list[int]
    """The ids of :attr:`_events`, ascending: a read bisects it for its ``after``. Walking
    ``_events`` instead cost every event kept per page (paging through 2,000 events 10 at
    a time visited 406,000 entries)."""
    _event_ids: itertools.count[int]

    def _append_event(
        self, m: _Message, r: _Recipient, at: datetime, reason_class: str | None
    ) -> None:
        """The outbox entry of a result just recorded, or of a cancel (under the lock)."""
        event_id = next(self._event_ids)
        self._event_order.append(event_id)  # ids only grow: the list stays sorted
        self._events[event_id] = self._unsent[event_id] = _Event(
            event=DeliveryEvent(
                id=event_id,
                at=at,
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

    def enable_events(self) -> None:
        """Record results into the outbox too, from now on."""
        self._events_on = True

    @writes
    def lease_events(self, *, now: datetime, limit: int, lease_for: timedelta) -> EventBatch | None:
        """Lease up to ``limit`` unacknowledged, unleased events, oldest first."""
        if row_limit(limit) == 0:
            return None
        token = os.urandom(16).hex()
        expires_at = after(now, lease_for)
        taken: list[DeliveryEvent] = []
        with self._lock:
            for e in self._unsent.values():  # insertion order is id order
                if len(taken) >= limit:
                    break
                if e.sent_at is None and (e.lease_expires_at is None or e.lease_expires_at <= now):
                    e.lease_token, e.lease_expires_at = token, expires_at
                    taken.append(_copy(e.event))
        if not taken:
            return None
        return EventBatch(token=token, expires_at=expires_at, events=tuple(taken))

    @writes
    def ack_events(self, batch: EventBatch, *, now: datetime) -> int:
        """Mark the batch's events sent (those it still holds)."""
        acked = 0
        with self._lock:
            for event in batch.events:
                e = self._events.get(event.id)
                if e is not None and e.lease_token == batch.token:
                    e.sent_at, e.lease_token, e.lease_expires_at = now, None, None
                    self._unsent.pop(event.id, None)
                    acked += 1
        return acked

    @writes
    def release_events(self, batch: EventBatch) -> None:
        """Give the batch's unacknowledged events back at once."""
        with self._lock:
            for event in batch.events:
                e = self._events.get(event.id)
                if e is not None and e.lease_token == batch.token:
                    e.lease_token = e.lease_expires_at = None

    def read_events(self, *, after: int = 0, limit: int = 100) -> list[DeliveryEvent]:
        """Events with an id above ``after``, oldest first."""
        after = row_after(after)
        limit = row_limit(limit)
        with self._lock:
            start = bisect.bisect_right(self._event_order, after)
            found = [self._events[i].event for i in self._event_order[start : start + limit]]
        return [_copy(event) for event in found]

    def last_event_id(self) -> int:
        """The highest event id so far (0 when none)."""
        with self._lock:
            return self._event_order[-1] if self._event_order else 0

    def unsent_events(self) -> int:
        """How many events are not acknowledged yet."""
        with self._lock:
            return len(self._unsent)

    @writes
    def prune_events(self, *, sent_before: datetime, unsent_before: datetime | None = None) -> int:
        """Delete events acknowledged before ``sent_before`` (and, given ``unsent_before``,
        unacknowledged ones attempted before it)."""
        with self._lock:
            doomed = [
                i
                for i, e in self._events.items()
                if (e.sent_at is not None and e.sent_at < sent_before)
                or (e.sent_at is None and unsent_before is not None and e.event.at < unsent_before)
            ]
            for i in doomed:
                del self._events[i]
                self._unsent.pop(i, None)
            if doomed:
                self._event_order = list(self._events)  # insertion order is id order
        return len(doomed)


def _copy(event: DeliveryEvent) -> DeliveryEvent:
    """``event`` as a reader gets it: with a metadata dict of its own, as a durable store
    reads one from its row. The outbox's own was handed out, and a reader (a tail, a hook's
    batch) that changed it changed what every later read and lease gave."""
    return replace(event, metadata=dict(event.metadata))

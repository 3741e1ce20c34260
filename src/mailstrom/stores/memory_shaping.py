"""The memory store's traffic shaping: destination pauses (throttles), items given back
until a pause ends, and the token buckets of rate limits."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from mailstrom.policy.throttle import (
    BucketState,
    TokenBucket,
    TokenGrant,
    forget_before,
    next_pause,
    pause_runs,
    take_tokens,
)
from mailstrom.status import DestinationThrottle
from mailstrom.stores.base import (
    WorkItem,
    check_destination,
    check_pause_times,
    named_recipients,
    pause_reply,
)
from mailstrom.stores.clock import kept_time
from mailstrom.stores.memory_due import DueIndex
from mailstrom.stores.memory_records import _Message, writes

_FORGET_AFTER = timedelta(days=1)
"""As the durable stores: a pause over this long, and longer than the maximum, is deleted."""


class MemoryShapingMixin:
    """Kept in dicts under the store's lock; mixed into :class:`MemoryStore`."""

    _lock: threading.Lock
    _messages: dict[str, _Message]
    _throttles: dict[str, DestinationThrottle]
    _pause_ends: list[tuple[datetime, str]]
    """A heap of (end, destination) of each pause put in _throttles, the soonest first: a
    throttle forgets the ended pauses from its top instead of walking every pause kept
    (O(N^2) for N destinations). An entry whose pause was since replaced is stale."""
    _buckets: dict[str, BucketState]
    _due: DueIndex

    def _paused_in(self, m: _Message) -> dict[str, DestinationThrottle]:
        """The message's postponed recipients whose pause still runs (under the lock)."""
        now = datetime.now(UTC)
        paused = {}
        for r in m.recipients.values():
            pause = self._throttles.get(r.throttled_by) if r.throttled_by else None
            if pause is not None and pause_runs(pause, now):
                paused[r.address] = pause
        return paused

    @writes
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
        now = check_pause_times(destination, now, first, maximum)
        reply = pause_reply(reply)
        recipients = named_recipients(recipients)
        with self._lock:
            for message_id, address in recipients:
                m = self._messages.get(message_id)
                r = m.recipients.get(address) if m is not None else None
                if r is not None:
                    r.throttled_by = destination
            # Pauses over for longer than the maximum count no more: kept, one per
            # destination ever throttled, they were never let go.
            before = forget_before(now, maximum, _FORGET_AFTER)
            ends = self._pause_ends
            while ends and ends[0][0] < before:
                ended = heapq.heappop(ends)[1]
                kept = self._throttles.get(ended)
                if kept is not None and kept.until < before:
                    del self._throttles[ended]
            pause = next_pause(
                self._throttles.get(destination),
                destination=destination,
                now=now,
                first=first,
                maximum=maximum,
                reply=reply,
            )
            if self._throttles.get(destination) is not pause:
                self._throttles[destination] = pause
                heapq.heappush(ends, (pause.until, destination))
            return pause

    def throttles(self, *, now: datetime) -> list[DestinationThrottle]:
        """The destinations paused at ``now``, soonest end first."""
        with self._lock:
            return sorted(
                (t for t in self._throttles.values() if pause_runs(t, now)),
                key=lambda t: (t.until, t.destination),
            )

    @writes
    def postpone(
        self, items: Sequence[WorkItem], *, until: datetime, destination: str | None = None
    ) -> int:
        """Give back the items' still-held recipients, due at ``until``, no attempt counted."""
        until = kept_time(until, "until")
        check_destination(destination)
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
                    self._due.push(m, r)
                    postponed += 1
        return postponed

    @writes
    def take_tokens(
        self, buckets: Sequence[TokenBucket], *, want: int, now: datetime
    ) -> TokenGrant:
        """Take up to ``want`` tokens from every bucket at once."""
        now = kept_time(now, "now")  # as the durable stores
        with self._lock:
            grant, states = take_tokens(buckets, self._buckets, want=want, now=now)
            self._buckets.update(states)
        return grant

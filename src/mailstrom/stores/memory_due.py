"""The memory store's pending recipients by when they fall due: a min-heap per priority
lane, in the order a lease takes them (due time, queue order, place in the message).

Sorted or scanned whole under the store's lock, every ``next_due`` and lease went through
every queued message: at 100,000 messages a lease took 140-280 ms, and ``send_email``
waited for it (benchmarks/memory_lease.py). The heaps are kept as the recipients change
(:meth:`DueIndex.push` wherever one becomes pending, due at another time, or its message
is released from a hold) and read from the top.

Deletion is lazy: a push numbers the recipient's entry anew (``due_gen``), and an entry
is current while its number is the recipient's, the recipient pending, its message
queued and not held; others are dropped when they come to the top, or when the heaps
have grown to twice what was current at the last sweep. Entries of a suspended domain are
set aside while the suspension lasts.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterator
from datetime import datetime

from mailstrom.stores.memory_records import _PENDING, _Message, _Recipient

Entry = tuple[datetime, int, int, int, _Message, _Recipient]
"""(due at, message's queue order, recipient's place in it, ``due_gen``, message,
recipient): ordered as a lease takes them (the first four are never all equal)."""

_SWEEP_FLOOR = 1024
"""Entries the heaps may hold before stale ones are swept out (twice what was current
at the last sweep, and at least this)."""


class DueIndex:
    """Pending recipients of unheld messages by due time, per lane (under the lock)."""

    def __init__(self, messages: dict[str, _Message]) -> None:
        self._messages = messages
        self._lanes: dict[str, list[Entry]] = {}
        self._parked: dict[str, list[Entry]] = {}
        """Domain -> its entries taken off the heaps while it was suspended."""
        self._entries = 0
        self._sweep_at = _SWEEP_FLOOR

    def push(self, m: _Message, r: _Recipient) -> None:
        """(Re)file ``r`` at its due time; its earlier entry, if any, goes stale."""
        if r.state not in _PENDING or m.held:
            return  # filed again when it is released (see push_message)
        r.due_gen += 1
        entry = (r.due_at(), m.seq, r.position, r.due_gen, m, r)
        heapq.heappush(self._lanes.setdefault(_lane(m), []), entry)
        self._entries += 1
        if self._entries > self._sweep_at:
            self._sweep()

    def push_message(self, m: _Message) -> None:
        """File every pending recipient of ``m`` (one released from a hold)."""
        for r in m.recipients.values():
            self.push(m, r)

    def restore(self, entries: Collection[Entry]) -> None:
        """Put back entries taken off by :meth:`due` and not leased (still current)."""
        for entry in entries:
            heapq.heappush(self._lanes.setdefault(_lane(entry[4]), []), entry)
        self._entries += len(entries)

    def lanes(self) -> list[str]:
        return list(self._lanes)

    def earliest(self, suspended: Collection[str]) -> datetime | None:
        """When the first current entry of a domain not ``suspended`` is due."""
        self.unpark(suspended)
        first: datetime | None = None
        for heap in self._lanes.values():
            if self._clean_top(heap, suspended):
                due = heap[0][0]
                if first is None or due < first:
                    first = due
        return first

    def due(
        self, lane: str, now: datetime, suspended: Collection[str], taken: list[Entry]
    ) -> Iterator[Entry]:
        """The lane's current entries due at ``now``, earliest first, each taken off its
        heap as it is read and added to ``taken`` (give back what is not leased with
        :meth:`restore`). Call :meth:`unpark` first."""
        heap = self._lanes.get(lane)
        if heap is None:
            return
        while self._clean_top(heap, suspended) and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            self._entries -= 1
            taken.append(entry)
            yield entry

    def unpark(self, suspended: Collection[str]) -> None:
        """File again the entries of domains no longer ``suspended``."""
        if not self._parked:
            return
        for domain in [d for d in self._parked if d not in suspended]:
            self.restore(self._parked.pop(domain))

    def _clean_top(self, heap: list[Entry], suspended: Collection[str]) -> bool:
        """Drop stale entries off the top of ``heap``, and set aside those of suspended
        domains; whether a current one is left on top."""
        while heap:
            due, _, _, gen, m, r = heap[0]
            if not self._current(gen, m, r):
                heapq.heappop(heap)
                self._entries -= 1
                continue
            if due != r.due_at():  # changed with no push: filed again at its time
                heapq.heappop(heap)
                self._entries -= 1
                self.push(m, r)
                continue
            if r.domain in suspended:
                self._parked.setdefault(r.domain, []).append(heapq.heappop(heap))
                self._entries -= 1
                continue
            return True
        return False

    def _current(self, gen: int, m: _Message, r: _Recipient) -> bool:
        return (
            r.due_gen == gen
            and r.state in _PENDING
            and not m.held
            and self._messages.get(m.id) is m
        )

    def _sweep(self) -> None:
        """Drop every stale entry (amortized: once the heaps doubled)."""
        messages = self._messages
        for heap in self._lanes.values():
            # In place: a reader may hold the list (a push from _clean_top sweeps). The
            # test of _current inline, the number first: most stale entries fail it.
            heap[:] = [
                e
                for e in heap
                if e[3] == e[5].due_gen
                and e[5].state in _PENDING
                and not e[4].held
                and messages.get(e[4].id) is e[4]
            ]
            heapq.heapify(heap)
        for domain, parked in list(self._parked.items()):
            kept = [e for e in parked if self._current(e[3], e[4], e[5])]
            if kept:
                self._parked[domain] = kept
            else:
                del self._parked[domain]
        self._entries = sum(len(h) for h in self._lanes.values())
        self._sweep_at = max(_SWEEP_FLOOR, 2 * self._entries)


def _lane(m: _Message) -> str:
    return m.prepared.attributes.priority or ""

"""The memory store's pending recipients by when they fall due: per priority lane, a
min-heap per destination, and a heap of the destinations' first entries, in the order a
lease takes them (due time, queue order, place in the message).

Sorted or scanned whole under the store's lock, every ``next_due`` and lease went through
every queued message: at 100,000 messages a lease took 140-280 ms, and ``send_email``
waited for it (benchmarks/memory_lease.py). The heaps are kept as the recipients change
(:meth:`DueIndex.push` wherever one becomes pending, due at another time, or its message
is released from a hold) and read from the top. A destination's heap of its own lets a
fair lease pass what it takes nothing more of (a busy destination, one whose share the
lease has) at one step: read entry by entry from one heap of the lane, a backlog passed
so was read whole at every lease (700 ms at 100,000 messages).

Deletion is lazy: a push numbers the recipient's entry anew (``due_gen``), and an entry
is current while its number is the recipient's, the recipient pending, its message
queued and not held; others are dropped when they come to the top, or swept once the
heaps have grown to twice what was current at the last sweep. Entries of purged
messages hold their bodies, so a purge counts them (:meth:`DueIndex.drop`): once they are
a quarter of the heaps a sweep starts, each purge pays it for the recipients it deletes,
and one that ends with them still a quarter (purged behind it) starts again. A sweep
goes a few entries per push (:data:`SWEEP_STEP`), never the whole index at once (at
100,000 pending recipients that held the lock 74-125 ms): a large heap moves, from its
end (what is left of it stays a heap), onto its destination's new one while both are
read; only the lanes' heads, one per destination, are made anew at once (one led by an
entry of a purged message placed again, past the stale entries atop its heap). A
destination's place on its lane (its head) is numbered too: one is current while its
number is the destination's, and it is never later than the destination's first
current entry. A suspended domain's destinations have no head while the suspension
lasts.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Iterator
from datetime import datetime

from mailstrom.stores.fairness import Fairness
from mailstrom.stores.memory_records import _PENDING, _Message, _Recipient

Entry = tuple[datetime, int, int, int, _Message, _Recipient]
"""(due at, message's queue order, recipient's place in it, ``due_gen``, message,
recipient): ordered as a lease takes them (the first four are never all equal)."""


class _Destination:
    """A destination of a lane: its entries (a heap), and the number of its current head
    on the lane (0: none, while it is parked, passed over by a lease under way, or gone
    from the index)."""

    __slots__ = ("domain", "entries", "head", "lane")

    def __init__(self, lane: str, domain: str) -> None:
        self.lane = lane
        self.domain = domain
        self.entries: list[Entry] = []
        self.head = 0


_Head = tuple[datetime, int, int, int, Entry, _Destination]
"""A destination's place on its lane: its first entry's order, the head's number (never
two alike), that entry, the destination."""

_SWEEP_FLOOR = 1024
"""Entries the heaps may hold before stale ones are swept out (twice what was current
at the last sweep, and at least this)."""

SWEEP_STEP = 256
"""Entries (or heads) a sweep looks at in one go (some 50 µs)."""

_SWEEP_PACE = 4
"""Entries a sweep looks at per push, on the whole: enough to end before the heaps grow
much (each push files one), few enough that no call holds the lock long for it; and per
recipient a purge deletes. That does not bound the share of purged messages' entries
while a sweep is under way: the heaps shrink as it takes other stale entries off, and
what is purged in heaps it has passed stays until the next (the one it starts if they
are a quarter of the heaps). A purge or a sweep that ends with none under way leaves
them under a quarter."""


class DueIndex:
    """Pending recipients of unheld messages by due time, per lane and destination
    (under the store's lock)."""

    def __init__(self, messages: dict[str, _Message]) -> None:
        self._messages = messages
        self._domains: dict[tuple[str, str], _Destination] = {}
        """(lane, domain) -> the destination, while it has entries."""
        self._lanes: dict[str, list[_Head]] = {}
        """Each lane's heads of destinations, a heap."""
        self._parked: dict[str, set[_Destination]] = {}
        """Domain -> its destinations taken off their lanes while it was suspended."""
        self._heads = 0
        self._entries = 0
        """Items of all the heaps, heads included."""
        self._gone = 0
        """Entries (not heads) of purged messages still in the heaps."""
        self.looked = 0
        """Entries and heads a purge or a sweep has looked at, ever: their work, which a
        test can bound."""
        self._sweep_at = _SWEEP_FLOOR
        self._sweeper: Iterator[int] | None = None
        self._credit = 0
        """Entries the sweep may look at before the next push (may be below 0)."""
        self._moving: _Destination | None = None
        """A destination whose heap the sweep is moving onto a new one: off ``_domains``
        (pushes go to the new one), still on its lane, read like any other."""

    def push(self, m: _Message, r: _Recipient) -> None:
        """(Re)file ``r`` at its due time; its earlier entry, if any, goes stale."""
        if r.state not in _PENDING or m.held:
            return  # filed again when it is released (see push_message)
        r.due_gen += 1
        self._file((r.due_at(), m.seq, r.position, r.due_gen, m, r))
        self._sweep_on()

    def push_message(self, m: _Message) -> None:
        """File every pending recipient of ``m`` (one released from a hold)."""
        for r in m.recipients.values():
            self.push(m, r)

    def drop(self, gone: Collection[_Message]) -> None:
        """Count the entries of the ``gone`` messages (deleted from the store) as stale,
        and sweep them out once they are a quarter of the heaps: an entry filed at a
        lease's end, or at a time the message was cancelled before, holds its message
        and body. Each purge pays the sweep for the recipients it deletes, so its work
        is its messages': filtering at each purge every destination they had entries
        in, and every head of their lanes, a batch of 500 of 50,000 messages cancelled
        of 100,000 scheduled to one domain copied the whole heap (76 ms a batch, 4 s in
        all), and one message walked every head of its lane (100,000 destinations:
        18 ms). Recipients with no entry left pay too: paid by entries only, a sweep
        that had taken the later purges' entries off as stale (cancelled, delivered)
        got nothing from them and stopped half done, holding what was purged before."""
        filed = recipients = 0
        for m in gone:
            for r in m.recipients.values():
                filed += r.filed
            recipients += len(m.recipients)
        self.looked += recipients
        if not recipients:
            return
        self._gone += filed
        if self._sweeper is None:
            if not self._gone or 4 * self._gone < self._entries:
                return
            self._sweeper = self._sweep()
        self._sweep_step(_SWEEP_PACE * recipients)

    def lanes(self) -> list[str]:
        return list(self._lanes)

    def earliest(self, suspended: Collection[str]) -> datetime | None:
        """When the first current entry of a domain not ``suspended`` is due."""
        self._unpark(suspended)
        first: datetime | None = None
        for lane in list(self._lanes):
            head = self._top(lane, suspended)
            if head is not None and (first is None or head[0] < first):
                first = head[0]
        return first

    def read(self, now: datetime, suspended: Collection[str], fair: Fairness | None) -> Reading:
        """A lease's reading of the entries due at ``now`` (see :class:`Reading`)."""
        self._unpark(suspended)
        return Reading(self, now, suspended, fair)

    # --- inside -----------------------------------------------------------------------

    def _file(self, entry: Entry) -> None:
        """Put ``entry`` on its destination's heap, and the destination on its lane when
        the entry comes first (a push's hot path: no call more than needed)."""
        lane = entry[4].prepared.attributes.priority or ""
        key = (lane, entry[5].domain)
        dest = self._domains.get(key)
        self._entries += 1
        entry[5].filed += 1
        if dest is None:
            dest = self._domains[key] = _Destination(lane, key[1])
            dest.entries.append(entry)
        else:
            heapq.heappush(dest.entries, entry)
            if dest.entries[0] is not entry:
                return
        self._place(dest, entry)

    def _place(self, dest: _Destination, first: Entry) -> None:
        """Put ``dest`` on its lane at its entry ``first`` (its other heads go stale)."""
        number = self._heads = self._heads + 1
        dest.head = number
        heads = self._lanes.get(dest.lane)
        if heads is None:
            heads = self._lanes[dest.lane] = []
        heapq.heappush(heads, (first[0], first[1], first[2], number, first, dest))
        self._entries += 1

    def _top(self, lane: str, suspended: Collection[str]) -> _Head | None:
        """The lane's first current head, its destination's first entry current (stale
        ones dropped on the way, destinations of a ``suspended`` domain parked); None
        when the lane has none."""
        heads = self._lanes.get(lane)
        messages = self._messages
        while heads:
            head = heads[0]
            dest = head[5]
            if dest.head != head[3]:
                heapq.heappop(heads)
                self._entries -= 1
                continue
            first = head[4]
            m, r = first[4], first[5]
            entries = dest.entries
            if not (
                entries[0] is first
                and first[3] == r.due_gen
                and r.state in _PENDING
                and not m.held
                and messages.get(m.id) is m
                and first[0] == r.due_at()
            ):
                self._clean(entries)
            if entries and entries[0] is first and dest.domain not in suspended:
                return head
            heapq.heappop(heads)
            self._entries -= 1
            dest.head = 0
            if not entries:
                self._forget(dest)
            elif dest.domain in suspended:
                self._parked.setdefault(dest.domain, set()).add(dest)
            else:
                self._place(dest, entries[0])  # its first entry is later now
        return None

    def _take(self, head: _Head) -> Entry:
        """Take the head's entry (its lane's first) off the heaps, its destination on to
        its next entry (one step of the lane's heap: a lease's hot path)."""
        first, dest = head[4], head[5]
        entries = dest.entries
        heapq.heappop(entries)
        first[5].filed -= 1
        if entries:
            after = entries[0]
            number = self._heads = self._heads + 1
            dest.head = number
            heapq.heapreplace(
                self._lanes[dest.lane], (after[0], after[1], after[2], number, after, dest)
            )
            self._entries -= 1
        else:
            heapq.heappop(self._lanes[dest.lane])
            self._forget(dest)
            self._entries -= 2
        return first

    def _pass(self, head: _Head) -> _Destination:
        """Take the head's destination off its lane (put back by :meth:`_restore`)."""
        dest = head[5]
        heapq.heappop(self._lanes[dest.lane])
        self._entries -= 1
        dest.head = 0
        return dest

    def _restore(self, entries: Iterable[Entry], passed: Iterable[_Destination]) -> None:
        """Put back entries taken and not leased, destinations passed over."""
        for entry in entries:
            self._file(entry)
        for dest in passed:
            if dest.entries and not dest.head:
                self._place(dest, dest.entries[0])
        self._sweep_on()  # what this files the lease took off: as for a push

    def _sweep_on(self) -> None:
        """A step of the sweep under way, or of one begun once the heaps have doubled."""
        if self._sweeper is not None:
            self._sweep_step()
        elif self._entries > self._sweep_at:
            self._sweeper = self._sweep()
            self._sweep_step()

    def _forget(self, dest: _Destination) -> None:
        """Take ``dest``, with no entries left, off the index (its head, if any, stale)."""
        dest.head = 0
        key = (dest.lane, dest.domain)
        if self._domains.get(key) is dest:
            del self._domains[key]

    def _clean(self, entries: list[Entry]) -> None:
        """Drop stale entries off the top of a destination's heap, and file again one
        whose recipient is due at another time with no push."""
        while entries:
            due, _, _, gen, m, r = entries[0]
            if not self._current(gen, m, r):
                heapq.heappop(entries)
                self._entries -= 1
                r.filed -= 1
                if self._messages.get(m.id) is not m:
                    self._gone -= 1
            elif due != r.due_at():
                r.due_gen += 1
                heapq.heapreplace(entries, (r.due_at(), m.seq, r.position, r.due_gen, m, r))
            else:
                return

    def _unpark(self, suspended: Collection[str]) -> None:
        """Put back on their lanes the destinations of domains no longer ``suspended``."""
        if not self._parked:
            return
        for domain in [d for d in self._parked if d not in suspended]:
            for dest in self._parked.pop(domain):
                if dest.entries and (
                    self._domains.get((dest.lane, domain)) is dest or dest is self._moving
                ):
                    self._place(dest, dest.entries[0])

    def _current(self, gen: int, m: _Message, r: _Recipient) -> bool:
        return (
            r.due_gen == gen
            and r.state in _PENDING
            and not m.held
            and self._messages.get(m.id) is m
        )

    def _unfile(self, entries: Collection[Entry], kept: Collection[Entry]) -> None:
        """Count off their recipients (and off the purged ones') the ``entries`` taken
        off a heap, but those ``kept``."""
        messages = self._messages
        for entry in entries:
            entry[5].filed -= 1
            if messages.get(entry[4].id) is not entry[4]:
                self._gone -= 1
        for entry in kept:
            entry[5].filed += 1

    def _kept(self, entries: Iterable[Entry]) -> list[Entry]:
        """The current ones of ``entries`` (the test of _current inline, the number
        first: most stale entries fail it)."""
        messages = self._messages
        return [
            e
            for e in entries
            if e[3] == e[5].due_gen
            and e[5].state in _PENDING
            and not e[4].held
            and messages.get(e[4].id) is e[4]
        ]

    def _sweep_step(self, pace: int = _SWEEP_PACE) -> None:
        """Go on with the sweep, ``pace`` entries more (:data:`_SWEEP_PACE` a push): a
        step of up to :data:`SWEEP_STEP` every so many pushes."""
        assert self._sweeper is not None
        self._credit += pace
        while self._credit > 0:
            seen = next(self._sweeper, None)
            if seen is None:
                self._sweeper = None
                self._credit = 0
                self._sweep_at = max(_SWEEP_FLOOR, 2 * self._entries)
                return
            self._credit -= seen
            self.looked += seen

    def _sweep(self) -> Iterator[int]:
        """Sweep (:meth:`_sweep_pass`), and again while a quarter of the heaps are
        entries of messages purged behind the pass (in heaps it had passed): ended,
        they stayed until the next sweep, while the pass took other stale entries off
        and the heaps shrank."""
        while True:
            looked = 0
            for seen in self._sweep_pass():
                looked += seen
                yield seen
            # A pass that looked at nothing (were the counts wrong) would go round for ever.
            if not (looked and self._gone and 4 * self._gone >= self._entries):
                return

    def _sweep_pass(self) -> Iterator[int]:
        """Drop the stale entries, a few at a time (yields how many it looked at): each
        destination's heap, then the lanes' stale heads. Whatever the others do in
        between (take, push, park), every heap stays one, and every destination on its
        lane no later than its first entry."""
        for key, dest in list(self._domains.items()):
            if self._domains.get(key) is not dest:
                continue  # gone since
            entries = dest.entries
            looked = len(entries)
            if looked <= SWEEP_STEP:
                kept = self._kept(entries)
                if len(kept) < looked:
                    self._entries -= looked - len(kept)
                    self._unfile(entries, kept)
                    heapq.heapify(kept)
                    dest.entries = kept  # its head, if earlier now, is put right when read
                    if not kept:
                        self._forget(dest)
                yield looked
                continue
            # A large one: its current entries move, a chunk at a time from its end (what
            # is left of it stays a heap, on its lane), onto the destination's new one.
            del self._domains[key]
            self._moving = dest
            while entries:  # unless a lease took them all meanwhile
                chunk = entries[-SWEEP_STEP:]
                del entries[-SWEEP_STEP:]
                self._entries -= len(chunk)
                self._unfile(chunk, ())
                if not entries:
                    self._forget(dest)
                for entry in self._kept(chunk):
                    self._file(entry)
                yield len(chunk)
            self._moving = None
        # Heads that lead no destination any more (one that led was replaced, taken off
        # or set aside), dropped at once: as many as the lane has destinations, each a
        # pointer, where their heaps hold the entries. One that leads at an entry of a
        # purged message (which holds its body) is placed again at its first entry.
        messages = self._messages
        for lane, heads in list(self._lanes.items()):
            fresh = []
            replaced = []
            for head in heads:
                dest, first = head[5], head[4]
                if dest.head != head[3]:
                    continue
                if messages.get(first[4].id) is first[4]:
                    fresh.append(head)
                elif dest.entries:
                    replaced.append(dest)
                else:
                    dest.head = 0
            looked = len(heads)
            self._entries -= looked - len(fresh)
            if fresh:
                heapq.heapify(fresh)
                heads[:] = fresh
            else:
                del self._lanes[lane]
            for dest in replaced:
                # Its first entry may be of a message purged since its heap was swept.
                entries = dest.entries
                before = len(entries)
                self._clean(entries)
                looked += before - len(entries)
                if entries:
                    self._place(dest, entries[0])
                else:
                    self._forget(dest)
            yield looked
        for domain, dests in list(self._parked.items()):
            left = {dest for dest in dests if dest.entries}
            if left:
                self._parked[domain] = left
            else:
                del self._parked[domain]


class Reading:
    """A lease's reading of the due index: :meth:`due` takes each lane's due entries
    off it, earliest first, passing over the destinations a ``fair`` lease takes
    nothing more of (none at a busy one, ``fair.share`` of one in each lane at most);
    :meth:`give_back` puts back what the lease does not keep. No other change of the
    index comes between."""

    def __init__(
        self,
        index: DueIndex,
        now: datetime,
        suspended: Collection[str],
        fair: Fairness | None,
    ) -> None:
        self._index = index
        self._now = now
        self._suspended = suspended
        self._fair = fair
        self._taken: list[Entry] = []
        self._passed: list[_Destination] = []
        self._counts: dict[str, dict[str, int]] = {}
        """Lane -> domain -> entries taken (a destination may be two while a sweep
        moves its heap)."""

    def due(self, lane: str) -> Iterator[Entry]:
        """The lane's entries due at ``now`` a lease may take, earliest first, each taken
        off the index as it is read."""
        index, fair, now = self._index, self._fair, self._now
        counts = self._counts.setdefault(lane, {})
        while True:
            head = index._top(lane, self._suspended)
            if head is None or head[0] > now:
                return
            if fair is not None:
                dest = head[5]
                held = counts.get(dest.domain, 0)
                if dest.domain in fair.busy or held >= fair.share:
                    self._passed.append(index._pass(head))
                    continue
                counts[dest.domain] = held + 1
            entry = index._take(head)
            self._taken.append(entry)
            yield entry

    def give_back(self, kept: Collection[Entry]) -> None:
        """Put back what was read and not ``kept`` (leased), and what was passed over."""
        leased = {id(e) for e in kept}
        self._index._restore((e for e in self._taken if id(e) not in leased), self._passed)
        self._taken, self._passed = [], []

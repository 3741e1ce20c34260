"""The memory store lets go of what its messages no longer need once they are purged,
and its reads touch what they return, not the whole store."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from tests.contract.support import NOW, SECOND, lease_all, message, results_for

from mailstrom.message.attributes import QueueAttributes
from mailstrom.mtasts import CachedPolicy, Mode, Policy
from mailstrom.readmodel import QueueQuery, QueueView, SortOrder
from mailstrom.readmodel import memory as memory_model
from mailstrom.readmodel.memory import MemoryReadModel
from mailstrom.status import DestinationThrottle, RecipientState
from mailstrom.stores import MemoryStore, QueueFilter
from mailstrom.stores.memory_due import _SWEEP_PACE, SWEEP_STEP
from mailstrom.stores.memory_operator import WALK_BATCH
from mailstrom.stores.memory_records import _Event, _Message
from mailstrom.suppression import Suppression, SuppressionSource

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def test_purging_messages_forgets_their_idempotency_keys() -> None:
    # SQLite and PostgreSQL delete a purged message's key with it (ON DELETE CASCADE);
    # the memory store kept every key for good, one per keyed message ever purged.
    store = MemoryStore()
    for n in range(6):
        keyed = dataclasses.replace(
            message(f"user{n}@example.org"),
            attributes=QueueAttributes(idempotency_key=f"order-{n}", idempotency_until=NOW + DAY),
        )
        store.enqueue(keyed, now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    ids = [m.id for m in store.recent()]
    assert store.purge_many(ids[:2]) == 2
    assert store.purge_state(finished_before=NOW + SECOND, state=RecipientState.FAILED) == 0
    assert store.purge(finished_before=NOW + SECOND) == 4
    assert store.recent() == []
    assert store._keys == {}


class _CountingPauses(dict[str, DestinationThrottle]):
    """The memory store's pauses, counting the entries a walk over them visits."""

    visited = 0

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            self.visited += 1
            yield key

    def items(self) -> Iterator[tuple[str, DestinationThrottle]]:  # type: ignore[override]
        for item in super().items():
            self.visited += 1
            yield item

    def values(self) -> Iterator[DestinationThrottle]:  # type: ignore[override]
        for value in super().values():
            self.visited += 1
            yield value


def test_a_throttle_does_not_walk_every_pause_kept() -> None:
    """Was: each throttle walked every pause kept (a day after it ends) for those to
    forget, under the store's lock: O(N^2) for N pauses of distinct destinations (2,000
    pauses, 1,999,000 visits). Those past their time are still forgotten."""
    store = MemoryStore()
    pauses = store._throttles = _CountingPauses()
    for n in range(2000):
        store.throttle(f"d{n}.example", now=NOW, reply="421 busy", first=MINUTE, maximum=HOUR)
    assert pauses.visited < 100
    later = NOW + 2 * DAY
    store.throttle("late.example", now=later, reply="421 busy", first=MINUTE, maximum=HOUR)
    assert list(dict(pauses)) == ["late.example"]
    assert [p.destination for p in store.throttles(now=later)] == ["late.example"]


class _CountingEvents(dict[int, _Event]):
    """The memory store's event outbox, counting the entries a read touches."""

    visited = 0

    def __iter__(self) -> Iterator[int]:
        for key in super().__iter__():
            self.visited += 1
            yield key

    def items(self) -> Iterator[tuple[int, _Event]]:  # type: ignore[override]
        for item in super().items():
            self.visited += 1
            yield item

    def values(self) -> Iterator[_Event]:  # type: ignore[override]
        for value in super().values():
            self.visited += 1
            yield value

    def __getitem__(self, key: int) -> _Event:
        self.visited += 1
        return super().__getitem__(key)


def test_reading_events_touches_only_the_page_read() -> None:
    """Was: each ``read_events`` walked every event kept, whatever its ``after`` and
    ``limit`` (and ``last_event_id`` did too): paging through 2,000 events 10 at a time
    visited 400,000 entries, quadratic in the outbox. A page is the same as before."""
    store = MemoryStore()
    store.enable_events()
    store.enqueue(message(*(f"user{n}@example.org" for n in range(2000))), now=NOW)
    store.record(
        results_for(store.lease(now=NOW, limit=2000, lease_for=HOUR), RecipientState.FAILED)
    )
    everything = store.read_events(limit=5000)
    assert len(everything) == 2000
    events = store._events = _CountingEvents(store._events)
    pages, after = [], 0
    while page := store.read_events(after=after, limit=10):
        pages.extend(page)
        after = page[-1].id
    assert pages == everything
    assert store.read_events(after=everything[999].id - 1, limit=3) == everything[999:1002]
    assert store.last_event_id() == everything[-1].id
    assert events.visited < 5000


@pytest.mark.parametrize("order", [SortOrder.NEWEST, SortOrder.OLDEST])
def test_a_queue_page_starts_at_its_cursor(
    monkeypatch: pytest.MonkeyPatch, order: SortOrder
) -> None:
    """Was: the memory read model's page of the queue (the dashboard's) judged every
    message from the start of the queue up to its cursor, and skipped those before it:
    paging through 2,000 messages 10 at a time judged 201,199 of them. A page now starts
    at its cursor, found by bisection, and the pages are the same."""
    store = MemoryStore()
    ids = [
        store.enqueue(message(f"u{n}@example.org"), now=NOW + n % 7 * SECOND) for n in range(2000)
    ]
    judged = 0
    matches = memory_model._matches

    def counted(m: _Message, query: QueueQuery) -> bool:
        nonlocal judged
        judged += 1
        return matches(m, query)

    monkeypatch.setattr(memory_model, "_matches", counted)
    model = MemoryReadModel(store)
    seen: list[str] = []
    query = QueueQuery(view=QueueView.ALL, order=order, limit=10)
    while True:
        page = model.queue_page(query, now=NOW + DAY)
        seen += [m.id for m in page.messages]
        if page.next is None:
            break
        query = dataclasses.replace(query, after=page.next)
    by_place = sorted(range(2000), key=lambda n: (n % 7, n), reverse=order is SortOrder.NEWEST)
    assert seen == [ids[n] for n in by_place]
    assert judged < 5000


class _CountingMessages(dict[str, _Message]):
    """The memory store's messages, counting the entries a read touches."""

    visited = 0

    def values(self) -> Iterator[_Message]:  # type: ignore[override]
        for value in super().values():
            self.visited += 1
            yield value

    def get(self, key: str, default: object = None) -> Any:
        self.visited += 1
        return super().get(key, default)


@pytest.mark.parametrize("clock_went_back", [False, True])
def test_paging_through_the_queue_touches_each_message_a_few_times(
    clock_went_back: bool,
) -> None:
    """Was: each page of ``select_page`` (and of every listing, the dashboard's queue
    pages too) copied the whole list of messages, and sorted it when the clock had ever
    gone back, to start at its place: paging through 100,000 messages 100 at a time
    took 4.7 s, quadratic in the queue. A page is now found in the store's ordered list
    by bisection, and the pages are the same. Counted here (messages touched), not
    timed."""
    store = MemoryStore()
    n = 20_000
    for start in range(0, n, 1000):
        at = NOW + (start // 1000 % 7) * SECOND if clock_went_back else NOW + start * SECOND
        store.enqueue_many([message(f"u{i}@example.org") for i in range(1000)], now=at)
    whole = store.select_ids(now=NOW + DAY, where=QueueFilter(limit=n))
    messages = store._messages = _CountingMessages(store._messages)
    walked: list[str] = []
    after = None
    while True:
        page = store.select_page(now=NOW + DAY, where=QueueFilter(limit=500), after=after)
        walked += page.ids
        if len(page.ids) < 500:
            break
        after = page.last
    assert walked == whole
    # A batch of the walk per page at most (it was the whole queue per page: 897,000).
    assert messages.visited <= (n // 500 + 1) * WALK_BATCH, messages.visited


def test_the_ordered_list_lets_go_of_purged_messages() -> None:
    """The list the walks bisect keeps a purged message's place (its key, not the
    message) until more were purged than are left (plus a batch): then it is made
    again, and the listings stay the same. Was: it kept the purged messages themselves,
    bodies included: purging 1,500 messages of 1 MB freed nothing."""
    store = MemoryStore()
    ids = store.enqueue_many([message(f"u{i}@example.org") for i in range(3000)], now=NOW)
    store.record(
        results_for(store.lease(now=NOW, limit=3000, lease_for=HOUR), RecipientState.DELIVERED)
    )
    whole = store.select_ids(now=NOW + DAY, where=QueueFilter(limit=5000))
    assert sorted(whole) == sorted(ids)
    # The due index drops its stale entries of the finished recipients as a lease reads
    # past them: only the ordered list is left to let go of the purged messages.
    assert store.lease(now=NOW + DAY, limit=10, lease_for=HOUR) is None
    purged = [store._messages[mid] for mid in whole[:100]]
    assert store.purge_many(whole[:100]) == 100
    assert len(store._order) == 3000  # kept: fewer purged than are left
    gc.collect()
    # Nothing but this test holds a purged message (a _Message has no weakref slot).
    assert [r for m in purged for r in gc.get_referrers(m) if r is not purged] == []
    assert store.select_ids(now=NOW + DAY, where=QueueFilter(limit=5000)) == whole[100:]
    assert store.purge_many(whole[100:2600]) == 2500
    assert len(store._order) == 400
    assert store.select_ids(now=NOW + DAY, where=QueueFilter(limit=5000)) == whole[2600:]


def test_a_message_id_header_is_looked_up_not_searched_for() -> None:
    """Was: ``message_ids_for_header`` (what a bounce report's ``Message-ID`` is matched
    by) walked every message of the store, a batch at a time: each report cost the whole
    queue (4,000 entries visited per report for 2,000 messages). It now reads the
    messages with that header only, newest first as before, and forgets a purged one."""
    store = MemoryStore()
    ids = {}
    for n in range(2000):
        header = f"<m{n % 1000}@example.com>"
        prepared = dataclasses.replace(message(f"u{n}@example.org"), header_message_id=header)
        ids[n] = store.enqueue(prepared, now=NOW + (n % 3) * SECOND)
    messages = store._messages = _CountingMessages(store._messages)
    assert store.message_ids_for_header("<m7@example.com>") == [ids[1007], ids[7]]
    assert store.message_ids_for_header("<m8@example.com>") == [ids[8], ids[1008]]
    assert store.message_ids_for_header("<m8@example.com>", limit=1) == [ids[8]]
    assert store.message_ids_for_header("<none@example.com>") == []
    assert messages.visited < 100
    store.record(
        results_for(
            store.lease(now=NOW + DAY, limit=2000, lease_for=HOUR), RecipientState.DELIVERED
        )
    )
    assert store.purge_many([ids[8]]) == 1
    assert store.message_ids_for_header("<m8@example.com>") == [ids[1008]]


def _held(records: list[_Message]) -> list[object]:
    """What still refers to these records of purged messages, or to their prepared
    messages (bodies included), but the list and the records themselves. Asked of
    these objects only: a count of every prepared message in the process was moved by
    any other test's worker thread left running."""
    gc.collect()
    own = {id(records), *map(id, records)}
    found = gc.get_referrers(*records, *(m.prepared for m in records))
    return [o for o in found if id(o) not in own]


@pytest.mark.parametrize("how", ["delivered", "cancelled"])
def test_a_purge_leaves_nothing_of_its_messages_in_the_due_index(how: str) -> None:
    """Was: the due index kept the entry each lease files at its end (and the one a
    cancelled message had at its due time) until a lease or a sweep came to it: behind
    one deferred recipient due earlier, 1,000 messages delivered (or cancelled) and
    purged were all still held, bodies and all. A purge that leaves them a large share
    of the index sweeps them out."""
    store = MemoryStore()
    deferred = store.enqueue(message("x@down.example"), now=NOW)
    store.record(
        results_for(
            store.lease(now=NOW, limit=1, lease_for=HOUR),
            RecipientState.DEFERRED,
            next_attempt_at=NOW + MINUTE,
        )
    )
    count = 1000
    later = QueueAttributes(send_at=NOW + DAY)
    store.enqueue_many(
        [
            dataclasses.replace(message(f"u{n}@d{n % 7}.example"), attributes=later)
            if how == "cancelled"
            else message(f"u{n}@d{n % 7}.example")
            for n in range(count)
        ],
        now=NOW,
    )
    records = [m for m in store._messages.values() if m.id != deferred]
    if how == "cancelled":
        assert store.cancel_many([m.id for m in store.recent(count)], now=NOW) == count
    else:
        lease = store.lease(now=NOW, limit=count, lease_for=HOUR)
        store.record(results_for(lease, RecipientState.DELIVERED))
    assert store.purge(finished_before=NOW + SECOND) == count
    assert store.next_due(now=NOW + SECOND) == NOW + MINUTE
    assert store.lease(now=NOW + SECOND, limit=10, lease_for=HOUR) is None
    assert _held(records) == []
    assert store._due._entries <= 4


def test_taking_owed_notices_a_batch_at_a_time_reads_each_batch() -> None:
    """Was: each look for the notices owed sorted every marked message by queue order,
    and the worker asks again at once while it gets a full batch (100 messages): 20,000
    messages owing one cost 20,000 lookups a look, 2 million to queue them all,
    quadratic in the backlog. The batches are the same, in queue order."""
    store = MemoryStore()
    count = 20_000
    ids = store.enqueue_many([message(f"u{n}@example.org") for n in range(count)], now=NOW)
    lease = store.lease(now=NOW, limit=count, lease_for=HOUR)
    # Recorded newest first: the marks' order is not the queue's.
    failed = [
        dataclasses.replace(result, notice="failed")
        for result in reversed(results_for(lease, RecipientState.FAILED))
    ]
    store.record(failed)
    messages = store._messages = _CountingMessages(store._messages)
    taken: list[str] = []
    while owed := store.owed_notices():
        assert len(owed) == 100
        taken += [entry.message_id for entry in owed]
        store.queue_notices(owed, {}, now=NOW)
    assert taken == ids
    assert store.owed_notices() == []
    assert messages.visited < 5 * count, messages.visited


class _CountingSuppressions(dict[str, Suppression]):
    """The memory store's suppression list, counting the entries a prune reads."""

    visited = 0

    def items(self) -> Iterator[tuple[str, Suppression]]:  # type: ignore[override]
        for item in super().items():
            self.visited += 1
            yield item

    def get(self, key: str, default: object = None) -> Any:
        self.visited += 1
        return super().get(key, default)


def test_pruning_suppressions_a_batch_at_a_time_reads_each_batch() -> None:
    """Was: each prune walked every entry kept for the expired ones, and the worker
    prunes a batch (1,000) per call until one is short: 10,000 expired among 20,000
    entries, pruned 100 at a time, read 1.5 million entries, quadratic in the list. The
    same entries go, soonest expired first."""
    store = MemoryStore()
    count = 20_000
    store.suppress(
        [
            Suppression(
                target=f"u{n}@example.org",
                source=SuppressionSource.HARD_BOUNCE,
                reply="550 no such user",
                created_at=NOW - DAY,
                expires_at=NOW + (n % 2 * 2 - 1) * (1 + n % 97) * MINUTE,
            )
            for n in range(count)
        ]
    )
    # A replaced and a removed entry: their old ends are stale in what a prune reads.
    later = store.suppressions_for(["u2@example.org"], now=NOW - DAY)["u2@example.org"]
    store.suppress([dataclasses.replace(later, expires_at=NOW + HOUR)])
    assert store.unsuppress(["u4@example.org"]) == 1
    ends = {t: e.expires_at for t, e in store._suppressions.items()}
    entries = store._suppressions = _CountingSuppressions(store._suppressions)
    assert store.prune_suppressions(expired_before=NOW, limit=100) == 100
    expired = sorted((end, t) for t, end in ends.items() if end is not None and end <= NOW)
    assert [t for _, t in expired[:100] if t not in entries] == [t for _, t in expired[:100]]
    assert all(t in entries for _, t in expired[100:])
    while store.prune_suppressions(expired_before=NOW, limit=100) == 100:
        pass
    assert sorted(entries) == sorted(t for t, end in ends.items() if end is not None and end > NOW)
    assert "u2@example.org" in entries
    assert entries.visited < 5 * count, entries.visited


class _CountingPolicies(dict[str, CachedPolicy]):
    """The memory store's MTA-STS policies, counting the ones a prune reads."""

    visited = 0

    def items(self) -> Iterator[tuple[str, CachedPolicy]]:  # type: ignore[override]
        for item in super().items():
            self.visited += 1
            yield item

    def values(self) -> Iterator[CachedPolicy]:  # type: ignore[override]
        for _, value in self.items():
            yield value

    def get(self, key: str, default: object = None) -> Any:
        self.visited += 1
        return super().get(key, default)


def test_pruning_mta_sts_policies_a_batch_at_a_time_reads_each_batch() -> None:
    """Pruning expired MTA-STS policies 100 a call (the worker prunes batch after batch
    until one is short) reads what it deletes and the replaced policies' old ends, not
    every policy kept at each call; refreshes do not pile up ends for ever."""
    store = MemoryStore()
    policy = Policy(mode=Mode.TESTING, mx=("mx.example.org",), max_age=86400, text="x")
    count = 2000

    def save(n: int, expires_at: timedelta) -> None:
        fetched = NOW + expires_at - DAY
        store.save_mta_sts_policy(CachedPolicy.of(f"d{n}.example", "1", policy, fetched))

    for n in range(count):
        save(n, (n % 2 * 2 - 1) * (1 + n % 97) * MINUTE)
    for _ in range(50):  # daily refreshes of one domain: their ends are made again
        save(1, HOUR)
    assert len(store._mta_sts_ends) <= 2 * count + 64
    policies = store._mta_sts = _CountingPolicies(store._mta_sts)
    while store.prune_mta_sts_policies(expired_before=NOW, limit=100) == 100:
        pass
    assert sorted(policies) == sorted(f"d{n}.example" for n in range(1, count, 2))
    assert policies.visited < 3 * count, policies.visited


@pytest.mark.parametrize("domains", [1, 5000])
def test_a_purge_batch_looks_at_its_own_entries_not_the_whole_queue(domains: int) -> None:
    """Was: each purge batch filtered every destination its messages had entries in, and
    every head of their lanes: 5,000 cancelled of 10,000 scheduled, purged 500 at a
    time, looked at the whole heap (or every destination's head) per batch. The work of
    a batch is now its own recipients' and a sweep's share paid for by them."""
    store = MemoryStore()
    later = QueueAttributes(send_at=NOW + DAY)
    ids = store.enqueue_many(
        [
            dataclasses.replace(message(f"u{n}@d{n % domains}.example"), attributes=later)
            for n in range(10_000)
        ],
        now=NOW,
    )
    doomed = ids[::2]
    assert store.cancel_many(doomed, now=NOW) == len(doomed)
    index = store._due
    batch = 500
    worst = 0
    for start in range(0, len(doomed), batch):
        before = index.looked
        assert store.purge_many(doomed[start : start + batch]) == batch
        worst = max(worst, index.looked - before)
    # One look a recipient, a sweep's pace per recipient, and the step it may end past.
    assert worst <= (1 + _SWEEP_PACE) * batch + SWEEP_STEP
    # What is left of the purged messages, here under half the index (none, or with 5,000
    # destinations a sixth, the sweep under way: no share is bounded while one is, see
    # _SWEEP_PACE), is taken off as a lease comes to it.
    assert 0 <= 2 * index._gone < index._entries
    assert store.lease(now=NOW + DAY, limit=10_000, lease_for=HOUR) is not None
    assert index._gone == 0


def _purged_held(store: MemoryStore) -> int:
    """Entries of the due index (in heaps, or leading a destination on its lane) whose
    message is purged: each holds the message and its body."""
    index = store._due
    dests = list(index._domains.values())
    if index._moving is not None:
        dests.append(index._moving)
    entries = [e for dest in dests for e in dest.entries]
    entries += [head[4] for heads in index._lanes.values() for head in heads]
    return sum(store._messages.get(e[4].id) is not e[4] for e in entries)


@pytest.mark.parametrize("domains", [1, 7])
@pytest.mark.parametrize("share", [90, 99])
def test_purging_most_of_the_queue_a_batch_at_a_time_leaves_little_held(
    share: int, domains: int
) -> None:
    """Was: 10,000 scheduled messages to one domain, the newest 90% (99%) cancelled and
    purged 500 at a time, left 1,616 entries of purged messages held, 62% of the index
    (1,718: 94%), bodies and all, until a lease came to them: the sweep the purges pay
    for took the cancelled messages' entries off as stale, so their purges paid it
    nothing, and it stopped half done. Each recipient purged now pays."""
    store = MemoryStore()
    later = QueueAttributes(send_at=NOW + DAY)
    count = 10_000
    ids = store.enqueue_many(
        [
            dataclasses.replace(message(f"u{n}@d{n % domains}.example"), attributes=later)
            for n in range(count)
        ],
        now=NOW,
    )
    doomed = ids[count - count * share // 100 :]
    assert store.cancel_many(doomed, now=NOW) == len(doomed)
    batch = 500
    for start in range(0, len(doomed), batch):
        assert store.purge_many(doomed[start : start + batch]) == len(doomed[start:][:batch])
    index = store._due
    held = _purged_held(store)
    assert held == index._gone
    assert 4 * held < index._entries, (held, index._entries)
    lease = store.lease(now=NOW + DAY, limit=count, lease_for=HOUR)
    assert lease is not None
    assert {item.message_id for item in lease.items} == set(ids) - set(doomed)
    assert _purged_held(store) == index._gone == 0


def test_a_sweep_leads_no_destination_at_an_entry_purged_behind_it() -> None:
    """Was: the sweep's pass over the heads placed a destination led by an entry of a
    purged message again at its heap's first entry, which could be of a message purged
    after the pass had swept that heap: the head held that message, and its body, on.
    It is placed past them."""
    store = MemoryStore()
    later = QueueAttributes(send_at=NOW + DAY)
    few = store.enqueue_many(
        [dataclasses.replace(message(f"u{n}@few.example"), attributes=later) for n in range(10)],
        now=NOW,
    )
    many = store.enqueue_many(
        [dataclasses.replace(message(f"u{n}@many.example"), attributes=later) for n in range(4000)],
        now=NOW,
    )
    doomed = many[2000:]
    assert store.cancel_many(doomed, now=NOW) == len(doomed)
    index = store._due
    while index._sweeper is None:  # until one starts (few.example's heap swept at once)
        assert store.purge_many(doomed[:100]) == 100
        del doomed[:100]
    assert index._moving is not None
    # The first two of few.example, its head's entry among them, purged behind the sweep.
    assert store.cancel_many(few[:2], now=NOW) == 2
    assert store.purge_many(few[:2]) == 2
    for n in range(4000):  # each push pays the sweep its pace, until it ends
        if index._sweeper is None:
            break
        store.enqueue(message(f"u{n}@other.example"), now=NOW)
    assert index._sweeper is None
    leading = [h[4][4] for heads in index._lanes.values() for h in heads if h[5].head == h[3]]
    assert [m.id for m in leading if store._messages.get(m.id) is not m] == []
    assert _purged_held(store) == 0


def test_a_sweep_that_ends_with_a_quarter_purged_behind_it_starts_again() -> None:
    """Was: a sweep ended leaving what had been purged in the heaps it had passed, until
    the next purge started another: 10,000 scheduled messages to one domain, the newest
    99% cancelled and purged 100 at a time (each batch cancelled, then purged), left the
    last 100 purged, half the index, bodies and all. The sweep goes on."""
    store = MemoryStore()
    later = QueueAttributes(send_at=NOW + DAY)
    count = 10_000
    ids = store.enqueue_many(
        [dataclasses.replace(message(f"u{n}@d.example"), attributes=later) for n in range(count)],
        now=NOW,
    )
    doomed = ids[count // 100 :]
    for start in range(0, len(doomed), 100):
        assert store.cancel_many(doomed[start : start + 100], now=NOW) == 100
        assert store.purge_many(doomed[start : start + 100]) == 100
    index = store._due
    assert (_purged_held(store), index._gone) == (0, 0)
    assert index._sweeper is None

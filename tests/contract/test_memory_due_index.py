"""The memory store finds due work from its due index (memory_due.py), not by going
through every queued message under its lock: ``next_due`` scanned them all, and every
lease sorted every due recipient of the queue to take ``limit`` of them (140-280 ms a
lease at 100,000 messages, ``send_email`` waiting meanwhile: benchmarks/memory_lease.py).

Counted, not timed: how many recipients a call looks at. And the index's answers are
checked, over random sequences of the store's calls, against the whole scan it replaced
(:func:`scanned_next_due`, :func:`scanned_lease`)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest

from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores import Lease, MemoryStore
from mailstrom.stores.base import messages_within
from mailstrom.stores.fairness import fairness
from mailstrom.stores.memory_records import _PENDING, _Recipient

from .support import LEASE_FOR, NOW, results_for

COUNT = 6000
SECOND = timedelta(seconds=1)
HOLDER = "0123abcd"


def mail(
    recipients: Sequence[str], lane: str | None = None, send_at: datetime | None = None
) -> PreparedMessage:
    return PreparedMessage(
        data=b"Subject: x\r\n\r\nx\r\n",
        envelope_from="app@example.com",
        recipients=tuple(recipients),
        attributes=QueueAttributes(priority=lane, send_at=send_at),
    )


@pytest.fixture
def looked_at(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a recipient's due time was read (one cell, reset by the test)."""
    seen = [0]
    due_at = _Recipient.due_at

    def counted(self: _Recipient) -> datetime:
        seen[0] += 1
        return due_at(self)

    monkeypatch.setattr(_Recipient, "due_at", counted)
    return seen


def big_queue() -> MemoryStore:
    store = MemoryStore()
    store.enqueue_many(
        [mail([f"u{i}@d{i % 50}.example.org"]) for i in range(COUNT)], now=NOW - SECOND
    )
    return store


def test_next_due_reads_the_earliest_recipient_not_every_one(looked_at: list[int]) -> None:
    store = big_queue()
    looked_at[0] = 0
    assert store.next_due(now=NOW) == NOW - SECOND
    assert looked_at[0] < 10, f"next_due read {looked_at[0]} due times for one answer"


@pytest.mark.parametrize(
    "how",
    [
        {},
        {"lanes": [("transactional", 50), ("bulk", 50)]},
        {"busy": ["d1.example.org"], "per_destination": 5},
    ],
    ids=["plain", "lanes", "fair"],
)
def test_a_lease_reads_what_it_takes_not_every_due_recipient(
    how: dict[str, Any], looked_at: list[int]
) -> None:
    store = big_queue()
    looked_at[0] = 0
    lease = store.lease(now=NOW, limit=100, lease_for=LEASE_FOR, **how)
    assert lease is not None
    assert sum(len(item.recipients) for item in lease.items) == 100
    # The recipients it takes (and files again at their lease's end), a few more of the
    # fair lease's busy destination, not the 6,000 due.
    assert looked_at[0] < 1000, f"a lease of 100 read {looked_at[0]} due times"


def one_slow_destination() -> MemoryStore:
    """A backlog of COUNT messages to one destination, queued before 200 to 50 others."""
    store = MemoryStore()
    store.enqueue_many(
        [mail([f"u{i}@slow.example.org"]) for i in range(COUNT)], now=NOW - 2 * SECOND
    )
    store.enqueue_many(
        [mail([f"u{i}@d{i % 50}.example.org"]) for i in range(200)], now=NOW - SECOND
    )
    return store


@pytest.mark.parametrize(
    "how",
    [
        {"busy": ["slow.example.org"]},
        {"per_destination": 5},
        {"lanes": [("", 100)], "per_destination": 5},
    ],
    ids=["busy", "share", "lanes"],
)
def test_a_fair_lease_passes_a_backlog_it_takes_nothing_more_of(
    how: dict[str, Any], looked_at: list[int]
) -> None:
    # The worker names the destination with a backlog waiting in it busy, and shares
    # each lease out per destination: a lease read (and filed again) every due
    # recipient of the backlog it left, 700-860 ms at 100,000 messages, more than the
    # whole sort it replaced.
    store = one_slow_destination()
    looked_at[0] = 0
    lease = store.lease(now=NOW, limit=100, lease_for=LEASE_FOR, **how)
    assert lease is not None
    assert sum(len(item.recipients) for item in lease.items) == 100
    assert looked_at[0] < 1000, f"a lease of 100 read {looked_at[0]} due times"


@pytest.mark.parametrize(
    "bad",
    [{"max_bytes": "many"}, {"lanes": [("", 1), ("bulk", "2")]}],
    ids=["max_bytes", "lanes"],
)
def test_a_lease_that_fails_gives_back_what_it_read(bad: dict[str, Any]) -> None:
    # What a lease reads is taken off the index as it reads it: one that raised then
    # (a wrong argument of a caller's) left those recipients out of every later lease.
    store = MemoryStore()
    store.enqueue_many([mail(["u@a.test"]), mail(["v@b.test"])], now=NOW)
    with pytest.raises(TypeError):
        store.lease(now=NOW, limit=10, lease_for=LEASE_FOR, **bad)
    check_index(store)
    assert store.next_due(now=NOW) == NOW
    lease = store.lease(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert lease is not None
    assert sorted(r.address for item in lease.items for r in item.recipients) == [
        "u@a.test",
        "v@b.test",
    ]


class CountedMessages(dict[str, Any]):
    """The store's messages, counting the lookups by id (the due index's test of an
    entry's message, which a sweep makes for each entry it keeps)."""

    lookups = 0

    def get(self, key: str, default: Any = None) -> Any:
        self.lookups += 1
        return super().get(key, default)


def test_a_sweep_of_stale_entries_goes_a_few_per_push(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stale entries were swept all at once by the push that found the heaps doubled:
    at 100,000 pending recipients that one call held the lock 74-125 ms, send_email
    waiting. Each push now sweeps a few, until the sweep is done."""
    from mailstrom.stores import memory_due

    monkeypatch.setattr(memory_due, "SWEEP_STEP", 32, raising=False)
    store = MemoryStore()
    counted = store._messages = store._due._messages = CountedMessages()
    store.enqueue_many(
        [mail([f"u{i}@d{i % 50}.example.org"]) for i in range(COUNT)], now=NOW - SECOND
    )
    # Each lease files its recipients again at its end, each release at once: two stale
    # entries per recipient, up to just below the sweep.
    while store._due._entries + 250 < store._due._sweep_at:
        lease = store.lease(now=NOW, limit=100, lease_for=LEASE_FOR)
        assert lease is not None
        store.release(lease)
    sweep_at = store._due._sweep_at
    most = pushes = 0
    while store._due._sweep_at == sweep_at:  # set anew when the sweep ends
        assert pushes < 4 * COUNT, "the sweep never ended"
        before = counted.lookups
        store.enqueue(mail(["late@d0.example.org"]), now=NOW + timedelta(days=1))
        most = max(most, counted.lookups - before)
        pushes += 1
    assert most < 100, f"one enqueue looked at {most} entries"


# --- the whole scan the index replaced, as the oracle --------------------------------


def scanned_next_due(store: MemoryStore, now: datetime) -> datetime | None:
    suspended = store._suspended_domains(now)
    return min(
        (
            r.due_at()
            for m in store._messages.values()
            if not m.held
            for r in m.recipients.values()
            if r.state in _PENDING and r.domain not in suspended
        ),
        default=None,
    )


def check_next_due(store: MemoryStore, now: datetime) -> None:
    with store._lock:
        expected = scanned_next_due(store, now)
        end = store._suspension_end(now)
    found = store.next_due(now=now)
    want = expected if end is None or (expected is not None and expected <= end) else end
    assert found == want


def scanned_lease(
    store: MemoryStore,
    *,
    now: datetime,
    limit: int,
    lanes: Sequence[tuple[str, int]] | None,
    busy: Sequence[str],
    per_destination: int | None,
    max_bytes: int | None,
) -> list[tuple[str, str, list[str]]]:
    """(message id, domain, addresses) of each item a lease takes, by the whole sort of
    every due recipient it made before (call under the lock)."""
    suspended = store._suspended_domains(now)
    due = [
        (r.due_at(), m.seq, r.position, m, r)
        for m in store._messages.values()
        if not m.held
        for r in m.recipients.values()
        if r.state in _PENDING and r.due_at() <= now and r.domain not in suspended
    ]
    due.sort(key=lambda t: t[:3])
    fair = fairness({}, busy, per_destination, limit)
    if fair is not None:
        counts: dict[tuple[str, str], int] = {}
        kept = []
        for entry in due:
            domain = entry[4].domain
            if domain in fair.busy:
                continue
            key = (entry[3].prepared.attributes.priority or "", domain)
            if counts.get(key, 0) < fair.share:
                counts[key] = counts.get(key, 0) + 1
                kept.append(entry)
        due = kept
    if lanes is not None:
        per_lane: dict[str, list[Any]] = {}
        for entry in due:
            per_lane.setdefault(entry[3].prepared.attributes.priority or "", []).append(entry)
        taken: list[Any] = []
        exhausted = True
        seen: set[str] = set()
        for lane, most in lanes:
            if lane in seen:
                continue
            seen.add(lane)
            take = min(most, limit - len(taken))
            if take <= 0:
                exhausted = False
                continue
            found = per_lane.pop(lane, [])
            exhausted = exhausted and len(found) < take
            taken += found[:take]
        if exhausted and len(taken) < limit:
            rest = sorted((e for es in per_lane.values() for e in es), key=lambda t: t[:3])
            taken += rest[: limit - len(taken)]
        due = taken
    due = due[:limit]
    if max_bytes is not None:
        sizes = {t[3].id: t[3].prepared.size for t in due}
        within = set(messages_within(sizes.items(), max_bytes))
        due = [t for t in due if t[3].id in within]
    groups: dict[tuple[str, str], list[Any]] = {}
    for _, _, _, m, r in due:
        groups.setdefault((m.id, r.domain), []).append(r)
    return [
        (mid, domain, [r.address for r in sorted(rs, key=lambda r: r.position)])
        for (mid, domain), rs in groups.items()
    ]


def lease_checked(store: MemoryStore, *, now: datetime, **kwargs: Any) -> Lease | None:
    """``store.lease(now=now, **kwargs)``, its items checked against :func:`scanned_lease`."""
    with store._lock:
        expected = scanned_lease(
            store,
            now=now,
            limit=kwargs["limit"],
            lanes=kwargs.get("lanes"),
            busy=kwargs.get("busy", ()),
            per_destination=kwargs.get("per_destination"),
            max_bytes=kwargs.get("max_bytes"),
        )
    lease = store.lease(now=now, **kwargs)
    found = [
        (i.message_id, i.domain, [r.address for r in i.recipients])
        for i in (lease.items if lease is not None else ())
    ]
    assert found == expected
    return lease


def check_index(store: MemoryStore) -> None:
    """Every pending recipient of an unheld message has one current entry, at its due
    time, in the index (on its lane's heap, or set aside for a suspension), and no
    other entry is current."""
    with store._lock:
        index = store._due
        # A destination whose heap a sweep is moving is off _domains, still on its lane.
        dests = [*index._domains.values(), *([index._moving] if index._moving else [])]
        entries = [e for dest in dests for e in dest.entries]
        current = sorted(
            (id(e[5]), e[0])
            for e in entries
            if e[3] == e[5].due_gen and e[5].state in _PENDING and not e[4].held
            if store._messages.get(e[4].id) is e[4]
        )
        expected = sorted(
            (id(r), r.due_at())
            for m in store._messages.values()
            if not m.held
            for r in m.recipients.values()
            if r.state in _PENDING
        )
        # Each recipient counts its entries, current or stale (what a purge goes by),
        # and the index those of purged messages (what starts a sweep for them).
        filed: dict[int, int] = {}
        for e in entries:
            filed[id(e[5])] = filed.get(id(e[5]), 0) + 1
        for m in store._messages.values():
            for r in m.recipients.values():
                assert r.filed == filed.get(id(r), 0)
        assert index._gone == sum(store._messages.get(e[4].id) is not e[4] for e in entries)
        # Each destination with a current entry is on its lane, no later than its first
        # one, by one current head, unless its domain is parked for a suspension.
        parked = {dest for dests in index._parked.values() for dest in dests}
        heads = {}
        for lane, lane_heads in index._lanes.items():
            for head in lane_heads:
                dest = head[5]
                if dest.head == head[3]:
                    assert dest.lane == lane
                    assert index._domains.get((lane, dest.domain)) is dest or (
                        dest is index._moving
                    )
                    assert dest not in heads, f"{dest.domain} has two current heads"
                    heads[dest] = head
        for dest in dests:
            assert all(
                not dest.entries[k] < dest.entries[(k - 1) // 2]
                for k in range(1, len(dest.entries))
            )
            firsts = [e for e in dest.entries if e[3] == e[5].due_gen and e[5].state in _PENDING]
            firsts = [e for e in firsts if not e[4].held and store._messages.get(e[4].id) is e[4]]
            if not firsts or dest in parked:
                continue
            assert dest in heads, f"{dest.domain} has current entries and is on no lane"
            assert heads[dest][:3] <= min(firsts)[:3]
    assert current == expected


LANES = ["", "bulk", "transactional"]
DOMAINS = ["a.test", "b.test", "c.test"]
LEASE_LANES: list[list[tuple[str, int]] | None] = [
    None,
    [],
    [("transactional", 2), ("bulk", 1)],
    [("bulk", 3)],
    [("transactional", 1), ("transactional", 3), ("", 2)],
    [("transactional", 0), ("bulk", 2)],
]


def random_calls(rng: random.Random, store: MemoryStore, steps: int) -> Iterator[datetime]:
    """Random calls of the store's that change what is due; yields the clock after each."""
    now = NOW
    leases = []
    ids: list[str] = []
    for _ in range(steps):
        now += SECOND * rng.randint(0, 40)
        step = rng.randrange(13)
        if step <= 2 or not ids:
            recipients = [
                f"u{rng.randrange(9)}@{rng.choice(DOMAINS)}" for _ in range(rng.randint(1, 3))
            ]
            send_at = now + SECOND * rng.randint(-5, 60) if rng.random() < 0.3 else None
            message = mail(sorted(set(recipients)), rng.choice(LANES) or None, send_at)
            ids.append(store.enqueue(message, now=now, hold=rng.random() < 0.1))
        elif step == 3:
            lease = lease_checked(
                store,
                now=now,
                limit=rng.randint(1, 6),
                lease_for=SECOND * rng.randint(1, 90),
                lanes=rng.choice(LEASE_LANES),
                busy=[rng.choice(DOMAINS)] if rng.random() < 0.3 else (),
                per_destination=rng.choice([None, 1, 2]),
                max_bytes=rng.choice([None, None, 30, 60]),
                holder=rng.choice([None, HOLDER]),
            )
            if lease is not None:
                leases.append(lease)
        elif step == 4 and leases:
            lease = leases.pop(rng.randrange(len(leases)))
            state = rng.choice(list(RecipientState))
            later = now + SECOND * rng.randint(0, 60) if state in _PENDING else None
            if state is RecipientState.QUEUED:
                state = RecipientState.DEFERRED
            store.record(results_for(lease, state, at=now, next_attempt_at=later))
        elif step == 5 and leases:
            store.release(leases.pop(rng.randrange(len(leases))))
        elif step == 6 and leases:
            store.extend(rng.choice(leases), until=now + SECOND * rng.randint(-10, 90))
        elif step == 7 and leases:
            lease = leases.pop(rng.randrange(len(leases)))
            store.postpone(lease.items, until=now + SECOND * rng.randint(0, 60))
        elif step == 8:
            mid = rng.choice(ids)
            if rng.random() < 0.5:
                store.set_held(mid, rng.random() < 0.5)
            else:
                store.hold_many([mid, rng.choice(ids)], rng.random() < 0.5)
        elif step == 9:
            pick = rng.randrange(4)
            if pick == 0:
                store.retry(rng.choice(ids), now=now)
            elif pick == 1:
                store.retry_many([rng.choice(ids), rng.choice(ids)], now=now)
            elif pick == 2:
                store.retry_deferred(now=now)
            else:
                store.release_holder(HOLDER)
        elif step == 10:
            domain = rng.choice(DOMAINS)
            if rng.random() < 0.6:
                until = now + SECOND * rng.randint(1, 60) if rng.random() < 0.5 else None
                store.suspend(domain, now=now, until=until)
            else:
                store.resume(domain, now=now)
        elif step == 11:
            store.cancel(rng.choice(ids), now=now)
        else:
            store.purge(finished_before=now)
            ids = [mid for mid in ids if mid in store._messages]
        yield now


@pytest.mark.parametrize("seed", range(300))
def test_next_due_agrees_with_a_whole_scan(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if seed % 2:
        from mailstrom.stores import memory_due

        monkeypatch.setattr(memory_due, "_SWEEP_FLOOR", 4)  # stale entries swept often
        if seed % 4 == 1:  # and a few at a time, while the others go on
            monkeypatch.setattr(memory_due, "SWEEP_STEP", 2)
    rng = random.Random(seed)
    store = MemoryStore()
    for now in random_calls(rng, store, 300):
        check_index(store)
        check_next_due(store, now)
        check_next_due(store, now + SECOND * rng.randint(0, 120))

"""The event outbox (schema version 3), the same on every store: an event per recorded
result once enabled and none before, leasing like recipients, acknowledgement, release,
reading in id order, pruning."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest

from mailstrom.errors import InvalidArgument
from mailstrom.status import AttemptOutcome, RecipientState
from mailstrom.stores import RecipientResult, Store
from tests.contract.conftest import Backend
from tests.contract.support import LEASE_FOR, NOW, SECOND, attempt, lease_all, message, results_for


def test_no_events_until_enabled(store: Store) -> None:
    store.enqueue(message(), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    assert store.read_events() == []
    assert store.last_event_id() == 0
    assert store.lease_events(now=NOW, limit=10, lease_for=LEASE_FOR) is None


def test_an_after_past_any_event_id_reads_as_the_memory_store_does(store: Store) -> None:
    """``read_events(after=...)`` past a signed 64-bit integer, either way: the memory and
    PostgreSQL stores answered (nothing above the largest, everything above the
    smallest), SQLite raised StoreRefusedData, a store error, for a plain question."""
    store.enable_events()
    store.enqueue(message(), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    events = store.read_events()
    assert events
    assert store.read_events(after=2**63) == []
    assert store.read_events(after=2**64) == []
    assert store.read_events(after=-(2**63) - 1) == events
    assert store.read_events(after=-(2**70)) == events


@pytest.mark.parametrize("after", [True, 1.5, None, "0"], ids=["bool", "float", "none", "str"])
def test_an_after_that_is_no_event_id_is_refused_alike(store: Store, after: Any) -> None:
    """Was: ``read_events(after=True)`` was a StoreError (a passing trouble) from
    PostgreSQL and an id of 1 to the others; ``after=1.5`` was compared as it was, or
    its type an error, depending on the store. Every store refuses what is no whole
    number (InvalidArgument, ``after``), as it does such a ``limit``."""
    store.enable_events()
    store.enqueue(message(), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    with pytest.raises(InvalidArgument, match=r"^after: ") as raised:
        store.read_events(after=after)
    assert raised.value.argument == "after"


def test_an_event_per_recorded_result(store: Store) -> None:
    store.enable_events()
    mid = store.enqueue(message("alice@example.org", "bob@example.org"), now=NOW)
    lease = lease_all(store)
    results = results_for(lease, RecipientState.DELIVERED, only=["alice@example.org"])
    results += results_for(
        lease, RecipientState.DEFERRED, only=["bob@example.org"], next_attempt_at=NOW + SECOND
    )
    store.record_and_lease(results, now=NOW, limit=0, lease_for=LEASE_FOR)
    events = store.read_events()
    assert [(e.address, e.state, e.attempt) for e in events] == [
        ("alice@example.org", RecipientState.DELIVERED, 1),
        ("bob@example.org", RecipientState.DEFERRED, 1),
    ]
    first, second = events
    assert first.id < second.id == store.last_event_id()
    assert first.message_id == mid
    assert first.at == NOW
    assert first.reply is not None and (first.reply.code, first.reply.enhanced) == (250, "2.0.0")
    assert first.reply.text == "line one\nline two"
    assert (first.mx_host, first.ip, first.tls, first.uncertain) == (
        "mx1.example.org",
        "127.0.0.7",
        True,
        False,
    )
    assert first.next_attempt_at is None
    assert second.next_attempt_at == NOW + SECOND
    assert second.reply is not None and second.reply.code == 451

    # The second attempt's event counts it.
    store.record(results_for(lease_all(store, now=NOW + SECOND), RecipientState.FAILED))
    last = store.read_events(after=second.id)
    assert [(e.address, e.state, e.attempt) for e in last] == [
        ("bob@example.org", RecipientState.FAILED, 2)
    ]


def test_ignored_results_make_no_event(store: Store) -> None:
    store.enable_events()
    store.enqueue(message("alice@example.org"), now=NOW)
    lease = lease_all(store)
    stale = [
        RecipientResult(
            message_id=r.message_id,
            address=r.address,
            lease_token="not-the-lease",
            state=RecipientState.DELIVERED,
            attempt=attempt(AttemptOutcome.DELIVERED),
            ref=r.ref,
        )
        for r in results_for(lease, RecipientState.DELIVERED)
    ]
    assert store.record(stale) == []
    assert store.read_events() == []


def test_lease_ack_release_and_expiry(store: Store) -> None:
    store.enable_events()
    for i in range(5):
        store.enqueue(message(f"u{i}@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))

    first = store.lease_events(now=NOW, limit=2, lease_for=LEASE_FOR)
    assert first is not None
    second = store.lease_events(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert second is not None
    ids = [e.id for e in first.events] + [e.id for e in second.events]
    assert ids == sorted(ids) and len(set(ids)) == 5  # disjoint, oldest first
    assert store.lease_events(now=NOW, limit=10, lease_for=LEASE_FOR) is None

    assert store.ack_events(first, now=NOW) == 2
    assert store.ack_events(first, now=NOW) == 0  # once
    store.release_events(second)
    again = store.lease_events(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert again is not None
    assert [e.id for e in again.events] == [e.id for e in second.events]

    # Not acknowledged before the lease expires: leased again, and the old lease's
    # acknowledgement no longer counts.
    later = NOW + LEASE_FOR + SECOND
    retaken = store.lease_events(now=later, limit=10, lease_for=LEASE_FOR)
    assert retaken is not None
    assert [e.id for e in retaken.events] == [e.id for e in second.events]
    assert store.ack_events(again, now=later) == 0
    assert store.ack_events(retaken, now=later) == 3
    assert store.lease_events(now=later + LEASE_FOR * 2, limit=10, lease_for=LEASE_FOR) is None
    # Reading sees sent and unsent events alike.
    assert len(store.read_events(limit=100)) == 5
    assert len(store.read_events(after=ids[1], limit=2)) == 2


def test_ack_and_release_touch_only_the_events_of_the_batch_given(store: Store) -> None:
    """``ack_events`` marks "the batch's events" sent: a sender whose endpoint took only
    the first events of a lease acknowledges those (a batch of them, under the lease's
    token). SQLite and PostgreSQL marked every event under the token sent, those never
    sent too, which no lease then gave out again: lost. The memory store marked only
    those given; so do all now, and ``release_events`` gives back only those given."""
    store.enable_events()
    for i in range(4):
        store.enqueue(message(f"u{i}@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    batch = store.lease_events(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert batch is not None and len(batch.events) == 4
    taken = dataclasses.replace(batch, events=batch.events[:2])
    assert store.ack_events(taken, now=NOW) == 2
    released = dataclasses.replace(batch, events=batch.events[2:3])
    store.release_events(released)
    again = store.lease_events(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert again is not None
    assert [e.id for e in again.events] == [batch.events[2].id]
    # The last one is still under the first lease, and acknowledged by it.
    assert store.ack_events(batch, now=NOW) == 1
    assert store.ack_events(again, now=NOW) == 1
    later = NOW + LEASE_FOR * 2
    assert store.lease_events(now=later, limit=10, lease_for=LEASE_FOR) is None


def test_prune_removes_only_old_acknowledged_events(store: Store) -> None:
    store.enable_events()
    for i in range(3):
        store.enqueue(message(f"u{i}@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    batch = store.lease_events(now=NOW, limit=2, lease_for=LEASE_FOR)
    assert batch is not None
    store.ack_events(batch, now=NOW)
    assert store.prune_events(sent_before=NOW) == 0
    assert store.prune_events(sent_before=NOW + SECOND) == 2
    [left] = store.read_events()
    assert left.id not in {e.id for e in batch.events}
    # Ids keep growing after a prune.
    last = store.last_event_id()
    store.enqueue(message("late@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    assert store.last_event_id() > last


def test_prune_of_unsent_events_goes_by_their_attempt_time(store: Store) -> None:
    # Events on without a hook: nothing acknowledges them, so only this removes them.
    store.enable_events()
    later = NOW + 10 * SECOND
    store.enqueue(message("acked@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    batch = store.lease_events(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert batch is not None
    assert store.ack_events(batch, now=later) == 1
    store.enqueue(message("old@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    store.enqueue(message("new@example.org"), now=NOW)
    store.record(results_for(lease_all(store, now=later), RecipientState.DELIVERED, at=later))
    # Without unsent_before the unsent ones stay, however old.
    assert store.prune_events(sent_before=NOW) == 0
    assert store.prune_events(sent_before=NOW, unsent_before=later) == 1
    assert sorted(e.address for e in store.read_events()) == [
        "acked@example.org",
        "new@example.org",
    ]
    # The sent one goes by its sent time, the unsent by its attempt's.
    assert store.prune_events(sent_before=later + SECOND, unsent_before=later) == 1
    assert [e.address for e in store.read_events()] == ["new@example.org"]
    assert store.prune_events(sent_before=NOW, unsent_before=later + SECOND) == 1
    assert store.read_events() == []


def test_events_survive_reopening(store_backend: Backend) -> None:
    store_backend.require_durable()
    store = store_backend.open()
    store.enable_events()
    store.enqueue(message("alice@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    store.close()
    reopened = store_backend.open()
    batch = reopened.lease_events(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert batch is not None
    assert [e.address for e in batch.events] == ["alice@example.org"]


def test_concurrent_senders_never_share_an_event(store_backend: Backend) -> None:
    store_backend.require_durable()
    writer = store_backend.open()
    writer.enable_events()
    for i in range(40):
        writer.enqueue(message(f"u{i}@example.org"), now=NOW)
    writer.record(results_for(lease_all(writer), RecipientState.DELIVERED))
    stores = [store_backend.open() for _ in range(4)]
    taken: list[list[int]] = [[] for _ in stores]

    def drain(i: int) -> None:
        while (batch := stores[i].lease_events(now=NOW, limit=3, lease_for=LEASE_FOR)) is not None:
            taken[i].extend(e.id for e in batch.events)
            stores[i].ack_events(batch, now=NOW)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [i for ids in taken for i in ids]
    assert len(every) == len(set(every)) == 40


def test_unsent_events_counts_what_no_sender_acknowledged(store: Store) -> None:
    """A hook's backlog (``mailstrom_hook_backlog_events``): leased or not, an event counts
    until acknowledged, a released one again; acknowledged ones do not, pruned or kept."""
    assert store.unsent_events() == 0
    store.enable_events()
    for i in range(4):
        store.enqueue(message(f"u{i}@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    assert store.unsent_events() == 4
    batch = store.lease_events(now=NOW, limit=3, lease_for=LEASE_FOR)
    assert batch is not None
    assert store.unsent_events() == 4  # leased is not sent
    store.ack_events(dataclasses.replace(batch, events=batch.events[:2]), now=NOW)
    assert store.unsent_events() == 2
    store.release_events(batch)
    assert store.unsent_events() == 2
    store.prune_events(sent_before=NOW + SECOND)
    assert store.unsent_events() == 2


def test_a_cancel_writes_one_event_per_recipient_it_finished(store: Store) -> None:
    """Was: ``cancel``/``cancel_many`` wrote no event, so a hook receiver or an events
    reader never saw a cancelled recipient's end (it stayed queued or deferred for them
    while the status said failed). Each recipient the cancel fails gets one ``failed``
    event with the error "cancelled", at the cancel's time, its attempts as they were;
    one finished before, or cancelled twice, gets none."""
    store.enable_events()
    first = store.enqueue(message("alice@example.org", "bob@example.org"), now=NOW)
    lease = lease_all(store)
    store.record(
        results_for(lease, RecipientState.DELIVERED, only=["alice@example.org"])
        + results_for(
            lease, RecipientState.DEFERRED, only=["bob@example.org"], next_attempt_at=NOW + SECOND
        )
    )
    second = store.enqueue(message("carol@example.org"), now=NOW)
    third = store.enqueue(message("dave@example.org"), now=NOW)
    recorded = store.last_event_id()
    later = NOW + 10 * SECOND

    assert store.cancel(first, now=later) == 1
    assert store.cancel_many([second, third], now=later) == 2
    assert store.cancel(first, now=later + SECOND) == 0
    assert store.cancel_many([second, third], now=later + SECOND) == 0

    events = store.read_events(after=recorded)
    assert sorted((e.message_id, e.address, e.state, e.attempt) for e in events) == sorted(
        [
            (first, "bob@example.org", RecipientState.FAILED, 1),
            (second, "carol@example.org", RecipientState.FAILED, 0),
            (third, "dave@example.org", RecipientState.FAILED, 0),
        ]
    )
    for e in events:
        assert (e.error, e.reply, e.reason_class, e.at) == ("cancelled", None, None, later)
        assert e.next_attempt_at is None
    assert store.last_event_id() == events[-1].id


def test_a_cancel_without_events_enabled_writes_none(store: Store) -> None:
    mid = store.enqueue(message(), now=NOW)
    assert store.cancel(mid, now=NOW) == 2
    assert store.read_events() == []


def test_a_delivery_that_wins_over_a_cancel_is_the_last_event(store: Store) -> None:
    """A transaction on the wire when the cancel came: the server's acceptance is recorded
    after the cancel's event, so a receiver keeping the highest id sees it delivered."""
    store.enable_events()
    store.enqueue(message("alice@example.org"), now=NOW)
    lease = lease_all(store)
    assert lease.items
    store.cancel(lease.items[0].message_id, now=NOW)
    store.record(results_for(lease, RecipientState.DELIVERED))
    assert [(e.state, e.error) for e in store.read_events()] == [
        (RecipientState.FAILED, "cancelled"),
        (RecipientState.DELIVERED, None),
    ]

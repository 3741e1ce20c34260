"""Contract: the operator's tools (schema version 10): short ids, the pending view and
its count, bulk changes, purge by state, the queue's shape, suspended destinations."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from mailstrom.bounds import MAX_INTEGER
from mailstrom.errors import AmbiguousMessageId, InvalidArgument, UnknownMessage
from mailstrom.message.attributes import QueueAttributes
from mailstrom.status import RecipientState
from mailstrom.stores import QueueFilter, Store
from mailstrom.stores.operator import AGE_EDGES, FINISHED_STATES, PENDING_STATES

from .support import LEASE_FOR, NOW, attempt, lease_all, leased_addresses, message, results_for

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
PENDING = QueueFilter(states=PENDING_STATES)


def _settle(
    store: Store, state: RecipientState, *, only: list[str] | None = None, now: datetime = NOW
) -> None:
    lease = lease_all(store, now=now)
    store.record(results_for(lease, state, next_attempt_at=NOW + HOUR, only=only))


# --- ids -----------------------------------------------------------------------------------


def test_a_unique_prefix_resolves_and_an_ambiguous_one_lists_candidates(store: Store) -> None:
    ids = [store.enqueue(message("a@example.org"), now=NOW) for _ in range(3)]
    for mid in ids:
        assert store.resolve_id(mid) == mid
        assert store.resolve_id(mid[:-2]) == mid  # 80 random bits: unique long before
        assert store.resolve_id(mid[:-2].upper()) == mid
    # Ids begin with their millisecond: enqueued together, they share the first digits.
    common = ids[0][:4]
    assert all(mid.startswith(common) for mid in ids)
    with pytest.raises(AmbiguousMessageId) as raised:
        store.resolve_id(common)
    assert sorted(raised.value.candidates) == sorted(ids)
    assert isinstance(raised.value, UnknownMessage)
    for bad in ("f" * 32, "xyz", "", "0" * 33, ids[0] + "0"):
        with pytest.raises(UnknownMessage):
            store.resolve_id(bad)


def test_resolving_reports_at_most_ten_candidates(store: Store) -> None:
    ids = store.enqueue_many([message("a@example.org")] * 12, now=NOW)
    with pytest.raises(AmbiguousMessageId) as raised:
        store.resolve_id(ids[0][:2])
    assert len(raised.value.candidates) == 10 and raised.value.more


# --- the pending view and counts -----------------------------------------------------------


def test_pending_view_and_count(store: Store) -> None:
    delivered = store.enqueue(message("a@example.org"), now=NOW)
    _settle(store, RecipientState.DELIVERED)
    deferred = store.enqueue(message("b@example.org"), now=NOW + MINUTE)
    _settle(store, RecipientState.DEFERRED, now=NOW + MINUTE)
    queued = store.enqueue(message("c@other.org"), now=NOW + 2 * MINUTE)
    later = NOW + 3 * MINUTE

    assert [m.id for m in store.query(now=later, where=PENDING)] == [queued, deferred]
    assert store.count(now=later, where=PENDING, cap=100) == 2
    assert store.count(now=later, where=PENDING, cap=1) == 1
    assert store.count(now=later, where=QueueFilter(), cap=100) == 3
    deferred_only = QueueFilter(states=frozenset({RecipientState.DEFERRED}))
    assert [m.id for m in store.query(now=later, where=deferred_only)] == [deferred]
    assert store.count(now=later, where=deferred_only, cap=100) == 1
    finished = QueueFilter(states=frozenset({RecipientState.DELIVERED, RecipientState.FAILED}))
    assert [m.id for m in store.query(now=later, where=finished)] == [delivered]
    by_domain = QueueFilter(states=PENDING_STATES, domain="OTHER.org")
    assert [m.id for m in store.query(now=later, where=by_domain)] == [queued]
    assert store.count(now=later, where=by_domain, cap=100) == 1
    old = QueueFilter(states=PENDING_STATES, older_than=90 * timedelta(seconds=1))
    assert [m.id for m in store.query(now=later, where=old)] == [deferred]
    assert store.count(now=later, where=old, cap=100) == 1
    limited = QueueFilter(states=PENDING_STATES, limit=1)
    assert [m.id for m in store.query(now=later, where=limited)] == [queued]
    # The last reason and next attempt come with the listing.
    [row] = store.query(now=later, where=deferred_only)
    assert row.recipients[0].next_attempt_at == NOW + HOUR
    assert row.recipients[0].reply is not None and row.recipients[0].reply.code == 451


def test_the_pending_view_picks_the_newest_as_every_view_does(store: Store) -> None:
    """The SQLite pending view chose its ``limit`` messages by enqueue order, every other
    view (and store) by enqueue time: after the clock was stepped back, a message queued
    earlier but stamped later was left out of the pending view's newest, not of the
    others."""
    stamped_later = store.enqueue(message("a@example.org"), now=NOW + HOUR)
    stepped_back = store.enqueue(message("b@example.org"), now=NOW)
    newest = store.enqueue(message("c@example.org"), now=NOW + 2 * HOUR)
    later = NOW + 3 * HOUR
    for where in (
        QueueFilter(limit=2),
        QueueFilter(states=PENDING_STATES, limit=2),
        QueueFilter(state=RecipientState.QUEUED, limit=2),
        QueueFilter(states=PENDING_STATES, domain="example.org", limit=2),
        QueueFilter(states=PENDING_STATES, held=False, limit=2),
    ):
        assert [m.id for m in store.query(now=later, where=where)] == [newest, stamped_later]
    every = [m.id for m in store.query(now=later, where=PENDING)]
    assert every == [newest, stamped_later, stepped_back]


def test_select_ids_lists_the_ids_query_lists_in_its_order(store: Store) -> None:
    """The bulk changes by filter (``cancel --domain x``, ``ms.cancel_many(QueueFilter(...))``)
    choose their messages by ``select_ids``: for every filter the ids ``query`` lists, in
    its order, and no more than its limit."""
    delivered = store.enqueue(message("a@example.org"), now=NOW)
    _settle(store, RecipientState.DELIVERED)
    deferred = store.enqueue(message("b@example.org"), now=NOW + MINUTE)
    _settle(store, RecipientState.DEFERRED, now=NOW + MINUTE)
    tagged = dataclasses.replace(message("c@other.org"), attributes=QueueAttributes(tags=("news",)))
    queued = store.enqueue(tagged, now=NOW + 2 * MINUTE)
    held = store.enqueue(message("d@other.org"), now=NOW + 3 * MINUTE, hold=True)
    later = NOW + 4 * MINUTE
    for where, expected in (
        (QueueFilter(), [held, queued, deferred, delivered]),
        (QueueFilter(limit=2), [held, queued]),
        (QueueFilter(limit=0), []),
        (PENDING, [held, queued, deferred]),
        (QueueFilter(states=PENDING_STATES, held=False), [queued, deferred]),
        (QueueFilter(held=True), [held]),
        (QueueFilter(state=RecipientState.QUEUED), [held, queued]),
        (QueueFilter(states=frozenset({RecipientState.DELIVERED})), [delivered]),
        (QueueFilter(states=frozenset()), []),
        (QueueFilter(domain="OTHER.org"), [held, queued]),
        (QueueFilter(states=PENDING_STATES, domain="example.org"), [deferred]),
        (QueueFilter(tag="news"), [queued]),
        (QueueFilter(older_than=150 * timedelta(seconds=1)), [deferred, delivered]),
        (QueueFilter(states=PENDING_STATES, older_than=150 * timedelta(seconds=1)), [deferred]),
    ):
        assert [m.id for m in store.query(now=later, where=where)] == expected, where
        assert store.select_ids(now=later, where=where) == expected, where


def test_the_mail_of_a_domain_in_each_state(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    both = store.enqueue(message("a@example.org", "b@other.org"), now=NOW)
    deferred = store.enqueue(message("c@example.org", "d@other.org"), now=NOW + MINUTE)
    failed = store.enqueue(message("e@example.org"), now=NOW + 2 * MINUTE)
    store.enqueue(message("f@other.org"), now=NOW + 3 * MINUTE)  # delivered, elsewhere
    lease = lease_all(store, now=NOW + 3 * MINUTE)
    queued = store.enqueue(message("g@other.org", "h@example.org"), now=NOW + 4 * MINUTE)
    delivered = ["a@example.org", "b@other.org", "c@example.org", "f@other.org"]
    store.record(results_for(lease, RecipientState.DELIVERED, only=delivered))
    store.record(
        results_for(
            lease, RecipientState.DEFERRED, next_attempt_at=NOW + HOUR, only=["d@other.org"]
        )
    )
    store.record(results_for(lease, RecipientState.FAILED, only=["e@example.org"]))
    s = RecipientState
    expected = {
        frozenset({s.DELIVERED}): [both],
        frozenset({s.FAILED}): [failed],
        frozenset({s.DEFERRED}): [deferred],
        frozenset({s.QUEUED}): [queued],
        PENDING_STATES: [queued, deferred],
        FINISHED_STATES: [failed, both],
        frozenset({s.DELIVERED, s.DEFERRED}): [deferred, both],
        None: [queued, failed, deferred, both],
        frozenset(): [],
    }
    later = NOW + HOUR
    # On SQLite, from the domain's recipients and by walking the queue (a domain with
    # much mail).
    from mailstrom.stores import sqlite_operator

    for few in (True, False):
        monkeypatch.setattr(sqlite_operator, "few_at_domain", lambda *_, few=few: few)
        for states, ids in expected.items():
            where = QueueFilter(states=states, domain="Example.ORG")
            assert [m.id for m in store.query(now=later, where=where)] == ids, (few, states)
            assert store.select_ids(now=later, where=where) == ids, (few, states)
            assert store.count(now=later, where=where, cap=100) == len(ids), (few, states)


# --- bulk changes --------------------------------------------------------------------------


def test_bulk_hold_release_retry_cancel(store: Store) -> None:
    first = store.enqueue(message("a@example.org"), now=NOW)
    second = store.enqueue(message("b@example.org", "c@example.org"), now=NOW)
    assert store.hold_many([first, second, "0" * 32], True) == 2
    assert store.hold_many([first], True) == 0  # already held
    assert store.lease(now=NOW, limit=10, lease_for=LEASE_FOR) is None
    assert store.hold_many([second], False) == 1
    assert sorted(leased_addresses(lease_all(store))) == ["b@example.org", "c@example.org"]

    third = store.enqueue(message("d@example.org"), now=NOW)
    _settle(store, RecipientState.DEFERRED)
    soon = NOW + MINUTE
    assert store.retry_many([third, first], now=soon) == 2  # held ones count too
    assert store.status(third).recipients[0].next_attempt_at == soon
    assert store.cancel_many([first, third, third], now=soon) == 2
    assert store.status(first).recipients[0].state is RecipientState.FAILED
    assert store.status(third).recipients[0].error == "cancelled"


def test_holding_a_finished_message_changes_nothing(store: Store) -> None:
    """A hold keeps pending recipients from being leased: a message with none (delivered,
    failed, cancelled) has nothing to hold. It was marked held all the same and counted
    as changed, and its status showed a finished message held."""
    delivered = store.enqueue(message("a@example.org"), now=NOW)
    _settle(store, RecipientState.DELIVERED)
    cancelled = store.enqueue(message("b@example.org"), now=NOW)
    assert store.cancel(cancelled, now=NOW) == 1
    partly = store.enqueue(message("c@example.org", "d@example.org"), now=NOW)
    _settle(store, RecipientState.DELIVERED, only=["c@example.org"])

    assert store.hold_many([delivered, cancelled, partly], True) == 1
    store.set_held(delivered, True)
    assert [store.status(mid).held for mid in (delivered, cancelled, partly)] == [
        False,
        False,
        True,
    ]
    assert [m.id for m in store.query(now=NOW, where=QueueFilter(held=True))] == [partly]
    # One that finished while held is not held (test_held_finished.py): a release
    # clears its flag, and counts nothing, as nothing waited for it.
    assert store.cancel(partly, now=NOW) == 1
    assert not store.status(partly).held
    assert store.hold_many([partly], True) == 0
    assert store.hold_many([partly], False) == 0
    assert not store.status(partly).held


def test_purge_listed_and_by_state(store: Store) -> None:
    delivered = store.enqueue(message("a@example.org"), now=NOW)
    failed = store.enqueue(message("b@example.org"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    store.record(results_for(lease, RecipientState.FAILED, only=["b@example.org"]))
    pending = store.enqueue(message("c@example.org"), now=NOW)
    later = NOW + HOUR

    assert store.purge_many([pending], finished_before=later) == 0  # never pending mail
    assert store.purge_many([delivered, failed], finished_before=NOW) == 0  # too recent
    assert store.purge_state(finished_before=later, state=RecipientState.FAILED) == 1
    with pytest.raises(UnknownMessage):
        store.status(failed)
    assert store.status(delivered).state is RecipientState.DELIVERED
    assert store.purge_state(finished_before=later, state=RecipientState.DELIVERED) == 1
    assert store.status(pending).state is RecipientState.QUEUED

    again = store.enqueue(message("d@example.org"), now=NOW)
    _settle(store, RecipientState.DELIVERED, only=["d@example.org"])
    assert store.purge_many([again, pending]) == 1


@pytest.mark.parametrize("state", [None, RecipientState.FAILED])
def test_a_purge_of_many_batches_deletes_exactly_the_old_finished_messages(
    store: Store, state: RecipientState | None
) -> None:
    """A purge works through the queue a batch at a time (500 messages on SQLite and
    PostgreSQL): over several, it deletes every message finished before the cutoff and
    none pending or finished after it, wherever they fall among the batches."""
    ids = store.enqueue_many([message(f"r{i}@example.org") for i in range(1_300)], now=NOW)
    pending, recent, old = ids[::5], ids[1::5], [m for i, m in enumerate(ids) if i % 5 > 1]
    assert store.cancel_many(old, now=NOW) == len(old)
    assert store.cancel_many(recent, now=NOW + 2 * HOUR) == len(recent)
    if state is None:
        assert store.purge(finished_before=NOW + HOUR) == len(old)
    else:
        assert store.purge_state(finished_before=NOW + HOUR, state=RecipientState.DELIVERED) == 0
        assert store.purge_state(finished_before=NOW + HOUR, state=state) == len(old)
    left = set(store.select_ids(now=NOW + 3 * HOUR, where=QueueFilter(limit=2_000)))
    assert left == {*pending, *recent}


def test_a_status_says_when_each_recipient_became_final(store: Store) -> None:
    """A purge chooses by when recipients became final, which a status did not say: a
    dry run judged by the last attempt, and listed mail queued long ago and cancelled just
    now, which purge then left alone."""
    delivered = store.enqueue(message("a@example.org"), now=NOW)
    cancelled = store.enqueue(message("b@example.org"), now=NOW)
    pending = store.enqueue(message("c@example.org"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    store.release(lease)
    assert store.cancel_many([cancelled], now=NOW + HOUR) == 1
    finished = {m.id: [r.finished_at for r in m.recipients] for m in store.query(now=NOW)}
    assert finished == {delivered: [NOW], cancelled: [NOW + HOUR], pending: [None]}
    assert store.status(cancelled).recipients[0].finished_at == NOW + HOUR
    assert store.status(cancelled).recipients[0].last_attempt_at is None


def test_purge_listed_in_a_state(store: Store) -> None:
    delivered = store.enqueue(message("a@example.org"), now=NOW)
    failed = store.enqueue(message("b@example.org"), now=NOW)
    mixed = store.enqueue(message("c@example.org", "d@example.org"), now=NOW)
    lease = lease_all(store)
    store.record(
        results_for(lease, RecipientState.DELIVERED, only=["a@example.org", "c@example.org"])
    )
    store.record(results_for(lease, RecipientState.FAILED, only=["b@example.org", "d@example.org"]))
    later = NOW + HOUR
    every = [delivered, failed, mixed]
    assert store.purge_many(every, finished_before=NOW, state=RecipientState.FAILED) == 0
    assert store.purge_many(every, finished_before=later, state=RecipientState.DELIVERED) == 1
    assert store.purge_many(every, state=RecipientState.DELIVERED) == 0
    assert store.status(failed).state is RecipientState.FAILED
    assert store.purge_many(every, state=RecipientState.FAILED) == 2


@pytest.mark.parametrize("state", [RecipientState.QUEUED, RecipientState.DEFERRED])
def test_a_purge_in_a_state_no_finished_message_is_in_deletes_nothing(
    store: Store, state: RecipientState
) -> None:
    """A purge in a state deletes the finished messages whose derived state it is: in a
    pending one, none. SQLite and PostgreSQL took every state but DELIVERED for FAILED
    and deleted the failed messages, which the memory store kept."""
    delivered = store.enqueue(message("a@example.org"), now=NOW)
    failed = store.enqueue(message("b@example.org"), now=NOW)
    mixed = store.enqueue(message("c@example.org", "d@example.org"), now=NOW)
    lease = lease_all(store)
    store.record(
        results_for(lease, RecipientState.DELIVERED, only=["a@example.org", "c@example.org"])
    )
    store.record(results_for(lease, RecipientState.FAILED, only=["b@example.org", "d@example.org"]))
    every = [delivered, failed, mixed]
    assert store.purge_many(every, finished_before=NOW + HOUR, state=state) == 0
    assert store.purge_many(every, state=state) == 0
    assert store.purge_state(finished_before=NOW + HOUR, state=state) == 0
    assert [store.status(mid).state for mid in every] == [
        RecipientState.DELIVERED,
        RecipientState.FAILED,
        RecipientState.FAILED,
    ]


# --- the shape -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "domain",
    # With its trailing dot (the root), as DNS and `suspend` take it: found nothing, so
    # `cancel --domain example.org.` said "0 recipients cancelled" of a full queue.
    ["bücher.example", "Bücher.Example", "XN--BCHER-KVA.example", "xn--bcher-kva.example."],
)
def test_a_filter_domain_finds_recipients_however_the_domain_is_written(
    store: Store, domain: str
) -> None:
    # Recipients' domains are stored as A-labels: QueueFilter(domain="bücher.example")
    # found nothing, so a release, retry or cancel by domain silently did nothing.
    mid = store.enqueue(message("bob@xn--bcher-kva.example"), now=NOW)
    where = QueueFilter(domain=domain)
    assert [m.id for m in store.query(now=NOW, where=where)] == [mid]
    assert store.count(now=NOW, where=where, cap=100) == 1


@pytest.mark.parametrize(
    "domain", ["[IPv6:2001:DB8:0::1]", "[ipv6:2001:0db8::0001]", "[IPv6:2001:db8:0:0:0:0:0:1]"]
)
def test_a_filter_domain_finds_an_address_literal_however_it_is_written(
    store: Store, domain: str
) -> None:
    # prepare() stores bob@[IPv6:2001:DB8:0::1] as bob@[ipv6:2001:db8::1], the address in
    # its shortest form: a filter only lower-cased found nothing unless typed so.
    mid = store.enqueue(message("bob@[ipv6:2001:db8::1]"), now=NOW)
    where = QueueFilter(domain=domain)
    assert [m.id for m in store.query(now=NOW, where=where)] == [mid]
    assert store.count(now=NOW, where=where, cap=100) == 1


def test_shape_counts_pending_recipients_by_domain_and_age(store: Store) -> None:
    now = NOW + 200 * MINUTE
    store.enqueue(message("a@example.org", "b@example.org", "c@other.org"), now=NOW)
    # Enqueued in time order, as with one clock (the SQLite store counts on it).
    store.enqueue(message("e@example.org"), now=now - 10 * MINUTE)  # on an edge: above it
    store.enqueue(message("d@example.org"), now=now - 7 * MINUTE)
    store.enqueue(message("f@example.org"), now=now - MINUTE)
    done = store.enqueue(message("g@done.org"), now=now - MINUTE)
    lease = store.lease(now=now, limit=100, lease_for=LEASE_FOR)
    assert lease is not None
    store.record(results_for(lease, RecipientState.DELIVERED, only=["g@done.org"]))
    store.release(lease)
    assert store.status(done).state is RecipientState.DELIVERED

    rows = store.shape(now=now, edges=AGE_EDGES)
    assert [r.domain for r in rows] == ["example.org", "other.org"]
    assert rows[0].counts == (1, 1, 1, 0, 0, 0, 2)
    assert rows[1].counts == (0, 0, 0, 0, 0, 0, 1)
    assert rows[0].total == 5


@pytest.mark.parametrize("limit", [MAX_INTEGER + 1, 2**64], ids=["past-bigint", "huge"])
def test_a_limit_no_store_can_take_is_refused_alike(store: Store, limit: int) -> None:
    """A limit past a signed 64-bit integer was taken by the memory store (any slice
    will do) and refused by SQLite and PostgreSQL as StoreRefusedData, a store error a
    caller retries or reports as the store's fault. Each store refuses it as
    InvalidArgument (a ValueError) before reading; a negative limit stays none."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    for call in (
        lambda: store.recent(limit),
        lambda: store.read_events(limit=limit),
        lambda: store.lease_events(now=NOW, limit=limit, lease_for=LEASE_FOR),
        lambda: store.tls_broken(now=NOW, limit=limit),
        lambda: store.list_suppressions(limit=limit),
        lambda: store.message_ids_for_header("<x@example.org>", limit=limit),
        lambda: store.lease(now=NOW, limit=limit, lease_for=LEASE_FOR),
    ):
        with pytest.raises(InvalidArgument, match="limit"):
            call()
    assert store.recent(-1) == []
    assert [m.id for m in store.recent(MAX_INTEGER)] == [mid]
    assert store.read_events(limit=MAX_INTEGER) == []


def test_held_counts_only_held_messages_still_waiting(store: Store) -> None:
    """A held message that was cancelled (or held after it finished) kept its held flag,
    and stats() counted it held for good: the held-messages gauge and ``mailstrom
    status`` showed mail on hold that no ``release --all`` (pending, held) could select.
    Only a held message with a pending recipient counts."""
    waiting = store.enqueue(message("a@example.org"), now=NOW, hold=True)
    cancelled = store.enqueue(message("b@example.org", "c@example.org"), now=NOW, hold=True)
    assert store.stats().held == 2
    assert store.cancel(cancelled, now=NOW) == 2
    assert not store.status(cancelled).held  # nor reported held (test_held_finished.py)
    assert store.stats().held == 1
    store.set_held(waiting, False)
    assert store.stats().held == 0


# --- the message ---------------------------------------------------------------------------


def test_message_data_is_the_stored_bytes(store: Store) -> None:
    mid = store.enqueue(message("a@example.org", data=b"Subject: x\r\n\r\nbody\r\n"), now=NOW)
    assert store.message_data(mid) == b"Subject: x\r\n\r\nbody\r\n"
    with pytest.raises(UnknownMessage):
        store.message_data("0" * 32)


# --- suspended destinations ----------------------------------------------------------------


def test_a_suspended_domain_is_not_leased_until_resumed(store: Store) -> None:
    mid = store.enqueue(message("a@example.org", "b@other.org"), now=NOW)
    store.suspend("example.org", now=NOW)
    assert [s.domain for s in store.suspensions(now=NOW)] == ["example.org"]
    lease = lease_all(store)
    assert leased_addresses(lease) == ["b@other.org"]
    store.record(results_for(lease, RecipientState.DELIVERED))
    assert store.lease(now=NOW, limit=10, lease_for=LEASE_FOR) is None
    assert store.next_due(now=NOW) is None  # nothing the worker may take
    status = store.status(mid).recipient("a@example.org")
    assert status.state is RecipientState.QUEUED and status.attempts == 0

    assert store.resume("example.org", now=NOW) is True
    assert store.resume("example.org", now=NOW) is False
    assert store.suspensions(now=NOW) == []
    assert store.next_due(now=NOW) == NOW
    assert leased_addresses(lease_all(store)) == ["a@example.org"]


def test_a_suspended_address_literal_is_not_leased(store: Store) -> None:
    # The form the facade's suspend() keeps a literal destination in, as prepare()
    # stores the recipient's domain.
    store.enqueue(message("a@[ipv6:2001:db8::1]", "b@[192.0.2.1]", "c@other.org"), now=NOW)
    store.suspend("[ipv6:2001:db8::1]", now=NOW)
    store.suspend("[192.0.2.1]", now=NOW)
    assert leased_addresses(lease_all(store)) == ["c@other.org"]


def test_extend_does_not_count_the_recipients_of_a_destination_suspended_since(
    store: Store,
) -> None:
    """A worker's heartbeat gives back the work it has fewer of than it leased: a
    suspended destination's recipients were counted, so a worker sent the rest of its
    lease to a destination the operator had suspended. They are extended still (one may
    be on the wire), not counted; a timed suspension counts until a lease or next_due
    past its end has ended it."""
    first = store.enqueue(message("a@example.org", "b@other.org"), now=NOW)
    second = store.enqueue(message("c@example.org"), now=NOW)
    lease = lease_all(store)
    later = NOW + 10 * LEASE_FOR
    store.suspend("example.org", now=NOW)
    assert store.extend(lease, until=later) == 1
    # Still extended: nothing of it is leased again meanwhile, once resumed.
    assert store.resume("example.org", now=NOW) is True
    assert store.lease(now=NOW + 2 * LEASE_FOR, limit=10, lease_for=LEASE_FOR) is None
    assert store.extend(lease, until=later) == 3
    store.suspend("example.org", now=NOW, until=NOW + HOUR)
    assert store.extend(lease, until=later) == 1
    assert store.next_due(now=NOW + HOUR) == later  # the suspension has ended there
    assert store.extend(lease, until=later) == 3
    # Given back, they wait unattempted for the suspension's end.
    store.suspend("example.org", now=NOW)
    store.release(lease)
    assert leased_addresses(lease_all(store)) == ["b@other.org"]
    for mid, address in ((first, "a@example.org"), (second, "c@example.org")):
        waiting = store.status(mid).recipient(address)
        assert (waiting.state, waiting.attempts, waiting.leased) == (
            RecipientState.QUEUED,
            0,
            False,
        )


def test_a_timed_suspension_ends_by_itself(store: Store) -> None:
    store.enqueue(message("a@example.org"), now=NOW)
    store.suspend("example.org", now=NOW, until=NOW + HOUR)
    store.suspend("example.org", now=NOW, until=NOW + 2 * HOUR)  # replaces the end
    [suspension] = store.suspensions(now=NOW)
    assert suspension.until == NOW + 2 * HOUR
    assert store.lease(now=NOW + HOUR, limit=10, lease_for=LEASE_FOR) is None
    assert store.next_due(now=NOW) == NOW + 2 * HOUR  # when the worker should look again
    assert store.suspensions(now=NOW + 2 * HOUR) == []
    assert leased_addresses(lease_all(store, now=NOW + 2 * HOUR)) == ["a@example.org"]


@pytest.mark.parametrize("lanes", [None, (("", 10),)], ids=["no-lanes", "lanes"])
def test_the_first_lease_after_a_timed_suspension_ends_takes_its_recipients(
    store: Store, lanes: tuple[tuple[str, int], ...] | None
) -> None:
    """Was: PostgreSQL keeps a suspended destination's recipients out of its due index,
    and a lease that found other mail due at the suspension's end only noted that it had
    ended: it left the longer-due recipients of that destination for the next lease
    (limit to spare, oldest due not first), where the memory store and SQLite leased
    them with the rest, oldest first, as they had been due since before."""
    store.enqueue(message("a@example.org"), now=NOW)
    store.suspend("example.org", now=NOW, until=NOW + HOUR)
    store.enqueue(message("b@other.org"), now=NOW + MINUTE)
    later = NOW + HOUR
    assert store.suspensions(now=later) == []
    lease = store.lease(now=later, limit=10, lease_for=LEASE_FOR, lanes=lanes)
    assert leased_addresses(lease) == ["a@example.org", "b@other.org"]
    assert store.lease(now=later, limit=10, lease_for=LEASE_FOR, lanes=lanes) is None
    assert (
        lease is not None and len(store.record(results_for(lease, RecipientState.DELIVERED))) == 2
    )


def test_mail_queued_held_or_released_during_a_suspension_waits_for_its_end(
    store: Store,
) -> None:
    """A store may keep a suspended destination's recipients out of its due index (the
    SQLite store does): what is queued, held and released meanwhile waits all the same,
    and all of it is due again when the suspension is resumed or runs out."""
    store.suspend("example.org", now=NOW)
    store.suspend("timed.org", now=NOW, until=NOW + HOUR)
    first = store.enqueue(message("a@example.org", "b@other.org"), now=NOW)
    second = store.enqueue(message("c@example.org", "d@timed.org"), now=NOW)
    store.set_held(first, True)
    store.set_held(first, False)
    assert store.hold_many([second], True) == 1
    assert store.hold_many([second], False) == 1
    lease = lease_all(store)
    assert leased_addresses(lease) == ["b@other.org"]
    store.record(results_for(lease, RecipientState.DELIVERED))
    assert store.lease(now=NOW + MINUTE, limit=10, lease_for=LEASE_FOR) is None
    assert store.next_due(now=NOW + MINUTE) == NOW + HOUR
    later = NOW + HOUR
    assert store.next_due(now=later) == NOW  # due since it was queued: the end is past
    assert leased_addresses(lease_all(store, now=later)) == ["d@timed.org"]
    store.set_held(second, True)  # held now: stays out after the resume
    assert store.resume("example.org", now=later) is True
    assert store.next_due(now=later) == NOW
    assert leased_addresses(lease_all(store, now=later)) == ["a@example.org"]
    store.set_held(second, False)
    assert leased_addresses(lease_all(store, now=later)) == ["c@example.org"]


def test_a_suspension_that_has_ended_is_not_resumed(store: Store) -> None:
    """resume() said True for a timed suspension past its end, one no longer listed or
    heeded: `mailstrom resume` printed "resumed" where its docs promise exit 66."""
    store.suspend("example.org", now=NOW, until=NOW + HOUR)
    assert store.resume("example.org", now=NOW + HOUR) is False
    assert store.resume("example.org", now=NOW) is False  # its row went too
    store.suspend("example.org", now=NOW, until=NOW + HOUR)
    assert store.resume("example.org", now=NOW + HOUR - MINUTE) is True


def test_a_message_with_queued_and_deferred_recipients_is_deferred(store: Store) -> None:
    mixed = store.enqueue(message("a@example.org", "b@other.org"), now=NOW)
    _settle(store, RecipientState.DEFERRED, only=["a@example.org"])
    queued = store.enqueue(message("c@example.org"), now=NOW + MINUTE)
    later = NOW + 2 * MINUTE
    only_queued = QueueFilter(states=frozenset({RecipientState.QUEUED}))
    only_deferred = QueueFilter(states=frozenset({RecipientState.DEFERRED}))
    assert [m.id for m in store.query(now=later, where=only_queued)] == [queued]
    assert store.count(now=later, where=only_queued, cap=10) == 1
    assert [m.id for m in store.query(now=later, where=only_deferred)] == [mixed]
    assert store.count(now=later, where=only_deferred, cap=10) == 1
    # A domain filter looks at every recipient of the message, pending or not.
    other = QueueFilter(states=PENDING_STATES, domain="other.org")
    assert store.count(now=later, where=other, cap=10) == 1
    not_held = QueueFilter(states=PENDING_STATES, held=False, older_than=MINUTE)
    assert [m.id for m in store.query(now=later, where=not_held)] == [mixed]
    assert store.count(now=later, where=not_held, cap=10) == 1


def test_counts_by_every_state(store: Store) -> None:
    delivered = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    half = store.enqueue(message("c@example.org", "d@example.org"), now=NOW)
    pending_one = store.enqueue(message("e@example.org", "f@example.org"), now=NOW)
    lease = lease_all(store)
    done = ["a@example.org", "b@example.org", "c@example.org"]
    store.record(results_for(lease, RecipientState.DELIVERED, only=done))
    store.record(results_for(lease, RecipientState.FAILED, only=["d@example.org", "e@example.org"]))
    store.release(lease)  # f stays queued: its message, with a failed recipient, is pending
    assert store.status(pending_one).state is RecipientState.QUEUED
    store.enqueue(message("g@example.org"), now=NOW)

    def count(*states: RecipientState) -> int:
        return store.count(now=NOW, where=QueueFilter(states=frozenset(states)), cap=100)

    assert count(RecipientState.DELIVERED) == 1
    assert count(RecipientState.FAILED) == 1
    assert count(RecipientState.DELIVERED, RecipientState.FAILED) == 2
    assert count(RecipientState.QUEUED) == 2
    assert count(RecipientState.FAILED, RecipientState.QUEUED) == 3
    assert count() == 0
    assert store.count(now=NOW, where=QueueFilter(), cap=100) == 4
    assert store.count(now=NOW, where=QueueFilter(), cap=3) == 3
    assert store.count(now=NOW, where=QueueFilter(state=RecipientState.DELIVERED), cap=100) == 1
    assert [m.id for m in store.query(now=NOW, where=QueueFilter(state=RecipientState.FAILED))] == [
        half
    ]
    assert delivered != half


def test_bulk_changes_skip_ids_no_store_can_hold(store: Store) -> None:
    """An id with a NUL or a lone surrogate raised StoreRefusedData from SQLite and
    PostgreSQL, where the memory store skipped it as the unknown id it is."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    bad = ["\x00", "\ud800", mid + "\x00", "0" * 32]
    assert store.hold_many([*bad, mid], True) == 1
    assert store.hold_many(bad, False) == 0
    assert store.retry_many([*bad, mid], now=NOW) == 1
    assert store.cancel_many([*bad, mid], now=NOW) == 1
    assert store.purge_many([*bad, mid]) == 1


@pytest.mark.parametrize("odd", ["\x00", "\ud800"], ids=["nul", "lone-surrogate"])
def test_lookups_of_text_no_store_can_hold_find_nothing(store: Store, odd: str) -> None:
    """An id, address, Message-ID or domain with a NUL or a lone surrogate names nothing
    any store holds: PostgreSQL raised StoreRefusedData for a NUL, SQLite for a lone
    surrogate (which its driver cannot encode), where the memory store said unknown (or
    found nothing)."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    for bad in (odd, mid + odd):
        for call in (
            lambda b=bad: store.status(b),
            lambda b=bad: store.retry(b, now=NOW),
            lambda b=bad: store.cancel(b, now=NOW),
            lambda b=bad: store.set_held(b, True),
            lambda b=bad: store.message_data(b),
            lambda b=bad: store.fail_late(b, "a@example.org", attempt()),
        ):
            with pytest.raises(UnknownMessage):
                call()
    assert store.fail_late(mid, "a@example.org" + odd, attempt()) is False
    assert store.message_ids_for_header("<m1@example.com>" + odd) == []
    assert store.suppressions_for(["a@example.org" + odd], now=NOW) == {}
    assert store.unsuppress(["a@example.org" + odd]) == 0
    assert store.resume("example.org" + odd, now=NOW) is False
    assert store.mta_sts_policy("example.org" + odd) is None
    assert store.status(mid).id == mid


def test_ages_from_a_now_in_a_zone_with_summer_time_are_reckoned_in_utc(store: Store) -> None:
    """Was: ``now`` in a zone with summer time (``ZoneInfo``) had ``older_than`` and the
    shape's age edges subtracted on its wall clock. An hour after clocks went forward,
    03:10 CEST less an hour is 02:10, which does not exist and reads as 01:10 UTC: now
    itself, so "older than 1h" took in a message queued 30 minutes before."""
    from zoneinfo import ZoneInfo

    now = datetime(2026, 3, 29, 3, 10, tzinfo=ZoneInfo("Europe/Berlin"))  # 01:10 UTC
    utc_now = now.astimezone(UTC)
    mid = store.enqueue(message("a@example.org"), now=utc_now - 30 * MINUTE)
    for where in (
        QueueFilter(older_than=HOUR),
        QueueFilter(states=PENDING_STATES, older_than=HOUR),
    ):
        assert store.query(now=now, where=where) == [], where
        assert store.count(now=now, where=where, cap=100) == 0, where
    younger = QueueFilter(states=PENDING_STATES, older_than=20 * MINUTE)
    assert [m.id for m in store.query(now=now, where=younger)] == [mid]
    edges = (20 * MINUTE, HOUR)
    assert (
        store.shape(now=now, edges=edges)[0].counts
        == store.shape(now=utc_now, edges=edges)[0].counts
        == (0, 1, 0)
    )


def test_a_naive_now_is_refused_by_every_view_of_the_queue(store: Store) -> None:
    """Was: SQLite and PostgreSQL took a naive ``now`` for the pending view, the lists,
    counts and the queue's shape, reckoning ages from it as the host's local time (the
    memory store refuses it, as every store refuses it to lease or retry): the same
    "older than an hour" counted other messages on a host outside UTC."""
    store.enqueue(message("a@example.org"), now=NOW - 2 * HOUR)
    naive = NOW.replace(tzinfo=None)
    for where in (
        QueueFilter(),
        QueueFilter(older_than=HOUR),
        PENDING,
        QueueFilter(states=PENDING_STATES, older_than=HOUR),
        QueueFilter(state=RecipientState.QUEUED),
    ):
        with pytest.raises(InvalidArgument):
            store.query(now=naive, where=where)
        with pytest.raises(InvalidArgument):
            store.count(now=naive, where=where, cap=10)
    with pytest.raises(InvalidArgument):
        store.shape(now=naive, edges=AGE_EDGES)
    assert store.count(now=NOW, where=QueueFilter(older_than=HOUR), cap=10) == 1


@pytest.mark.parametrize("cap", [MAX_INTEGER + 1, 2**64], ids=["past-bigint", "huge"])
def test_a_count_cap_no_store_can_take_is_refused_alike(store: Store, cap: int) -> None:
    """Was: a ``cap`` past a signed 64-bit integer was refused by the memory store as
    InvalidArgument (naming ``limit``, which the caller never gave), and by SQLite and
    PostgreSQL as StoreRefusedData, a store error a caller retries or reports as the
    store's fault. Each refuses it as InvalidArgument naming ``cap``; a negative cap
    still counts none, and the largest one counts all."""
    store.enqueue(message("a@example.org"), now=NOW)
    for where in (QueueFilter(), PENDING, QueueFilter(state=RecipientState.QUEUED)):
        with pytest.raises(InvalidArgument, match="cap"):
            store.count(now=NOW, where=where, cap=cap)
        assert store.count(now=NOW, where=where, cap=-1) == 0
        assert store.count(now=NOW, where=where, cap=MAX_INTEGER) == 1


@pytest.mark.parametrize(
    "until",
    [datetime(9999, 12, 31, tzinfo=UTC), datetime(1800, 1, 1, tzinfo=UTC)],
    ids=["far", "long-ago"],
)
def test_a_suspension_or_broken_tls_to_a_time_no_store_keeps_is_refused_alike(
    store: Store, until: datetime
) -> None:
    """Was: a suspension until year 9999 (a direct store call: the facades allow 100
    years) was shown until then by the memory store and PostgreSQL and as without end by
    SQLite; a host's TLS remembered broken until then was listed by the memory store
    alone. Every store refuses such a time (InvalidArgument) and keeps nothing."""
    with pytest.raises(InvalidArgument, match=r"until: .* keeps"):
        store.suspend("example.org", now=NOW, until=until)
    assert store.suspensions(now=NOW) == []
    with pytest.raises(InvalidArgument, match=r"until: .* keeps"):
        store.note_tls_broken("mx.example.org", until=until, reason="handshake", now=NOW)
    assert store.tls_broken(now=NOW) == {}


@pytest.mark.parametrize(
    ("domain", "now", "argument"),
    [
        ("example.org", datetime(9500, 1, 1, tzinfo=UTC), "now"),
        ("example.org", datetime(1800, 1, 1, tzinfo=UTC), "now"),
        ("exa\x00mple.org", NOW, "domain"),
        ("exa\udc80mple.org", NOW, "domain"),
        ("x" * 1025, NOW, "domain"),
        (None, NOW, "domain"),
    ],
    ids=["far-now", "long-ago-now", "nul", "surrogate", "long", "none"],
)
def test_a_suspension_no_store_keeps_as_given_is_refused_alike(
    store: Store, domain: str, now: datetime, argument: str
) -> None:
    """Was: a suspension begun at a ``now`` past year 9000 was shown so by the memory
    store and PostgreSQL and with no start (None) by SQLite; one of a domain with a NUL
    was kept by the memory store and SQLite and refused by PostgreSQL, one with a lone
    surrogate kept by the memory store alone, and one past PostgreSQL's index failed
    there as a passing StoreError. Every store refuses them (InvalidArgument, naming
    the argument), as it does a throttle's destination, and keeps nothing."""
    with pytest.raises(InvalidArgument, match=rf"^{argument}: ") as raised:
        store.suspend(domain, now=now, until=None)
    assert raised.value.argument == argument
    assert store.suspensions(now=NOW) == []
    store.suspend("x" * 1024, now=NOW)  # as long a key as a throttle's
    assert [s.domain for s in store.suspensions(now=NOW)] == ["x" * 1024]


@pytest.mark.parametrize(
    "edges",
    [
        (MINUTE, timedelta(days=10**8)),
        (MINUTE, timedelta.max),
        (-MINUTE, HOUR),
        (HOUR, MINUTE),
    ],
    ids=["huge", "max", "negative", "descending"],
)
def test_age_edges_no_clock_can_reach_are_refused_alike(
    store: Store, edges: tuple[timedelta, ...]
) -> None:
    """Was: an edge of the queue's shape past any age (``timedelta(days=10**8)``) was
    StoreRefusedData in SQLite and an empty bucket in the others; a negative one, or
    edges out of order, gave each store's own buckets. Every store refuses them as it
    refuses such an ``older_than`` (InvalidArgument, naming ``edges``)."""
    store.enqueue(message("a@example.org"), now=NOW - 2 * HOUR)
    with pytest.raises(InvalidArgument, match=r"^edges") as raised:
        store.shape(now=NOW, edges=edges)
    assert raised.value.argument == "edges"
    assert store.shape(now=NOW, edges=(HOUR, HOUR, timedelta(days=36525)))[0].counts == (
        0,
        0,
        1,
        0,
    )

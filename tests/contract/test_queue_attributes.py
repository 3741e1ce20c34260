"""Queue attributes, the same on every store: tags and metadata stored, returned, copied into
events and filtered on."""

from __future__ import annotations

import dataclasses
from zoneinfo import ZoneInfo

import pytest

from mailstrom.bounds import EARLIEST_TIME
from mailstrom.errors import InvalidArgument
from mailstrom.message.attributes import QueueAttributes, queue_attributes
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores import QueueFilter, Store
from tests.contract.conftest import Backend
from tests.contract.support import LEASE_FOR, NOW, SECOND, lease_all, message, results_for


def with_attributes(prepared: PreparedMessage, **attributes: object) -> PreparedMessage:
    return dataclasses.replace(prepared, attributes=QueueAttributes(**attributes))  # type: ignore[arg-type]


def test_tags_and_metadata_round_trip(store: Store) -> None:
    metadata = {"order": "42", "note": 'Grüße — 100% "quoted" {json}', "empty": ""}
    mid = store.enqueue(
        with_attributes(
            message(), tags=("receipt", "shop:eu"), metadata=metadata, priority="transactional"
        ),
        now=NOW,
    )
    plain = store.enqueue(message(), now=NOW + SECOND)
    status = store.status(mid)
    assert status.tags == ("receipt", "shop:eu")
    assert dict(status.metadata) == metadata
    assert status.priority == "transactional"
    assert store.status(plain).tags == ()
    assert dict(store.status(plain).metadata) == {}
    listed = {m.id: m for m in store.query(now=NOW)}
    assert listed[mid].tags == ("receipt", "shop:eu")
    assert dict(listed[mid].metadata) == metadata
    assert {m.id: m.tags for m in store.recent()}[mid] == ("receipt", "shop:eu")


def test_query_filters_by_tag(store: Store) -> None:
    receipt = store.enqueue(with_attributes(message(), tags=("receipt",)), now=NOW)
    news = store.enqueue(with_attributes(message(), tags=("news", "receipt-ish")), now=NOW + SECOND)
    both = store.enqueue(with_attributes(message(), tags=("news", "receipt")), now=NOW + 2 * SECOND)
    store.enqueue(message(), now=NOW + 3 * SECOND)

    def ids(**where: object) -> list[str]:
        return [m.id for m in store.query(now=NOW, where=QueueFilter(**where))]  # type: ignore[arg-type]

    assert ids(tag="receipt") == [both, receipt]
    assert ids(tag="news") == [both, news]
    assert ids(tag="Receipt") == []  # exact, case-sensitive
    assert ids(tag="rec") == []  # whole tags only
    assert ids(tag="news", limit=1) == [both]
    store.record(results_for(lease_all(store, now=NOW + 3 * SECOND), RecipientState.DELIVERED))
    assert ids(tag="receipt", state=RecipientState.DELIVERED) == [both, receipt]
    assert ids(tag="receipt", state=RecipientState.QUEUED) == []


def test_events_carry_tags_and_metadata(store: Store) -> None:
    store.enable_events()
    store.enqueue(with_attributes(message(), tags=("receipt",), metadata={"order": "42"}), now=NOW)
    store.enqueue(message("carol@example.net"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED))
    by_address = {e.address: e for e in store.read_events()}
    assert by_address["alice@example.org"].tags == ("receipt",)
    assert dict(by_address["alice@example.org"].metadata) == {"order": "42"}
    assert by_address["carol@example.net"].tags == ()
    batch = store.lease_events(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert batch is not None
    assert {e.address: e.tags for e in batch.events}["bob@example.org"] == ("receipt",)


def test_metadata_the_caller_changes_after_enqueue_stays_as_queued(store: Store) -> None:
    """A store keeps the metadata a message was queued with. The memory store kept the
    caller's own dict: changed after the enqueue, the message's status and every event
    written from then on carried the change, which SQLite and PostgreSQL never see."""
    store.enable_events()
    metadata = {"order": "42"}
    mid = store.enqueue(with_attributes(message(), metadata=metadata), now=NOW)
    metadata["order"] = "changed"
    metadata["added"] = "later"
    assert dict(store.status(mid).metadata) == {"order": "42"}
    assert dict(store.query(now=NOW)[0].metadata) == {"order": "42"}
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    assert [dict(e.metadata) for e in store.read_events()] == [{"order": "42"}] * 2


def test_an_event_its_reader_changes_stays_as_written(store: Store) -> None:
    """Every read of the outbox gives the events as written. The memory store handed out
    its own events, whose metadata dict was the outbox's: a reader (a tail, a hook's
    batch) that changed it changed what every later read and lease gave."""
    store.enable_events()
    store.enqueue(with_attributes(message("alice@example.org"), metadata={"k": "v"}), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    [read] = store.read_events()
    read.metadata["k"] = "changed by the reader"  # type: ignore[index]
    batch = store.lease_events(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert batch is not None
    [leased] = batch.events
    assert dict(leased.metadata) == {"k": "v"}
    leased.metadata["k"] = "changed by the sender"  # type: ignore[index]
    assert [dict(e.metadata) for e in store.read_events()] == [{"k": "v"}]


def test_metadata_keys_come_back_in_the_order_they_were_given(store: Store) -> None:
    """Metadata is kept with its keys sorted, and the memory store and SQLite return it so;
    PostgreSQL's jsonb returned shorter keys first ("note" before "empty"), so a status,
    its `Meta` lines and a hook's event listed them in another order on that store."""
    store.enable_events()
    metadata = {"empty": "", "note": "n", "order": "42", "zz": "z"}
    mid = store.enqueue(with_attributes(message(), metadata=metadata), now=NOW)
    assert list(store.status(mid).metadata) == ["empty", "note", "order", "zz"]
    assert list(store.query(now=NOW)[0].metadata) == ["empty", "note", "order", "zz"]
    assert list(store.recent()[0].metadata) == ["empty", "note", "order", "zz"]
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    for event in store.read_events():
        assert list(event.metadata) == ["empty", "note", "order", "zz"]


def test_attributes_survive_reopening(store_backend: Backend) -> None:
    store_backend.require_durable()
    store = store_backend.open()
    mid = store.enqueue(with_attributes(message(), tags=("a",), metadata={"k": "v"}), now=NOW)
    store.close()
    again = store_backend.open()
    assert again.status(mid).tags == ("a",)
    assert dict(again.status(mid).metadata) == {"k": "v"}


def test_send_at_holds_recipients_back_until_then(store: Store) -> None:
    at = NOW + 3600 * SECOND
    mid = store.enqueue(
        with_attributes(message(), send_at=at, expires_at=at + 60 * SECOND), now=NOW
    )
    store.enqueue(with_attributes(message("carol@example.net"), send_at=NOW - SECOND), now=NOW)
    status = store.status(mid)
    assert status.send_at == at and status.expires_at == at + 60 * SECOND
    assert {r.next_attempt_at for r in status.recipients} == {at}
    early = lease_all(store)  # the past send_at is simply due now
    assert [i.domain for i in early.items] == ["example.net"]
    store.record(results_for(early, RecipientState.DELIVERED))
    assert store.lease(now=at - SECOND, limit=10, lease_for=LEASE_FOR) is None
    assert store.next_due(now=NOW) == at
    lease = lease_all(store, now=at)
    [item] = lease.items
    assert item.message_id == mid
    assert item.expires_at == at + 60 * SECOND
    assert item.priority == ""  # a message stored without a lane


def test_the_earliest_times_a_caller_may_give_read_back_on_every_store(store: Store) -> None:
    # queue_attributes refuses send_at and expires_at before EARLIEST_TIME; from it on,
    # the row reads back in the views and the lease alike (a year-1 time did not).
    attrs = queue_attributes(now=NOW, send_at=EARLIEST_TIME, expires_at=EARLIEST_TIME + SECOND)
    mid = store.enqueue(dataclasses.replace(message(), attributes=attrs), now=NOW)
    status = store.status(mid)
    assert status.send_at == EARLIEST_TIME and status.expires_at == EARLIEST_TIME + SECOND
    assert [m.id for m in store.query(now=NOW)] == [mid]
    [item] = lease_all(store).items
    assert item.expires_at == EARLIEST_TIME + SECOND


@pytest.mark.parametrize("field", ["send_at", "expires_at", "idempotency_until"])
def test_a_naive_attribute_time_is_refused_alike(store: Store, field: str) -> None:
    """A direct enqueue with a naive ``send_at``, ``expires_at`` or
    ``idempotency_until`` (QueueAttributes built by hand: queue_attributes() takes a
    naive one as UTC) is refused by the SQL stores as naive; the memory store raised a
    bare TypeError for ``send_at`` and queued the others, whose expiry every lease and
    listing then compared with aware times. Every store refuses it, queueing nothing."""
    later = (NOW + 60 * SECOND).replace(tzinfo=None)
    key = {"idempotency_key": "k"} if field == "idempotency_until" else {}
    prepared = with_attributes(message(), **{field: later}, **key)
    with pytest.raises(InvalidArgument, match=f"{field}: naive datetime"):
        store.enqueue(prepared, now=NOW)
    with pytest.raises(InvalidArgument, match=f"{field}: naive datetime"):
        store.enqueue_many([message(), prepared], now=NOW)
    assert store.recent() == []


def test_attribute_times_in_another_zone_read_back_in_utc(store: Store) -> None:
    """The memory store kept a ``ZoneInfo`` send_at and expires_at as given and showed
    them in that zone, where the SQL stores show UTC (as the contract says): the same
    message read back different per store."""
    zone = ZoneInfo("America/New_York")
    send_at, expires_at = NOW + 60 * SECOND, NOW + 120 * SECOND
    prepared = with_attributes(
        message(),
        send_at=send_at.astimezone(zone),
        expires_at=expires_at.astimezone(zone),
        idempotency_key="k",
        idempotency_until=expires_at.astimezone(zone),
    )
    mid = store.enqueue(prepared, now=NOW)
    status = store.status(mid)
    shown = [status.send_at, status.expires_at, status.recipients[0].next_attempt_at]
    assert [when.isoformat() if when else None for when in shown] == [
        send_at.isoformat(),
        expires_at.isoformat(),
        send_at.isoformat(),
    ]
    [listed] = store.query(now=NOW)
    assert (listed.send_at, listed.expires_at) == (send_at, expires_at)
    assert str(listed.send_at.tzinfo) == "UTC" and str(listed.expires_at.tzinfo) == "UTC"
    [item] = lease_all(store, now=send_at).items
    assert item.expires_at is not None and item.expires_at.isoformat() == expires_at.isoformat()


def test_a_scheduled_messages_retry_window_starts_at_its_send_at(store: Store) -> None:
    """A lease names when the message could first go: its send_at when later than its
    queueing. The retry policy's max_age counts from there, so a message scheduled a week
    ahead is not given up at its first temporary failure."""
    at = NOW + 7 * 86400 * SECOND
    store.enqueue(with_attributes(message(), send_at=at), now=NOW)
    store.enqueue(with_attributes(message("carol@example.net"), send_at=NOW - SECOND), now=NOW)
    early = lease_all(store)
    [item] = early.items
    assert [r.created_at for r in item.recipients] == [NOW]  # a past send_at: queued
    store.record(results_for(early, RecipientState.DELIVERED))
    [later] = lease_all(store, now=at).items
    assert {r.created_at for r in later.recipients} == {at}
    assert later.queued_at == NOW  # when it arrived: the Arrival-Date of its notices


def test_the_lane_comes_back_on_the_work_item(store: Store) -> None:
    store.enqueue(with_attributes(message(), priority="bulk"), now=NOW)
    [item] = lease_all(store).items
    assert item.priority == "bulk"
    assert item.expires_at is None


LANES = [("transactional", 10), ("bulk", 10)]


def _lanes_of(store: Store, **lease: object) -> list[str]:
    found = store.lease(now=NOW, lease_for=LEASE_FOR, **lease)  # type: ignore[arg-type]
    return [] if found is None else [item.priority for item in found.items]


def test_higher_lanes_are_leased_first_each_up_to_its_number(store: Store) -> None:
    for i in range(4):  # bulk queued first: due earlier
        store.enqueue(
            with_attributes(message(f"b{i}@bulk.example"), priority="bulk"), now=NOW - 9 * SECOND
        )
    for i in range(2):
        store.enqueue(
            with_attributes(message(f"t{i}@tx.example"), priority="transactional"), now=NOW
        )
    assert _lanes_of(store, limit=3, lanes=LANES) == ["transactional", "transactional", "bulk"]
    assert _lanes_of(store, limit=10, lanes=[("transactional", 10), ("bulk", 1)]) == ["bulk"]
    assert _lanes_of(store, limit=10, lanes=[("transactional", 10), ("bulk", 0)]) == []
    assert _lanes_of(store, limit=10, lanes=LANES) == ["bulk", "bulk"]


def test_a_lane_named_twice_counts_once_with_its_first_number(store: Store) -> None:
    """PostgreSQL leased a lane's recipients once per mention, the same recipient twice in
    one lease (sent twice), and SQLite leased up to the two numbers added up."""
    for i in range(3):
        store.enqueue(with_attributes(message(f"b{i}@example.org"), priority="bulk"), now=NOW)
    found = store.lease(
        now=NOW, limit=10, lease_for=LEASE_FOR, lanes=[("bulk", 1), ("tx", 5), ("bulk", 5)]
    )
    assert found is not None
    assert [r.address for i in found.items for r in i.recipients] == ["b0@example.org"]


def test_a_lane_named_again_with_no_room_does_not_hold_the_others_back(store: Store) -> None:
    """Only a lane's first mention counts: its second, with room for none, is no lane
    that may have more waiting. The memory store took it for one and kept the lanes not
    named waiting, which SQLite and PostgreSQL leased."""
    store.enqueue(with_attributes(message("t@example.org"), priority="tx"), now=NOW)
    store.enqueue(with_attributes(message("o@example.net"), priority="other"), now=NOW)
    found = _lanes_of(store, limit=10, lanes=[("tx", 5), ("tx", 0)])
    assert sorted(found) == ["other", "tx"]


def test_without_lanes_every_lane_is_leased_by_due_time(store: Store) -> None:
    store.enqueue(with_attributes(message(), priority="bulk"), now=NOW - SECOND)
    store.enqueue(with_attributes(message(), priority="transactional"), now=NOW)
    found = store.lease(now=NOW, limit=1, lease_for=LEASE_FOR)
    assert found is not None and [i.priority for i in found.items] == ["bulk"]


def test_lanes_not_named_go_when_the_named_ones_have_nothing_more_due(store: Store) -> None:
    store.enqueue(message(), now=NOW - 9 * SECOND)  # queued before lanes existed
    store.enqueue(with_attributes(message(), priority="retired"), now=NOW - 9 * SECOND)
    store.enqueue(with_attributes(message(), priority="bulk"), now=NOW)
    # bulk has no room: the others wait, though due earlier.
    assert _lanes_of(store, limit=10, lanes=[("transactional", 10), ("bulk", 0)]) == []
    assert sorted(_lanes_of(store, limit=10, lanes=LANES)) == ["", "bulk", "retired"]


def test_a_named_lane_taking_its_full_number_keeps_the_others_waiting(store: Store) -> None:
    """A lane that took all it may has more waiting, as far as the lease can tell: lanes
    not named must not go ahead of it, however early they came due."""
    store.enqueue(message("old@example.org"), now=NOW - 9 * SECOND)  # before lanes existed
    for i in range(2):
        store.enqueue(with_attributes(message(f"b{i}@example.org"), priority="bulk"), now=NOW)
    assert _lanes_of(store, limit=10, lanes=[("bulk", 1)]) == ["bulk"]
    # One bulk recipient left, two may go: bulk has nothing more due, the others follow.
    assert _lanes_of(store, limit=10, lanes=[("bulk", 2)]) == ["bulk", ""]


def test_a_lane_may_take_more_than_32_bits_count(store: Store) -> None:
    """The worker's lane caps grow with max_connections (up to 2**63 - 1): PostgreSQL
    refused the lease ("integer out of range", a DataError) on every try, and the worker,
    taking it for a passing store error, never delivered again."""
    store.enqueue(with_attributes(message(), priority="bulk"), now=NOW)
    lanes = [("transactional", 3_000_000_000), ("bulk", 4 * (2**63 - 1))]
    assert _lanes_of(store, limit=10, lanes=lanes) == ["bulk"]


def test_the_pending_view_and_counts_filter_by_tag(store: Store) -> None:
    """The operator's default view (pending mail, answered from the pending index on
    SQLite) and its count honour the tag filter as the plain query does."""
    from mailstrom.stores.operator import PENDING_STATES

    receipt = store.enqueue(with_attributes(message(), tags=("receipt",)), now=NOW)
    store.enqueue(with_attributes(message(), tags=("news",)), now=NOW + SECOND)
    store.enqueue(message(), now=NOW + 2 * SECOND)
    pending = QueueFilter(states=PENDING_STATES, tag="receipt")
    assert [m.id for m in store.query(now=NOW, where=pending)] == [receipt]
    assert store.count(now=NOW, where=pending, cap=100) == 1
    assert store.count(now=NOW, where=QueueFilter(tag="news"), cap=100) == 1
    assert store.count(now=NOW, where=QueueFilter(tag="nothing"), cap=100) == 0
    failed = QueueFilter(states=frozenset({RecipientState.FAILED}), tag="receipt")
    assert store.count(now=NOW, where=failed, cap=100) == 0


def test_a_lease_walks_any_number_of_lanes_in_due_order(store: Store) -> None:
    """More lanes with pending mail than one statement can walk (SQLite allows 500 terms
    in a compound SELECT): a lease still takes the earliest due across all of them, with
    lanes named or not."""
    lanes = 501
    for i in range(lanes):
        # The earliest due are in the last lanes, which a store walks last.
        store.enqueue(
            with_attributes(message(f"u{i}@example.org"), priority=f"lane{i}"),
            now=NOW + (lanes - i) * SECOND,
        )
    later = NOW + (lanes + 1) * SECOND
    lease = store.lease(now=later, limit=10, lease_for=LEASE_FOR)
    assert lease is not None
    taken = sorted(r.address for item in lease.items for r in item.recipients)
    assert taken == sorted(f"u{i}@example.org" for i in range(lanes - 10, lanes))
    # Lanes named first, then the rest: the same earliest due among those not named.
    named = store.lease(now=later, limit=5, lease_for=LEASE_FOR, lanes=[("lane0", 5)])
    assert named is not None
    taken = sorted(r.address for item in named.items for r in item.recipients)
    assert taken == sorted(["u0@example.org", *(f"u{i}@example.org" for i in range(487, 491))])

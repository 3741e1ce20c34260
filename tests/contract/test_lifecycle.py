"""Contract: enqueue and read back, unknown ids, and durability across reopen."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from mailstrom.errors import InvalidArgument, StoreRefusedData, UnknownMessage
from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.preparation import prepare
from mailstrom.readmodel import open_read_model
from mailstrom.status import RecipientState
from mailstrom.stores import Store, new_message_id
from mailstrom.stores import base as stores_base

from .conftest import Backend
from .support import LEASE_FOR, NOW, SECOND, lease_all, message, results_for

BERLIN = ZoneInfo("Europe/Berlin")


def test_enqueue_then_status_round_trips_every_field(store: Store) -> None:
    prepared = message("alice@example.org", "Bob@Example.NET", data=b"X: y\r\n\r\n\xe9t\xe9\r\n")
    mid = store.enqueue(prepared, now=NOW)

    st = store.status(mid)
    assert st.id == mid
    assert st.state is RecipientState.QUEUED
    assert st.envelope_from == "sender@example.com"
    assert st.created_at == NOW
    assert st.size == prepared.size
    assert st.header_message_id == "<m1@example.com>"
    assert st.subject == "Hello"
    assert st.held is False
    assert [r.address for r in st.recipients] == ["alice@example.org", "Bob@Example.NET"]
    for r in st.recipients:
        assert r.state is RecipientState.QUEUED
        assert r.attempts == 0
        assert r.next_attempt_at == NOW
        assert r.first_attempt_at is None
        assert r.last_attempt_at is None
        assert r.reply is None
        assert r.error is None
        assert r.history == ()


@pytest.mark.parametrize(
    ("word", "shown"),
    [
        (b"=?utf-8?q?hello=00world?=", "hello\ufffdworld"),
        (b"=?utf-16-be?b?AGgAAABp?=", "h\ufffdi"),
    ],
)
def test_a_subject_whose_encoded_word_holds_a_nul_is_queued_by_every_store(
    store: Store, word: bytes, shown: str
) -> None:
    """An encoded-word (RFC 2047) may carry any octet, a NUL among them, and the subject
    kept for display is the decoded text: PostgreSQL refused the whole message
    (StoreRefusedData, "text fields cannot contain NUL") where SQLite and the memory
    store queued it. The bytes sent are the message's, as always."""
    raw = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: " + word + b"\r\n\r\nHi\r\n"
    prepared = prepare(raw, now=NOW)
    mid = store.enqueue(prepared, now=NOW)
    assert store.status(mid).subject == shown
    assert store.message_data(mid) == prepared.data
    assert word in prepared.data


def test_a_naive_time_is_refused_and_leaves_the_store_whole(store: Store) -> None:
    """Every store refuses a naive ``now`` (a clock without a time zone), as SQLite did.
    The memory store queued the message with it, and from then on every lease, listing
    and query compared it with aware times and raised TypeError; PostgreSQL read it in
    the session's time zone."""
    naive = NOW.replace(tzinfo=None)
    with pytest.raises(InvalidArgument, match="naive"):
        store.enqueue(message(), now=naive)
    with pytest.raises(InvalidArgument, match="naive"):
        store.enqueue_many([message()], now=naive)
    mid = store.enqueue(message(), now=NOW)
    with pytest.raises(InvalidArgument, match="naive"):
        store.lease(now=naive, limit=10, lease_for=LEASE_FOR)
    with pytest.raises(InvalidArgument, match="naive"):
        store.suspend("example.org", now=NOW, until=naive + LEASE_FOR)
    assert [status.id for status in store.query(now=NOW)] == [mid]
    assert [status.id for status in store.recent()] == [mid]
    assert store.suspensions(now=NOW) == []
    lease = store.lease(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert lease is not None and [item.message_id for item in lease.items] == [mid]


def test_a_time_in_another_zone_is_kept_and_shown_in_utc(store: Store) -> None:
    """A ``now`` in a ``ZoneInfo`` zone is the same instant to every store, and every
    store shows it in UTC, as the contract says (the memory store kept and showed it in
    its own zone)."""
    mid = store.enqueue(message(), now=NOW.astimezone(BERLIN))
    status = store.status(mid)
    shown = [status.created_at, *(r.next_attempt_at for r in status.recipients)]
    assert [when.isoformat() if when else None for when in shown] == [NOW.isoformat()] * 3
    assert all(when is not None and when.utcoffset() == timedelta(0) for when in shown)


def test_a_message_larger_than_every_store_holds_is_refused_alike(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_message_size`` may be set past what a store can hold. A message of more
    than 1 GiB made PostgreSQL drop the connection (its limit for one statement's
    parameters): StoreUnreachable, a passing trouble retried for ever, after a second
    try that said the message "may have been queued"; SQLite refused it as a value, and
    the memory store kept it. Every store refuses one past 900 MiB (MAX_STORED_SIZE) as
    a value it cannot hold, before sending anything. (The bound is lowered here: a
    message of a GiB, once per store, made the suite need gigabytes of memory.)"""
    assert stores_base.MAX_STORED_SIZE == 900 * 1024 * 1024
    prepared = message()
    monkeypatch.setattr(stores_base, "MAX_STORED_SIZE", prepared.size + 10)
    big = replace(prepared, data=prepared.data + b"x" * 11)
    refused = f"cannot be queued: a store holds at most {prepared.size + 10} octets"
    with pytest.raises(StoreRefusedData, match=refused):
        store.enqueue(big, now=NOW)
    with pytest.raises(StoreRefusedData, match=refused):
        store.enqueue_many([prepared, big], now=NOW)
    assert store.recent() == []
    store.enqueue(prepared, now=NOW)  # at the bound: queued


@pytest.mark.parametrize(
    ("first", "again"),
    [
        ("a@example.org", "a@example.org"),
        ("a@example.org", "a@EXAMPLE.Org"),
        ("a@bücher.example", "a@xn--bcher-kva.example"),
        ('"a"@example.org', "a@example.org"),
        ("Postmaster@example.org", "postmaster@example.org"),
    ],
    ids=["same", "domain-case", "u-label", "quoted", "role-name"],
)
def test_a_recipient_named_twice_is_refused_alike(store: Store, first: str, again: str) -> None:
    """A direct enqueue naming one recipient twice (domains compare case-insensitively,
    as a message's recipients are de-duplicated: PreparedMessage) was StoreRefusedData
    from a SQL store's key, and the memory store merged the two, or (for the domain's
    case) queued both, as the SQL stores did too: one mailbox got the message twice.
    Every store refuses it, before writing anything; local parts stay case-sensitive.
    Two spellings of one mailbox that prepare() writes alike (a U-label domain and its
    A-labels, a needlessly quoted local part, a role name's case) were queued as two
    recipients by every store and delivered twice; they are named twice too."""
    with pytest.raises(InvalidArgument, match=r"recipients: .* named twice") as raised:
        store.enqueue(message(first, "b@example.net", again), now=NOW)
    assert raised.value.argument == "recipients"
    with pytest.raises(InvalidArgument, match="named twice"):
        store.enqueue_many([message(), message(first, again)], now=NOW)
    assert store.recent() == []
    mid = store.enqueue(message("a@example.org", "A@example.org"), now=NOW)
    assert [r.address for r in store.status(mid).recipients] == ["a@example.org", "A@example.org"]


def test_a_message_with_no_recipient_is_refused_alike(store: Store) -> None:
    """Was: a direct enqueue of a message naming no recipient (the facades refuse one,
    NoRecipients) was queued by every store, failed at once with nothing to deliver:
    the memory store purged it at any cutoff, even one before it was queued, PostgreSQL
    likewise but not when purging failed mail, and SQLite never. Every store refuses it,
    before writing anything."""
    empty = replace(message(), recipients=())
    with pytest.raises(InvalidArgument, match=r"^recipients: ") as raised:
        store.enqueue(empty, now=NOW)
    assert raised.value.argument == "recipients"
    with pytest.raises(InvalidArgument, match=r"^recipients: "):
        store.enqueue_many([message(), empty], now=NOW)
    assert store.recent() == []


def test_a_message_with_no_data_is_refused_alike(store: Store) -> None:
    """Was: a direct enqueue of a message of no octets (``prepare`` never makes one:
    every message has a header) was queued by every store; the memory store then
    leased it and had the worker send nothing as the message, where SQLite and
    PostgreSQL failed its recipients at their lease as a "queue row unreadable" (data
    that is empty is data lost). Every store refuses it, before writing anything."""
    empty = message(data=b"")
    with pytest.raises(InvalidArgument, match=r"^data: ") as raised:
        store.enqueue(empty, now=NOW)
    assert raised.value.argument == "data"
    with pytest.raises(InvalidArgument, match=r"^data: "):
        store.enqueue_many([message(), empty], now=NOW)
    assert store.recent() == []
    assert store.lease(now=NOW, limit=10, lease_for=LEASE_FOR) is None


@pytest.mark.parametrize("bad", ["a\x00b", "a\udcffb"], ids=["nul", "surrogate"])
@pytest.mark.parametrize(
    "field", ["recipients", "envelope_from", "header_message_id", "subject", "dkim_unsigned"]
)
def test_a_message_text_no_store_can_write_is_refused_alike(
    store: Store, field: str, bad: str
) -> None:
    """Was: a message built by hand (``prepare`` refuses these characters) whose
    addresses, Message-ID, subject or unsigned reason held a NUL was queued by the
    memory store and SQLite and refused by PostgreSQL (StoreRefusedData), and one with
    a lone surrogate was queued by the memory store alone. Every store refuses it
    (InvalidArgument naming the field) before writing anything."""
    if field == "recipients":
        made = message(f"{bad}@example.org")
    elif field == "envelope_from":
        made = replace(message(), envelope_from=f"{bad}@example.com")
    else:
        made = replace(message(), **{field: bad})
    with pytest.raises(InvalidArgument, match=rf"^{field}: ") as raised:
        store.enqueue(made, now=NOW)
    assert raised.value.argument == field
    assert store.recent() == []


@pytest.mark.parametrize("bad", ["a\x00b", "a\udcffb"], ids=["nul", "surrogate"])
@pytest.mark.parametrize("field", ["idempotency_key", "priority", "tags", "metadata"])
def test_a_queue_attribute_text_no_store_can_write_is_refused_alike(
    store: Store, field: str, bad: str
) -> None:
    """Was: a message whose attributes were built by hand (``queue_attributes``, which
    the facades use, refuses these characters) with a NUL in its idempotency key, lane,
    a tag or its metadata was queued by the memory store and SQLite and refused by
    PostgreSQL (StoreRefusedData); a lone surrogate in its idempotency key was queued
    by the memory store alone, and elsewhere by both but PostgreSQL. Every store
    refuses it (InvalidArgument naming the field) before writing anything."""
    values: dict[str, object] = {
        "idempotency_key": bad,
        "priority": bad,
        "tags": ("ok", bad),
        "metadata": {"k": "v", bad: bad},
    }
    attributes = QueueAttributes(
        **{field: values[field]},  # type: ignore[arg-type]
        idempotency_until=NOW + SECOND if field == "idempotency_key" else None,
    )
    made = replace(message(), attributes=attributes)
    with pytest.raises(InvalidArgument, match=rf"^{field}: ") as raised:
        store.enqueue(made, now=NOW)
    assert raised.value.argument == field
    with pytest.raises(InvalidArgument, match=rf"^{field}: "):
        store.enqueue_many([message(), made], now=NOW)
    assert store.recent() == []


FAR = datetime(9999, 12, 31, tzinfo=UTC)
"""Past :data:`~mailstrom.bounds.LATEST_TIME` (9000): no store reads it back."""
LONG_AGO = datetime(1800, 1, 1, tzinfo=UTC)
"""Before :data:`~mailstrom.bounds.EARLIEST_TIME` (1900), likewise."""


@pytest.mark.parametrize("when", [FAR, LONG_AGO], ids=["far", "long-ago"])
def test_a_time_no_store_reads_back_is_refused_at_the_queue_alike(
    store: Store, when: datetime
) -> None:
    """Was: a time past year 9000 (or before 1900) given to a direct store call was
    kept by the memory store and PostgreSQL, while SQLite wrote a row it could not read
    back: its status raised UnreadableRow and its next lease failed the recipient as
    "queue row unreadable"; a lease for ``timedelta(days=10**8)`` was a bare
    OverflowError in two stores and StoreRefusedData in the third. Every store refuses
    such a time (InvalidArgument, naming it) before writing anything."""
    attributes = [
        {"send_at": when},
        {"expires_at": when},
        {"idempotency_key": "k", "idempotency_until": when},
    ]
    for given in attributes:
        prepared = replace(message(), attributes=QueueAttributes(**given))  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match=rf"{[*given][-1]}: .* keeps"):
            store.enqueue(prepared, now=NOW)
    with pytest.raises(InvalidArgument, match=r"now: .* keeps"):
        store.enqueue(message(), now=when)
    assert store.recent() == []

    mid = store.enqueue(message("a@example.org"), now=NOW)
    for lease_for in (timedelta(days=10**8), FAR - NOW):
        with pytest.raises(InvalidArgument, match=r"lease_for: .* keeps"):
            store.lease(now=NOW, limit=10, lease_for=lease_for)
    lease = lease_all(store)
    with pytest.raises(InvalidArgument, match=r"until: .* keeps"):
        store.extend(lease, until=when)
    with pytest.raises(InvalidArgument, match=r"until: .* keeps"):
        store.postpone(lease.items, until=when)
    deferred = results_for(lease, RecipientState.DEFERRED, next_attempt_at=when)
    with pytest.raises(InvalidArgument, match=r"next_attempt_at: .* keeps"):
        store.record(deferred)
    with pytest.raises(InvalidArgument, match=r"attempt.at: .* keeps"):
        store.record(results_for(lease, RecipientState.DELIVERED, at=when))
    [recipient] = store.status(mid).recipients
    assert (recipient.state, recipient.attempts) == (RecipientState.QUEUED, 0)
    assert store.record(results_for(lease, RecipientState.DELIVERED))
    assert store.status(mid).recipients[0].state is RecipientState.DELIVERED


def test_ids_are_fresh_32_hex_digits(store: Store) -> None:
    ids = {store.enqueue(message(), now=NOW) for _ in range(5)}
    assert len(ids) == 5
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_enqueue_many_returns_ids_in_order(store: Store) -> None:
    batch = [message(f"r{i}@example.org", subject=f"s{i}") for i in range(4)]
    ids = store.enqueue_many(batch, now=NOW)
    assert len(set(ids)) == 4
    for i, mid in enumerate(ids):
        st = store.status(mid)
        assert st.subject == f"s{i}"
        assert [r.address for r in st.recipients] == [f"r{i}@example.org"]


def test_enqueue_many_of_nothing_is_nothing(store: Store) -> None:
    assert store.enqueue_many([], now=NOW) == []
    assert store.recent() == []


def test_enqueue_held_is_held(store: Store) -> None:
    mid = store.enqueue(message(), now=NOW, hold=True)
    assert store.status(mid).held is True


@pytest.mark.parametrize("method", ["status", "retry", "cancel", "set_held"])
def test_unknown_id_raises_unknown_message(store: Store, method: str) -> None:
    store.enqueue(message(), now=NOW)
    missing = new_message_id()
    calls: dict[str, Callable[[], object]] = {
        "status": lambda: store.status(missing),
        "retry": lambda: store.retry(missing, now=NOW),
        "cancel": lambda: store.cancel(missing, now=NOW),
        "set_held": lambda: store.set_held(missing, True),
    }
    with pytest.raises(UnknownMessage) as info:
        calls[method]()
    assert info.value.message_id == missing
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize("odd", [None, 5, b"0" * 32, ["0" * 32]], ids=repr)
@pytest.mark.parametrize("method", ["status", "message_data", "read_model"])
def test_an_id_that_is_no_string_is_an_unknown_message_alike(
    store: Store, method: str, odd: object
) -> None:
    """What is no string names no message, as resolve_id() says: SQLite and PostgreSQL
    raised a bare TypeError from their check of the text, and the memory store an
    UnknownMessage whose str() itself raised TypeError (an error no log could show)."""
    store.enqueue(message(), now=NOW)
    model = open_read_model(store)
    calls: dict[str, Callable[[], object]] = {
        "status": lambda: store.status(odd),  # type: ignore[arg-type]
        "message_data": lambda: store.message_data(odd),  # type: ignore[arg-type]
        "read_model": lambda: model.message_data(odd),  # type: ignore[arg-type]
    }
    try:
        with pytest.raises(UnknownMessage) as info:
            calls[method]()
    finally:
        model.close()
    assert info.value.message_id == f"<{type(odd).__name__} {odd!r}>"
    assert str(info.value) == f"unknown message id: {info.value.message_id!r}"


def test_close_is_idempotent(store_backend: Backend) -> None:
    store = store_backend.open()
    store.close()
    store.close()


def test_reopen_after_close_loses_nothing(store_backend: Backend) -> None:
    store_backend.require_durable()
    first = store_backend.open()
    done = first.enqueue(message("a@one.example", "b@two.example"), now=NOW)
    pending = first.enqueue(message("c@three.example"), now=NOW + SECOND)
    held = first.enqueue(message("d@four.example"), now=NOW + 2 * SECOND, hold=True)
    lease = lease_all(first, now=NOW + 3 * SECOND)
    first.record(results_for(lease, RecipientState.DELIVERED, only=["a@one.example"], at=NOW))
    # b@two.example and c@three.example stay leased until NOW + 3 s + LEASE_FOR.
    before = {mid: first.status(mid) for mid in (done, pending, held)}
    stats = first.stats()
    first.close()

    second = store_backend.open()
    assert {mid: second.status(mid) for mid in (done, pending, held)} == before
    assert second.stats() == stats
    assert [m.id for m in second.recent()] == [held, pending, done]
    # The unexpired lease survived: nothing is due until it expires.
    assert second.lease(now=NOW + 4 * SECOND, limit=10, lease_for=LEASE_FOR) is None
    again = lease_all(second, now=NOW + 3 * SECOND + LEASE_FOR)
    assert sorted(r.address for i in again.items for r in i.recipients) == [
        "b@two.example",
        "c@three.example",
    ]

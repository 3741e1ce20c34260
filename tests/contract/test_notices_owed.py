"""Contract: the mark "notice owed". The write that records a recipient's result keeps
the notice text the result carries (a failure's bounce, a deferral's delay warning, a
delivery's "relayed" notice); :meth:`Store.owed_notices` hands the marks of a message out
once none of its recipients is leased or queued for a first attempt;
:meth:`Store.queue_notices` queues the notice and clears the marks in one transaction,
none of a message some of whose marks changed since they were read. The marks outlive
the store object (a worker killed between the record and the notice), and a database
from before them (SQLite schema 13, PostgreSQL 14) upgrades."""

from __future__ import annotations

import dataclasses
import functools
import sqlite3
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from mailstrom.status import RecipientState
from mailstrom.stores import RecipientResult, SQLiteStore, Store
from mailstrom.stores.base import OwedNotice
from mailstrom.stores.postgres import PostgresStore
from mailstrom.stores.sqlite_schema import _statements, to_us
from mailstrom.stores.sqlite_schema import migrations as sqlite_migrations
from tests.support.pg_tables import schema_at

from .conftest import Backend
from .support import LEASE_FOR, NOW, SECOND, at_once, lease_all, message, results_for


def bounce() -> object:
    from mailstrom.message.prepared import PreparedMessage

    return PreparedMessage(
        data=b"Subject: Undelivered\r\n\r\nSorry.\r\n",
        envelope_from="",
        recipients=("sender@example.com",),
        smtputf8=False,
        eightbit=False,
    )


def marked(results: list[RecipientResult]) -> list[RecipientResult]:
    """``results`` with a notice text on each failure (as the worker writes them)."""
    return [
        dataclasses.replace(r, notice=f'{{"about":"{r.address}"}}')
        if r.state is RecipientState.FAILED
        else r
        for r in results
    ]


def owed_of(store: Store, **kw: object) -> list[tuple[str, str]]:
    return [(o.address, o.notice) for o in store.owed_notices(**kw)]  # type: ignore[arg-type]


def test_one_notice_for_failures_recorded_in_two_writes(store: Store) -> None:
    mid = store.enqueue(message("ann@example.org", "bob@example.net"), now=NOW)
    first = store.lease(now=NOW, limit=1, lease_for=LEASE_FOR)
    assert first is not None
    store.record(marked(results_for(first, RecipientState.FAILED)))
    # bob is still queued for his first attempt: the message is not done yet.
    assert store.owed_notices() == []
    assert store.owed_notices(message_ids=[mid]) == []
    second = lease_all(store)
    # Leased, not yet recorded: not done either.
    assert store.owed_notices() == []
    store.record(marked(results_for(second, RecipientState.FAILED)))
    owed = store.owed_notices()
    assert [(o.message_id, o.address) for o in owed] == [
        (mid, "ann@example.org"),
        (mid, "bob@example.net"),
    ]
    assert owed[1].notice == '{"about":"bob@example.net"}'
    assert store.owed_notices(message_ids=[mid, "nosuchid"]) == owed
    [notice_id] = store.queue_notices(owed, {mid: [bounce()]}, now=NOW)  # type: ignore[list-item]
    assert store.owed_notices() == []
    assert store.status(notice_id).envelope_from == ""
    assert [m.id for m in store.recent()] == [notice_id, mid]


def test_a_deferred_recipient_holds_no_notice_back(store: Store) -> None:
    """As Postfix bounces a queue file's failed recipients once the file is done with,
    its deferred ones staying queued."""
    mid = store.enqueue(message("ann@example.org", "bob@example.net"), now=NOW)
    lease = lease_all(store)
    results = results_for(lease, RecipientState.FAILED, only=["ann@example.org"])
    results += results_for(
        lease, RecipientState.DEFERRED, only=["bob@example.net"], next_attempt_at=NOW + SECOND
    )
    store.record(marked(results))
    assert owed_of(store) == [("ann@example.org", '{"about":"ann@example.org"}')]
    store.queue_notices(store.owed_notices(), {mid: []}, now=NOW)
    assert store.owed_notices() == []


def test_a_recipient_at_a_suspended_domain_holds_no_notice_back(store: Store) -> None:
    """Was: ann's bounce waited for bob's first attempt, i.e. for as long as the operator
    kept example.net suspended (no end given: until resumed). Postfix defers the
    recipients of a deferred transport at once, and bounces the others."""
    mid = store.enqueue(message("ann@example.org", "bob@example.net"), now=NOW)
    store.suspend("example.net", now=NOW)
    lease = lease_all(store)
    assert [r.address for i in lease.items for r in i.recipients] == ["ann@example.org"]
    store.record(marked(results_for(lease, RecipientState.FAILED)))
    assert owed_of(store) == [("ann@example.org", '{"about":"ann@example.org"}')]
    assert owed_of(store, message_ids=[mid]) == owed_of(store)
    store.queue_notices(store.owed_notices(), {mid: []}, now=NOW)
    assert store.owed_notices() == []


def test_a_mark_on_any_result_but_only_with_a_notice(store: Store) -> None:
    """A deferral's delay warning and a delivery's "relayed" notice are owed in the store
    as a failure's bounce is: a worker killed after the record loses none."""
    mid = store.enqueue(
        message("ann@example.org", "bob@example.org", "cy@example.org", "dan@example.org"),
        now=NOW,
    )
    lease = lease_all(store)
    results = results_for(lease, RecipientState.DELIVERED, only=["ann@example.org"])
    results = [dataclasses.replace(r, notice="relayed ann") for r in results]
    results += results_for(lease, RecipientState.FAILED, only=["bob@example.org"])
    results += marked(results_for(lease, RecipientState.FAILED, only=["cy@example.org"]))
    later = NOW + SECOND
    deferred = results_for(
        lease, RecipientState.DEFERRED, only=["dan@example.org"], next_attempt_at=later
    )
    results += [dataclasses.replace(r, notice="delayed dan") for r in deferred]
    store.record(results)
    assert owed_of(store) == [
        ("ann@example.org", "relayed ann"),
        ("cy@example.org", '{"about":"cy@example.org"}'),
        ("dan@example.org", "delayed dan"),
    ]
    store.queue_notices(store.owed_notices(), {mid: [bounce()]}, now=NOW)  # type: ignore[list-item]
    assert store.owed_notices() == []
    assert len(store.recent()) == 2


def test_a_recipient_on_its_way_keeps_its_mark_until_a_final_result(store: Store) -> None:
    """A deferral's delay warning not queued yet (its message was not done) is not lost
    to the recipient's next attempt: a result without a mark of its own leaves it, while
    the recipient is still on its way; a final one replaces it (a failure's bounce says
    more, and a delivered recipient is no longer delayed)."""
    mid = store.enqueue(message("ann@example.org", "bob@example.net"), now=NOW)
    first = store.lease(now=NOW, limit=1, lease_for=LEASE_FOR)
    assert first is not None
    later = NOW + SECOND
    deferred = results_for(first, RecipientState.DEFERRED, next_attempt_at=later)
    store.record([dataclasses.replace(r, notice="delayed ann") for r in deferred])
    assert store.owed_notices() == []  # bob is still queued for his first attempt
    again = lease_all(store, now=later)  # ann's next attempt, and bob's first
    store.record(
        results_for(
            again, RecipientState.DEFERRED, only=["ann@example.org"], next_attempt_at=later + SECOND
        )
        + results_for(again, RecipientState.DELIVERED, only=["bob@example.net"])
    )
    assert owed_of(store) == [("ann@example.org", "delayed ann")]
    # A final result without a mark clears it (as a new mark would replace it).
    store.record(results_for(lease_all(store, now=later + SECOND), RecipientState.DELIVERED))
    assert store.owed_notices() == []
    assert store.status(mid).recipients[0].state is RecipientState.DELIVERED


def test_no_notice_for_marks_changed_since_they_were_read(store: Store) -> None:
    """A delay warning's mark read, and the recipient's next attempt failed and marked
    its bounce before the notice was queued: clearing the new mark would lose the bounce.
    None of the message's marks is cleared, nor its notice queued; the marks left are
    handed out again."""
    mid = store.enqueue(message("ann@example.org", "bob@example.org"), now=NOW)
    lease = lease_all(store)
    later = NOW + SECOND
    results = marked(results_for(lease, RecipientState.FAILED, only=["ann@example.org"]))
    deferred = results_for(
        lease, RecipientState.DEFERRED, only=["bob@example.org"], next_attempt_at=later
    )
    results += [dataclasses.replace(r, notice="delayed bob") for r in deferred]
    store.record(results)
    seen = store.owed_notices()
    assert [(o.address, o.notice) for o in seen] == [
        ("ann@example.org", '{"about":"ann@example.org"}'),
        ("bob@example.org", "delayed bob"),
    ]
    store.record(marked(results_for(lease_all(store, now=later), RecipientState.FAILED)))
    assert store.queue_notices(seen, {mid: [bounce()]}, now=NOW) == []  # type: ignore[list-item]
    now_owed = store.owed_notices()
    assert [(o.address, o.notice) for o in now_owed] == [
        ("ann@example.org", '{"about":"ann@example.org"}'),
        ("bob@example.org", '{"about":"bob@example.org"}'),
    ]
    assert len(store.queue_notices(now_owed, {mid: [bounce()]}, now=NOW)) == 1  # type: ignore[list-item]
    assert store.owed_notices() == []


def test_no_mark_cleared_of_a_message_another_worker_queued_a_part_of(store: Store) -> None:
    """One worker read a message's marks before its deferred recipient failed, another
    after: the first clears the mark it read and queues its notice; the second, finding
    that mark gone, leaves the new one for a notice of its own (it was cleared with the
    first's, and its bounce lost)."""
    mid = store.enqueue(message("ann@example.org", "bob@example.org"), now=NOW)
    lease = lease_all(store)
    later = NOW + SECOND
    results = marked(results_for(lease, RecipientState.FAILED, only=["ann@example.org"]))
    results += results_for(
        lease, RecipientState.DEFERRED, only=["bob@example.org"], next_attempt_at=later
    )
    store.record(results)
    early = store.owed_notices()
    store.record(marked(results_for(lease_all(store, now=later), RecipientState.FAILED)))
    late = store.owed_notices()
    assert [o.address for o in early] == ["ann@example.org"]
    assert [o.address for o in late] == ["ann@example.org", "bob@example.org"]
    assert len(store.queue_notices(early, {mid: [bounce()]}, now=NOW)) == 1  # type: ignore[list-item]
    assert store.queue_notices(late, {mid: [bounce()]}, now=NOW) == []  # type: ignore[list-item]
    assert owed_of(store) == [("bob@example.org", '{"about":"bob@example.org"}')]


def test_the_notice_waits_for_the_last_recipient_delivered_or_cancelled(store: Store) -> None:
    done = store.enqueue(message("ann@example.org", "bob@example.net"), now=NOW)
    cancelled = store.enqueue(message("cy@example.org", "dan@example.net"), now=NOW)
    lease = lease_all(store)
    failed = ["ann@example.org", "cy@example.org"]
    store.record(marked(results_for(lease, RecipientState.FAILED, only=failed)))
    assert store.owed_notices() == []  # bob and dan are still leased
    store.record(results_for(lease, RecipientState.DELIVERED, only=["bob@example.net"]))
    assert [(o.message_id, o.address) for o in store.owed_notices()] == [(done, "ann@example.org")]
    store.cancel(cancelled, now=NOW)
    assert [(o.message_id, o.address) for o in store.owed_notices()] == [
        (done, "ann@example.org"),
        (cancelled, "cy@example.org"),
    ]


@pytest.mark.parametrize("many", [False, True], ids=["cancel", "cancel_many"])
def test_a_cancel_drops_the_delay_warning_owed_for_what_it_cancels(
    store: Store, many: bool
) -> None:
    """The operator cancelled the mail: its sender is not told it is "delayed" (a
    cancelled recipient is owed no notice, as one cancelled before any attempt is not),
    while a bounce owed for a recipient's own failure before the cancel stays owed."""
    mid = store.enqueue(message("ann@example.org", "bob@example.net", "cy@example.com"), now=NOW)
    lease = lease_all(store)
    later = NOW + SECOND
    deferred = results_for(
        lease, RecipientState.DEFERRED, only=["bob@example.net"], next_attempt_at=later
    )
    failed = results_for(lease, RecipientState.FAILED, only=["ann@example.org"])
    store.record(marked(failed) + [dataclasses.replace(r, notice="delayed bob") for r in deferred])
    assert store.owed_notices() == []  # cy is still leased: the message is not done
    if many:
        assert store.cancel_many([mid], now=NOW) == 2
    else:
        assert store.cancel(mid, now=NOW) == 2
    assert owed_of(store) == [("ann@example.org", '{"about":"ann@example.org"}')]


def test_a_notice_another_store_object_queued_is_not_queued_twice(
    store_backend: Backend,
) -> None:
    """Two workers found the same marks: the one that clears them second queues nothing."""
    one = store_backend.open()
    two = store_backend.open()
    mid = one.enqueue(message("ann@example.org"), now=NOW)
    one.record(marked(results_for(lease_all(one), RecipientState.FAILED)))
    seen_one, seen_two = one.owed_notices(), two.owed_notices()
    assert len(seen_one) == len(seen_two) == 1
    assert len(one.queue_notices(seen_one, {mid: [bounce()]}, now=NOW)) == 1  # type: ignore[list-item]
    assert two.queue_notices(seen_two, {mid: [bounce()]}, now=NOW) == []  # type: ignore[list-item]
    assert len(two.recent()) == 2


def _queue_into(
    into: list[list[str]], store: Store, owed: list[OwedNotice], notices: dict[str, list[object]]
) -> None:
    into.append(store.queue_notices(owed, notices, now=NOW))  # type: ignore[arg-type]


def test_two_workers_queueing_the_same_notice_at_once_queue_it_once(
    store_backend: Backend,
) -> None:
    """The race the sequential test above leaves out: both clear the same marks in the
    same instant (each in its one transaction), and one notice is queued, not two nor
    none, whichever store it is."""
    stores = [store_backend.open() for _ in range(2)]
    for _ in range(10):
        mid = stores[0].enqueue(message("ann@example.org", "bob@example.org"), now=NOW)
        stores[0].record(marked(results_for(lease_all(stores[0]), RecipientState.FAILED)))
        seen = [s.owed_notices(message_ids=[mid]) for s in stores]
        assert [len(owed) for owed in seen] == [2, 2]
        queued: list[list[str]] = []
        notices = {mid: [bounce()]}
        at_once(
            *(
                functools.partial(_queue_into, queued, s, owed, notices)
                for s, owed in zip(stores, seen, strict=True)
            )
        )
        assert sorted(len(ids) for ids in queued) == [0, 1]
        assert stores[1].owed_notices(message_ids=[mid]) == []


@pytest.mark.parametrize(
    "state", [RecipientState.FAILED, RecipientState.DEFERRED, RecipientState.DELIVERED]
)
def test_the_marks_outlive_the_store_object(store_backend: Backend, state: RecipientState) -> None:
    """A worker killed between the record of a result and the queueing of its notice (a
    bounce, a delay warning, a "relayed" notice): the next store object (a restarted
    worker's) finds the mark, and queues the notice once."""
    store_backend.require_durable()
    first = store_backend.open()
    mid = first.enqueue(message("ann@example.org"), now=NOW)
    later = NOW + SECOND if state is RecipientState.DEFERRED else None
    results = results_for(lease_all(first), state, next_attempt_at=later)
    first.record([dataclasses.replace(r, notice=f"{state} ann") for r in results])
    first.close()
    again = store_backend.open()
    owed = again.owed_notices()
    assert [(o.message_id, o.address, o.notice) for o in owed] == [
        (mid, "ann@example.org", f"{state} ann")
    ]
    assert len(again.queue_notices(owed, {mid: [bounce()]}, now=NOW)) == 1  # type: ignore[list-item]
    assert again.queue_notices(owed, {mid: [bounce()]}, now=NOW) == []  # type: ignore[list-item]
    assert again.owed_notices() == []


def test_owed_notices_hands_out_whole_messages_up_to_the_limit(store: Store) -> None:
    ids = [store.enqueue(message("ann@example.org", "bob@example.org"), now=NOW) for _ in range(3)]
    store.record(marked(results_for(lease_all(store), RecipientState.FAILED)))
    owed = store.owed_notices(limit=2)
    assert [o.message_id for o in owed] == [ids[0], ids[0], ids[1], ids[1]]


# --- upgrading a database from before the marks ------------------------------------------


def test_a_negative_limit_hands_out_no_marks_alike(store: Store) -> None:
    """Was: ``owed_notices(limit=-1)`` handed out nothing from the memory store, every
    mark from SQLite (a negative LIMIT is none there) and failed in PostgreSQL
    (StoreRefusedData). A negative limit is 0 in every store, as for every other
    listing (:func:`~mailstrom.arguments.row_limit`)."""
    store.enqueue(message("ann@example.org"), now=NOW)
    store.record(marked(results_for(lease_all(store), RecipientState.FAILED)))
    assert store.owed_notices(limit=-1) == []
    assert store.owed_notices(limit=0) == []
    assert len(store.owed_notices(limit=1)) == 1


def test_sqlite_at_schema_13_upgrades(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        for number, script in sqlite_migrations():
            if number <= 13:
                for statement in _statements(script):
                    conn.execute(statement)
        conn.execute("PRAGMA user_version = 13")
        cursor = conn.execute(
            "INSERT INTO messages (id, envelope_from, created_at, subject, size, data)"
            " VALUES ('old1', 'a@sender.test', ?, 'Old', 4, x'41424344')",
            (to_us(NOW),),
        )
        conn.execute(
            "INSERT INTO recipients (message_seq, position, address, domain, state,"
            " next_attempt_at) VALUES (?, 0, 'alice@example.org', 'example.org', 'queued', ?)",
            (cursor.lastrowid, to_us(NOW)),
        )
    conn.close()
    store = SQLiteStore(db)
    try:
        assert store.owed_notices() == []
        lease = lease_all(store)
        store.record(marked(results_for(lease, RecipientState.FAILED)))
        [owed] = store.owed_notices()
        assert (owed.message_id, owed.address) == ("old1", "alice@example.org")
        store.queue_notices([owed], {}, now=NOW + timedelta(seconds=1))
        assert store.owed_notices() == []
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as check, check:
        assert check.execute("PRAGMA user_version").fetchone()[0] >= 14
    check.close()


def test_postgres_at_schema_14_upgrades(postgres_url: str) -> None:
    schema_at(postgres_url, 14)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        seq = conn.execute(
            "INSERT INTO messages (id, data, envelope_from, created_at, subject, size)"
            " VALUES ('old1', 'ABCD', 'a@sender.test', %s, 'Old', 4) RETURNING seq",
            (NOW,),
        ).fetchone()
        assert seq is not None
        conn.execute(
            "INSERT INTO recipients (message_id, address, seq, position, domain, state,"
            " next_attempt_at, lane) VALUES ('old1', 'alice@example.org', %s, 0,"
            " 'example.org', 'queued', %s, '')",
            (seq[0], NOW),
        )
    with PostgresStore(postgres_url) as store:
        assert store.owed_notices() == []
        store.record(marked(results_for(lease_all(store), RecipientState.FAILED)))
        assert store.owed_notices() == [
            OwedNotice(
                message_id="old1",
                address="alice@example.org",
                notice='{"about":"alice@example.org"}',
            )
        ]


def test_a_purge_keeps_a_message_whose_notice_is_still_owed(store: Store) -> None:
    """A failed message whose bounce notice is owed (its mark kept: the worker was
    stopped between the record and the notice) is not purged by any purge, by age,
    state or id: deleted, its sender was never told, the notice needing the message.
    Once the notice is queued, the message goes."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    store.record(marked(results_for(lease_all(store), RecipientState.FAILED)))
    later = NOW + timedelta(days=1)
    assert store.purge(finished_before=later) == 0
    assert store.purge_state(finished_before=later, state=RecipientState.FAILED) == 0
    assert store.purge_many([mid], finished_before=later) == 0
    assert store.purge_many([mid]) == 0
    owed = store.owed_notices()
    assert [o.message_id for o in owed] == [mid]
    store.queue_notices(owed, {mid: [bounce()]}, now=NOW)  # type: ignore[list-item]
    assert store.purge_many([mid], finished_before=later) == 1

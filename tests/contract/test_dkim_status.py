"""Contract: a message's DKIM outcome is recorded at enqueue and read back by ``status``,
``query`` and ``recent`` — which signatures it carries, or that it is unsigned and why —
and a database from before it existed (schema 3) upgrades with its old messages reading
``dkim=None``."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from mailstrom.dkim import DKIMAlgorithm, DKIMSignature
from mailstrom.message import Email, prepare
from mailstrom.status import DKIMStatus, RecipientState
from mailstrom.stores import QueueFilter, SQLiteStore, Store
from mailstrom.stores.dkim_column import MAX_DKIM_REASON, MAX_DKIM_SIGNATURES
from mailstrom.stores.postgres import PostgresStore
from mailstrom.stores.sqlite_schema import _statements, to_us
from mailstrom.stores.sqlite_schema import migrations as sqlite_migrations
from tests.support.dkim import dual
from tests.support.pg_tables import schema_at

from .support import NOW, lease_all, message, results_for

DKIM = dual("sender.test")
SIGNED_BY = (
    DKIMSignature(domain="sender.test", selector="rsa", algorithm=DKIMAlgorithm.RSA_SHA256),
    DKIMSignature(domain="sender.test", selector="ed", algorithm=DKIMAlgorithm.ED25519_SHA256),
)


def email(from_: str) -> Email:
    return Email(from_=from_, to=["alice@example.org"], subject="Hi", text="Hello")


def test_a_signed_message_lists_its_signatures(store: Store) -> None:
    prepared = prepare(email("Shop <shop@news.sender.test>"), now=NOW, dkim=DKIM)
    mid = store.enqueue(prepared, now=NOW)
    st = store.status(mid)
    assert st.dkim == DKIMStatus(signatures=SIGNED_BY)
    assert st.dkim.signed and st.dkim.reason is None
    # The same outcome from every way of reading a message, and after delivery.
    assert [m.dkim for m in store.recent()] == [st.dkim]
    assert [m.dkim for m in store.query(now=NOW, where=QueueFilter(domain="example.org"))] == [
        st.dkim
    ]
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED))
    assert store.status(mid).dkim == st.dkim


def test_a_message_signed_anew_as_it_went_shows_the_new_signatures(store: Store) -> None:
    """The worker signs a message again as it sends it (its key rotated away, its x=
    about to pass) and its results carry the new signatures: the store records them as
    the message's DKIM status, which then names what the receiver got. A result that
    was not recorded (its lease gone) changes nothing."""
    mid = store.enqueue(prepare(email("shop@sender.test"), now=NOW, dkim=DKIM), now=NOW)
    rotated = DKIMStatus(
        signatures=(
            replace(SIGNED_BY[0], selector="rsa2027"),
            replace(SIGNED_BY[1], selector="ed2027"),
        )
    )
    lease = lease_all(store)
    stale = [
        replace(r, dkim=rotated, lease_token="gone")
        for r in results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW)
    ]
    assert store.record(stale) == []
    assert store.status(mid).dkim == DKIMStatus(signatures=SIGNED_BY)
    results = [replace(r, dkim=rotated) for r in results_for(lease, RecipientState.DELIVERED)]
    assert len(store.record(results)) == 1
    st = store.status(mid)
    assert st.dkim == rotated and st.state is RecipientState.DELIVERED
    assert [m.dkim for m in store.recent()] == [rotated]
    assert [m.dkim for m in store.query(now=NOW, where=QueueFilter(domain="example.org"))] == [
        rotated
    ]


def test_an_unsigned_message_says_why(store: Store) -> None:
    prepared = prepare(email("app@other.test"), now=NOW, dkim=DKIM)
    mid = store.enqueue(prepared, now=NOW)
    st = store.status(mid)
    assert st.dkim == DKIMStatus(reason="no DKIM key for the From domain other.test")
    assert not st.dkim.signed and st.dkim.signatures == ()
    assert [m.dkim for m in store.recent()] == [st.dkim]


def test_without_dkim_configured_there_is_no_outcome(store: Store) -> None:
    mid = store.enqueue(prepare(email("shop@sender.test"), now=NOW), now=NOW)
    assert store.status(mid).dkim is None
    assert store.recent()[0].dkim is None


def test_enqueue_many_keeps_each_message_its_own_outcome(store: Store) -> None:
    batch = [
        prepare(email("shop@sender.test"), now=NOW, dkim=DKIM),
        prepare(email("shop@sender.test"), now=NOW),
        prepare(email("app@other.test"), now=NOW, dkim=DKIM),
    ]
    ids = store.enqueue_many(batch, now=NOW)
    found = [store.status(mid).dkim for mid in ids]
    assert found == [p.dkim_status for p in batch]
    assert [f is not None and f.signed for f in found] == [True, False, False]


def test_what_is_stored_is_bounded(store: Store) -> None:
    """The reason names From domains the message chose; every store keeps the same
    bounded text, and at most MAX_DKIM_SIGNATURES signatures."""
    long_reason = replace(message(), dkim_unsigned="no DKIM key for " + "é" * 5000)
    many = replace(message(), dkim=SIGNED_BY * MAX_DKIM_SIGNATURES)
    reason = store.status(store.enqueue(long_reason, now=NOW)).dkim
    signed = store.status(store.enqueue(many, now=NOW)).dkim
    assert reason is not None and reason.reason is not None
    assert len(reason.reason.encode()) <= MAX_DKIM_REASON
    assert reason.reason.startswith("no DKIM key for éé")
    assert signed is not None and signed.signatures == many.dkim[:MAX_DKIM_SIGNATURES]


# --- upgrading a database of schema 3 -------------------------------------------------------


def test_sqlite_at_schema_3_upgrades_and_old_messages_read_none(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        for number, script in sqlite_migrations():
            if number <= 3:
                for statement in _statements(script):
                    conn.execute(statement)
        conn.execute("PRAGMA user_version = 3")
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
        assert store.status("old1").dkim is None
        assert store.status("old1").subject == "Old"
        new = store.enqueue(prepare(email("shop@sender.test"), now=NOW, dkim=DKIM), now=NOW)
        assert {m.id: m.dkim for m in store.recent()} == {
            new: DKIMStatus(signatures=SIGNED_BY),
            "old1": None,
        }
        # Purging a message takes its DKIM row with it.
        lease = lease_all(store)
        store.record(results_for(lease, RecipientState.DELIVERED))
        assert store.purge(finished_before=NOW + timedelta(days=1)) == 2
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as check, check:
        assert check.execute("PRAGMA user_version").fetchone()[0] >= 4
        assert check.execute("SELECT count(*) FROM message_dkim").fetchone() == (0,)
    check.close()


def test_postgres_at_schema_3_upgrades_and_old_messages_read_none(postgres_url: str) -> None:
    schema_at(postgres_url, 3)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        seq = conn.execute(
            "INSERT INTO messages (id, data, envelope_from, created_at, subject, size)"
            " VALUES ('old1', 'ABCD', 'a@sender.test', %s, 'Old', 4) RETURNING seq",
            (NOW,),
        ).fetchone()
        assert seq is not None
        conn.execute(
            "INSERT INTO recipients (message_id, address, seq, position, domain, state,"
            " next_attempt_at) VALUES ('old1', 'alice@example.org', %s, 0, 'example.org',"
            " 'queued', %s)",
            (seq[0], NOW),
        )
    with PostgresStore(postgres_url) as store:
        assert store.status("old1").dkim is None
        assert store.status("old1").subject == "Old"
        new = store.enqueue(prepare(email("app@other.test"), now=NOW, dkim=DKIM), now=NOW)
        assert {m.id: m.dkim for m in store.recent()} == {
            new: DKIMStatus(reason="no DKIM key for the From domain other.test"),
            "old1": None,
        }


@pytest.mark.parametrize("events", [False, True], ids=["plain", "events"])
def test_postgres_writes_a_new_outcome_in_the_record_s_transaction(
    postgres_url: str, events: bool
) -> None:
    """The DKIM outcome a result carries is written in the transaction that records it
    (one commit, not a second statement after it): the recipient's and the message's
    rows are written by one transaction (their xmin). The same outcome again (each
    attempt of a message signed anew carries it) leaves the message row as it is."""
    rotated = DKIMStatus(signatures=(replace(SIGNED_BY[0], selector="rsa2027"),))
    with PostgresStore(postgres_url) as store:
        if events:
            store.enable_events()
        mid = store.enqueue(prepare(email("shop@sender.test"), now=NOW, dkim=DKIM), now=NOW)

        def written() -> tuple[int, int]:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                found = conn.execute(
                    "SELECT r.xmin::text::bigint, m.xmin::text::bigint FROM recipients r"
                    " JOIN messages m ON m.id = r.message_id WHERE m.id = %s",
                    (mid,),
                ).fetchone()
            assert found is not None
            return found[0], found[1]

        for attempt in range(2):
            at = NOW + timedelta(hours=attempt)
            lease = lease_all(store, now=at)
            results = results_for(lease, RecipientState.DEFERRED, at=at, next_attempt_at=at)
            assert len(store.record([replace(r, dkim=rotated) for r in results])) == 1
            assert store.status(mid).dkim == rotated
            recipient, message_row = written()
            if attempt == 0:
                assert recipient == message_row
                first = message_row
            else:
                assert recipient != message_row == first


@pytest.mark.parametrize(
    "stored",
    [
        "not json",
        '{"signed": "x"}',
        '{"signed": [["d", "s", "rsa-sha1"]]}',
        '{"unsigned": 5}',
        "[]",
    ],
)
def test_an_unreadable_stored_outcome_reads_as_unknown(tmp_path: Path, stored: str) -> None:
    """A damaged value (or one a newer mailstrom wrote) must not make the status
    unreadable: it reads as None."""
    db = tmp_path / "queue.db"
    store = SQLiteStore(db)
    try:
        mid = store.enqueue(prepare(email("shop@sender.test"), now=NOW, dkim=DKIM), now=NOW)
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("UPDATE message_dkim SET dkim = ?", (stored,))
        conn.close()
        assert store.status(mid).dkim is None
    finally:
        store.close()

"""The SQLite store keeps a message's bytes out of the way of its other columns.

Schema version 5 and later added columns to ``messages`` (tags, metadata, priority,
send_at, expires_at, idempotency_key, dsn, require_tls) behind ``data``: SQLite reaches
them only by walking the bytes' overflow pages, and an UPDATE of any column (hold,
release) reads the whole row to write it again. Version 20 moves the bytes to a table of
their own (``message_data``); what is read here is counted as the octets this process
read through ``read()`` (``rchar``: SQLite's page reads, from its file or the WAL).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from pathlib import Path

from mailstrom.message.attributes import QueueAttributes
from mailstrom.status import RecipientState
from mailstrom.stores import QueueFilter, SQLiteStore
from mailstrom.stores.sqlite_schema import _statements, to_us
from mailstrom.stores.sqlite_schema import migrations as sqlite_migrations

from .support import NOW, lease_all, message, results_for

BIG = 300_000
"""A message of 300 kB: 73 overflow pages of 4 kB."""


def body(n: int, size: int = BIG) -> bytes:
    head = f"Subject: m{n}\r\n\r\n".encode()
    return head + bytes([65 + n % 26]) * (size - len(head) - 2) + b"\r\n"


@contextmanager
def octets_read() -> Iterator[list[int]]:
    """The octets this process read through read() inside the block: [n] once done."""

    def rchar() -> int:
        with open("/proc/self/io") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))

    found: list[int] = []
    before = rchar()
    yield found
    found.append(rchar() - before)


def filled(path: Path, count: int) -> list[str]:
    """``count`` messages of :data:`BIG` octets, tagged t0, t1, ...; their ids."""
    store = SQLiteStore(path)
    try:
        return [
            store.enqueue(
                dataclasses.replace(
                    message(f"to{n}@example.org", data=body(n)),
                    attributes=QueueAttributes(tags=(f"t{n}",), metadata={"n": str(n)}),
                ),
                now=NOW,
            )
            for n in range(count)
        ]
    finally:
        store.close()


def test_hold_and_release_read_none_of_the_messages_bytes(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    ids = filled(path, 20)
    store = SQLiteStore(path)
    try:
        store.stats()  # the schema is read before counting
        with octets_read() as read:
            assert store.hold_many(ids, True) == 20
            assert store.hold_many(ids, False) == 20
        assert read[0] < BIG, f"hold and release of 20 messages read {read[0]:,} octets"
    finally:
        store.close()


def test_a_tag_filter_reads_none_of_the_messages_bytes(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    ids = filled(path, 20)
    store = SQLiteStore(path)
    try:
        store.stats()
        with octets_read() as read:
            found = store.query(now=NOW, where=QueueFilter(tag="t7"))
            listed = store.recent(20)
        assert [m.id for m in found] == [ids[7]]
        assert {m.tags for m in listed} == {(f"t{n}",) for n in range(20)}
        assert read[0] < BIG, f"a tag filter and a listing of 20 read {read[0]:,} octets"
    finally:
        store.close()


# --- upgrading a database of schema 19 ------------------------------------------------------


def _old_message(
    conn: sqlite3.Connection,
    mid: str,
    data: bytes,
    states: list[str],
    *,
    held: bool = False,
    tags: str | None = None,
    require_tls: bool = False,
) -> None:
    """A message as version 19 stored it, one recipient per state of ``states``."""
    seq = conn.execute(
        "INSERT INTO messages (id, envelope_from, created_at, held, subject, size, data, tags,"
        " metadata, require_tls) VALUES (?, 'a@sender.test', ?, ?, ?, ?, ?, ?, ?, ?)",
        (mid, to_us(NOW), held, mid, len(data), data, tags, '{"k":"v"}', require_tls),
    ).lastrowid
    for position, state in enumerate(states):
        final = state in ("delivered", "failed")
        conn.execute(
            "INSERT INTO recipients (message_seq, position, address, domain, state, held,"
            " attempts, next_attempt_at, finished_at) VALUES (?,?,?,'example.org',?,?,?,?,?)",
            (
                seq,
                position,
                f"{mid}{position}@example.org",
                state,
                held,
                0 if state == "queued" else 1,
                None if final else to_us(NOW + (timedelta(hours=1) * (state == "deferred"))),
                to_us(NOW) if final else None,
            ),
        )


def test_sqlite_at_schema_19_upgrades_with_every_message_intact(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    kept = {
        "queued": body(1),
        "deferred": body(2, 5_000),
        "held": body(3),
        "delivered": body(4, 100),
        "failed": body(5),
        "mixed": body(6, 40_000),
    }
    with closing(sqlite3.connect(db)) as conn, conn:
        for number, script in sqlite_migrations():
            if number <= 19:
                for statement in _statements(script):
                    conn.execute(statement)
        conn.execute("PRAGMA user_version = 19")
        _old_message(conn, "queued", kept["queued"], ["queued"], tags='["a"]')
        _old_message(conn, "deferred", kept["deferred"], ["deferred"])
        _old_message(conn, "held", kept["held"], ["queued"], held=True)
        _old_message(conn, "delivered", kept["delivered"], ["delivered"])
        _old_message(conn, "failed", kept["failed"], ["failed"])
        _old_message(conn, "mixed", kept["mixed"], ["delivered", "deferred"], require_tls=True)
        conn.execute(
            'INSERT INTO message_dkim (message_seq, dkim) SELECT seq, \'{"unsigned":"x"}\''
            " FROM messages WHERE id = 'queued'"
        )
    conn.close()
    store = SQLiteStore(db)
    try:
        for mid, data in kept.items():
            assert store.message_data(mid) == data, mid
        states = {mid: store.status(mid).state for mid in kept}
        assert states == {
            "queued": RecipientState.QUEUED,
            "deferred": RecipientState.DEFERRED,
            "held": RecipientState.QUEUED,
            "delivered": RecipientState.DELIVERED,
            "failed": RecipientState.FAILED,
            "mixed": RecipientState.DEFERRED,
        }
        assert [mid for mid in kept if store.status(mid).held] == ["held"]
        assert store.status("queued").tags == ("a",)
        assert store.status("mixed").metadata == {"k": "v"}
        assert [m.id for m in store.query(now=NOW, where=QueueFilter(tag="a"))] == ["queued"]
        lease = lease_all(store)
        assert [(i.message_id, i.data) for i in lease.items] == [("queued", kept["queued"])]
        store.record(results_for(lease, RecipientState.DELIVERED))
        assert store.hold_many(["held"], False) == 1
        later = NOW + timedelta(hours=2)
        lease = lease_all(store, now=later)
        leased = {i.message_id: (i.data, i.require_tls) for i in lease.items}
        assert leased == {
            "deferred": (kept["deferred"], False),
            "held": (kept["held"], False),
            "mixed": (kept["mixed"], True),
        }
        store.record(results_for(lease, RecipientState.DELIVERED, at=later))
        # Purging a message takes its bytes with it.
        assert store.purge(finished_before=later + timedelta(days=1)) == 6
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as check, check:
        assert check.execute("PRAGMA user_version").fetchone()[0] >= 20
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert check.execute("PRAGMA foreign_key_check").fetchall() == []
        columns = [row[1] for row in check.execute("PRAGMA table_info(messages)")]
        assert "data" not in columns
        assert check.execute("SELECT count(*) FROM message_data").fetchone() == (0,)
    check.close()

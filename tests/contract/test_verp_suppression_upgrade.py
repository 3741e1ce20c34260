"""Contract: a database an older mailstrom left with VERP addresses on the suppression
list (its bounce notices' refusals and reports about them put them there, with no end)
loses those entries when it upgrades (SQLite schema 15, PostgreSQL 17), the very ones
:func:`~mailstrom.bounces.verp.is_verp_address` keeps off the list today; an operator's
own entries and every other address stay."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import psycopg

from mailstrom.bounces.verp import is_verp_address
from mailstrom.stores import SQLiteStore, Store
from mailstrom.stores.postgres import PostgresStore
from mailstrom.stores.sqlite_schema import _statements, to_us
from mailstrom.stores.sqlite_schema import migrations as sqlite_migrations
from tests.support.pg_tables import schema_at

from .support import NOW

SQLITE_BEFORE = 14
POSTGRES_BEFORE = 16
TOKEN = "0190f3a2c4e1b7d08a4f2c6e9b1d3f57-5d41402abc"

# (target, source) as older mailstroms (and operators) wrote them.
ENTRIES = [
    (f"bounces+{TOKEN}@sender.test", "hard_bounce"),  # a refused notice
    (f"{TOKEN}@bounces.sender.test", "async_bounce"),  # a token first
    (f"b.{TOKEN}.x@sender.test", "complaint"),
    (f"hand+{TOKEN}@sender.test", "manual"),  # an operator's: kept
    (f"bounces+a{TOKEN}@sender.test", "hard_bounce"),  # a hex digit before it: no token
    (f"bounces+{TOKEN}0@sender.test", "hard_bounce"),  # one after it
    (f"bounces+{TOKEN[:-1]}@sender.test", "hard_bounce"),  # too short
    ("0190f3a2c4e1b7d08a4f2c6e9b1d3f57@sender.test", "hard_bounce"),
    ("bob@example.org", "hard_bounce"),
    ("example.net", "manual"),
]
KEPT = {t for t, source in ENTRIES if source == "manual" or not is_verp_address(t)}


def test_the_cases_are_what_the_worker_tells_apart() -> None:
    assert {t for t, _ in ENTRIES} - KEPT == {t for t, _ in ENTRIES[:3]}


def targets(store: Store) -> set[str]:
    return {e.target for e in store.list_suppressions()}


def test_sqlite_drops_the_verp_entries_on_upgrade(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        for number, script in sqlite_migrations():
            if number <= SQLITE_BEFORE:
                for statement in _statements(script):
                    conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SQLITE_BEFORE}")
        conn.executemany(
            "INSERT INTO suppressions (target, source, created_at) VALUES (?, ?, ?)",
            [(target, source, to_us(NOW)) for target, source in ENTRIES],
        )
    conn.close()
    store = SQLiteStore(db)
    try:
        assert targets(store) == KEPT
    finally:
        store.close()


def test_postgres_drops_the_verp_entries_on_upgrade(postgres_url: str) -> None:
    schema_at(postgres_url, POSTGRES_BEFORE)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for target, source in ENTRIES:
            conn.execute(
                "INSERT INTO suppressions (target, source, created_at) VALUES (%s, %s, %s)",
                (target, source, NOW),
            )
    with PostgresStore(postgres_url) as store:
        assert targets(store) == KEPT

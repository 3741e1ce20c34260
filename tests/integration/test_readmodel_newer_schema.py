"""The dashboard's read model over a store a newer mailstrom migrated while it ran: a view
whose statement the new schema broke says so (StoreCorrupt, with the store's advice),
as the store itself does, instead of a passing StoreError the dashboard shows as "try
again later" for ever."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from mailstrom.errors import StoreCorrupt, StoreError
from mailstrom.readmodel import QueueQuery, QueueView, open_read_model
from mailstrom.stores import open_store
from tests.contract.support import message

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
NEWER = 9999
"""A schema version no mailstrom knows yet: what a newer one's migration leaves."""
RENAME = "ALTER TABLE attempts RENAME COLUMN outcome TO result"
"""What a newer migration might do to a column the overview reads."""


def _migrate_sqlite(path: Path, *, newer: bool) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(RENAME)
        if newer:
            conn.execute(f"PRAGMA user_version = {NEWER}")


def _migrate_postgres(url: str, *, newer: bool) -> None:
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute(RENAME.encode())
        if newer:
            conn.execute(
                b"INSERT INTO schema_version (version, name) VALUES (%s, 'newer')", (NEWER,)
            )


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_view_a_newer_schema_broke_says_so(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Was: StoreError "no such column: outcome" (SQLite) or "column outcome does not
    exist" (PostgreSQL), a passing trouble to every caller."""
    url = (
        f"sqlite:///{tmp_path / 'queue.db'}"
        if kind == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    store = open_store(url)
    model = open_read_model(store, cache_seconds=0)
    try:
        store.enqueue(message("a@one.example"), now=NOW)
        assert model.overview(now=NOW).messages == 1
        if kind == "sqlite":
            _migrate_sqlite(tmp_path / "queue.db", newer=True)
        else:
            _migrate_postgres(url, newer=True)
        for _ in range(2):  # each view says so (a pooled connection too)
            with pytest.raises(StoreCorrupt, match="newer") as raised:
                model.overview(now=NOW)
            assert "restart this process" in str(raised.value)
        # A view the new schema left alone still reads, as the store's do.
        assert len(model.queue_page(QueueQuery(view=QueueView.ALL), now=NOW).messages) == 1
    finally:
        model.close()
        store.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_broken_view_on_a_known_schema_stays_a_passing_trouble(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Only a newer schema makes a missing column permanent."""
    url = (
        f"sqlite:///{tmp_path / 'queue.db'}"
        if kind == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    store = open_store(url)
    model = open_read_model(store, cache_seconds=0)
    try:
        store.enqueue(message("a@one.example"), now=NOW)
        if kind == "sqlite":
            _migrate_sqlite(tmp_path / "queue.db", newer=False)
        else:
            _migrate_postgres(url, newer=False)
        with pytest.raises(StoreError) as raised:
            model.overview(now=NOW)
        assert not isinstance(raised.value, StoreCorrupt)
    finally:
        model.close()
        store.close()

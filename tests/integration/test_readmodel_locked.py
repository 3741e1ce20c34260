"""The dashboard's SQLite read model kept out by another connection's lock (an exclusive
``locking_mode``, as a backup tool or the ``sqlite3`` shell may take): it waits the store's
``busy_timeout`` and fails with StoreLocked, as the store's own reads do."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from mailstrom.errors import StoreLocked
from mailstrom.readmodel import open_read_model
from mailstrom.stores import SQLiteStore
from mailstrom.web import create_app
from tests.contract.support import NOW, message
from tests.contract.test_sqlite_write_lock import BOUND, timed


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "queue.db"
    store = SQLiteStore(path)
    store.enqueue(message("a@one.example"), now=NOW)
    store.close()
    return path


@contextmanager
def locked_out(db: Path) -> Iterator[None]:
    """Another program's connection holding the database exclusively: even WAL readers
    wait for it."""
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("PRAGMA locking_mode=EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        other.execute("SELECT count(*) FROM messages").fetchone()
        yield
        other.execute("COMMIT")


def test_a_locked_out_view_waits_busy_timeout_and_is_store_locked(db: Path) -> None:
    """Was: a plain StoreError "SQLite error on ...: database is locked", after Python's
    default wait of 5 s whatever the store's busy_timeout said."""
    store = SQLiteStore(db, busy_timeout=BOUND, read_only=True)
    store.close()  # only its settings are used: its connection would keep the lock out
    model = open_read_model(store)
    try:
        with locked_out(db):
            error, _ = timed(lambda: model.overview(now=NOW), within=30)
        assert isinstance(error, StoreLocked), repr(error)
        assert f"waited {BOUND:g} s" in str(error)
        assert "(SQLite: database is locked)" in str(error)
        assert model.overview(now=NOW).messages == 1  # the lock gone, it reads again
    finally:
        model.close()


def test_the_read_model_waits_as_long_as_the_store(db: Path) -> None:
    """The wait is the store's busy_timeout, not a fixed 5 s: a store that rides out a
    lock for a minute has a dashboard that does too."""
    store = SQLiteStore(db, busy_timeout=60)
    model = open_read_model(store)
    try:
        model.overview(now=NOW)
        with model._read() as conn:  # type: ignore[attr-defined]
            assert conn.execute("PRAGMA busy_timeout").fetchone() == (60_000,)
    finally:
        model.close()
        store.close()


def test_a_locked_out_dashboard_page_is_a_503_that_says_so(db: Path) -> None:
    """The page says what the store would: how long it waited, and to try again."""
    store = SQLiteStore(db, busy_timeout=BOUND)
    store.close()
    with TestClient(create_app(store), base_url="http://127.0.0.1:8025") as client:
        with locked_out(db):
            response, _ = timed(lambda: client.get("/queue"), within=30)
        assert response.status_code == 503
        assert f"waited {BOUND:g} s" in response.text
        assert client.get("/queue").status_code == 200  # the lock gone, it reads again

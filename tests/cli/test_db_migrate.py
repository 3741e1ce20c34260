"""``mailstrom db migrate`` on SQLite: the version it prints is the one the store opened."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from mailstrom.cli.db import migrate
from mailstrom.stores import SQLiteStore
from mailstrom.stores.sqlite_schema import latest_version


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Another connection holding ``path`` locked against every reader until left."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    with closing(conn):
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")


def after_close(monkeypatch: pytest.MonkeyPatch, then: Callable[[str], None]) -> None:
    """Run ``then`` with the store's path as soon as the store closes."""
    close = SQLiteStore.close

    def closing_then(self: SQLiteStore) -> None:
        close(self)
        then(self.path)

    monkeypatch.setattr(SQLiteStore, "close", closing_then)


def test_a_file_deleted_once_migrated_is_not_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the version was read again by a connection of its own, which SQLite lets
    create a file: a store deleted right after its migration came back as a new, empty
    0644 file, and the command printed "schema version 0"."""
    db = tmp_path / "queue.db"
    after_close(monkeypatch, os.unlink)
    assert migrate(f"sqlite:///{db}") == latest_version()
    assert not db.exists()


def test_a_lock_taken_once_migrated_is_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: that second connection waited Python's 5 s for a lock another process took
    meanwhile, then raised a bare sqlite3.OperationalError ("database is locked"): an
    internal error (exit 70), for a migration that had succeeded."""
    db = tmp_path / "queue.db"
    held = threading.Event()
    done = threading.Event()
    holders: list[threading.Thread] = []

    def hold(path: str) -> None:
        with locked(Path(path)):
            held.set()
            done.wait(60)

    def lock(path: str) -> None:
        holders.append(threading.Thread(target=hold, args=(path,), daemon=True))
        holders[0].start()
        assert held.wait(60)

    after_close(monkeypatch, lock)
    try:
        assert migrate(f"sqlite:///{db}") == latest_version()
    finally:
        done.set()
        for holder in holders:
            holder.join(60)

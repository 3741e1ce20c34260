"""A write of the SQLite store whose COMMIT and ROLLBACK both fail (an I/O error, or as
here SQLite's authorizer refusing them): the caller gets that failure, not SQLite's
"Safety level may not be changed inside a transaction" from putting ``synchronous`` back,
and no connection goes back to the pool still without its fsync on commit (an enqueue on
it would be acknowledged before it is on the disk)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from mailstrom.errors import StoreError
from mailstrom.status import RecipientState
from mailstrom.stores import SQLiteStore

from .support import NOW, lease_all, message, results_for

_FULL = 2
"""``PRAGMA synchronous``'s answer for FULL."""


class _Refusing:
    """Installed as every new connection's authorizer: refuses COMMIT and ROLLBACK while on."""

    def __init__(self) -> None:
        self.on = False

    def __call__(self, action: int, arg1: str | None, *_: object) -> int:
        if self.on and action == sqlite3.SQLITE_TRANSACTION and arg1 in ("COMMIT", "ROLLBACK"):
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK


@pytest.fixture
def refusing(monkeypatch: pytest.MonkeyPatch) -> _Refusing:
    refusing = _Refusing()
    connect = SQLiteStore._connect

    def with_authorizer(self: SQLiteStore) -> sqlite3.Connection:
        conn = connect(self)
        conn.set_authorizer(refusing)
        return conn

    monkeypatch.setattr(SQLiteStore, "_connect", with_authorizer)
    return refusing


@pytest.fixture
def store(tmp_path: Path, refusing: _Refusing) -> Iterator[SQLiteStore]:
    with closing(SQLiteStore(tmp_path / "queue.db")) as opened:
        yield opened


def test_a_failed_commit_and_rollback_are_reported_as_they_are(
    store: SQLiteStore, refusing: _Refusing
) -> None:
    store.enqueue(message("bob@example.org"), now=NOW)
    lease = lease_all(store)
    refusing.on = True
    for conn in store._idle:  # setting it again expires the statements prepared before
        conn.set_authorizer(refusing)
    with pytest.raises(StoreError) as caught:
        store.record(results_for(lease, RecipientState.DELIVERED))  # a write without fsync
    assert "not authorized" in str(caught.value)
    assert "Safety level" not in str(caught.value)
    refusing.on = False
    # Every pooled connection commits with fsync again, and the store writes on.
    for conn in store._idle:
        assert conn.execute("PRAGMA synchronous").fetchone() == (_FULL,)
    store.enqueue(message("carol@example.org"), now=NOW)
    assert store.record(results_for(lease, RecipientState.DELIVERED))


def test_an_enqueue_whose_commit_and_rollback_fail_is_refused_and_not_kept(
    store: SQLiteStore, refusing: _Refusing
) -> None:
    store.enqueue(message("bob@example.org"), now=NOW)
    refusing.on = True
    for conn in store._idle:
        conn.set_authorizer(refusing)
    with pytest.raises(StoreError, match="not authorized"):
        store.enqueue(message("carol@example.org"), now=NOW)
    refusing.on = False
    assert [r.address for item in lease_all(store).items for r in item.recipients] == [
        "bob@example.org"
    ]

"""SQLite's read paths do work bounded by what they return: counted in statements run
(a trace callback) and rows, never in time."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import pytest

from mailstrom.readmodel.sqlite_message import message_detail
from mailstrom.status import RecipientState
from mailstrom.stores import SQLiteStore

from .support import NOW, message, results_for

HOUR = timedelta(hours=1)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


def _tried_message(db: Path, recipients: int, tries: int) -> str:
    """A message to ``recipients`` recipients, each deferred ``tries`` times."""
    with closing(SQLiteStore(db)) as store:
        mid = store.enqueue(
            message(*(f"r{n}@d{n % 7}.example" for n in range(recipients))), now=NOW
        )
        for n in range(tries):
            now = NOW + n * HOUR
            lease = store.lease(now=now, limit=recipients, lease_for=HOUR)
            assert lease is not None
            store.record(
                results_for(lease, RecipientState.DEFERRED, at=now, next_attempt_at=now + HOUR)
            )
    return mid


def test_a_message_page_reads_its_attempts_in_a_bounded_number_of_statements(db: Path) -> None:
    """Was: a message's page (the dashboard's, ``message_status``) read each recipient's
    latest attempts with a statement of its own: 2,007 statements for a message to 2,000
    recipients. Its attempts are now read in one, and are the same ones."""
    mid = _tried_message(db, 2000, 2)
    with closing(SQLiteStore(db)) as store:
        whole = store.status(mid)
    statements: list[str] = []
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.set_trace_callback(statements.append)
        found = message_detail(conn, mid, 3000, -1, None)
        conn.set_trace_callback(None)
    assert len(statements) < 10, len(statements)
    assert found.kept == tuple(len(r.history) for r in whole.recipients)
    # 3,000 attempts over 2,000 recipients: the first 1,000 show both, the rest the last.
    for n, (r, full) in enumerate(zip(found.status.recipients, whole.recipients, strict=True)):
        assert r.history == full.history[-2 if n < 1000 else -1 :]
    with closing(sqlite3.connect(db)) as conn:
        page = message_detail(conn, mid, 7, 1990, 5)
    assert [r.address for r in page.status.recipients] == [
        f"r{n}@d{n % 7}.example" for n in range(1991, 1996)
    ]
    assert [len(r.history) for r in page.status.recipients] == [2, 2, 1, 1, 1]

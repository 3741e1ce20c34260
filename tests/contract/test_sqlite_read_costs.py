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


@pytest.mark.parametrize("pending", [False, True], ids=["any-state", "pending"])
def test_a_page_deep_in_a_tie_costs_what_the_first_does(db: Path, pending: bool) -> None:
    """Was: a page below a cursor was the row value ``(created_at, seq) < (?, ?)``,
    which SQLite walks as ``created_at < ?`` alone (seq is the rowid): a page deep in
    messages sharing one enqueue time stepped over every one the pages before had read
    (with 3,000 of one ``enqueue_many``, the 30th page of 100 cost 8 to 12 times the
    second). Now the rest of the tie and the older times are two ranges of the index."""
    from mailstrom.stores import QueueFilter
    from mailstrom.stores.operator import PENDING_STATES
    from mailstrom.stores.sqlite_operator import matching_seqs

    with closing(SQLiteStore(db)) as store:
        store.enqueue_many([message(f"r{n}@example.org") for n in range(3000)], now=NOW)
        where = QueueFilter(limit=100, states=PENDING_STATES if pending else None)
        first = store.select_page(now=NOW, where=where)
        deep = first
        for _ in range(28):
            deep = store.select_page(now=NOW, where=where, after=deep.last)
        assert len(deep.ids) == 100
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    with closing(sqlite3.connect(db)) as conn:
        conn.set_progress_handler(step, 10)
        top = matching_seqs(conn, NOW, where, after=first.last)
        top_steps, steps = steps, 0
        below = matching_seqs(conn, NOW, where, after=deep.last)
        assert len(top) == len(below) == 100
        assert steps < 3 * top_steps, (steps, top_steps)


def _delivered_walk_steps(db: Path, recipients: int) -> int:
    """VM steps (of 10) of a retention walk's page over 6 delivered messages of
    ``recipients`` recipients each, behind 2 failed ones of as many."""
    from mailstrom.stores import QueueFilter
    from mailstrom.stores.sqlite_operator import matching_seqs

    with closing(SQLiteStore(db)) as store:
        for n, outcome in enumerate([RecipientState.DELIVERED] * 6 + [RecipientState.FAILED] * 2):
            many = [f"u{n}-{i}@example.org" for i in range(recipients)]
            store.enqueue(message(*many), now=NOW - 2 * HOUR + n * timedelta(seconds=1))
            lease = store.lease(now=NOW, limit=recipients, lease_for=HOUR)
            assert lease is not None
            store.record(results_for(lease, outcome))
    where = QueueFilter(limit=100, states=frozenset({RecipientState.DELIVERED}), older_than=HOUR)
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    with closing(sqlite3.connect(db)) as conn:
        conn.set_progress_handler(step, 10)
        assert len(matching_seqs(conn, NOW, where)) == 6
    return steps


def test_a_walk_for_finished_mail_reads_no_more_of_big_messages(tmp_path: Path) -> None:
    """Was: a message's state was worked out from every recipient of it, so a retention
    walk's page over messages of 400 recipients cost 100 times one over messages of
    one. Now a few probes of the pending and failed indexes tell it."""
    small = _delivered_walk_steps(tmp_path / "small.db", 1)
    big = _delivered_walk_steps(tmp_path / "big.db", 400)
    assert big < 2 * small, (big, small)

"""The SQLite store's write lock is waited for ``busy_timeout`` at most, in all: this
process's mutex, the other processes' ``flock`` on ``<database>-lock`` and SQLite's own
lock. A mailstrom process that held the ``flock`` and stopped (SIGSTOP, ``docker pause``, a
debugger) held every other process's writes for as long as it stayed stopped."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom.errors import StoreLocked
from mailstrom.status import RecipientState
from mailstrom.stores import SQLiteStore
from mailstrom.stores.sqlite_operator import BULK_BATCH
from tests.support.sqlite_copies import copies_of_a_message
from tests.support.stopped_writer import stopped_writer

from .support import LEASE_FOR, NOW, lease_all, message, results_for

BOUND = 0.3
"""The busy_timeout of these tests' stores."""
SLACK = 0.7
"""What a loaded machine may add to a bounded wait; far below the "for ever" it was."""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "queue.db"
    SQLiteStore(path).close()  # the file and its -lock file exist
    return path


def timed(call: Callable[[], Any], *, within: float) -> tuple[Any, float]:
    """``call()``'s result (or exception) and how long it took; fails the test, leaving the
    call to finish in its thread, when it takes longer than ``within``."""
    outcome: list[Any] = []
    began = time.monotonic()

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - began)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"still waiting after {within} s"
    return outcome[0], outcome[1]


WRITES = ["enqueue", "enqueue_many", "lease", "record", "record_and_lease"]


@pytest.mark.parametrize("name", WRITES)
def test_a_stopped_writer_in_its_transaction_makes_writes_fail_in_time(db: Path, name: str) -> None:
    """A write behind a stopped writer that holds both locks: StoreLocked after
    busy_timeout, nothing written; it works once the writer goes."""
    store = SQLiteStore(db, busy_timeout=BOUND)
    store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    results = results_for(lease, RecipientState.DELIVERED)
    write: Callable[[], Any] = {
        "enqueue": lambda: store.enqueue(message("b@example.org"), now=NOW),
        "enqueue_many": lambda: store.enqueue_many([message("c@example.org")] * 2, now=NOW),
        "lease": lambda: store.lease(now=NOW, limit=10, lease_for=LEASE_FOR),
        "record": lambda: store.record(results),
        "record_and_lease": lambda: store.record_and_lease(
            results, now=NOW, limit=10, lease_for=LEASE_FOR
        ),
    }[name]
    with stopped_writer(db, in_transaction=True):
        error, took = timed(write, within=BOUND + SLACK)
    assert isinstance(error, StoreLocked), error
    assert BOUND * 0.8 <= took <= BOUND + SLACK, took
    assert f"waited {BOUND:g} s for the database's write lock" in str(error)
    assert "nothing was written, try again" in str(error)
    item = store.status(lease.items[0].message_id).recipients[0]
    assert (store.stats().messages, item.state, item.attempts) == (1, RecipientState.QUEUED, 0)
    write()
    added = {"enqueue": 1, "enqueue_many": 2}.get(name, 0)
    recorded = name.startswith("record")
    item = store.status(lease.items[0].message_id).recipients[0]
    assert store.stats().messages == 1 + added
    assert item.state is (RecipientState.DELIVERED if recorded else RecipientState.QUEUED)
    store.close()


def test_a_writer_stopped_between_transactions_delays_writes_busy_timeout_at_most(
    db: Path,
) -> None:
    """A stopped process that holds only the ``flock`` (SQLite's lock is free): past
    busy_timeout the write goes on under SQLite's lock alone."""
    store = SQLiteStore(db, busy_timeout=BOUND)
    with stopped_writer(db, in_transaction=False):
        mid, took = timed(lambda: store.enqueue(message(), now=NOW), within=BOUND + SLACK)
        assert isinstance(mid, str), mid
        assert took >= BOUND * 0.8
        lease, _ = timed(
            lambda: store.lease(now=NOW, limit=10, lease_for=LEASE_FOR), within=BOUND + SLACK
        )
        assert lease is not None and lease.items[0].message_id == mid
    store.close()


@contextmanager
def flock_held(path: Path) -> Iterator[None]:
    """The ``flock`` held on a description of its own (another process's, as far as the
    store can tell), released when the block ends."""
    fd = os.open(f"{path}-lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_a_waiter_finds_the_flock_free_soon_after_its_release(db: Path) -> None:
    """Behind another process's ``flock``, a write goes on within a tenth or so of the
    time it waited once the lock is released, not at busy_timeout; and a write that went
    on without the lock past busy_timeout leaves nothing held behind."""
    store = SQLiteStore(db, busy_timeout=BOUND)
    done: list[float] = []
    with flock_held(db):
        store.enqueue(message("a@example.org"), now=NOW)  # goes on without it, past BOUND
        thread = threading.Thread(
            target=lambda: done.append(
                (store.lease(now=NOW, limit=1, lease_for=LEASE_FOR), time.monotonic())[1]
            )
        )
        thread.start()
        time.sleep(BOUND / 2)
        assert not done
        released = time.monotonic()
    thread.join(5)
    assert done and done[0] - released < 0.05, done[0] - released
    fd = os.open(f"{db}-lock", os.O_RDWR)
    try:  # free: nothing of the store's is left holding it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    store.close()


def test_sqlite_busy_is_store_locked_in_sqlite_s_words(db: Path) -> None:
    """Another program's connection (no ``flock``) holds the write lock: StoreLocked, not
    a bare StoreError, with what SQLite said."""
    store = SQLiteStore(db, busy_timeout=BOUND)
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        error, _ = timed(lambda: store.enqueue(message(), now=NOW), within=BOUND + SLACK)
        other.execute("ROLLBACK")
    assert isinstance(error, StoreLocked), error
    assert "(SQLite: database is locked)" in str(error)
    assert store.stats().messages == 0
    store.close()


def test_writers_queued_behind_a_busy_holder_each_wait_busy_timeout_at_most(db: Path) -> None:
    """Four writers (stores of their own, as four processes) behind another program's
    transaction: each used to wait for the one before it to give up, then for its own
    busy_timeout, the last one four times busy_timeout."""
    stores = [SQLiteStore(db, busy_timeout=BOUND) for _ in range(4)]
    outcomes: list[tuple[Any, float]] = []
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        threads = [
            threading.Thread(
                target=lambda s=s: outcomes.append(
                    timed(lambda: s.enqueue(message(), now=NOW), within=4 * BOUND + SLACK)
                )
            )
            for s in stores
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        other.execute("ROLLBACK")
    assert len(outcomes) == 4
    assert all(isinstance(error, StoreLocked) for error, _ in outcomes), outcomes
    assert max(took for _, took in outcomes) <= BOUND + SLACK, outcomes
    for store in stores:
        store.close()


def test_a_group_commit_enqueue_waits_its_own_busy_timeout(db: Path) -> None:
    """Three threads of one store enqueue behind another program's transaction, 0.12 s
    and 0.42 s apart (busy_timeout 0.6 s), and it ends at 0.87 s: the first two fail, each
    after its own busy_timeout, though the second was carried by a leader whose time ran
    out first; the third, back in the queue, is committed once the lock is free."""
    store = SQLiteStore(db, busy_timeout=0.6)
    outcomes: dict[int, tuple[Any, float]] = {}

    def enqueue(n: int) -> None:
        outcomes[n] = timed(lambda: store.enqueue(message(f"t{n}@example.org"), now=NOW), within=2)

    began = time.monotonic()
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        threads = []
        for n, at in enumerate((0.0, 0.12, 0.42)):
            time.sleep(max(at - (time.monotonic() - began), 0))
            threads.append(threading.Thread(target=enqueue, args=(n,)))
            threads[-1].start()
        time.sleep(max(0.87 - (time.monotonic() - began), 0))
        other.execute("ROLLBACK")
    for thread in threads:
        thread.join(5)
    (first, took1), (second, took2), (third, _) = outcomes[0], outcomes[1], outcomes[2]
    assert isinstance(first, StoreLocked) and isinstance(second, StoreLocked), outcomes
    assert took1 >= 0.55 and took2 >= 0.55, outcomes
    assert isinstance(third, str), outcomes
    assert [m.address for m in store.status(third).recipients] == ["t2@example.org"]
    assert store.stats().messages == 1
    store.close()


def copies_of_a_finished_message(path: Path, count: int, *, state: RecipientState) -> None:
    """``count`` messages in ``path`` whose one recipient is final in ``state`` (copies of
    one made through the store: thousands through the API take too long)."""
    store = SQLiteStore(path)
    try:
        first = store.enqueue(message("a@example.org"), now=NOW)
        store.record(results_for(lease_all(store), state))
    finally:
        store.close()
    copies_of_a_message(path, first, count - 1)


def write_lock_held(path: Path) -> bool:
    with closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as conn:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return True
        conn.execute("ROLLBACK")
        return False


def test_a_large_purge_lets_other_writers_in_between_its_batches(db: Path) -> None:
    """A purge deleted every old message in one transaction: 100,000 held the write lock
    12 s, and every send_email (and the worker's writes) waited behind it, or failed with
    StoreLocked past busy_timeout. It now deletes in batches, and an enqueue made while
    it runs gets in after one batch, not after the whole purge."""
    count = 30_000
    copies_of_a_finished_message(db, count, state=RecipientState.DELIVERED)
    purging, other = SQLiteStore(db), SQLiteStore(db)  # two processes, as it were
    ended: dict[str, float] = {}
    purged: list[int] = []

    def purge() -> None:
        purged.append(purging.purge(finished_before=NOW + timedelta(days=1)))
        ended["purge"] = time.monotonic()

    thread = threading.Thread(target=purge)
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while not write_lock_held(db):
            assert thread.is_alive() and time.monotonic() < deadline, "the purge never wrote"
        kept = other.enqueue(message("z@example.org"), now=NOW)
        ended["enqueue"] = time.monotonic()
        thread.join(60)
        assert not thread.is_alive()
        assert ended["enqueue"] < ended["purge"], "the enqueue waited for the whole purge"
        assert purged == [count]  # the same result as one transaction
        assert other.status(kept).state is RecipientState.QUEUED
        assert other.stats().messages == 1
    finally:
        thread.join(60)
        purging.close()
        other.close()


def test_a_purge_in_batches_deletes_what_one_transaction_did(db: Path) -> None:
    """More than a batch of delivered and of failed messages, and a pending one: a purge
    by state takes exactly its state's, across batch boundaries, and purge the rest."""
    copies_of_a_finished_message(db, 700, state=RecipientState.DELIVERED)
    copies_of_a_finished_message(db, 900, state=RecipientState.FAILED)
    store = SQLiteStore(db)
    try:
        pending = store.enqueue(message("p@example.org"), now=NOW)
        later = NOW + timedelta(days=1)
        assert store.purge_state(finished_before=NOW, state=RecipientState.FAILED) == 0
        assert store.purge_state(finished_before=later, state=RecipientState.FAILED) == 900
        assert store.stats().messages == 701
        assert store.purge(finished_before=later) == 700
        assert store.purge(finished_before=later) == 0
        assert store.stats().messages == 1
        assert store.status(pending).state is RecipientState.QUEUED
    finally:
        store.close()


BULK: dict[str, Callable[[SQLiteStore, list[str]], int]] = {
    "cancel_many": lambda store, ids: store.cancel_many(ids, now=NOW),
    "hold_many": lambda store, ids: store.hold_many(ids, True),
    "retry_many": lambda store, ids: store.retry_many(ids, now=NOW),
    "purge_many": lambda store, ids: store.purge_many(ids),
}


@pytest.mark.parametrize("name", sorted(BULK))
def test_a_large_bulk_change_lets_other_writers_in_between_its_batches(db: Path, name: str) -> None:
    """``mailstrom cancel --all`` on 100,000 messages held the write lock 34 s in one
    transaction (a loaded machine), past the 30 s busy_timeout: send_email failed with
    StoreLocked. The listed messages are now changed BULK_BATCH a transaction, and an
    enqueue made meanwhile gets in after one batch, not after the whole change, which
    reports the same total."""
    count = 12 * BULK_BATCH
    if name == "purge_many":
        copies_of_a_finished_message(db, count, state=RecipientState.DELIVERED)
    changing, other = SQLiteStore(db), SQLiteStore(db)  # two processes, as it were
    if name != "purge_many":
        for _ in range(0, count, 1000):
            changing.enqueue_many([message("a@example.org")] * 1000, now=NOW)
    with closing(sqlite3.connect(db)) as conn:
        ids = [mid for (mid,) in conn.execute("SELECT id FROM messages")]
    assert len(ids) == count
    ended: dict[str, float] = {}
    changed: list[int] = []

    def change() -> None:
        changed.append(BULK[name](changing, ids))
        ended["change"] = time.monotonic()

    thread = threading.Thread(target=change)
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while not write_lock_held(db):
            assert thread.is_alive() and time.monotonic() < deadline, "the change never wrote"
        kept = other.enqueue(message("z@example.org"), now=NOW)
        ended["enqueue"] = time.monotonic()
        thread.join(60)
        assert not thread.is_alive()
        assert ended["enqueue"] < ended["change"], "the enqueue waited for the whole change"
        assert changed == [count]  # the same total as one transaction
        assert other.status(kept).state is RecipientState.QUEUED
        assert not other.status(kept).held
    finally:
        thread.join(60)
        changing.close()
        other.close()

"""SQLite: the leases of a process that died are given back by the next store that looks
(``SQLiteStore.release_dead_holders``), told by the lock file each holder keeps locked.

The processes are real: a child leases and sleeps, the test SIGKILLs it, and the kernel's
release of its ``flock`` is what tells it died.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailstrom.errors import StoreError
from mailstrom.stores import SQLiteStore
from mailstrom.stores.dead_holders import DeadHolderReaper
from mailstrom.stores.memory import MemoryStore

from .children import lease_in_child
from .support import LEASE_FOR, NOW, leased_addresses, message

X = "0123abcd0123abcd"
Y = "89abcdef89abcdef"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
def store(db: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(db)
    yield store
    store.close()


def _kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(10)


def _lock_file(db: Path, holder: str) -> Path:
    return db.parent / f"{db.name}-holders" / f"{holder}.lock"


def test_what_a_killed_process_leased_is_given_back_at_once(
    db: Path,
    store: SQLiteStore,
    children: list[subprocess.Popen[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    mid = store.enqueue(message("a@example.org", "b@example.org", "c@example.org"), now=NOW)
    child = lease_in_child(children, f"sqlite:///{db}", X, 2, beat=False)
    assert _lock_file(db, X).is_file()
    assert store.release_dead_holders() == 0  # alive: nothing to give back
    _kill(child)

    with caplog.at_level(logging.WARNING):
        assert store.release_dead_holders() == 2

    # Due at once (the child's lease ran for 10 minutes), no attempt counted.
    again = store.lease(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert sorted(leased_addresses(again)) == ["a@example.org", "b@example.org", "c@example.org"]
    assert [r.attempts for r in store.status(mid).recipients] == [0, 0, 0]
    assert not _lock_file(db, X).exists()
    assert [r.getMessage() for r in caplog.records if X in r.getMessage()] == [
        f"gave back 2 recipients leased by lease holder {X}, whose worker process died"
        f" (its lock file {_lock_file(db, X)} was no longer locked)"
    ]
    assert store.release_dead_holders() == 0  # once


def test_a_holder_whose_process_lives_is_left_alone(
    db: Path, store: SQLiteStore, children: list[subprocess.Popen[str]]
) -> None:
    store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    dead = lease_in_child(children, f"sqlite:///{db}", X, 1, beat=False)
    lease_in_child(children, f"sqlite:///{db}", Y, 1, beat=False)  # still sleeping
    _kill(dead)

    assert store.release_dead_holders() == 1
    assert leased_addresses(store.lease(now=NOW, limit=10, lease_for=LEASE_FOR)) == [
        "a@example.org"
    ]
    assert _lock_file(db, Y).is_file()
    assert not _lock_file(db, X).exists()


def test_a_stores_own_holders_are_never_given_back(db: Path, store: SQLiteStore) -> None:
    store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    assert store.lease(now=NOW, limit=1, lease_for=LEASE_FOR, holder=X) is not None
    _, lease = store.record_and_lease([], now=NOW, limit=1, lease_for=LEASE_FOR, holder=Y)
    assert lease is not None
    assert store.release_dead_holders() == 0
    # Another store in this process sees them alive too: the lock is the open file's.
    other = SQLiteStore(db)
    try:
        assert other.release_dead_holders() == 0
        assert _lock_file(db, X).is_file() and _lock_file(db, Y).is_file()
        assert other.lease(now=NOW, limit=10, lease_for=LEASE_FOR) is None
    finally:
        other.close()
    assert store.release_holder(X) == 1 and store.release_holder(Y) == 1
    store.close()  # closing removes them: the store gave back what it leased
    assert not _lock_file(db, X).exists() and not _lock_file(db, Y).exists()


def test_what_a_closed_store_left_leased_is_given_back_at_the_next_look(
    db: Path, store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A store closed while it still leased (a worker's stop that ran out of time, or
    whose give-back failed) removed its holders' lock files all the same, so no look
    ever found them: their recipients waited for the lease to expire (15 minutes by
    default), where the PostgreSQL store's next look gives them back. The file of a
    holder that still leases is left, unlocked, for the next look."""
    leaving = SQLiteStore(db)
    leaving.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    assert leaving.lease(now=NOW, limit=1, lease_for=LEASE_FOR, holder=X) is not None
    assert leaving.lease(now=NOW, limit=1, lease_for=LEASE_FOR, holder=Y) is not None
    assert leaving.release_holder(Y) == 1  # Y gave back what it leased, X did not
    leaving.close()

    assert store.live_holders() == []  # closed: not among the living
    assert not _lock_file(db, Y).exists()
    with caplog.at_level(logging.WARNING):
        assert store.release_dead_holders() == 1
    assert any(X in r.getMessage() for r in caplog.records)
    assert not _lock_file(db, X).exists()
    assert len(leased_addresses(store.lease(now=NOW, limit=10, lease_for=LEASE_FOR))) == 2


def test_other_names_in_the_directory_are_ignored(db: Path, store: SQLiteStore) -> None:
    store.enqueue(message("a@example.org"), now=NOW)
    assert store.lease(now=NOW, limit=1, lease_for=LEASE_FOR, holder=X) is not None
    holders = _lock_file(db, X).parent
    strangers = ["notes.txt", "0123ABCD.lock", "0123abc.lock", ".lock", f".{Y}.ab12cd34.tmp"]
    for name in strangers:
        (holders / name).write_text("")
    (holders / f"{Y}.lock").mkdir()  # a holder's name, but no file
    os.mkfifo(holders / "fedcba9876543210.lock")  # opened, it must not hang the look
    dead = holders / "00000000.lock"  # a holder that died holding nothing
    dead.write_text("")

    assert store.release_dead_holders() == 0
    assert not dead.exists()
    assert sorted(p.name for p in holders.iterdir()) == sorted(
        [*strangers, f"{Y}.lock", "fedcba9876543210.lock", f"{X}.lock"]
    )


def test_a_temporary_lock_file_left_by_a_process_that_died_making_it_goes(
    db: Path, store: SQLiteStore
) -> None:
    """A process killed between making its temporary lock file and renaming it leaves
    it; one older than an hour is removed by a look (a fresh one may be being made)."""
    assert store.enqueue(message("a@example.org"), now=NOW)
    assert store.lease(now=NOW, limit=1, lease_for=LEASE_FOR, holder=X) is not None
    holders = _lock_file(db, X).parent
    stale, fresh, other = (
        holders / f".{Y}.ab12cd34.tmp",
        holders / f".{Y}.0badf00d.tmp",
        holders / ".notes.tmp",  # not ours: left alone, however old
    )
    for path in (stale, fresh, other):
        path.write_text("")
    two_hours_ago = time.time() - 7200
    for path in (stale, other):
        os.utime(path, (two_hours_ago, two_hours_ago))

    assert store.release_dead_holders() == 0
    assert not stale.exists()
    assert fresh.exists() and other.exists() and _lock_file(db, X).exists()


def test_lock_files_get_the_database_files_permissions(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    SQLiteStore(db).close()
    os.chmod(db, 0o640)
    store = SQLiteStore(db)
    try:
        store.enqueue(message("a@example.org"), now=NOW)
        assert store.lease(now=NOW, limit=1, lease_for=LEASE_FOR, holder=X) is not None
        assert _lock_file(db, X).stat().st_mode & 0o777 == 0o640
        assert _lock_file(db, X).parent.stat().st_mode & 0o777 == 0o750
    finally:
        store.close()


def _no_holder_directory(db: Path) -> None:
    """Make ``<db>-holders`` impossible to use: read-only, or (for root, whom permissions
    do not stop) a file in its place."""
    holders = db.parent / f"{db.name}-holders"
    if os.geteuid() == 0:
        holders.write_text("")
    else:
        holders.mkdir(mode=0o500)


def test_a_lock_file_that_cannot_be_made_costs_no_lease(
    db: Path, store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    _no_holder_directory(db)
    store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    with caplog.at_level(logging.WARNING):
        assert leased_addresses(store.lease(now=NOW, limit=1, lease_for=LEASE_FOR, holder=X)) == [
            "a@example.org"
        ]
        _, lease = store.record_and_lease([], now=NOW, limit=1, lease_for=LEASE_FOR, holder=Y)
        assert leased_addresses(lease) == ["b@example.org"]
        assert store.release_dead_holders() == 0  # and looking raises nothing
        assert store.release_dead_holders() == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # once for making, once for looking: not per call
    assert "cannot make the lock file" in warnings[0] and X in warnings[0]
    assert "wait for lease_for" in warnings[0]


def test_a_memory_store_cannot_tell_dead_holders(store: SQLiteStore) -> None:
    assert isinstance(store, DeadHolderReaper)
    assert not isinstance(MemoryStore(), DeadHolderReaper)


def test_live_holders_are_those_whose_lock_is_held_with_who_made_them(
    db: Path, store: SQLiteStore, children: list[subprocess.Popen[str]]
) -> None:
    store.enqueue(message("a@example.org", "b@example.org", "c@example.org"), now=NOW)
    child = lease_in_child(children, f"sqlite:///{db}", X, 2, beat=False)
    assert store.release_dead_holders(Y) == 0  # a worker's first look: Y shows from now on

    [x, y] = sorted(store.live_holders(), key=lambda h: h.holder)
    assert (x.holder, x.pid, x.host, x.leased, x.seen_at) == (
        X,
        child.pid,
        socket.gethostname(),
        2,
        None,  # alive at this moment: its lock is held
    )
    assert x.started_at is not None and x.started_at.tzinfo is not None
    assert (y.holder, y.pid, y.leased) == (Y, os.getpid(), 0)
    assert [h.leased for h in store.live_holders(leases=False)] == [0, 0]

    _kill(child)
    assert [h.holder for h in store.live_holders()] == [Y]  # its file stays until reaped
    assert _lock_file(db, X).is_file()


def test_a_lock_file_that_says_nothing_readable_still_counts_by_its_lock(
    db: Path, store: SQLiteStore
) -> None:
    store.release_dead_holders(X)
    _lock_file(db, X).write_bytes(b"\xff{" * 4000)  # not ours to trust: anyone may write it
    [x] = store.live_holders()
    assert (x.holder, x.host, x.pid, x.started_at) == (X, None, None, None)


def test_who_runs_is_unknown_when_the_directory_cannot_be_read(db: Path) -> None:
    store = SQLiteStore(db)
    try:
        db.parent.joinpath(f"{db.name}-holders").write_text("not a directory")
        with pytest.raises(StoreError, match="which workers run is unknown: cannot list"):
            store.live_holders()
    finally:
        store.close()

"""How the SQLite store opens its file: permanent errors, read-only mode, file permissions."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.contract.support import NOW, message

from mailstrom.errors import InvalidArgument, StoreCorrupt, StoreError
from mailstrom.runtime.store_opening import StoreOpener, worth_waiting
from mailstrom.stores import SQLiteStore
from mailstrom.stores.sqlite_schema import migrations


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


def corrupt(path: Path) -> None:
    """Overwrite every page after the first (the schema) with garbage."""
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    for i in range(page, len(data)):
        data[i] = 0xA5
    path.write_bytes(bytes(data))


# --- permanent errors ----------------------------------------------------------------------


def test_a_file_that_is_no_database_is_corrupt(db: Path) -> None:
    """Hardening #18: "file is not a database" is StoreCorrupt, not a passing StoreError."""
    db.write_text("<?php system($_GET['c']); ?>\n" * 200)
    with pytest.raises(StoreCorrupt, match="not a mailstrom database"):
        SQLiteStore(db)
    with pytest.raises(StoreCorrupt):
        SQLiteStore(db, read_only=True)


def test_a_file_that_is_no_database_leaves_no_connection_open(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection whose first pragma found no database was left to the garbage
    collector, which Python 3.13 reports (ResourceWarning: unclosed database)."""
    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def recording(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(connect(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sqlite3, "connect", recording)
    db.write_text("not a database\n" * 200)
    with pytest.raises(StoreCorrupt):
        SQLiteStore(db)
    assert opened
    for conn in opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")


def test_a_malformed_database_is_corrupt(db: Path) -> None:
    """Hardening #18: "database disk image is malformed" is StoreCorrupt."""
    store = SQLiteStore(db)
    for _ in range(20):
        store.enqueue(message(data=b"Subject: x\r\n\r\n" + b"y" * 4000 + b"\r\n"), now=NOW)
    store.close()
    corrupt(db)

    def count(read_only: bool) -> int:
        opened = SQLiteStore(db, read_only=read_only)
        try:
            return opened.stats().messages
        finally:
            opened.close()

    for read_only in (False, True):
        with pytest.raises(StoreCorrupt, match="malformed"):
            count(read_only)


def test_a_newer_schema_is_corrupt(db: Path) -> None:
    """Hardening #18: a schema newer than this mailstrom is StoreCorrupt (retrying cannot
    fix it); read-only opening checks it too."""
    SQLiteStore(db).close()
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("PRAGMA user_version = 9999")
    for read_only in (False, True):
        with pytest.raises(StoreCorrupt, match="newer"):
            SQLiteStore(db, read_only=read_only)


def another_process_migrates_first(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next open's migration find the schema moved past this mailstrom under
    the write lock, as when another process took the lock first and migrated."""
    import mailstrom.stores.sqlite as sqlite_module

    migrate = sqlite_module.migrate

    def newer_first(conn: sqlite3.Connection) -> int:
        with closing(sqlite3.connect(db)) as other, other:
            other.execute("PRAGMA user_version = 9999")  # the other process won the lock
        return migrate(conn)

    monkeypatch.setattr(sqlite_module, "migrate", newer_first)


def test_a_newer_schema_migrated_by_another_process_meanwhile_is_corrupt(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two versions starting on an older store at once (a rolling upgrade): the newer
    one took the write lock first and migrated past this mailstrom. What this one's
    migration then read under the lock was a plain StoreError, so a starting worker
    waited for ever for a schema it can never understand, and no path was named."""

    another_process_migrates_first(db, monkeypatch)
    with pytest.raises(StoreCorrupt, match="newer") as raised:
        SQLiteStore(db)
    assert str(db) in str(raised.value)
    assert not worth_waiting(raised.value)


def test_an_enqueue_a_newer_mailstroms_migration_broke_is_corrupt(db: Path) -> None:
    """A rolling upgrade: a newer mailstrom migrated the queue under this running one and
    moved a column that enqueue writes (as version 20 moved messages.data out). SQLite
    says "table messages has no column named ...", which was a plain StoreError:
    send_email failed as if for a passing trouble, to be retried for ever. It is
    StoreCorrupt saying why, for every call from then on, and nothing is written."""
    store = SQLiteStore(db)
    try:
        store.enqueue(message(), now=NOW)
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("ALTER TABLE messages RENAME COLUMN subject TO subject_text")
            conn.execute("PRAGMA user_version = 9999")
        with pytest.raises(StoreCorrupt) as raised:
            store.enqueue(message(), now=NOW)
        text = str(raised.value)
        assert f"{db}: database schema version 9999 is newer" in text
        assert "migrated it while this one had it open" in text
        with pytest.raises(StoreCorrupt, match="9999"):
            store.stats()
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (1,)


def test_a_newer_schema_advises_a_restart_as_well_as_an_upgrade(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer schema said only "upgrade mailstrom". A process that was running while
    another one migrated the file (a rolling upgrade) runs the code it started with: the
    mailstrom installed may be the new one already, and a restart is what it needs. At
    open, as under a store already open, this mailstrom cannot tell which: it says both."""

    def advises_both(error: StoreCorrupt) -> None:
        assert "upgrade mailstrom" in str(error)
        assert "restart this process" in str(error)

    store = SQLiteStore(db)
    try:
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("PRAGMA user_version = 9999")
        with pytest.raises(StoreCorrupt, match="while this one had it open") as raised:
            store.lease(now=NOW, limit=10, lease_for=timedelta(minutes=5))
        advises_both(raised.value)
    finally:
        store.close()
    for read_only in (False, True):  # found at open
        with pytest.raises(StoreCorrupt, match="newer") as raised:
            SQLiteStore(db, read_only=read_only)
        advises_both(raised.value)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(f"PRAGMA user_version = {migrations()[-1][0] - 1}")
    another_process_migrates_first(db, monkeypatch)
    with pytest.raises(StoreCorrupt, match="newer") as raised:  # migrated as this one opened
        SQLiteStore(db)
    advises_both(raised.value)


@pytest.mark.parametrize("table", ["users", "messages"])
def test_another_programs_database_is_not_a_mailstrom_database(db: Path, table: str) -> None:
    """A store URL naming another program's SQLite file (an application's db.sqlite3):
    mailstrom added its tables to it (and made it WAL), or, where a name was taken,
    failed with a passing StoreError ("table messages already exists") retried for ever;
    a view told the user to run `mailstrom db migrate` on it."""
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT)")
    before = db.read_bytes()
    for read_only in (True, False):
        with pytest.raises(StoreCorrupt, match="not a mailstrom database") as raised:
            SQLiteStore(db, read_only=read_only)
        assert not worth_waiting(raised.value)
    assert db.read_bytes() == before
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [(table,)]


@pytest.mark.parametrize("version", [3, migrations()[-1][0], -1])
def test_another_programs_versioned_database_is_not_a_mailstrom_database(
    db: Path, version: int
) -> None:
    """Many programs number their own schema with ``PRAGMA user_version`` too. Such a file
    (version 3) was made WAL, then failed with a passing StoreError ("no such table:
    messages") retried for ever; at mailstrom's own version it opened as an empty queue
    whose every call failed. A version without mailstrom's tables is StoreCorrupt, the
    file left as it was (its journal mode too)."""
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute(f"PRAGMA user_version = {version:d}")
    before = db.read_bytes()
    for read_only in (True, False):
        with pytest.raises(StoreCorrupt, match="not a mailstrom database") as raised:
            SQLiteStore(db, read_only=read_only)
        assert not worth_waiting(raised.value)
    assert db.read_bytes() == before
    assert not (db.parent / "queue.db-lock").exists()


def test_a_busy_timeout_past_sqlites_range_still_waits(db: Path) -> None:
    """SQLite takes its busy timeout as a C int of milliseconds: 25 days or more wrapped
    to 0, so a store told to wait long did not wait at all for another program's lock;
    an infinite one raised OverflowError, NaN ValueError."""
    store = SQLiteStore(db, busy_timeout=40 * 86400)
    try:
        with store._read() as conn:
            (waits,) = conn.execute("PRAGMA busy_timeout").fetchone()
        assert waits == 2**31 - 1
    finally:
        store.close()
    for wrong in (float("inf"), float("nan"), "5"):
        with pytest.raises(InvalidArgument, match="busy_timeout"):
            SQLiteStore(db, busy_timeout=wrong)  # type: ignore[arg-type]


def test_a_commit_delay_that_is_no_number_of_seconds_is_refused_at_open(db: Path) -> None:
    """``commit_delay`` was taken as it came: an infinite one or a string failed only
    later, in the leader of a group commit, and every concurrent enqueue it carried with
    it (a lone one never gathers, so tests passed) as "enqueue not committed:
    OverflowError" or "TypeError", a StoreError that reads as worth retrying."""
    for wrong in (float("inf"), float("nan"), "0.001", True):
        with pytest.raises(InvalidArgument, match="commit_delay"):
            SQLiteStore(db, commit_delay=wrong)  # type: ignore[arg-type]
    assert not db.exists()  # refused before anything was made
    SQLiteStore(db, commit_delay=0).close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_path_that_is_no_regular_file_is_corrupt(db: Path, kind: str) -> None:
    """A directory was a passing StoreError ("disk I/O error"), retried for ever; a FIFO
    hung a read-only open (SQLite waits in open() for a writer to come)."""
    if kind == "directory":
        db.mkdir()
    else:
        os.mkfifo(db)
    for read_only in (False, True):
        with pytest.raises(StoreCorrupt, match="not a regular file"):
            SQLiteStore(db, read_only=read_only)


def test_a_deleted_database_file_is_corrupt(db: Path) -> None:
    """Hardening #18: the file deleted under an open store is StoreCorrupt; no new empty
    database is created in its place."""
    store = SQLiteStore(db)
    try:
        store.enqueue(message(), now=NOW)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        with pytest.raises(StoreCorrupt, match="deleted"):
            store.enqueue(message(), now=NOW)
        assert not db.exists()
    finally:
        store.close()


def test_a_wal_file_deleted_under_an_open_store_is_named(db: Path) -> None:
    """The -wal file deleted while a store has the database open (a clean-up of "stray"
    files, a backup moving it away): a new store opening it got SQLite's bare "disk I/O
    error", exit 75, tried again for ever. StoreCorrupt now names the file and says what
    to do; once every process holding it has closed it, the database opens again with
    all its mail (what the deleted file held is written into it: by the store that had
    it open at its next write, which it refuses, or when that store is closed)."""
    running = SQLiteStore(db)
    try:
        running.enqueue(message(), now=NOW)
        Path(f"{db}-wal").unlink()
        for read_only in (False, True):
            with pytest.raises(StoreCorrupt) as failed:
                SQLiteStore(db, read_only=read_only)
            text = str(failed.value)
            assert f"{db}-wal" in text and "deleted" in text and "Stop every process" in text
        with pytest.raises(StoreCorrupt, match=r"-wal file .* was deleted"):
            running.enqueue(message(), now=NOW)
    finally:
        running.close()
    store = SQLiteStore(db)
    try:
        assert store.stats().messages == 1
    finally:
        store.close()


def test_a_queue_file_truncated_to_nothing_is_corrupt_not_an_empty_queue(db: Path) -> None:
    """A queue file cut to 0 bytes (a restore from an empty copy, ``: > queue.db``) opened
    as a new, empty queue: its mail was gone without a word, and a ``-wal`` file still
    holding committed mail is deleted by SQLite for a database of no pages. A file that
    was a queue (its ``-lock`` file is beside it) and is now empty is StoreCorrupt."""
    store = SQLiteStore(db)
    try:
        store.enqueue(message(), now=NOW)
    finally:
        store.close()
    db.write_bytes(b"")
    for read_only in (False, True):
        with pytest.raises(StoreCorrupt, match="0 bytes"):
            SQLiteStore(db, read_only=read_only)
    assert db.stat().st_size == 0  # left as found, for whoever restores it


def test_an_empty_file_never_used_for_a_queue_opens_as_a_new_one(db: Path) -> None:
    """An empty file nobody kept a queue in (made beforehand with its mode, or by another
    process opening the new store at the same moment) is a new queue."""
    db.touch()
    store = SQLiteStore(db)
    try:
        assert store.stats().messages == 0
    finally:
        store.close()


def test_a_replaced_database_file_is_corrupt(db: Path, tmp_path: Path) -> None:
    """Hardening #18: the file replaced (renamed over) under an open store is StoreCorrupt."""
    store = SQLiteStore(db)
    try:
        store.enqueue(message(), now=NOW)
        other = tmp_path / "other.db"
        SQLiteStore(other).close()
        os.replace(other, db)
        with pytest.raises(StoreCorrupt, match="replaced"):
            store.stats()
    finally:
        store.close()


def test_a_new_store_opens_while_another_process_makes_it_wal(db: Path) -> None:
    """Several processes opening a new store at once (`mailstrom workers`, an application's
    processes starting): one that found the file in rollback mode while another held its
    write lock to make it WAL got SQLite's "database is locked" at once, without its busy
    handler (a lock upgrade it may not wait for), and failed in a few milliseconds with
    StoreLocked saying it had waited busy_timeout (6-process races: 2 failures in 40)."""
    db.touch()  # made by the other process, which now turns it into a WAL database
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    done = threading.Timer(0.2, lambda: other.execute("ROLLBACK"))
    done.start()
    try:
        store = SQLiteStore(db, busy_timeout=30)
        store.enqueue(message(), now=NOW)
        assert store.stats().messages == 1
        store.close()
    finally:
        done.join()
        other.close()


# --- read-only -----------------------------------------------------------------------------


def test_a_current_store_opens_while_another_connection_writes(db: Path) -> None:
    """Opening a store whose schema is current takes no write lock: it neither waits
    behind another writer (a long purge, a bulk enqueue) nor fails after the busy
    timeout. A worker process opening its store, or an application starting, did."""
    SQLiteStore(db).close()
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        store = SQLiteStore(db, busy_timeout=0.05)
        store.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_read_only_opening_writes_nothing(db: Path) -> None:
    """Hardening #18: read_only=True reads a store without writing to its file: no pragma
    that writes, no migration; writes are refused."""
    store = SQLiteStore(db)
    mid = store.enqueue(message(), now=NOW)
    store.close()
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    for name in (db.name, f"{db.name}-wal", f"{db.name}-shm"):
        path = db.parent / name
        if path.exists():
            path.chmod(0o444)
    db.chmod(0o444)
    store = SQLiteStore(db, read_only=True)
    try:
        assert store.status(mid).id == mid
        assert store.stats().messages == 1
        assert [m.id for m in store.recent()] == [mid]
        with pytest.raises(StoreError, match="readonly"):
            store.retry(mid, now=NOW)
    finally:
        store.close()
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before


def test_read_only_reads_a_store_in_a_directory_it_may_not_write() -> None:
    """A user who may read the queue but not write its directory (a monitoring account,
    the dashboard's user in the queue's group) and a store closed cleanly (no -wal file):
    SQLite cannot make the -shm file and says SQLITE_READONLY_DIRECTORY ("attempt to
    write a readonly database"), which only a read-only mount's SQLITE_CANTOPEN was taken
    for, so every view failed where it reads the file as it is on a read-only mount."""
    # Not under tmp_path, whose parent only its owner may search: another user's test.
    folder = Path(tempfile.mkdtemp(prefix="mailstrom-spool-"))
    try:
        _read_only_in(folder)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


def _read_only_in(folder: Path) -> None:
    db = folder / "queue.db"
    store = SQLiteStore(db)
    mid = store.enqueue(message(), now=NOW)
    store.close()
    assert not Path(f"{db}-wal").exists()
    warm = SQLiteStore(db, read_only=True)  # imports what the child needs, as root too
    assert warm.status(mid).id == mid and warm.stats().messages == 1
    warm.close()
    assert Path(f"{db}-wal").stat().st_size == 0  # left by that read, empty: closed cleanly
    for left in (f"{db}-wal", f"{db}-shm"):
        os.unlink(left)

    def read() -> str:
        reader = SQLiteStore(db, read_only=True)
        try:
            return f"{reader.status(mid).id} {reader.stats().messages}"
        finally:
            reader.close()

    assert _as_another_user(folder, 0o555, read) == f"{mid} 1"
    assert sorted(p.name for p in folder.iterdir()) == ["queue.db", "queue.db-lock"]


@pytest.mark.parametrize(
    ("folder_mode", "file_mode", "named"),
    [(0o555, 0o600, "may not create files in {folder}"), (0o755, 0o000, "may not read {db}")],
    ids=["directory", "file"],
)
def test_a_store_its_user_may_not_write_says_why(
    folder_mode: int, file_mode: int, named: str
) -> None:
    """A queue whose directory its user may not write (SQLite cannot make the -wal file
    there) or whose file it may not read (another user's 0600 file): the store said
    "attempt to write a readonly database" or "unable to open database file", which
    names neither what is wrong nor where."""
    folder = Path(tempfile.mkdtemp(prefix="mailstrom-spool-"))
    try:
        db = folder / "queue.db"
        SQLiteStore(db).close()
        db.chmod(file_mode)

        def open_it() -> str:
            SQLiteStore(db).close()
            return "opened"

        said = _as_another_user(folder, folder_mode, open_it)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)
    assert said.startswith("StoreAccessDenied: ")
    assert named.format(folder=folder, db=db) in said


@pytest.mark.parametrize(
    ("folder_mode", "file_mode", "named"),
    [
        (0o555, 0o600, "may not create files in {folder}"),
        (0o755, 0o000, "may not read {db}"),
        (0o555, None, "may not create {db}"),
    ],
    ids=["directory", "unreadable", "missing"],
)
def test_a_store_its_user_may_not_use_is_not_waited_for(
    folder_mode: int, file_mode: int | None, named: str
) -> None:
    """A worker starting on a store its user may not read or write (a spool made by
    root, a file another user's 0600) waited for it for ever, a warning every 5 s: the
    error was a plain StoreError, worth trying again. Permissions do not change by
    waiting: it is StoreAccessDenied, which the worker exits on (78), naming the path and
    the permission missing."""
    folder = Path(tempfile.mkdtemp(prefix="mailstrom-spool-"))
    try:
        db = folder / "queue.db"
        if file_mode is not None:
            SQLiteStore(db).close()
            db.chmod(file_mode)

        def open_it() -> str:
            opener = StoreOpener(lambda: SQLiteStore(db), on_change=lambda: opener.stop())
            store = opener.open()  # the first failure worth waiting for stops the wait
            if store is None:
                return "waited"
            store.close()
            return "opened"

        said = _as_another_user(folder, folder_mode, open_it)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)
    assert said.startswith("StoreAccessDenied: "), said
    assert named.format(folder=folder, db=db) in said


@pytest.mark.parametrize("theirs", [False, True], ids=["read-only-mode", "another-users-0644"])
def test_a_store_file_its_user_may_read_but_not_write_is_not_waited_for(theirs: bool) -> None:
    """A queue file its user may read but not write (its own at 0400, or another user's
    at 0644) in a directory it may write: SQLite opened it read-only without a word, the
    store opened, and only each write then failed ("attempt to write a readonly
    database"): a started worker, past the opener, retried its leases for ever. A missing
    write permission is permanent: opening it to write is StoreAccessDenied naming the
    file (the opener does not wait, the worker exits 78); opening it read-only (the
    views) still reads it."""
    if theirs and os.geteuid() != 0:
        pytest.skip("another user's file needs root to make")
    folder = Path(tempfile.mkdtemp(prefix="mailstrom-spool-"))
    try:
        db = folder / "queue.db"
        store = SQLiteStore(db)
        mid = store.enqueue(message(), now=NOW)
        store.close()
        db.chmod(0o644 if theirs else 0o400)

        def open_it() -> str:
            reader = SQLiteStore(db, read_only=True)
            try:
                seen = f"{reader.status(mid).id} {reader.stats().messages}"
            finally:
                reader.close()
            opener = StoreOpener(lambda: SQLiteStore(db), on_change=lambda: opener.stop())
            try:
                writer = opener.open()  # the first failure worth waiting for stops the wait
            except StoreError as exc:
                return f"{seen}; {type(exc).__name__}: {exc}"
            if writer is None:
                return f"{seen}; waited"
            try:
                writer.enqueue(message(), now=NOW)
                return f"{seen}; opened and wrote"
            except StoreError as exc:
                return f"{seen}; opened, then {type(exc).__name__}: {exc}"
            finally:
                writer.close()

        said = _as_another_user(folder, 0o755, open_it, theirs=(db,) if theirs else ())
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)
    assert said.startswith(f"{mid} 1; StoreAccessDenied: "), said
    assert f"may not write {db}" in said


def test_a_default_store_whose_directory_cannot_be_made_is_not_waited_for() -> None:
    """The default store's directories (``$XDG_STATE_HOME/mailstrom``) are made at its
    first open; a user who may not make them (a state directory of another user's, or
    read-only to this one) got a plain StoreError, and a starting worker waited for it
    for ever. It is StoreAccessDenied, naming the directory."""
    from mailstrom.stores.url import open_sqlite

    folder = Path(tempfile.mkdtemp(prefix="mailstrom-state-"))

    def open_it() -> str:
        os.environ["XDG_STATE_HOME"] = str(folder)  # in the forked child only
        path = str(folder / "mailstrom" / "queue.db")
        opener = StoreOpener(lambda: open_sqlite(path), on_change=lambda: opener.stop())
        store = opener.open()
        if store is None:
            return "waited"
        store.close()
        return "opened"

    try:
        said = _as_another_user(folder, 0o555, open_it)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)
    assert said.startswith("StoreAccessDenied: "), said
    assert str(folder / "mailstrom") in said


def _as_another_user(
    folder: Path, mode: int, action: Callable[[], str], *, theirs: tuple[Path, ...] = ()
) -> str:
    """What ``action`` returns (or raises, as "Type: message") in a forked process of a
    user who owns ``folder`` and its files, ``folder`` being given ``mode``: nobody's
    when run as root (who may write any directory), the test's own otherwise. Whatever
    ``action`` imports must have been imported already (root's Python may be out of
    nobody's reach). Files in ``theirs`` keep their owner (root's: another user's)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        said = "?"
        try:
            if os.geteuid() == 0:
                for path in (folder, *folder.iterdir()):
                    if path not in theirs:
                        os.chown(path, 65534, 65534)
                os.setgid(65534)
                os.setuid(65534)
            folder.chmod(mode)
            said = action()
        except BaseException as exc:
            said = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write, said.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        said = answer.read().decode()
    os.waitpid(pid, 0)
    return said


def test_read_only_does_not_create_or_migrate(db: Path) -> None:
    """Hardening #18: read-only opening neither creates a missing file nor migrates an old
    one (it says what to run instead)."""
    with pytest.raises(StoreError, match="no mailstrom queue"):
        SQLiteStore(db, read_only=True)
    assert not db.exists()
    sqlite3.connect(db).close()  # an empty database: schema version 0
    with pytest.raises(StoreError, match="db migrate") as info:
        SQLiteStore(db, read_only=True)
    assert not isinstance(info.value, StoreCorrupt)
    with closing(sqlite3.connect(db)) as conn, conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)


def test_read_only_sees_what_an_open_writer_committed(db: Path) -> None:
    """Hardening #18: with a writer open (its -wal file holding recent commits), a
    read-only store reads through the WAL rather than the stale main file."""
    writer = SQLiteStore(db)
    try:
        first = writer.enqueue(message(), now=NOW)
        second = writer.enqueue(message(), now=NOW)
        assert Path(f"{db}-wal").exists()
        reader = SQLiteStore(db, read_only=True)
        try:
            assert {m.id for m in reader.recent()} == {first, second}
        finally:
            reader.close()
    finally:
        writer.close()


def test_schema_constants_are_what_the_store_writes(db: Path) -> None:
    # Guards the tests above: they assume the store writes the latest migration's version.
    SQLiteStore(db).close()
    with closing(sqlite3.connect(db)) as conn, conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (migrations()[-1][0],)


# --- permissions ---------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path | str) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.usefixtures("umask_022")
def test_a_path_whose_name_is_not_utf8_opens(tmp_path: Path) -> None:
    """A directory named in another encoding than UTF-8 (Latin-1 "café": Python reads its
    name with a lone surrogate, as ``os.fsdecode`` does) made the ``file:`` URI of the
    database fail to encode: every open raised UnicodeEncodeError, after the file was
    made. The name's octets are quoted as the file system holds them."""
    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(folder)
    db = os.fsdecode(os.path.join(folder, b"queue.db"))
    store = SQLiteStore(db)
    try:
        mid = store.enqueue(message(), now=NOW)
    finally:
        store.close()
    assert os.listdir(folder).count(b"queue.db") == 1  # that very file, no other
    store = SQLiteStore(db, read_only=True)
    try:
        assert store.status(mid).id == mid
    finally:
        store.close()


def test_queue_files_are_private(db: Path) -> None:
    """Hardening #3: under umask 022 the database, its -wal and its -shm are 0600, so other
    local users cannot read queued mail."""
    store = SQLiteStore(db)
    try:
        store.enqueue(message(), now=NOW)  # the WAL files exist while the store is open
        assert {name: mode(f"{db}{name}") for name in ("", "-wal", "-shm")} == {
            "": 0o600,
            "-wal": 0o600,
            "-shm": 0o600,
        }
    finally:
        store.close()


@pytest.mark.usefixtures("umask_022")
def test_an_existing_file_keeps_its_mode(db: Path) -> None:
    """Hardening #3: an administrator's mode on an existing store file is kept."""
    db.touch(mode=0o660)
    db.chmod(0o660)
    SQLiteStore(db).close()
    assert mode(db) == 0o660


def test_a_dangling_symlink_is_not_followed_to_create_a_file(db: Path, tmp_path: Path) -> None:
    """Hardening #3: a symlink planted where the store will be does not make SQLite create
    a world-readable file at its target."""
    target = tmp_path / "elsewhere.db"
    db.symlink_to(target)
    with pytest.raises(StoreError):
        SQLiteStore(db)
    assert not target.exists()


@pytest.mark.usefixtures("umask_022")
def test_the_write_lock_file_gets_the_mode_of_the_database(db: Path) -> None:
    """The guide's shared queue: ``db migrate`` by the worker's user makes the store
    (0600), the administrator opens it to the group (0660). The ``-lock`` file made by
    that first open stayed 0600 (and one made under umask 022 was 0640): every other
    member of the group failed to open the store ("cannot open queue.db-lock:
    Permission denied", sendmail's exit 75). Its owner now gives it the database's mode
    at its next open, whatever the umask."""
    SQLiteStore(db).close()
    lock = Path(f"{db}-lock")
    assert mode(lock) == 0o600
    db.chmod(0o660)
    SQLiteStore(db).close()
    assert mode(lock) == 0o660
    lock.unlink()
    SQLiteStore(db).close()
    assert mode(lock) == 0o660


def test_a_write_lock_file_that_cannot_be_opened_costs_no_write(
    db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ``-lock`` file only makes writers of several processes find the lock sooner;
    SQLite's lock keeps them apart. A store that cannot open it (another user's file it
    may not read; here a symlink, never followed) writes all the same, and says why."""
    Path(f"{db}-lock").symlink_to(tmp_path / "elsewhere")
    with caplog.at_level("WARNING"):
        store = SQLiteStore(db)
    try:
        mid = store.enqueue(message(), now=NOW)
        assert store.status(mid).id == mid
    finally:
        store.close()
    assert any("-lock" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "elsewhere").exists()


def test_a_write_lock_the_file_system_refuses_costs_no_write(
    db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A file system that opens the ``-lock`` file but refuses ``flock`` on it (ENOLCK
    on an NFS mount without lockd, EOPNOTSUPP on some network and FUSE file systems)
    failed every write with a bare OSError. The lock is a latency device: the store
    writes under SQLite's lock alone, says so once, and asks the file system no more."""
    store = SQLiteStore(db)
    calls: list[int] = []

    def refused(fd: int, operation: int) -> None:
        calls.append(operation)
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refused)
    try:
        with caplog.at_level("WARNING"):
            first = store.enqueue(message(), now=NOW)
            second = store.enqueue(message(), now=NOW)
        assert {store.status(first).id, store.status(second).id} == {first, second}
    finally:
        store.close()
    assert len(calls) == 1
    assert [r for r in caplog.records if "-lock" in r.getMessage()]


def _another_group() -> int | None:
    """A group this process may give its files that is not its own (root: any)."""
    if os.geteuid() == 0:
        return 65534
    return next((g for g in os.getgroups() if g != os.getegid()), None)


@pytest.mark.usefixtures("umask_022")
def test_the_directories_beside_a_shared_queue_keep_its_group(tmp_path: Path) -> None:
    """The guide's spool directory is setgid, so that every file made there belongs to the
    queue's group. The wake-up and holder directories dropped the setgid bit they
    inherited (chmod to the database's mode), so the sockets and lock files made in them
    belonged to each maker's own group: a worker of another user of the group could not
    wake or see them."""
    group = _another_group()
    if group is None:
        pytest.skip("no second group to give the spool directory")
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chown(spool, -1, group)
    spool.chmod(0o2770)
    db = spool / "queue.db"
    SQLiteStore(db).close()
    db.chmod(0o660)
    store = SQLiteStore(db)
    unwatch = store.watch(lambda: None)
    try:
        store.lease(now=NOW, limit=1, lease_for=timedelta(minutes=1), holder="a1b2c3d4")
        for made in (Path(f"{db}-wake"), Path(f"{db}-holders")):
            assert made.stat().st_mode & 0o7777 == 0o2770, made
            assert {f.stat().st_gid for f in made.iterdir()} == {group}, made
    finally:
        unwatch()
        store.close()


def test_a_wal_left_without_its_database_is_not_deleted_for_a_new_queue(
    db: Path, tmp_path: Path
) -> None:
    """A crash leaves committed mail in the ``-wal`` file; the database file then moved or
    deleted (``mv queue.db``, a restore that failed half-way), the next open made a new,
    empty queue and SQLite deleted the ``-wal`` with the mail in it. A missing database
    whose ``-wal`` holds frames is StoreCorrupt, and nothing is made or removed."""
    store = SQLiteStore(db)
    try:
        store.enqueue(message(), now=NOW)
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        for name in ("queue.db-wal", "queue.db-lock"):  # as SIGKILL leaves them
            shutil.copy(tmp_path / name, crashed / name)
    finally:
        store.close()
    left = crashed / "queue.db-wal"
    frames = left.read_bytes()
    assert frames
    for read_only in (False, True):
        with pytest.raises(StoreCorrupt, match=r"-wal file .* no database file"):
            SQLiteStore(crashed / "queue.db", read_only=read_only)
    assert not (crashed / "queue.db").exists()
    assert left.read_bytes() == frames

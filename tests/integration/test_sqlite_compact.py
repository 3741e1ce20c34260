"""``SQLiteStore.compact`` (``mailstrom db compact``): an SQLite queue's file gives back the
space of a backlog that is gone, while workers deliver, and fails cleanly without room."""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Config, Email, Mailstrom, RecipientState
from mailstrom.errors import StoreLocked
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_worker_modes import config, hello, mx
from tests.support.delivery import Results

__all__ = ["mx"]  # the fixture, found by pytest under this name

ROOT = Path(__file__).parents[2]


def backlog_gone(path: Path, *, count: int = 40, kept: int = 3) -> list[str]:
    """A store that held ``count`` messages of 100 KB, all purged but ``kept`` small
    ones (their ids): its file keeps the size of the backlog."""
    store = SQLiteStore(path)
    with Mailstrom(Config(helo_name="client.test"), store=store, worker=None) as ms:
        big = [
            ms.send_email(Email(from_="a@client.test", to=["b@example.org"], text="x" * 100_000))
            for _ in range(count)
        ]
        ids = [ms.send_email(hello(f"k{i}@example.org", i)) for i in range(kept)]
        now = datetime.now(UTC)
        store.cancel_many(big, now=now)
        assert store.purge(finished_before=now + timedelta(days=1)) == count
    store.close()
    return ids


def intact(path: Path) -> list[str]:
    """The message ids the file holds, once SQLite has found it sound."""
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return sorted(row[0] for row in conn.execute("SELECT id FROM messages"))


def test_compact_gives_the_space_of_a_purged_backlog_back(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    ids = backlog_gone(db)
    before = os.path.getsize(db)
    assert before > 4_000_000  # the purge freed pages, gave nothing back
    store = SQLiteStore(db)
    try:
        done = store.compact()
        assert done.before >= before and done.checkpointed
        assert done.after == os.path.getsize(db) < 500_000
        assert sorted(m.id for m in store.query(now=datetime.now(UTC))) == sorted(ids)
    finally:
        store.close()
    assert intact(db) == sorted(ids)


def test_compact_waits_the_busy_timeout_for_the_lock_then_says_so(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    ids = backlog_gone(db, count=5)
    other = sqlite3.connect(db, isolation_level=None)
    store = SQLiteStore(db, busy_timeout=0.2)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreLocked, match=r"waited 0\.2 s for the database's write lock"):
            store.compact()
        other.execute("ROLLBACK")
        assert store.compact().checkpointed  # the store still works
    finally:
        store.close()
        other.close()
    assert intact(db) == sorted(ids)


def test_workers_deliver_each_message_once_while_compact_runs(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A worker thread delivers to aiosmtpd while another store object of the file
    compacts it again and again: every message is delivered, none twice."""
    db = tmp_path / "q.db"
    backlog_gone(db, count=20, kept=0)
    store = SQLiteStore(db)
    results = Results()
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results, worker="thread")
    compacting = SQLiteStore(db)
    stop = threading.Event()
    rounds = 0
    errors: list[BaseException] = []

    def compact_until_stopped() -> None:
        nonlocal rounds
        try:
            while not stop.is_set() or rounds < 3:
                compacting.compact()
                rounds += 1
                # Back to back, compactions would starve the worker of the write lock
                # (its event loop waits for it): an operator runs one now and then.
                stop.wait(0.05)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    ms.start()
    runner = threading.Thread(target=compact_until_stopped)
    runner.start()
    try:
        ids = [ms.send_email(hello(f"u{i}@example.org", i)) for i in range(30)]
        results.wait_final({f"u{i}@example.org" for i in range(30)}, timeout=60)
    finally:
        stop.set()
        runner.join(timeout=60)
        ms.stop()
        compacting.close()
    assert errors == [] and rounds >= 3
    assert [ms.query_status(i).state for i in ids] == [RecipientState.DELIVERED] * len(ids)
    got = sorted(m.rcpt_tos[0] for m in mx.messages)
    assert got == sorted(f"u{i}@example.org" for i in range(30))
    store.close()
    assert intact(db) == sorted(ids)


def test_compact_without_room_for_its_copy_fails_cleanly(tmp_path: Path) -> None:
    """No file may grow past half the live data: VACUUM cannot write its copy. The
    command says what it needs (75, try again), and the store is as it was."""
    db = tmp_path / "q.db"
    ids = backlog_gone(db, count=40, kept=40)
    size = os.path.getsize(db)
    with closing(sqlite3.connect(db)) as conn:
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    limit = (pages - free) * 4096 // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env["SQLITE_TMPDIR"] = str(tmp_path)
    argv = [sys.executable, "-m", "mailstrom", "db", "compact", "--store", f"sqlite:///{db}"]
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=60, preexec_fn=small_files
    )
    assert proc.returncode == 75, proc.stderr
    assert "compacting needs free room for a copy" in proc.stderr
    assert "the store is as it was" in proc.stderr
    assert os.path.getsize(db) == size
    assert intact(db) == sorted(ids)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(db) < size
    assert intact(db) == sorted(ids)

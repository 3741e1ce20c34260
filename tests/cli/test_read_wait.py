"""Look-only commands on a SQLite store another connection holds locked: they wait
READ_WAIT (5 s), not the writers' busy_timeout (30 s), then exit 75 saying so.

WAL readers wait for nothing a mailstrom writer does; they wait for a connection that
holds the database exclusively (``locking_mode=EXCLUSIVE``, as a backup tool or the
``sqlite3`` shell may take it), and for a writer of a database another program turned
back to a rollback journal."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from tests.cli.conftest import CLI
from tests.cli.test_errors import assert_one_line_error

BEFORE_BUSY_TIMEOUT = 20
"""Seconds a command may take at most: a hang bound only, well below the 30 s it took."""


def send(cli: CLI) -> str:
    out = cli.ok("send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x")
    return out.out.strip()


@contextmanager
def exclusive_wal(db: Path) -> Iterator[None]:
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("PRAGMA locking_mode=EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        other.execute("SELECT count(*) FROM messages").fetchone()
        yield
        other.execute("COMMIT")


@contextmanager
def rollback_journal_writer(db: Path) -> Iterator[None]:
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("PRAGMA journal_mode=DELETE")
        other.execute("BEGIN EXCLUSIVE")
        yield
        other.execute("COMMIT")


@pytest.mark.parametrize("lock", [exclusive_wal, rollback_journal_writer])
def test_a_look_only_command_waits_read_wait_then_exits_75(cli: CLI, lock: object) -> None:
    """Was: each of these sat silent 30.3 s (the store's busy_timeout) before its exit 75,
    saying it had waited for "the database's write lock" and that nothing was written."""
    mid = send(cli)
    assert callable(lock)
    with lock(cli.cwd / "queue.db"):
        for args in (["status", mid], ["queue", "--json"]):
            result = cli(*args, timeout=BEFORE_BUSY_TIMEOUT)
            assert_one_line_error(
                result, 75, "waited 5 s to read the database", "database is locked", "try again"
            )
            assert "write lock" not in result.err
    assert mid in cli.ok("status", mid).out  # the lock gone, it reads again


def test_a_wal_writer_does_not_keep_a_look_only_command_waiting(cli: CLI) -> None:
    """A writer's transaction (BEGIN IMMEDIATE, as every mailstrom write) keeps no WAL
    reader out: the command reads at once, the commit it has not seen yet aside."""
    mid = send(cli)
    with closing(sqlite3.connect(cli.cwd / "queue.db", isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        other.execute("DELETE FROM messages")
        assert mid in cli("status", mid, timeout=BEFORE_BUSY_TIMEOUT).out
        other.execute("ROLLBACK")

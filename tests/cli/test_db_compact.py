"""``mailstrom db compact``: what it prints, and the stores it refuses."""

from __future__ import annotations

from pathlib import Path

from tests.cli.conftest import CLI
from tests.integration.test_sqlite_compact import backlog_gone, intact


def test_compact_prints_the_size_before_and_after(cli: CLI, workdir: Path) -> None:
    ids = backlog_gone(workdir / "queue.db", count=20)
    report = cli.ok("db", "compact", "--json").json()
    assert report["bytes_before"] > 2_000_000 > 500_000 > report["bytes_after"] > 0
    assert report["checkpointed"] is True
    assert report["store"] == "sqlite:///queue.db"
    text = cli.ok("db", "compact").out
    assert text.startswith("sqlite:///queue.db: ") and "bytes (database and -wal file)" in text
    assert intact(workdir / "queue.db") == sorted(ids)


def test_compact_refuses_postgresql_and_memory_stores(cli: CLI) -> None:
    pg = cli("db", "compact", "--store", "postgresql://mail:secret@db.invalid/mail")
    assert pg.code == 64
    assert "is PostgreSQL, whose autovacuum" in pg.err and "secret" not in pg.err
    memory = cli("db", "compact", "--store", "memory:")
    assert memory.code == 64
    assert "nothing to compact: store memory: is not persistent" in memory.err


def test_compact_of_a_path_with_no_queue_makes_none(cli: CLI, workdir: Path) -> None:
    """A mistyped path was opened for writing: an empty queue was made there and the
    command reported it compacted (exit 0)."""
    typo = cli("db", "compact", "--store", "sqlite:///typo.db")
    assert typo.code == 66
    assert "no queue at sqlite:///typo.db" in typo.err
    assert not (workdir / "typo.db").exists()
    (workdir / "empty.db").touch()
    empty = cli("db", "compact", "--store", "sqlite:///empty.db")
    assert empty.code == 66
    assert (workdir / "empty.db").stat().st_size == 0

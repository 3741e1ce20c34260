"""Store URLs: parsing is pure; opening dispatches to the right store."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mailstrom.errors import InvalidStoreURL
from mailstrom.stores import MemoryStore, SQLiteStore, open_store, parse_store_url
from mailstrom.stores.url import StoreKind, StoreURL


@pytest.mark.parametrize(
    ("url", "kind", "target"),
    [
        ("memory:", StoreKind.MEMORY, ""),
        ("memory://", StoreKind.MEMORY, ""),
        ("sqlite:///queue.db", StoreKind.SQLITE, "queue.db"),
        ("sqlite:///var/q.db", StoreKind.SQLITE, "var/q.db"),
        ("sqlite:////var/lib/mailstrom/q.db", StoreKind.SQLITE, "/var/lib/mailstrom/q.db"),
        ("SQLite:///Q.sqlite", StoreKind.SQLITE, "Q.sqlite"),
        ("mail.db", StoreKind.SQLITE, "mail.db"),
        ("./data/mail.sqlite3", StoreKind.SQLITE, "./data/mail.sqlite3"),
        ("/abs/queue.SQLITE", StoreKind.SQLITE, "/abs/queue.SQLITE"),
        ("sqlite:///./file:q.db", StoreKind.SQLITE, "./file:q.db"),
        (
            "postgresql://u@127.0.0.1:5432/mail",
            StoreKind.POSTGRES,
            "postgresql://u@127.0.0.1:5432/mail",
        ),
        ("postgres://127.0.0.1/mail", StoreKind.POSTGRES, "postgres://127.0.0.1/mail"),
        ("postgresql://db1:5432,db2/m", StoreKind.POSTGRES, "postgresql://db1:5432,db2/m"),
        ("postgresql://[::1]:5433/m", StoreKind.POSTGRES, "postgresql://[::1]:5433/m"),
    ],
)
def test_parse(url: str, kind: StoreKind, target: str) -> None:
    assert parse_store_url(url) == StoreURL(kind=kind, target=target)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "mysql://localhost/db",
        "redis://x",
        "mail.txt",
        "memory",
        "sqlite://host/q.db",  # a host is meaningless for a file
        "sqlite:///",
        "sqlite:///:memory:",
        # A SQLite URI, which SQLiteStore refuses: a ValueError when opened (exit 70).
        "sqlite:///file:q.db",
        "sqlite:///file:/var/q.db?mode=ro",
        # Parameters would be part of the file name: another queue than the worker's.
        "sqlite:////var/q.db?mode=ro",
        "sqlite:///q.db?timeout=5",
        "sqlite:///dir/",
        "postgresql://",
        "http://example.com/q.db",
        "postgresql://[::1",  # an unclosed IPv6 address
        "postgres://u@[db.internal]/mail",  # brackets hold an IP address only
        # A port libpq refuses only when connecting: a store "down" for ever (75).
        "postgresql://u@db:99999/mail",
        "postgresql://u@db:5432x/mail",
        "postgresql://u@db:0/mail",
        "postgresql://u@db1:5432,db2:54x/mail",  # each host of libpq's multi-host form
        "postgresql://[::1]:70000/mail",
        # Not UTF-8, as read from a MAILSTROM_STORE in Latin-1: libpq cannot take it.
        "postgresql://u:pw\udce9@db/mail",
        "postgresql://u@db/mail?application_name=\udce9",
    ],
)
def test_bad_urls_raise_invalid_store_url(url: str) -> None:
    with pytest.raises(InvalidStoreURL):
        parse_store_url(url)
    with pytest.raises(InvalidStoreURL):
        open_store(url)


def test_open_memory() -> None:
    store = open_store("memory:")
    assert isinstance(store, MemoryStore)
    store.close()


def test_open_sqlite_relative_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///rel.db")
    absolute = open_store(f"sqlite:///{tmp_path / 'sub.db'}")
    bare = open_store("bare.sqlite3")
    try:
        assert isinstance(relative, SQLiteStore)
        assert isinstance(absolute, SQLiteStore)
        assert isinstance(bare, SQLiteStore)
        assert (tmp_path / "rel.db").exists()
        assert (tmp_path / "sub.db").exists()
        assert (tmp_path / "bare.sqlite3").exists()
    finally:
        for store in (relative, absolute, bare):
            store.close()


def test_a_read_only_sqlite_store_waits_the_timeout_given(tmp_path: Path) -> None:
    """A look-only command's wait (``timeout``) is a read-only SQLite store's wait for a
    lock; a store that writes keeps its own busy_timeout whatever is given."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    writer = open_store(url, timeout=0.5)
    reader = open_store(url, read_only=True, timeout=0.5)
    try:
        assert isinstance(writer, SQLiteStore)
        assert isinstance(reader, SQLiteStore)
        assert writer.busy_timeout == 30
        assert reader.busy_timeout == 0.5
    finally:
        reader.close()
        writer.close()


def test_open_postgres_dispatches_to_postgres_store(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("mailstrom.stores.postgres") is None:
        pytest.skip("mailstrom.stores.postgres is not there yet")
    import mailstrom.stores.postgres as postgres

    opened: list[str] = []

    class FakePostgresStore:
        def __init__(self, url: str) -> None:
            opened.append(url)

    # Only the dispatch is tested here; the store itself has its own contract tests.
    monkeypatch.setattr(postgres, "PostgresStore", FakePostgresStore)
    store = open_store("postgres://u@127.0.0.1:1/mail")
    assert isinstance(store, FakePostgresStore)
    assert opened == ["postgres://u@127.0.0.1:1/mail"]

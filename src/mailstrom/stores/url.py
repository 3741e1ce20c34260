"""Store URLs: one string in configuration picks the store.

=================================  ==========================================================
``memory:``                        :class:`~mailstrom.stores.memory.MemoryStore` (not durable)
``sqlite:///relative/path.db``     SQLite file relative to the working directory
``sqlite:////abs/path.db``         SQLite file at an absolute path (four slashes: the
                                   SQLAlchemy convention — ``sqlite://`` + empty host + path)
``mail.db``, ``/var/q.sqlite3``    a bare path ending in ``.db``, ``.sqlite`` or ``.sqlite3``
``postgresql://user@host/db``      :class:`~mailstrom.stores.postgres.PostgresStore`
``postgres://...``                 the same (libpq accepts both spellings)
=================================  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mailstrom.errors import InvalidStoreURL
from mailstrom.stores.base import Store

_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


class StoreKind(StrEnum):
    """Which store a URL names."""

    MEMORY = "memory"
    SQLITE = "sqlite"
    POSTGRES = "postgres"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreURL:
    """A parsed store URL: the kind, and what to open (file path or connection URL)."""

    kind: StoreKind
    target: str


def parse_store_url(url: str) -> StoreURL:
    """Parse ``url`` without opening anything; raises :class:`InvalidStoreURL`.

    >>> parse_store_url("sqlite:////var/lib/mailstrom/queue.db")
    StoreURL(kind=<StoreKind.SQLITE: 'sqlite'>, target='/var/lib/mailstrom/queue.db')
    """
    text = url.strip()
    if text in ("memory:", "memory://"):
        return StoreURL(kind=StoreKind.MEMORY, target="")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("postgresql", "postgres"):
        if not rest:
            raise InvalidStoreURL(f"PostgreSQL URL without host or database: {url!r}")
        return StoreURL(kind=StoreKind.POSTGRES, target=text)
    if sep and scheme == "sqlite":
        if not rest.startswith("/"):
            raise InvalidStoreURL(
                f"SQLite URLs have no host: use sqlite:///relative.db or "
                f"sqlite:////absolute/path.db, not {url!r}"
            )
        # sqlite:///x → "x" (relative); sqlite:////x → "/x" (absolute).
        path = rest[1:]
        if not path or path.endswith("/") or path == ":memory:":
            raise InvalidStoreURL(f"SQLite URL names no database file: {url!r}")
        return StoreURL(kind=StoreKind.SQLITE, target=path)
    if not sep and ":" not in text.partition("/")[0] and text.lower().endswith(_SQLITE_SUFFIXES):
        return StoreURL(kind=StoreKind.SQLITE, target=text)
    raise InvalidStoreURL(
        f"unknown store URL {url!r}: expected memory:, sqlite:///path.db, a *.db file "
        "path, or postgresql://..."
    )


def open_store(url: str, *, read_only: bool = False) -> Store:
    """Open the store ``url`` names (see the module docstring for the forms).

    ``read_only`` opens a SQLite store for reading only (nothing created, migrated or
    written); other stores ignore it.

    >>> store = open_store("sqlite:////var/lib/mailstrom/queue.db")  # doctest: +SKIP
    """
    parsed = parse_store_url(url)
    if parsed.kind is StoreKind.MEMORY:
        from mailstrom.stores.memory import MemoryStore

        return MemoryStore()
    if parsed.kind is StoreKind.SQLITE:
        from mailstrom.stores.sqlite import SQLiteStore

        return SQLiteStore(parsed.target, read_only=read_only)
    # Imported only when asked for, so the other stores never load the driver.
    from mailstrom.stores.postgres import PostgresStore

    return PostgresStore(parsed.target)

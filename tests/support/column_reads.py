"""Which columns of ``messages`` a SQLite store's statements read, as SQLite's authorizer
reports them (once per statement prepared, before it runs).

In another process (the ``mailstrom`` command): run ``python -m tests.support.column_reads
ARGS...`` (the command line of ``mailstrom``) with :data:`FILE_VARIABLE` naming a file; each
column read is appended to it, one a line.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mailstrom.stores.sqlite import SQLiteStore

FILE_VARIABLE = "TEST_COLUMN_READS"


def columns_past_data(path: Path) -> list[str]:
    """The columns of ``messages`` stored after ``data`` (the message's bytes), which SQLite
    reaches only by walking the blob's overflow pages, and ``data`` itself."""
    with sqlite3.connect(path) as conn:
        names = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
    return names[names.index("data") :]


@contextmanager
def column_reads(report: Callable[[str], None]) -> Iterator[None]:
    """Every SQLite store connection opened inside reports each column of ``messages``
    its statements read to ``report``."""
    connect = SQLiteStore._connect

    def authorizer(action: int, table: str | None, column: str | None, *_: object) -> int:
        if action == sqlite3.SQLITE_READ and table == "messages" and column:
            report(column)
        return sqlite3.SQLITE_OK

    def watched(self: SQLiteStore) -> sqlite3.Connection:
        conn = connect(self)
        conn.set_authorizer(authorizer)
        return conn

    SQLiteStore._connect = watched  # type: ignore[method-assign]
    try:
        yield
    finally:
        SQLiteStore._connect = connect  # type: ignore[method-assign]


def _main() -> int:
    from mailstrom.cli.main import main

    with open(os.environ[FILE_VARIABLE], "a") as out:

        def report(column: str) -> None:
            out.write(column + "\n")

        with column_reads(report):
            return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_main())

"""Which columns of ``messages`` (and of ``message_data``, the messages' bytes) a SQLite
store's statements read, as SQLite's authorizer reports them (once per statement
prepared, before it runs).

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

from mailstrom.stores.sqlite import SQLiteStore

FILE_VARIABLE = "TEST_COLUMN_READS"


BYTES = "message_data."
"""How a read of ``message_data`` is reported: its column's name after this."""


def reads_of_bytes(read: set[str]) -> set[str]:
    """The reads among ``read`` that reach a message's bytes: ``message_data.data``
    (schema version 20; before it, ``messages.data`` and every column stored after it,
    which SQLite reached only by walking the bytes' overflow pages). A purge's cascade
    reads ``message_data.seq``, its key, to delete the row."""
    return read & {BYTES + "data"}


@contextmanager
def column_reads(report: Callable[[str], None]) -> Iterator[None]:
    """Every SQLite store connection opened inside reports each column of ``messages``
    its statements read to ``report``, and each of ``message_data`` after :data:`BYTES`."""
    connect = SQLiteStore._connect

    def authorizer(action: int, table: str | None, column: str | None, *_: object) -> int:
        if action == sqlite3.SQLITE_READ and column:
            if table == "messages":
                report(column)
            elif table == "message_data":
                report(BYTES + column)
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

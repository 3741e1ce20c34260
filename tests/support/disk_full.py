"""A full disk for SQLite stores, on demand: no real disk has to fill up.

While the disk is "full", every connection a :class:`SQLiteStore` checks out may not grow
the database past its size at that moment: ``PRAGMA max_page_count = 1`` cannot lower
the limit below the file's current page count, so it sets the limit to exactly that. A
write that needs a new page then fails with SQLITE_FULL ("database or disk is full"),
the code SQLite gives for a real ENOSPC; a write that fits in the pages the file already
has still succeeds, as it would on a real full disk. Freeing space lifts the limit.

The limit is set at each checkout (``SQLiteStore._connection``), in the thread that uses
the connection: it covers the writer, the group commit's leader and the readers alike,
and connections made later too.

In this process::

    disk = DiskFull.patch(monkeypatch)
    disk.fill()    # ... disk.free()

In another (the ``mailstrom`` command, a ``mailstrom worker``): run
``python -m tests.support.disk_full ARGS...`` (the command line of ``mailstrom``) with
:data:`MARKER_VARIABLE` naming a file; the disk is full while that file exists.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from mailstrom.stores import SQLiteStore

NO_LIMIT = 4294967294
"""SQLite's largest ``max_page_count`` (its default): no limit but the disk's."""

MARKER_VARIABLE = "TEST_DISK_FULL_MARKER"
"""In a process started with ``python -m tests.support.disk_full``: the file whose
existence makes the disk full."""


class DiskFull:
    """Whether the disk of every SQLite store in this process is full (see the module)."""

    def __init__(self, is_full: Callable[[], bool] | None = None) -> None:
        self._full = False
        self._is_full = is_full or (lambda: self._full)

    @classmethod
    def patch(cls, monkeypatch: pytest.MonkeyPatch) -> DiskFull:
        """A disk for the stores of this test (the patch ends with it); not full yet."""
        disk = cls()
        disk.install(monkeypatch.setattr)
        return disk

    def install(self, setattr_: Callable[[object, str, object], None]) -> None:
        checkout = SQLiteStore._connection
        is_full = self._is_full

        @contextmanager
        def limited(store: SQLiteStore) -> Iterator[object]:
            with checkout(store) as conn:
                conn.execute(f"PRAGMA max_page_count = {1 if is_full() else NO_LIMIT}")
                yield conn

        setattr_(SQLiteStore, "_connection", limited)

    def fill(self) -> None:
        self._full = True

    def free(self) -> None:
        self._full = False

    @property
    def full(self) -> bool:
        return self._is_full()

    def while_full(self) -> AbstractContextManager[None]:
        """Full for the block, then free."""

        @contextmanager
        def block() -> Iterator[None]:
            self.fill()
            try:
                yield
            finally:
                self.free()

        return block()


def main() -> int:
    """``mailstrom`` with the disk full while the file named by $TEST_DISK_FULL_MARKER
    exists."""
    marker = Path(os.environ[MARKER_VARIABLE])
    DiskFull(is_full=marker.exists).install(setattr)
    from mailstrom.cli.main import main as mailstrom

    return mailstrom(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""What the SQLite store writes to delete mail: the pages that list the rows and the free
pages, not the deleted bytes again. Counted as the octets this process wrote through
``write()`` (``wchar``: SQLite's writes to the WAL, and to the database file when a
checkpoint copies them there).

SQLite built with ``SQLITE_SECURE_DELETE`` (Debian's and Ubuntu's, which the system
Python uses) overwrites every freed page with zeros: a purge wrote each deleted body
again to the WAL, in one transaction per batch, so the WAL grew by the batch's bytes
(500 messages of 1 MB: 500 MB) and kept that size, and a purge on a disk near full
needed as much free room as the mail it deleted.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from mailstrom.status import RecipientState
from mailstrom.stores import SQLiteStore

from .support import NOW, lease_all, message, results_for

SIZE = 1_000_000
COUNT = 20
"""Twenty messages of 1 MB: 20 MB of bodies, 4,900 overflow pages."""


@contextmanager
def octets_written() -> Iterator[list[int]]:
    """The octets this process wrote through write() inside the block: [n] once done."""

    def wchar() -> int:
        with open("/proc/self/io") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))

    found: list[int] = []
    before = wchar()
    yield found
    found.append(wchar() - before)


def delivered(store: SQLiteStore) -> list[str]:
    """:data:`COUNT` delivered messages of :data:`SIZE` octets; their ids."""
    data = b"Subject: big\r\n\r\n" + b"x" * SIZE + b"\r\n"
    ids = [store.enqueue(message("to@example.org", data=data), now=NOW) for _ in range(COUNT)]
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    return ids


LATER = NOW + timedelta(days=1)
PURGES: dict[str, Callable[[SQLiteStore, list[str]], int]] = {
    "purge": lambda store, ids: store.purge(finished_before=LATER),
    "purge_many": lambda store, ids: store.purge_many(ids, finished_before=LATER),
    "purge_state": lambda store, ids: store.purge_state(
        finished_before=LATER, state=RecipientState.DELIVERED
    ),
}


@pytest.mark.parametrize("purge", PURGES.values(), ids=PURGES.keys())
def test_a_purge_does_not_write_the_deleted_bodies_again(
    tmp_path: Path, purge: Callable[[SQLiteStore, list[str]], int]
) -> None:
    store = SQLiteStore(tmp_path / "queue.db")
    try:
        ids = delivered(store)
        with closing(sqlite3.connect(store.path)) as conn:  # an empty WAL to start from
            assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        with octets_written() as written:
            assert purge(store, ids) == COUNT
        wal = (tmp_path / "queue.db-wal").stat().st_size
    finally:
        store.close()
    # A few pages per message (its rows, the free-list pages), not its 245 body pages.
    assert written[0] < COUNT * SIZE // 10, written
    assert wal < COUNT * SIZE // 10, wal

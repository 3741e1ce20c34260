"""The SQLite store's ``-wal`` file after a large transaction: SQLite writes the next
transactions from its start again once a checkpoint has copied it all into the
database, but left alone it never gives back the file's length. One ``send_emails`` of
large messages (one transaction) left a WAL as large as all of them beside the
database for as long as any process kept the store open: a worker's months."""

from __future__ import annotations

from pathlib import Path

from mailstrom.status import RecipientState
from mailstrom.stores import SQLiteStore

from .support import NOW, lease_all, message, results_for

SIZE = 2_000_000
COUNT = 10
"""Ten messages of 2 MB in one transaction: a WAL of 20 MB."""


def test_the_wal_shrinks_back_after_a_large_transaction(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    wal = tmp_path / "queue.db-wal"
    store = SQLiteStore(path)
    try:
        data = b"Subject: big\r\n\r\n" + b"x" * SIZE + b"\r\n"
        store.enqueue_many([message("to@example.org", data=data)] * COUNT, now=NOW)
        peak = wal.stat().st_size
        assert peak > COUNT * SIZE  # the transaction is in it whole
        # The worker's next writes: a lease and its results, small ones.
        store.record(results_for(lease_all(store), RecipientState.DELIVERED))
        store.enqueue(message("small@example.org"), now=NOW)
        after = wal.stat().st_size
        assert len(store.recent(limit=100)) == COUNT + 1
    finally:
        store.close()
    assert after <= peak // 2, (peak, after)

"""Giving back the disk space of an SQLite store (``mailstrom db compact``).

The file never shrinks by itself: ``auto_vacuum`` is off, so the pages a purge frees go to
the next messages queued, and a queue that once held a large backlog keeps its size.
``VACUUM`` writes the live rows into a fresh copy (in SQLite's temporary directory), then
through the ``-wal`` file back into the database; a checkpoint afterwards cuts the file to
what it holds. It needs the write lock all the while, and room for that copy twice.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

from mailstrom.errors import StoreError


@dataclass(frozen=True, slots=True, kw_only=True)
class Compaction:
    """What :meth:`~mailstrom.stores.sqlite.SQLiteStore.compact` did: the bytes of the
    database file and its ``-wal`` file together, before and after. ``checkpointed`` is
    False when a reader kept an older snapshot open past the busy timeout: the file then
    shrinks at a later checkpoint (when the last connection closes at the latest)."""

    before: int
    after: int
    checkpointed: bool


def bytes_on_disk(path: str) -> int:
    """Bytes of the database file ``path`` and its ``-wal`` file."""
    total = 0
    for name in (path, path + "-wal"):
        try:
            total += os.path.getsize(name)
        except FileNotFoundError:
            continue
    return total


def checkpoint(conn: sqlite3.Connection) -> bool:
    """Write the WAL into the database and empty it (TRUNCATE), waiting for readers as
    long as the connection's busy timeout; whether all of it was written."""
    busy, frames, written = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return bool(busy == 0 and frames == written)


def no_room(exc: sqlite3.Error, error: StoreError) -> StoreError:
    """``error`` (the store's reading of ``exc``) saying what VACUUM needs room for, when
    ``exc`` is a write that found none: the copy it writes in the temporary directory is
    no file of the store's, so the store's own words ("disk I/O error") named no cause."""
    code = getattr(exc, "sqlite_errorcode", None)
    # ENOSPC is SQLITE_FULL; EFBIG (the file size limit) a failed write, IOERR_WRITE.
    if not isinstance(code, int):
        return error
    if code & 0xFF != sqlite3.SQLITE_FULL and code != sqlite3.SQLITE_IOERR_WRITE:
        return error
    return type(error)(
        f"{error}; compacting needs free room for a copy of what the database holds, in"
        " SQLite's temporary directory (SQLITE_TMPDIR, else /var/tmp or /tmp) and again in"
        " its -wal file, within the file size limit (`ulimit -f`); the store is as it was"
    )

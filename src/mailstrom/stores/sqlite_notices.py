"""The SQLite store's marks "bounce notice owed" (schema version 14): which messages are
done for this pass with marks on them, and the marks cleared in the transaction that
queues their notice. See :meth:`mailstrom.stores.base.Store.owed_notices`."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from mailstrom.stores.base import OwedNotice
from mailstrom.stores.sqlite_queue import chunks, qmarks

_IN_CHUNK = 500

_DONE = (
    " AND NOT EXISTS (SELECT 1 FROM recipients p WHERE p.message_seq = o.message_seq"
    " AND p.state IN ('queued', 'deferred')"
    " AND (p.state = 'queued' AND p.domain NOT IN (SELECT domain FROM suspensions)"
    " OR p.lease_token IS NOT NULL))"
)
"""None of the message's recipients leased, nor queued for a first attempt (the
partial index recipients_pending_message answers it). One of a suspended domain waits
for that attempt as long as the operator likes: it holds no notice of the others back (a
suspension that ended but whose row is still there lets the notice go a little early)."""


def owed_notices(
    conn: sqlite3.Connection, message_ids: Sequence[str] | None, limit: int
) -> list[OwedNotice]:
    """The marked recipients of up to ``limit`` messages done for this pass, by message."""
    if message_ids is None:
        seqs = [
            seq
            for (seq,) in conn.execute(
                "SELECT DISTINCT o.message_seq FROM recipients o WHERE o.notice IS NOT NULL"
                + _DONE
                + " ORDER BY o.message_seq LIMIT ?",
                (limit,),
            )
        ]
    else:
        seqs = []
        wanted = list(dict.fromkeys(message_ids))
        for start in range(0, len(wanted), _IN_CHUNK):
            part = wanted[start : start + _IN_CHUNK]
            seqs += (
                seq
                for (seq,) in conn.execute(
                    "SELECT DISTINCT o.message_seq FROM messages m JOIN recipients o"
                    f" ON o.message_seq = m.seq WHERE m.id IN ({qmarks(len(part))})"
                    " AND o.notice IS NOT NULL" + _DONE,
                    part,
                )
            )
        seqs = sorted(seqs)[:limit]
    owed: list[OwedNotice] = []
    for chunk in chunks(seqs):
        rows = conn.execute(
            "SELECT m.id, r.address, r.notice FROM recipients r JOIN messages m"
            f" ON m.seq = r.message_seq WHERE r.message_seq IN ({qmarks(len(chunk))})"
            " AND r.notice IS NOT NULL ORDER BY r.message_seq, r.position",
            chunk,
        ).fetchall()
        owed += (
            OwedNotice(message_id=str(mid), address=str(address), notice=_as_read(notice))
            for mid, address, notice in rows
        )
    return owed


def _as_read(notice: object) -> str:
    """A mark as handed out: passed on as it reads, a mark changed by hand being a notice
    the worker cannot read, which it logs and clears rather than stop at."""
    return notice if isinstance(notice, str) else ""


def clear_marks(conn: sqlite3.Connection, owed: Sequence[OwedNotice]) -> set[str]:
    """Clear the marks of ``owed``, inside the caller's write transaction, but those of
    a message some of whose marks are gone or changed since they were read (another
    worker queued its notice, or a recipient's new result replaced its mark): returns
    the ids of those messages, whose marks left are handed out again."""
    by_message: dict[str, list[OwedNotice]] = {}
    for entry in owed:
        by_message.setdefault(entry.message_id, []).append(entry)
    gone: set[str] = set()
    cleared: list[tuple[int]] = []
    for message_id, entries in by_message.items():
        marks = [_still_marked(conn, entry) for entry in entries]
        if None in marks:
            gone.add(message_id)
        else:
            cleared += ((rid,) for rid in marks if rid is not None)
    # The write transaction holds the database: nothing changed since the look.
    conn.executemany("UPDATE recipients SET notice = NULL WHERE id = ?", cleared)
    return gone


def _still_marked(conn: sqlite3.Connection, entry: OwedNotice) -> int | None:
    """The row id of ``entry``'s recipient when its mark is still as it was read."""
    row = conn.execute(
        "SELECT r.id, r.notice FROM messages m JOIN recipients r ON r.message_seq = m.seq"
        " WHERE m.id = ? AND r.address = ? AND r.notice IS NOT NULL",
        (entry.message_id, entry.address),
    ).fetchone()
    return int(row[0]) if row is not None and _as_read(row[1]) == entry.notice else None

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
    " AND (p.state = 'queued' OR p.lease_token IS NOT NULL))"
)
"""None of the message's recipients leased, nor queued for a first attempt (the
partial index recipients_pending_message answers it)."""


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
            # Passed on as it reads: a mark changed by hand is a notice the worker cannot
            # read, which it logs and clears rather than stop at.
            OwedNotice(
                message_id=str(mid),
                address=str(address),
                notice=notice if isinstance(notice, str) else "",
            )
            for mid, address, notice in rows
        )
    return owed


def clear_marks(conn: sqlite3.Connection, owed: Sequence[OwedNotice]) -> set[str]:
    """Clear the marks of ``owed``, inside the caller's write transaction; returns the
    ids of the messages some of whose marks were gone already."""
    gone: set[str] = set()
    for entry in owed:
        cleared = conn.execute(
            "UPDATE recipients SET notice = NULL WHERE notice IS NOT NULL AND address = ?"
            " AND message_seq = (SELECT seq FROM messages WHERE id = ?)",
            (entry.address, entry.message_id),
        ).rowcount
        if cleared != 1:
            gone.add(entry.message_id)
    return gone

"""One message's page on SQLite: its status as the store reads it, without history, then
each recipient's latest attempts by the index of attempts by recipient, as many as its
share of the page's (see :meth:`~mailstrom.readmodel.base.ReadModel.message_status`)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

from mailstrom.errors import UnknownMessage, UnreadableRow
from mailstrom.readmodel.base import MessageDetail, attempt_shares, detail
from mailstrom.status import Attempt
from mailstrom.stores.base import with_throttles
from mailstrom.stores.row_checks import UNREADABLE
from mailstrom.stores.sqlite_queue import ATTEMPT_COLUMNS, read_messages
from mailstrom.stores.sqlite_schema import attempt_from_row
from mailstrom.stores.sqlite_shaping import paused_recipients

# Each recipient's history is at most MAX_HISTORY rows: counting them reads that many
# entries of the index, no row.
_KEPT = (
    "SELECT r.id, (SELECT count(*) FROM attempts a WHERE a.recipient_id = r.id)"
    " FROM messages m JOIN recipients r ON r.message_seq = m.seq"
    " WHERE m.id = ? ORDER BY r.position, r.id"
)
_LATEST = (
    f"SELECT {ATTEMPT_COLUMNS} FROM attempts a WHERE a.recipient_id = ? ORDER BY a.id DESC LIMIT ?"
)


def message_detail(conn: sqlite3.Connection, message_id: str, attempts: int) -> MessageDetail:
    """The message's page (in the caller's transaction: one snapshot); UnknownMessage,
    or UnreadableRow for rows that cannot be read back (those of the attempts shown
    among them)."""
    found = read_messages(conn, "m.id = ?", [message_id], 1, history=False, strict=True)
    if not found:
        raise UnknownMessage(message_id)
    # The clock's now, as the store's status() reads pauses.
    status = with_throttles(found[0], paused_recipients(conn, message_id, now=datetime.now(UTC)))
    counted = conn.execute(_KEPT, (message_id,)).fetchall()
    shares = attempt_shares(len(counted), attempts)
    histories: list[tuple[Attempt, ...]] = []
    try:
        for (rid, kept), share in zip(counted, shares, strict=True):
            rows = conn.execute(_LATEST, (rid, share)).fetchall() if share and kept else []
            histories.append(tuple(attempt_from_row(row) for row in reversed(rows)))
    except (UnreadableRow, ValueError, TypeError, OverflowError) as exc:
        raise UnreadableRow(f"message {message_id}: {UNREADABLE}: {exc}") from exc
    return detail(status, histories, [int(kept) for _, kept in counted])

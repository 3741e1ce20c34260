"""One message's page on SQLite: its row, its recipients counted by state, one page of
its recipients (by position) and each one's latest attempts by the index of attempts by
recipient, as many as its share of the page's (see
:meth:`~mailstrom.readmodel.base.ReadModel.message_status`)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from mailstrom.errors import UnknownMessage, UnreadableRow
from mailstrom.readmodel.base import MAX_SEQ, MessageDetail, attempt_shares, detail
from mailstrom.status import Attempt, RecipientState
from mailstrom.stores.base import with_throttles
from mailstrom.stores.row_checks import MAX_ATTEMPTS, UNREADABLE
from mailstrom.stores.sqlite_queue import (
    ATTEMPT_COLUMNS,
    MESSAGE_COLUMNS,
    RECIPIENT_COLUMNS,
    message_from_rows,
)
from mailstrom.stores.sqlite_schema import attempt_from_row
from mailstrom.stores.sqlite_shaping import paused_among, runs_at

_HEAD = f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = ?"
# A recipient's columns, then its position and how many attempts it has: its history is
# at most MAX_HISTORY rows, counted from the index, no row. No index holds (message_seq,
# position): the message's recipients are found by their index on message_seq and
# sorted, never every recipient turned into a status.
_PAGE = (
    f"SELECT {RECIPIENT_COLUMNS}, position,"
    " (SELECT count(*) FROM attempts a WHERE a.recipient_id = r.id)"
    " FROM recipients r WHERE message_seq = ? AND position > ?"
    " ORDER BY position, id LIMIT ?"
)
# The page's recipients' latest attempts, each as many as its share, in one statement: a
# statement per recipient was 2,007 for a message to 2,000. The shares arrive as one JSON
# array of [recipient id, share] (one parameter whatever the page); the attempts are
# ranked on the index of attempts by recipient alone, and only those shown are read.
_LATEST = (
    "WITH wanted(rid, share) AS"
    " (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)),"
    " ranked(id, rid, n) AS (SELECT id, recipient_id, row_number()"
    " OVER (PARTITION BY recipient_id ORDER BY id DESC) FROM attempts"
    " WHERE recipient_id IN (SELECT rid FROM wanted))"
    f" SELECT {ATTEMPT_COLUMNS} FROM ranked k JOIN wanted w ON w.rid = k.rid"
    " JOIN attempts a ON a.id = k.id WHERE k.n <= w.share ORDER BY a.id"
)


def message_detail(
    conn: sqlite3.Connection, message_id: str, attempts: int, after: int, size: int | None
) -> MessageDetail:
    """The message's page of ``size`` recipients past position ``after`` (all of them for
    None), in the caller's transaction (one snapshot); UnknownMessage, or UnreadableRow
    for rows that cannot be read back (those of the recipients and attempts shown)."""
    head = conn.execute(_HEAD, (message_id,)).fetchone()
    if head is None:
        raise UnknownMessage(message_id)
    seq = head[0]
    # One more than the page: whether a next one exists.
    limit = MAX_SEQ if size is None else size + 1
    rows = conn.execute(_PAGE, (seq, after, limit)).fetchall()
    more = size is not None and len(rows) > size
    page = rows[:size] if more else rows
    shares = attempt_shares(len(page), attempts)
    histories: list[tuple[Attempt, ...]] = []
    try:
        status = message_from_rows(head, {seq: [row[:-2] for row in page]}, {})
        # ValueError for a state mailstrom never writes, as the status read raises it.
        counts = {
            RecipientState(state): int(n)
            for state, n in conn.execute(
                "SELECT state, count(*) FROM recipients WHERE message_seq = ? GROUP BY state",
                (seq,),
            )
        }
        wanted = [
            [row[1], share] for row, share in zip(page, shares, strict=True) if share and row[-1]
        ]
        found: dict[int, list[Any]] = {}
        if wanted:
            for a in conn.execute(_LATEST, (json.dumps(wanted),)):
                found.setdefault(a[0], []).append(a)
        histories.extend(tuple(attempt_from_row(a) for a in found.get(row[1], ())) for row in page)
        # Here, with the rest of the rows' checks: a position changed by hand to text was
        # a bare ValueError, which the pages that read a message took for a failure of
        # their own (500) rather than for the unreadable row they say what to do about.
        next_after = int(page[-1][-2]) if more else None
    except (UnreadableRow, ValueError, TypeError, OverflowError) as exc:
        raise UnreadableRow(f"message {message_id}: {UNREADABLE}: {exc}") from exc
    # The clock's now, as the store's status() reads pauses.
    paused = paused_among(conn, [row[1] for row in page], now=datetime.now(UTC))
    return detail(
        with_throttles(status, paused),
        histories,
        [int(row[-1]) for row in page],
        flagged=bool(head[7]),
        counts=counts,
        next_after=next_after,
    )


# The domains given arrive as one JSON array (json_each): a list of thousands of
# suspensions binds one parameter. A pause is counted as paused_among() and
# with_throttles() read it: running, its row readable, the recipient due within it.
_WAITING = (
    "SELECT coalesce(sum(lower(r.domain) IN (SELECT value FROM json_each(?1))), 0),"
    " coalesce(sum(lower(r.domain) NOT IN (SELECT value FROM json_each(?1))"
    " AND t.destination IS NOT NULL"
    " AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= t.until)), 0)"
    " FROM recipients r LEFT JOIN destination_throttles t ON t.destination = r.throttled_by"
    " AND t.until > ?2 AND t.since <= ?3 AND t.strikes BETWEEN 1 AND ?4"
    " WHERE r.message_seq = ?5 AND r.state IN ('queued', 'deferred')"
)


def waiting(conn: sqlite3.Connection, message_id: str, at: Collection[str]) -> tuple[int, int]:
    """See :meth:`~mailstrom.readmodel.base.ReadModel.waiting`: counted by the message's
    recipients' index, in the caller's transaction; UnknownMessage."""
    head = conn.execute("SELECT seq FROM messages WHERE id = ?", (message_id,)).fetchone()
    if head is None:
        raise UnknownMessage(message_id)
    until, since = runs_at(datetime.now(UTC))
    row = conn.execute(
        _WAITING, (json.dumps(sorted(at)), until, since, MAX_ATTEMPTS, head[0])
    ).fetchone()
    return int(row[0]), int(row[1])

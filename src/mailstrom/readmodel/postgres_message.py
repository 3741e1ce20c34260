"""One message's page on PostgreSQL: the store's status statement for one page of its
recipients, each one's latest attempts only, as many as its share of the page's, and all
its recipients counted by state (the ``status_latest`` query; see
:meth:`~mailstrom.readmodel.base.ReadModel.message_status`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailstrom.errors import UnknownMessage, UnreadableRow
from mailstrom.readmodel.base import MAX_SEQ, MessageDetail, detail
from mailstrom.status import RecipientState
from mailstrom.stores.base import with_throttles
from mailstrom.stores.postgres.rows import messages_from_rows
from mailstrom.stores.postgres.sql import queries
from mailstrom.stores.postgres.store import _pauses_in
from mailstrom.stores.row_checks import UNREADABLE

_STATUS_LATEST = queries()["status_latest"].encode()


def message_detail(
    conn: psycopg.Connection[Any], message_id: str, attempts: int, after: int, size: int | None
) -> MessageDetail:
    """The message's page of ``size`` recipients past position ``after`` (all of them for
    None), in one statement (one snapshot); UnknownMessage, or UnreadableRow for rows that
    cannot be read back."""
    # The clock's now, as the store's status() reads pauses. A page of all the recipients
    # is one of MAX_SEQ - 1: the statement reads one more, which must stay a bigint.
    params = {
        "id": message_id,
        "now": datetime.now(UTC),
        "budget": attempts,
        "after": after,
        "size": MAX_SEQ - 1 if size is None else size,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        read = cur.execute(_STATUS_LATEST, params).fetchall()
    found = messages_from_rows(read, strict=True)
    if not found:
        raise UnknownMessage(message_id)
    status = with_throttles(found[0], _pauses_in(read).get(message_id, {}))
    # Each recipient's rows follow one another (ordered by position), every one with its
    # count: the first of each.
    firsts = [
        row
        for i, row in enumerate(read)
        if row["address"] is not None and (i == 0 or read[i - 1]["address"] != row["address"])
    ]
    try:
        # ValueError for a state mailstrom never writes, as the status read raises it.
        counts = {RecipientState(k): int(n) for k, n in (read[0]["by_state"] or {}).items()}
    except ValueError as exc:
        raise UnreadableRow(f"message {message_id}: {UNREADABLE}: {exc}") from exc
    more = bool(firsts) and bool(firsts[-1]["r_more"])
    return detail(
        status,
        [r.history for r in status.recipients],
        [int(row["kept"]) for row in firsts],
        flagged=bool(read[0]["held"]),
        counts=counts,
        next_after=int(firsts[-1]["r_position"]) if more else None,
    )

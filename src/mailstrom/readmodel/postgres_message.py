"""One message's page on PostgreSQL: the store's status statement with each recipient's
latest attempts only, as many as its share of the page's (the ``status_latest`` query; see
:meth:`~mailstrom.readmodel.base.ReadModel.message_status`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailstrom.errors import UnknownMessage
from mailstrom.readmodel.base import MessageDetail, detail
from mailstrom.stores.base import with_throttles
from mailstrom.stores.postgres.rows import messages_from_rows
from mailstrom.stores.postgres.sql import queries
from mailstrom.stores.postgres.store import _pauses_in

_STATUS_LATEST = queries()["status_latest"].encode()


def message_detail(conn: psycopg.Connection[Any], message_id: str, attempts: int) -> MessageDetail:
    """The message's page, in one statement (one snapshot); UnknownMessage, or
    UnreadableRow for rows that cannot be read back."""
    # The clock's now, as the store's status() reads pauses.
    params = {"id": message_id, "now": datetime.now(UTC), "budget": attempts}
    with conn.cursor(row_factory=dict_row) as cur:
        read = cur.execute(_STATUS_LATEST, params).fetchall()
    found = messages_from_rows(read, strict=True)
    if not found:
        raise UnknownMessage(message_id)
    status = with_throttles(found[0], _pauses_in(read).get(message_id, {}))
    # Each recipient's rows follow one another (ordered by position), every one with its
    # count: the first of each.
    kept = [
        int(row["kept"])
        for i, row in enumerate(read)
        if row["address"] is not None and (i == 0 or read[i - 1]["address"] != row["address"])
    ]
    histories = [r.history for r in status.recipients]
    return detail(status, histories, kept)

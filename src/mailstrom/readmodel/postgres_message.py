"""One message's page on PostgreSQL: the store's status statement for one page of its
recipients, each one's latest attempts only, as many as its share of the page's, and all
its recipients counted by state (the ``status_latest`` query; see
:meth:`~mailstrom.readmodel.base.ReadModel.message_status`)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailstrom.errors import UnknownMessage, UnreadableRow
from mailstrom.policy.throttle import CLOCK_SET_BACK
from mailstrom.readmodel.base import MAX_SEQ, MessageDetail, detail
from mailstrom.status import RecipientState
from mailstrom.stores.base import with_throttles
from mailstrom.stores.postgres.rows import messages_from_rows
from mailstrom.stores.postgres.sql import queries
from mailstrom.stores.postgres.store import _pauses_in
from mailstrom.stores.row_checks import MAX_ATTEMPTS, UNREADABLE

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
        None,  # the statement read each recipient's share of its attempts only
        [int(row["kept"]) for row in firsts],
        flagged=bool(read[0]["held"]),
        counts=counts,
        next_after=int(firsts[-1]["r_position"]) if more else None,
    )


# A pause is counted as the status statement and with_throttles() read it: running, its
# row readable (pause_of), the recipient due within it.
_WAITING = b"""
SELECT count(*) FILTER (WHERE lower(r.domain) = ANY(%(at)s)),
       count(*) FILTER (WHERE NOT lower(r.domain) = ANY(%(at)s) AND t.destination IS NOT NULL
                        AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= t.until))
FROM recipients r
LEFT JOIN destination_throttles t
       ON t.destination = r.throttled_by AND t.until > %(now)s AND t.since <= %(set_back)s
      AND t.strikes BETWEEN 1 AND %(max)s
WHERE r.message_id = %(id)s AND r.state IN ('queued', 'deferred')
"""


def waiting(conn: psycopg.Connection[Any], message_id: str, at: Collection[str]) -> tuple[int, int]:
    """See :meth:`~mailstrom.readmodel.base.ReadModel.waiting`: counted in the store, in
    the caller's transaction; UnknownMessage."""
    if conn.execute(b"SELECT 1 FROM messages WHERE id = %s", (message_id,)).fetchone() is None:
        raise UnknownMessage(message_id)
    now = datetime.now(UTC)
    params = {
        "id": message_id,
        "at": sorted(at),
        "now": now,
        "set_back": now + CLOCK_SET_BACK,
        "max": MAX_ATTEMPTS,
    }
    row = conn.execute(_WAITING, params).fetchone()
    assert row is not None  # an aggregate's one row
    return int(row[0]), int(row[1])

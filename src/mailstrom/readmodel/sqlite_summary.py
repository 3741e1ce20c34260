"""The queue page's messages on SQLite, as summaries: each message's row, its recipients
counted by state, its first address and one reason, never a status per recipient (see
:class:`~mailstrom.readmodel.base.MessageSummary`)."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from mailstrom.errors import UnreadableRow
from mailstrom.readmodel.base import REASON_RANK, MessageSummary, summarise
from mailstrom.status import RecipientState, reason_of
from mailstrom.stores.row_checks import UNREADABLE, shown_text
from mailstrom.stores.sqlite_queue import MESSAGE_COLUMNS, message_from_rows
from mailstrom.stores.sqlite_schema import reply_from

log = logging.getLogger(__name__)


def summaries(conn: sqlite3.Connection, seqs: list[int]) -> dict[int, MessageSummary]:
    """The summaries of the messages numbered ``seqs``, by number. A message whose row (or
    the recipient rows read for it) cannot be read is left out with a warning, as the
    store's lists leave it out."""
    marks = ",".join("?" * len(seqs))
    # The columns read_messages() reads, then the first address.
    heads = conn.execute(
        f"SELECT {MESSAGE_COLUMNS}, (SELECT r.address FROM recipients r WHERE r.message_seq = m.seq"
        " ORDER BY r.position LIMIT 1)"
        f" FROM messages m WHERE m.seq IN ({marks})",
        seqs,
    ).fetchall()
    counts: dict[int, dict[Any, int]] = {}
    for seq, state, n in conn.execute(
        "SELECT message_seq, state, count(*) FROM recipients"
        f" WHERE message_seq IN ({marks}) GROUP BY message_seq, state",
        seqs,
    ):
        counts.setdefault(seq, {})[state] = n
    found: dict[int, MessageSummary] = {}
    for head in heads:
        try:
            found[head[0]] = _summary(conn, head, counts.get(head[0], {}))
        except (UnreadableRow, ValueError, TypeError, OverflowError) as exc:
            log.warning("message %s left out: %s: %s", head[1], UNREADABLE, exc)
    return found


def _summary(conn: sqlite3.Connection, head: Any, counts: dict[Any, int]) -> MessageSummary:
    seq, held, first = head[0], head[7], head[-1]
    # ValueError for a state mailstrom never writes, as the status read raises it.
    by_state = {RecipientState(state): n for state, n in counts.items()}
    return summarise(
        # The message's row read and checked as the store reads it, its recipients not.
        message_from_rows(head[:-1], {}, {}),
        flagged=bool(held),
        counts=by_state,
        first=None if first is None else shown_text(first, "address") or "",
        reason=_reason(conn, seq),
    )


def _reason(conn: sqlite3.Connection, seq: int) -> str | None:
    """The first reason in :data:`REASON_RANK`'s order: usually the first row read."""
    cur = conn.execute(
        "SELECT r.reply_code, r.reply_enhanced, r.reply_text, r.error FROM recipients r"
        " WHERE r.message_seq = ? AND (r.reply_code IS NOT NULL OR r.error IS NOT NULL)"
        f" ORDER BY {REASON_RANK}, r.position",
        (seq,),
    )
    try:
        for code, enhanced, text, error in cur:
            reply = reply_from(
                code, shown_text(enhanced, "reply_enhanced"), shown_text(text, "reply")
            )
            reason = reason_of(reply, shown_text(error, "error"))
            if reason:
                return reason
        return None
    finally:
        cur.close()

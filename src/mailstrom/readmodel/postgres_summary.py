"""The queue page's messages on PostgreSQL, as summaries: each message's row, its
recipients counted by state, its first address and one reason, never a status per
recipient (see :class:`~mailstrom.readmodel.base.MessageSummary`)."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailstrom.readmodel.base import REASON_RANK, MessageSummary, summarise
from mailstrom.status import RecipientState, SMTPReply, reason_of
from mailstrom.stores.postgres.rows import messages_from_rows
from mailstrom.stores.row_checks import UNREADABLE

log = logging.getLogger(__name__)

# The message columns messages_from_rows() reads (with no recipient: a NULL address),
# then the first address.
_HEADS = (
    b"SELECT m.id, m.envelope_from, m.created_at, m.size, m.header_message_id, m.subject,"
    b" m.held, m.dkim, m.tags, m.metadata, m.priority, m.send_at, m.expires_at,"
    b" m.idempotency_key, NULL::text AS address,"
    b" (SELECT r.address FROM recipients r WHERE r.message_id = m.id"
    b" ORDER BY r.position LIMIT 1) AS first"
    b" FROM messages m WHERE m.id = ANY(%s)"
)
_COUNTS = (
    b"SELECT message_id, state, count(*) FROM recipients"
    b" WHERE message_id = ANY(%s) GROUP BY message_id, state"
)
# A reason is a reply (any code) or a non-empty error, as RecipientStatus.reason has it.
_REASONS = (
    "SELECT DISTINCT ON (r.message_id) r.message_id, r.reply_code, r.reply_enhanced,"
    " r.reply_text, r.error FROM recipients r"
    " WHERE r.message_id = ANY(%s) AND (r.reply_code IS NOT NULL OR r.error <> '')"
    f" ORDER BY r.message_id, {REASON_RANK}, r.position"
).encode()


def summaries(conn: psycopg.Connection[Any], ids: list[str]) -> dict[str, MessageSummary]:
    """The summaries of the messages ``ids``, by id. A message whose row cannot be read
    (its creation time out of range, a state mailstrom never writes) is left out with a
    warning, as the store's lists leave it out."""
    with conn.cursor(row_factory=dict_row) as cur:
        heads = {row["id"]: row for row in cur.execute(_HEADS, (ids,)).fetchall()}
    counts: dict[str, dict[Any, int]] = {}
    for mid, state, n in conn.execute(_COUNTS, (ids,)):
        counts.setdefault(mid, {})[state] = int(n)
    reasons: dict[str, str] = {}
    for mid, code, enhanced, text, error in conn.execute(_REASONS, (ids,)):
        reply = None if code is None else SMTPReply(code=code, enhanced=enhanced, text=text or "")
        reasons[mid] = reason_of(reply, error)
    found: dict[str, MessageSummary] = {}
    # Each message's row read as the store reads it (messages_from_rows warns of one it
    # leaves out), its recipients not.
    for head in messages_from_rows(list(heads.values())):
        row = heads[head.id]
        try:
            # ValueError for a state mailstrom never writes, as the status read raises it.
            by_state = {RecipientState(s): n for s, n in counts.get(head.id, {}).items()}
        except ValueError as exc:
            log.warning("message %s left out: %s: %s", head.id, UNREADABLE, exc)
            continue
        found[head.id] = summarise(
            head,
            flagged=bool(row["held"]),
            counts=by_state,
            first=row["first"],
            reason=reasons.get(head.id),
        )
    return found

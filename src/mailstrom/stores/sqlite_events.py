"""The SQL of the SQLite store's event outbox (schema version 3).

Functions over a connection inside a transaction the caller (:class:`SQLiteStore`) opened.
Events are copied from the recipients' rows right after :func:`record_rows` updated them,
in the same transaction: the row then holds exactly what was recorded (state, attempt
count, reply, and the reason class when the record path writes one).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from mailstrom.arguments import member_of, shown
from mailstrom.errors import UnreadableRow
from mailstrom.status import DeliveryEvent, RecipientState
from mailstrom.stores.attributes import metadata_from, tags_from
from mailstrom.stores.base import EventBatch, RecipientResult
from mailstrom.stores.clock import after
from mailstrom.stores.side_rows import (
    EVENT_SKIPPED,
    read_events_past_unreadable,
    readable_events,
)
from mailstrom.stores.sqlite_schema import reply_from, shown_time, time_at, to_us

_CHUNK = 400
"""Recipients per INSERT (two bound values each)."""
EVENT_COLUMNS = (
    "id, at, message_id, address, state, attempt, reply_code, reply_enhanced, reply_text,"
    " error, reason_class, mx_host, ip, tls, uncertain, next_attempt_at, tags, metadata"
)


def append_events(conn: sqlite3.Connection, recorded: Sequence[RecipientResult]) -> None:
    """One event per recorded result, in the order of ``recorded``."""
    refs: list[int] = []
    for result in recorded:
        ref = result.ref
        if ref is None:  # a result built by hand, not from a lease: find its row
            row = conn.execute(
                "SELECT r.id FROM recipients r JOIN messages m ON m.seq = r.message_seq"
                " WHERE m.id = ? AND r.address = ?",
                (result.message_id, result.address),
            ).fetchone()
            if row is None:
                continue
            ref = int(row[0])
        refs.append(ref)
    _insert_events(conn, refs, "r.last_attempt_at")


def append_cancel_events(conn: sqlite3.Connection, refs: Sequence[int]) -> None:
    """One event per recipient row in ``refs`` that a cancel just failed, at the cancel's
    time (its ``finished_at``: one never attempted has no attempt time), so that a
    listener following it sees its end."""
    _insert_events(conn, refs, "r.finished_at")


def _insert_events(conn: sqlite3.Connection, refs: Sequence[int], at: str) -> None:
    """The events of the recipient rows ``refs``, in that order, copied from the rows;
    ``at`` is the column the event's time comes from."""
    for start in range(0, len(refs), _CHUNK):
        chunk = refs[start : start + _CHUNK]
        conn.execute(
            "WITH picked (n, rid) AS (VALUES " + ",".join(["(?,?)"] * len(chunk)) + ")"
            " INSERT INTO events (message_id, address, state, attempt, at, next_attempt_at,"
            " reply_code, reply_enhanced, reply_text, error, reason_class, mx_host, ip, tls,"
            f" uncertain, tags, metadata) SELECT m.id, r.address, r.state, r.attempts, {at},"
            " r.next_attempt_at, r.reply_code, r.reply_enhanced, r.reply_text, r.error,"
            " r.reason_class, r.mx_host, r.ip, r.tls, r.uncertain, m.tags, m.metadata"
            " FROM picked JOIN recipients r ON r.id = picked.rid"
            " JOIN messages m ON m.seq = r.message_seq ORDER BY picked.n",
            [v for n, rid in enumerate(chunk) for v in (n, rid)],
        )


def event_from_row(row: Any) -> DeliveryEvent:
    """An event from a row of :data:`EVENT_COLUMNS`; UnreadableRow for one whose time or
    state cannot be read, or with a value of another type than its column's (a next
    attempt that is no time is unknown: None)."""
    (event_id, at, message_id, address, state, attempt, code, enhanced, text) = row[:9]
    (error, reason_class, mx_host, ip, tls, uncertain, next_at) = row[9:16]
    tags, metadata = row[16:18] if len(row) > 16 else (None, None)
    known = member_of(RecipientState, state)
    if known is None:
        raise UnreadableRow(f"state is {shown(state)}")
    # SQLite keeps a value of any type in any column: a blob in a text column could not be
    # written into a hook's body (so the sender retried that batch forever), and a text
    # in a count column went to receivers as a string.
    _check_types(
        (str, ("message_id", message_id), ("address", address)),
        (int, ("attempt", attempt)),
        (int | None, ("reply_code", code)),
        (
            str | None,
            ("reply_enhanced", enhanced),
            ("reply_text", text),
            ("error", error),
            ("reason_class", reason_class),
            ("mx_host", mx_host),
            ("ip", ip),
        ),
    )
    return DeliveryEvent(
        id=event_id,
        at=time_at(at, "at"),
        message_id=message_id,
        address=address,
        state=known,
        attempt=attempt,
        reply=reply_from(code, enhanced, text),
        error=error,
        reason_class=reason_class,
        mx_host=mx_host,
        ip=ip,
        tls=bool(tls),
        uncertain=bool(uncertain),
        next_attempt_at=None if next_at is None else shown_time(next_at),
        tags=tags_from(tags),
        metadata=metadata_from(metadata),
    )


def _check_types(*groups: tuple[Any, ...]) -> None:
    """UnreadableRow for the first ``(name, value)`` of a group ``(type, *pairs)`` whose
    value is not of that type (a bool is no count)."""
    for kind, *pairs in groups:
        for name, value in pairs:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise UnreadableRow(f"{name} is {shown(value)}")


def lease_event_rows(
    conn: sqlite3.Connection, *, now: datetime, limit: int, lease_for: timedelta
) -> EventBatch | None:
    """Lease up to ``limit`` unsent events not under an unexpired lease, oldest first.
    An event that cannot be read is marked sent, with a warning, so that the events after
    it still go (see side_rows); the batch is leased again when it held only such."""
    token = os.urandom(16).hex()
    expires_at = after(now, lease_for)
    while True:
        rows = conn.execute(
            "UPDATE events SET lease_token = ?, lease_expires_at = ? WHERE id IN (SELECT id"
            " FROM events INDEXED BY events_unsent WHERE sent_at IS NULL"
            " AND coalesce(lease_expires_at, 0) <= ? ORDER BY id LIMIT ?)"
            f" RETURNING {EVENT_COLUMNS}",
            (token, to_us(expires_at), to_us(now), limit),
        ).fetchall()
        if not rows:
            return None
        events, unreadable = readable_events(rows, event_from_row, EVENT_SKIPPED)
        conn.executemany(
            "UPDATE events SET sent_at = ?, lease_token = NULL, lease_expires_at = NULL"
            " WHERE id = ?",
            [(to_us(now), event_id) for event_id in unreadable],
        )
        if events:
            return EventBatch(token=token, expires_at=expires_at, events=tuple(events))


def ack_event_rows(conn: sqlite3.Connection, batch: EventBatch, *, now: datetime) -> int:
    """Mark the batch's events sent, those it still holds: only those in ``batch.events``,
    not every event under its token (a sender may acknowledge part of a lease)."""
    return int(
        conn.execute(
            "UPDATE events SET sent_at = ?, lease_token = NULL, lease_expires_at = NULL"
            " WHERE lease_token = ? AND id IN (SELECT value FROM json_each(?))",
            (to_us(now), batch.token, _ids_json(batch)),
        ).rowcount
    )


def release_event_rows(conn: sqlite3.Connection, batch: EventBatch) -> None:
    """Give back the batch's events it still holds (those in ``batch.events``)."""
    conn.execute(
        "UPDATE events SET lease_token = NULL, lease_expires_at = NULL"
        " WHERE lease_token = ? AND id IN (SELECT value FROM json_each(?))",
        (batch.token, _ids_json(batch)),
    )


def _ids_json(batch: EventBatch) -> str:
    return json.dumps([event.id for event in batch.events])


def read_event_rows(conn: sqlite3.Connection, *, after: int, limit: int) -> list[DeliveryEvent]:
    def fetch(above: int, count: int) -> list[Any]:
        return conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (above, count),
        ).fetchall()

    return read_events_past_unreadable(fetch, event_from_row, after=after, limit=limit)


def prune_event_rows(
    conn: sqlite3.Connection, *, sent_before: datetime, unsent_before: datetime | None
) -> int:
    pruned = conn.execute(
        "DELETE FROM events WHERE sent_at IS NOT NULL AND sent_at < ?", (to_us(sent_before),)
    ).rowcount
    if unsent_before is not None:
        pruned += conn.execute(
            "DELETE FROM events WHERE sent_at IS NULL AND at < ?", (to_us(unsent_before),)
        ).rowcount
    return int(pruned)

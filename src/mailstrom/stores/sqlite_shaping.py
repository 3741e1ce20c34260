"""The SQLite store's traffic shaping tables (schema version 7): destination pauses, rate
buckets, postponed recipients. Functions over a connection inside the caller's transaction;
the decisions themselves are :mod:`mailstrom.policy.throttle`'s."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta

from mailstrom.errors import UnreadableRow
from mailstrom.policy.throttle import (
    CLOCK_SET_BACK,
    TokenBucket,
    TokenGrant,
    forget_before,
    next_pause,
    take_tokens,
)
from mailstrom.status import DestinationThrottle
from mailstrom.stores.base import WorkItem
from mailstrom.stores.row_checks import shown_text
from mailstrom.stores.side_rows import bucket_state, pause_of
from mailstrom.stores.sqlite_schema import shown_time, to_us

_FORGET_AFTER = timedelta(days=1)
"""A pause that ended this long ago, and longer ago than the maximum pause, is deleted
(it no longer makes the next one longer: :func:`~mailstrom.policy.throttle.forget_before`)."""


def _throttle_from_row(row: tuple[str, object, object, str, object]) -> DestinationThrottle | None:
    """The pause of ``row``; None for one that cannot be read (see side_rows.pause_of)."""
    destination, until, strikes, reply, since = row
    # The reply is only shown (as the status read takes a recipient's, see
    # row_checks.shown_text): octets that are not UTF-8 read as U+FFFD, not as lone
    # surrogates that no page or serialiser can encode; one that is no text reads as none.
    try:
        shown = shown_text(reply, "reply") or ""
    except UnreadableRow:
        shown = ""
    return pause_of(destination, shown_time(until), strikes, shown, shown_time(since))


_COLUMNS = "destination, until, strikes, reply, since"

FORGET_SQL = "DELETE FROM destination_throttles WHERE until < ?"
"""Deletes the pauses that ended before the bound time (a throttle runs it each time)."""


def throttle(
    conn: sqlite3.Connection,
    destination: str,
    *,
    now: datetime,
    reply: str,
    first: timedelta,
    maximum: timedelta,
) -> DestinationThrottle:
    """Start (or find) ``destination``'s pause; call inside a write transaction."""
    before = forget_before(now, maximum, _FORGET_AFTER)
    conn.execute(FORGET_SQL, (to_us(before),))
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM destination_throttles WHERE destination = ?", (destination,)
    ).fetchone()
    previous = _throttle_from_row(row) if row is not None else None
    pause = next_pause(
        previous, destination=destination, now=now, first=first, maximum=maximum, reply=reply
    )
    if pause is not previous:
        conn.execute(
            f"INSERT OR REPLACE INTO destination_throttles ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
            (destination, to_us(pause.until), pause.strikes, pause.reply, to_us(pause.since)),
        )
    return pause


_RUNS = "until > ? AND since <= ?"
"""A pause that runs at a time (:func:`~mailstrom.policy.throttle.pause_runs`): it has not
ended, and it did not start ahead of a clock since set back; with :func:`runs_at`."""


def runs_at(now: datetime) -> tuple[int, int]:
    """The parameters of :data:`_RUNS` at ``now`` (microseconds: no datetime overflows)."""
    return to_us(now), to_us(now) + CLOCK_SET_BACK // timedelta(microseconds=1)


THROTTLES_SQL = (
    f"SELECT {_COLUMNS} FROM destination_throttles WHERE {_RUNS} ORDER BY until, destination"
)
"""The running pauses, which every worker reads each second (runtime/shaper.py)."""


def throttles(
    conn: sqlite3.Connection, *, now: datetime, limit: int | None = None
) -> list[DestinationThrottle]:
    """The running pauses at ``now``, soonest end first; the first ``limit`` only, when
    given (the dashboard's page shows a few of thousands)."""
    # LIMIT -1 is no limit to SQLite.
    rows = conn.execute(
        f"{THROTTLES_SQL} LIMIT ?", (*runs_at(now), -1 if limit is None else limit)
    ).fetchall()
    return [pause for row in rows if (pause := _throttle_from_row(row)) is not None]


def throttle_count(conn: sqlite3.Connection, *, now: datetime) -> int:
    """How many pauses run at ``now`` (unreadable ones too: the count says how many more
    there are, never what a page lists)."""
    sql = f"SELECT count(*) FROM destination_throttles WHERE {_RUNS}"
    (count,) = conn.execute(sql, runs_at(now)).fetchone()
    return int(count)


def paused_recipients(
    conn: sqlite3.Connection, message_id: str, *, now: datetime
) -> dict[str, DestinationThrottle]:
    """Address → pause, for the message's pending recipients held back by a running pause."""
    return paused_in(conn, [message_id], now=now).get(message_id, {})


def paused_among(
    conn: sqlite3.Connection, recipient_ids: Sequence[int], *, now: datetime
) -> dict[str, DestinationThrottle]:
    """Address → pause, for those of the recipients numbered ``recipient_ids`` (one
    message's) that are pending and held back by a running pause: a page of a message's
    recipients reads theirs only, not those of its other thousands."""
    found: dict[str, DestinationThrottle] = {}
    for _, address, pause in _pauses_of(conn, "recipients r", "r.id", recipient_ids, now):
        found[address] = pause
    return found


def paused_in(
    conn: sqlite3.Connection, message_ids: Sequence[str], *, now: datetime
) -> dict[str, dict[str, DestinationThrottle]]:
    """Message id → address → pause, for the pending recipients of ``message_ids`` held
    back by a running pause (messages without one are left out)."""
    found: dict[str, dict[str, DestinationThrottle]] = {}
    # CROSS JOIN keeps this order: left to itself the planner read every pending
    # recipient of the queue from the (state, domain) index for each list.
    recipients = "messages m CROSS JOIN recipients r ON r.message_seq = m.seq"
    for mid, address, pause in _pauses_of(conn, recipients, "m.id", message_ids, now):
        found.setdefault(str(mid), {})[address] = pause
    return found


def _pauses_of(
    conn: sqlite3.Connection,
    recipients: str,
    key: str,
    ids: Sequence[object],
    now: datetime,
) -> Iterator[tuple[object, str, DestinationThrottle]]:
    """(``key``, address, pause) of each pending recipient of ``recipients`` (a FROM
    clause naming them ``r``) whose ``key`` is one of ``ids`` and whose destination's
    pause runs at ``now``; looked up in chunks that keep the bound parameters few."""
    columns = ", ".join("t." + c.strip() for c in _COLUMNS.split(","))
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = ids[start : start + _IDS_PER_QUERY]
        rows = conn.execute(
            f"SELECT {key}, r.address, {columns} FROM {recipients}"
            " CROSS JOIN destination_throttles t ON t.destination = r.throttled_by"
            f" WHERE {key} IN ({','.join('?' * len(chunk))})"
            " AND r.state IN ('queued', 'deferred') AND t.until > ? AND t.since <= ?",
            (*chunk, *runs_at(now)),
        ).fetchall()
        for row in rows:
            if (pause := _throttle_from_row(row[2:])) is not None:
                yield row[0], row[1], pause


_IDS_PER_QUERY = 500
"""Ids bound in one query of :func:`_pauses_of` (SQLite allows 32,766 parameters)."""


def mark(conn: sqlite3.Connection, recipients: Sequence[tuple[str, str]], destination: str) -> None:
    """Note that ``destination``'s pause holds these (message id, address) recipients."""
    conn.executemany(
        "UPDATE recipients SET throttled_by = ?"
        " WHERE message_seq = (SELECT seq FROM messages WHERE id = ?) AND address = ?",
        [(destination, message_id, address) for message_id, address in recipients],
    )


def postpone(
    conn: sqlite3.Connection,
    items: Sequence[WorkItem],
    *,
    until: datetime,
    destination: str | None,
) -> int:
    params = [
        (to_us(until), destination, item.message_id, r.address, item.lease_token)
        for item in items
        for r in item.recipients
    ]
    before = conn.total_changes
    conn.executemany(
        "UPDATE recipients SET lease_token = NULL, lease_expires_at = NULL,"
        " next_attempt_at = ?, throttled_by = ?"
        " WHERE message_seq = (SELECT seq FROM messages WHERE id = ?) AND address = ?"
        " AND lease_token = ?",
        params,
    )
    return conn.total_changes - before


def take(
    conn: sqlite3.Connection, buckets: Sequence[TokenBucket], *, want: int, now: datetime
) -> TokenGrant:
    states = {}
    for bucket in buckets:
        row = conn.execute(
            "SELECT tokens, at FROM shaping_buckets WHERE key = ?", (bucket.key,)
        ).fetchone()
        state = None if row is None else bucket_state(bucket.key, row[0], shown_time(row[1]))
        if state is not None:
            states[bucket.key] = state
    grant, new = take_tokens(buckets, states, want=want, now=now)
    conn.executemany(
        "INSERT OR REPLACE INTO shaping_buckets (key, tokens, at) VALUES (?, ?, ?)",
        [(key, state.tokens, to_us(state.at)) for key, state in new.items()],
    )
    return grant

"""The SQL of the SQLite store's suppression list and late failures (schema version 6),
and its VERP key (version 13).

Functions over a connection inside a transaction the caller (:class:`SQLiteStore`) opened.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from mailstrom.arguments import member_of, row_limit
from mailstrom.errors import UnknownMessage, UnreadableRow
from mailstrom.status import Attempt
from mailstrom.stores.base import (
    MAX_HISTORY,
    VERP_KEY_SIZE,
    Lease,
    RecipientsFound,
    ascii_lower,
    bounded_attempt,
)
from mailstrom.stores.operator import comparable
from mailstrom.stores.row_checks import UNREADABLE
from mailstrom.stores.side_rows import unreadable_side_row
from mailstrom.stores.sqlite_queue import (
    MESSAGE_COLUMNS,
    RECIPIENT_COLUMNS,
    message_from_rows,
    qmarks,
)
from mailstrom.stores.sqlite_schema import (
    READABLE_FROM,
    opt_time_at,
    opt_us,
    shown_time,
    time_at,
    to_us,
)
from mailstrom.suppression import BYPASSABLE, Suppression, SuppressionSource, lookup_targets

_IN_CHUNK = 500
"""Targets per ``IN (...)`` list, well under SQLite's limit on bound parameters."""
_COLUMNS = "target, source, reply, created_at, expires_at, message_id"
_IN_FORCE = "(expires_at IS NULL OR expires_at > ? OR expires_at < ?)"
"""An entry in force at the first parameter (now), the second being READABLE_FROM: an
expiry that is no time (text, a blob, a number past any time: these sort after every
number; one before any time) does not expire (see side_rows)."""


def _entry(row: Any) -> Suppression:
    """The entry of ``row``; read inside every lease that holds a suppressed recipient,
    so a good row costs no more than the checks of its times."""
    target, source, reply, created_at, expires_at, message_id = row
    try:
        return Suppression(
            target=target,
            source=SuppressionSource(source),
            reply=reply,
            created_at=time_at(created_at, "created_at"),
            expires_at=opt_time_at(expires_at, "expires_at"),
            message_id=message_id,
        )
    except (UnreadableRow, ValueError) as exc:
        return _damaged_entry(row, exc)


def _damaged_entry(row: Any, exc: Exception) -> Suppression:
    """The entry of a row that cannot be read as written: it still suppresses (see
    :mod:`~mailstrom.stores.side_rows`), with what cannot be read unknown. The query
    matched it as in force, as an expiry that is no time does not expire."""
    target, source, reply, created_at, expires_at, message_id = row
    unreadable_side_row("suppressions", target, exc, "it still applies")
    return Suppression(
        target=target,
        source=member_of(SuppressionSource, source),
        reply=reply,
        created_at=shown_time(created_at),
        expires_at=None if expires_at is None else shown_time(expires_at),
        message_id=message_id,
    )


_BOUNCES = ", ".join(f"'{source.value}'" for source in sorted(BYPASSABLE))
_OUTLASTED = (
    " WHERE NOT (((suppressions.expires_at IS NULL OR (excluded.expires_at IS NOT NULL"
    " AND suppressions.expires_at >= excluded.expires_at))"
    f" AND NOT (suppressions.source IN ({_BOUNCES}) AND excluded.source NOT IN ({_BOUNCES})"
    " AND (excluded.expires_at IS NULL OR (suppressions.expires_at IS NOT NULL"
    " AND excluded.expires_at >= suppressions.expires_at))))"
    " OR (suppressions.source = 'manual' AND (suppressions.expires_at > excluded.created_at"
    f" OR suppressions.expires_at < {READABLE_FROM})))"
)
"""Replace a row only when it is no operator's entry in force at the new entry's time and
does not last as long as it, or is a bounce's that the new entry, a complaint's, lasts as
long as (Suppression.stands_against: no end lasts longest; an expiry that is no time,
stored as text or a blob, sorts after every number and so does not expire, as
:data:`_IN_FORCE` reads it; nor does one before any time, as there and in PostgreSQL)."""


def insert_suppressions(
    conn: sqlite3.Connection, entries: Sequence[Suppression], *, keep_longer: bool = False
) -> int:
    """Add or replace ``entries`` (their rows made one at a time: an import hands a
    million at once); with ``keep_longer``, not over a row that lasts as long."""
    conn.executemany(
        f"INSERT INTO suppressions ({_COLUMNS}) VALUES (?,?,?,?,?,?)"
        " ON CONFLICT (target) DO UPDATE SET source = excluded.source,"
        " reply = excluded.reply, created_at = excluded.created_at,"
        " expires_at = excluded.expires_at, message_id = excluded.message_id"
        + (_OUTLASTED if keep_longer else ""),
        (
            (
                e.target,
                # NULL for an unknown source or time (an entry read back from a bad
                # row): refused by the NOT NULL columns rather than made up.
                None if e.source is None else e.source.value,
                e.reply,
                opt_us(e.created_at),
                opt_us(e.expires_at),
                e.message_id,
            )
            for e in entries
        ),
    )
    return len(entries)


def delete_suppressions(conn: sqlite3.Connection, targets: Sequence[str]) -> int:
    """Remove the entries of ``targets``; how many existed."""
    removed = 0
    for chunk in _text_chunks(sorted(set(targets))):
        removed += conn.execute(
            f"DELETE FROM suppressions WHERE target IN ({qmarks(len(chunk))})", chunk
        ).rowcount
    return removed


_EXPIRED = "expires_at >= ? AND expires_at <= ?"
"""An entry expired at or before the second parameter, the first being READABLE_FROM: an
expiry that is no time (text, a blob, a number before any time) is outside the range and
does not expire (:data:`_IN_FORCE`). Found on ``suppressions_expiry`` (schema version 18)."""


def any_expired(conn: sqlite3.Connection, *, expired_before: datetime) -> bool:
    """Whether an entry expired at or before ``expired_before`` (one probe of the index)."""
    row = conn.execute(
        f"SELECT 1 FROM suppressions WHERE {_EXPIRED} LIMIT 1",
        (READABLE_FROM, to_us(expired_before)),
    ).fetchone()
    return row is not None


def prune_expired(conn: sqlite3.Connection, *, expired_before: datetime, limit: int) -> int:
    """Delete up to ``limit`` entries expired at or before ``expired_before`` (see
    :data:`_EXPIRED`), soonest first; how many."""
    return int(
        conn.execute(
            "DELETE FROM suppressions WHERE target IN (SELECT target FROM suppressions"
            f" WHERE {_EXPIRED} ORDER BY expires_at LIMIT ?)",
            (READABLE_FROM, to_us(expired_before), row_limit(limit)),
        ).rowcount
    )


def find_suppressions(
    conn: sqlite3.Connection, targets: Sequence[str], *, now: datetime
) -> dict[str, Suppression]:
    """The entries of ``targets`` that apply at ``now``, by target."""
    found: dict[str, Suppression] = {}
    for chunk in _text_chunks(list(dict.fromkeys(targets))):
        for row in conn.execute(
            f"SELECT {_COLUMNS} FROM suppressions WHERE target IN ({qmarks(len(chunk))})"
            f" AND {_IN_FORCE}",
            [*chunk, to_us(now), READABLE_FROM],
        ):
            found[row[0]] = _entry(row)
    return found


def with_suppressions(conn: sqlite3.Connection, lease: Lease, *, now: datetime) -> Lease:
    """``lease`` carrying the entries that apply to its recipients, read in the caller's
    transaction (the one that leased them), so the worker needs no lookup of its own.
    An empty list, the usual case, costs one probe."""
    if conn.execute("SELECT 1 FROM suppressions LIMIT 1").fetchone() is None:
        return replace(lease, suppressions={})
    targets = lookup_targets(r.address for item in lease.items for r in item.recipients)
    return replace(lease, suppressions=find_suppressions(conn, targets, now=now))


def page_suppressions(
    conn: sqlite3.Connection, *, now: datetime | None, after: str, limit: int
) -> list[Suppression]:
    """Entries after ``after`` in target order (only those active at ``now``, if given)."""
    active = "" if now is None else f" AND {_IN_FORCE}"
    params: list[object] = [after]
    if now is not None:
        params += [to_us(now), READABLE_FROM]
    params.append(row_limit(limit))
    return [
        _entry(row)
        for row in conn.execute(
            f"SELECT {_COLUMNS} FROM suppressions WHERE target > ?{active} ORDER BY target LIMIT ?",
            params,
        )
    ]


def _text_chunks(values: list[str]) -> list[list[str]]:
    """``values`` in lists short enough for one ``IN (...)`` each."""
    return [values[i : i + _IN_CHUNK] for i in range(0, len(values), _IN_CHUNK)]


_NAMED_CHUNK = 500
"""Addresses bound per statement of :func:`recipients_by_address`."""


def recipients_by_address(
    conn: sqlite3.Connection, message_id: str, addresses: Sequence[str] | None
) -> RecipientsFound:
    """The recipients of ``message_id`` named by ``addresses`` (see
    Store.recipients_by_address): those of its rows in the (message_seq, address) index whose
    address, ASCII letters folded, is one of them."""
    if not comparable(message_id):
        raise UnknownMessage(message_id)
    row = conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = ?", (message_id,)
    ).fetchone()
    if row is None:
        raise UnknownMessage(message_id)
    seq = row[0]
    # Two rows at most: whether it has one recipient, without counting them all.
    single = len(conn.execute(_FIRST_TWO, (seq,)).fetchall()) == 1
    found: list[Any] = []
    if addresses is None or single:
        found = conn.execute(f"{_RECIPIENTS} ORDER BY position, id", (seq,)).fetchall()
    else:
        wanted = sorted({ascii_lower(a) for a in addresses if comparable(a)})
        for start in range(0, len(wanted), _NAMED_CHUNK):
            chunk = wanted[start : start + _NAMED_CHUNK]
            # The addresses compared in the index alone (it holds the row id too): the
            # rows of the others are never read.
            found += conn.execute(
                f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE id IN (SELECT id FROM"
                " recipients WHERE message_seq = ?"
                f" AND lower(address) IN ({qmarks(len(chunk))}))",
                (seq, *chunk),
            ).fetchall()
        found.sort(key=lambda r: r[1])  # their ids: the message's order
    try:
        message = message_from_rows(row, {seq: found}, {})
    except (UnreadableRow, ValueError, TypeError, OverflowError) as exc:
        raise UnreadableRow(f"message {message_id}: {UNREADABLE}: {exc}") from exc
    return RecipientsFound(message=message, single=single)


_FIRST_TWO = "SELECT 1 FROM recipients WHERE message_seq = ? LIMIT 2"
_RECIPIENTS = f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE message_seq = ?"


def fail_recipient(
    conn: sqlite3.Connection, seq: int, address: str, attempt: Attempt
) -> int | None:
    """Mark one DELIVERED recipient of message ``seq`` FAILED by ``attempt`` and add it to
    the history (not counted as a delivery attempt); its row id, or None when it has no
    such recipient or it is not DELIVERED (see Store.fail_late)."""
    a = bounded_attempt(attempt)
    reply = a.reply
    reply_cols = (reply.code, reply.enhanced, reply.text) if reply else (None, None, None)
    reason = a.reason_class.value if a.reason_class is not None else None
    at = to_us(a.at)
    row = conn.execute(
        "UPDATE recipients SET state = 'failed', last_attempt_at = ?, next_attempt_at = NULL,"
        " finished_at = ?, lease_token = NULL, lease_expires_at = NULL, reply_code = ?,"
        " reply_enhanced = ?, reply_text = ?, error = ?, mx_host = ?, ip = ?, tls = ?,"
        " uncertain = 0, reason_class = ?"
        " WHERE message_seq = ? AND address = ? AND state = 'delivered' RETURNING id",
        (at, at, *reply_cols, a.error, a.mx_host, a.ip, a.tls, reason, seq, address),
    ).fetchone()
    if row is None:
        return None
    rid = int(row[0])
    conn.execute(
        "DELETE FROM attempts WHERE recipient_id = ? AND id NOT IN (SELECT id FROM attempts"
        " WHERE recipient_id = ? ORDER BY id DESC LIMIT ?)",
        (rid, rid, MAX_HISTORY - 1),
    )
    conn.execute(
        "INSERT INTO attempts (recipient_id, at, outcome, duration, mx_host, ip, port,"
        " tls_version, tls_cipher, reply_code, reply_enhanced, reply_text, error,"
        " uncertain, reason_class, tls_policy) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            *(rid, at, a.outcome.value, a.duration, a.mx_host, a.ip, a.port),
            *(a.tls_version, a.tls_cipher, *reply_cols, a.error, a.uncertain, reason),
            a.tls_policy,  # the whole attempt, as record_rows keeps a recorded one
        ),
    )
    return rid


def read_verp_key(conn: sqlite3.Connection) -> bytes | None:
    """The store's VERP key, or None before any process has made it."""
    row = conn.execute("SELECT key FROM verp_key WHERE id = 1").fetchone()
    return None if row is None else bytes(row[0])


def make_verp_key(conn: sqlite3.Connection) -> bytes:
    """The store's VERP key, made now unless another process made it first (inside the
    caller's write transaction)."""
    conn.execute(
        "INSERT OR IGNORE INTO verp_key (id, key) VALUES (1, ?)",
        (secrets.token_bytes(VERP_KEY_SIZE),),
    )
    key = read_verp_key(conn)
    assert key is not None  # inserted, or there already
    return key

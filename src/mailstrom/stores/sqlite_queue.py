"""The SQL of the SQLite queue's rows: inserting messages, leasing, recording, reading.

Functions over a connection inside a transaction the caller (:class:`SQLiteStore`) opened;
the store owns connections, locking, group commit and the schema. Times are integer
microseconds since the epoch (:mod:`mailstrom.stores.sqlite_schema`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from mailstrom.errors import UnreadableRow
from mailstrom.status import (
    Attempt,
    AttemptOutcome,
    MessageStatus,
    ReasonClass,
    RecipientState,
    derive_message_state,
)
from mailstrom.stores.attributes import metadata_from, metadata_json, tags_from, tags_json
from mailstrom.stores.base import (
    MAX_HISTORY,
    ByteBudget,
    Lease,
    LeasedRecipient,
    RecipientResult,
    bounded_attempt,
    byte_budget,
    domain_of,
    holder_range,
    lease_token,
    new_message_id,
)
from mailstrom.stores.clock import after
from mailstrom.stores.dkim_column import dkim_from_column, dkim_to_column
from mailstrom.stores.fairness import DESTINATIONS, Fairness
from mailstrom.stores.row_checks import (
    UNREADABLE,
    MessageHead,
    checked_attempts,
    checked_data,
    checked_dsn,
    checked_size,
    checked_text,
    not_utf8,
    shown_text,
    unreadable_error,
)
from mailstrom.stores.sqlite_schema import (
    attempt_from_row,
    opt_time_at,
    opt_us,
    recipient_from_row,
    time_at,
    to_us,
)

if TYPE_CHECKING:
    from mailstrom.message.prepared import PreparedMessage

log = logging.getLogger(__name__)

PENDING_SQL = "state IN ('queued', 'deferred')"
HAS_PENDING_SQL = (
    f"EXISTS (SELECT 1 FROM recipients p WHERE p.message_seq = m.seq AND p.{PENDING_SQL})"
)
"""Message ``m`` has a pending recipient (the partial index's condition spelled as it is,
so that SQLite uses recipients_pending_message)."""
HELD_WAITING_SQL = (
    "SELECT count(*) FROM messages m WHERE held = 1 AND EXISTS (SELECT 1 FROM recipients r"
    f" WHERE r.message_seq = m.seq AND r.{PENDING_SQL})"
)
"""Held messages still waiting: one cancelled (or finished) while held keeps its flag,
and is no mail on hold."""
# Must match the recipients_lane_due index expression exactly, or SQLite cannot use it; the
# queries name the index (INDEXED BY) because without ANALYZE statistics the planner
# prefers the state index and sorts every pending recipient.
DUE_SQL = "max(next_attempt_at, coalesce(lease_expires_at, 0))"
_RECORD_CHUNK = 1000
"""Results per statement when recording: 17 values each, well under SQLite's limit of
32,766 bound parameters."""
_ROW16 = "(" + ",".join("?" * 16) + ")"
_ROW17 = "(" + ",".join("?" * 17) + ")"
HELD = 1
"""The bit of ``recipients.held`` that copies ``messages.held`` (the message is held)."""
SET_ASIDE = 2
"""The bit of ``recipients.held`` set on the pending recipients of a suspended destination
(one with a row in ``suspensions``), so that recipients_lane_due (``held = 0``) leaves them
out: leasing and next_due walked the index past every one of them, on every call. Set by
suspend and by enqueue, cleared by resume and, once a timed suspension has ended, by the
next lease or next_due (:func:`~mailstrom.stores.sqlite_operator.end_ended`). SUSPENDED_SQL
still filters what a lease reads: a row is never leased early, whatever its bits."""
SUSPENDED_SQL = "domain NOT IN (SELECT domain FROM suspensions WHERE until IS NULL OR until > ?)"
"""A recipient not at a destination suspended at the bound time. The suspensions are read
by the statement itself: bound one by one, as they were, a lease of many lanes bound each
lane's list again, past SQLite's limit on bound values with enough suspensions ("too
many SQL variables", every lease failed), and a suspension row whose domain is not UTF-8
(changed by hand) could not be bound at all (StoreRefusedData: nothing was leased)."""
_IN_CHUNK = 500
"""Values per ``IN (...)`` list, well under SQLite's limit on bound parameters."""
_LANES_PER_WALK = 100
"""Lanes walked by one statement: SQLite allows 500 terms in a compound SELECT, and each
lane binds its skipped domains again."""


def chunks(values: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


def qmarks(n: int) -> str:
    return ",".join("?" * n)


# --- writing -------------------------------------------------------------------------------


def insert_messages(
    conn: sqlite3.Connection, messages: Sequence[PreparedMessage], *, now: int, hold: bool
) -> list[str]:
    """Insert ``messages`` and their recipients (queued, due at ``now`` or at their
    ``send_at``); their new ids. A message whose idempotency key another message holds
    (unexpired) is not inserted: the id of that other message takes its place."""
    ids: list[str] = []
    recipients: list[tuple[object, ...]] = []
    dkims: list[tuple[object, ...]] = []
    octets: list[tuple[int, bytes]] = []
    for message in messages:
        mid = new_message_id()
        attrs = message.attributes
        due = now if attrs.send_at is None else max(now, to_us(attrs.send_at))
        cursor = conn.execute(
            "INSERT INTO messages (id, envelope_from, smtputf8, eightbit, created_at, held,"
            " subject, header_message_id, size, tags, metadata, priority, send_at,"
            " expires_at, idempotency_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                mid,
                message.envelope_from,
                message.smtputf8,
                message.eightbit,
                now,
                hold,
                message.subject,
                message.header_message_id,
                message.size,
                tags_json(attrs.tags),
                metadata_json(attrs.metadata),
                attrs.priority,
                opt_us(attrs.send_at),
                opt_us(attrs.expires_at),
                attrs.idempotency_key,
            ),
        )
        seq = cursor.lastrowid
        assert seq is not None
        if attrs.idempotency_key is not None:
            earlier = _claim_key(conn, attrs.idempotency_key, seq, attrs.idempotency_until, now)
            if earlier is not None:
                ids.append(earlier)
                continue
        octets.append((seq, message.data))
        dkim = dkim_to_column(message.dkim_status)
        if dkim is not None:
            dkims.append((seq, dkim))
        if message.require_tls:  # rare: a statement of its own keeps the common one short
            conn.execute("UPDATE messages SET require_tls = 1 WHERE seq = ?", (seq,))
        if message.dsn is not None:  # rare: the common INSERT stays as it is
            conn.execute("UPDATE messages SET dsn = ? WHERE seq = ?", (message.dsn.encode(), seq))
        lane = attrs.priority or ""
        recipients.extend(
            (seq, i, address, domain_of(address), hold, due, lane)
            for i, address in enumerate(message.recipients)
        )
        ids.append(mid)
    # A recipient at a suspended destination is set aside at once (SET_ASIDE).
    conn.executemany(
        "INSERT INTO recipients (message_seq, position, address, domain, state, held,"
        " next_attempt_at, lane) VALUES (?1,?2,?3,?4,'queued',"
        f" ?5 | (EXISTS (SELECT 1 FROM suspensions WHERE domain = ?4) * {SET_ASIDE}),?6,?7)",
        recipients,
    )
    # The bytes in a table of their own (schema version 20), out of the way of the reads
    # and writes of every other column of the message.
    conn.executemany("INSERT INTO message_data (seq, data) VALUES (?,?)", octets)
    if dkims:
        conn.executemany("INSERT INTO message_dkim (message_seq, dkim) VALUES (?,?)", dkims)
    return ids


def _claim_key(
    conn: sqlite3.Connection, key: str, seq: int, until: datetime | None, now: int
) -> str | None:
    """Make ``key`` name the message just inserted as ``seq``; None when it does. When an
    unexpired row holds the key, the new message is deleted again and the id of the one the
    key names is returned. The PRIMARY KEY decides: the INSERT either adds the row, takes
    over an expired one, or does nothing."""
    expires = to_us(until) if until is not None else now
    claimed = conn.execute(
        "INSERT INTO idempotency_keys (key, message_seq, expires_at) VALUES (?,?,?)"
        " ON CONFLICT (key) DO UPDATE SET message_seq = excluded.message_seq,"
        " expires_at = excluded.expires_at WHERE idempotency_keys.expires_at <= ?",
        (key, seq, expires, now),
    ).rowcount
    if claimed:
        return None
    conn.execute("DELETE FROM messages WHERE seq = ?", (seq,))
    (earlier,) = conn.execute(
        "SELECT m.id FROM idempotency_keys k JOIN messages m ON m.seq = k.message_seq"
        " WHERE k.key = ?",
        (key,),
    ).fetchone()
    return str(earlier)


def lease_rows(
    conn: sqlite3.Connection,
    *,
    now: datetime,
    limit: int,
    lease_for: timedelta,
    lanes: Sequence[tuple[str, int]] | None = None,
    skip_suspended: bool = False,
    holder: str | None = None,
    max_bytes: int | None = None,
    fair: Fairness | None = None,
) -> Lease | None:
    """Lease up to ``limit`` due recipients inside the caller's write transaction, under a
    token of ``holder`` when given (see ``Store.lease``); with ``fair``, none at its busy
    destinations and at most its share of one destination (see :func:`_fair_walk`).

    Without ``lanes``, the earliest due of every lane. With them ((name, at most), highest
    first), each lane's earliest due in turn, walking that lane's range of
    recipients_lane_due; then, when every lane had room left and nothing more due,
    recipients of lanes not named (queued before lanes existed, or in a lane since removed
    from the configuration). With ``skip_suspended``, none at a destination suspended at
    ``now`` (:data:`SUSPENDED_SQL`). Up to
    ``max_bytes`` of message data (see ``Store.lease``)."""
    token = lease_token(holder)
    expires_at = after(now, lease_for)
    marks = (token, to_us(expires_at), to_us(now))
    skip = f"{SUSPENDED_SQL} AND " if skip_suspended else ""
    skipped: list[object] = [to_us(now)] if skip_suspended else []
    max_bytes = byte_budget(max_bytes)
    budget: ByteBudget[int] | None = None if max_bytes is None else ByteBudget(max_bytes)
    if lanes is None:
        rows = _mark_lanes(
            conn, marks, limit, pending_lanes(conn, rename=True), skip, skipped, budget, fair
        )
    else:
        rows = []
        exhausted = True
        seen: set[str] = set()
        for lane, most in lanes:
            if budget is not None and budget.full:
                break  # no further message fits: nothing more to walk
            if lane in seen:
                continue  # a lane named twice counts once, with its first number
            seen.add(lane)
            take = min(most, limit - len(rows))
            if take <= 0:
                exhausted = False
                continue
            found = _mark_lanes(conn, marks, take, [lane], skip, skipped, budget, fair)
            exhausted = exhausted and len(found) < take
            rows += found
        if exhausted and len(rows) < limit and not (budget is not None and budget.full):
            named = {lane for lane, _ in lanes}
            others = [lane for lane in pending_lanes(conn, rename=True) if lane not in named]
            rows += _mark_lanes(conn, marks, limit - len(rows), others, skip, skipped, budget, fair)
    if not rows:
        return None
    seqs = sorted({row[1] for row in rows})
    heads: dict[int, MessageHead | UnreadableRow] = {}
    message_ids: dict[int, str] = {}
    for chunk in chunks(seqs):
        for m in conn.execute(
            # created_at: when the message could first go, queued or its send_at when
            # later (the retry policy's max_age and the delay warning count from there).
            "SELECT m.seq, id, envelope_from, smtputf8, eightbit,"
            " CASE WHEN typeof(send_at) = 'integer' AND send_at > created_at THEN send_at"
            " ELSE created_at END, d.data, require_tls,"
            " expires_at, priority, dsn, size, created_at"
            " FROM messages m LEFT JOIN message_data d ON d.seq = m.seq"
            f" WHERE m.seq IN ({qmarks(len(chunk))})",
            chunk,
        ):
            heads[m[0]] = _head(m)
            message_ids[m[0]] = m[1]
    groups: dict[tuple[int, str], list[tuple[int, LeasedRecipient]]] = {}
    unreadable: list[_SetAside] = []
    for row in rows:
        rid, seq, position, address, domain, attempts, first, last = row
        head = heads.get(seq, _MISSING)
        try:
            if isinstance(head, UnreadableRow):
                raise head
            domain = checked_text(domain, "domain")
            recipient = LeasedRecipient(
                address=checked_text(address, "address"),
                attempts=checked_attempts(attempts),
                first_attempt_at=opt_time_at(first, "first_attempt_at"),
                created_at=head.created_at,
                ref=rid,
                last_attempt_at=opt_time_at(last, "last_attempt_at"),
            )
        except UnreadableRow as exc:
            unreadable.append(_SetAside(row, head, exc))
            continue
        groups.setdefault((seq, domain), []).append((position, recipient))
    failed = _fail_unreadable(conn, token, unreadable, now=now) if unreadable else ()
    items = []
    for (seq, domain), leased in groups.items():
        head = heads[seq]
        assert not isinstance(head, UnreadableRow)
        leased.sort(key=lambda pair: pair[0])
        items.append(
            head.work_item(
                message_id=message_ids[seq],
                lease_token=token,
                domain=domain,
                recipients=tuple(r for _, r in leased),
            )
        )
    if not items and not failed:
        return None
    return Lease(token=token, expires_at=expires_at, items=tuple(items), failed=failed)


_MISSING = UnreadableRow("its message row is missing")


def _within_budget(
    conn: sqlite3.Connection, found: list[tuple[int, int]], ids: str, budget: ByteBudget[int]
) -> list[tuple[int, int]]:
    """The walked recipients ``found`` ((due, id) in the lease's order; ``ids`` their ids
    as a JSON list) that ``budget`` keeps, read before any is stamped: the others keep
    whatever lease they had (one that had expired, or none), due as they were, and their
    data is never read. One statement per walk reads their messages' sizes. A size that
    is not a count (a row changed by hand), or a missing message row, counts as nothing
    here: the lease sets such a recipient aside as unreadable (checked_data)."""
    sizes = {
        rid: (seq, size if type(size) is int and size > 0 else 0)
        for rid, seq, size in conn.execute(
            "SELECT r.id, r.message_seq, m.size FROM recipients r"
            " LEFT JOIN messages m ON m.seq = r.message_seq"
            " WHERE r.id IN (SELECT value FROM json_each(?))",
            (ids,),
        )
    }
    kept = []
    for due, rid in found:
        seq, size = sizes.get(rid, (None, 0))
        if seq is None or budget.keeps(seq, size):
            kept.append((due, rid))
    return kept


def _head(row: Any) -> MessageHead | UnreadableRow:
    """The message row of a lease (seq, id, envelope_from, smtputf8, eightbit, created_at,
    data, require_tls, expires_at, priority, dsn, size, queued_at), or why it cannot be
    delivered."""
    envelope_from, smtputf8, eightbit, created_at, data, require_tls = row[2:8]
    expires_at, lane, dsn, size, queued_at = row[8:]
    try:
        return MessageHead(
            envelope_from=checked_text(envelope_from, "envelope_from"),
            smtputf8=bool(smtputf8),
            eightbit=bool(eightbit),
            created_at=time_at(created_at, "created_at"),
            data=checked_data(data, size),
            require_tls=bool(require_tls),
            expires_at=opt_time_at(expires_at, "expires_at"),
            priority=lane if isinstance(lane, str) else "",
            dsn=checked_dsn(dsn),
            queued_at=time_at(queued_at, "created_at"),
        )
    except UnreadableRow as exc:
        return exc


class _SetAside(NamedTuple):
    """A leased recipient that cannot be delivered: its row as leased (id, message seq,
    position, address, domain, attempts, first and last attempt), its message's row as
    decoded (or why not), and why."""

    row: Any
    head: MessageHead | UnreadableRow
    problem: UnreadableRow


def _fail_unreadable(
    conn: sqlite3.Connection, token: str, unreadable: Sequence[_SetAside], *, now: datetime
) -> tuple[RecipientResult, ...]:
    """Fail, for good, the leased recipients whose rows cannot be delivered, in the lease's
    own transaction (leased again they would fail again, in a loop), with an attempt in
    their history; the results to report, for those whose message id and address are
    known (the caller writes their outbox events). Their own columns that cannot be read
    back are reset (the error names what they held), so that the row, its event and the
    message's status read back from now on."""
    at = to_us(now)
    failures: list[tuple[object, ...]] = []
    history: list[tuple[object, ...]] = []
    results: list[RecipientResult] = []
    # One line per message (a bad message row fails all its leased recipients at once).
    per_message: dict[object, tuple[int, UnreadableRow]] = {}
    ids = {u.row[1]: _message_id(conn, u.row[1]) for u in unreadable}
    for (rid, seq, _, address, _, attempts, first, _), head, problem in unreadable:
        error = unreadable_error(problem)
        failures.append((error, at, at, _readable_attempts(attempts), _readable_time(first), rid))
        history.append((rid, at, error))
        count, _ = per_message.get(seq, (0, problem))
        per_message[seq] = (count + 1, problem)
        mid = ids[seq]
        if mid is not None and isinstance(address, str):
            attempt = Attempt(
                at=now, outcome=AttemptOutcome.PERMANENT, error=error, reason_class=_OTHER
            )
            results.append(
                RecipientResult(
                    message_id=mid,
                    address=address,
                    state=RecipientState.FAILED,
                    attempt=attempt,
                    lease_token=token,
                    ref=rid,
                    queued_at=None if isinstance(head, UnreadableRow) else head.created_at,
                    envelope_from=None if isinstance(head, UnreadableRow) else head.envelope_from,
                )
            )
    conn.executemany(
        "UPDATE recipients SET state = 'failed', error = ?, reason_class = 'other',"
        " reply_code = NULL, reply_enhanced = NULL, reply_text = NULL, uncertain = 0,"
        " next_attempt_at = NULL, finished_at = ?, last_attempt_at = ?, attempts = ?,"
        " first_attempt_at = ?, lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
        failures,
    )
    # The history's bound (see record_rows): room for this attempt.
    conn.executemany(
        "DELETE FROM attempts WHERE recipient_id = ? AND id NOT IN (SELECT id FROM attempts"
        " WHERE recipient_id = ? ORDER BY id DESC LIMIT ?)",
        [(rid, rid, MAX_HISTORY - 1) for rid, _, _ in history],
    )
    conn.executemany(
        "INSERT INTO attempts (recipient_id, at, outcome, duration, error, uncertain,"
        " reason_class) VALUES (?, ?, 'permanent', 0, ?, 0, 'other')",
        history,
    )
    for seq, (count, problem) in per_message.items():
        log.error(
            "%d recipient(s) of message %s failed: %s: %s",
            count,
            ids[seq] or "(row missing)",
            UNREADABLE,
            problem,
        )
    return tuple(results)


_OTHER = ReasonClass.OTHER


def _message_id(conn: sqlite3.Connection, seq: object) -> str | None:
    """The id of message ``seq``; None when its row is gone (or its id is not text)."""
    row = conn.execute("SELECT id FROM messages WHERE seq = ?", (seq,)).fetchone()
    return row[0] if row is not None and isinstance(row[0], str) else None


def _readable_attempts(value: object) -> int:
    """``value`` when it is an attempt count, else 0 (see checked_attempts)."""
    try:
        return checked_attempts(value)
    except UnreadableRow:
        return 0


def _readable_time(value: object) -> object:
    """``value`` when it is a time (or None), else None (see opt_time_at)."""
    try:
        opt_time_at(value, "")
    except UnreadableRow:
        return None
    return value


# The lanes holding pending, unheld recipients, in name order: a walk of
# recipients_lane_due that seeks from each lane to the next (one probe per lane, however
# many recipients each holds).
PENDING_LANES_SQL = (
    "WITH RECURSIVE lanes (lane) AS ("
    " SELECT (SELECT lane FROM recipients INDEXED BY recipients_lane_due"
    f" WHERE {PENDING_SQL} AND held = 0 ORDER BY lane LIMIT 1)"
    " UNION ALL"
    " SELECT (SELECT r.lane FROM recipients r INDEXED BY recipients_lane_due"
    f" WHERE r.lane > lanes.lane AND {PENDING_SQL} AND held = 0 ORDER BY r.lane LIMIT 1)"
    " FROM lanes WHERE lanes.lane IS NOT NULL)"
    " SELECT lane FROM lanes WHERE lane IS NOT NULL"
)


def pending_lanes(conn: sqlite3.Connection, *, rename: bool = False) -> list[str]:
    """The lanes that hold pending, unheld recipients (see PENDING_LANES_SQL).

    A lane whose name is not UTF-8 (a row written by another tool: lone surrogates once
    read, see ``decode_text``) cannot be bound back to walk it. With ``rename`` (inside a
    write transaction) its rows move to the name read with U+FFFD for those octets, with a
    warning, and are walked under it from then on; without, it is passed over."""
    lanes: dict[str, None] = {}
    for (lane,) in conn.execute(PENDING_LANES_SQL):
        if isinstance(lane, str) and not_utf8(lane):
            if not rename:
                continue
            raw = lane.encode("utf-8", "surrogateescape")
            lane = raw.decode("utf-8", "replace")
            changed = conn.execute(
                "UPDATE recipients SET lane = ? WHERE lane = CAST(? AS TEXT)", (lane, raw)
            ).rowcount
            log.warning(
                "%d recipient(s) in a lane named %r, not UTF-8: moved to %r", changed, raw, lane
            )
        lanes[lane] = None
    return list(lanes)


def lane_walk_sql(skip: str = "") -> str:
    """The ids and due times of one lane's due recipients, earliest first, up to a limit:
    a range of recipients_lane_due read in order. Binds (*skipped, lane, now, limit);
    ``skip`` is a constant fragment ending in AND."""
    return (
        f"SELECT id, {DUE_SQL} AS due FROM recipients INDEXED BY recipients_lane_due"
        f" WHERE {skip}lane = ? AND {PENDING_SQL} AND held = 0 AND {DUE_SQL} <= ?"
        f" ORDER BY {DUE_SQL}, id LIMIT ?"
    )


def lanes_walk_sql(lanes: int, skip: str = "") -> str:
    """The ids and due times of the earliest due recipients of ``lanes`` lanes (at most
    :data:`_LANES_PER_WALK`), up to a limit: each lane's walk (lane_walk_sql, its own
    limit) merged in due order. Binds each lane's values in turn, then the limit."""
    if lanes == 1:
        return f"SELECT id, due FROM ({lane_walk_sql(skip)})"
    walk = f"SELECT * FROM ({lane_walk_sql(skip)})"
    return f"SELECT id, due FROM ({' UNION ALL '.join([walk] * lanes)}) ORDER BY due, id LIMIT ?"


def next_due_sql(skip: str, *, dated: bool = False) -> str:
    """The earliest due time of one lane's pending, unheld recipients: the front of its
    range of recipients_lane_due; with ``dated``, past the recipients without one (see
    :func:`lane_due`). Binds (lane, *skipped); ``skip`` is a constant fragment starting
    with AND."""
    past_nulls = f" AND {DUE_SQL} IS NOT NULL" if dated else ""
    return (
        f"SELECT {DUE_SQL} FROM recipients INDEXED BY recipients_lane_due"
        f" WHERE lane = ? AND {PENDING_SQL} AND held = 0{skip}{past_nulls}"
        f" ORDER BY {DUE_SQL} LIMIT 1"
    )


def lane_due(
    conn: sqlite3.Connection, lane: str, skip: str, skipped: Sequence[object]
) -> tuple[object, bool]:
    """The earliest due time of one lane (None for none; what the row holds, which may be
    no time at all), and whether the lane holds recipients without a due time (a NULL
    ``next_attempt_at``: a row changed by hand). Those sort first in the index, so they
    would hide the lane's real due times: only then, one more probe reads past them."""
    row = conn.execute(next_due_sql(skip), [lane, *skipped]).fetchone()
    if row is None or row[0] is not None:
        return (None if row is None else row[0]), False
    row = conn.execute(next_due_sql(skip, dated=True), [lane, *skipped]).fetchone()
    return (None if row is None else row[0]), True


def date_undated(conn: sqlite3.Connection, lanes: Sequence[str], *, now: int) -> int:
    """Make the pending recipients of ``lanes`` that have no due time due at ``now``;
    how many. No time is ever <= now, so they were never leased, while nothing else is
    wrong with them: the next lease delivers them."""
    changed = 0
    for lane in lanes:
        changed += conn.execute(
            "UPDATE recipients INDEXED BY recipients_lane_due SET next_attempt_at = ?"
            f" WHERE lane = ? AND {PENDING_SQL} AND held = 0 AND {DUE_SQL} IS NULL",
            (now, lane),
        ).rowcount
    return changed


def _mark_lanes(
    conn: sqlite3.Connection,
    marks: tuple[str, int, int],
    limit: int,
    lanes: Sequence[str],
    skip: str,
    skipped: Sequence[object],
    budget: ByteBudget[int] | None = None,
    fair: Fairness | None = None,
) -> list[Any]:
    """Stamp up to ``limit`` due recipients of ``lanes`` with the lease (token, expiry) of
    ``marks``, earliest due first across them, and return them in that order.
    ``skip`` is a constant fragment ending in AND, ``skipped`` its values. With
    ``budget``, only the rows of the messages it keeps (:func:`_within_budget`).

    Two statements: an UPDATE's RETURNING comes in the table's order, not its subquery's,
    and after the update a row no longer shows the lease expiry it was due by, so the
    walk is read first and the rows it found are then stamped by id."""
    if not lanes or limit <= 0:
        return []
    token, expires, now = marks
    found: list[tuple[int, int]] = []
    if fair is not None:
        for lane in lanes:
            found += _fair_walk(conn, lane, now, limit - len(found), skip, skipped, fair)
            if len(found) >= limit:
                break
    else:
        for start in range(0, len(lanes), _LANES_PER_WALK):
            group = lanes[start : start + _LANES_PER_WALK]
            params: list[object] = []
            for lane in group:
                params += [*skipped, lane, now, limit]
            if len(group) > 1:
                params.append(limit)
            walk = conn.execute(lanes_walk_sql(len(group), skip), params)
            found += [(due, rid) for rid, due in walk]
    if len(lanes) > _LANES_PER_WALK:
        found = sorted(found)[:limit]  # the groups' walks merged in due order
    if not found:
        return []
    ids = json.dumps([rid for _, rid in found])
    if budget is not None:
        found = _within_budget(conn, found, ids, budget)
        if not found:
            return []
        ids = json.dumps([rid for _, rid in found])
    order = {rid: n for n, (_, rid) in enumerate(found)}
    rows = conn.execute(
        "UPDATE recipients SET lease_token = ?, lease_expires_at = ?"
        " WHERE id IN (SELECT value FROM json_each(?))"
        " RETURNING id, message_seq, position, address, domain, attempts,"
        " first_attempt_at, last_attempt_at",
        (token, expires, ids),
    ).fetchall()
    rows.sort(key=lambda row: order[row[0]])
    return rows


DESTINATIONS_SQL = (
    "WITH RECURSIVE d (domain) AS ("
    " SELECT (SELECT domain FROM recipients INDEXED BY recipients_destination_due"
    f" WHERE lane = ?1 AND {PENDING_SQL} AND held = 0 AND domain > ?2 ORDER BY domain LIMIT 1)"
    " UNION ALL"
    " SELECT (SELECT r.domain FROM recipients r INDEXED BY recipients_destination_due"
    f" WHERE r.lane = ?1 AND {PENDING_SQL} AND held = 0 AND r.domain > d.domain"
    " ORDER BY r.domain LIMIT 1)"
    " FROM d WHERE d.domain IS NOT NULL LIMIT ?3)"
    " SELECT domain FROM d WHERE domain IS NOT NULL"
)
"""Up to ?3 domains with pending, unheld recipients in the lane ?1, after the domain ?2, in
name order: a walk of recipients_destination_due that seeks from each domain to the next
(one probe per domain, however many recipients each holds)."""


def destination_walk_sql(skip: str) -> str:
    """The ids and due times of one destination's due recipients in one lane, earliest
    first, up to a limit: a range of recipients_destination_due. Binds (*skipped, lane,
    domain, now, limit)."""
    return (
        f"SELECT id, {DUE_SQL} FROM recipients INDEXED BY recipients_destination_due"
        f" WHERE {skip}lane = ? AND domain = ? AND {PENDING_SQL} AND held = 0"
        f" AND {DUE_SQL} <= ? ORDER BY {DUE_SQL}, id LIMIT ?"
    )


def _first_read_sql(skip: str) -> str:
    """A fair lease's first read: one lane's ``limit`` earliest due (as a plain lease
    reads them), with their domains. Binds (*skipped, lane, now, limit)."""
    return (
        f"SELECT id, {DUE_SQL} AS due, domain FROM recipients INDEXED BY recipients_lane_due"
        f" WHERE {skip}lane = ? AND {PENDING_SQL} AND held = 0 AND {DUE_SQL} <= ?"
        f" ORDER BY {DUE_SQL}, id LIMIT ?"
    )


def _fair_walk(
    conn: sqlite3.Connection,
    lane: str,
    now: int,
    limit: int,
    skip: str,
    skipped: Sequence[object],
    fair: Fairness,
) -> list[tuple[int, int]]:
    """(due, id) of up to ``limit`` due recipients of ``lane`` a fair lease takes: none at
    a busy destination, at most ``fair.share`` of one destination. First those of the
    lane's ``limit`` earliest due that pass (the read a plain lease makes); when that read
    was full and left room, the earliest due of other destinations, one seek each, up to
    :data:`.fairness.DESTINATIONS` of them a lease, taking turns from where the last lease
    stopped (:attr:`Fairness.turns`): a deep backlog at a busy destination is never walked.
    """
    busy, share = fair.busy, fair.share
    counts: dict[str, int] = {}
    taken: list[tuple[int, int]] = []
    walked = 0
    first = _first_read_sql(skip)
    params: list[object] = [*skipped, lane, now, limit]
    if busy:
        # The busy domains' rows left out by the statement itself, the rows it read
        # counted in a last row (id NULL): a backlog's are not handed over one by one.
        first = (
            f"WITH w AS MATERIALIZED ({first}) SELECT id, due, domain, 0 FROM w"
            " WHERE domain NOT IN (SELECT value FROM json_each(?))"
            " UNION ALL SELECT NULL, count(*), NULL, 1 FROM w ORDER BY 4, 2, 1"
        )
        params.append(json.dumps(sorted(busy)))
    for rid, due, domain, *_ in conn.execute(first, params):
        if rid is None:
            walked = due
            continue
        if not busy:
            walked += 1
        held = counts.get(domain, 0)
        if held < share and domain not in busy:
            counts[domain] = held + 1
            taken.append((due, rid))
    if walked < limit or len(taken) >= limit:
        return taken  # everything due was read, or the lease is full
    ids = {rid for _, rid in taken}
    start = fair.turns.get(lane, "")
    sql = destination_walk_sql(skip)
    seen = 0
    for around in (False, True):
        if around and (start == "" or seen >= DESTINATIONS):
            break
        domains = [
            domain
            for (domain,) in conn.execute(
                DESTINATIONS_SQL, [lane, "" if around else start, DESTINATIONS - seen]
            )
        ]
        seen += len(domains)
        for domain in domains:
            if not isinstance(domain, str) or not_utf8(domain):
                continue  # not to be bound back (a row changed by hand): first reads take it
            if around and domain > start:
                break
            fair.turns[lane] = domain
            held = counts.get(domain, 0)
            if domain in busy or held >= share:
                continue
            # Its earliest: those the first read took (counted in held), then more.
            most = held + min(share - held, limit - len(taken))
            for rid, due in conn.execute(sql, [*skipped, lane, domain, now, most]):
                if rid not in ids:
                    counts[domain] = counts.get(domain, 0) + 1
                    taken.append((due, rid))
            if len(taken) >= limit:
                return taken
    return taken


def update_leased(
    conn: sqlite3.Connection, lease: Lease, values: Sequence[object], assignments: str
) -> int:
    """Apply ``assignments`` (a constant SET fragment, its values first in ``values``) to
    the recipients ``lease`` still holds, found by the row ids it handed out (every
    recipient of a lease this store made carries one). Returns how many changed."""
    before = conn.total_changes
    conn.executemany(
        f"UPDATE recipients SET {assignments} WHERE id = ? AND lease_token = ?",
        [(*values, r.ref, lease.token) for item in lease.items for r in item.recipients],
    )
    return conn.total_changes - before


def held_of_lease(conn: sqlite3.Connection, lease: Lease) -> int:
    """How many of the recipients ``lease`` still holds belong to held messages or to
    suspended destinations (:data:`HELD` or :data:`SET_ASIDE`)."""
    refs = [r.ref for item in lease.items for r in item.recipients if r.ref is not None]
    held = 0
    for chunk in chunks(refs):
        (count,) = conn.execute(
            f"SELECT count(*) FROM recipients WHERE id IN ({qmarks(len(chunk))})"
            f" AND lease_token = ? AND held & {HELD | SET_ASIDE}",
            [*chunk, lease.token],
        ).fetchone()
        held += int(count)
    return held


def release_holder_rows(conn: sqlite3.Connection, holder: str) -> int:
    """Give back, inside the caller's write transaction, every recipient leased under a
    token of ``holder`` (a range: the column compares as bytes). Schema version 12 dropped
    the index on lease_token (it cost every lease and record two index writes), so the
    pending recipients are walked on the state index instead: only they can hold a lease
    worth giving back, and they are what a queue holds, not its delivered past. Returns
    how many."""
    low, high = holder_range(holder)
    return conn.execute(
        "UPDATE recipients SET lease_token = NULL, lease_expires_at = NULL"
        f" WHERE {PENDING_SQL} AND lease_token >= ? AND lease_token < ?",
        (low, high),
    ).rowcount


def leased_by_holder(conn: sqlite3.Connection, holders: Sequence[str]) -> dict[str, int]:
    """How many pending recipients each of ``holders`` leases now: one walk of the pending
    recipients (as :func:`release_holder_rows`), counted by the part of each token before
    its first ``.`` (a holder's tokens are ``"<holder>.<random>"``)."""
    if not holders:
        return {}
    wanted = set(holders)
    rows = conn.execute(
        "SELECT substr(lease_token, 1, instr(lease_token, '.') - 1) AS holder, count(*)"
        f" FROM recipients WHERE {PENDING_SQL} AND instr(lease_token, '.') > 0"
        " GROUP BY holder"
    ).fetchall()
    return {holder: int(n) for holder, n in rows if holder in wanted}


def record_rows(
    conn: sqlite3.Connection, results: Sequence[RecipientResult]
) -> list[RecipientResult]:
    """Record ``results`` inside the caller's write transaction (see ``Store.record``):
    one UPDATE per chunk by the row ids handed out at lease time, changing a row only
    while its lease token matches, then one INSERT of the history. Returns those recorded."""
    recorded: list[RecipientResult] = []
    for start in range(0, len(results), _RECORD_CHUNK):
        recorded += _record_chunk(conn, results[start : start + _RECORD_CHUNK])
    resigned = {r.message_id: r.dkim for r in recorded if r.dkim is not None}
    if resigned:  # signed anew as they went (rare): their status says what was sent
        conn.executemany(
            "INSERT OR REPLACE INTO message_dkim (message_seq, dkim)"
            " SELECT seq, ? FROM messages WHERE id = ?",
            [(dkim_to_column(dkim), mid) for mid, dkim in resigned.items()],
        )
    return recorded


def _record_chunk(
    conn: sqlite3.Connection, results: Sequence[RecipientResult]
) -> list[RecipientResult]:
    by_rid: dict[int, tuple[RecipientResult, tuple[object, ...]]] = {}
    values: list[object] = []
    for rid, result in _one_per_row(conn, results):
        a = bounded_attempt(result.attempt)
        reply = a.reply
        at = to_us(a.at)
        final = result.state.is_final
        next_at = None if final else opt_us(result.next_attempt_at) or at
        reply_cols = (reply.code, reply.enhanced, reply.text) if reply else (None, None, None)
        reason = a.reason_class.value if a.reason_class is not None else None
        values += (
            *(rid, result.lease_token, result.state.value, at, next_at),
            *(at if final else None, *reply_cols, a.error, a.mx_host, a.ip),
            *(a.tls, a.uncertain, reason, result.notice, result.attempted),
        )
        history = (
            *(rid, at, a.outcome.value, a.duration, a.mx_host, a.ip, a.port),
            *(a.tls_version, a.tls_cipher, *reply_cols, a.error, a.uncertain, reason),
            a.tls_policy,
        )
        by_rid[rid] = (result, history)
    if not by_rid:
        return []
    updated = conn.execute(
        "WITH res (id, token, state, at, next_at, finished, code, enhanced, text, error,"
        " mx_host, ip, tls, uncertain, reason_class, notice, attempted) AS (VALUES "
        + ",".join([_ROW17] * len(by_rid))
        # A result that was no attempt (this host's shortage) counts none.
        + ") UPDATE recipients SET state = res.state, attempts = attempts + res.attempted,"
        " first_attempt_at = coalesce(first_attempt_at, res.at),"
        " last_attempt_at = res.at, next_attempt_at = res.next_at,"
        " finished_at = res.finished, lease_token = NULL, lease_expires_at = NULL,"
        " reply_code = res.code, reply_enhanced = res.enhanced, reply_text = res.text,"
        " error = res.error, mx_host = res.mx_host, ip = res.ip, tls = res.tls,"
        " uncertain = res.uncertain, reason_class = res.reason_class,"
        # A recipient still on its way keeps the mark a result of its own has not
        # replaced (a delay warning not queued yet: its message was not done).
        " notice = CASE WHEN res.finished IS NULL"
        " THEN coalesce(res.notice, recipients.notice) ELSE res.notice END"
        " FROM res WHERE recipients.id = res.id AND (recipients.lease_token = res.token"
        # Accepted by a server after an operator cancelled it (its transaction was on
        # the wire): the mail went out, and its status must not say it never did.
        " OR (res.state = 'delivered' AND recipients.state = 'failed'"
        " AND recipients.error = 'cancelled' AND recipients.lease_token IS NULL))"
        # The message of a recipient that finished while it was held (its HELD bit):
        # it may have finished with it (see unhold_finished).
        f" RETURNING recipients.id, recipients.attempts, CASE WHEN recipients.held & {HELD}"
        " AND recipients.finished_at IS NOT NULL THEN recipients.message_seq END",
        values,
    ).fetchall()
    if not updated:
        return []
    finished_held = {seq for _, _, seq in updated if seq is not None}
    if finished_held:  # rare: held while its delivery was in flight
        unhold_finished(conn, sorted(finished_held))
    # Only an attempt goes in the history: one that was none leaves it as it is.
    done = {rid for rid, _, _ in updated if by_rid[rid][0].attempted}
    crowded = [
        (rid, rid, MAX_HISTORY - 1)
        for rid, attempts, _ in updated
        if attempts > MAX_HISTORY and rid in done
    ]
    if crowded:
        # Make room for the attempt about to be added: keep the newest ones.
        conn.executemany(
            "DELETE FROM attempts WHERE recipient_id = ? AND id NOT IN (SELECT id"
            " FROM attempts WHERE recipient_id = ? ORDER BY id DESC LIMIT ?)",
            crowded,
        )
    kept = [entry for rid, entry in by_rid.items() if rid in done]
    if kept:
        conn.execute(
            "INSERT INTO attempts (recipient_id, at, outcome, duration, mx_host, ip, port,"
            " tls_version, tls_cipher, reply_code, reply_enhanced, reply_text, error,"
            " uncertain, reason_class, tls_policy) VALUES " + ",".join([_ROW16] * len(kept)),
            [value for _, history in kept for value in history],
        )
    recorded = {rid for rid, _, _ in updated}
    return [result for rid, (result, _) in by_rid.items() if rid in recorded]


def unhold_finished(conn: sqlite3.Connection, seqs: Sequence[int]) -> None:
    """Clear the held flag of those of the listed messages that have finished (no
    recipient pending: delivered or failed while held, in flight, or cancelled), and its
    copy on their recipients. Such a message waits for no release and is reported as not
    held; with its flag it stayed in messages_held until purged, stepped over by every
    held listing and count. Called where a recipient of a held message becomes final."""
    for chunk in chunks(seqs):
        cleared = [
            seq
            for (seq,) in conn.execute(
                f"UPDATE messages SET held = 0 WHERE seq IN ({qmarks(len(chunk))}) AND held = 1"
                " AND NOT EXISTS (SELECT 1 FROM recipients p INDEXED BY recipients_pending_message"
                f" WHERE p.message_seq = messages.seq AND p.{PENDING_SQL}) RETURNING seq",
                chunk,
            )
        ]
        if cleared:
            conn.execute(
                f"UPDATE recipients SET held = held & {SET_ASIDE} WHERE message_seq IN"
                f" ({qmarks(len(cleared))}) AND held & {HELD}",
                cleared,
            )


def _one_per_row(
    conn: sqlite3.Connection, results: Sequence[RecipientResult]
) -> list[tuple[int, RecipientResult]]:
    """One result per recipient row, with its row id; rows unknown are left out. Of
    several for one row, the one of the lease holding it now (a batch may carry a result
    of a lease since taken over beside the current lease's), else the first."""
    by_rid: dict[int, list[RecipientResult]] = {}
    for result in results:
        rid = result.ref if result.ref is not None else _rid(conn, result)
        if rid is not None:
            by_rid.setdefault(rid, []).append(result)
    contested = [
        rid for rid, rs in by_rid.items() if len(rs) > 1 and len({r.lease_token for r in rs}) > 1
    ]
    holding: dict[int, str | None] = {}
    for part in chunks(contested):
        holding.update(
            conn.execute(
                f"SELECT id, lease_token FROM recipients WHERE id IN ({qmarks(len(part))})",
                part,
            ).fetchall()
        )
    chosen: list[tuple[int, RecipientResult]] = []
    for rid, rs in by_rid.items():
        token = holding.get(rid)
        chosen.append((rid, next((r for r in rs if r.lease_token == token), rs[0])))
    return chosen


def _rid(conn: sqlite3.Connection, result: RecipientResult) -> int | None:
    """The row of a result that carries no ``ref`` (built by hand, not from a lease)."""
    row = conn.execute(
        "SELECT r.id FROM recipients r JOIN messages m ON m.seq = r.message_seq"
        " WHERE m.id = ? AND r.address = ?",
        (result.message_id, result.address),
    ).fetchone()
    return None if row is None else int(row[0])


# --- reading -------------------------------------------------------------------------------

MESSAGE_COLUMNS = (
    "m.seq, m.id, m.envelope_from, m.created_at, m.size, m.header_message_id, m.subject,"
    " m.held, m.tags, m.metadata, m.priority, m.send_at, m.expires_at, m.idempotency_key,"
    " (SELECT d.dkim FROM message_dkim d WHERE d.message_seq = m.seq)"
)
"""A message's columns of ``messages m``, as :func:`message_from_rows` reads them."""
RECIPIENT_COLUMNS = (
    "message_seq, id, address, state, attempts, reply_code, reply_enhanced, reply_text,"
    " error, mx_host, ip, tls, uncertain, first_attempt_at, last_attempt_at,"
    " next_attempt_at, reason_class, finished_at,"
    " lease_token IS NOT NULL AND state IN ('queued', 'deferred')"
)
"""A recipient's columns of ``recipients``, as :func:`recipient_from_row` reads them."""
ATTEMPT_COLUMNS = (
    "a.recipient_id, a.at, a.outcome, a.duration, a.mx_host, a.ip, a.port, a.tls_version,"
    " a.tls_cipher, a.reply_code, a.reply_enhanced, a.reply_text, a.error, a.uncertain,"
    " a.reason_class, a.tls_policy"
)
"""An attempt's columns of ``attempts a``, as :func:`attempt_from_row` reads them."""


def read_messages(
    conn: sqlite3.Connection,
    condition: str,
    params: list[object],
    limit: int,
    *,
    history: bool,
    strict: bool = False,
) -> list[MessageStatus]:
    """The statuses of the messages matching ``condition``, newest first. A message whose
    rows cannot be read back (see :mod:`row_checks`) is left out with a warning, or with
    ``strict`` (one message asked for by id) raises UnreadableRow."""
    # `condition` is built only from the constant fragments above; values are bound.
    messages = conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages m WHERE {condition}"
        " ORDER BY m.created_at DESC, m.seq DESC LIMIT ?",
        [*params, limit],
    ).fetchall()
    seqs = [row[0] for row in messages]
    recipients: dict[int, list[Any]] = {}
    attempts: dict[int, list[Any]] = {}
    for chunk in chunks(seqs):
        marks = qmarks(len(chunk))
        for row in conn.execute(
            f"SELECT {RECIPIENT_COLUMNS} FROM recipients"
            f" WHERE message_seq IN ({marks}) ORDER BY message_seq, position, id",
            chunk,
        ):
            recipients.setdefault(row[0], []).append(row)
        if history:
            for row in conn.execute(
                f"SELECT {ATTEMPT_COLUMNS} FROM attempts a"
                " JOIN recipients r ON r.id = a.recipient_id"
                f" WHERE r.message_seq IN ({marks}) ORDER BY a.id",
                chunk,
            ):
                attempts.setdefault(row[0], []).append(row)
    result = []
    for row in messages:
        try:
            result.append(message_from_rows(row, recipients, attempts))
        except (UnreadableRow, ValueError, TypeError, OverflowError) as exc:
            problem = exc if isinstance(exc, UnreadableRow) else UnreadableRow(str(exc))
            if strict:
                raise UnreadableRow(f"message {row[1]}: {UNREADABLE}: {problem}") from exc
            log.warning("message %s left out: %s: %s", row[1], UNREADABLE, problem)
    return result


def message_from_rows(
    row: Any, recipients: dict[int, list[Any]], attempts: dict[int, list[Any]]
) -> MessageStatus:
    """One message's status from its row, its recipients' rows and their attempts' rows
    (see :func:`read_messages`); UnreadableRow, ValueError, TypeError or OverflowError
    when a row is not what mailstrom writes."""
    seq, mid, envelope_from, created_at, size, header_id, subject, held = row[:8]
    tags, metadata, priority, send_at, expires_at, key, dkim = row[8:]
    statuses = tuple(
        recipient_from_row(r, tuple(attempt_from_row(a) for a in attempts.get(r[1], ())))
        for r in recipients.get(seq, [])
    )
    state = derive_message_state([r.state for r in statuses])
    return MessageStatus(
        id=mid,
        state=state,
        # Checked as the worker checks them when it leases: what it sets aside for them
        # is unreadable here too, not a sender or size of the wrong kind in the status.
        envelope_from=checked_text(envelope_from, "envelope_from"),
        created_at=time_at(created_at, "created_at"),
        size=checked_size(size),
        recipients=statuses,
        header_message_id=shown_text(header_id, "header_message_id"),
        subject=shown_text(subject, "subject"),
        # One that finished while held keeps its flag, and is no mail on hold.
        held=bool(held) and not state.is_final,
        dkim=dkim_from_column(dkim),
        tags=tags_from(tags),
        metadata=metadata_from(metadata),
        priority=priority if isinstance(priority, str) else None,
        send_at=opt_time_at(send_at, "send_at"),
        expires_at=opt_time_at(expires_at, "expires_at"),
        idempotency_key=shown_text(key, "idempotency_key"),
    )

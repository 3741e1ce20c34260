"""The SQL of the SQLite queue's operator tools (schema version 10): short ids, the
pending view and its count, bulk changes, the queue's shape, suspended destinations.

Functions over a connection inside a transaction the caller (:class:`SQLiteStore`)
opened, as in :mod:`mailstrom.stores.sqlite_queue`. The pending view and the shape read
the partial index ``recipients_pending_message`` (message, domain of each pending
recipient) and never the message rows, whose bytes would make a scan of a large queue
read gigabytes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from mailstrom.status import RecipientState
from mailstrom.stores.base import QueueFilter
from mailstrom.stores.clock import before
from mailstrom.stores.operator import (
    MAX_CANDIDATES,
    PENDING_STATES,
    ListingKey,
    ShapeRow,
    Suspension,
    effective_states,
    foreign_place,
    listed_ids,
    prefix_upper_bound,
    shape_rows,
    states_at_domain,
)
from mailstrom.stores.sqlite_queue import (
    HAS_PENDING_SQL,
    PENDING_SQL,
    SET_ASIDE,
    chunks,
    qmarks,
    unhold_finished,
)
from mailstrom.stores.sqlite_schema import shown_time, to_us
from mailstrom.stores.sqlite_states import in_states_sql
from mailstrom.stores.sqlite_walk import count_upto, walk_bound

# --- ids -----------------------------------------------------------------------------------


def ids_with_prefix(conn: sqlite3.Connection, prefix: str) -> list[str]:
    """Up to MAX_CANDIDATES + 1 ids starting with ``prefix``: a range on the id index."""
    rows = conn.execute(
        "SELECT id FROM messages WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
        (prefix, prefix_upper_bound(prefix), MAX_CANDIDATES + 1),
    ).fetchall()
    return [row[0] for row in rows]


def seqs_of(conn: sqlite3.Connection, message_ids: Sequence[str]) -> list[int]:
    """The row numbers of the listed messages that exist (by the id index)."""
    seqs: list[int] = []
    unique = listed_ids(message_ids)
    for start in range(0, len(unique), 500):
        chunk = unique[start : start + 500]
        seqs += [
            row[0]
            for row in conn.execute(
                f"SELECT seq FROM messages WHERE id IN ({qmarks(len(chunk))})", chunk
            )
        ]
    return seqs


# --- the queue view ------------------------------------------------------------------------


_TAG_SQL = (
    "EXISTS (SELECT 1 FROM json_each(CASE WHEN typeof(m.tags) = 'text' AND json_valid(m.tags)"
    " THEN CASE json_type(m.tags) WHEN 'array' THEN m.tags END END) t WHERE t.value = ?)"
)
"""A message carrying the bound tag (``tags`` is a JSON list; see schema version 5).
Tags that are no JSON list in a text (a row changed by hand) are none, as
:func:`~mailstrom.stores.attributes.tags_from` reads them for the message's status:
``json_each`` failed the whole statement on text that is no JSON ("malformed JSON"),
and walked an object's values and a blob's JSON."""


def filter_sql(
    now: datetime,
    where: QueueFilter,
    *,
    led: Sequence[str] = (),
    below: tuple[str, list[object]] = ("", []),
) -> tuple[list[str], list[object]]:
    """SQL conditions on ``messages m`` for ``where``; ``led``: the messages come from
    the domain's recipients in these states (see :func:`lead_states`), where each
    message is otherwise probed for a recipient there; ``below``: one of the ranges of
    :func:`below_sql` with its parameters."""
    conditions: list[str] = []
    params: list[object] = []
    if where.held is not None:
        # Held as reported: flagged with a pending recipient (one that finished while
        # held keeps its flag, and is no mail on hold).
        waiting = f"m.held = 1 AND {HAS_PENDING_SQL}"
        conditions.append(waiting if where.held else f"NOT ({waiting})")
    cutoff = None if where.older_than is None else to_us(before(now, where.older_than))
    condition, start = below
    if condition:
        conditions.append(condition)
        params += start
    # Below a place older than the cutoff, the cutoff holds already. Left beside it, it
    # was the range SQLite walked messages_newest by, from the cutoff down past every
    # row the pages before had read: a walk's pages cost more and more (the 41st of a
    # retention round over 20,000 messages six times the first).
    if cutoff is not None and not (start and type(start[0]) is int and start[0] < cutoff):
        conditions.append("m.created_at < ?")
        params.append(cutoff)
    if where.domain is not None and led:
        conditions.append(f"m.seq IN ({_at_domain_sql(len(led))})")
        params += [*led, where.domain.lower()]
    elif where.domain is not None:
        conditions.append(
            "EXISTS (SELECT 1 FROM recipients r WHERE r.message_seq = m.seq AND r.domain = ?)"
        )
        params.append(where.domain.lower())
    if where.tag is not None:
        conditions.append(_TAG_SQL)
        params.append(where.tag)
    states = effective_states(where.state, where.states)
    if states == PENDING_STATES:
        conditions.append(HAS_PENDING_SQL)
    elif states is not None and not states:
        conditions.append("0")
    elif states is not None:
        conditions.append(in_states_sql(states))
    return conditions, params


def _at_domain_sql(n: int) -> str:
    """The messages of the bound domain's recipients in ``n`` bound states: ranges of
    recipients_state_domain (named: it is the index that holds them by domain)."""
    return (
        "SELECT message_seq FROM recipients INDEXED BY recipients_state_domain"
        f" WHERE state IN ({qmarks(n)}) AND domain = ?"
    )


def _in_states_sql(n: int) -> str:
    """The recipients in ``n`` bound states, by the ranges of recipients_state_domain."""
    return (
        f"SELECT 1 FROM recipients INDEXED BY recipients_state_domain WHERE state IN ({qmarks(n)})"
    )


def lead_states(where: QueueFilter) -> list[str]:
    """The states of the domain's recipients that hold every message ``where`` lists
    (:func:`~mailstrom.stores.operator.states_at_domain`: any, for a pending message);
    none without a domain. Walked newest first, the queue was read whole for a domain
    with little mail (250 ms at 200,000 messages)."""
    if where.domain is None:
        return []
    return sorted(s.value for s in states_at_domain(where))


def few_at_domain(conn: sqlite3.Connection, domain: str, states: Sequence[str], bound: int) -> bool:
    """Whether the domain's recipients in ``states`` are at most ``bound`` (reading the
    index alone, and no further than that bound): collecting their messages then costs
    less than the walk ``bound`` stands for."""
    n = count_upto(conn, _at_domain_sql(len(states)), [*states, domain.lower()], bound)
    return n <= bound


def pending_only(where: QueueFilter) -> bool:
    """Whether ``where`` admits only pending messages (the pending index can drive it)."""
    states = effective_states(where.state, where.states)
    return states is not None and bool(states) and states <= PENDING_STATES


def _pending_walk(now: datetime, where: QueueFilter) -> tuple[str, list[object]]:
    """``SELECT DISTINCT r.message_seq ...`` over the pending index for a pending-only
    ``where``: conditions on recipients are answered from that index (and probes of it),
    and the messages table is joined only for conditions on messages (held, age), so a
    count reads no message rows."""
    conditions: list[str] = []
    params: list[object] = []
    states = effective_states(where.state, where.states) or PENDING_STATES
    if states == {RecipientState.DEFERRED}:
        # A pending message with a deferred recipient is deferred.
        conditions.append("r.state = 'deferred'")
    elif states == {RecipientState.QUEUED}:
        conditions.append(
            "r.state = 'queued' AND NOT EXISTS (SELECT 1 FROM recipients d"
            " INDEXED BY recipients_pending_message WHERE d.message_seq = r.message_seq"
            " AND d.state IN ('queued', 'deferred') AND d.state = 'deferred')"
        )
    if where.domain is not None:
        conditions.append(
            "EXISTS (SELECT 1 FROM recipients o WHERE o.message_seq = r.message_seq"
            " AND o.domain = ?)"
        )
        params.append(where.domain.lower())
    joined = ""
    if where.held is not None:
        joined = " JOIN messages m ON m.seq = r.message_seq"
        conditions.append("m.held = ?")
        params.append(where.held)
    if where.older_than is not None:
        joined = " JOIN messages m ON m.seq = r.message_seq"
        conditions.append("m.created_at < ?")
        params.append(to_us(before(now, where.older_than)))
    if where.tag is not None:
        joined = " JOIN messages m ON m.seq = r.message_seq"
        conditions.append(_TAG_SQL)
        params.append(where.tag)
    sql = (
        "SELECT DISTINCT r.message_seq FROM recipients r INDEXED BY recipients_pending_message"
        f"{joined} WHERE r.state IN ('queued', 'deferred')"
    )
    return sql + "".join(f" AND {c}" for c in conditions), params


def pending_seqs(
    conn: sqlite3.Connection,
    now: datetime,
    where: QueueFilter,
    limit: int,
    *,
    after: ListingKey | None = None,
) -> list[int]:
    """The newest ``limit`` pending messages matching ``where``, newest first as every
    view orders them (by enqueue time, then row number): the ``messages_newest`` index is
    walked from the newest message down, each message looked up in the pending index,
    stopping at the limit; no message row is read. (Ordered by row number alone, a
    message stamped later than the ones queued after it, the clock stepped back, was
    left out of the newest ``limit``, not of the other views.) With ``after``, the walk
    starts below that place (:func:`below_sql`)."""
    sql, params = _pending_walk(now, where)

    def page(below: str, start: list[object]) -> tuple[str, list[object]]:
        tail = f" AND {below}" if below else ""
        return (
            "SELECT n.seq FROM messages n INDEXED BY messages_newest"
            f" WHERE EXISTS ({sql} AND r.message_seq = n.seq){tail}"
            " ORDER BY n.created_at DESC, n.seq DESC LIMIT ?",
            [*params, *start],
        )

    return _newest(conn, page, below_sql("n", after), limit)


def _newest(
    conn: sqlite3.Connection,
    page: Callable[[str, list[object]], tuple[str, list[object]]],
    ranges: list[tuple[str, list[object]]],
    limit: int,
) -> list[int]:
    """The first ``limit`` row numbers ``page`` (a statement ending in ``LIMIT ?`` for a
    range's condition and parameters) selects over ``ranges`` in turn, each read only
    while the ones before it left the limit unfilled."""
    seqs: list[int] = []
    for below, start in ranges:
        if len(seqs) >= limit:
            break
        sql, params = page(below, start)
        seqs += [row[0] for row in conn.execute(sql, [*params, limit - len(seqs)])]
    return seqs


def below_sql(table: str, after: ListingKey | None) -> list[tuple[str, list[object]]]:
    """The conditions that ``table``'s message stands below ``after`` in the lists'
    order (newest first), with their parameters, in that order: the rest of ``after``'s
    enqueue time, then the older times; one empty condition without ``after``. Each is
    a range of ``messages_newest`` the walk starts at, so the next page reads none of
    the rows the pages before it did, however many share a time. (The row value
    ``(created_at, seq) < (?, ?)`` was walked as ``created_at < ?`` alone, seq being
    the rowid: a page deep among 50,000 messages of one enqueue stepped over the rows
    every page before it had read, 65 times the work of the first.)"""
    if after is None:
        return [("", [])]
    # What this store holds in created_at: a datetime (another store's key) was bound
    # as text, which sorts above every integer, and listed the whole queue again.
    if not isinstance(after.created, int | float | str | bytes) or type(after.seq) is not int:
        raise foreign_place(after)
    return [
        (f"{table}.created_at = ? AND {table}.seq < ?", [after.created, after.seq]),
        (f"{table}.created_at < ?", [after.created]),
    ]


def matching_seqs(
    conn: sqlite3.Connection,
    now: datetime,
    where: QueueFilter,
    *,
    after: ListingKey | None = None,
) -> list[int]:
    """The row numbers of the newest ``where.limit`` messages matching ``where`` (below
    ``after``, given one), newest first (by enqueue time, then row number) as every view
    lists them: the domain's recipients lead a ``where`` with a domain that has fewer of
    them than a walk would probe (:func:`lead_states`,
    :func:`~mailstrom.stores.sqlite_walk.walk_bound`); else the pending index drives a
    pending-only ``where`` (:func:`pending_seqs`), the newest-first index any other. No
    message's bytes are read: they lie in ``message_data`` (schema version 20)."""
    led = lead_states(where)
    bound = walk_bound(conn, where.limit) if led else 0
    if where.domain is not None and led and not few_at_domain(conn, where.domain, led, bound):
        led = []
    if not led and pending_only(where):
        return pending_seqs(conn, now, where, where.limit, after=after)

    def page(below: str, start: list[object]) -> tuple[str, list[object]]:
        conditions, params = filter_sql(now, where, led=led, below=(below, start))
        return (
            f"SELECT m.seq FROM messages m WHERE {' AND '.join(conditions) or '1'}"
            " ORDER BY m.created_at DESC, m.seq DESC LIMIT ?",
            params,
        )

    return _newest(conn, page, below_sql("m", after), where.limit)


def place_of(conn: sqlite3.Connection, seq: int) -> ListingKey | None:
    """Where the message ``seq`` numbers stands in the lists' order (None: not stored)."""
    row = conn.execute("SELECT created_at FROM messages WHERE seq = ?", (seq,)).fetchone()
    return None if row is None else ListingKey(row[0], seq)


def ids_of(conn: sqlite3.Connection, seqs: Sequence[int]) -> list[str]:
    """The ids of the messages ``seqs`` numbers, in that order (by the row number)."""
    ids: dict[int, str] = {}
    for chunk in chunks(seqs):
        ids.update(
            conn.execute(f"SELECT seq, id FROM messages WHERE seq IN ({qmarks(len(chunk))})", chunk)
        )
    return [ids[seq] for seq in seqs if seq in ids]


def count_matching(conn: sqlite3.Connection, now: datetime, where: QueueFilter, cap: int) -> int:
    """How many messages match ``where``, reading at most ``cap`` of them. A count
    reads every match either way: led by the domain's recipients (:func:`lead_states`),
    it reads no others, unless for a pending-only ``where`` the domain has more of them
    than the pending walk probes (the pending recipients in its states)."""
    led = lead_states(where)
    pending = pending_only(where)
    states = effective_states(where.state, where.states)
    if where.domain is not None and led and pending and states is not None:
        # The pending walk probes each pending recipient in these states for the domain:
        # led by as many of the domain's, a count of a little deferred mail at a domain
        # with much delivered took 300 ms where the walk takes 10.
        probed = sorted(s.value for s in states)
        walked = count_upto(conn, _in_states_sql(len(probed)), probed, cap)
        if not few_at_domain(conn, where.domain, led, walked):
            led = []
    if pending and not led:
        sql, params = _pending_walk(now, where)
        (n,) = conn.execute(f"SELECT count(*) FROM ({sql} LIMIT ?)", [*params, cap]).fetchone()
        return int(n)
    plain = (
        where.domain is None
        and where.held is None
        and where.older_than is None
        and where.tag is None
    )
    if states is not None and plain:
        return min(_count_in_states(conn, now, states), cap)
    conditions, params = filter_sql(now, where, led=led)
    if not conditions:
        inner = "SELECT 1 FROM messages INDEXED BY messages_newest LIMIT ?"
    else:
        inner = f"SELECT 1 FROM messages m WHERE {' AND '.join(conditions)} LIMIT ?"
    (n,) = conn.execute(f"SELECT count(*) FROM ({inner})", [*params, cap]).fetchone()
    return int(n)


def _count_in_states(
    conn: sqlite3.Connection, now: datetime, states: frozenset[RecipientState]
) -> int:
    """Messages in ``states`` from counts the indexes answer: pending ones (and queued or
    deferred ones) from the pending index, failed ones (final, one recipient failed at
    least) from the failed index, delivered ones as all messages less the other two."""

    def pending(which: frozenset[RecipientState]) -> int:
        sql, params = _pending_walk(now, QueueFilter(states=which))
        (n,) = conn.execute(f"SELECT count(*) FROM ({sql})", params).fetchone()
        return int(n)

    total = 0
    if states >= PENDING_STATES:
        total += pending(PENDING_STATES)
    elif states & PENDING_STATES:
        total += pending(states & PENDING_STATES)
    finished = states & {RecipientState.DELIVERED, RecipientState.FAILED}
    if not finished:
        return total
    (failed,) = conn.execute(
        "SELECT count(*) FROM (SELECT DISTINCT f.message_seq FROM recipients f"
        " INDEXED BY recipients_failed_message WHERE f.state = 'failed' AND NOT EXISTS ("
        "SELECT 1 FROM recipients p INDEXED BY recipients_pending_message"
        " WHERE p.message_seq = f.message_seq AND p.state IN ('queued', 'deferred')))"
    ).fetchone()
    if RecipientState.FAILED in finished:
        total += failed
    if RecipientState.DELIVERED in finished:
        (messages,) = conn.execute("SELECT count(*) FROM messages").fetchone()
        total += messages - pending(PENDING_STATES) - failed
    return int(total)


# --- bulk changes --------------------------------------------------------------------------


def retry_seqs(conn: sqlite3.Connection, seqs: Sequence[int], now: datetime) -> int:
    # The pending index is named, as in leased_pending: a batch of 500 walked every
    # pending recipient of the queue on recipients_state_domain.
    changed = 0
    for chunk in chunks(seqs):
        changed += conn.execute(
            "UPDATE recipients INDEXED BY recipients_pending_message"
            " SET next_attempt_at = ? WHERE message_seq IN"
            f" ({qmarks(len(chunk))}) AND {PENDING_SQL}",
            [to_us(now), *chunk],
        ).rowcount
    return changed


def cancel_seqs(conn: sqlite3.Connection, seqs: Sequence[int], now: datetime) -> list[int]:
    """Fail the listed messages' pending recipients as "cancelled"; the ids of their rows
    (for their outbox events), in row order."""
    # The last reply is cleared so the reason reads "cancelled" (the history keeps it),
    # and the lease too, so a later record for these recipients is a no-op. A delay
    # warning owed for one (its mark) goes: the operator stopped the mail. The pending
    # index is named, as in leased_pending (recipients_state_domain walked them all).
    cancelled: list[int] = []
    for chunk in chunks(seqs):
        cancelled += (
            rid
            for (rid,) in conn.execute(
                "UPDATE recipients INDEXED BY recipients_pending_message"
                " SET state = 'failed', error = 'cancelled',"
                " reply_code = NULL, reply_enhanced = NULL, reply_text = NULL,"
                " reason_class = NULL, uncertain = 0, next_attempt_at = NULL,"
                " finished_at = ?, lease_token = NULL, lease_expires_at = NULL, notice = NULL"
                f" WHERE message_seq IN ({qmarks(len(chunk))}) AND {PENDING_SQL} RETURNING id",
                [to_us(now), *chunk],
            )
        )
    unhold_finished(conn, seqs)  # a held one has finished: it waits for no release
    return sorted(cancelled)


def leased_pending(conn: sqlite3.Connection, seqs: Sequence[int]) -> bool:
    """Whether a pending recipient of the listed messages is under a lease (a worker may
    hold it, to be told when it is cancelled). The listed messages' pending recipients are
    read on the pending index by message (named: left to itself, the planner walked every
    pending recipient on ``recipients_state_domain`` for each batch)."""
    for chunk in chunks(seqs):
        row = conn.execute(
            "SELECT 1 FROM recipients INDEXED BY recipients_pending_message"
            f" WHERE message_seq IN ({qmarks(len(chunk))})"
            f" AND {PENDING_SQL} AND lease_token IS NOT NULL LIMIT 1",
            list(chunk),
        ).fetchone()
        if row is not None:
            return True
    return False


def hold_seqs(conn: sqlite3.Connection, seqs: Sequence[int], held: bool) -> int:
    """Hold or release the listed messages; how many changed. A hold keeps pending
    recipients from leases: a message with none (finished) is not held. Its recipients'
    HELD bit follows the message's flag."""
    changed = 0
    for chunk in chunks(seqs):
        marks = qmarks(len(chunk))
        changed += conn.execute(
            f"UPDATE messages SET held = ?1 WHERE seq IN ({marks}) AND held != ?1"
            f" AND EXISTS (SELECT 1 FROM recipients r"
            f" WHERE r.message_seq = messages.seq AND r.{PENDING_SQL})",
            [held, *chunk],
        ).rowcount
        if not held:
            # Finished while held: the flag goes, uncounted (no mail waited for this).
            conn.execute(f"UPDATE messages SET held = 0 WHERE seq IN ({marks}) AND held = 1", chunk)
        conn.execute(
            f"UPDATE recipients SET held = held & {SET_ASIDE} | ?1 WHERE message_seq IN"
            f" (SELECT seq FROM messages WHERE seq IN ({marks}) AND held = ?1)",
            [held, *chunk],
        )
    return changed


def purge_seqs(
    conn: sqlite3.Connection,
    seqs: Sequence[int],
    before: datetime | None,
    state: RecipientState | None = None,
) -> int:
    """Delete the listed messages whose recipients are all final (finished before
    ``before``, when given; in ``state``, delivered or failed, when given) and owe no
    notice (a mark left: the worker stopped before queuing it, and makes it of the
    message; deleted, the sender was never told)."""
    cutoff = to_us(before) if before is not None else None
    wanted = None if state is None else state.value
    deleted = 0
    for chunk in chunks(seqs):
        deleted += conn.execute(
            f"DELETE FROM messages WHERE seq IN ({qmarks(len(chunk))}) AND seq IN ("
            "SELECT message_seq FROM recipients"
            f" WHERE message_seq IN ({qmarks(len(chunk))}) GROUP BY message_seq"
            " HAVING count(finished_at) = count(*) AND count(notice) = 0"
            " AND (? IS NULL OR max(finished_at) < ?)"
            f" AND (? IS NULL OR {_FINISHED_STATE_SQL} = ?))",
            [*chunk, *chunk, cutoff, cutoff, wanted, wanted],
        ).rowcount
    return deleted


_FINISHED_STATE_SQL = (
    "CASE WHEN sum(state = 'delivered') = count(*) THEN 'delivered' ELSE 'failed' END"
)
"""The derived state of a message whose recipients (the group) are all final, compared
with the state a purge asks for: a pending one matches none. Compared as a flag
("delivered or not"), every state but DELIVERED read as FAILED, and a purge of queued or
deferred mail deleted the failed messages."""


PURGE_BATCH = 500
"""Messages a purge by age deletes per write transaction at most. Deleting one (its
recipients, attempts and body) took 100-150 µs here, so a batch holds the write lock for
well under a tenth of a second; one transaction for the whole queue held it 12 s for
100,000 messages, and ``send_email`` waited that long, or failed after ``busy_timeout``."""


BULK_BATCH = PURGE_BATCH
"""Listed messages a bulk change (``retry_many``, ``cancel_many``, ``hold_many``,
``purge_many``) changes per write transaction at most, each message whole in one of
them. One transaction for the 100,000 a command takes held the write lock 34 s on a
loaded machine (``cancel --all``), past the 30 s ``busy_timeout`` of the applications'
``send_email``, which failed with StoreLocked; a batch holds it for about
:data:`PURGE_BATCH`'s deletes (a change costs less than a delete)."""


def purgeable_seqs(
    conn: sqlite3.Connection,
    after: int,
    before: datetime,
    state: RecipientState | None,
    limit: int = PURGE_BATCH,
) -> list[int]:
    """Up to ``limit`` messages numbered above ``after``, in order, that
    :func:`purge_seqs` would delete (all recipients final before ``before``; in
    ``state`` when given). Read outside the write lock: the delete checks again."""
    cutoff = to_us(before)
    wanted = None if state is None else state.value
    return [
        seq
        for (seq,) in conn.execute(
            "SELECT message_seq FROM recipients WHERE message_seq > ? GROUP BY message_seq"
            " HAVING count(finished_at) = count(*) AND count(notice) = 0"
            " AND max(finished_at) < ?"
            f" AND (? IS NULL OR {_FINISHED_STATE_SQL} = ?)"
            " ORDER BY message_seq LIMIT ?",
            (after, cutoff, wanted, wanted, limit),
        )
    ]


# --- the shape -----------------------------------------------------------------------------


def shape_rows_sql(
    conn: sqlite3.Connection, now: datetime, edges: Sequence[timedelta]
) -> list[ShapeRow]:
    """Pending recipients per domain and message age from the pending index alone.

    A message's age is known from its row number: the newest message enqueued before each
    bucket's edge is found on the ``messages_newest`` index, and messages numbered above
    it are younger than the edge. This is exact while enqueue times rise with enqueue
    order, as they do with one clock; a clock stepped back puts a message enqueued across
    the step one bucket off.
    """
    bounds: list[int] = []
    for edge in edges:
        row = conn.execute(
            "SELECT seq FROM messages INDEXED BY messages_newest WHERE created_at <= ?"
            " ORDER BY created_at DESC, seq DESC LIMIT 1",
            (to_us(before(now, edge)),),
        ).fetchone()
        bounds.append(row[0] if row else -1)
    cases = " ".join(f"WHEN message_seq > ? THEN {i}" for i in range(len(bounds)))
    bucket = f"CASE {cases} ELSE {len(bounds)} END" if bounds else "0"
    counts = {
        (domain, b): n
        for domain, b, n in conn.execute(
            f"SELECT domain, {bucket} AS b, count(*) FROM recipients"
            f" INDEXED BY recipients_pending_message WHERE {PENDING_SQL} GROUP BY domain, b",
            bounds,
        )
    }
    return shape_rows(counts, len(edges) + 1)


# --- suspended destinations ----------------------------------------------------------------


def active_suspensions(conn: sqlite3.Connection, now: datetime) -> list[Suspension]:
    return [
        Suspension(domain=domain, suspended_at=shown_time(at), until=shown_time(until))
        for domain, at, until in conn.execute(
            "SELECT domain, suspended_at, until FROM suspensions"
            " WHERE until IS NULL OR until > ? ORDER BY domain",
            (to_us(now),),
        )
    ]


def suspensions_at_lease(conn: sqlite3.Connection, now: datetime) -> bool:
    """Whether a destination is suspended at ``now`` (a lease then leaves out
    :data:`~mailstrom.stores.sqlite_queue.SUSPENDED_SQL`). Inside a write transaction:
    the timed suspensions that have ended by ``now`` are ended (:func:`end_ended`)."""
    active, ended = conn.execute(
        "SELECT max(until IS NULL OR until > ?1), max(until <= ?1) FROM suspensions",
        (to_us(now),),
    ).fetchone()
    if ended:
        end_ended(conn, now)
    return bool(active)


def any_ended(conn: sqlite3.Connection, now: datetime) -> bool:
    """Whether a timed suspension has ended by ``now`` and still has its row (its
    recipients out of the due index until :func:`end_ended`)."""
    found = conn.execute(
        "SELECT 1 FROM suspensions WHERE until <= ? LIMIT 1", (to_us(now),)
    ).fetchone()
    return found is not None


def end_ended(conn: sqlite3.Connection, now: datetime) -> None:
    """Bring the recipients of the timed suspensions that have ended by ``now`` back into
    the due index, and delete those suspensions (they suspend nothing any more)."""
    conn.execute(
        f"UPDATE recipients SET held = held & ~{SET_ASIDE} WHERE {PENDING_SQL}"
        " AND domain IN (SELECT domain FROM suspensions WHERE until <= ?)"
        f" AND held & {SET_ASIDE}",
        (to_us(now),),
    )
    conn.execute("DELETE FROM suspensions WHERE until <= ?", (to_us(now),))


def set_aside(conn: sqlite3.Connection, domain: str, aside: bool) -> bool:
    """Take the pending recipients of ``domain`` out of the due index (a suspension
    began) or bring them back (it ended); see
    :data:`~mailstrom.stores.sqlite_queue.SET_ASIDE`. Final rows are left as they are: no
    row becomes pending again. Returns whether one it sets aside is under a lease: a
    worker may hold it, and is told of the suspension (see Store.extend)."""
    if aside:
        change, which = f"held | {SET_ASIDE}", f"held & {SET_ASIDE} = 0"
    else:
        change, which = f"held & ~{SET_ASIDE}", f"held & {SET_ASIDE}"
    where = f"{PENDING_SQL} AND domain = ? AND {which}"
    leased = None
    if aside:
        leased = conn.execute(
            f"SELECT 1 FROM recipients WHERE {where} AND lease_token IS NOT NULL LIMIT 1", (domain,)
        ).fetchone()
    conn.execute(f"UPDATE recipients SET held = {change} WHERE {where}", (domain,))
    return leased is not None


def is_suspended(conn: sqlite3.Connection, domain: str, now: datetime) -> bool:
    """Whether ``domain`` is suspended at ``now`` (as :func:`suspensions_at_lease` reads it: a
    timed suspension that has ended is none)."""
    found = conn.execute(
        "SELECT 1 FROM suspensions WHERE domain = ? AND (until IS NULL OR until > ?)",
        (domain, to_us(now)),
    ).fetchone()
    return found is not None

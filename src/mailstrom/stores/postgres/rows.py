"""Conversions between the store's value types and PostgreSQL rows and array parameters."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg.abc import Buffer
from psycopg.types.datetime import TimestamptzLoader

from mailstrom.arguments import member_of, shown
from mailstrom.errors import UnreadableRow
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import (
    Attempt,
    AttemptOutcome,
    DeliveryEvent,
    MessageStatus,
    ReasonClass,
    RecipientState,
    RecipientStatus,
    SMTPReply,
    derive_message_state,
)
from mailstrom.stores.attributes import metadata_from, metadata_json, tags_from, tags_json
from mailstrom.stores.base import (
    MAX_HISTORY,
    Lease,
    LeasedRecipient,
    RecipientResult,
    bounded_attempt,
    domain_of,
    reason_class_of,
)
from mailstrom.stores.clock import aware_utc
from mailstrom.stores.dkim_column import dkim_from_column, dkim_to_column
from mailstrom.stores.row_checks import (
    UNREADABLE,
    MessageHead,
    checked_attempts,
    checked_data,
    checked_dsn,
    unreadable_error,
)
from mailstrom.stores.side_rows import unreadable_side_row
from mailstrom.suppression import Suppression, SuppressionSource

log = logging.getLogger(__name__)

Row = dict[str, Any]


ENQUEUE_CHUNK_BYTES = 64 * 1024 * 1024
"""Octets of message data one ``enqueue`` statement carries at most (a message larger
than that goes alone). A statement's parameters travel as one protocol message, which
libpq and the server cap at 1 GiB: a batch of more in one statement could never be sent
(of about 500 MiB, while the data went as hex text, twice its size; it goes in binary)."""


def enqueue_chunks(
    messages: Sequence[PreparedMessage], ids: Sequence[str]
) -> Iterator[tuple[Sequence[PreparedMessage], Sequence[str]]]:
    """``messages`` and their ``ids`` in runs of at most :data:`ENQUEUE_CHUNK_BYTES` of
    data each, in order (a message larger than that is a run of its own)."""
    start = size = 0
    for i, message in enumerate(messages):
        if i > start and size + message.size > ENQUEUE_CHUNK_BYTES:
            yield messages[start:i], ids[start:i]
            start, size = i, 0
        size += message.size
    if start < len(messages):
        yield messages[start:], ids[start:]


def enqueue_params(
    messages: Sequence[PreparedMessage], ids: Sequence[str], *, now: datetime, held: bool
) -> dict[str, Any]:
    """Parallel arrays for the ``enqueue`` query: one element per message / recipient."""
    r_ids: list[str] = []
    r_addresses: list[str] = []
    r_positions: list[int] = []
    r_domains: list[str] = []
    for message_id, message in zip(ids, messages, strict=True):
        for position, address in enumerate(message.recipients):
            r_ids.append(message_id)
            r_addresses.append(address)
            r_positions.append(position)
            r_domains.append(domain_of(address))
    return {
        "now": now,
        "held": held,
        "ids": list(ids),
        "datas": [m.data for m in messages],
        "froms": [m.envelope_from for m in messages],
        "smtputf8": [m.smtputf8 for m in messages],
        "eightbit": [m.eightbit for m in messages],
        "subjects": [m.subject for m in messages],
        "header_ids": [m.header_message_id for m in messages],
        "sizes": [m.size for m in messages],
        "dkims": [dkim_to_column(m.dkim_status) for m in messages],
        "require_tls": [m.require_tls for m in messages],
        "tags": [tags_json(m.attributes.tags) for m in messages],
        "metadatas": [metadata_json(m.attributes.metadata) for m in messages],
        "priorities": [m.attributes.priority for m in messages],
        "send_ats": [m.attributes.send_at for m in messages],
        "expires_ats": [m.attributes.expires_at for m in messages],
        "keys": [m.attributes.idempotency_key for m in messages],
        "dsns": [m.dsn.encode() if m.dsn is not None else None for m in messages],
        "r_ids": r_ids,
        "r_addresses": r_addresses,
        "r_positions": r_positions,
        "r_domains": r_domains,
    }


def once_per_lease(results: Iterable[RecipientResult]) -> list[RecipientResult]:
    """The first result for each recipient under each lease: a repeat is dropped, while a
    result of a lease since taken over stays beside the current lease's (the query
    records only the one whose lease holds the recipient)."""
    first: dict[tuple[str, str, str], RecipientResult] = {}
    for r in results:
        first.setdefault((r.message_id, r.address, r.lease_token), r)
    return list(first.values())


def record_params(rs: Sequence[RecipientResult], unanswered: Sequence[bool]) -> dict[str, Any]:
    """Parallel arrays for the ``record`` query, from :func:`once_per_lease`'s results and
    whether a call that failed wrote each (see :mod:`~mailstrom.stores.postgres.unanswered`).
    Reply texts and errors are cut to the stored bound."""
    attempts = [bounded_attempt(r.attempt) for r in rs]
    replies = [a.reply for a in attempts]
    return {
        "max_history": MAX_HISTORY,
        "tokens": [r.lease_token for r in rs],
        "message_ids": [r.message_id for r in rs],
        "addresses": [r.address for r in rs],
        "states": [r.state.value for r in rs],
        "next_attempt_at": [r.next_attempt_at for r in rs],
        "at": [a.at for a in attempts],
        "outcomes": [a.outcome.value for a in attempts],
        "durations": [a.duration for a in attempts],
        "mx_hosts": [a.mx_host for a in attempts],
        "ips": [a.ip for a in attempts],
        "ports": [a.port for a in attempts],
        "tls_versions": [a.tls_version for a in attempts],
        "tls_ciphers": [a.tls_cipher for a in attempts],
        "reply_codes": [p.code if p else None for p in replies],
        "reply_enhanced": [p.enhanced if p else None for p in replies],
        "reply_texts": [p.text if p else None for p in replies],
        "errors": [a.error for a in attempts],
        "uncertain": [a.uncertain for a in attempts],
        "reason_classes": [a.reason_class.value if a.reason_class else None for a in attempts],
        "tls_policies": [a.tls_policy for a in attempts],
        "unanswered": list(unanswered),
        "notices": [r.notice for r in rs],
        "attempted": [r.attempted for r in rs],
    }


class LeaseRow(NamedTuple):
    """One row of the ``lease`` queries, in their SELECT order: a leased recipient, its
    message's fields (the bytes on the message's first row only), and the suppression
    entries in force for its address and for its domain."""

    message_id: str
    domain: str
    address: str
    position: int
    attempts: int
    first_attempt_at: datetime | None
    created_at: datetime | None
    """None when out of range (see ``bad_times``)."""
    queued_at: datetime | None
    """None when out of range (see ``bad_times``)."""
    envelope_from: str
    smtputf8: bool
    eightbit: bool
    data: bytes | None
    require_tls: bool
    expires_at: datetime | None
    priority: str | None
    dsn: str | None
    last_attempt_at: datetime | None
    address_target: str | None
    address_source: str | None
    address_reply: str | None
    address_created_at: datetime | None
    address_expires_at: datetime | None
    address_message_id: str | None
    domain_target: str | None
    domain_source: str | None
    domain_reply: str | None
    domain_created_at: datetime | None
    domain_expires_at: datetime | None
    domain_message_id: str | None
    size: int
    bad_times: str | None
    """The times of this row that are out of range (sent as NULL), or None."""
    cut: bool
    """Whether the lease's ``max_bytes`` left due rows out of it (the same on every row)."""
    ended: bool
    """Whether a timed suspension has ended by the lease's ``now`` with its recipients
    still set aside (the same on every row): the store brings them back."""

    @property
    def lane(self) -> str:
        return self.priority or ""


def lease_rows(found: Iterable[tuple[Any, ...]]) -> list[LeaseRow]:
    """The rows of a ``lease`` query, by name (a query whose columns no longer match
    fails here, not further on)."""
    return [LeaseRow._make(row) for row in found]


def lease_from_rows(
    token: str, expires_at: datetime, found: Sequence[LeaseRow]
) -> tuple[Lease | None, list[tuple[LeaseRow, UnreadableRow]]]:
    """Group leased recipient rows (ordered by due time) into work items, one per
    (message, domain), each listing its recipients in the message's order; with the
    suppression entries that apply to them, or None when an address is not ASCII (the
    worker then looks them up with Python's case folding). Also the rows that cannot be
    delivered, and why (:mod:`~mailstrom.stores.row_checks`): the caller fails them. The
    lease is None when no row can be delivered."""
    heads: dict[str, MessageHead | UnreadableRow] = {}
    for row in found:
        if row.data is not None:  # the message's first row
            heads[row.message_id] = _head(row)
    groups: dict[tuple[str, str], list[tuple[int, LeasedRecipient]]] = {}
    unreadable: list[tuple[LeaseRow, UnreadableRow]] = []
    suppressions: dict[str, Suppression] | None = {}
    for row in found:
        head = heads.get(row.message_id, _NO_DATA)
        try:
            if isinstance(head, UnreadableRow):
                raise head
            if row.bad_times is not None:
                raise UnreadableRow(f"out of range: {row.bad_times}")
            recipient = LeasedRecipient(
                address=row.address,
                attempts=checked_attempts(row.attempts),
                first_attempt_at=row.first_attempt_at,
                created_at=head.created_at,
                last_attempt_at=row.last_attempt_at,
            )
        except UnreadableRow as exc:
            unreadable.append((row, exc))
            continue
        groups.setdefault((row.message_id, row.domain), []).append((row.position, recipient))
        if not row.address.isascii():
            # The entries were matched with SQL's ASCII-only case folding, which equals
            # Python's (suppression.lookup_targets) for ASCII addresses alone.
            suppressions = None
        elif suppressions is not None:
            for entry in _entries_of(row):
                suppressions[entry.target] = entry
    items = []
    for (message_id, domain), members in groups.items():
        head = heads[message_id]
        assert not isinstance(head, UnreadableRow)
        members.sort(key=lambda m: m[0])
        items.append(
            head.work_item(
                message_id=message_id,
                lease_token=token,
                domain=domain,
                recipients=tuple(r for _, r in members),
            )
        )
    if not items:
        return None, unreadable
    lease = Lease(token=token, expires_at=expires_at, items=tuple(items), suppressions=suppressions)
    return lease, unreadable


def fail_unreadable_params(
    token: str, unreadable: Sequence[tuple[LeaseRow, UnreadableRow]], *, now: datetime
) -> dict[str, Any]:
    """The parameters of the ``fail_unreadable`` statement for the rows of lease
    ``token`` that cannot be delivered (:func:`lease_from_rows`)."""
    return {
        "token": token,
        "now": now,
        "max_history": MAX_HISTORY,
        "message_ids": [row.message_id for row, _ in unreadable],
        "addresses": [row.address for row, _ in unreadable],
        "errors": [unreadable_error(exc) for _, exc in unreadable],
    }


def set_aside_results(
    token: str,
    unreadable: Sequence[tuple[LeaseRow, UnreadableRow]],
    failed: set[tuple[Any, ...]],
    now: datetime,
) -> tuple[RecipientResult, ...]:
    """The results to report (:attr:`Lease.failed`) for the rows of ``unreadable`` that
    the ``fail_unreadable`` statement failed (``failed``: its (message id, address)
    pairs), as that statement recorded them."""
    results = []
    for row, exc in unreadable:
        if (row.message_id, row.address) not in failed:
            continue  # no longer under this lease
        error = unreadable_error(exc)
        attempt = Attempt(
            at=now, outcome=AttemptOutcome.PERMANENT, error=error, reason_class=ReasonClass.OTHER
        )
        results.append(
            RecipientResult(
                message_id=row.message_id,
                address=row.address,
                state=RecipientState.FAILED,
                attempt=attempt,
                lease_token=token,
                queued_at=row.created_at,
                envelope_from=row.envelope_from,
            )
        )
    return tuple(results)


_NO_DATA = UnreadableRow("its message's row was not returned with it")


def _head(row: LeaseRow) -> MessageHead | UnreadableRow:
    """The message of ``row`` (its first row, carrying the bytes), or why it cannot be
    delivered. PostgreSQL has checked every type; what is left is what a hand-made
    ``UPDATE`` can still get wrong."""
    try:
        if row.created_at is None or row.queued_at is None:  # out of range: in bad_times
            raise UnreadableRow(f"out of range: {row.bad_times}")
        return MessageHead(
            envelope_from=row.envelope_from,
            created_at=row.created_at,
            data=checked_data(row.data, row.size),
            smtputf8=row.smtputf8,
            eightbit=row.eightbit,
            require_tls=row.require_tls,
            expires_at=row.expires_at,
            priority=row.lane,
            dsn=checked_dsn(row.dsn),
            queued_at=row.queued_at,
        )
    except UnreadableRow as exc:
        return exc


def _entry_columns(first: str) -> slice:
    start = LeaseRow._fields.index(first)
    return slice(start, start + 6)


_ADDRESS_ENTRY = _entry_columns("address_target")
_DOMAIN_ENTRY = _entry_columns("domain_target")


def _entries_of(row: LeaseRow) -> Iterator[Suppression]:
    if row.address_target is not None:
        yield suppression_from_row(tuple(row)[_ADDRESS_ENTRY])
    if row.domain_target is not None:
        yield suppression_from_row(tuple(row)[_DOMAIN_ENTRY])


def suppression_from_row(row: Sequence[Any]) -> Suppression:
    """A suppression entry from (target, source, reply, created_at, expires_at,
    message_id), its times outside 1900..9000 read as NULL (the queries see to it). An
    entry that cannot be read as written still suppresses (see
    :mod:`~mailstrom.stores.side_rows`): an unknown source or creation time is None, and
    an expiry out of range does not expire (the queries hold it in force)."""
    target, source, reply, created_at, expires_at, message_id = row
    known = member_of(SuppressionSource, source)
    if known is None or created_at is None:
        why = f"source {shown(source)}" if known is None else "created_at is out of range"
        unreadable_side_row("suppressions", target, why, "it still applies")
    return Suppression(
        target=target,
        source=known,
        reply=reply,
        created_at=created_at,
        expires_at=expires_at,
        message_id=message_id,
    )


def suppression_arrays(entries: Sequence[Suppression]) -> dict[str, list[Any]]:
    """The parameters of the ``suppress`` query: ``entries`` as parallel arrays."""
    return {
        "targets": [e.target for e in entries],
        # NULL for an unknown source (an entry read back from a bad row): refused by
        # the NOT NULL column rather than made up.
        "sources": [None if e.source is None else e.source.value for e in entries],
        "replies": [e.reply for e in entries],
        # Checked here: the driver picks one dumper for an array by its first time, and
        # an aware one's bound a naive time after it for the server's session zone.
        "created": [_aware(e.created_at, "created_at") for e in entries],
        "expires": [_aware(e.expires_at, "expires_at") for e in entries],
        "message_ids": [e.message_id for e in entries],
    }


def longest_per_target(entries: Sequence[Suppression]) -> list[Suppression]:
    """``entries`` with one per target: the one that stands against those after it
    (:meth:`~mailstrom.suppression.Suppression.stands_against`: an operator's in force,
    else the first that lasts longest), as writing them one by one with ``keep_longer``
    leaves it (the memory and SQLite stores do)."""
    kept: dict[str, Suppression] = {}
    for entry in entries:
        current = kept.get(entry.target)
        if current is None or not current.stands_against(entry):
            kept[entry.target] = entry
    return list(kept.values())


def _aware(when: datetime | None, argument: str) -> datetime | None:
    """``when`` (None passed through); InvalidArgument when it is naive."""
    return None if when is None else aware_utc(when, argument)


def _reply(code: int | None, enhanced: str | None, text: str | None) -> SMTPReply | None:
    if code is None:
        return None
    return SMTPReply(code=code, enhanced=enhanced, text=text or "")


def _attempt(row: Row) -> Attempt:
    return Attempt(
        at=row["a_at"],
        outcome=AttemptOutcome(row["a_outcome"]),
        duration=row["a_duration"],
        mx_host=row["a_mx_host"],
        ip=row["a_ip"],
        port=row["a_port"],
        tls_version=row["a_tls_version"],
        tls_cipher=row["a_tls_cipher"],
        reply=_reply(row["a_reply_code"], row["a_reply_enhanced"], row["a_reply_text"]),
        error=row["a_error"],
        uncertain=row["a_uncertain"],
        reason_class=reason_class_of(row["a_reason_class"]),
        tls_policy=row.get("a_tls_policy"),
    )


def _recipient(row: Row, history: tuple[Attempt, ...]) -> RecipientStatus:
    return RecipientStatus(
        address=row["address"],
        state=RecipientState(row["state"]),
        attempts=row["attempts"],
        reply=_reply(row["reply_code"], row["reply_enhanced"], row["reply_text"]),
        error=row["error"],
        mx_host=row["mx_host"],
        ip=row["ip"],
        tls=row["tls"],
        uncertain=row["uncertain"],
        reason_class=reason_class_of(row["reason_class"]),
        first_attempt_at=row["first_attempt_at"],
        last_attempt_at=row["last_attempt_at"],
        next_attempt_at=row["next_attempt_at"],
        finished_at=row.get("finished_at"),
        history=history,
        leased=bool(row.get("leased")),
    )


def readable_cursor(
    conn: psycopg.Connection[Any], *, row_factory: Any = None
) -> psycopg.Cursor[Any]:
    """A cursor of ``conn`` (making rows with ``row_factory``, if given) that reads a time
    the driver cannot hold as None (:class:`ReadableTimes`), leaving the pooled
    connection's own loaders as they are."""
    cur = conn.cursor() if row_factory is None else conn.cursor(row_factory=row_factory)
    cur.adapters.register_loader("timestamptz", ReadableTimes)
    return cur


class ReadableTimes(TimestamptzLoader):
    """Loads a time the driver cannot hold (infinity, a year past 9999: a row changed by
    hand) as None instead of failing the whole read; for the operator's views, where
    :func:`messages_from_rows` then shows or leaves out that message alone."""

    def load(self, data: Buffer) -> datetime | None:  # type: ignore[override]
        try:
            return super().load(data)
        except psycopg.DataError:
            return None


def messages_from_rows(rows: Sequence[Row], *, strict: bool = False) -> list[MessageStatus]:
    """Build statuses from rows ordered by message, then recipient, then attempt. Rows
    carrying ``a_*`` columns add each recipient's history (a NULL ``a_at`` means none).
    A message whose rows cannot be read back (its creation time out of range: see
    :class:`ReadableTimes`) is left out with a warning, or with ``strict`` (one message
    asked for by id) raises UnreadableRow."""
    out: list[MessageStatus] = []
    i = 0
    while i < len(rows):
        head = rows[i]
        end = i
        while end < len(rows) and rows[end]["id"] == head["id"]:
            end += 1
        try:
            out.append(_message(rows[i:end]))
        except (UnreadableRow, ValueError) as exc:
            if strict:
                raise UnreadableRow(f"message {head['id']}: {UNREADABLE}: {exc}") from exc
            log.warning("message %s left out: %s: %s", head["id"], UNREADABLE, exc)
        i = end
    return out


def _message(rows: Sequence[Row]) -> MessageStatus:
    """One message's status from its rows (see :func:`messages_from_rows`)."""
    head = rows[0]
    if head["created_at"] is None:
        raise UnreadableRow("created_at is out of range")
    recipients: list[RecipientStatus] = []
    i = 0
    while i < len(rows):
        first = rows[i]
        history: list[Attempt] = []
        while i < len(rows) and rows[i]["address"] == first["address"]:
            if rows[i].get("a_at") is not None:
                history.append(_attempt(rows[i]))
            i += 1
        if first["address"] is not None:  # LEFT JOIN: a message without recipients
            recipients.append(_recipient(first, tuple(history)))
    state = derive_message_state([r.state for r in recipients])
    return MessageStatus(
        id=head["id"],
        state=state,
        envelope_from=head["envelope_from"],
        created_at=head["created_at"],
        size=head["size"],
        recipients=tuple(recipients),
        header_message_id=head["header_message_id"],
        subject=head["subject"],
        # One that finished while held keeps its flag, and is no mail on hold.
        held=bool(head["held"]) and not state.is_final,
        dkim=dkim_from_column(head["dkim"]),
        tags=tags_from(head.get("tags")),
        metadata=metadata_from(head.get("metadata")),
        priority=head.get("priority"),
        send_at=head.get("send_at"),
        expires_at=head.get("expires_at"),
        idempotency_key=head.get("idempotency_key"),
    )


def event_from_row(row: Sequence[Any]) -> DeliveryEvent:
    """An outbox event from (id, at, message_id, address, state, attempt, reply_code,
    reply_enhanced, reply_text, error, reason_class, mx_host, ip, tls, uncertain,
    next_attempt_at), its times read by :class:`ReadableTimes`; UnreadableRow for one
    whose time or state cannot be read (a next attempt out of range is unknown: None)."""
    (event_id, at, message_id, address, state, attempt, code, enhanced, text) = row[:9]
    (error, reason_class, mx_host, ip, tls, uncertain, next_at) = row[9:16]
    tags, metadata = row[16:18] if len(row) > 16 else (None, None)
    known = member_of(RecipientState, state)
    if known is None:
        raise UnreadableRow(f"state is {shown(state)}")
    if at is None:
        raise UnreadableRow("at is out of range")
    return DeliveryEvent(
        id=int(event_id),
        at=at,
        message_id=message_id,
        address=address,
        state=known,
        attempt=attempt,
        reply=_reply(code, enhanced, text),
        error=error,
        reason_class=reason_class,
        mx_host=mx_host,
        ip=ip,
        tls=tls,
        uncertain=uncertain,
        next_attempt_at=next_at,
        tags=tags_from(tags),
        metadata=metadata_from(metadata),
    )

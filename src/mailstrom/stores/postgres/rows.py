"""Conversions between the store's value types and PostgreSQL rows and array parameters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from mailstrom.message.dsn import DSN
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import (
    Attempt,
    AttemptOutcome,
    DeliveryEvent,
    MessageStatus,
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
    WorkItem,
    bounded_attempt,
    domain_of,
    reason_class_of,
)
from mailstrom.stores.dkim_column import dkim_from_column, dkim_to_column

Row = dict[str, Any]


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


def record_params(results: Iterable[RecipientResult]) -> dict[str, Any]:
    """Parallel arrays for the ``record`` query; a repeated recipient keeps its last
    result. Reply texts and errors are cut to the stored bound."""
    latest = {(r.message_id, r.address): r for r in results}
    rs = list(latest.values())
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
    }


def lease_from_rows(token: str, expires_at: datetime, rows: Sequence[tuple[Any, ...]]) -> Lease:
    """Group leased recipient rows (ordered by due time) into work items, one per
    (message, domain), each listing its recipients in the message's order."""
    data: dict[str, bytes] = {}
    groups: dict[tuple[str, str], list[tuple[int, LeasedRecipient]]] = {}
    heads: dict[
        tuple[str, str], tuple[str, bool, bool, bool, datetime | None, str, str | None]
    ] = {}
    for (
        message_id,
        domain,
        address,
        position,
        attempts,
        first_attempt_at,
        created_at,
        envelope_from,
        smtputf8,
        eightbit,
        body,
        require_tls,
        expires_at_,
        priority,
        dsn,
        last_attempt_at,
    ) in rows:
        if body is not None:
            data[message_id] = body
        key = (message_id, domain)
        if key not in groups:
            groups[key] = []
            heads[key] = (
                envelope_from,
                smtputf8,
                eightbit,
                require_tls,
                expires_at_,
                priority or "",
                dsn,
            )
        groups[key].append(
            (
                position,
                LeasedRecipient(
                    address=address,
                    attempts=attempts,
                    first_attempt_at=first_attempt_at,
                    created_at=created_at,
                    last_attempt_at=last_attempt_at,
                ),
            )
        )
    items = []
    for (message_id, domain), members in groups.items():
        envelope_from, smtputf8, eightbit, require_tls, expires, lane, dsn = heads[
            message_id, domain
        ]
        members.sort(key=lambda m: m[0])
        items.append(
            WorkItem(
                message_id=message_id,
                lease_token=token,
                domain=domain,
                envelope_from=envelope_from,
                recipients=tuple(r for _, r in members),
                data=data[message_id],
                smtputf8=smtputf8,
                eightbit=eightbit,
                require_tls=require_tls,
                expires_at=expires,
                priority=lane,
                dsn=DSN.decode(dsn) if dsn else None,
            )
        )
    return Lease(token=token, expires_at=expires_at, items=tuple(items))


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
        history=history,
    )


def messages_from_rows(rows: Sequence[Row]) -> list[MessageStatus]:
    """Build statuses from rows ordered by message, then recipient, then attempt. Rows
    carrying ``a_*`` columns add each recipient's history (a NULL ``a_at`` means none)."""
    out: list[MessageStatus] = []
    i = 0
    while i < len(rows):
        head = rows[i]
        recipients: list[RecipientStatus] = []
        while i < len(rows) and rows[i]["id"] == head["id"]:
            first = rows[i]
            history: list[Attempt] = []
            while (
                i < len(rows)
                and rows[i]["id"] == head["id"]
                and rows[i]["address"] == first["address"]
            ):
                if rows[i].get("a_at") is not None:
                    history.append(_attempt(rows[i]))
                i += 1
            if first["address"] is not None:  # LEFT JOIN: a message without recipients
                recipients.append(_recipient(first, tuple(history)))
        out.append(
            MessageStatus(
                id=head["id"],
                state=derive_message_state([r.state for r in recipients]),
                envelope_from=head["envelope_from"],
                created_at=head["created_at"],
                size=head["size"],
                recipients=tuple(recipients),
                header_message_id=head["header_message_id"],
                subject=head["subject"],
                held=head["held"],
                dkim=dkim_from_column(head["dkim"]),
                tags=tags_from(head.get("tags")),
                metadata=metadata_from(head.get("metadata")),
                priority=head.get("priority"),
                send_at=head.get("send_at"),
                expires_at=head.get("expires_at"),
                idempotency_key=head.get("idempotency_key"),
            )
        )
    return out


def event_from_row(row: Sequence[Any]) -> DeliveryEvent:
    """An outbox event from (id, at, message_id, address, state, attempt, reply_code,
    reply_enhanced, reply_text, error, reason_class, mx_host, ip, tls, uncertain,
    next_attempt_at)."""
    (event_id, at, message_id, address, state, attempt, code, enhanced, text) = row[:9]
    (error, reason_class, mx_host, ip, tls, uncertain, next_at) = row[9:16]
    tags, metadata = row[16:18] if len(row) > 16 else (None, None)
    return DeliveryEvent(
        id=int(event_id),
        at=at,
        message_id=message_id,
        address=address,
        state=RecipientState(state),
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

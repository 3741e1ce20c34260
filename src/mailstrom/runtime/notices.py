"""The worker's notices to senders: final failures turned into RFC 3464 bounces, and the
delay warnings and "relayed" notices the senders asked for (:mod:`mailstrom.bounces.notice`
decides and renders; this module gathers per message and sender, and prepares them for
the queue).

No notice is queued from the worker's memory. A result that owes one carries what the
notice will say of it (:func:`owed_notice`): a final failure's bounce, the deferral that
crosses ``Config.delay_warning``'s warning, a delivery's "relayed" notice (to a server
that could not be asked to report it). The store keeps it with the recipient in the write
that records it, the mark "notice owed". Once none of the message's recipients is on its
way any more, one notice per message, sender and kind is made from the marks
(:func:`notices_owed`) and queued in the transaction that clears them, as Postfix sends a
queue file's bounces, delay warnings and success reports once the file is done with. A
message failing in several domains, or in several writes, gets one notice, and a crash
between the record and the notice loses none and sends none twice: the marks wait in the
store for the next worker."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from mailstrom.bounces.notice import (
    MAX_PER_RECIPIENT,
    FailedRecipient,
    mailer_daemon_domain,
    render_notice,
    shown_diagnostic,
    signable_by,
    status_of,
    wants_notice,
)
from mailstrom.bounces.verp import is_verp_template, verp_address
from mailstrom.config import Config
from mailstrom.errors import InvalidMessage
from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.dsn import DSN, Return
from mailstrom.message.prepared import PreparedMessage
from mailstrom.policy.backoff import last_attempt_by
from mailstrom.status import ReasonClass, RecipientState
from mailstrom.stores.base import OwedNotice, RecipientResult, WorkItem, domain_of

log = logging.getLogger("mailstrom.worker")


_DELAYED = "delayed"
_RELAYED = "relayed"
_KINDS = (_DELAYED, _RELAYED)
"""The kinds of a mark other than a bounce's (which, from before them, names none)."""


def owed_notice(
    result: RecipientResult, item: WorkItem, *, config: Config, verp_key: bytes
) -> str | None:
    """What the notice ``result`` of ``item`` owes its sender will say of it: the text
    the store keeps with the recipient (see :attr:`RecipientResult.notice`), or None when
    it owes none. A final failure owes a bounce, the deferral that is the first attempt
    past ``Config.delay_warning`` a delay warning, a delivery the server could not be
    asked to report (:attr:`RecipientResult.relayed`) a "relayed" notice; each only to a
    sender who asks for it. Everything the notice needs but the message's bytes is in
    it, so that a worker that never saw the message (one started after a crash) makes
    the same notice."""
    state = result.state
    if state is RecipientState.FAILED:
        kind = None
    elif state is RecipientState.DEFERRED:
        kind = _DELAYED
    elif state is RecipientState.DELIVERED and result.relayed:
        kind = _RELAYED
    else:
        return None
    # When the message could first go (its send_at when later): the delay warning and
    # the retry policy's max_age count from there.
    due = result.queued_at or result.attempt.at
    if kind == _DELAYED and not _crosses_delay(result, item, due, config.delay_warning):
        return None
    sender = _notice_sender(result, item, verp_key)
    default = config.bounce_notices
    if not wants_notice(
        sender, item.dsn, default=default, delay=kind == _DELAYED, success=kind == _RELAYED
    ):
        return None
    entry = _entry(result, item, delayed=kind == _DELAYED)
    # When it arrived, i.e. was queued (RFC 3464 §2.2.5), not its send_at.
    arrival = item.queued_at or result.queued_at or result.attempt.at
    owed: dict[str, Any] = {
        "v": 1 if kind is None else 2,
        "sender": sender,
        "status": entry.status,
        "diagnostic": entry.diagnostic,
        "own": entry.own,
        "remote_mta": entry.remote_mta,
        "at": _iso(entry.at),
        "dsn": None if item.dsn is None else item.dsn.encode(),
        "require_tls": item.require_tls,
        "arrival": arrival.isoformat(),
    }
    if kind is not None:
        # A bounce's mark is as it was before the other kinds (v 1, no kind): a worker
        # of then reads it, and leaves out (logged) the ones it would misread.
        owed["kind"] = kind
    if kind == _DELAYED:
        owed |= {
            "due": due.isoformat(),
            "expires_at": _iso(item.expires_at),
            "last_attempt": _iso(_last_attempt_allowed(result, item, config)),
        }
    # ASCII: a store keeps it as it is, whatever the reply held.
    return json.dumps(owed, ensure_ascii=True, separators=(",", ":"))


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def _time_or_none(value: object) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def notices_owed(
    owed: Sequence[OwedNotice], data: Mapping[str, bytes], *, config: Config, now: datetime
) -> dict[str, list[PreparedMessage]]:
    """One prepared notice per message, sender and kind (bounce, delay warning, "relayed")
    of the marks ``owed`` (the store's :meth:`~mailstrom.stores.base.Store.owed_notices`),
    by message id; ``data`` holds the messages' bytes (one missing: purged, no notice). A
    mark that cannot be read (changed by hand, written by a newer mailstrom) is logged and
    left out."""
    groups: dict[tuple[str, str, str | None], list[tuple[FailedRecipient, dict[str, Any]]]] = {}
    for entry in owed:
        try:
            fields = _fields(entry.notice)
            failed = FailedRecipient(
                address=entry.address,
                status=str(fields["status"]),
                diagnostic=str(fields["diagnostic"]),
                own=bool(fields["own"]),
                remote_mta=_text_or_none(fields["remote_mta"]),
                at=_time_or_none(fields["at"]),
            )
            sender = str(fields["sender"])
            kind = _kind(fields)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning(
                "no bounce message for %s of %s: its mark cannot be read (%s)",
                entry.address,
                entry.message_id,
                exc,
            )
            continue
        groups.setdefault((entry.message_id, sender, kind), []).append((failed, fields))
    made: dict[str, list[PreparedMessage]] = {}
    for (message_id, sender, kind), entries in groups.items():
        original = data.get(message_id)
        if original is None:
            continue
        _, first = entries[0]
        try:
            dsn = None if first["dsn"] is None else DSN.decode(str(first["dsn"]))
            arrival = datetime.fromisoformat(str(first["arrival"]))
            notice = _Notice(
                config=config,
                now=now,
                message_id=message_id,
                sender=sender,
                delayed=kind == _DELAYED,
                relayed=kind == _RELAYED,
                data=original,
                arrival=arrival,
                entries=[failed for failed, _ in entries],
                **(_delay_of(entries) if kind == _DELAYED else {"due": arrival}),
            )
        except (ValueError, KeyError, TypeError, InvalidMessage) as exc:
            log.warning("no bounce message for %s to %s: %s", message_id, sender, exc)
            continue
        prepared = _made(notice, dsn, require_tls=bool(first["require_tls"]))
        if prepared is not None:
            made.setdefault(message_id, []).append(prepared)
    return made


def _fields(text: str) -> dict[str, Any]:
    fields = json.loads(text)
    if not isinstance(fields, dict) or fields.get("v") not in (1, 2):
        raise ValueError("not a notice this mailstrom writes")
    return fields


def _kind(fields: dict[str, Any]) -> str | None:
    """The kind of notice a mark is for: None for a bounce, else one of :data:`_KINDS`."""
    if fields["v"] == 1:
        return None
    kind = fields["kind"]
    if kind not in _KINDS:
        raise ValueError(f"a notice of an unknown kind {kind!r}")
    return str(kind)


def _delay_of(entries: list[tuple[FailedRecipient, dict[str, Any]]]) -> dict[str, Any]:
    """What a delay warning about ``entries`` promises: retries from when the message
    could first go until its expiry, or the latest last attempt ``retry.max_attempts``
    allows of its recipients (none when one of them has no end by count)."""
    _, first = entries[0]
    lasts = [_time_or_none(fields["last_attempt"]) for _, fields in entries]
    return {
        "due": datetime.fromisoformat(str(first["due"])),
        "expires_at": _time_or_none(first["expires_at"]),
        "last_attempt": None if None in lasts else max(t for t in lasts if t is not None),
    }


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _notice_sender(result: RecipientResult, item: WorkItem, verp_key: bytes) -> str:
    """Where a notice about ``result``'s recipient goes: its envelope sender, the VERP
    address of that recipient when the sender is a VERP template."""
    sender = result.envelope_from or item.envelope_from
    if is_verp_template(sender):
        sender = verp_address(sender, result.message_id, result.address, key=verp_key)
    return sender


def _entry(result: RecipientResult, item: WorkItem, *, delayed: bool) -> FailedRecipient:
    """What a notice says of ``result``'s recipient."""
    attempt = result.attempt
    reply = attempt.reply
    return FailedRecipient(
        address=result.address,
        status=status_of(
            attempt.outcome,
            reply.enhanced if reply else None,
            delayed=delayed,
            expired=attempt.reason_class is ReasonClass.EXPIRED,
        ),
        # Only what the notice will show of it: the mark is kept in the store with the
        # recipient, and read back with those of up to MAX_OWED_MESSAGES messages.
        diagnostic=shown_diagnostic(attempt.reason),
        own=result.own_reply,
        remote_mta=attempt.mx_host,
        at=_last_attempt(result, item),
    )


def _made(notice: _Notice, dsn: DSN | None, *, require_tls: bool) -> PreparedMessage | None:
    """``notice`` prepared for the queue as ``dsn`` asks, or None (logged) when it cannot
    be made."""
    if require_tls and dsn is not None and dsn.ret is Return.FULL:
        # RFC 8689 §5: a REQUIRETLS message is bounced as if RET=HDRS was asked for.
        dsn = dataclasses.replace(dsn, ret=Return.HEADERS)
    try:
        try:
            prepared = notice.prepared(dsn)
        except InvalidMessage:
            if dsn is None or dsn.ret is not Return.FULL:
                raise
            # The message returned whole took the notice past a bound the original was
            # just within (its parts and the notice's own four): return its headers, as
            # for a message over MAX_RETURNED, rather than no notice.
            prepared = notice.prepared(dataclasses.replace(dsn, ret=Return.HEADERS))
    except InvalidMessage as exc:
        log.warning("no bounce message for %s to %s: %s", notice.message_id, notice.sender, exc)
        return None
    # In the default lane like the application's own mail (a message without a lane would
    # wait until every configured lane had nothing due). RFC 8689 §5: the notice about a
    # REQUIRETLS message carries its headers and is protected as it was: it goes with
    # REQUIRETLS too.
    attributes = QueueAttributes(priority=notice.config.default_priority)
    return dataclasses.replace(prepared, attributes=attributes, require_tls=require_tls)


_NOT_TRIED = (ReasonClass.SUPPRESSED, ReasonClass.EXPIRED)
"""Failures decided before any attempt to deliver: no DNS lookup, no connection."""


def _last_attempt(result: RecipientResult, item: WorkItem) -> datetime | None:
    """When delivery to the recipient was last attempted (RFC 3464 §2.3.7's
    ``Last-Attempt-Date``): this result's attempt, or for a failure decided without one
    (:data:`_NOT_TRIED`) the attempt before it, None when there was none. The notice's
    own time would claim an attempt that was never made."""
    if result.attempt.reason_class not in _NOT_TRIED:
        return result.attempt.at
    leased = next((r for r in item.recipients if r.address == result.address), None)
    return leased.last_attempt_at if leased is not None else None


def _last_attempt_allowed(
    result: RecipientResult, item: WorkItem, config: Config
) -> datetime | None:
    """When the last attempt ``retry.max_attempts`` allows may come for this deferred
    recipient (:func:`~mailstrom.policy.backoff.last_attempt_by`), or None."""
    leased = next((r for r in item.recipients if r.address == result.address), None)
    if leased is None or result.next_attempt_at is None:
        return None
    # A deferral that was no attempt (this host's shortage) counted none.
    attempts = leased.attempts + 1 if result.attempted else leased.attempts
    return last_attempt_by(attempts=attempts, next_at=result.next_attempt_at, policy=config.retry)


def _crosses_delay(
    result: RecipientResult, item: WorkItem, arrival: datetime, delay: timedelta | None
) -> bool:
    """Whether this deferral is the first attempt past ``arrival + delay`` (the attempt
    before it, if any, came earlier): each recipient is warned once, with no state."""
    if delay is None:
        return False
    threshold = arrival + delay
    if result.attempt.at < threshold:
        return False
    leased = next((r for r in item.recipients if r.address == result.address), None)
    previous = leased.last_attempt_at if leased is not None else None
    return previous is None or previous < threshold


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Notice:
    """One notice to make: to ``sender`` about ``entries`` of message ``message_id``."""

    config: Config
    now: datetime
    message_id: str
    sender: str
    delayed: bool
    data: bytes
    """The message as stored."""
    arrival: datetime
    """When it was queued."""
    due: datetime
    """When the message could first go: queued, or its send_at when later."""
    expires_at: datetime | None = None
    """The expiry its sender set (a delay warning's), or None."""
    entries: list[FailedRecipient]
    last_attempt: datetime | None = None
    """When the last attempt ``retry.max_attempts`` allows may come (a delay warning's),
    or None when it sets no end."""
    relayed: bool = False
    """A "relayed" notice about deliveries (see :func:`owed_notice`)."""

    def prepared(self, dsn: DSN | None) -> PreparedMessage:
        """The notice rendered as ``dsn`` asks (RET=FULL: the message whole) and prepared
        for the queue; InvalidMessage if it breaks a bound of ``prepare()``."""
        # Loaded at the first notice: a worker that never bounces needs no message builder.
        from mailstrom.message.preparation import prepare

        config, max_age = self.config, self.config.retry.max_age
        delayed = self.delayed
        retry_until = None
        if delayed:
            # Whichever ends the retries first: the retry policy's max_age, its
            # max_attempts, or the expiry the message's sender set (past it the recipient
            # fails as "expired").
            ends = [self.due + max_age] if max_age is not None else []
            if self.expires_at is not None:
                ends.append(self.expires_at)
            if self.last_attempt is not None:
                ends.append(self.last_attempt)
            retry_until = min(ends, default=None)
        raw = render_notice(
            reporting_mta=config.helo_name,
            sender=self.sender,
            message_id=self.message_id,
            original=self.data,
            arrival=self.arrival,
            failed=self.entries,
            dsn=dsn,
            now=self.now,
            delayed=delayed,
            relayed=self.relayed,
            retry_until=retry_until,
            # The sender's own domain last: its MTA is the one reporting. But one a DKIM
            # key signs first: unsigned, a notice dkim.required refuses is lost.
            from_domain=mailer_daemon_domain(
                (config.helo_name, config.message_id_domain, domain_of(self.sender)),
                prefer=signable_by(config.dkim),
            ),
        )
        return prepare(
            raw,
            envelope_from="",
            envelope_to=[self.sender],
            # The returned message may be in base64 (an 8-bit one): 4/3 of its size. The
            # report grows with each recipient it names (a server's reply each): a notice
            # about 300 failures of a 64 KiB-limit queue passed the limit, and was lost.
            max_size=config.max_message_size * 4 // 3
            + 64 * 1024
            + len(self.entries) * MAX_PER_RECIPIENT,
            max_recipients=1,
            now=self.now,
            id_domain=config.message_id_domain,
            fallback_id_domain=config.helo_name,
            dkim=config.dkim,
        )

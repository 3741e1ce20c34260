"""Applying a report to the store: find the message and recipient it speaks of, mark the
recipient failed (late) and put the address on the suppression list.

A report is matched, for each recipient it names, in this order:

1. a VERP token (:mod:`mailstrom.bounces.verp`) in the address the report was sent to or
   in the original envelope sender it quotes: it names the message and the recipient, so
   a report about a single recipient is matched even when the receiving system rewrote
   the address (forwarding, aliases);
2. the DSN's ``Original-Envelope-Id``, when it is a message id of this store (the ENVID
   mailstrom sends by default);
3. the returned message's ``Message-ID`` header;

with the recipient chosen by ``Original-Recipient`` (the ORCPT the message carried), then
``Final-Recipient`` (ARF: ``Original-Rcpt-To``), compared without regard to case. A
complaint that names no recipient (providers often redact it) matches a message with one
recipient only.

A report is applied only to a recipient a server has accepted (DELIVERED; a FAILED one
has failed already): a bounce after acceptance, or a complaint, about mail still queued or
deferred is no such thing, and is reported as unmatched with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from mailstrom.bounces.reports import Report, ReportedRecipient, ReportKind
from mailstrom.bounces.verp import address_digest, find_tokens
from mailstrom.errors import InvalidSuppression, UnknownMessage
from mailstrom.policy.hardbounce import DEFAULT_SUPPRESS_ON, is_late_hard_bounce
from mailstrom.policy.reasons import classify_reply
from mailstrom.status import (
    Attempt,
    AttemptOutcome,
    MessageStatus,
    ReasonClass,
    RecipientState,
    RecipientStatus,
    SMTPReply,
)
from mailstrom.stores.base import Store, storable_text
from mailstrom.suppression import MAX_REPLY, Suppression, SuppressionSource, normalize_target

_MESSAGE_ID = re.compile(r"^[0-9a-f]{32}$")
_MAX_CANDIDATES = 10
"""Messages looked at per report (a Message-ID header shared by many messages)."""
_REPORTABLE = frozenset({RecipientState.DELIVERED, RecipientState.FAILED})
"""The states a report may concern: accepted by a server (and perhaps failed late since),
or failed already (the report then changes at most the suppression list)."""


class BounceAction(StrEnum):
    """What applying a report did for one recipient it names."""

    FAILED = "failed"
    """The recipient was marked failed (late)."""
    ALREADY_FAILED = "already_failed"
    """It had failed already; only the suppression list may have changed."""
    COMPLAINT = "complaint"
    """A complaint: the address was suppressed; its delivery state stays."""
    IGNORED = "ignored"
    """The report says nothing final (``delayed``, ``delivered``, ``relayed``)."""
    UNMATCHED = "unmatched"
    """No queued message and recipient fit the report, or the recipient it names has not
    been accepted by any server (the reason says which)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BounceOutcome:
    """The result of a report for one recipient it names."""

    action: BounceAction
    address: str | None
    """The recipient as stored (or as reported, when unmatched)."""
    message_id: str | None = None
    status: str | None = None
    reason: str = ""
    suppressed: Suppression | None = None


@dataclass(slots=True)
class _Matcher:
    store: Store
    report: Report
    loaded: dict[str, MessageStatus | None]
    tokens: list[tuple[MessageStatus, RecipientStatus]]
    candidates: list[MessageStatus]

    def load(self, message_id: str) -> MessageStatus | None:
        if message_id not in self.loaded:
            try:
                self.loaded[message_id] = self.store.status(message_id)
            except UnknownMessage:
                self.loaded[message_id] = None
        return self.loaded[message_id]

    def find(self, reported: ReportedRecipient) -> tuple[MessageStatus, RecipientStatus] | None:
        wanted = [a.lower() for a in (reported.original_recipient, reported.final_recipient) if a]
        for message, recipient in self.tokens:
            if recipient.address.lower() in wanted:
                return message, recipient
        if len(self.report.recipients) <= 1 and len(self.tokens) == 1:
            return self.tokens[0]  # the token names the recipient, whatever the report says
        for address in wanted:  # Original-Recipient first
            for message in [*(m for m, _ in self.tokens), *self.candidates]:
                for recipient in message.recipients:
                    if recipient.address.lower() == address:
                        return message, recipient
        if not wanted and len(self.candidates) == 1 and len(self.candidates[0].recipients) == 1:
            return self.candidates[0], self.candidates[0].recipients[0]
        return None


def apply_report(
    store: Store,
    report: Report,
    *,
    now: datetime,
    envelope_recipient: str | None = None,
    suppress_on: tuple[str, ...] = DEFAULT_SUPPRESS_ON,
) -> list[BounceOutcome]:
    """Apply ``report`` to ``store``; one outcome per recipient the report names.

    ``envelope_recipient`` is the address the report was delivered to, when the MTA that
    runs ``mailstrom bounce`` passes it (it may hold the VERP token). A failed recipient is
    suppressed when its status is a hard one (:func:`is_late_hard_bounce` with
    ``suppress_on``); a complaint always suppresses.
    """
    matcher = _Matcher(store=store, report=report, loaded={}, tokens=[], candidates=[])
    texts = [envelope_recipient or "", *report.envelope_senders]
    for message_id, digest in list(find_tokens(texts))[:_MAX_CANDIDATES]:
        message = matcher.load(message_id)
        if message is not None:
            matcher.tokens += [
                (message, r) for r in message.recipients if address_digest(r.address) == digest
            ]
    envelope_id = (report.envelope_id or "").lower()
    if _MESSAGE_ID.match(envelope_id):
        found = matcher.load(envelope_id)
        if found is not None:
            matcher.candidates.append(found)
    if report.original_message_id:
        header = _angle(report.original_message_id)
        for message_id in store.message_ids_for_header(header, limit=_MAX_CANDIDATES):
            found = matcher.load(message_id)
            if found is not None and found not in matcher.candidates:
                matcher.candidates.append(found)
    reported = report.recipients or (ReportedRecipient(final_recipient=None),)
    outcomes = []
    for entry in reported:
        match = matcher.find(entry)
        if match is None:
            outcomes.append(
                BounceOutcome(
                    action=BounceAction.UNMATCHED,
                    address=entry.original_recipient or entry.final_recipient,
                    status=entry.status,
                    reason="no queued message and recipient match this report",
                )
            )
            continue
        message, recipient = match
        if recipient.state not in _REPORTABLE:
            outcomes.append(_not_accepted(entry, message, recipient))
            continue
        outcomes.append(_apply_one(store, report, entry, message, recipient, now, suppress_on))
    return outcomes


def _not_accepted(
    entry: ReportedRecipient, message: MessageStatus, recipient: RecipientStatus
) -> BounceOutcome:
    return BounceOutcome(
        action=BounceAction.UNMATCHED,
        address=recipient.address,
        message_id=message.id,
        status=entry.status,
        reason=(
            f"not applied: no server has accepted this recipient (it is {recipient.state}), "
            "so the report cannot be about a delivery"
        ),
    )


def _apply_one(
    store: Store,
    report: Report,
    entry: ReportedRecipient,
    message: MessageStatus,
    recipient: RecipientStatus,
    now: datetime,
    suppress_on: tuple[str, ...],
) -> BounceOutcome:
    where = report.reporting_mta or "the receiving system"
    if report.kind is ReportKind.COMPLAINT:
        kind = report.feedback_type or "abuse"
        reason = f"{kind} complaint reported by {where}"
        entry_ = _suppress(
            store, recipient.address, SuppressionSource.COMPLAINT, reason, message, now
        )
        return BounceOutcome(
            action=BounceAction.COMPLAINT,
            address=recipient.address,
            message_id=message.id,
            reason=reason,
            suppressed=entry_,
        )
    if entry.action != "failed":
        return BounceOutcome(
            action=BounceAction.IGNORED,
            address=recipient.address,
            message_id=message.id,
            status=entry.status,
            reason=f"action {entry.action or 'missing'}: nothing final to record",
        )
    detail = " ".join(p for p in (entry.status, entry.diagnostic) if p) or "no details"
    reason = storable_text(f"bounced after acceptance, reported by {where}: {detail}", MAX_REPLY)
    attempt = Attempt(
        at=now,
        outcome=AttemptOutcome.PERMANENT,
        mx_host=entry.remote_mta or report.reporting_mta,
        error=reason,
        reason_class=_reason_class(entry),
    )
    changed = store.fail_late(message.id, recipient.address, attempt)
    suppressed = None
    if entry.status is not None and is_late_hard_bounce(
        entry.status, code=entry.diagnostic_code, codes=suppress_on
    ):
        suppressed = _suppress(
            store, recipient.address, SuppressionSource.ASYNC_BOUNCE, reason, message, now
        )
    return BounceOutcome(
        action=BounceAction.FAILED if changed else BounceAction.ALREADY_FAILED,
        address=recipient.address,
        message_id=message.id,
        status=entry.status,
        reason=reason,
        suppressed=suppressed,
    )


def _reason_class(entry: ReportedRecipient) -> ReasonClass:
    code = entry.diagnostic_code or (550 if (entry.status or "5").startswith("5") else 450)
    return classify_reply(SMTPReply(code=code, enhanced=entry.status, text=entry.diagnostic or ""))


def _suppress(
    store: Store,
    address: str,
    source: SuppressionSource,
    reason: str,
    message: MessageStatus,
    now: datetime,
) -> Suppression | None:
    try:
        target = normalize_target(address)
    except InvalidSuppression:
        return None
    entry = Suppression(
        target=target, source=source, reply=reason, created_at=now, message_id=message.id
    )
    store.suppress([entry])
    return entry


def _angle(message_id: str) -> str:
    text = message_id.strip()
    return text if text.startswith("<") else f"<{text}>"

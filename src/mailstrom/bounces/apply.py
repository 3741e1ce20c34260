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
``Final-Recipient`` (ARF: ``Original-Rcpt-To``), compared without regard to case and with
the domain as A-labels (:func:`~mailstrom.suppression.address_key`). A complaint that
names no recipient (providers often redact it), or names one whose local part is redacted
(RFC 6590: another at the recipient's domain, or none), matches a message with one
recipient only.

Ways 2 and 3 trust whoever sent the report: every recipient of a message sees its
Message-ID header (which holds the message id too) and the recipients in To and Cc, and
can send a report naming any of them. A token is keyed with the store's secret, so it
cannot be made for another recipient: a message sent with VERP is therefore matched by
its tokens only, and a token names its own recipient only.

A report is applied only to a recipient a server has accepted (DELIVERED; a FAILED one
has failed already): a bounce after acceptance, or a complaint, about mail still queued or
deferred is no such thing, and is reported as unmatched with the reason. One about a
recipient in delivery (leased by a worker: the server may have accepted it, its result not
yet recorded), or deferred after an uncertain attempt (the connection lost after the final
dot: the server may have accepted it, and the worker tries again), is reported as in
flight, to be applied again later (``mailstrom bounce`` exits 75, so the MTA that pipes
it tries again). A DSN block that
says nothing final (``delayed``, ``delivered``, ``relayed``, ``expanded``, or ``failed``
with a success status, 2.X.X) is ignored whatever the recipient's state: the worker's
own delay warning about a recipient it still retries reaches a VERP sender's address too.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum

from mailstrom.bounces.reports import Report, ReportedRecipient, ReportKind, kept_texts
from mailstrom.bounces.verp import (
    address_digest,
    find_tokens,
    is_verp_address,
    is_verp_template,
)
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
    derive_message_state,
)
from mailstrom.stores.base import RecipientsFound, Store, storable_text
from mailstrom.suppression import (
    MAX_REPLY,
    Suppression,
    SuppressionSource,
    address_key,
    normalize_target,
)

_MESSAGE_ID = re.compile(r"^[0-9a-f]{32}$")
_MAX_CANDIDATES = 10
"""Messages looked at per report (a Message-ID header shared by many messages)."""
_COMPLAINTS = frozenset({"abuse", "fraud", "virus"})
"""Feedback types (RFC 5965 §7.3) that say the recipient did not want the mail. Not
``not-spam`` (RFC 6430: the user says it is *not* spam), ``auth-failure`` (RFC 6591: an
SPF or DKIM result, nothing the recipient did), nor ``other`` (RFC 5965: whatever fits no
type, so it says nothing of the recipient) or a type unknown here. A report without the
field (RFC 5965 §3.1 requires it) is read as ``abuse``, what feedback loops send."""
_OWN_DIAGNOSTIC = "x-mailstrom"
"""The Diagnostic-Code type of a reason of mailstrom's own (bounces.notice)."""
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
    """The report says nothing final (``delayed``, ``delivered``, ``relayed``, or
    ``failed`` with a success status), or is a
    feedback report that is no complaint (``not-spam``, ``auth-failure``, ``other``)."""
    UNMATCHED = "unmatched"
    """No queued message and recipient fit the report, or the recipient it names has not
    been accepted by any server (the reason says which)."""
    IN_FLIGHT = "in_flight"
    """The recipient is in delivery (leased), or deferred after an uncertain attempt (its
    connection lost after the final dot): a server may have accepted it, its result not
    yet recorded. Nothing was changed; apply the report again later."""


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
    named: list[str] = field(default_factory=list)
    """The addresses the report names, as written and keyed: the recipients read of each
    message (:meth:`Store.recipients_by_address`), not all of them."""
    loaded: dict[str, RecipientsFound | None] = field(default_factory=dict)
    every: dict[str, MessageStatus | None] = field(default_factory=dict)
    """Messages read with all their recipients: a token's, when its recipient is none the
    report names (a forwarding system rewrote the address)."""
    tokens: list[tuple[MessageStatus, RecipientStatus]] = field(default_factory=list)
    """Recipients named by a valid VERP token."""
    candidates: list[MessageStatus] = field(default_factory=list)
    """Messages whose recipients the report may name by address."""
    verp_skipped: bool = False
    """Whether a message sent with VERP was left out of ``candidates``."""
    by_address: dict[str, list[tuple[MessageStatus, RecipientStatus]]] | None = None
    """The recipients of ``candidates`` by :func:`address_key`, made at the first
    :meth:`find` (every candidate is known by then)."""
    digests: dict[tuple[str, bool], list[tuple[str, RecipientStatus]]] = field(default_factory=dict)
    """Each recipient's digest, by message id and whether all its recipients were read,
    made at the first token of that message."""

    def __post_init__(self) -> None:
        for entry in self.report.recipients:
            for address in (entry.original_recipient, entry.final_recipient):
                if address:
                    key = address_key(address)
                    # As written too only where it may be stored so (an ASCII local part
                    # in its own case): a U-label domain, a quoted local part or a
                    # literal never is, and a name the store cannot find as given makes
                    # PostgreSQL compare every recipient of the message.
                    self.named += [address, key] if key == address.lower() else [key]

    def load(self, message_id: str) -> MessageStatus | None:
        """The message with the recipients the report names (all of them when it has
        one only). Was: every recipient with its history, for each of the 11 messages a
        report may name: 10 s for a report about messages of 50,000 recipients."""
        if message_id not in self.loaded:
            try:
                self.loaded[message_id] = self._read_named(message_id)
            except UnknownMessage:
                self.loaded[message_id] = None
        found = self.loaded[message_id]
        return None if found is None else found.message

    def _read_named(self, message_id: str) -> RecipientsFound:
        """The recipients the report names, compared as :func:`address_key` compares them.
        The stores fold ASCII letters only (what their indexes can find), so a local part
        that is not ASCII (``JÖRG@`` reported as ``jörg@``) is compared here, over every
        recipient of the message (without history): the store's read missed it."""
        if all(a.rpartition("@")[0].isascii() for a in self.named):
            return self.store.recipients_by_address(message_id, self.named)
        found = self.store.recipients_by_address(message_id, None)
        self.every[message_id] = found.message  # a token's fallback reads it no more
        if found.single:
            return found
        keys = {address_key(a) for a in self.named}
        chosen = tuple(r for r in found.message.recipients if address_key(r.address) in keys)
        message = replace(
            found.message,
            recipients=chosen,
            state=derive_message_state([r.state for r in chosen]),
        )
        return RecipientsFound(message=message, single=False)

    def single(self, message: MessageStatus) -> bool:
        """Whether ``message`` (loaded) has one recipient only."""
        found = self.loaded.get(message.id)
        return found is not None and found.single

    def load_every(self, message_id: str) -> MessageStatus | None:
        if message_id not in self.every:
            try:
                found = self.store.recipients_by_address(message_id, None)
                self.every[message_id] = found.message
            except UnknownMessage:
                self.every[message_id] = None
        return self.every[message_id]

    def add_tokens(self, texts: list[str]) -> None:
        """The recipients the valid tokens in ``texts`` name (the key is read only when
        there is a token)."""
        found = list(find_tokens(texts))[:_MAX_CANDIDATES]
        key = self.store.verp_key() if found else b""
        for message_id, digest in found:
            message = self.load(message_id)
            if message is None:
                continue
            if not is_verp_template(message.envelope_from):
                # The store made no token for it: a made-up one (its id is in the
                # Message-ID header) read and digested every recipient, for nothing.
                self.consider(message)  # its recipients, by address
                continue
            matched = self.with_digest(message, digest, key, every=False)
            if not matched and not self.single(message):
                # None of the recipients the report names: the token alone says which
                # (the receiving system rewrote the address), so each one's digest is
                # made. Only here are all of a message's recipients read.
                message = self.load_every(message_id)
                if message is None:
                    continue
                matched = self.with_digest(message, digest, key, every=True)
            self.tokens += [(message, r) for r in matched]

    def with_digest(
        self, message: MessageStatus, digest: str, key: bytes, *, every: bool
    ) -> list[RecipientStatus]:
        """The recipients of ``message`` (as read: with ``every`` recipient, or those the
        report names) whose token carries ``digest``."""
        made = self.digests.get((message.id, every))
        if made is None:
            # Once per message read: made again for each token, ten tokens of one message
            # (all with its id, which every recipient sees) cost ten digests of each of
            # its recipients.
            # With every recipient read, those the report names were digested already.
            known = {r.address: d for d, r in self.digests.get((message.id, False), [])}
            made = self.digests[message.id, every] = [
                (known.get(r.address) or address_digest(message.id, r.address, key=key), r)
                for r in message.recipients
            ]
        return [r for d, r in made if hmac.compare_digest(d, digest)]

    def consider(self, message: MessageStatus | None) -> None:
        """Let the report name ``message``'s recipients by address, unless it was sent
        with VERP: the ids and the Message-ID header that lead here are seen by every
        recipient, so only a token, which the store alone can make, speaks for one of
        its recipients."""
        if message is None or any(m.id == message.id for m in self.candidates):
            return
        if is_verp_template(message.envelope_from):
            self.verp_skipped = True
            return
        self.candidates.append(message)

    def find(self, reported: ReportedRecipient) -> tuple[MessageStatus, RecipientStatus] | None:
        # Keyed as the suppression list keys them: an SMTPUTF8 server names the recipient
        # with its U-label domain (bob@bücher.example), which is stored as A-labels.
        reported_as = (reported.original_recipient, reported.final_recipient)
        wanted = [address_key(a) for a in reported_as if a]
        for message, recipient in self.tokens:
            if address_key(recipient.address) in wanted:
                return message, recipient
        if len(self.report.recipients) <= 1 and len(self.tokens) == 1:
            return self.tokens[0]  # the token names the recipient, whatever the report says
        if self.by_address is None:
            # Keyed once per report: keyed again for every address the report names, a
            # report naming a thousand others about a message of a thousand recipients
            # at an IDN domain (an IDNA conversion each) took half a minute.
            self.by_address = {}
            for message in self.candidates:
                for recipient in message.recipients:
                    key = address_key(recipient.address)
                    self.by_address.setdefault(key, []).append((message, recipient))
        for address in wanted:  # Original-Recipient first
            found = self.by_address.get(address)
            if found:
                # Messages may share a Message-ID (one resent, RFC 5322 §3.6.6, or sent
                # again): the report is about a copy a server accepted (the one its ENVID
                # names, else the newest), else one a server may have accepted (in
                # delivery: in flight), not a newer one still queued, which was taken
                # first and left the bounce unmatched.
                return min(found, key=_acceptance)
        if len(self.candidates) == 1 and self.single(self.candidates[0]):
            message = self.candidates[0]
            only = message.recipients[0]
            if not wanted or (
                self.report.kind is ReportKind.COMPLAINT
                and all(_redacted(address, only.address) for address in wanted)
            ):
                return message, only
        return None


def _acceptance(match: tuple[MessageStatus, RecipientStatus]) -> int:
    """How surely a server has accepted the recipient of ``match``: 0 it has (or it
    failed since), 1 it may have (in delivery, or uncertain), 2 it has not."""
    recipient = match[1]
    if recipient.state in _REPORTABLE:
        return 0
    return 1 if recipient.leased or recipient.uncertain else 2


def _redacted(reported: str, address: str) -> bool:
    """Whether ``reported`` (keyed) may be ``address`` with its local part redacted (RFC
    6590 §3: a feedback loop may hide it; the domain stays): of the same domain, or no
    address at all (nothing of it is left)."""
    _, at, domain = reported.rpartition("@")
    return not at or domain == address_key(address).rpartition("@")[2]


def apply_report(
    store: Store,
    report: Report,
    *,
    now: datetime,
    envelope_recipient: str | None = None,
    suppress_on: tuple[str, ...] = DEFAULT_SUPPRESS_ON,
    suppress_for: timedelta | None = None,
) -> list[BounceOutcome]:
    """Apply ``report`` to ``store``; one outcome per recipient the report names.

    ``envelope_recipient`` is the address the report was delivered to, when the MTA that
    runs ``mailstrom bounce`` passes it (it may hold the VERP token). A failed recipient is
    suppressed when its status (its ``Status``, or without one the enhanced code of the
    reply its ``smtp`` diagnostic relays) is a hard one (:func:`is_late_hard_bounce` with
    ``suppress_on``), for ``suppress_for`` if given (``Config.suppress_for``, as the
    worker's own hard bounces); a complaint (feedback type ``abuse``, ``fraud`` or
    ``virus``, or none) always suppresses, with no end, and other feedback reports change
    nothing. An entry in force for the address that lasts at least as long (a complaint's,
    an operator's) is kept as it is: a report never shortens a suppression (a complaint
    takes the place of a bounce's entry as long as its own, which a lane may send past).
    A failure a mailstrom worker reports for a reason of its own (an ``X-Mailstrom``
    diagnostic) does not suppress: that worker applied ``suppress_on`` to it already;
    nor is a VERP address
    (a bounce notice's recipient, :func:`~mailstrom.bounces.verp.is_verp_address`) ever
    suppressed. Every text of ``report`` that is kept or shown is held to the bounds
    :func:`~mailstrom.bounces.parse_report` keeps (one safe line of at most 1,000
    characters) first, whoever built it.
    """
    # A Report may be built by the application too: its texts reach the store (a
    # recipient's reason and MX host, a suppression's reply) and every view of them, and
    # were kept as given, escape sequences, line breaks and all, and as long (a reply
    # past MAX_REPLY, which the suppression list's export could not import again).
    report = kept_texts(report)
    matcher = _Matcher(store=store, report=report)
    matcher.add_tokens([envelope_recipient or "", *report.envelope_senders])
    envelope_id = (report.envelope_id or "").lower()
    if _MESSAGE_ID.match(envelope_id):
        matcher.consider(matcher.load(envelope_id))
    if report.original_message_id:
        header = _angle(report.original_message_id)
        for message_id in store.message_ids_for_header(header, limit=_MAX_CANDIDATES):
            matcher.consider(matcher.load(message_id))
    unmatched = "no queued message and recipient match this report"
    if matcher.verp_skipped:
        unmatched += " (a message sent with VERP matches only by its recipient's token)"
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
                    reason=unmatched,
                )
            )
            continue
        message, recipient = match
        if report.kind is ReportKind.DSN and (entry.action != "failed" or _success(entry)):
            # Before the state: a delay warning (the worker's own, which a VERP sender
            # gets at this very address) is about a recipient no server has accepted yet.
            outcomes.append(_nothing_final(entry, message, recipient))
            continue
        if recipient.state not in _REPORTABLE:
            outcomes.append(_not_accepted(entry, message, recipient))
            continue
        outcomes.append(
            _apply_one(store, report, entry, message, recipient, now, suppress_on, suppress_for)
        )
    return outcomes


def _nothing_final(
    entry: ReportedRecipient, message: MessageStatus, recipient: RecipientStatus
) -> BounceOutcome:
    """A DSN block that is no failure (``delayed``, ``delivered``, ``relayed``,
    ``expanded``, or a ``failed`` one whose status is a success): nothing to record,
    whatever the recipient's state."""
    said = f"action {entry.action or 'missing'}"
    if _success(entry):
        said += f" with the success status {entry.status}"
    return BounceOutcome(
        action=BounceAction.IGNORED,
        address=recipient.address,
        message_id=message.id,
        status=entry.status,
        reason=f"{said}: nothing final to record",
    )


def _success(entry: ReportedRecipient) -> bool:
    """Whether the block's Status is of the success class: 2.X.X "is reporting a positive
    delivery action" (RFC 3463 §3.1), whatever its Action says. Read as a failure, such a
    block (``Action: failed``, ``Status: 2.0.0``) failed a recipient its server had
    accepted, classed as a mailbox problem: a report contradicting itself undid a
    delivery."""
    return (entry.status or "").startswith("2.")


def _not_accepted(
    entry: ReportedRecipient, message: MessageStatus, recipient: RecipientStatus
) -> BounceOutcome:
    if recipient.leased or recipient.uncertain:
        # A server may have accepted it a moment ago and bounced it at once; the worker
        # records the delivery when the transaction ends. Or it may have accepted it
        # before the connection was lost after the final dot: the worker tries again
        # (retry_uncertain), and records what the server says then. Unmatched, the
        # report was lost.
        why = (
            "in delivery (leased by a worker)"
            if recipient.leased
            else "to be tried again: the connection was lost after the final dot, so a "
            "server may have accepted it"
        )
        return BounceOutcome(
            action=BounceAction.IN_FLIGHT,
            address=recipient.address,
            message_id=message.id,
            status=entry.status,
            reason=(
                f"not applied yet: this recipient is {recipient.state} and {why}, so its "
                "result is not recorded; apply the report again later"
            ),
        )
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
    suppress_for: timedelta | None,
) -> BounceOutcome:
    where = report.reporting_mta or "the receiving system"
    if report.kind is ReportKind.COMPLAINT:
        kind = report.feedback_type or "abuse"
        if kind not in _COMPLAINTS:
            return BounceOutcome(
                action=BounceAction.IGNORED,
                address=recipient.address,
                message_id=message.id,
                reason=f"feedback type {kind} reported by {where}: not a complaint",
            )
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
    status = _status(entry)
    detail = " ".join(p for p in (entry.status, entry.diagnostic) if p) or "no details"
    reason = storable_text(f"bounced after acceptance, reported by {where}: {detail}", MAX_REPLY)
    attempt = Attempt(
        at=now,
        outcome=AttemptOutcome.PERMANENT,
        mx_host=entry.remote_mta or report.reporting_mta,
        error=reason,
        reason_class=_reason_class(entry),
    )
    try:
        changed = store.fail_late(message.id, recipient.address, attempt)
    except UnknownMessage:
        # Purged since it was read (a worker's retention, `mailstrom purge`): as if it
        # had been before, and the outcomes of the report's other recipients still come.
        return BounceOutcome(
            action=BounceAction.UNMATCHED,
            address=recipient.address,
            message_id=message.id,
            status=entry.status,
            reason="not applied: its message was purged from the store meanwhile",
        )
    suppressed = None
    # A failure a mailstrom worker decided itself (its notices, which a VERP sender gets
    # at this very address, give the reason as an X-Mailstrom diagnostic with Status
    # 5.0.0) was judged against suppress_on by that worker, which suppressed the address
    # if it was one to suppress: that 5.0.0 is not Exim's "no detail" (a suppression of a
    # week, a local size or TLS refusal would otherwise suppress the address for good).
    own = entry.diagnostic_type == _OWN_DIAGNOSTIC
    if (
        status is not None
        and not own
        and is_late_hard_bounce(
            status,
            code=entry.diagnostic_code,
            diagnostic_status=entry.diagnostic_status,
            codes=suppress_on,
            remote_mta=entry.remote_mta is not None,
            diagnostic=entry.diagnostic if entry.diagnostic_type == "smtp" else None,
        )
    ):
        suppressed = _suppress(
            store,
            recipient.address,
            SuppressionSource.ASYNC_BOUNCE,
            reason,
            message,
            now,
            expires_at=None if suppress_for is None else now + suppress_for,
        )
    return BounceOutcome(
        action=BounceAction.FAILED if changed else BounceAction.ALREADY_FAILED,
        address=recipient.address,
        message_id=message.id,
        status=status,
        reason=reason,
        suppressed=suppressed,
    )


def _status(entry: ReportedRecipient) -> str | None:
    """The recipient's RFC 3463 status: its ``Status``, or, in a block without one (RFC
    3464 requires it, yet some MTAs leave it out), the enhanced code of the server's
    reply its ``smtp`` diagnostic relays (``550 5.1.1 ...``)."""
    return entry.status or entry.diagnostic_status


def _reason_class(entry: ReportedRecipient) -> ReasonClass:
    status = _status(entry)
    code = entry.diagnostic_code or (550 if (status or "5").startswith("5") else 450)
    enhanced = status
    if enhanced is not None and enhanced.endswith(".0.0") and entry.diagnostic_status:
        # A status without detail (Exim's 5.0.0 for every failure) says less than the
        # relayed reply's own code, as is_late_hard_bounce judges it.
        enhanced = entry.diagnostic_status
    return classify_reply(SMTPReply(code=code, enhanced=enhanced, text=entry.diagnostic or ""))


def _suppress(
    store: Store,
    address: str,
    source: SuppressionSource,
    reason: str,
    message: MessageStatus,
    now: datetime,
    expires_at: datetime | None = None,
) -> Suppression | None:
    if is_verp_address(address):
        # A bounce notice's recipient (a complaint about the notice, a DSN about it): the
        # return path of one message's recipient, never mailed again (see the worker's
        # hard_bounce_entries). Its entry, without an end, was one more for each report.
        return None
    try:
        target = normalize_target(address)
    except InvalidSuppression:
        return None
    # A bounce or complaint never shortens an entry in force, nor replaces an operator's
    # (its reason and end are the operator's): a complaint's (no end) or an operator's
    # would otherwise give way to a bounce's suppress_for, for a message sent before
    # it, and the address would get mail again when that ran out.
    entry = Suppression(
        target=target,
        source=source,
        reply=reason,
        created_at=now,
        expires_at=expires_at,
        message_id=message.id,
    )
    current = store.suppressions_for([target], now=now).get(target)
    if current is not None and (current.stands_against(entry) or _same_failure(current, entry)):
        return current
    # Judged again by the write: another run (a complaint about the same address, a
    # worker's hard bounce) may have written a longer entry since the read above.
    store.suppress([entry], keep_longer=True)
    return entry


_BOUNCES = (SuppressionSource.HARD_BOUNCE, SuppressionSource.ASYNC_BOUNCE)


def _same_failure(current: Suppression, entry: Suppression) -> bool:
    """Whether ``entry``, a bounce's, is about the failure that put ``current`` there: the
    same message's (the worker's own notice of a refusal it suppressed, which a VERP
    sender gets back; a report applied again). Written, it only moved the entry's end a
    little, and said "bounced after acceptance" of a refusal no server ever accepted."""
    return (
        entry.source in _BOUNCES
        and current.source in _BOUNCES
        and current.message_id is not None
        and current.message_id == entry.message_id
    )


def _angle(message_id: str) -> str:
    text = message_id.strip()
    return text if text.startswith("<") else f"<{text}>"

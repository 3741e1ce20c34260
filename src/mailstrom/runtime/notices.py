"""The worker's bounce messages: final failures of a batch of results turned into RFC 3464
notices to the senders who asked for them (:mod:`mailstrom.bounces.notice` decides and
renders; this module gathers per message and sender, and prepares them for the queue)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from mailstrom.bounces.notice import (
    FailedRecipient,
    mailer_daemon_domain,
    render_notice,
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
from mailstrom.stores.base import RecipientResult, WorkItem, domain_of

log = logging.getLogger("mailstrom.worker")


def notices_for(
    results: Sequence[RecipientResult],
    items: Mapping[tuple[str, str], WorkItem],
    *,
    config: Config,
    now: datetime,
    verp_key: bytes,
) -> list[PreparedMessage]:
    """One prepared notice per (message, envelope sender, kind) for the final failures,
    and the deferrals that cross ``Config.delay_warning``, among ``results`` whose
    message asks for one; ``items`` are the leased work items by (message id, domain)."""
    groups: dict[tuple[str, str, bool], tuple[WorkItem, datetime, list[FailedRecipient]]] = {}
    # Per delay warning: when the last attempt retry.max_attempts allows may come, the
    # latest of its recipients' (None: no end by count for one of them).
    last_attempts: dict[tuple[str, str, bool], datetime | None] = {}
    for result in results:
        delayed = result.state is RecipientState.DEFERRED
        if not delayed and result.state is not RecipientState.FAILED:
            continue
        item = items.get((result.message_id, domain_of(result.address)))
        if item is None:
            continue
        # When the message could first go (its send_at when later): the delay warning
        # and the retry policy's max_age count from there.
        due = result.queued_at or now
        if delayed and not _crosses_delay(result, item, due, config.delay_warning):
            continue
        sender = result.envelope_from or item.envelope_from
        if is_verp_template(sender):
            sender = verp_address(sender, result.message_id, result.address, key=verp_key)
        if not wants_notice(sender, item.dsn, default=config.bounce_notices, delay=delayed):
            continue
        attempt = result.attempt
        reply = attempt.reply
        entry = FailedRecipient(
            address=result.address,
            status=status_of(
                attempt.outcome,
                reply.enhanced if reply else None,
                delayed=delayed,
                expired=attempt.reason_class is ReasonClass.EXPIRED,
            ),
            diagnostic=attempt.reason,
            own=result.own_reply,
            remote_mta=attempt.mx_host,
            at=_last_attempt(result, item),
        )
        key = (result.message_id, sender, delayed)
        groups.setdefault(key, (item, due, []))[2].append(entry)
        if delayed:
            last = _last_attempt_allowed(result, item, config)
            known = last_attempts.get(key, last)
            last_attempts[key] = None if last is None or known is None else max(known, last)
    if not groups:
        return []
    notices = []
    # In the default lane like the application's own mail (a message without a lane would
    # wait until every configured lane had nothing due).
    attributes = QueueAttributes(priority=config.default_priority)
    for (message_id, sender, delayed), (item, due, entries) in groups.items():
        last = last_attempts.get((message_id, sender, delayed))
        notice = _Notice(config, now, message_id, sender, delayed, item, due, entries, last)
        dsn = item.dsn
        if item.require_tls and dsn is not None and dsn.ret is Return.FULL:
            # RFC 8689 §5: a REQUIRETLS message is bounced as if RET=HDRS was asked for.
            dsn = dataclasses.replace(dsn, ret=Return.HEADERS)
        try:
            try:
                prepared = notice.prepared(dsn)
            except InvalidMessage:
                if dsn is None or dsn.ret is not Return.FULL:
                    raise
                # The message returned whole took the notice past a bound the original
                # was just within (its parts and the notice's own four): return its
                # headers, as for a message over MAX_RETURNED, rather than no notice.
                prepared = notice.prepared(dataclasses.replace(dsn, ret=Return.HEADERS))
            # RFC 8689 §5: the notice about a REQUIRETLS message carries its headers and
            # is protected as it was: it goes with REQUIRETLS too.
            notices.append(
                dataclasses.replace(prepared, attributes=attributes, require_tls=item.require_tls)
            )
        except InvalidMessage as exc:
            log.warning("no bounce message for %s to %s: %s", message_id, sender, exc)
    return notices


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
    return last_attempt_by(
        attempts=leased.attempts + 1, next_at=result.next_attempt_at, policy=config.retry
    )


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


@dataclasses.dataclass(frozen=True, slots=True)
class _Notice:
    """One notice to make: to ``sender`` about ``entries`` of message ``message_id``."""

    config: Config
    now: datetime
    message_id: str
    sender: str
    delayed: bool
    item: WorkItem
    due: datetime
    """When the message could first go: queued, or its send_at when later."""
    entries: list[FailedRecipient]
    last_attempt: datetime | None = None
    """When the last attempt ``retry.max_attempts`` allows may come (a delay warning's),
    or None when it sets no end."""

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
            if self.item.expires_at is not None:
                ends.append(self.item.expires_at)
            if self.last_attempt is not None:
                ends.append(self.last_attempt)
            retry_until = min(ends, default=None)
        raw = render_notice(
            reporting_mta=config.helo_name,
            sender=self.sender,
            message_id=self.message_id,
            original=self.item.data,
            # When it arrived, i.e. was queued (RFC 3464 §2.2.5), not its send_at.
            arrival=self.item.queued_at or self.due,
            failed=self.entries,
            dsn=dsn,
            now=self.now,
            delayed=delayed,
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
            # The returned message may be in base64 (an 8-bit one): 4/3 of its size.
            max_size=config.max_message_size * 4 // 3 + 64 * 1024,
            max_recipients=1,
            now=self.now,
            id_domain=config.message_id_domain,
            fallback_id_domain=config.helo_name,
            dkim=config.dkim,
        )

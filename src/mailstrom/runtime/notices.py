"""The worker's bounce messages: final failures of a batch of results turned into RFC 3464
notices to the senders who asked for them (:mod:`mailstrom.bounces.notice` decides and
renders; this module gathers per message and sender, and prepares them for the queue)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

from mailstrom.bounces.notice import FailedRecipient, render_notice, status_of, wants_notice
from mailstrom.bounces.verp import is_verp_template, verp_address
from mailstrom.config import Config
from mailstrom.errors import InvalidMessage
from mailstrom.message.prepare import prepare
from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores.base import RecipientResult, WorkItem, domain_of

log = logging.getLogger("mailstrom.worker")


def notices_for(
    failed: Sequence[RecipientResult],
    items: Mapping[tuple[str, str], WorkItem],
    *,
    config: Config,
    now: datetime,
) -> list[PreparedMessage]:
    """One prepared notice per (message, envelope sender) among ``failed`` results whose
    message asks for one; ``items`` are the leased work items by (message id, domain)."""
    groups: dict[tuple[str, str], tuple[WorkItem, datetime, list[FailedRecipient]]] = {}
    for result in failed:
        item = items.get((result.message_id, domain_of(result.address)))
        if item is None:
            continue
        sender = result.envelope_from or item.envelope_from
        if is_verp_template(sender):
            sender = verp_address(sender, result.message_id, result.address)
        if not wants_notice(sender, item.dsn, default=config.bounce_notices):
            continue
        attempt = result.attempt
        reply = attempt.reply
        entry = FailedRecipient(
            address=result.address,
            status=status_of(attempt.outcome, reply.enhanced if reply else None),
            diagnostic=attempt.reason,
            remote_mta=attempt.mx_host,
            at=attempt.at,
        )
        arrival = result.queued_at or now
        groups.setdefault((result.message_id, sender), (item, arrival, []))[2].append(entry)
    notices = []
    for (message_id, sender), (item, arrival, entries) in groups.items():
        raw = render_notice(
            reporting_mta=config.helo_name,
            sender=sender,
            message_id=message_id,
            original=item.data,
            arrival=arrival,
            failed=entries,
            dsn=item.dsn,
            now=now,
        )
        try:
            notices.append(
                prepare(
                    raw,
                    envelope_from="",
                    envelope_to=[sender],
                    max_size=config.max_message_size + 64 * 1024,
                    max_recipients=1,
                    now=now,
                    id_domain=config.message_id_domain,
                    fallback_id_domain=config.helo_name,
                    dkim=config.dkim,
                )
            )
        except InvalidMessage as exc:
            log.warning("no bounce message for %s to %s: %s", message_id, sender, exc)
    return notices

"""The worker's side of the suppression list: screening leased work, and the entries that
hard bounces add. Pure functions over leases, results and entries; the worker makes the
store calls (one lookup per lease, one write per batch of hard bounces).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta

from mailstrom.bounces.verp import is_verp_address
from mailstrom.config import Lane
from mailstrom.errors import InvalidSuppression
from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, RecipientState
from mailstrom.stores.base import Lease, LeasedRecipient, RecipientResult, WorkItem, storable_text
from mailstrom.suppression import (
    MAX_REPLY,
    Suppression,
    SuppressionSource,
    lookup_targets,
    match,
    normalize_target,
)


def lease_targets(lease: Lease) -> list[str]:
    """Every address of ``lease`` and every domain, once: what to look up."""
    return lookup_targets(r.address for item in lease.items for r in item.recipients)


def lane_bypass(lanes: Iterable[Lane]) -> dict[str, frozenset[SuppressionSource]]:
    """The sources each lane's mail is sent past (:attr:`Lane.bypass_suppression`), for
    the lanes that name any."""
    return {
        lane.name: frozenset(lane.bypass_suppression) for lane in lanes if lane.bypass_suppression
    }


def screen(
    item: WorkItem,
    found: Mapping[str, Suppression],
    *,
    now: datetime,
    bypass: Mapping[str, frozenset[SuppressionSource]] | None = None,
) -> tuple[WorkItem | None, list[RecipientResult]]:
    """Split ``item`` into what may be delivered (None when nothing) and a FAILED result
    for each suppressed recipient, whose reason is the entry's. ``bypass`` (of
    :func:`lane_bypass`) names the entries that do not stop the mail of a lane."""
    if not found:
        return item, []
    skip = bypass.get(item.priority, frozenset()) if bypass else frozenset()
    keep: list[LeasedRecipient] = []
    refused: list[RecipientResult] = []
    for recipient in item.recipients:
        entry = match(recipient.address, found, bypass=skip)
        if entry is None:
            keep.append(recipient)
        else:
            refused.append(_suppressed(item, recipient, entry, now))
    if not refused:
        return item, []
    rest = replace(item, recipients=tuple(keep)) if keep else None
    return rest, refused


def _suppressed(
    item: WorkItem, recipient: LeasedRecipient, entry: Suppression, now: datetime
) -> RecipientResult:
    attempt = Attempt(
        at=now,
        outcome=AttemptOutcome.PERMANENT,
        error=entry.reason,
        reason_class=ReasonClass.SUPPRESSED,
    )
    return RecipientResult(
        message_id=item.message_id,
        address=recipient.address,
        state=RecipientState.FAILED,
        attempt=attempt,
        lease_token=item.lease_token,
        ref=recipient.ref,
        queued_at=recipient.created_at,
        size=len(item.data),
        envelope_from=item.envelope_from,
        attempted=False,  # no server was asked: see RecipientResult.attempted
    )


def hard_bounce_entries(
    results: Iterable[RecipientResult], *, expire_after: timedelta | None
) -> list[Suppression]:
    """The entries that the hard bounces among ``results`` add: one per address, with the
    refusal that caused it. An address that cannot be a target (never from a prepared
    message, but stored data is not trusted) is skipped, and so is a VERP address
    (:func:`~mailstrom.bounces.verp.is_verp_address`): its entry (the sender's own server
    refusing a bounce notice) was kept for good without ``suppress_for``, one more for
    every failure, and failed the next notice to that address (the failure notice after
    a delay warning) unsent."""
    entries: dict[str, Suppression] = {}
    for result in results:
        if not result.hard_bounce or is_verp_address(result.address):
            continue
        try:
            target = normalize_target(result.address)
        except InvalidSuppression:
            continue
        at = result.attempt.at
        entries[target] = Suppression(
            target=target,
            source=SuppressionSource.HARD_BOUNCE,
            reply=storable_text(result.attempt.reason, MAX_REPLY),
            created_at=at,
            expires_at=None if expire_after is None else at + expire_after,
            message_id=result.message_id,
        )
    return list(entries.values())

"""The memory store's bookkeeping: one mutable record per message, recipient and outbox
event, only ever touched under the store's lock.

Shared by :class:`~mailstrom.stores.memory.MemoryStore`, the mixins that make up its
sections (``memory_*.py``) and the memory read model, which reads them directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

from mailstrom.errors import StoreError
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import (
    Attempt,
    DeliveryEvent,
    DKIMStatus,
    MessageStatus,
    ReasonClass,
    RecipientState,
    RecipientStatus,
    SMTPReply,
    derive_message_state,
    state_of_counts,
)
from mailstrom.stores.base import MAX_HISTORY, RecipientResult, bounded_attempt
from mailstrom.stores.clock import kept_time

_PENDING = (RecipientState.QUEUED, RecipientState.DEFERRED)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def writes(method: Callable[Concatenate[Any, _P], _R]) -> Callable[Concatenate[Any, _P], _R]:
    """``method``, a write of the memory store, refused with StoreError once the store is
    closed, as a closed durable store refuses it: kept after ``close()`` (a facade's
    ``stop()`` closes the store it opened), a suppression, a hold, a cancel or a lease
    went to a store no worker reads again, and the caller was told it was done. Reads
    go on: what a closed memory store holds can still be looked at."""

    @functools.wraps(method)
    def checked(self: Any, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self._closed:
            raise StoreError(
                f"the store is closed: nothing more can be written ({method.__name__})"
            )
        return method(self, *args, **kwargs)

    return checked


@dataclass(slots=True, kw_only=True)
class _Recipient:
    # Mutable on purpose: private bookkeeping, only ever touched under the store's lock.
    address: str
    domain: str
    position: int
    state: RecipientState = RecipientState.QUEUED
    attempts: int = 0
    first_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None
    finished_at: datetime | None = None
    lease_token: str | None = None
    lease_expires_at: datetime | None = None
    reply: SMTPReply | None = None
    error: str | None = None
    mx_host: str | None = None
    ip: str | None = None
    tls: bool = False
    uncertain: bool = False
    reason_class: ReasonClass | None = None
    history: list[Attempt] = field(default_factory=list)
    throttled_by: str | None = None
    notice: str | None = None
    """What the notice owed its sender for its result says of it (the mark), or None."""
    due_gen: int = 0
    """The number of its current entry in the store's due index (memory_due.py)."""
    filed: int = 0
    """How many entries of it, current or stale, the due index holds: those of a purged
    message are counted at its purge, and swept out (:meth:`DueIndex.drop`)."""

    def take(
        self,
        attempt: Attempt,
        state: RecipientState,
        *,
        next_attempt_at: datetime | None,
        uncertain: bool,
        attempted: bool = True,
    ) -> None:
        """Make ``attempt`` this recipient's latest: now in ``state``, due again at
        ``next_attempt_at`` (None: final, finished at the attempt's time), with the
        attempt's reply and where it went, its lease ended, its history bounded (and left
        as it is when it was no ``attempted`` one)."""
        self.state = state
        self.last_attempt_at = attempt.at
        self.next_attempt_at = next_attempt_at
        self.finished_at = None if next_attempt_at is not None else attempt.at
        self.lease_token = self.lease_expires_at = None
        self.reply = attempt.reply
        self.error = attempt.error
        self.mx_host = attempt.mx_host
        self.ip = attempt.ip
        self.tls = attempt.tls
        self.uncertain = uncertain
        self.reason_class = attempt.reason_class
        if attempted:
            self.history.append(attempt)
            del self.history[:-MAX_HISTORY]

    def due_at(self) -> datetime:
        """When a pending recipient may next be leased: its next attempt, or its lease's
        expiry if that is later."""
        assert self.next_attempt_at is not None
        if self.lease_expires_at is not None and self.lease_expires_at > self.next_attempt_at:
            return self.lease_expires_at
        return self.next_attempt_at

    def snapshot(self, *, with_history: bool) -> RecipientStatus:
        return RecipientStatus(
            address=self.address,
            state=self.state,
            attempts=self.attempts,
            reply=self.reply,
            error=self.error,
            mx_host=self.mx_host,
            ip=self.ip,
            tls=self.tls,
            uncertain=self.uncertain,
            reason_class=self.reason_class,
            first_attempt_at=self.first_attempt_at,
            last_attempt_at=self.last_attempt_at,
            next_attempt_at=self.next_attempt_at,
            finished_at=self.finished_at,
            history=tuple(self.history) if with_history else (),
            leased=self.state in _PENDING and self.lease_token is not None,
        )


@dataclass(slots=True, kw_only=True)
class _Event:
    # Mutable on purpose: delivery bookkeeping, only ever touched under the store's lock.
    event: DeliveryEvent
    sent_at: datetime | None = None
    lease_token: str | None = None
    lease_expires_at: datetime | None = None


@dataclass(slots=True, kw_only=True)
class _Message:
    id: str
    seq: int
    prepared: PreparedMessage
    created_at: datetime
    held: bool
    recipients: dict[str, _Recipient]
    dkim: DKIMStatus | None = None
    counts: dict[RecipientState, int] = field(default_factory=dict)
    """How many of its recipients are in each state, kept by :meth:`moved`: a list by
    state tells each message's from them. Worked out from every recipient, under the
    lock, a walk's batch of 2,000 messages of 50,000 recipients read 10⁸ of them."""

    def __post_init__(self) -> None:
        self.counts = dict.fromkeys(RecipientState, 0)
        for r in self.recipients.values():
            self.counts[r.state] += 1

    def moved(self, was: RecipientState, now: RecipientState) -> None:
        """Count a recipient of this message gone from state ``was`` to ``now``."""
        self.counts[was] -= 1
        self.counts[now] += 1

    def state(self) -> RecipientState:
        """Its derived state (:func:`derive_message_state`), from :attr:`counts`."""
        return state_of_counts(self.counts)

    def pending(self) -> bool:
        """Whether a recipient is still to be delivered (queued or deferred)."""
        return bool(self.counts[RecipientState.QUEUED] or self.counts[RecipientState.DEFERRED])

    def hold(self, held: bool) -> bool:
        """Hold or release the message; whether it changed. A hold keeps pending
        recipients from leases: a message with none is not held, and one that finished
        while held was waiting for no release (its flag is cleared, uncounted)."""
        if self.held == held or (held and not self.pending()):
            return False
        self.held = held
        return held or self.pending()

    def waiting(self) -> bool:
        """Whether the message is held, as reported: flagged, with a pending recipient
        (one that finished while held keeps its flag, and is no mail on hold)."""
        return self.held and self.pending()

    def leased(self) -> bool:
        """Whether a pending recipient is under a lease (a worker may hold it)."""
        return any(
            r.state in _PENDING and r.lease_token is not None for r in self.recipients.values()
        )

    def snapshot(
        self, *, with_history: bool, chosen: Sequence[_Recipient] | None = None
    ) -> MessageStatus:
        """The message's status; with ``chosen``, with those recipients only (its state
        theirs: :meth:`~mailstrom.stores.base.Store.recipients_by_address`)."""
        taken = self.recipients.values() if chosen is None else chosen
        shown = tuple(r.snapshot(with_history=with_history) for r in taken)
        return MessageStatus(
            id=self.id,
            state=derive_message_state([r.state for r in shown]),
            envelope_from=self.prepared.envelope_from,
            created_at=self.created_at,
            size=self.prepared.size,
            recipients=shown,
            header_message_id=self.prepared.header_message_id,
            subject=self.prepared.subject,
            held=self.waiting(),
            dkim=self.dkim,
            tags=self.prepared.attributes.tags,
            metadata=dict(self.prepared.attributes.metadata),
            priority=self.prepared.attributes.priority,
            send_at=self.prepared.attributes.send_at,
            expires_at=self.prepared.attributes.expires_at,
            idempotency_key=self.prepared.attributes.idempotency_key,
        )


def utc_attempt(
    attempt: Attempt, next_at: datetime | None = None
) -> tuple[Attempt, datetime | None]:
    """``attempt`` as the memory store keeps it (:func:`bounded_attempt`, its time in UTC)
    and ``next_at`` in UTC. A naive time raises InvalidArgument, as the SQL stores refuse
    it: kept as given, the next lease compared it with an aware ``now`` (TypeError), and
    a time in another zone was shown back in that zone, where the others show UTC."""
    attempt = bounded_attempt(attempt)
    at = kept_time(attempt.at, "attempt.at")
    if at is not attempt.at:
        attempt = replace(attempt, at=at)
    return attempt, None if next_at is None else kept_time(next_at, "next_attempt_at")


def accepted_after_cancel(r: _Recipient, result: RecipientResult) -> bool:
    """Whether ``result`` says a server accepted ``r`` after an operator cancelled it:
    its transaction was on the wire when the cancel ended its lease. The mail went out,
    so that is recorded, as the SQL stores do (a status saying "cancelled" of delivered
    mail told the operator it never went); any other outcome leaves the cancel."""
    return (
        result.state is RecipientState.DELIVERED
        and r.state is RecipientState.FAILED
        and r.error == "cancelled"
        and r.lease_token is None
    )

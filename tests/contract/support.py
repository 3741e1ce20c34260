"""Shared values and builders for the store contract tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, RecipientState, SMTPReply
from mailstrom.stores import Lease, RecipientResult, Store

NOW = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
"""A fixed clock; the microseconds check that times round-trip exactly."""
LEASE_FOR = timedelta(minutes=5)
SECOND = timedelta(seconds=1)


def message(
    *recipients: str,
    data: bytes | None = None,
    envelope_from: str = "sender@example.com",
    subject: str | None = "Hello",
    smtputf8: bool = False,
    eightbit: bool = False,
) -> PreparedMessage:
    """A prepared message to ``recipients`` (default: two at one domain)."""
    rcpts = recipients or ("alice@example.org", "bob@example.org")
    body = data if data is not None else b"Subject: Hello\r\n\r\nHi there.\r\n"
    return PreparedMessage(
        data=body,
        envelope_from=envelope_from,
        recipients=rcpts,
        smtputf8=smtputf8,
        eightbit=eightbit,
        header_message_id="<m1@example.com>",
        subject=subject,
    )


def attempt(
    outcome: AttemptOutcome = AttemptOutcome.DELIVERED,
    *,
    at: datetime = NOW,
    code: int | None = 250,
    error: str | None = None,
    uncertain: bool = False,
    reason_class: ReasonClass | None = None,
) -> Attempt:
    """An attempt with every field set, so the round trip checks them all (a failure gets
    a reason class unless one is given)."""
    if reason_class is None and outcome is not AttemptOutcome.DELIVERED:
        reason_class = REASONS[outcome]
    return Attempt(
        at=at,
        outcome=outcome,
        duration=0.123456789,
        mx_host="mx1.example.org",
        ip="127.0.0.7",
        port=2525,
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        reply=SMTPReply(code=code, enhanced=f"{code // 100}.0.0", text="line one\nline two")
        if code is not None
        else None,
        error=error,
        uncertain=uncertain,
        reason_class=reason_class,
    )


REASONS = {
    AttemptOutcome.TEMPORARY: ReasonClass.GREYLISTED,
    AttemptOutcome.PERMANENT: ReasonClass.MAILBOX,
}
"""The class :func:`attempt` gives a failure by default."""


def results_for(
    lease: Lease,
    state: RecipientState,
    *,
    at: datetime = NOW,
    next_attempt_at: datetime | None = None,
    only: Iterable[str] | None = None,
) -> list[RecipientResult]:
    """The same outcome for every leased recipient (or those whose address is in ``only``)."""
    outcome = {
        RecipientState.DELIVERED: AttemptOutcome.DELIVERED,
        RecipientState.DEFERRED: AttemptOutcome.TEMPORARY,
        RecipientState.FAILED: AttemptOutcome.PERMANENT,
    }[state]
    code = {
        AttemptOutcome.DELIVERED: 250,
        AttemptOutcome.TEMPORARY: 451,
        AttemptOutcome.PERMANENT: 550,
    }[outcome]
    wanted = set(only) if only is not None else None
    return [
        RecipientResult(
            message_id=item.message_id,
            address=r.address,
            lease_token=lease.token,
            ref=r.ref,
            state=state,
            attempt=attempt(outcome, at=at, code=code),
            next_attempt_at=next_attempt_at,
        )
        for item in lease.items
        for r in item.recipients
        if wanted is None or r.address in wanted
    ]


def leased_addresses(lease: Lease | None) -> list[str]:
    """Every address in ``lease``, in item order."""
    if lease is None:
        return []
    return [r.address for item in lease.items for r in item.recipients]


def lease_all(store: Store, *, now: datetime = NOW) -> Lease:
    """Lease everything due at ``now``; fails the test when nothing is."""
    lease = store.lease(now=now, limit=1000, lease_for=LEASE_FOR)
    assert lease is not None, "expected due work"
    return lease


def at_once(*calls: Callable[[], object], timeout: float = 60) -> None:
    """Run each of ``calls`` on a thread of its own, all released together (the writes
    of two workers or imports meeting in the store); re-raise the first error one raised."""
    start = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            start.wait(timeout=30)
            call()
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "still running"
    if errors:
        raise errors[0]

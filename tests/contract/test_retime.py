"""Store.retime_ahead: the times a clock since set back stamped ahead of ``now``.

A recipient deferred at NOW with its retry a minute on, then the host's clock set back an
hour (NTP, an operator, a VM restored), was due 1:01 ahead by the new clock: nothing was
leased for an hour, and the retry waited 61 times its backoff.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from mailstrom.message.attributes import QueueAttributes
from mailstrom.status import RecipientState, RecipientStatus
from mailstrom.stores import Store
from mailstrom.stores.base import RETIME_BATCH
from tests.contract.support import LEASE_FOR, NOW, SECOND, lease_all, message, results_for

HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
BACK = NOW - HOUR
"""The clock, set back an hour after the deferral."""


def deferred(store: Store, *, backoff: timedelta, recipients: int = 1) -> str:
    """A message queued, tried and deferred at NOW, its retry ``backoff`` later."""
    addresses = [f"r{n}@example.org" for n in range(recipients)]
    mid = store.enqueue(message(*addresses), now=NOW)
    lease = lease_all(store)
    results = results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW + backoff)
    assert len(store.record(results)) == recipients
    return mid


def only(store: Store, mid: str) -> RecipientStatus:
    [recipient] = store.status(mid).recipients
    return recipient


def test_a_deferral_stamped_by_a_clock_since_set_back_gets_its_backoff_from_now(
    store: Store,
) -> None:
    mid = deferred(store, backoff=MINUTE)
    assert store.lease(now=BACK + 2 * MINUTE, limit=10, lease_for=LEASE_FOR) is None
    assert store.retime_ahead(now=BACK) == 1
    r = only(store, mid)
    assert (r.state, r.attempts) == (RecipientState.DEFERRED, 1)
    assert (r.next_attempt_at, r.last_attempt_at, r.first_attempt_at) == (
        BACK + MINUTE,
        BACK,
        BACK,
    )
    assert store.next_due(now=BACK) == BACK + MINUTE
    assert store.lease(now=BACK + MINUTE - SECOND, limit=10, lease_for=LEASE_FOR) is None
    lease = store.lease(now=BACK + MINUTE, limit=10, lease_for=LEASE_FOR)
    assert lease is not None and [i.message_id for i in lease.items] == [mid]


def test_retiming_is_idempotent_and_never_makes_a_retry_later(store: Store) -> None:
    mid = deferred(store, backoff=4 * HOUR)
    assert store.retime_ahead(now=BACK) == 1
    assert only(store, mid).next_attempt_at == BACK + 4 * HOUR  # an hour sooner, as it was meant
    # Again, even a minute on: its stamps are the new clock's now.
    assert store.retime_ahead(now=BACK) == 0
    assert store.retime_ahead(now=BACK + MINUTE) == 0
    r = only(store, mid)
    assert (r.next_attempt_at, r.last_attempt_at) == (BACK + 4 * HOUR, BACK)


@pytest.mark.parametrize("back", [timedelta(0), 30 * SECOND, MINUTE])
def test_a_deferral_within_the_slack_is_left_alone(store: Store, back: timedelta) -> None:
    """A clock in step (or set back within a minute: a retry waits that much longer at
    most) moves no retry, however long its backoff."""
    mid = deferred(store, backoff=2 * HOUR)
    assert store.retime_ahead(now=NOW - back) == 0
    assert store.retime_ahead(now=NOW + 10 * SECOND) == 0
    r = only(store, mid)
    assert (r.next_attempt_at, r.last_attempt_at) == (NOW + 2 * HOUR, NOW)


def test_a_send_at_is_left_alone_and_mail_queued_by_the_clock_ahead_is_due_now(
    store: Store,
) -> None:
    """Queued at NOW to go two hours on, a message is the caller's to schedule, whatever
    the clock did since; one queued to go at once, by the clock since set back, goes at
    once."""
    scheduled = dataclasses.replace(
        message("later@example.org"), attributes=QueueAttributes(send_at=NOW + 2 * HOUR)
    )
    later = store.enqueue(scheduled, now=NOW)
    at_once = store.enqueue(message("now@example.org"), now=NOW)
    assert store.retime_ahead(now=BACK) == 1
    assert only(store, later).next_attempt_at == NOW + 2 * HOUR
    r = only(store, at_once)
    assert (r.state, r.next_attempt_at, r.last_attempt_at) == (RecipientState.QUEUED, BACK, None)
    lease = store.lease(now=BACK, limit=10, lease_for=LEASE_FOR)
    assert lease is not None and [i.message_id for i in lease.items] == [at_once]


def test_finished_recipients_are_left_alone(store: Store) -> None:
    mid = store.enqueue(message("done@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    assert store.retime_ahead(now=BACK) == 0
    r = only(store, mid)
    assert (r.state, r.last_attempt_at, r.next_attempt_at) == (RecipientState.DELIVERED, NOW, None)


def test_a_large_queue_is_retimed_whole(store: Store) -> None:
    """More recipients than one transaction takes, all re-timed by one call."""
    count = RETIME_BATCH + 5
    store.enqueue_many([message(f"r{n}@example.org") for n in range(count)], now=NOW)
    lease = store.lease(now=NOW, limit=count, lease_for=LEASE_FOR)
    assert lease is not None
    store.record(results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW + MINUTE))
    assert store.retime_ahead(now=BACK) == count
    assert store.next_due(now=BACK) == BACK + MINUTE
    assert store.retime_ahead(now=BACK) == 0

"""Contract: a closed store writes nothing, in every store alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from mailstrom.errors import StoreError
from mailstrom.mtasts import CachedPolicy, Mode, Policy
from mailstrom.policy.throttle import TokenBucket
from mailstrom.status import RecipientState
from mailstrom.stores import Store
from mailstrom.suppression import Suppression, SuppressionSource
from mailstrom.tlsrpt import PolicyType, TLSSessions

from .support import LEASE_FOR, NOW, lease_all, message, results_for

DAY = timedelta(days=1)
ENTRY = Suppression(
    target="bob@example.org",
    source=SuppressionSource.MANUAL,
    reply="on hold",
    created_at=NOW,
)
POLICY = Policy(mode=Mode.ENFORCE, mx=("mx.example.org",), max_age=86400, text="version: STSv1")
SESSIONS = TLSSessions(
    day=NOW.date(),
    policy_domain="example.org",
    policy_type=PolicyType.STS,
    policy_string="version: STSv1",
    count=1,
)

Write = Callable[[Store, str, Any], object]
"""A write, given the store, a queued message's id and a lease of its recipients."""

WRITES: dict[str, Write] = {
    "enqueue": lambda s, mid, lease: s.enqueue(message("new@example.org"), now=NOW),
    "lease": lambda s, mid, lease: s.lease(now=NOW + DAY, limit=10, lease_for=LEASE_FOR),
    "record": lambda s, mid, lease: s.record(results_for(lease, RecipientState.DELIVERED)),
    "record_and_lease": lambda s, mid, lease: s.record_and_lease(
        results_for(lease, RecipientState.DELIVERED), now=NOW, limit=10, lease_for=LEASE_FOR
    ),
    "extend": lambda s, mid, lease: s.extend(lease, until=NOW + DAY),
    "release": lambda s, mid, lease: s.release(lease),
    "retry": lambda s, mid, lease: s.retry(mid, now=NOW),
    "retry_deferred": lambda s, mid, lease: s.retry_deferred(now=NOW),
    "cancel": lambda s, mid, lease: s.cancel(mid, now=NOW),
    "set_held": lambda s, mid, lease: s.set_held(mid, True),
    "purge": lambda s, mid, lease: s.purge(finished_before=NOW + DAY),
    "retry_many": lambda s, mid, lease: s.retry_many([mid], now=NOW),
    "cancel_many": lambda s, mid, lease: s.cancel_many([mid], now=NOW),
    "hold_many": lambda s, mid, lease: s.hold_many([mid], True),
    "purge_many": lambda s, mid, lease: s.purge_many([mid]),
    "purge_state": lambda s, mid, lease: s.purge_state(
        finished_before=NOW + DAY, state=RecipientState.FAILED
    ),
    "suspend": lambda s, mid, lease: s.suspend("example.org", now=NOW),
    "resume": lambda s, mid, lease: s.resume("example.net", now=NOW),
    "throttle": lambda s, mid, lease: s.throttle(
        "example.org", now=NOW, reply="421 slow down", first=DAY, maximum=DAY
    ),
    "postpone": lambda s, mid, lease: s.postpone(lease.items, until=NOW + DAY),
    "take_tokens": lambda s, mid, lease: s.take_tokens(
        [TokenBucket(key="example.org messages/minute", rate=1.0, capacity=1.0)],
        want=1,
        now=NOW,
    ),
    "suppress": lambda s, mid, lease: s.suppress([ENTRY]),
    "unsuppress": lambda s, mid, lease: s.unsuppress(["ann@example.org"]),
    "prune_suppressions": lambda s, mid, lease: s.prune_suppressions(
        expired_before=NOW + DAY, limit=10
    ),
    "fail_late": lambda s, mid, lease: s.fail_late(
        mid, "ann@example.org", results_for(lease, RecipientState.FAILED)[0].attempt
    ),
    "lease_events": lambda s, mid, lease: s.lease_events(now=NOW, limit=10, lease_for=LEASE_FOR),
    "note_tls_broken": lambda s, mid, lease: s.note_tls_broken(
        "mx.example.org", until=NOW + DAY, reason="bad", now=NOW
    ),
    "prune_events": lambda s, mid, lease: s.prune_events(sent_before=NOW + DAY),
    "save_mta_sts_policy": lambda s, mid, lease: s.save_mta_sts_policy(
        CachedPolicy.of("example.org", "1", POLICY, NOW)
    ),
    "prune_mta_sts_policies": lambda s, mid, lease: s.prune_mta_sts_policies(
        expired_before=NOW + DAY, limit=10
    ),
    "add_tls_sessions": lambda s, mid, lease: s.add_tls_sessions([SESSIONS]),
    "prune_tls_sessions": lambda s, mid, lease: s.prune_tls_sessions(before=NOW.date()),
    "claim_tls_report": lambda s, mid, lease: s.claim_tls_report(
        "report-1", now=NOW, until=NOW + DAY
    ),
    "hold_tls_report": lambda s, mid, lease: s.hold_tls_report("report-1", until=NOW + DAY),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_closed_store_refuses_every_write(store: Store, write: str) -> None:
    """Was: a closed memory store refused only new mail. A suppression added, a message
    held or cancelled, a lease taken after ``close()`` (a facade's ``stop()`` closes the
    store it opened) was kept by a store no worker would read again, and the caller was
    told it was done; a closed SQLite or PostgreSQL store raises StoreError."""
    mid = store.enqueue(message("ann@example.org"), now=NOW)
    store.suppress([dataclasses.replace(ENTRY, target="ann@example.org")])
    lease = lease_all(store)
    store.close()
    with pytest.raises(StoreError):
        WRITES[write](store, mid, lease)

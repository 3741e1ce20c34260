"""Contract: a lease holder's leases, given back all at once (``Store.release_holder``).

A worker process killed with deliveries in flight cannot give back its own leases; its
parent knows the holder it gave it and gives back all of them, so they need not wait for
``lease_for`` to pass.
"""

from __future__ import annotations

import pytest

from mailstrom.status import RecipientState
from mailstrom.stores import Lease, Store

from .support import LEASE_FOR, NOW, leased_addresses, message, results_for
from .test_watch import Counter

A = "0123abcd"
B = "0123abcd5e"
"""Starts with A's digits: only the dot after a holder tells their tokens apart."""


def _lease(store: Store, limit: int, holder: str | None) -> Lease:
    lease = store.lease(now=NOW, limit=limit, lease_for=LEASE_FOR, holder=holder)
    assert lease is not None
    return lease


def test_release_holder_gives_back_exactly_its_unrecorded_recipients(store: Store) -> None:
    addresses = [f"r{i}@example.org" for i in range(6)]
    mid = store.enqueue(message(*addresses), now=NOW)
    a1 = _lease(store, 2, A)  # r0 r1
    a2 = _lease(store, 1, A)  # r2: every lease of a holder, not just one
    _, b = store.record_and_lease([], now=NOW, limit=2, lease_for=LEASE_FOR, holder=B)  # r3 r4
    assert b is not None
    other = _lease(store, 1, None)  # r5, a random token
    assert a1.token.startswith(f"{A}.") and a2.token.startswith(f"{A}.")
    assert b.token.startswith(f"{B}.") and all(i.lease_token == b.token for i in b.items)
    assert "." not in other.token
    assert store.record(results_for(a1, RecipientState.DELIVERED, only=["r0@example.org"]))
    assert store.record(results_for(b, RecipientState.DELIVERED, only=["r3@example.org"]))

    assert store.release_holder(A) == 2

    # Due at once, without an attempt: not after lease_for.
    again = store.lease(now=NOW, limit=10, lease_for=LEASE_FOR)
    assert sorted(leased_addresses(again)) == ["r1@example.org", "r2@example.org"]
    status = store.status(mid)
    assert [r.attempts for r in status.recipients] == [1, 0, 0, 1, 0, 0]
    assert status.recipient("r0@example.org").state is RecipientState.DELIVERED
    # A's leases own nothing any more; B's and the other one still hold theirs.
    assert store.record(results_for(a2, RecipientState.FAILED)) == []
    assert len(store.record(results_for(b, RecipientState.DELIVERED))) == 1
    assert len(store.record(results_for(other, RecipientState.DELIVERED))) == 1
    assert store.release_holder(A) == 0


def test_release_holder_wakes_the_workers(store: Store) -> None:
    store.enqueue(message("a@example.org"), now=NOW)
    _lease(store, 1, A)
    watched = Counter()
    stop = store.watch(watched)
    try:
        assert store.release_holder(A) == 1
        assert watched.wait_for(1)
    finally:
        stop()


@pytest.mark.parametrize("holder", ["0123ABCD", "0123abc", "0" * 33, "0123abcd.", "01%", ""])
def test_release_holder_refuses_what_is_no_holder(store: Store, holder: str) -> None:
    with pytest.raises(ValueError, match="holder: expected 8 to 32 lower-case hex digits"):
        store.release_holder(holder)

"""Contract: a fair lease (``busy``, ``per_destination``) between destinations: a backlog
at one destination neither fills a lease nor hides the others' mail queued after it."""

from __future__ import annotations

from collections import Counter

import pytest

from mailstrom.stores import Store

from .conftest import Backend
from .support import LEASE_FOR, NOW, SECOND, leased_addresses, message


@pytest.fixture
def fair_store(store_backend: Backend) -> Store:
    return store_backend.open()


def backlog(store: Store, n: int) -> None:
    store.enqueue_many([message(f"r{i}@big.example") for i in range(n)], now=NOW)
    store.enqueue(message("me@small.example", "you@other.example"), now=NOW + SECOND)


def domains(addresses: list[str]) -> Counter[str]:
    return Counter(address.split("@")[1] for address in addresses)


def test_a_busy_destination_is_passed_over(fair_store: Store) -> None:
    backlog(fair_store, 40)
    lease = fair_store.lease(
        now=NOW + 2 * SECOND, limit=10, lease_for=LEASE_FOR, busy=["big.example"]
    )
    assert sorted(leased_addresses(lease)) == ["me@small.example", "you@other.example"]


def test_at_most_per_destination_of_one_destination(fair_store: Store) -> None:
    backlog(fair_store, 40)
    lease = fair_store.lease(now=NOW + 2 * SECOND, limit=10, lease_for=LEASE_FOR, per_destination=3)
    taken = leased_addresses(lease)
    assert domains(taken) == {"big.example": 3, "small.example": 1, "other.example": 1}
    # The oldest of the backlog, and only those.
    assert [a for a in taken if a.endswith("@big.example")] == [
        "r0@big.example",
        "r1@big.example",
        "r2@big.example",
    ]


def test_mail_queued_after_a_deep_backlog_is_found_at_once(fair_store: Store) -> None:
    """Far more of the backlog is due than the lease's limit reads."""
    backlog(fair_store, 500)
    lease = fair_store.lease(
        now=NOW + 2 * SECOND,
        limit=8,
        lease_for=LEASE_FOR,
        lanes=[("", 8)],
        busy=["big.example"],
        per_destination=4,
    )
    assert sorted(leased_addresses(lease)) == ["me@small.example", "you@other.example"]
    again = fair_store.lease(now=NOW + 2 * SECOND, limit=8, lease_for=LEASE_FOR, per_destination=4)
    assert leased_addresses(again) == [f"r{i}@big.example" for i in range(4)]


def test_without_busy_or_share_the_lease_is_as_before(store: Store) -> None:
    backlog(store, 5)
    lease = store.lease(
        now=NOW + 2 * SECOND, limit=6, lease_for=LEASE_FOR, busy=[], per_destination=None
    )
    assert leased_addresses(lease) == [f"r{i}@big.example" for i in range(5)] + ["me@small.example"]


def test_mail_behind_many_destinations_with_nothing_due_is_found(fair_store: Store) -> None:
    """More destinations than a lease looks at (fairness.DESTINATIONS) have recipients
    pending but not due (leased here) between the backlog and the one due elsewhere: the
    walk goes past them, in this lease or, from where it stopped, in the next."""
    fair_store.enqueue_many([message(f"u@a{i:02}.example") for i in range(40)], now=NOW)
    leased = fair_store.lease(now=NOW + SECOND, limit=40, lease_for=LEASE_FOR)
    assert len(leased_addresses(leased)) == 40
    fair_store.enqueue_many([message(f"r{i}@big.example") for i in range(30)], now=NOW + SECOND)
    fair_store.enqueue(message("u@zz.example"), now=NOW + 2 * SECOND)
    taken: list[str] = []
    for _ in range(2):
        taken += leased_addresses(
            fair_store.lease(
                now=NOW + 3 * SECOND,
                limit=8,
                lease_for=LEASE_FOR,
                lanes=[("", 8)],
                busy=["big.example"],
                per_destination=4,
            )
        )
    assert taken == ["u@zz.example"]

"""Contract: schema version 8 — remembered broken TLS, shared by every store object, the
TLS policy of each attempt in the history, and REQUIRETLS on leased work."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from mailstrom.errors import InvalidArgument
from mailstrom.status import RecipientState
from mailstrom.stores import Store

from .conftest import Backend
from .support import NOW, lease_all, message, results_for

MINUTE = timedelta(minutes=1)


def test_a_noted_host_is_broken_until_its_time(store: Store) -> None:
    assert store.tls_broken(now=NOW) == {}
    store.note_tls_broken("mx.example.org", until=NOW + MINUTE, reason="handshake", now=NOW)
    assert store.tls_broken(now=NOW) == {"mx.example.org": NOW + MINUTE}
    assert store.tls_broken(now=NOW + MINUTE) == {}
    # Expired entries are gone for good, not hidden.
    assert store.tls_broken(now=NOW) == {}


@pytest.mark.parametrize(
    "host",
    ["mx\x00.example.org", "mx\udcff.example.org", "m" * 2000, None],
    ids=["nul", "surrogate", "too-long", "none"],
)
def test_a_host_no_store_can_key_is_refused_alike(store: Store, host: str) -> None:
    """Was: a host with a NUL given to ``note_tls_broken`` was kept by the memory store and
    SQLite and refused by PostgreSQL (StoreRefusedData), one with a lone surrogate by both
    SQL stores, one of thousands of characters was a StoreError in PostgreSQL (its index
    keeps no such key), and None was kept by the memory store and SQLite. Every store
    refuses it (InvalidArgument, named) and remembers nothing."""
    with pytest.raises(InvalidArgument, match=r"^host: "):
        store.note_tls_broken(host, until=NOW + MINUTE, reason="handshake", now=NOW)
    assert store.tls_broken(now=NOW) == {}


def test_the_later_time_wins(store: Store) -> None:
    store.note_tls_broken("mx.example.org", until=NOW + 5 * MINUTE, reason="a", now=NOW)
    store.note_tls_broken("mx.example.org", until=NOW + MINUTE, reason="b", now=NOW)
    assert store.tls_broken(now=NOW) == {"mx.example.org": NOW + 5 * MINUTE}
    store.note_tls_broken("mx.example.org", until=NOW + 9 * MINUTE, reason="c", now=NOW)
    assert store.tls_broken(now=NOW) == {"mx.example.org": NOW + 9 * MINUTE}


def test_the_limit_keeps_the_longest_remembered(store: Store) -> None:
    for i in range(5):
        store.note_tls_broken(f"mx{i}.test", until=NOW + (i + 1) * MINUTE, reason="x", now=NOW)
    assert set(store.tls_broken(now=NOW, limit=2)) == {"mx4.test", "mx3.test"}


def test_a_negative_limit_is_none(store: Store) -> None:
    """The memory store dropped the last entry for limit -1, SQLite kept every one and
    PostgreSQL raised StoreRefusedData; a negative limit is none, as query()'s."""
    for i in range(3):
        store.note_tls_broken(f"mx{i}.test", until=NOW + (i + 1) * MINUTE, reason="x", now=NOW)
    assert store.tls_broken(now=NOW, limit=-1) == {}
    assert store.tls_broken(now=NOW, limit=0) == {}
    assert len(store.tls_broken(now=NOW)) == 3


def test_a_huge_reason_is_bounded(store: Store) -> None:
    store.note_tls_broken("mx.test", until=NOW + MINUTE, reason="x" * 100_000, now=NOW)
    assert "mx.test" in store.tls_broken(now=NOW)


def test_every_store_object_on_the_storage_sees_it(store_backend: Backend) -> None:
    store_backend.require_durable()
    first, second = store_backend.open(), store_backend.open()
    first.note_tls_broken("mx.example.org", until=NOW + MINUTE, reason="x", now=NOW)
    assert second.tls_broken(now=NOW) == {"mx.example.org": NOW + MINUTE}


def test_the_tls_policy_of_each_attempt_is_kept_in_the_history(store: Store) -> None:
    mid = store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    [deferred] = results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW)
    attempt = replace(deferred.attempt, tls_policy="dane")
    store.record([replace(deferred, attempt=attempt)])
    lease = lease_all(store)
    [delivered] = results_for(lease, RecipientState.DELIVERED)
    store.record([delivered])
    history = store.status(mid).recipient("a@example.org").history
    assert [a.tls_policy for a in history] == ["dane", None]


def test_requiretls_travels_with_the_leased_work(store: Store) -> None:
    flagged = replace(message("a@example.org"), require_tls=True)
    store.enqueue_many([flagged, message("b@example.org")], now=NOW)
    lease = lease_all(store)
    flags = {item.recipients[0].address: item.require_tls for item in lease.items}
    assert flags == {"a@example.org": True, "b@example.org": False}

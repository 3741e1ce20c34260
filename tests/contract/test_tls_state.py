"""MTA-STS policy cache and TLS session counters (schema version 9), the same on every
store: what is saved is read back exactly, a save replaces, counters add up, also across
store objects sharing the storage (all workers see one cache)."""

from __future__ import annotations

import threading
from datetime import date, timedelta
from typing import Any

import pytest

from mailstrom.errors import InvalidArgument
from mailstrom.mtasts import CachedPolicy, Mode, Policy
from mailstrom.stores import Store
from mailstrom.stores.base import MAX_REPORT_KEY
from mailstrom.tlsrpt import PolicyType, TLSSessions
from tests.contract.conftest import Backend
from tests.contract.support import NOW, at_once

DAY = date(2030, 1, 2)
TEXT = "version: STSv1\nmode: enforce\nmx: mx1.example.org\nmx: *.example.net\nmax_age: 86400"


def cached(policy_id: str = "20300101", mode: Mode = Mode.ENFORCE) -> CachedPolicy:
    policy = Policy(mode=mode, mx=("mx1.example.org", "*.example.net"), max_age=86400, text=TEXT)
    return CachedPolicy.of("example.org", policy_id, policy, NOW)


def test_no_policy_cached_at_first(store: Store) -> None:
    assert store.mta_sts_policy("example.org") is None


def test_saved_policy_reads_back_exactly(store: Store) -> None:
    store.save_mta_sts_policy(cached())
    assert store.mta_sts_policy("example.org") == cached()
    assert store.mta_sts_policy("EXAMPLE.org") == cached()
    assert store.mta_sts_policy("example.com") is None


def test_a_new_policy_replaces_the_old(store: Store) -> None:
    store.save_mta_sts_policy(cached())
    newer = cached("20300102", Mode.TESTING)
    store.save_mta_sts_policy(newer)
    got = store.mta_sts_policy("example.org")
    assert got == newer
    assert got is not None and got.policy.mode is Mode.TESTING


def test_policy_without_mx_round_trips(store: Store) -> None:
    policy = Policy(mode=Mode.NONE, mx=(), max_age=0, text="version: STSv1\nmode: none")
    store.save_mta_sts_policy(CachedPolicy.of("example.org", "x1", policy, NOW))
    got = store.mta_sts_policy("example.org")
    assert got is not None and got.policy == policy


def test_cache_is_shared_by_store_objects(store_backend: Backend) -> None:
    store_backend.require_durable()
    first, second = store_backend.open(), store_backend.open()
    first.save_mta_sts_policy(cached())
    assert second.mta_sts_policy("example.org") == cached()


def success(count: int = 1, day: date = DAY) -> TLSSessions:
    return TLSSessions(
        day=day,
        policy_domain="example.org",
        policy_type=PolicyType.STS,
        policy_string=TEXT,
        count=count,
    )


def failure(result_type: str = "certificate-expired", count: int = 1) -> TLSSessions:
    return TLSSessions(
        day=DAY,
        policy_domain="example.org",
        policy_type=PolicyType.STS,
        policy_string=TEXT,
        result_type=result_type,
        sending_ip="192.0.2.1",
        receiving_mx="mx1.example.org",
        receiving_ip="198.51.100.7",
        failure_code="X509_V_ERR_CERT_HAS_EXPIRED",
        count=count,
    )


def test_session_counters_add_up(store: Store) -> None:
    assert store.tls_sessions(DAY) == []
    store.add_tls_sessions([success(2), failure(count=1)])
    store.add_tls_sessions([success(3), failure(count=4), failure("starttls-not-supported")])
    got = {(s.result_type, s.count) for s in store.tls_sessions(DAY)}
    assert got == {("", 5), ("certificate-expired", 5), ("starttls-not-supported", 1)}
    [expired] = [s for s in store.tls_sessions(DAY) if s.result_type == "certificate-expired"]
    assert expired == failure(count=5)
    assert store.tls_sessions(DAY + timedelta(days=1)) == []


def test_concurrent_adds_lose_nothing(store_backend: Backend) -> None:
    stores = (
        [store_backend.open() for _ in range(2)]
        if store_backend.durable
        else [store_backend.open()] * 2
    )

    def add(store: Store) -> None:
        for _ in range(20):
            store.add_tls_sessions([success()])

    threads = [threading.Thread(target=add, args=(s,)) for s in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [row] = stores[0].tls_sessions(DAY)
    assert row.count == 80


def test_concurrent_batches_in_other_orders_both_add(store_backend: Backend) -> None:
    """Two workers write the same counters, each in the order it met them: a counter's
    row waits for the other batch to commit, and in opposite orders PostgreSQL failed
    one batch (a deadlock)."""
    stores = [store_backend.open() for _ in range(2)]
    batch = [
        TLSSessions(day=DAY, policy_domain=f"d{n:04d}.example", policy_type=PolicyType.STS)
        for n in range(1000)
    ]
    at_once(
        lambda: stores[0].add_tls_sessions(batch),
        lambda: stores[1].add_tls_sessions(batch[::-1]),
    )
    assert sorted({s.count for s in stores[0].tls_sessions(DAY)}) == [2]


def test_pruning_drops_old_days_only(store: Store) -> None:
    store.add_tls_sessions([success(day=DAY - timedelta(days=40)), success()])
    assert store.prune_tls_sessions(before=DAY - timedelta(days=30)) == 1
    assert [s.day for s in store.tls_sessions(DAY)] == [DAY]
    assert store.tls_sessions(DAY - timedelta(days=40)) == []


def test_a_tls_report_post_is_claimed_by_one_run_until_its_hold_ends(store: Store) -> None:
    # Every host of a shared store that runs the daily tlsrpt --send posted the day's
    # report to each https: rua URI again (a copy with its own id: the domain counted the
    # sessions as often); the store now says which run posts it, as it does for mail.
    key, until = "tlsrpt-2030-01-01-abc", NOW + timedelta(hours=24)
    assert store.claim_tls_report(key, now=NOW, until=until)
    assert not store.claim_tls_report(key, now=NOW, until=until)
    assert not store.claim_tls_report(key, now=until - timedelta(microseconds=1), until=until)
    assert store.claim_tls_report("tlsrpt-2030-01-01-def", now=NOW, until=until)
    # The hold ends: another run may post it (a later day's run, a window elapsed).
    assert store.claim_tls_report(key, now=until, until=until + timedelta(hours=1))
    # A run whose POST went holds it longer; one whose POST failed lets it go, for
    # another (or itself) to try again.
    later = until + timedelta(hours=2)
    store.hold_tls_report(key, until=later)
    assert not store.claim_tls_report(key, now=until + timedelta(hours=1), until=later)
    store.hold_tls_report(key, until=until)
    assert store.claim_tls_report(key, now=until, until=later)
    store.hold_tls_report("never-claimed", until=later)
    assert not store.claim_tls_report("never-claimed", now=until, until=later)


def test_one_of_two_store_objects_claiming_at_once_gets_a_report(store_backend: Backend) -> None:
    store_backend.require_durable()
    first, second = store_backend.open(), store_backend.open()
    until = NOW + timedelta(hours=24)
    won: list[bool] = []
    at_once(
        lambda: won.append(first.claim_tls_report("k", now=NOW, until=until)),
        lambda: won.append(second.claim_tls_report("k", now=NOW, until=until)),
    )
    assert sorted(won) == [False, True]


@pytest.mark.parametrize(
    "key",
    ["tlsrpt-\x00", "tlsrpt-\udc80", "k" * (MAX_REPORT_KEY + 1), None],
    ids=["nul", "surrogate", "long", "none"],
)
def test_a_report_key_no_store_can_keep_is_refused_alike(store: Store, key: Any) -> None:
    """Was: a claim or hold of a key with a NUL was taken by the memory store and SQLite
    and refused by PostgreSQL (StoreRefusedData), one with a lone surrogate taken by the
    memory store alone, and one of thousands of octets failed PostgreSQL's index as a
    passing StoreError. Every store refuses such a key (InvalidArgument, naming it)."""
    later = NOW + timedelta(hours=1)
    with pytest.raises(InvalidArgument, match=r"^key: "):
        store.claim_tls_report(key, now=NOW, until=later)
    with pytest.raises(InvalidArgument, match=r"^key: "):
        store.hold_tls_report(key, until=later)
    longest = "k" * MAX_REPORT_KEY
    assert store.claim_tls_report(longest, now=NOW, until=later)
    assert not store.claim_tls_report(longest, now=NOW, until=later)


def expiring(domain: str, expires_at: timedelta) -> CachedPolicy:
    """A policy of ``domain`` fetched a day before it expires, ``expires_at`` after NOW."""
    policy = Policy(mode=Mode.ENFORCE, mx=("mx1.example.org",), max_age=86400, text=TEXT)
    return CachedPolicy.of(domain, "20300101", policy, NOW + expires_at - timedelta(days=1))


def test_pruning_deletes_expired_policies_a_bounded_batch_at_a_time(store: Store) -> None:
    """Was: an MTA-STS policy was kept for ever once fetched, expired or not: one row per
    recipient domain that ever published one. Policies expired at or before the time go,
    soonest expired first and at most ``limit`` a call; the others stay."""
    for i, days in enumerate((-3, -2, -1, 1)):
        store.save_mta_sts_policy(expiring(f"d{i}.example", timedelta(days=days)))
    cutoff = NOW - timedelta(days=1)
    assert store.prune_mta_sts_policies(expired_before=cutoff, limit=2) == 2
    assert store.mta_sts_policy("d0.example") is None
    assert store.mta_sts_policy("d1.example") is None
    assert store.prune_mta_sts_policies(expired_before=cutoff, limit=2) == 1
    assert store.prune_mta_sts_policies(expired_before=cutoff, limit=2) == 0
    assert store.mta_sts_policy("d2.example") is None
    assert store.mta_sts_policy("d3.example") is not None
    assert store.prune_mta_sts_policies(expired_before=NOW + timedelta(days=2), limit=0) == 0
    with pytest.raises(InvalidArgument):
        store.prune_mta_sts_policies(expired_before=NOW.replace(tzinfo=None), limit=10)
    with pytest.raises(InvalidArgument, match=r"^limit: "):
        store.prune_mta_sts_policies(expired_before=cutoff, limit=True)

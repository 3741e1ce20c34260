"""Contract: a worker's retention round (``Config.retention``) deletes, on every store,
the finished messages older than their state's age, and only those: young, pending,
held and notice-owing mail stays; the default keeps everything."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailstrom.config import Config, RetentionConfig
from mailstrom.errors import UnknownMessage
from mailstrom.runtime import worker_retention
from mailstrom.runtime.worker import Worker
from mailstrom.runtime.worker_retention import retained
from mailstrom.status import RecipientState
from mailstrom.stores import Store
from mailstrom.stores.operator import IdPage

from .conftest import Backend
from .support import LEASE_FOR, NOW, lease_all, message, results_for

DAY = timedelta(days=1)
LATER = NOW + 40 * DAY
"""The worker's clock: 40 days after the first messages."""


def finished(
    store: Store,
    state: RecipientState,
    *,
    queued: datetime,
    done: datetime | None = None,
    notice: bool = False,
) -> str:
    """A message queued at ``queued`` whose one recipient reached ``state`` at ``done``
    (DEFERRED: due again long after LATER), with the mark "notice owed" if ``notice``."""
    mid = store.enqueue(message(f"{state.value}@example.org"), now=queued)
    at = queued if done is None else done
    results = results_for(lease_all(store, now=at), state, at=at, next_attempt_at=LATER + 100 * DAY)
    if notice:
        results = [dataclasses.replace(r, notice='{"about":"x"}') for r in results]
    store.record(results)
    return mid


def present(store: Store, mid: str) -> bool:
    try:
        store.status(mid)
    except UnknownMessage:
        return False
    return True


def worker(store: Store, retention: RetentionConfig) -> Worker:
    return Worker(Config(retention=retention), store, clock=lambda: LATER)


async def test_a_round_deletes_only_finished_mail_past_its_retention(store: Store) -> None:
    delivered = RecipientState.DELIVERED
    failed = RecipientState.FAILED
    old_delivered = finished(store, delivered, queued=NOW)
    old_failed = finished(store, failed, queued=NOW)
    cancelled = store.enqueue(message("cancelled@example.org"), now=NOW)
    store.cancel(cancelled, now=NOW)
    owing = finished(store, failed, queued=NOW, notice=True)
    pending = finished(store, RecipientState.DEFERRED, queued=NOW)
    held = store.enqueue(message("held@example.org"), now=NOW + DAY)
    store.hold_many([held], True)
    # Queued 40 days ago, but finished 15 days ago: younger than 30 days.
    late = finished(store, delivered, queued=NOW + 2 * DAY, done=NOW + 25 * DAY)
    young_delivered = finished(store, delivered, queued=NOW + 20 * DAY)
    young_failed = finished(store, failed, queued=NOW + 35 * DAY)
    # Failed 10 days ago: past the failed age, not the delivered one.
    mid_failed = finished(store, failed, queued=NOW + 30 * DAY)

    retention = RetentionConfig(delivered=30 * DAY, failed=7 * DAY)
    deleted = await worker(store, retention)._retain_once(retained(retention))

    assert deleted == 4
    for gone in (old_delivered, old_failed, cancelled, mid_failed):
        assert not present(store, gone), gone
    for kept in (owing, pending, held, late, young_delivered, young_failed):
        assert present(store, kept), kept
    # A second round (another worker's, or the next) finds nothing more.
    assert await worker(store, retention)._retain_once(retained(retention)) == 0


async def test_only_the_state_given_an_age_is_deleted(store: Store) -> None:
    old_delivered = finished(store, RecipientState.DELIVERED, queued=NOW)
    old_failed = finished(store, RecipientState.FAILED, queued=NOW)
    retention = RetentionConfig(failed=DAY)
    assert await worker(store, retention)._retain_once(retained(retention)) == 1
    assert present(store, old_delivered)
    assert not present(store, old_failed)


async def test_the_default_keeps_everything(store: Store) -> None:
    """No retention (the default, and "0"): the loop ends at once, deleting nothing."""
    mids = [
        finished(store, RecipientState.DELIVERED, queued=NOW),
        finished(store, RecipientState.FAILED, queued=NOW),
    ]
    for retention in (RetentionConfig(), RetentionConfig(delivered=timedelta(0))):
        assert retained(retention) == []
        await worker(store, retention)._retention_loop()  # returns: nothing to do
    assert all(present(store, mid) for mid in mids)


async def test_recent_finishes_at_the_cutoff_do_not_hide_older_mail(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newest candidates (queued just before the cutoff) finished after it and stay;
    when they fill a batch, the batches after it go on below them, and the old mail
    behind them still goes in the same round."""
    monkeypatch.setattr(worker_retention, "RETAIN_BATCH", 2)
    cutoff = LATER - 30 * DAY
    old = [finished(store, RecipientState.DELIVERED, queued=NOW + i * DAY) for i in range(3)]
    recent = [
        finished(
            store,
            RecipientState.DELIVERED,
            queued=cutoff - timedelta(seconds=10 + i),
            done=cutoff + DAY,
        )
        for i in range(3)
    ]
    retention = RetentionConfig(delivered=30 * DAY)
    assert await worker(store, retention)._retain_once(retained(retention)) == 3
    assert not any(present(store, mid) for mid in old)
    assert all(present(store, mid) for mid in recent)


def finished_together(store: Store, n: int, *, queued: datetime, done: datetime) -> list[str]:
    """``n`` messages queued at once at ``queued`` (one enqueue time, as a bulk import
    gives them) and delivered at ``done``."""
    mids = store.enqueue_many([message(f"u{i}@example.org") for i in range(n)], now=queued)
    lease = store.lease(now=done, limit=n, lease_for=LEASE_FOR)
    assert lease is not None
    store.record(results_for(lease, RecipientState.DELIVERED, at=done))
    return mids


async def test_a_round_deletes_old_mail_behind_many_recent_finishes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 messages past retention by 2.5 days behind 600 queued after them but
    finished an hour ago (more than a batch): one round deletes the 1,000 and keeps the
    600. Stepping back by time from a batch of the recent ones, the round passed over
    the old mail, which went only some 9 hours later."""
    cutoff = LATER - DAY
    old = finished_together(store, 1000, queued=cutoff - 2.5 * DAY, done=cutoff - 2.5 * DAY)
    recent = finished_together(store, 600, queued=cutoff - 2 * DAY, done=LATER - timedelta(hours=1))
    listed: list[str] = []
    select_page = store.select_page

    def counted(**kw: Any) -> IdPage:
        page = select_page(**kw)
        listed.extend(page.ids)
        return page

    monkeypatch.setattr(store, "select_page", counted)
    retention = RetentionConfig(delivered=DAY)
    assert await worker(store, retention)._retain_once(retained(retention)) == 1000
    # Each candidate looked at once, in batches of at most RETAIN_BATCH.
    assert sorted(listed) == sorted(old + recent)
    assert not any(present(store, mid) for mid in old[:: len(old) // 50])
    assert all(present(store, mid) for mid in recent[:: len(recent) // 50])
    assert await worker(store, retention)._retain_once(retained(retention)) == 0


async def test_a_worker_clock_ahead_of_the_server_deletes_nothing_early(
    store_backend: Backend,
) -> None:
    """A worker whose clock runs ahead of the database server's (years here) judges ages
    by the server's time: by it, the message finished only now (PostgreSQL). Memory and
    SQLite stores have only the host's clock, the worker's."""
    store = store_backend.open()
    mid = finished(store, RecipientState.DELIVERED, queued=datetime.now(UTC))
    retention = RetentionConfig(delivered=DAY)
    ahead = Worker(Config(retention=retention), store, clock=lambda: LATER, check_clock=True)
    deleted = await ahead._retain_once(retained(retention))
    server_clock = store_backend.name == "postgres"
    assert deleted == (0 if server_clock else 1)
    assert present(store, mid) is server_clock


async def test_a_round_finds_sparse_old_mail_in_bounded_steps(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three delivered messages past retention behind 60 failed ones that a delivered
    retention keeps: each store call of the round looks at no more than RETAIN_EXAMINE
    messages, and the round still deletes the three. Was: one call looked at every kept
    message until it found a batch, which on PostgreSQL a statement_timeout cancelled at
    each round (0.4 s per 100,000 kept messages), and the old mail was never deleted."""
    monkeypatch.setattr(worker_retention, "RETAIN_BATCH", 2)
    monkeypatch.setattr(worker_retention, "RETAIN_EXAMINE", 5, raising=False)
    old = [finished(store, RecipientState.DELIVERED, queued=NOW + i * DAY) for i in range(3)]
    mids = store.enqueue_many([message(f"f{i}@example.org") for i in range(60)], now=NOW + 5 * DAY)
    store.record(results_for(lease_all(store, now=NOW + 5 * DAY), RecipientState.FAILED))
    asked: list[int | None] = []
    select_page = store.select_page

    def counted(**kw: Any) -> IdPage:
        asked.append(kw.get("examine"))
        return select_page(**kw)

    monkeypatch.setattr(store, "select_page", counted)
    retention = RetentionConfig(delivered=30 * DAY)
    assert await worker(store, retention)._retain_once(retained(retention)) == 3
    assert asked and all(examine == 5 for examine in asked), asked
    assert not any(present(store, mid) for mid in old)
    assert all(present(store, mid) for mid in mids[::10])

"""A running worker applies ``Config.retention`` by itself, at its start: the old
finished mail of a SQLite queue goes, the rest stays, with no purge run by anyone."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom.config import Config, RetentionConfig
from mailstrom.errors import StoreError, StoreLocked
from mailstrom.runtime import worker_retention
from mailstrom.runtime.worker import Worker
from mailstrom.runtime.worker_retention import retained
from mailstrom.status import RecipientState
from mailstrom.stores import SQLiteStore
from mailstrom.stores.base import QueueFilter
from mailstrom.stores.operator import IdPage, ListingKey
from tests.contract.test_retention import finished, present

DAY = timedelta(days=1)


class Watched(SQLiteStore):
    """A SQLite store that says when a purge of listed messages has run (in the thread
    a retention round calls it from, to the loop that made the store)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.purged = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def purge_many(self, message_ids: Sequence[str], **kw: Any) -> int:
        try:
            return super().purge_many(message_ids, **kw)
        finally:
            self._loop.call_soon_threadsafe(self.purged.set)


async def test_a_worker_deletes_old_finished_mail_at_its_start(tmp_path: Path) -> None:
    store = Watched(tmp_path / "queue.db")
    now = datetime.now(UTC)
    old = finished(store, RecipientState.DELIVERED, queued=now - 40 * DAY)
    old_failed = finished(store, RecipientState.FAILED, queued=now - 40 * DAY)
    young = finished(store, RecipientState.DELIVERED, queued=now - DAY)
    config = Config(helo_name="mail.example.com", retention=RetentionConfig(delivered=30 * DAY))
    worker = Worker(config, store)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(store.purged.wait(), 60)  # the timeout only catches a hang
    finally:
        worker.request_stop()
        await running
        store.close()
    reopened = SQLiteStore(tmp_path / "queue.db")
    try:
        assert not present(reopened, old)
        assert present(reopened, old_failed)  # no age for failed mail: kept
        assert present(reopened, young)
    finally:
        reopened.close()


class FailingOnce(SQLiteStore):
    """A SQLite store whose first look for candidates fails, as a locked or lost
    database does."""

    failed = False

    def select_page(
        self,
        *,
        now: datetime,
        where: QueueFilter,
        after: ListingKey | None = None,
        examine: int | None = None,
    ) -> IdPage:
        if not self.failed:
            self.failed = True
            raise StoreLocked("database is locked")
        return super().select_page(now=now, where=where, after=after, examine=examine)


async def test_a_store_error_is_logged_and_the_next_round_deletes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FailingOnce(tmp_path / "queue.db")
    now = datetime.now(UTC)
    old = finished(store, RecipientState.FAILED, queued=now - 40 * DAY)
    retention = RetentionConfig(failed=30 * DAY)
    worker = Worker(Config(helo_name="mail.example.com", retention=retention), store)
    try:
        with caplog.at_level(logging.WARNING, logger="mailstrom.worker"):
            assert await worker._retain_once(retained(retention)) == 0
        assert "not deleted (tried again in 600 s): database is locked" in caplog.text
        assert present(store, old)
        assert await worker._retain_once(retained(retention)) == 1
        assert not present(store, old)
    finally:
        store.close()


class ReadWatched(SQLiteStore):
    """A SQLite store whose look for candidates returns only once the worker's loop has
    run while it reads (its task sets ``loop_ran``): a look made on the loop held it,
    and waits in vain."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reading = threading.Event()
        self.loop_ran = threading.Event()

    def select_page(
        self,
        *,
        now: datetime,
        where: QueueFilter,
        after: ListingKey | None = None,
        examine: int | None = None,
    ) -> IdPage:
        self.reading.set()
        # The timeout only ends the wait of a look made on the loop.
        if not self.loop_ran.wait(10):
            raise AssertionError("the worker's loop stood still while the round read")
        return super().select_page(now=now, where=where, after=after, examine=examine)


async def test_a_round_reads_off_the_worker_loop(tmp_path: Path) -> None:
    """A round's reads walk every finished message older than the cutoff that it keeps
    (0.3 s for 100,000 failed messages under a delivered retention): off the worker's
    loop, its deliveries go on meanwhile."""
    store = ReadWatched(tmp_path / "queue.db")
    now = datetime.now(UTC)
    old = finished(store, RecipientState.DELIVERED, queued=now - 40 * DAY)
    retention = RetentionConfig(delivered=30 * DAY)
    worker = Worker(Config(helo_name="mail.example.com", retention=retention), store)

    async def the_loop_runs() -> None:
        await asyncio.to_thread(store.reading.wait, 10)
        store.loop_ran.set()

    try:
        running = asyncio.create_task(the_loop_runs())
        assert await worker._retain_once(retained(retention)) == 1
        await running
        assert not present(store, old)
    finally:
        store.loop_ran.set()
        store.close()


class DeliveredWalkFails(SQLiteStore):
    """A SQLite store whose look for delivered candidates fails from its second batch
    on, as a PostgreSQL walk past many kept messages does under a ``statement_timeout``
    every round."""

    def select_page(
        self,
        *,
        now: datetime,
        where: QueueFilter,
        after: ListingKey | None = None,
        examine: int | None = None,
    ) -> IdPage:
        if where.states == {RecipientState.DELIVERED} and after is not None:
            raise StoreError("canceling statement due to statement timeout")
        return super().select_page(now=now, where=where, after=after, examine=examine)


async def test_a_store_error_in_one_state_keeps_the_others_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The delivered walk fails part way: what it deleted counts, and the failed mail
    past its retention still goes in the same round."""
    monkeypatch.setattr(worker_retention, "RETAIN_BATCH", 1)
    store = DeliveredWalkFails(tmp_path / "queue.db")
    now = datetime.now(UTC)
    delivered = [finished(store, RecipientState.DELIVERED, queued=now - 40 * DAY) for _ in "ab"]
    old_failed = finished(store, RecipientState.FAILED, queued=now - 40 * DAY)
    retention = RetentionConfig(delivered=30 * DAY, failed=30 * DAY)
    worker = Worker(Config(helo_name="mail.example.com", retention=retention), store)
    try:
        with caplog.at_level(logging.WARNING, logger="mailstrom.worker"):
            assert await worker._retain_once(retained(retention)) == 2
        assert "delivered messages past their retention not deleted" in caplog.text
        assert sum(present(store, mid) for mid in delivered) == 1
        assert not present(store, old_failed)
    finally:
        store.close()

"""A worker thread or task that ended on its own (a store error it cannot get past, which
``worker_status`` reports) runs no worker any more: ``start()`` and a ``with`` block start
a new one in its place, as a worker process's facade does once its child ended for good.
Its death is logged, in either mode, when it happens, and ``stop()`` raises no error of
it in either mode."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from tests.support.waiting import eventually

from mailstrom import AsyncMailstrom, Config, Mailstrom
from mailstrom.runtime.worker import Worker
from mailstrom.stores import MemoryStore


class DiesOnce(MemoryStore):
    """A memory store whose first lease fails as a store bug would: the worker dies."""

    def __init__(self) -> None:
        super().__init__()
        self.leases = 0

    def lease(self, **kwargs: Any) -> Any:
        self.leases += 1
        if self.leases == 1:
            raise RuntimeError("disk on fire")
        return super().lease(**kwargs)


CONFIG = Config(helo_name="client.test")


def dead_worker_thread(store: MemoryStore) -> Mailstrom:
    ms = Mailstrom(CONFIG, store=store, worker="thread")
    ms.start()
    assert isinstance(ms.worker, Worker) and ms.worker.wait_stopped(timeout=10)
    assert ms.worker_status.dead and "disk on fire" in (ms.worker_status.error or "")
    return ms


def test_start_after_the_worker_thread_died_starts_a_new_one() -> None:
    # start() said "already started", while nothing delivered and worker_status said so.
    store = DiesOnce()
    ms = dead_worker_thread(store)
    try:
        ms.start()
        assert ms.worker_status.running and ms.worker_status.error is None
    finally:
        ms.stop()


def test_a_with_block_after_the_worker_thread_died_starts_a_new_one() -> None:
    store = DiesOnce()
    ms = dead_worker_thread(store)
    with ms:
        assert ms.worker_status.running
    assert not ms.worker_status.running


async def test_start_after_the_worker_task_died_starts_a_new_one() -> None:
    store = DiesOnce()
    ams = AsyncMailstrom(CONFIG, store=store, worker="task")
    await ams.start()
    assert isinstance(ams.worker, Worker)
    assert await asyncio.to_thread(ams.worker.wait_stopped, 10)
    assert ams.worker_status.dead
    try:
        await ams.start()
        assert ams.worker_status.running and ams.worker_status.error is None
    finally:
        await ams.stop()


async def test_an_async_with_block_after_the_worker_task_died_starts_a_new_one() -> None:
    store = DiesOnce()
    ams = AsyncMailstrom(CONFIG, store=store, worker="task")
    await ams.start()
    assert isinstance(ams.worker, Worker)
    assert await asyncio.to_thread(ams.worker.wait_stopped, 10)
    async with ams:
        assert ams.worker_status.running
    assert not ams.worker_status.running


class AlwaysDies(MemoryStore):
    def lease(self, **kwargs: Any) -> Any:
        raise RuntimeError("disk on fire")


def death_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "mailstrom worker died"]


def test_a_worker_thread_that_dies_says_why_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    ms = Mailstrom(CONFIG, store=AlwaysDies(), worker="thread")
    ms.start()
    try:
        assert isinstance(ms.worker, Worker) and ms.worker.wait_stopped(timeout=10)
        assert eventually(lambda: death_records(caplog), 10)
    finally:
        ms.stop()
    [record] = death_records(caplog)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "disk on fire" in str(record.exc_info[1])


async def test_a_worker_task_that_dies_says_why_in_the_log_as_a_thread_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nothing was logged when it died: only worker_status knew, and asyncio's "Task
    # exception was never retrieved" came once the facade was garbage-collected.
    ams = AsyncMailstrom(CONFIG, store=AlwaysDies(), worker="task")
    await ams.start()
    try:
        assert isinstance(ams.worker, Worker)
        assert await asyncio.to_thread(ams.worker.wait_stopped, 10)
        for _ in range(1000):
            if death_records(caplog):
                break
            await asyncio.sleep(0.01)
        [record] = death_records(caplog)
        assert record.levelno == logging.ERROR and record.exc_info is not None
        assert "disk on fire" in str(record.exc_info[1])
    finally:
        await ams.stop()


class BodyError(Exception):
    """What the application's own code in an ``async with`` block raised."""


async def test_an_async_with_block_raises_its_own_error_not_the_dead_workers() -> None:
    # stop() raised the error the worker task had died of (already logged, and in
    # worker_status), and the block's own exception was replaced by it, where a
    # Mailstrom's stop() raises none.
    ams = AsyncMailstrom(CONFIG, store=AlwaysDies(), worker="task")

    async def block() -> None:
        async with ams:
            assert isinstance(ams.worker, Worker)
            assert await asyncio.to_thread(ams.worker.wait_stopped, 10)
            raise BodyError

    with pytest.raises(BodyError):
        await block()
    assert ams.worker_status.dead  # it still says why


async def test_stop_after_the_worker_task_died_returns_as_a_threads_does() -> None:
    ams = AsyncMailstrom(CONFIG, store=AlwaysDies(), worker="task")
    await ams.start()
    assert isinstance(ams.worker, Worker)
    assert await asyncio.to_thread(ams.worker.wait_stopped, 10)
    await ams.stop()
    assert "disk on fire" in (ams.worker_status.error or "")

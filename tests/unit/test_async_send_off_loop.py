"""``AsyncMailstrom.send_email``/``send_emails`` do their work (validation, encoding, DKIM,
the store write) in a thread: on the loop, a 20 MiB message held every other coroutine
for half a second. Checked by where the work runs, not by timing it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.support.waiting import eventually

from mailstrom import AsyncMailstrom, Config, Email, InvalidAddress
from mailstrom.errors import InvalidMessageType
from mailstrom.stores import MemoryStore, SQLiteStore


def hello(to: str) -> Email:
    return Email(from_="app@example.com", to=[to], subject="Hi", text="x")


async def test_sending_prepares_and_queues_on_a_thread_other_than_the_loops() -> None:
    # The injected clock is read where the message is prepared (its Date, its schedule)
    # and where it is queued: each reading says on which thread that ran.
    readers: list[int] = []

    def clock() -> datetime:
        readers.append(threading.get_ident())
        return datetime(2026, 1, 1, tzinfo=UTC)

    store = MemoryStore()
    ams = AsyncMailstrom(
        Config(helo_name="mail.example.com"), store=store, clock=clock, worker=None
    )
    try:
        loop_thread = threading.get_ident()
        one = await ams.send_email(hello("bob@example.org"))
        sent_alone = len(readers)
        two, three = await ams.send_emails([hello("ann@example.org"), hello("eve@example.org")])
        assert sent_alone >= 2 and len(readers) > sent_alone
        assert loop_thread not in readers
        assert [s.id for s in await ams.query_recent()] == [three, two, one]
        # The errors are the same, typed, and nothing is queued by them.
        with pytest.raises(InvalidAddress):
            await ams.send_email(hello("bob@"))
        with pytest.raises(InvalidAddress):
            await ams.send_emails([hello("ann@example.org"), hello("bob@")])
        with pytest.raises(InvalidMessageType):
            await ams.send_emails(hello("ann@example.org"))  # type: ignore[arg-type]
        assert len(await ams.query_recent()) == 3
    finally:
        await ams.stop()
        store.close()


def _sending(ams: AsyncMailstrom, batch: bool) -> asyncio.Future[object]:
    message = hello("bob@example.org")
    return asyncio.ensure_future(ams.send_emails([message]) if batch else ams.send_email(message))


@pytest.mark.parametrize("batch", [False, True])
def test_a_send_cancelled_before_its_store_write_queues_nothing(batch: bool) -> None:
    # Cancelled (a timeout around it) while the thread still prepared the message (a
    # large one's encoding and signing takes half a second), it waited for the thread to
    # queue it: the caller, told it was cancelled, sent it again, and it went out twice.
    # It now raises at once, and the thread drops the message before the store sees it.
    entered, release = threading.Event(), threading.Event()

    def clock() -> datetime:  # read in the thread where the message is prepared
        entered.set()
        release.wait(30)
        return datetime(2026, 1, 1, tzinfo=UTC)

    store = MemoryStore()
    ams = AsyncMailstrom(
        Config(helo_name="mail.example.com"), store=store, clock=clock, worker=None
    )

    async def cancel_while_preparing() -> bool:
        sending = _sending(ams, batch)
        assert await asyncio.to_thread(entered.wait, 10)
        sending.cancel()
        try:
            ended, _ = await asyncio.wait({sending}, timeout=10)  # (bounds the old wait)
        finally:
            release.set()
        with pytest.raises(asyncio.CancelledError):
            await sending
        return bool(ended)

    try:
        at_once = asyncio.run(cancel_while_preparing())  # which waits for the thread
        assert store.recent(10) == []
        assert at_once
    finally:
        release.set()
        store.close()


@pytest.mark.parametrize("batch", [False, True])
async def test_a_send_cancelled_in_its_store_write_raises_once_the_write_has_ended(
    batch: bool,
) -> None:
    # The thread cannot be stopped: a CancelledError raised at once left it queuing the
    # message behind the caller's back (and the async with exit closing the store under
    # it). The cancel now takes effect once the write has ended, so the caller who sees it
    # finds the queue as it will stay.
    store = _GatedStore()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker=None)
    try:
        store.armed = True
        sending = _sending(ams, batch)
        assert await asyncio.to_thread(store.entered.wait, 10)
        sending.cancel()
        asyncio.get_running_loop().call_later(0.3, store.release.set)
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert store.release.is_set()
        assert len(store.recent(10)) == 1
    finally:
        store.release.set()
        await ams.stop()
        store.close()


class _GatedStore(MemoryStore):
    """A memory store whose next public method call, once armed, waits to be let go."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr):
            return attr
        if not object.__getattribute__(self, "armed"):
            return attr

        def gated(*args: Any, **kwargs: Any) -> Any:
            self.armed = False
            self.entered.set()
            self.release.wait(10)
            return attr(*args, **kwargs)

        return gated


WRITES: dict[str, Callable[[AsyncMailstrom, str], Awaitable[object]]] = {
    "hold": lambda ams, mid: ams.hold([mid]),
    "release": lambda ams, mid: ams.release([mid]),
    "retry_many": lambda ams, mid: ams.retry_many([mid]),
    "cancel_many": lambda ams, mid: ams.cancel_many([mid]),
    "retry": lambda ams, mid: ams.retry(mid),
    "cancel": lambda ams, mid: ams.cancel(mid),
    "purge": lambda ams, mid: ams.purge(timedelta(0), messages=[mid]),
    "suspend": lambda ams, mid: ams.suspend("example.org", for_=timedelta(hours=1)),
    "resume": lambda ams, mid: ams.resume("example.org"),
    "suppress": lambda ams, mid: ams.suppress("bob@example.org"),
    "unsuppress": lambda ams, mid: ams.unsuppress("bob@example.org"),
}


@pytest.mark.parametrize("write", sorted(WRITES))
async def test_a_cancelled_write_raises_once_the_write_has_ended(write: str) -> None:
    # As for send_email: the CancelledError came at once while the thread went on
    # writing (the async with exit could close the store under it).
    store = _GatedStore()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker=None)
    try:
        mid = await ams.send_email(hello("bob@example.org"))
        store.armed = True
        writing = asyncio.ensure_future(WRITES[write](ams, mid))
        assert await asyncio.to_thread(store.entered.wait, 10)
        writing.cancel()
        asyncio.get_running_loop().call_later(0.3, store.release.set)
        with pytest.raises(asyncio.CancelledError):
            await writing
        assert store.release.is_set()
    finally:
        store.release.set()
        await ams.stop()
        store.close()


async def test_stop_closes_its_store_off_the_loop_while_a_write_waits_for_the_lock(
    tmp_path: Any,
) -> None:
    """stop() closed the store it had opened on the loop: SQLite's close waits for a
    write of another task still waiting for the database's lock (up to the 30 s busy
    timeout), and the loop, held meanwhile, could not run what would end that wait. The
    write then failed as StoreLocked, its message lost to a caller told nothing else."""
    path = tmp_path / "q.db"
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=path, worker=None)
    await ams.query_recent()  # the database and its schema exist
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another program holds the write lock
    sending = asyncio.create_task(ams.send_email(hello("bob@example.org")))
    store: Any = ams.store
    # Until the send waits for the database's lock (in its thread, holding the store's).
    assert await asyncio.to_thread(eventually, store._write_lock.locked, 30)
    asyncio.get_running_loop().call_later(0.1, other.rollback)  # runs if the loop does
    try:
        await ams.stop()
        mid = await sending
    finally:
        other.close()
    reopened = SQLiteStore(path)
    try:
        assert [s.id for s in reopened.recent()] == [mid]
    finally:
        reopened.close()


class _SpyStore(MemoryStore):
    """A memory store that, once armed, notes the name of each public method called
    (when it is called: a method may be looked up on the loop and called in a thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.called: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr):
            return attr
        if not object.__getattribute__(self, "armed"):
            return attr

        def noted(*args: Any, **kwargs: Any) -> Any:
            self.called.append(name)
            return attr(*args, **kwargs)

        return noted


@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_write_cancelled_while_it_waits_for_a_thread_is_not_made(write: str) -> None:
    # Every thread of the loop's executor busy (the application's own blocking calls),
    # a cancelled write (a timeout around it) waited for a thread to come free, and was
    # then made all the same: the caller, told it was cancelled, found it done. It now
    # raises at once, and the write never reaches the store.
    store = _SpyStore()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker=None)
    busy = threading.Event()

    async def cancel_while_the_executor_is_busy() -> bool:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        mid = await ams.send_email(hello("bob@example.org"))
        occupied = loop.run_in_executor(None, busy.wait, 30)
        store.armed = True
        writing = asyncio.ensure_future(WRITES[write](ams, mid))
        await asyncio.sleep(0)  # it waits for the executor's thread
        writing.cancel()
        try:
            ended, _ = await asyncio.wait({writing}, timeout=10)  # (bounds the old wait)
        finally:
            busy.set()
        await occupied
        with pytest.raises(asyncio.CancelledError):
            await writing
        return bool(ended)

    try:
        at_once = asyncio.run(cancel_while_the_executor_is_busy())  # waits for its threads
        assert store.called == []
        assert at_once
    finally:
        busy.set()
        store.close()

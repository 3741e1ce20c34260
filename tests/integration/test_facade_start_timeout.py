"""``start(timeout=...)`` on both facades: code written for one runs on the other, and a
worker slow to come up is given up on after the same bound, the same way."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest

from mailstrom import AsyncMailstrom, Config, Email, Mailstrom, RecipientState
from mailstrom.errors import InvalidArgument, WorkerError
from mailstrom.runtime.worker import Worker
from mailstrom.stores import MemoryStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import loopback_config


def hello(to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject="Hi", text="Hello")


@pytest.fixture
def mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> Any:
    server = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


class _SlowToStart(MemoryStore):
    """A store whose first look as the worker starts waits for ``release`` (in a thread,
    as PostgreSQL's calls go: the event loop runs on meanwhile)."""

    in_process = False

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def last_event_id(self) -> int:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(30)
        return super().last_event_id()


async def _call(result: Any) -> Any:
    return await result if asyncio.iscoroutine(result) else result


def _facade(kind: str, config: Config, store: Any) -> Mailstrom | AsyncMailstrom:
    """The sync facade with a worker thread, or the async one with a worker task."""
    if kind == "sync":
        return Mailstrom(config, store=store, worker="thread")
    return AsyncMailstrom(config, store=store, worker="task")


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_worker_slow_to_come_up_misses_starts_timeout_on_both_facades(
    mx: Any, dns_server: LoopbackDNS, kind: str
) -> None:
    """AsyncMailstrom.start() took no timeout: ``start(timeout=0.2)``, as written for
    Mailstrom, raised TypeError, and a worker task slow to come up was waited for without
    a bound. Both now raise WorkerError past the bound, the worker does not come up behind
    it, and the next start() delivers."""
    store = _SlowToStart()
    config: Config = loopback_config(dns_server, mx.port)
    ms = _facade(kind, config, store)
    try:
        with pytest.raises(WorkerError, match=r"did not start within 0\.2 s"):
            await _call(ms.start(timeout=0.2))
        store.release.set()
        started = False
        for _ in range(1000):  # generous: only a hang fails
            if not ms.worker_status.running:
                # WorkerError while the worker given up on is still ending.
                with contextlib.suppress(WorkerError):
                    await _call(ms.start(timeout=30))
                    started = True
            if started:
                break
            await asyncio.sleep(0.01)
        assert started, "the worker given up on never ended"
        mid = await _call(ms.send_email(hello("bob@example.org")))
        status = await _call(ms.wait(mid, timeout=30))
        assert status.state is RecipientState.DELIVERED
    finally:
        store.release.set()
        await _call(ms.stop())
    store.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_start_refuses_a_timeout_it_cannot_wait_on_both_facades(kind: str) -> None:
    ms = _facade(kind, Config(helo_name="mail.example.com"), "memory:")
    try:
        for bad in ("5", float("inf"), None):
            with pytest.raises(InvalidArgument, match="timeout"):
                await _call(ms.start(timeout=bad))  # type: ignore[arg-type]
        assert not ms.worker_status.running
    finally:
        await _call(ms.stop())


async def test_an_async_worker_process_takes_starts_timeout(tmp_path: Path) -> None:
    """The bound reaches the process's start: a millisecond is shorter than any child
    takes to answer (an interpreter to start, mailstrom to import), where the default
    30 s would have let it come up."""
    ms = AsyncMailstrom(
        Config(helo_name="mail.example.com"), store=tmp_path / "q.db", worker="process"
    )
    try:
        with pytest.raises(WorkerError, match=r"no answer within 0\.001 s"):
            await ms.start(timeout=0.001)
        assert not ms.worker_status.running
        await ms.start(timeout=60)
        assert ms.worker_status.running
    finally:
        await ms.stop()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_worker_given_up_at_start_reads_as_stopped_not_dead_on_both_facades(
    mx: Any, dns_server: LoopbackDNS, kind: str
) -> None:
    """A worker that missed start()'s bound ends without an error on a thread (it is
    asked to stop); a worker task was cancelled without being asked, and its
    ``worker_status.error`` read "CancelledError: " for good, as a worker that died."""
    store = _SlowToStart()
    config: Config = loopback_config(dns_server, mx.port)
    ms = _facade(kind, config, store)
    worker = ms.worker
    assert isinstance(worker, Worker)
    try:
        with pytest.raises(WorkerError, match="did not start within"):
            await _call(ms.start(timeout=0.2))
        store.release.set()
        assert await asyncio.to_thread(worker.wait_stopped, 30)
        for _ in range(1000):  # the task (or thread) ends just after its worker
            if not ms.worker_status.running:
                break
            await asyncio.sleep(0.01)
        status = ms.worker_status
        assert (status.running, status.error) == (False, None)
    finally:
        store.release.set()
        await _call(ms.stop())
    store.close()


async def test_an_async_start_cancelled_leaves_a_worker_that_reads_as_stopped(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    """The same for a start() cancelled (a timeout around it) before its worker came up."""
    store = _SlowToStart()
    ms = AsyncMailstrom(loopback_config(dns_server, mx.port), store=store, worker="task")
    worker = ms.worker
    assert isinstance(worker, Worker)
    try:
        starting = asyncio.create_task(ms.start())
        assert await asyncio.to_thread(store.entered.wait, 10)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        store.release.set()
        assert await asyncio.to_thread(worker.wait_stopped, 30)
        assert ms.worker_status.error is None
    finally:
        store.release.set()
        await ms.stop()
    store.close()

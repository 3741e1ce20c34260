"""A facade in a process forked from the application: the parent's worker thread (or the
thread running the loop of its worker task) does not exist there, and the fork may start
its own (see Mailstrom._after_fork and AsyncMailstrom._after_fork)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mailstrom import AsyncMailstrom, Email, Mailstrom, RecipientState
from mailstrom.errors import StoreError, WorkerError
from mailstrom.stores import MemoryStore, SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import loopback_config
from tests.support.forking import in_fork


def test_a_fork_of_an_application_with_a_worker_thread_can_start_its_own(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The parent's worker thread does not exist in the fork: its status said running
    while nothing there delivered, and start() said "already started"."""
    server = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    config = loopback_config(dns_server, server.port)
    with Mailstrom(config, store=SQLiteStore(tmp_path / "q.db"), worker="thread") as ms:

        def child() -> str:
            before = ms.worker_status.running
            ms.start()
            mid = ms.send_email(
                Email(from_="app@sender.test", to=["u@example.org"], subject="s", text="hi")
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if ms.query_status(mid).state is RecipientState.DELIVERED:
                    break
                time.sleep(0.02)
            running = ms.worker_status.running
            ms.stop()
            return f"{before} {ms.query_status(mid).state.name} {running}"

        assert in_fork(child) == "False DELIVERED True"
        assert ms.worker_status.running  # the parent's, untouched


def test_a_fork_does_not_deliver_its_copy_of_a_queue_in_memory(
    dns_server: LoopbackDNS,
) -> None:
    config = loopback_config(dns_server, 9)
    with Mailstrom(config, store=MemoryStore(), worker="thread") as ms:

        def child() -> str:
            running = ms.worker_status.running
            try:
                ms.start()
            except WorkerError as exc:
                return f"{running} {exc}"
            return f"{running} started"

        said = in_fork(child)
        assert said.startswith("False this process was forked"), said


@contextmanager
def loop_in_a_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop another thread runs (as an application's background loop does)."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join()
        loop.close()


def on(loop: asyncio.AbstractEventLoop, step: Coroutine[Any, Any, None]) -> None:
    asyncio.run_coroutine_threadsafe(step, loop).result(timeout=60)


def test_a_fork_of_an_application_with_a_worker_task_on_another_thread_can_start_its_own(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The loop running the parent's worker task runs in a thread that does not exist in
    the fork: its status said running while nothing there delivered, start() said
    "already started", and stop() waited for a task that never runs again."""
    server = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    config = loopback_config(dns_server, server.port)
    store = SQLiteStore(tmp_path / "q.db")
    ams = AsyncMailstrom(config, store=store, worker="task")
    with loop_in_a_thread() as loop:
        on(loop, ams.start())
        try:

            async def deliver_here() -> str:
                before = ams.worker_status.running
                await ams.start()
                mid = await ams.send_email(
                    Email(from_="app@sender.test", to=["u@example.org"], subject="s", text="hi")
                )
                status = await ams.wait(mid, timeout=20)
                running = ams.worker_status.running
                await asyncio.wait_for(ams.stop(), 30)
                return f"{before} {status.state.name} {running}"

            assert in_fork(lambda: asyncio.run(deliver_here())) == "False DELIVERED True"
            assert ams.worker_status.running  # the parent's, untouched
        finally:
            on(loop, ams.stop())
    store.close()


def test_a_fork_does_not_deliver_its_copy_of_a_queue_in_memory_from_a_worker_task(
    dns_server: LoopbackDNS,
) -> None:
    ams = AsyncMailstrom(loopback_config(dns_server, 9), store=MemoryStore(), worker="task")
    with loop_in_a_thread() as loop:
        on(loop, ams.start())
        try:

            async def start_here() -> str:
                running = ams.worker_status.running
                try:
                    await ams.start()
                except WorkerError as exc:
                    return f"{running} {exc}"
                return f"{running} started"

            said = in_fork(lambda: asyncio.run(start_here()))
            assert said.startswith("False this process was forked"), said
        finally:
            on(loop, ams.stop())


def _hello() -> Email:
    return Email(from_="app@sender.test", to=["u@example.org"], subject="s", text="hi")


def test_a_fork_refuses_new_mail_for_its_copy_of_a_queue_in_memory(
    dns_server: LoopbackDNS,
) -> None:
    """The fork's copy of the queue is delivered by no worker (the parent's does not see
    it, and the fork may start none): send_email returned an id for mail that stayed
    queued for good, its caller told nothing."""
    config = loopback_config(dns_server, 9)
    with Mailstrom(config, store=MemoryStore(), worker="thread") as ms:

        def child() -> str:
            said = []
            for send in (lambda: ms.send_email(_hello()), lambda: ms.send_emails([_hello()])):
                try:
                    said.append(f"queued {send()}")
                except StoreError as exc:
                    said.append(str(exc))
            return " / ".join(said)

        said = in_fork(child)
        assert said.count("this process was forked") == 2, said
        assert ms.query_recent() == []


def test_a_fork_refuses_new_mail_for_its_copy_of_a_queue_in_memory_of_a_worker_task(
    dns_server: LoopbackDNS,
) -> None:
    ams = AsyncMailstrom(loopback_config(dns_server, 9), store=MemoryStore(), worker="task")
    with loop_in_a_thread() as loop:
        on(loop, ams.start())
        try:

            async def send_here() -> str:
                try:
                    return f"queued {await ams.send_email(_hello())}"
                except StoreError as exc:
                    return str(exc)

            said = in_fork(lambda: asyncio.run(send_here()))
            assert said.startswith("this process was forked"), said
        finally:
            on(loop, ams.stop())


def test_a_fork_from_a_loop_can_start_while_a_start_on_another_thread_held_the_lock(
    dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Forked from a thread running an event loop, while a start() on a loop of another
    thread holds the lock that start() and stop() share: that thread, and its loop, do
    not exist in the fork, whose own start() and stop() must not wait for its turn (nor
    hand one to a waiter of a loop that is not there)."""
    entered, release = threading.Event(), threading.Event()

    class SlowToStart(SQLiteStore):
        in_process = False  # its calls in a thread, as PostgreSQL's: the loop runs on

        def last_event_id(self) -> int:
            if not entered.is_set():
                entered.set()
                release.wait(30)  # a store slow to answer as the worker starts
            return super().last_event_id()

    store = SlowToStart(tmp_path / "q.db")
    ams = AsyncMailstrom(loopback_config(dns_server, 9), store=store, worker="task")

    async def start_and_stop() -> str:
        async with asyncio.timeout(20):  # (only a hang outlasts it)
            await ams.start()
            running = ams.worker_status.running
            await ams.stop()
        return f"running {running}"

    def in_a_thread_of_the_fork() -> str:
        said: list[str] = []

        def run() -> None:
            try:
                said.append(asyncio.run(start_and_stop()))
            except BaseException as exc:
                said.append(f"{type(exc).__name__}: {exc}")

        runner = threading.Thread(target=run)
        runner.start()
        runner.join(60)
        return said[0] if said else "hung"

    async def fork_here() -> str:  # from the thread running this loop
        return in_fork(in_a_thread_of_the_fork)

    with loop_in_a_thread() as loop:
        starting = asyncio.run_coroutine_threadsafe(ams.start(), loop)
        try:
            assert entered.wait(10)
            assert asyncio.run(fork_here()) == "running True"
        finally:
            release.set()
            starting.result(timeout=60)
            on(loop, ams.stop())
    store.close()

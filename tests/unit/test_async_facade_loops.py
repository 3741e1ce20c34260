"""``AsyncMailstrom`` used from one event loop after another (``asyncio.run`` per step, a
test framework's loop per test): the loop that ran the worker task cancels it as it
closes, and the next loop stops and starts the facade. Or from two loops at once, each
run by a thread of its own."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path

import pytest

from mailstrom import AsyncMailstrom, Config, Email
from mailstrom.client.aio_loops import at_thread_end, in_thread, over, stranded
from mailstrom.errors import WorkerError
from mailstrom.runtime.worker import Worker
from mailstrom.stores import MemoryStore


def test_stop_on_another_loop_after_the_workers_loop_closed() -> None:
    store = MemoryStore()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker="task")
    try:
        asyncio.run(ams.start())  # the loop closes, cancelling the worker task
        # Waiting on that task from this loop raised ValueError ("The future belongs to
        # a different loop"): stop() must see that it has ended.
        asyncio.run(ams.stop())

        async def send_again() -> str:
            async with ams:
                return await ams.send_email(
                    Email(from_="app@example.com", to=["bob@example.org"], text="x")
                )

        message_id = asyncio.run(send_again())
        assert [s.id for s in store.recent(10)] == [message_id]
    finally:
        store.close()


def test_start_on_another_loop_after_the_workers_loop_closed() -> None:
    # Without a stop() in between: the worker task the closed loop cancelled is no
    # running worker, and `async with` on the next loop must not say "already started".
    store = MemoryStore()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker="task")
    try:
        asyncio.run(ams.start())

        async def send_again() -> str:
            async with ams:
                return await ams.send_email(
                    Email(from_="app@example.com", to=["bob@example.org"], text="x")
                )

        message_id = asyncio.run(send_again())
        assert [s.id for s in store.recent(10)] == [message_id]
    finally:
        store.close()


def test_stop_on_another_loop_while_the_workers_loop_runs_in_another_thread() -> None:
    # The worker task lives on a loop another thread runs; stop() comes from this one.
    # Waiting on that task raised ValueError ("belongs to a different loop") after the
    # worker had been asked to stop, and the facade closed its store under it.
    other = asyncio.new_event_loop()
    runner = threading.Thread(target=other.run_forever, daemon=True)
    runner.start()
    store = MemoryStore()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker="task")
    try:
        asyncio.run_coroutine_threadsafe(ams.start(), other).result(timeout=30)
        worker = ams.worker
        assert isinstance(worker, Worker) and ams.worker_status.running
        asyncio.run(ams.stop())
        assert worker.wait_stopped(0)  # ended by the time stop() returned
        assert not ams.worker_status.running

        async def send_again() -> str:  # and this loop can run the next worker
            async with ams:
                assert ams.worker_status.running
                return await ams.send_email(
                    Email(from_="app@example.com", to=["bob@example.org"], text="x")
                )

        message_id = asyncio.run(send_again())
        assert [s.id for s in store.recent(10)] == [message_id]
    finally:
        other.call_soon_threadsafe(other.stop)
        runner.join()
        other.close()
        store.close()


def test_stop_on_another_loop_while_the_workers_loop_does_not_run_stops_nothing(
    tmp_path: Path,
) -> None:
    # The worker task's loop is alive but idle (run_until_complete() runs it at times):
    # nothing can end the task before its owner runs that loop again. stop() from
    # another loop raised ValueError and closed the store under the task; then it
    # waited its whole bound (STOP_GRACE past the timeout) for nothing.
    other = asyncio.new_event_loop()
    ams = AsyncMailstrom(
        Config(helo_name="mail.example.com"), store=tmp_path / "q.db", worker="task"
    )
    try:
        other.run_until_complete(ams.start())
        with pytest.raises(WorkerError, match="another event loop, which is not running"):
            asyncio.run(ams.stop(timeout=0))
        assert ams.store.recent() == []  # still open for the worker
        other.run_until_complete(ams.stop())  # on its own loop it stops
        assert isinstance(ams.worker, Worker) and ams.worker.wait_stopped(0)
    finally:
        other.close()


def test_start_and_stop_at_once_on_a_loop_after_another_loop_had_them_at_once() -> None:
    # The lock that keeps start() and stop() one at a time was an asyncio.Lock, bound to
    # the first loop on which two of them met: on the next loop (asyncio.run per step)
    # the second of two raised RuntimeError ("bound to a different event loop").
    store = MemoryStore()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker="task")

    async def start_and_stop() -> list[object]:
        outcomes = await asyncio.gather(ams.start(), ams.stop(), return_exceptions=True)
        await ams.stop()
        return outcomes

    try:
        for _ in range(2):
            assert asyncio.run(start_and_stop()) == [None, None]
            assert isinstance(ams.worker, Worker) and ams.worker.wait_stopped(0)
    finally:
        store.close()


def test_stops_on_two_loops_in_two_threads_at_once_each_return() -> None:
    # One stop() per loop, each loop run by a thread of its own, while the worker task
    # runs on a third: each returns once the worker has ended, neither raising.
    loops = [asyncio.new_event_loop() for _ in range(3)]
    runners = [threading.Thread(target=loop.run_forever, daemon=True) for loop in loops]
    for runner in runners:
        runner.start()
    store = MemoryStore()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker="task")
    try:
        asyncio.run_coroutine_threadsafe(ams.start(), loops[0]).result(timeout=30)
        worker = ams.worker
        assert isinstance(worker, Worker)
        for _ in range(20):
            stops = [asyncio.run_coroutine_threadsafe(ams.stop(), loop) for loop in loops[1:]]
            assert [s.result(timeout=60) for s in stops] == [None, None]
            assert worker.wait_stopped(0)
            asyncio.run_coroutine_threadsafe(ams.start(), loops[0]).result(timeout=30)
            worker = ams.worker
            assert isinstance(worker, Worker)
    finally:
        for loop in loops:
            asyncio.run_coroutine_threadsafe(ams.stop(), loop).result(timeout=60)
            loop.call_soon_threadsafe(loop.stop)
        for runner in runners:
            runner.join()
        for loop in loops:
            loop.close()
        store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_worker_task_whose_loop_was_closed_without_cancelling_it_is_not_running() -> None:
    # loop.run_until_complete(...) then loop.close(), as sync code driving the facade
    # does: unlike asyncio.run, close() cancels no task, and the worker task stays
    # pending on a loop that will never run it. worker_status said running (no error),
    # and start() on the next loop said "already started", for good: nothing delivered.
    _start_on_a_loop_then_close_it_and_send_on_another()
    gc.collect()  # the stranded task's coroutine ends here (its loop is closed), not later


def _start_on_a_loop_then_close_it_and_send_on_another() -> None:
    store = MemoryStore()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker="task")
    try:
        _on_a_closed_loop_then_another(ams, store)
    finally:
        store.close()


def _on_a_closed_loop_then_another(ams: AsyncMailstrom, store: MemoryStore) -> None:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(ams.start())
    loop.close()
    status = ams.worker_status
    assert not status.running and status.dead
    assert "closed" in (status.error or "")

    async def send_again() -> tuple[str, bool]:
        async with ams:
            message_id = await ams.send_email(
                Email(from_="app@example.com", to=["bob@example.org"], text="x")
            )
            return message_id, ams.worker_status.running

    message_id, running = asyncio.run(send_again())
    assert running
    assert [s.id for s in store.recent(10)] == [message_id]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_start_cancelled_on_a_loop_then_closed_does_not_refuse_every_later_start() -> None:
    # start() cancelled while its worker task waits for the store (a timeout around it),
    # then loop.close(): the task, cancelled, never ran again to end. Every start() on
    # a later loop, and after a stop() too, said the worker "has not ended yet".
    _cancel_a_start_then_close_its_loop_and_start_on_another()
    gc.collect()  # as above: the stranded task's coroutine ends here


def _cancel_a_start_then_close_its_loop_and_start_on_another() -> None:
    entered, release = threading.Event(), threading.Event()

    class SlowToStart(MemoryStore):
        in_process = False  # its calls in a thread, as PostgreSQL's: the loop runs on

        def last_event_id(self) -> int:
            if not entered.is_set():
                entered.set()
                release.wait(30)  # a store slow to answer as the worker starts
            return super().last_event_id()

    store = SlowToStart()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker="task")

    async def cancelled_start() -> None:
        starting = asyncio.create_task(ams.start())
        assert await asyncio.to_thread(entered.wait, 10)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(cancelled_start())
    finally:
        release.set()
        loop.close()

    async def start_stop_start() -> bool:
        await ams.stop()
        async with ams:
            return ams.worker_status.running

    try:
        assert asyncio.run(start_stop_start())
    finally:
        store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_a_start_left_on_a_closed_loop_does_not_hold_every_later_stop() -> None:
    # A loop run by a thread of its own, stopped and closed while a start() on it was
    # still under way (a shutdown that gave up waiting for it): that start() never
    # ended its turn at the lock start() and stop() share, and stop() on any other loop
    # waited for it for ever.
    _leave_a_start_on_a_closed_loop_then_stop_on_another()
    gc.collect()  # as above: the stranded coroutines end here


def _leave_a_start_on_a_closed_loop_then_stop_on_another() -> None:
    entered, release = threading.Event(), threading.Event()

    class SlowToStart(MemoryStore):
        in_process = False  # its calls in a thread, as PostgreSQL's: the loop runs on

        def last_event_id(self) -> int:
            if not entered.is_set():
                entered.set()
                release.wait(30)  # a store slow to answer as the worker starts
            return super().last_event_id()

    store = SlowToStart()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker="task")
    other = asyncio.new_event_loop()
    runner = threading.Thread(target=other.run_forever, daemon=True)
    runner.start()
    try:
        asyncio.run_coroutine_threadsafe(ams.start(), other)
        assert entered.wait(10)
    finally:
        other.call_soon_threadsafe(other.stop)
        runner.join()
        release.set()
        other.close()

    async def stop_then_start() -> bool:
        await asyncio.wait_for(ams.stop(), 30)  # (only a hang outlasts it)
        async with ams:
            return ams.worker_status.running

    try:
        assert asyncio.run(stop_then_start())
    finally:
        store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_worker_task_left_on_a_closed_loop_still_reads_as_ended_after_stop() -> None:
    # stop() let go of the task, and the status was the worker's own again: running,
    # as its end, which would have said otherwise, never ran.
    _stop_a_worker_task_left_on_a_closed_loop()
    gc.collect()  # as above: the stranded task's coroutine ends here


def _stop_a_worker_task_left_on_a_closed_loop() -> None:
    store = MemoryStore()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker="task")
    try:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(ams.start())
        loop.close()
        asyncio.run(ams.stop())
        assert not ams.worker_status.running
        assert not asyncio.run(ams.metrics()).worker.running
    finally:
        store.close()


def test_a_thread_reads_as_over_only_once_what_was_to_run_at_its_end_has_run() -> None:
    # The end of a thread of in_thread() was said before the calls asked for at that end
    # ran (the release of the store a cancelled stop() left among them): a start() in
    # between saw the thread over, the store still open, started a worker, and had the
    # store closed under it.
    seen: list[tuple[bool, bool]] = []

    async def main() -> None:
        go = threading.Event()
        future = in_thread(go.wait, 30)
        later = in_thread(go.wait, 30)
        at_thread_end(future, lambda: seen.append((over(future), stranded(future))))
        at_thread_end(later, lambda: seen.append((over(later), stranded(later))))
        go.set()
        await asyncio.gather(future, later)
        assert over(future) and over(later)

    asyncio.run(main())
    assert seen == [(False, False), (False, False)]


def test_a_worker_task_cancelled_alone_does_not_wait_for_loops_nobody_cancelled() -> None:
    # Only the worker's task is cancelled (not asyncio.run()'s sweep of every task): its
    # heartbeat and store loop, which nobody cancelled, never end. Waited for as if the
    # same sweep had cut them, they held the task's end for the whole drain bound (30 s).
    store = MemoryStore()
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker="task")

    async def main() -> None:
        await ams.start()
        task = ams._task
        assert task is not None
        task.cancel()
        await asyncio.wait({task}, timeout=20)  # generous: it catches the 30 s hold only
        assert task.done()
        await ams.stop()

    try:
        asyncio.run(main())
    finally:
        store.close()

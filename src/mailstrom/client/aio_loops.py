"""Event loops as the asyncio facade meets them: several at once (each run by a thread of
its own), one after another (``asyncio.run`` per step), and closed with work left on
them. What :class:`~mailstrom.client.aio.AsyncMailstrom` needs to wait for, cancel or
take turns with a task of whatever loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any


def followed_here(task: asyncio.Future[None]) -> asyncio.Future[None]:
    """``task``, or when it belongs to another event loop (run by another thread) a
    future of the running loop that ends (with None) as it ends: awaiting a task of
    another loop raised ValueError ("belongs to a different loop"). The task's error is
    logged where it ends (``_log_death`` in :mod:`mailstrom.client.aio`)."""
    here = asyncio.get_running_loop()
    there = task.get_loop()
    if there is here:
        return task
    follower: asyncio.Future[None] = here.create_future()

    def tell(*_: object) -> None:  # on the task's loop, or the thread's
        with contextlib.suppress(RuntimeError):  # this loop closed meanwhile
            here.call_soon_threadsafe(_end, follower)

    thread = _THREAD_ENDS.get(task)
    if thread is not None:
        # Followed to its thread's end, not through its loop: once that loop is closed
        # (loop.close() after a stop() it cancelled) the thread goes on, a worker
        # process's stop with it, and its future never ends. Taken for ended then, the
        # next stop() returned at once and closed the store under the draining child.
        thread.call_at_end(tell)
        return follower
    try:
        there.call_soon_threadsafe(task.add_done_callback, tell)
    except RuntimeError:  # its loop is closed: nothing runs the task any more
        follower.set_result(None)
    return follower


def _end(follower: asyncio.Future[None]) -> None:
    if not follower.done():
        follower.set_result(None)


def idle_elsewhere(task: asyncio.Future[None]) -> bool:
    """Whether ``task`` (not done) is of another event loop that does not run now and is
    not closed: nothing it was asked can happen before its owner runs it again, and a
    stop() from here waited its whole bound for that."""
    loop = task.get_loop()
    return (
        not task.done()
        and loop is not running_loop()
        and not loop.is_running()
        and not loop.is_closed()
    )


def stranded(task: asyncio.Future[None]) -> bool:
    """Whether ``task`` is left pending on a loop that was closed, and will never end:
    ``loop.close()`` (after ``run_until_complete``; unlike ``asyncio.run``) cancels no
    task, nor ends one cancelled already, and one left so never runs again, and delivers
    nothing. A future of :func:`in_thread` is so once its thread has ended (a worker
    process's stop, which goes on without the loop): asyncio drops the outcome of a
    thread whose loop was closed, and the future stayed pending for good."""
    if task.done() or not task.get_loop().is_closed():
        return False
    if isinstance(task, asyncio.Task):
        return True
    thread = _THREAD_ENDS.get(task)
    return thread is not None and thread.ended()


def over(task: asyncio.Future[None] | None) -> bool:
    """Whether ``task`` (None included) has ended, or never will (:func:`stranded`): a
    future of :func:`in_thread` once its thread has, as asyncio tells its end only when
    its loop runs (a loop left idle, ``run_until_complete`` per step, may not for long)."""
    if task is None or task.done() or stranded(task):
        return True
    thread = _THREAD_ENDS.get(task)
    return thread is not None and thread.ended()


def in_thread(func: Callable[..., None], /, *args: Any) -> asyncio.Future[None]:
    """``func(*args)`` in the running loop's executor (``run_in_executor``), a future
    whose end :func:`stranded` and :func:`followed_here` know of even once that loop is
    closed."""
    thread = _ThreadEnd()

    def run() -> None:
        try:
            func(*args)
        finally:
            thread.end()

    future = asyncio.get_running_loop().run_in_executor(None, run)
    _THREAD_ENDS[future] = thread
    return future


def at_thread_end(future: asyncio.Future[None], call: Callable[[], None]) -> bool:
    """``call()`` on the thread of ``future`` (one of :func:`in_thread`) as it ends,
    whatever became of its loop meanwhile; nothing for another future. False, and
    nothing called, when that thread has ended already: the caller may be an event
    loop's thread, which ``call()`` is not to hold."""
    thread = _THREAD_ENDS.get(future)
    return thread is None or thread.call_at_end(call, at_once=False)


class _ThreadEnd:
    """The end of a thread of :func:`in_thread`, told to whoever asked: on that thread
    as it ends, or on the asker's own once it has ended (see :meth:`call_at_end`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended = False
        self._calls: list[Callable[[], None]] = []

    def ended(self) -> bool:
        return self._ended

    def end(self) -> None:
        """Run the calls asked for, then (and only then) say ended: said before them, a
        start() in between saw the thread over while the store a cancelled stop() left
        was still to close, started a worker, and had the store closed under it. Calls
        asked for meanwhile run here too (they raise nothing)."""
        while True:
            with self._lock:
                calls, self._calls = self._calls, []
                self._ended = not calls
            if not calls:
                return
            for call in calls:
                call()

    def call_at_end(self, call: Callable[[], None], *, at_once: bool = True) -> bool:
        """``call()`` on the thread as it ends; True. Once it has ended: ``call()`` at
        once here (False) or, unless ``at_once``, nothing (False)."""
        with self._lock:
            if not self._ended:
                self._calls.append(call)
                return True
        if at_once:
            call()
        return False


_THREAD_ENDS: weakref.WeakKeyDictionary[asyncio.Future[None], _ThreadEnd] = (
    weakref.WeakKeyDictionary()
)
"""The thread of each future of :func:`in_thread`."""


def runs(task: asyncio.Future[None] | None) -> bool:
    """Whether ``task`` (the worker's) may still run: neither done nor stranded."""
    return task is not None and not task.done() and not stranded(task)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def cancel_on_its_loop(task: asyncio.Future[None]) -> None:
    """Cancel ``task`` from whatever loop runs here (thread-safe for another loop's)."""
    there = task.get_loop()
    if there is asyncio.get_running_loop():
        task.cancel()
        return
    with contextlib.suppress(RuntimeError):  # its loop is closed: it runs no more
        there.call_soon_threadsafe(task.cancel)


def call_when_done(
    future: asyncio.Future[None], callback: Callable[[asyncio.Future[None]], None]
) -> None:
    """``future.add_done_callback(callback)`` from whatever loop runs here (thread-safe
    for another loop's): ``callback`` runs on the future's own loop; never once that
    loop is closed."""
    there = future.get_loop()
    if there is running_loop():
        future.add_done_callback(callback)
        return
    with contextlib.suppress(RuntimeError):  # its loop is closed: it ends no more
        there.call_soon_threadsafe(future.add_done_callback, callback)


STRANDED_LOOK = 1.0
"""Seconds between a waiter's looks at whether the start() or stop() it waits for was
left on a loop that was closed (nothing can tell it when another loop closes)."""


class LoopsLock:
    """An asyncio lock for any event loop, and several at once (each run by a thread of
    its own): :meth:`~mailstrom.AsyncMailstrom.start` and ``stop()`` one at a time.

    An :class:`asyncio.Lock` is bound to the first loop on which two callers meet: on
    the next loop (``asyncio.run`` per step, a test framework's loop per test) or on a
    loop of another thread, the second of two raised RuntimeError ("bound to a different
    event loop"). Here each waiter waits on a future of its own loop; the lock is handed
    to the first in line (thread-safe), and a waiter cancelled once it was handed the
    lock passes it on.

    Each turn (:meth:`turn`) is its own holder. A holder left on a loop that was closed
    (``loop.close()`` with the start() or stop() still under way: a shutdown that gave up
    waiting for it) never ends its turn: every later start() and stop(), on any loop,
    waited for ever. Its turn is passed on then, once the thread it waited for (a worker
    process's start or stop, :meth:`Turn.in_thread`) has ended, and its own end, should
    its coroutine be closed later (collected), releases nothing it no longer holds."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._holder: Turn | None = None
        self._waiters: deque[tuple[Turn, asyncio.Future[None]]] = deque()

    def turn(self) -> Turn:
        """A turn to take with ``async with``."""
        return Turn(self)

    async def acquire(self, turn: Turn) -> None:
        with self._guard:
            self._pass_on_stranded()
            if self._holder is None:
                self._holder = turn
                return
            waiter: asyncio.Future[None] = turn.loop.create_future()
            self._waiters.append((turn, waiter))
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=STRANDED_LOOK)
                with self._guard:
                    self._pass_on_stranded()
        except asyncio.CancelledError:
            with self._guard:
                if (turn, waiter) in self._waiters:
                    self._waiters.remove((turn, waiter))
                    raise
            self.release(turn)  # handed over as it was cancelled: the next one's turn
            raise

    def release(self, turn: Turn) -> None:
        with self._guard:
            if self._holder is turn:
                self._hand_on()

    def _pass_on_stranded(self) -> None:
        """Pass the lock on if its holder's loop was closed and nothing it started goes
        on in a thread (``_guard`` held)."""
        holder = self._holder
        if holder is not None and holder.loop.is_closed() and not holder.in_a_thread():
            self._hand_on()

    def _hand_on(self) -> None:
        """Hand the lock to the first waiter whose loop still runs (``_guard`` held)."""
        while self._waiters:
            turn, waiter = self._waiters.popleft()
            try:
                turn.loop.call_soon_threadsafe(_end, waiter)
            except RuntimeError:  # its loop is closed: nothing awaits it any more
                continue
            self._holder = turn  # still held: by that waiter now
            return
        self._holder = None


class Turn:
    """One start()'s or stop()'s turn at a :class:`LoopsLock`, on the running loop."""

    def __init__(self, lock: LoopsLock) -> None:
        self._lock = lock
        self.loop = asyncio.get_running_loop()
        self._threads: list[asyncio.Future[None]] = []

    async def __aenter__(self) -> Turn:
        await self._lock.acquire(self)
        return self

    def in_thread(self, func: Callable[..., None], /, *args: Any) -> asyncio.Future[None]:
        """:func:`in_thread`, which this turn holds the lock for even once its loop is
        closed: handed on meanwhile, the next stop() went on beside a worker process's
        stop still under way, and start() said "already started" of the child it was
        ending (nothing delivered once it had)."""
        future = in_thread(func, *args)
        self._threads.append(future)
        return future

    def in_a_thread(self) -> bool:
        """Whether a thread of :meth:`in_thread` goes on (its future pending, and not
        :func:`stranded`)."""
        return any(not f.done() and not stranded(f) for f in self._threads)

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release(self)

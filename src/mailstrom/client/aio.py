"""The asyncio facade: the same API as :class:`~mailstrom.Mailstrom`, awaited."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import TypeVar

from mailstrom.arguments import check_limit, check_timeout
from mailstrom.client.aio_loops import (
    LoopsLock,
    Turn,
    at_thread_end,
    call_when_done,
    cancel_on_its_loop,
    followed_here,
    idle_elsewhere,
    in_thread,
    over,
    runs,
    stranded,
)
from mailstrom.client.common import (
    AlreadyStarted,
    AsyncWorkerMode,
    FacadeBase,
    MessageInput,
    StoreArgument,
    batch_of,
    stop_timeout,
    suppression_entry,
)
from mailstrom.client.operations import (
    AsyncQueueOperations,
    WriteStart,
    checked_filter,
    checked_page,
    finish_in_thread,
    resolve,
    write_in_thread,
    write_unless_cancelled,
)
from mailstrom.client.process import ORPHAN_DRAIN, STOP_GRACE, WorkerProcess
from mailstrom.config import Config
from mailstrom.errors import WorkerError
from mailstrom.message.dsn import DSN
from mailstrom.routing import Router
from mailstrom.runtime.worker import Worker, utc_now
from mailstrom.status import DestinationThrottle, MessageStatus, MetricsSnapshot, WorkerStatus
from mailstrom.stores.base import QueueFilter, RecipientResult
from mailstrom.suppression import Suppression, SuppressionSource, stored_forms

log = logging.getLogger("mailstrom")

_T = TypeVar("_T")


def _log_death(ready: asyncio.Event, task: asyncio.Future[None]) -> None:
    """Log the error a worker task that had started ended on, as a worker thread's is
    logged: its death was heard of only from worker_status, or from asyncio's "Task
    exception was never retrieved" once the facade was collected. (One that fails to
    start is start()'s to raise.)"""
    error = None if task.cancelled() else task.exception()
    if error is not None and ready.is_set():
        log.error("mailstrom worker died", exc_info=error)


class _UndoableStart:
    """A worker process's start, in a thread, that stops the process again once up when
    its start() was given up (cancelled) meanwhile: it is not left delivering behind a
    start() that never returned, the next start() saying "already started"."""

    def __init__(self, worker: WorkerProcess, timeout: float) -> None:
        self._worker = worker
        self._timeout = timeout
        self._lock = threading.Lock()
        self._started = False
        self._abandoned = False

    def run(self) -> None:
        try:
            self._worker.start(self._timeout)
        except WorkerError:
            if self._given_up():
                return  # nothing runs (its error is in worker_status)
            raise
        except Exception:
            if self._given_up():  # nobody awaits start() any more to hear of it
                log.exception("the worker process of a cancelled start() failed to start")
                return
            raise
        with self._lock:
            self._started = True
            undo = self._abandoned
        if undo:
            self._worker.stop(0)

    def _given_up(self) -> bool:
        with self._lock:
            return self._abandoned

    def give_up(self) -> bool:
        """The start() was cancelled: True when its process is up already (the caller
        stops it); otherwise :meth:`run` stops it once up."""
        with self._lock:
            self._abandoned = True
            return self._started


def _log_release_error(released: asyncio.Future[None]) -> None:
    """Log what closing the store after a cancelled stop() raised: nobody awaits it."""
    if not released.cancelled() and (error := released.exception()) is not None:
        log.error("the store could not be closed after a cancelled stop()", exc_info=error)


class AsyncMailstrom(FacadeBase, AsyncQueueOperations):
    """Queue mail and deliver it on the running event loop.

    >>> async with AsyncMailstrom(Config(helo_name="mail.example.com"),
    ...                           store="mail.db") as ms:  # doctest: +SKIP
    ...     mid = await ms.send_email(Email(from_="app@example.com", to=["bob@example.org"],
    ...                                     subject="Hi", text="Hello"))
    ...     status = await ms.query_status(mid)

    The store is closed by :meth:`stop` only when mailstrom opened it: from a store URL or
    a path object (``store="mail.db"``, ``store=Path("/var/lib/app/mail.db")``), or
    without one (``store=None``: the default queue, ``~/.local/state/mailstrom/queue.db``
    or, for root, ``/var/spool/mailstrom/queue.db``). A store passed in stays its
    caller's (see :class:`~mailstrom.Mailstrom`).
    """

    _task: asyncio.Task[None] | None = None
    _last_run: tuple[Worker, asyncio.Task[None]] | None = None
    """The worker last started and its task, kept past stop(): see :attr:`worker_status`."""
    _LOCAL = "task"
    _lifecycle_lock: LoopsLock | None = None
    _ending: asyncio.Future[None] | None = None
    """What a :meth:`stop` left ending: the worker's task it gave up on (cancelled), or,
    when it was cancelled itself, the task or a worker process's stop in a thread. The
    next stop() waits for it, start() refuses until it has ended, and the store this
    facade opened is closed once a cancelled stop()'s has ended, not under it."""
    _releases_after: asyncio.Future[None] | None = None
    """The :attr:`_ending` whose end closes the store this facade opened (see _stop)."""
    _stopping_now = False
    """A stop() holds the lifecycle lock: a later one tells the worker its timeout first."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        store: StoreArgument = None,
        router: Router | None = None,
        clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
        on_result: Callable[[RecipientResult], None] | None = None,
        worker: AsyncWorkerMode = "auto",
    ) -> None:
        """See :meth:`FacadeBase.__init__ <mailstrom.client.common.FacadeBase.__init__>`;
        ``worker`` is ``"auto"``, ``"process"``, ``"task"`` or None."""
        super().__init__(
            config,
            store=store,
            router=router,
            clock=clock,
            rng=rng,
            on_result=on_result,
            worker=worker,
        )

    def _after_fork(self) -> None:
        super()._after_fork()
        # No loop of the parent runs here: asyncio tells of none in a forked process (it
        # keeps the process of each running loop), even on the thread that forked. The
        # lock, perhaps held by a start() or stop() of such a loop, with waiters of
        # others, is made anew for this process's own.
        self._lifecycle_lock = None
        running = [t for t in (self._task, self._ending) if t is not None and not t.done()]
        if not running:
            return
        # The parent's loop runs in a thread that does not exist here: its worker task
        # never runs again. Its copy said running, start() said "already started", and
        # stop() waited for it in vain. As a worker thread's fork does, it lets go of it;
        # its start() starts its own on a loop of this process.
        self._task = self._ending = None
        if self._make_worker is not None:
            self.worker = self._make_worker()
            self._worker_ran = False
        # A queue in memory is the parent's copy here: a worker of ours would send it again.
        self._copied_queue = getattr(self.store, "url", None) is None

    def _lifecycle_async(self) -> Turn:
        """A turn at the lock start() and stop() hold: one at a time, on whatever loops
        they are called (made here, and again in a fork)."""
        with self._lifecycle:
            if self._lifecycle_lock is None:
                self._lifecycle_lock = LoopsLock()
            return self._lifecycle_lock.turn()

    async def start(self, timeout: float = 30.0) -> None:
        """Start delivering (in a task on the running loop, or a worker process); raise
        :class:`~mailstrom.errors.WorkerError` if the worker cannot start, or has not
        come up within ``timeout`` seconds (as :meth:`Mailstrom.start
        <mailstrom.Mailstrom.start>`; the worker is then left to end as after a cancel,
        below). After
        :meth:`stop`, or once the worker died on its own, this starts a new worker,
        unless the facade opened its store itself (``stop()`` closed it): WorkerError
        then. Cancelled (a timeout around it), it leaves no worker running: a task it
        started is cancelled, a process it was starting is stopped once up; until that
        has ended (or its loop was closed) the next start() raises WorkerError, and
        stop() waits for it."""
        # Without it, code written for Mailstrom (``start(timeout=10)``) failed with a
        # TypeError, and a worker task slow to come up was waited for without a bound.
        timeout = check_timeout(timeout)
        async with self._lifecycle_async() as turn:
            await self._start(turn, timeout)

    async def _start(self, turn: Turn, timeout: float) -> None:
        if not over(self._ending):
            raise WorkerError(
                "the worker of the last stop() or start(), which was cancelled or timed out,"
                " has not ended yet"
            )
        self._check_startable()
        worker = self.worker
        if isinstance(worker, WorkerProcess):
            if self._has_worker_process():  # (one to be started again included)
                raise AlreadyStarted("already started")
            start = _UndoableStart(worker, timeout)
            # A future of the executor, not a task: a loop that ends (asyncio.run) cancels
            # its tasks, and a task that was to stop the process once up was cancelled
            # with it while the start went on in its thread: the process delivered on.
            starting = turn.in_thread(start.run)
            try:
                await asyncio.shield(starting)
            except asyncio.CancelledError:
                # The start goes on in its thread (bounded by its timeout): its process,
                # if it comes up, is stopped then, as a stop() that was cancelled leaves
                # it (the next start() refuses until then, stop() waits for it).
                if start.give_up():
                    # It came up as this was cancelled: stopped in a thread of its own.
                    self._ending = in_thread(worker.stop, 0)
                elif not (starting.done() and starting.exception() is not None):
                    self._ending = starting
                raise
            return
        if worker is None:
            return
        if runs(self._task):
            raise AlreadyStarted("already started")
        worker = self._worker_to_start(worker)
        ready = asyncio.Event()
        # A program whose main returns without stop(): asyncio.run() cancels every task,
        # the deliveries too, and a message whose final dot the server had taken went out
        # again from the next worker. The worker drains instead, as a thread's at exit.
        run = worker.run(on_started=ready.set, drain_if_cancelled=ORPHAN_DRAIN)
        self._task = asyncio.create_task(run, name="mailstrom-worker")
        self._last_run = (worker, self._task)
        self._task.add_done_callback(functools.partial(_log_death, ready))
        waiter = asyncio.create_task(ready.wait())
        try:
            done, _ = await asyncio.wait(
                {self._task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            self._give_up_starting()
            raise
        finally:
            waiter.cancel()
        if not done:
            self._give_up_starting()  # not left to come up behind a start() that failed
            raise WorkerError(f"worker did not start within {timeout:g} s")
        if self._task.done():
            task, self._task = self._task, None
            exc = task.exception()
            raise WorkerError(f"worker failed to start: {exc}") from exc

    def _give_up_starting(self) -> None:
        """start() was cancelled (or timed out) before its worker task came up: the task
        is not left to come up behind it (delivering for a start() that never returned,
        and the next start() saying "already started"). It is cancelled (nothing is in flight yet;
        what it leased still goes back) and, as the task a stop() gave up on, ends by
        itself: the next start() refuses while it lives, stop() waits for it."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        worker = self.worker
        if isinstance(worker, Worker):
            # Asked to stop first, as a worker thread that misses start()'s bound is: a
            # cancel it was not told of read as its death, and worker_status.error said
            # "CancelledError: " until the next start().
            worker.request_stop(drain_timeout=0)
            worker.cut_short()
        task.cancel()
        self._ending = task

    async def stop(self, timeout: float | None = 30.0) -> None:
        """Stop leasing; let in-flight deliveries finish within ``timeout`` seconds and
        give the rest back to the store, due at once; wait for the worker at most
        :data:`~mailstrom.client.process.STOP_GRACE` seconds past ``timeout``, then kill a
        worker process (the time ``on_result`` takes meanwhile does not count) or cancel
        the worker task (logged). Several at once each return
        once the worker has ended, on the worker task's loop or any other (but one that
        does not run then: WorkerError, and nothing is stopped). Cancelled, it leaves the
        worker stopping, and the store this facade opened is closed once the worker has
        ended; the next stop() waits for that, its own timeout winning when shorter."""
        timeout = stop_timeout(timeout)
        if self._stopping_now:
            self._hurry_stop(timeout)  # then waits below for it, ending sooner
        async with self._lifecycle_async() as turn:
            self._stopping_now = True
            try:
                await self._stop(timeout, turn)
            finally:
                self._stopping_now = False

    async def _stop(self, timeout: float | None, turn: Turn) -> None:
        worker = self.worker
        # What ends: the worker task or a worker process's stop in a thread, of whatever
        # loop, never this loop's follower of it (see the cancellation below).
        ending = None if over(self._ending) else self._ending
        deferred = False
        try:
            if isinstance(worker, WorkerProcess):
                if ending is None:
                    # A future of the executor, not a task: a loop that ends (asyncio.run)
                    # cancels its tasks, and a task running it ended (releasing the
                    # store) while the stop went on in its thread.
                    ending = turn.in_thread(worker.stop, timeout)
                    at_thread_end(ending, functools.partial(self._end_stranded_stop, turn.loop))
                else:
                    # A cancelled stop()'s, of any loop, still draining for as long as it
                    # asked: a shorter timeout wins at once, as for a stop() under way
                    # (the worker task's is told it below).
                    worker.hurry(timeout)
                await asyncio.shield(followed_here(ending))
            elif isinstance(worker, Worker):
                task: asyncio.Future[None] | None = self._task
                if task is None and ending is not None:
                    task = ending  # a worker task still ending since a cancelled stop()
                if task is not None and idle_elsewhere(task):
                    deferred = True  # the store stays open for the worker, still there
                    raise WorkerError(
                        "the worker task belongs to another event loop, which is not "
                        "running: stop() it on that loop"
                    )
                self._task = None
                # One that ended already needs nothing: typically cancelled by the loop
                # that ran it as that loop closed (asyncio.run), or dead of an error.
                # Such an error, and one it ends on now, was logged as it ended
                # (_log_death) and is in worker_status: stop() raises none, as
                # Mailstrom.stop() raises none, and an `async with` block's own
                # exception is not replaced by it.
                if task is not None and not task.done():
                    worker.request_stop(drain_timeout=timeout)
                    ending = task
                    followed = followed_here(task)
                    limit = None if timeout is None else timeout + STOP_GRACE
                    await asyncio.wait({followed}, timeout=limit)  # (raises nothing of it)
                    if not followed.done():
                        log.error("the worker task did not stop within %g s", limit)
                        worker.cut_short()  # its end, not a cancel to drain through
                        cancel_on_its_loop(task)
                        self._ending = task  # no other worker starts while it lives
        except asyncio.CancelledError:
            # over(), not done(): a thread's future whose loop is closed is never done,
            # even once its thread has ended, and the release was then run at once
            # here, on the event loop.
            if ending is not None and not over(ending):
                # Not under the worker still stopping: the store goes once it has ended.
                # Told on its own loop: a follower of it on this one never ended once
                # this loop was closed, and every later start() refused for good.
                deferred = True
                self._ending = ending
                # Once per ending: the cancelled start() an `async with` stops on its
                # way out left one too, and that stop(), cancelled, left the store open.
                if self._releases_after is not ending:
                    self._releases_after = ending
                    call_when_done(ending, self._ended)
                    # A worker process's stop: the store goes at its thread's end too,
                    # as _ended never runs once the future's loop is closed; should that
                    # thread have ended just now, below, in a thread as stop() does.
                    if not at_thread_end(ending, self._release_store_after_cancel):
                        deferred = False
            raise
        except GeneratorExit:
            # Closed, not run: collected once its loop was closed. Nothing may be
            # awaited now, and the store is no longer this stop()'s to close: its turn
            # passed on once its thread ended (which closed the store then, see
            # _end_stranded_stop), and closed here it went under the next start()'s.
            deferred = True
            raise
        finally:
            if not deferred and self._store_to_release():
                # In a thread: closing a store waits for its writes under way, a SQLite
                # one for a write waiting out its busy timeout, and the loop, held, could
                # not run what would end that wait (the write then failed).
                await finish_in_thread(self._release_store)

    def _end_stranded_stop(self, loop: asyncio.AbstractEventLoop) -> None:
        """As a worker process's stop ends in its thread: a stop() whose loop no longer
        runs it (closed or stopped meanwhile) ends as one awaited to its end does, the
        store it opened closed, so that a start() after it refuses as after any stop()
        (its turn passes on once that thread has ended); not left open for a start()
        to use, then closed under it as that stop()'s coroutine was collected."""
        if not loop.is_running():
            self._release_store_after_cancel()

    def _ended(self, ending: asyncio.Future[None]) -> None:
        """What a cancelled stop() left ending has ended: the store may go, in a thread
        as stop() closes it (not on the loop, held for a SQLite checkpoint and fsync or a
        PostgreSQL session's end). A loop that is ending, its executor shut down, has
        nothing else to run: it is closed here then."""
        if not ending.cancelled() and ending.exception() is not None:
            log.error("the worker ended on %r after its stop() was cancelled", ending.exception())
        try:
            released = ending.get_loop().run_in_executor(None, self._release_store)
        except RuntimeError:  # its executor is shut down (the loop ends)
            self._release_store()
            return
        released.add_done_callback(_log_release_error)

    def _release_store_after_cancel(self) -> None:
        """:meth:`_release_store` as a worker process's stop, which a cancelled stop()
        left going on, ends in its thread: its error logged, as nobody awaits it."""
        try:
            self._release_store()
        except Exception:
            log.exception("the store could not be closed after a cancelled stop()")

    def _release_store(self) -> None:
        self._unwatch_store()
        self._close_owned_store()

    @property
    def worker_status(self) -> WorkerStatus:
        """See :attr:`FacadeBase.worker_status`; a worker task left pending on a loop
        that was closed (see :func:`~mailstrom.client.aio_loops.stranded`) is dead, and
        says so: it said running, with no error, while nothing delivered (and again
        after a stop(), or a start() cancelled as it came up)."""
        status = super().worker_status
        last = self._last_run
        if status.running and last is not None and last[0] is self.worker and stranded(last[1]):
            return dataclasses.replace(
                status,
                running=False,
                error="the worker task's event loop was closed while it ran; start() again",
            )
        return status

    def _store_to_release(self) -> bool:
        """Whether :meth:`_release_store` has anything to do: a watch to end, or a
        store this facade opened still to close."""
        with self._store_watch_lock:
            return self._store_watch is not None or (self._owns_store and not self._store_closed)

    async def __aenter__(self) -> AsyncMailstrom:
        # A task that ended (cancelled as its loop closed, asyncio.run; or dead of an
        # error worker_status reports), or left on a closed loop, runs no worker any more.
        started = runs(self._task) or self._has_worker_process()
        try:
            await self.start()
        except AlreadyStarted:
            # Started by another start() or `async with` meanwhile (a worker process
            # still coming up when ``started`` was judged): stopping here stopped the
            # worker that other block delivers with.
            raise
        except BaseException:
            if not started:  # ("already started" leaves the worker to its starter)
                # No with block to leave: what stop() would close must not stay open.
                await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def send_email(
        self,
        message: MessageInput,
        *,
        envelope_from: str | None = None,
        envelope_to: Sequence[str] | None = None,
        tags: Iterable[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        priority: str | None = None,
        send_at: datetime | None = None,
        expires_at: datetime | None = None,
        max_age: timedelta | None = None,
        idempotency_key: str | None = None,
        dsn: DSN | None = None,
    ) -> str:
        """Validate, encode and durably queue ``message``; return its id at once.

        Raises an :class:`~mailstrom.errors.InvalidMessage` subclass for bad input; nothing
        is queued then. Never waits on the network, and never holds the loop: all of it
        runs in a thread.

        ``tags`` and ``metadata`` are kept with the message (never sent) and come back in
        :meth:`query_status` and every delivery event; ``priority`` names its lane
        (``Config.lanes``). Given here they replace the :class:`~mailstrom.Email`'s own.
        ``send_at`` holds it until then; ``expires_at`` (or ``max_age`` from ``send_at``,
        else now) fails the recipients still pending then, with the reason ``expired``.
        With ``idempotency_key``, a second submission with the same key within
        ``Config.idempotency_window`` returns the first message's id and queues nothing.
        ``dsn`` and a VERP ``envelope_from`` as for :meth:`Mailstrom.send_email`.

        Cancelled (a timeout around it) before the store write began, while the message
        is validated, encoded and signed, it raises CancelledError at once and nothing
        is queued. Cancelled during the write, it raises once the write has ended: the
        message may then be queued (under an id the caller did not get); send it again
        with the same ``idempotency_key`` to learn its id without a second copy.
        """

        # Validation, encoding and DKIM signing go to the thread with the store write: on
        # the loop they held every other coroutine (the "task" worker's deliveries too)
        # for as long as a large message takes, half a second for 20 MiB.
        return await write_unless_cancelled(
            lambda start: self._queue(
                message,
                envelope_from,
                envelope_to,
                dsn,
                begin=start.begin,
                tags=tags,
                metadata=metadata,
                priority=priority,
                send_at=send_at,
                expires_at=expires_at,
                max_age=max_age,
                idempotency_key=idempotency_key,
            )
        )

    async def send_emails(self, messages: Iterable[MessageInput]) -> list[str]:
        """Queue a batch in one store transaction; all or nothing (see
        :meth:`Mailstrom.send_emails`). Cancelled, as :meth:`send_email`: before the
        store write began, nothing of the batch is queued."""
        batch = batch_of(messages)  # on the loop: a generator is the caller's to read

        def queue(start: WriteStart) -> list[str]:  # off the loop, as in send_email
            prepared = self._prepare_batch(batch)
            start.begin()
            return self._store_for_new_mail().enqueue_many(prepared, now=self._clock())

        return await write_unless_cancelled(queue)

    async def query_status(self, message_id: str) -> MessageStatus:
        """Where the message and each recipient stand, with attempt history."""
        return await asyncio.to_thread(lambda: self.store.status(resolve(self.store, message_id)))

    async def metrics(self) -> MetricsSnapshot:
        """The worker's counters with the queue's counts (see ``Mailstrom.metrics``)."""
        return await asyncio.to_thread(self._metrics_snapshot)

    async def query_recent(self, limit: int = 20) -> list[MessageStatus]:
        """The ``limit`` (0 to 2**63-1) most recently queued messages, newest first."""
        return await asyncio.to_thread(self.store.recent, check_limit(limit, "limit"))

    async def query(self, where: QueueFilter | None = None) -> list[MessageStatus]:
        """Messages matching ``where`` (state, domain, age, held, tag), newest first,
        without attempt history (see :meth:`Mailstrom.query`)."""
        where = checked_filter(where)
        return await asyncio.to_thread(self.store.query, now=self._clock(), where=where)

    async def retry(self, message_id: str) -> int:
        """Make the message's pending recipients due now."""
        now = self._clock()
        return await write_in_thread(
            lambda: self.store.retry(resolve(self.store, message_id), now=now)
        )

    async def cancel(self, message_id: str) -> int:
        """Fail the message's pending recipients with the reason "cancelled"."""
        now = self._clock()
        return await write_in_thread(
            lambda: self.store.cancel(resolve(self.store, message_id), now=now)
        )

    async def throttled_destinations(self) -> list[DestinationThrottle]:
        """The destinations paused now (see :meth:`Mailstrom.throttled_destinations`)."""
        return await asyncio.to_thread(self.store.throttles, now=self._clock())

    # --- the suppression list --------------------------------------------------------

    async def suppress(
        self,
        target: str,
        reply: str = "",
        *,
        source: SuppressionSource = SuppressionSource.MANUAL,
        expires_at: datetime | None = None,
    ) -> Suppression:
        """Put an address or a whole domain on the suppression list (see
        :meth:`Mailstrom.suppress`)."""
        entry = suppression_entry(
            target, reply, source=source, expires_at=expires_at, now=self._clock()
        )
        await write_in_thread(self.store.suppress, [entry])
        return entry

    async def unsuppress(self, target: str) -> bool:
        """Take an address or domain off the list; False when it was not on it."""
        removed = await write_in_thread(self.store.unsuppress, stored_forms(target))
        return removed > 0

    async def suppressed(self, address: str) -> Suppression | None:
        """The entry that keeps mail from ``address`` now, or None."""
        return await asyncio.to_thread(self._suppressed, address)

    async def suppressions(self, *, after: str = "", limit: int = 100) -> list[Suppression]:
        """Up to ``limit`` entries in force, in target order after ``after``."""
        after, limit = checked_page(after, limit)
        return await asyncio.to_thread(
            self.store.list_suppressions, now=self._clock(), after=after, limit=limit
        )

"""The thread facade: a worker event loop on a background thread, a blocking API in front.

``send_email`` writes to the store in the caller's thread (durable when it returns) and
only nudges the worker; it never waits on the network. The worker thread is started with a
readiness handshake, so an error at start is raised in the caller's thread.
"""

from __future__ import annotations

import atexit
import functools
import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from time import monotonic
from types import TracebackType

from mailstrom.arguments import check_limit, check_timeout
from mailstrom.client.common import (
    _FACADES,
    AlreadyStarted,
    FacadeBase,
    MessageInput,
    StoreArgument,
    SyncWorkerMode,
    batch_of,
    in_a_call_on,
    stop_timeout,
    suppression_entry,
)
from mailstrom.client.operations import (
    QueueOperations,
    checked_filter,
    checked_page,
    resolve,
)
from mailstrom.client.process import ORPHAN_DRAIN, STOP_GRACE, WorkerProcess
from mailstrom.config import Config
from mailstrom.errors import WorkerError
from mailstrom.message.dsn import DSN
from mailstrom.routing import Router
from mailstrom.runtime.loops import run as run_loop
from mailstrom.runtime.worker import Worker, utc_now
from mailstrom.status import DestinationThrottle, MessageStatus, MetricsSnapshot
from mailstrom.stores.base import QueueFilter, RecipientResult
from mailstrom.suppression import Suppression, SuppressionSource, stored_forms

log = logging.getLogger("mailstrom")


class _WorkerThread(threading.Thread):
    """The worker's thread, which says when it has ended in an event of its own.

    Not ``is_alive()`` and ``join()``: on Python 3.11, a ``join()`` interrupted by a
    signal handler's exception (Ctrl-C's KeyboardInterrupt) while the thread still runs
    marks the thread as ended (bpo-45274's fix, which releases the thread's own lock):
    ``is_alive()`` said False, and ``join()`` returned at once, from then on."""

    def __init__(self, target: Callable[[], None]) -> None:
        super().__init__(target=target, name="mailstrom-worker", daemon=True)
        self.ended = threading.Event()

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.ended.set()


def _alive(thread: _WorkerThread | None) -> bool:
    return thread is not None and not thread.ended.is_set()


class Mailstrom(FacadeBase, QueueOperations):
    """Queue mail and deliver it in the background.

    >>> from mailstrom import Mailstrom, Config, Email
    >>> with Mailstrom(Config(helo_name="mail.example.com"),
    ...                store="mail.db") as ms:  # doctest: +SKIP
    ...     mid = ms.send_email(Email(from_="App <app@example.com>", to=["bob@example.org"],
    ...                               subject="Hi", text="Hello"))
    ...     for r in ms.query_status(mid).recipients:
    ...         print(r.address, r.state, r.reason)

    ``store`` is a store URL (``"mail.db"``, ``"sqlite:////var/lib/app/mail.db"``,
    ``"postgresql://mail@db/mail"``, ``"memory:"``) or a path object (a SQLite file):
    the facade opens it and closes it on :meth:`stop` (on leaving the ``with`` block).
    Without one it opens the default queue the same way. A
    :class:`~mailstrom.stores.base.Store` passed in stays open for its caller, who may
    share it (e.g. with :func:`mailstrom.web.create_app`) and closes it:

    >>> store = SQLiteStore("mail.db")  # doctest: +SKIP
    >>> try:  # doctest: +SKIP
    ...     with Mailstrom(config, store=store) as ms:
    ...         ...
    ... finally:
    ...     store.close()
    """

    _thread: _WorkerThread | None = None
    _worker_thread: _WorkerThread | None = None
    """The thread of the last worker started, kept once a stop() let go of it: the
    thread on_result runs on."""
    _start_error: BaseException | None = None
    _stuck: _WorkerThread | None = None
    _ended: _WorkerThread | None = None
    """The last worker thread that has ended, or is past releasing the store (_run)."""
    _under_way: str | None = None
    """"start" or "stop" while one holds ``_lifecycle`` (see :meth:`stop`)."""
    _stop_after_start: tuple[float | None] | None = None
    """The timeout of a stop() that a signal handler called while start() ran."""
    _stopped_from_within = False
    """stop() was called on the worker's thread (from on_result): the thread closes what
    stop() would have closed as it ends."""
    """A worker thread that did not end within ``stop()``'s bound, while it lives."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        store: StoreArgument = None,
        router: Router | None = None,
        clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
        on_result: Callable[[RecipientResult], None] | None = None,
        worker: SyncWorkerMode = "auto",
    ) -> None:
        """See :meth:`FacadeBase.__init__ <mailstrom.client.common.FacadeBase.__init__>`;
        ``worker`` is ``"auto"``, ``"process"``, ``"thread"`` or None."""
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
        self._stuck = None  # a thread of the parent's, which does not exist here
        self._under_way = self._stop_after_start = None  # (another thread's, at the fork)
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return  # none started, or the fork came from the worker's own thread
        # The parent's worker thread does not exist here: a fork reported its worker
        # running while nothing delivered, and could not start one ("already started").
        # As a worker process's fork does, it lets go of it; its start() starts its own.
        self._thread = self._worker_thread = self._stuck = None
        if self._make_worker is not None:
            self.worker = self._make_worker()
            self._worker_ran = False
        # A queue in memory is the parent's copy here: a worker of ours would send it again.
        self._copied_queue = getattr(self.store, "url", None) is None

    # --- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the worker; return when it runs, or raise what stopped it.

        After :meth:`stop`, or once the worker died on its own (``worker_status`` says
        why), this starts a new worker. A facade that opened its store
        itself closed it in ``stop()`` and raises :class:`~mailstrom.errors.WorkerError`.
        Safe to call from several threads: one worker starts, the others are told
        "already started"; one that comes while a ``stop()`` runs waits for it.
        """
        timeout = check_timeout(timeout)
        if self._on_worker_thread():
            raise WorkerError("start() from on_result: the worker it runs on has not ended")
        with self._lifecycle:
            if self._under_way is not None:
                raise WorkerError(
                    f"start() from a signal handler that interrupted {self._under_way}()"
                )
            self._under_way, self._stop_after_start = "start", None
            try:
                self._start(timeout)
            finally:
                self._under_way = None
                asked, self._stop_after_start = self._stop_after_start, None
                if asked is not None:
                    self._stop(asked[0])  # a signal handler's, which came meanwhile

    def _start(self, timeout: float) -> None:
        self._check_startable()
        worker = self.worker
        if isinstance(worker, WorkerProcess):
            if self._has_worker_process():  # (one to be started again included)
                raise AlreadyStarted("already started")
            worker.start(timeout)
            return
        if worker is None:
            return
        if self._worker_thread_runs():
            raise AlreadyStarted("already started")
        if self._thread is not None:
            # Its worker ended on its own (an error worker_status reports, logged): no
            # worker runs, and a new one starts in its place. Only its log line is left.
            self._thread.join()
            self._thread = None
        if _alive(self._stuck):
            raise WorkerError("the worker thread of the last stop() has not ended yet")
        worker = self._worker_to_start(worker)
        self._stopped_from_within = False
        self._ready = threading.Event()
        self._start_error = None
        last = self._worker_thread
        self._thread = self._worker_thread = _WorkerThread(functools.partial(self._run, worker))
        try:
            self._thread.start()
        except RuntimeError as exc:
            # No thread left (a container's pids limit): no worker runs, and the next
            # start() starts one. Kept as the worker, the thread that never ran made each
            # start() say "already started", and stop() wait for its end in vain.
            self._thread, self._worker_thread = None, last
            raise WorkerError(f"worker failed to start: {exc}") from exc
        if not self._ready.wait(timeout):
            # Not left to come up behind a start() that said it failed (a worker
            # process is killed here): it ends as soon as it can, as after stop().
            worker.request_stop(drain_timeout=0)
            self._stuck, self._thread = self._thread, None
            raise WorkerError(f"worker did not start within {timeout:g} s")
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise WorkerError(f"worker failed to start: {self._start_error}") from (
                self._start_error
            )

    def _worker_thread_runs(self) -> bool:
        """Whether the worker thread this facade started still delivers: not one whose
        worker ended on its own (worker_status says why), which start() replaces."""
        worker = self.worker
        ended = isinstance(worker, Worker) and worker.wait_stopped(0)
        return self._thread is not None and not ended

    def _on_worker_thread(self) -> bool:
        """Whether this is the thread the worker hands its results on (``on_result``):
        the worker thread, or a worker process's reader. It cannot wait for itself, nor
        for a :meth:`stop` from elsewhere that waits for it."""
        worker, here = self.worker, threading.current_thread()
        if isinstance(worker, WorkerProcess):
            return worker.reading_on(here)
        return here is self._worker_thread

    def _delivers_on_this_thread(self) -> bool:
        """Whether this is the worker thread (in ``on_result``), which a ``wait()``
        here would keep from delivering what it waits for."""
        return threading.current_thread() is self._worker_thread

    def _run(self, worker: Worker) -> None:
        try:
            run_loop(worker.run(on_started=self._ready.set), self.config.event_loop)
        except BaseException as exc:
            if not self._ready.is_set():
                self._start_error = exc
                self._ready.set()
            else:
                # The worker is dead; worker_status reports it, the log says why.
                log.exception("mailstrom worker died")
        finally:
            with self._store_watch_lock:
                self._ended = self._worker_thread_here()
                release = self._stopped_from_within
            if release:
                # stop() came from on_result (see stop()), or was interrupted while it
                # waited for this thread: what it could not do then.
                self._unwatch_store()
                self._close_owned_store()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop leasing; let in-flight deliveries finish within ``timeout`` seconds, give
        the rest back to the store (due at once), and wait for the worker to end: at most
        :data:`~mailstrom.client.process.STOP_GRACE` seconds past ``timeout``. A worker
        process still running then is killed (the time ``on_result`` takes meanwhile does
        not count); a worker thread is left to end by itself
        (logged). Either way what it had not recorded is tried again once its leases
        expire. Called from ``on_result`` in a worker thread (which cannot wait for
        itself) it returns at once; the worker ends, and closes the store this facade
        opened, once the deliveries in flight are recorded. Called from several threads
        at once, each returns once the worker has ended (or the bound has passed).

        Called from a signal handler (a SIGTERM handler) that interrupted a start() or
        stop() of the same thread, it returns at once: the stop() under way goes on, and
        the start() under way stops the worker once it has started (or failed to). One
        that interrupted a call on the store (``send_email``'s write) asks the worker to
        stop without waiting for it (it may wait for what that call holds): the worker
        ends, and the store this facade opened closes, once the call has ended, and
        ``send_email`` refuses new mail meanwhile."""
        timeout = stop_timeout(timeout)
        if self._on_worker_thread():
            self._stop(timeout)  # a stop() elsewhere may hold the lock, waiting for us
            return
        if self._under_way == "stop":
            self._hurry_stop(timeout)  # then waits below for it, ending sooner
        with self._lifecycle:
            # Held by another thread, this waits; held here, a start() or stop() of this
            # very thread is under way, interrupted by the signal handler calling us, and
            # cannot end before we return: waiting for it was a deadlock.
            if self._under_way == "stop":
                return
            if self._under_way == "start":
                self._stop_after_start = (timeout,)
                return
            self._under_way = "stop"
            try:
                self._stop(timeout)
            finally:
                self._under_way = None

    def _stop(self, timeout: float | None) -> None:
        worker = self.worker
        within = False
        try:
            if isinstance(worker, WorkerProcess):
                if in_a_call_on(self.store):
                    self._stop_behind_the_call(worker, timeout)
                else:
                    worker.stop(timeout)
            elif isinstance(worker, Worker):
                thread, self._thread = self._thread, None
                if thread is None and _alive(self._stuck):
                    thread = self._stuck  # still ending since a stop(): wait for it again
                elif thread is not None:
                    # Ending from now on: the exit hook drains it too while this stop()
                    # waits (one on a daemon thread, which the program's return leaves
                    # behind). It skipped it, and the worker froze mid-delivery.
                    self._stuck = thread
                within = self._on_worker_thread()  # a stop() elsewhere may have its thread
                if within:
                    # Called from on_result, on the worker's own thread, which cannot wait
                    # for itself: the worker drains and ends once the callback returns,
                    # and the store this facade opened is closed then (_run), not under
                    # deliveries still to be recorded.
                    worker.request_stop(drain_timeout=timeout)
                    self._stopped_from_within = True
                    self._stuck = self._worker_thread
                elif thread is not None and in_a_call_on(self.store):
                    # A signal handler's stop() (SIGTERM's) that interrupted this thread in
                    # a call on the store, send_email's write: the worker may wait for
                    # what that call holds (the write lock), so waiting for the worker was
                    # a deadlock until the bound. It ends once the call is done, and
                    # closes the store then (_run); meanwhile send_email refuses.
                    worker.request_stop(drain_timeout=timeout)
                    self._stuck = thread
                    within = self._leave_store_to(thread)
                    self._store_closing = within and self._owns_store
                elif thread is not None:
                    try:
                        worker.request_stop(drain_timeout=timeout)
                        limit = None if timeout is None else timeout + STOP_GRACE
                        if thread.ended.wait(limit):
                            thread.join()  # past its last line: gone once stop() returns
                    except BaseException:
                        # Interrupted (Ctrl-C in a REPL, which goes on): the worker
                        # drains all the same. The store this facade opened is closed
                        # as it ends, not now under the deliveries it has yet to record
                        # (sent again once their leases ran out); the next stop() waits
                        # for it, and start() refuses while it lives.
                        self._stuck = thread
                        within = self._leave_store_to(thread)
                        raise
                    if _alive(thread):
                        # A store call that blocks (a lock held elsewhere, a database
                        # that went silent) must not hold the application's shutdown.
                        self._stuck = thread
                        log.error("the worker thread did not stop within %g s", limit)
        finally:
            if not within:
                self._unwatch_store()
                self._close_owned_store()

    def _stop_behind_the_call(self, worker: WorkerProcess, timeout: float | None) -> None:
        """Stop the worker process on a thread of its own: a signal handler's stop()
        (SIGTERM's) interrupted this thread in a call on the store, send_email's write,
        whose transaction holds the database's write lock. The child, stopping, writes
        too (it gives back what it leased) and waited for that lock, which the call
        cannot let go of before the handler returns: stop() lasted its whole bound (40 s
        by default), then killed the child with its deliveries in flight. The stop now
        ends once the call has (a later stop() waits for it, as two stops do)."""
        stopper = threading.Thread(target=worker.stop, args=(timeout,), name="mailstrom-stop")
        try:
            stopper.start()
        except RuntimeError:  # no thread left: here, as before
            worker.stop(timeout)

    def _stop_worker_at_exit(self) -> _WorkerThread | None:
        """Ask the worker thread still running at interpreter exit to stop, draining its
        deliveries in flight: one this facade started, one a stop() of the program's
        left to end by itself (interrupted by a SIGTERM handler's SystemExit, or past
        its bound), or one a stop() on another thread still waits for. Returns that
        thread for :func:`_stop_at_exit` to wait for.

        The store stays open (what the process's end does to it is enough): an atexit
        hook of the application registered before this module was imported runs after
        this one, and mail it queues is kept for the next run to deliver. Not when a
        stop() of the program's was under way (interrupted, or waiting on another
        thread): the store this facade opened is closed once the worker has ended, as
        that stop() would have (see :meth:`_run`)."""
        if self._worker_thread_runs():
            thread, self._thread = self._thread, None
            self._stuck = thread
        elif _alive(self._stuck):
            thread = self._stuck
        else:
            return None
        self._hurry_stop(ORPHAN_DRAIN)
        return thread

    def _worker_thread_here(self) -> _WorkerThread | None:
        here = threading.current_thread()
        return here if isinstance(here, _WorkerThread) else None

    def _leave_store_to(self, thread: _WorkerThread) -> bool:
        """Have the worker ``thread`` release the store as it ends (see :meth:`_run`);
        False when it has ended already, past the point where it would."""
        with self._store_watch_lock:
            if self._ended is thread:
                return False
            self._stopped_from_within = True
            return True

    def __enter__(self) -> Mailstrom:
        started = self._worker_thread_runs() or self._has_worker_process()
        try:
            self.start()
        except AlreadyStarted:
            # Started by another start() or `with` meanwhile (after ``started`` was
            # judged, before this start() had its turn): stopping here stopped the
            # worker that other block delivers with.
            raise
        except BaseException:
            if not started:  # ("already started" leaves the worker to its starter)
                # No with block to leave: what stop() would close must not stay open.
                self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the API ---------------------------------------------------------------------

    def send_email(
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

        Raises an :class:`~mailstrom.errors.InvalidMessage` subclass for bad input;
        nothing is queued then.

        ``tags`` and ``metadata`` are kept with the message (never sent) and come back in
        :meth:`query_status` and every delivery event; ``priority`` names its lane
        (``Config.lanes``). Given here they replace the :class:`~mailstrom.Email`'s own.
        ``send_at`` holds it until then; ``expires_at`` (or ``max_age`` from ``send_at``,
        else now) fails the recipients still pending then, with the reason ``expired``.
        With ``idempotency_key``, a second submission with the same key within
        ``Config.idempotency_window`` returns the first message's id and queues nothing.

        ``dsn`` asks receiving servers for delivery status notifications (RFC 3461; else
        an :class:`Email`'s own ``dsn``); an ``envelope_from`` with ``{token}`` in its
        local part gives each recipient its own VERP envelope sender (see docs/guide.md,
        "Bounces").
        """
        return self._queue(
            message,
            envelope_from,
            envelope_to,
            dsn,
            tags=tags,
            metadata=metadata,
            priority=priority,
            send_at=send_at,
            expires_at=expires_at,
            max_age=max_age,
            idempotency_key=idempotency_key,
        )

    def send_emails(self, messages: Iterable[MessageInput]) -> list[str]:
        """Queue a batch in one store transaction (one fsync); ids in the same order.

        All or nothing: every message is validated first, and if one is invalid its
        :class:`~mailstrom.errors.InvalidMessage` is raised and none is queued.
        """
        prepared = self._prepare_batch(batch_of(messages))
        return self._store_for_new_mail().enqueue_many(prepared, now=self._clock())

    def query_status(self, message_id: str) -> MessageStatus:
        """Where the message and each recipient stand, with attempt history.

        ``message_id`` may be any unique prefix of an id. Raises
        :class:`~mailstrom.errors.UnknownMessage` for an id not in the store
        (:class:`~mailstrom.errors.AmbiguousMessageId` for a prefix of several).
        """
        return self.store.status(resolve(self.store, message_id))

    def metrics(self) -> MetricsSnapshot:
        """The worker's counters (attempts by outcome and reason class, latency and queue
        delay histograms, sessions, store errors) with the queue's counts by state: the
        numbers ``mailstrom worker --metrics`` exports, for applications that run the
        worker themselves. Works the same for a worker thread and a worker process (whose
        numbers arrive twice a second).

        >>> from mailstrom.ops.exporter import MailstromCollector  # doctest: +SKIP
        >>> registry.register(MailstromCollector(ms.metrics))      # doctest: +SKIP
        """
        return self._metrics_snapshot()

    def query_recent(self, limit: int = 20) -> list[MessageStatus]:
        """The ``limit`` (0 to 2**63-1) most recently queued messages, newest first."""
        return self.store.recent(check_limit(limit, "limit"))

    def query(self, where: QueueFilter | None = None) -> list[MessageStatus]:
        """Messages matching ``where``, newest first, without attempt history.

        >>> ms.query(QueueFilter(tag="newsletter", state=RecipientState.DEFERRED))
        ... # doctest: +SKIP
        """
        return self.store.query(now=self._clock(), where=checked_filter(where))

    def retry(self, message_id: str) -> int:
        """Make the message's pending recipients due now; returns how many."""
        return self.store.retry(resolve(self.store, message_id), now=self._clock())

    def cancel(self, message_id: str) -> int:
        """Fail the message's pending recipients with the reason "cancelled"."""
        return self.store.cancel(resolve(self.store, message_id), now=self._clock())

    def throttled_destinations(self) -> list[DestinationThrottle]:
        """The destinations paused now after a throttling reply, soonest end first (every
        worker of the store heeds them; see docs/guide.md, "Traffic shaping")."""
        return self.store.throttles(now=self._clock())

    # --- the suppression list --------------------------------------------------------

    def suppress(
        self,
        target: str,
        reply: str = "",
        *,
        source: SuppressionSource = SuppressionSource.MANUAL,
        expires_at: datetime | None = None,
    ) -> Suppression:
        """Put an address (``bob@example.org``) or a whole domain (``example.org``) on the
        suppression list, shared by every worker of the store: later recipients there fail
        at once with ``suppressed since <date>: <reply>``. Replaces an earlier entry.

        Raises :class:`~mailstrom.errors.InvalidSuppression` for a bad target or expiry.
        """
        entry = suppression_entry(
            target, reply, source=source, expires_at=expires_at, now=self._clock()
        )
        self.store.suppress([entry])
        return entry

    def unsuppress(self, target: str) -> bool:
        """Take an address or domain off the list; False when it was not on it."""
        return self.store.unsuppress(stored_forms(target)) > 0

    def suppressed(self, address: str) -> Suppression | None:
        """The entry that keeps mail from ``address`` now (the address's own, else its
        domain's), or None."""
        return self._suppressed(address)

    def suppressions(self, *, after: str = "", limit: int = 100) -> list[Suppression]:
        """Up to ``limit`` entries in force, in target order after ``after`` (pass the
        last target of a page to get the next)."""
        after, limit = checked_page(after, limit)
        return self.store.list_suppressions(now=self._clock(), after=after, limit=limit)


def _stop_at_exit(facades: Iterable[object] | None = None) -> None:
    """Stop the worker threads still running as the interpreter exits (the program
    returned from its main, or a SIGTERM handler raised SystemExit, without ``stop()``, or
    during one it had called). Being daemon threads, they were frozen mid-delivery: a
    message whose final dot the server had taken stayed leased, unrecorded, and the next
    worker sent it again. Each now drains as a worker process whose parent died does: its
    deliveries in flight get :data:`~mailstrom.client.process.ORPHAN_DRAIN` seconds, the
    rest goes back to the store. All drain side by side, within one bound
    (ORPHAN_DRAIN + STOP_GRACE in all, not each: a worker stuck in a store call would
    otherwise add it to the exit once per facade).

    ``facades``: those to walk instead of every facade of the process (a test's own, so
    that a worker another test left running is not stopped and waited for)."""
    bound = ORPHAN_DRAIN + STOP_GRACE
    deadline = monotonic() + bound
    walked = list(_FACADES if facades is None else facades)
    draining = [f._stop_worker_at_exit() for f in walked if isinstance(f, Mailstrom)]
    for thread in draining:
        if thread is None:
            continue
        if not thread.ended.wait(max(0.0, deadline - monotonic())):
            log.error("the worker thread did not stop at exit within %g s", bound)


# Run after the program's non-daemon threads have ended (their mail is queued by then)
# and before logging's own exit hook, registered earlier, closes the handlers.
atexit.register(_stop_at_exit)

"""What both facades share: turning user input into a queued message."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import random
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from email.message import EmailMessage
from types import FrameType
from typing import Any, Literal

from mailstrom.arguments import check_timeout, member_of
from mailstrom.bounces.verp import check_verp_template, is_verp_template
from mailstrom.client.process import WorkerProcess, no_interpreter
from mailstrom.config import Config
from mailstrom.errors import (
    ConfigError,
    InvalidMessage,
    InvalidMessageType,
    InvalidStoreURL,
    InvalidSuppression,
    StoreError,
    WorkerError,
)
from mailstrom.message import Email, PreparedMessage, prepare
from mailstrom.message.attributes import queue_attributes
from mailstrom.message.chars import shorten
from mailstrom.message.dsn import DSN
from mailstrom.routing import Router
from mailstrom.runtime.metrics import QueueStatsCache
from mailstrom.runtime.worker import Worker, utc_now
from mailstrom.status import MetricsSnapshot, WorkerStatus
from mailstrom.stores.base import RecipientResult, Store
from mailstrom.stores.clock import in_utc
from mailstrom.stores.watchers import Watchers
from mailstrom.suppression import (
    Suppression,
    SuppressionSource,
    check_entry_time,
    check_reply,
    lookup_targets,
    match,
    normalize_target,
)
from mailstrom.tls_spec import left_behind

MessageInput = Email | EmailMessage | bytes
"""What ``send_email`` accepts."""


def default_store() -> Store:
    """The store of a facade created without one: the same fixed, per-user path as the
    command line's default (:func:`~mailstrom.stores.url.default_store_path`), its missing
    directories created 0700 and the file 0600 — never ``./mailstrom.db`` wherever the
    program happens to run."""
    from mailstrom.stores import SQLiteStore
    from mailstrom.stores.url import default_store_path, make_private_parents

    path = default_store_path()
    make_private_parents(path)
    return SQLiteStore(path)


StoreArgument = Store | str | os.PathLike[str] | None
"""What a facade's ``store`` accepts: a store, a store URL, a SQLite file's path, or
nothing (the default queue)."""


def facade_store(store: StoreArgument) -> tuple[Store, bool]:
    """The store a facade works on, and whether the facade owns it (closes it on stop).

    The facade owns what it opens: the default queue for ``None``, the store a URL names
    (:func:`~mailstrom.stores.url.open_store`: ``"memory:"``, ``"mail.db"``,
    ``"sqlite:////var/lib/app/mail.db"``, ``"postgresql://..."``), and the SQLite file
    at an ``os.PathLike`` path (whatever its suffix: a path object cannot be a URL). A
    :class:`Store` passed in stays its caller's, open after stop.
    """
    from mailstrom.stores.url import open_sqlite, open_store

    if store is None:
        return default_store(), True
    if isinstance(store, str):
        return open_store(store), True
    if isinstance(store, os.PathLike):
        return open_sqlite(sqlite_path(store)), True
    if not isinstance(store, Store):
        # Taken for a store, it made a facade (a worker thread's, for want of a URL)
        # whose every call failed with an AttributeError ("'bytes' object has no
        # attribute 'enqueue'").
        hint = " (a path goes as a str or a pathlib.Path)" if isinstance(store, bytes) else ""
        raise ConfigError(
            "store must be a Store, a store URL, a path object or None, "
            f"not {type(store).__name__}{hint}"
        )
    return store, False


def sqlite_path(path: os.PathLike[str]) -> str:
    """The SQLite file at ``path``, made absolute, and never read as a store URL: made
    into one (``sqlite:///`` and the path), a name holding ``?`` was refused as a URL with
    parameters, and one beginning with ``file:`` as a SQLite URI.

    InvalidStoreURL for a path holding NUL (no file's name does), or beginning or ending
    in whitespace: the same path as a store URL (whose whitespace is stripped) or in a
    configuration file names another file.
    """
    text = os.fsdecode(path)
    if "\0" in text:
        raise InvalidStoreURL(f"SQLite path with a NUL character: {shorten(text)}")
    if text != text.strip():
        raise InvalidStoreURL(f"SQLite path begins or ends with whitespace: {shorten(text)}")
    return os.path.abspath(text)


def uncrossable_tls(config: Config) -> str | None:
    """Which TLS context of ``config`` a worker process could not be given whole, and
    why (:func:`~mailstrom.tls_spec.left_behind`), or None."""
    given = [("tls_context", config.tls_context)]
    if config.mta_sts is not None:
        given.append(("mta_sts.tls_context", config.mta_sts.tls_context))
    for name, context in given:
        lost = None if context is None else left_behind(context)
        if lost is not None:
            return f"{name} {lost}"
    return None


def reopens_as_itself(store: Store) -> bool:
    """Whether a worker process would open ``store`` as the class it is: a store pickles
    as the way to open it again (its ``__reduce__``), which names the class of the
    store it derives from for a subclass of the application's (``class
    AuditedStore(SQLiteStore)``). A worker process then ran the base class's methods,
    and not one of the subclass's own, silently."""
    try:
        reopen = store.__reduce__()[0]
    except Exception:  # a store that cannot say cannot cross either
        return False
    return getattr(reopen, "func", reopen) is type(store)


def in_a_call_on(store: Store) -> bool:
    """Whether a frame of this thread, below the caller's, is one of a method of
    ``store``: a signal handler (whose frames come on top of the ones it interrupted)
    reached the caller in the middle of that call."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_locals.get("self") is store:
            return True
        frame = frame.f_back
    return False


def _new_locks_after_fork() -> None:
    """In a process forked from this one: locks of the facades that another thread of
    the parent held at the fork (a stop() waiting for its worker) would never be released
    there, and the fork's own stop() would wait for ever."""
    for facade in list(_FACADES):
        facade._after_fork()


_FACADES: weakref.WeakSet[FacadeBase] = weakref.WeakSet()
os.register_at_fork(after_in_child=_new_locks_after_fork)


WorkerMode = Literal["auto", "thread", "task", "process"] | None
"""Where a facade's worker runs: see :class:`FacadeBase`."""
SyncWorkerMode = Literal["auto", "thread", "process"] | None
"""What :class:`~mailstrom.Mailstrom` takes: ``"task"`` is the async facade's."""
AsyncWorkerMode = Literal["auto", "task", "process"] | None
"""What :class:`~mailstrom.AsyncMailstrom` takes: ``"thread"`` is the sync facade's."""


class AlreadyStarted(WorkerError):
    """start() found a worker running (or a worker process up, or to be started again):
    a :class:`~mailstrom.errors.WorkerError` to the caller, which ``__enter__`` and
    ``__aenter__`` tell from a failure to start: they stop nothing for it, as the worker
    is its starter's, even when it was started by another block after they looked."""


class FacadeBase:
    """The parts both facades share: configuration, the store, the worker, the clock.

    ``worker`` says where delivery runs:

    * ``"process"``: a child process of this one (:mod:`mailstrom.client.process`), with
      an interpreter of its own, so delivery and the application never wait for each
      other's GIL; it opens the store by its URL (as the class a subclass of the
      application's derives from), dies with its parent, and is started again when it
      dies on its own (see :class:`WorkerProcess`);
    * ``"thread"`` (:class:`~mailstrom.Mailstrom`) or ``"task"``
      (:class:`~mailstrom.AsyncMailstrom`): in this process, on a background thread or
      as a task on the running loop;
    * ``None``: nowhere; ``send_email`` only queues, and a separate ``mailstrom worker``
      delivers;
    * ``"auto"`` (the default): a process for a store another process can open (SQLite,
      PostgreSQL), in this process otherwise (the memory store), or when a custom
      ``router``, ``clock`` or ``rng`` is given, or the store is of a subclass of the
      application's (a child would open it as its base class), or a TLS context checks
      CRLs or trusts a ``capath`` directory (neither can be read back), since those
      cannot cross to a child, or
      when there is no interpreter to start (``sys.executable`` empty or None, a frozen
      program: see :func:`~mailstrom.client.process.no_interpreter`).
    """

    _LOCAL = "thread"
    """The name of the in-process mode of this facade."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        store: StoreArgument = None,
        router: Router | None = None,
        clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
        on_result: Callable[[RecipientResult], None] | None = None,
        worker: WorkerMode = "auto",
    ) -> None:
        """``store=None`` opens the default SQLite queue (``~/.local/state/mailstrom/
        queue.db``, or ``/var/spool/mailstrom/queue.db`` for root; see
        :func:`default_store`); a store URL (``store="mail.db"``,
        ``"sqlite:////var/lib/app/mail.db"``, ``"postgresql://mail@db/mail"``) or a path
        object (``store=Path("mail.db")``, always a SQLite file) opens that store. The
        facade closes a store it opened on stop, and when its construction fails; a
        :class:`Store` passed in stays open for the caller (see :func:`facade_store`).
        ``on_result`` is called with each result once recorded: on the worker's loop in
        this process, or on a thread of its own for a worker process. A ``config`` that is
        no :class:`Config`, a ``clock`` or ``on_result`` that cannot be called, or an
        unknown ``worker`` raise :class:`~mailstrom.errors.ConfigError`; so does each
        call that reads a ``clock`` returning no timezone-aware datetime (it is not
        read here: a test's clock may step on each reading)."""
        # Before the store is opened: nothing to close if they are refused.
        self.config = facade_config(config)
        check_callables(clock=clock, on_result=on_result)
        check_parts(router=router, rng=rng)
        self.store, self._owns_store = facade_store(store)
        try:
            self._set_up(router=router, clock=clock, rng=rng, on_result=on_result, worker=worker)
        except BaseException:
            # Nobody gets this facade to stop: what it opened must not stay open.
            if self._owns_store:
                self.store.close()
            raise

    def _set_up(
        self,
        *,
        router: Router | None,
        clock: Callable[[], datetime],
        rng: random.Random | None,
        on_result: Callable[[RecipientResult], None] | None,
        worker: WorkerMode,
    ) -> None:
        """Everything ``__init__`` does once the store is open: the worker, its mode."""
        self._clock = in_utc(clock)
        if self.config.outbox:
            # What this facade records itself (a cancel's failed recipients) reaches the
            # hook and `mailstrom events` too, whether its worker runs here, in another
            # process, or elsewhere.
            self.store.enable_events()
        store_url: str | None = getattr(self.store, "url", None)
        custom = router is not None or clock is not utc_now or rng is not None
        mode = self._mode(
            worker,
            store_url=store_url,
            custom=custom,
            reopened=reopens_as_itself(self.store),
            tls_lost=uncrossable_tls(self.config),
        )
        self.worker_mode: str | None = mode
        """Where this facade's worker runs ("process", "thread"/"task", or None)."""
        self.worker: Worker | WorkerProcess | None = None
        self._results = Watchers()
        """Told of each result of a worker in this process, and (once a ``wait`` started
        it) of the store's wake-ups: ``wait`` listens."""
        self._store_watch: weakref.finalize[[], FacadeBase] | None = None
        # Re-entrant, as is _lifecycle: a signal handler calling stop() runs on the main
        # thread wherever it was, perhaps holding them (see Mailstrom.stop).
        self._store_watch_lock = threading.RLock()
        self._lifecycle = threading.RLock()
        """Held by a facade's start() and stop() (but one called from on_result): one at
        a time, so that two starts do not start two workers, nor a stop() close the store
        under the worker another one is still waiting for. New in a fork (see
        :func:`_new_locks_after_fork`)."""
        _FACADES.add(self)
        if mode == "process":
            self.worker = WorkerProcess(self.config, self.store, on_result=on_result)
        elif mode is not None:
            self._make_worker = functools.partial(
                Worker,
                self.config,
                self.store,
                router=router,
                clock=clock,
                rng=rng,
                on_result=self._result_hook(on_result),
            )
            self.worker = self._make_worker()

    def _after_fork(self) -> None:
        """In a process forked from this one (see :func:`_new_locks_after_fork`)."""
        self._lifecycle = threading.RLock()
        self._store_watch_lock = threading.RLock()

    _make_worker: Callable[[], Worker] | None = None
    """Makes the in-process worker ("thread"/"task" mode): one for each start."""
    _worker_ran = False
    """Whether the in-process worker in :attr:`worker` has been started."""
    _store_closed = False
    _store_closing = False
    """Whether a stop() left the store this facade opened to its worker thread to close
    as it ends (see :meth:`Mailstrom.stop`): new mail is refused meanwhile."""
    _copied_queue = False
    """Whether this is a fork's copy of a queue in memory that the parent's worker
    delivers (see :meth:`Mailstrom._after_fork`)."""
    """Whether :meth:`stop` closed the store this facade opened itself."""

    def _check_startable(self) -> None:
        """WorkerError when this facade cannot start again: :meth:`stop` closed the store
        it had opened. Opening it afresh would give ``memory:`` a new, empty queue, and
        the store object callers already hold (``ms.store``) would stay closed."""
        if self._copied_queue:
            raise WorkerError(
                "this process was forked from the one whose worker delivers this facade's"
                " queue in memory: a worker here would send its copy of that mail again"
            )
        if self._store_closed:
            raise WorkerError(
                "this facade closed the store it opened when it stopped; make a new "
                "facade to start again (or pass a Store you close yourself)"
            )

    def _has_worker_process(self) -> bool:
        """Whether a worker process runs, or is to be started again after a death."""
        worker = self.worker
        return isinstance(worker, WorkerProcess) and (
            worker.pid is not None or worker.restart_pending()
        )

    def _worker_to_start(self, worker: Worker) -> Worker:
        """``worker``, or a fresh one in its place once it has run: a :class:`Worker`
        runs once (the last ``stop()``'s request stays with it, and the next run would
        end at once), so each start after a stop gets a new one, as a worker process is
        a new child each time."""
        if self._worker_ran and self._make_worker is not None:
            worker = self._make_worker()
            self.worker = worker
        self._worker_ran = True
        return worker

    def _close_owned_store(self) -> None:
        """Close the store if this facade opened it (at the end of ``stop()``), once:
        a worker thread stopped from its own on_result closes it as it ends, and a
        stop() from the application may come meanwhile."""
        with self._store_watch_lock:
            closing = self._owns_store and not self._store_closed
            self._store_closed = self._store_closed or closing
        if not closing:
            return
        if not in_a_call_on(self.store):
            self.store.close()
            return
        # A signal handler's stop() (SIGTERM's) that interrupted this very thread in a
        # call on the store, send_email's write above all: closing it here waited for
        # ever for the lock that call holds, which it cannot let go of before the
        # handler returns. Closed on a thread of its own, behind that call, which ends
        # as if the stop() had come after it; the next call hears the store is closed.
        closer = threading.Thread(target=self.store.close, name="mailstrom-store-close")
        try:
            closer.start()
        except RuntimeError as exc:  # no thread left: it stays open until this process ends
            logging.getLogger("mailstrom").error("the store could not be closed: %s", exc)

    def _result_hook(
        self, on_result: Callable[[RecipientResult], None] | None
    ) -> Callable[[RecipientResult], None]:
        """``on_result``, then a word to whoever waits for results (one call per result,
        on the worker's loop)."""
        notify = self._results.notify
        if on_result is None:
            return lambda result: notify()

        def hook(result: RecipientResult) -> None:
            try:
                on_result(result)
            finally:
                notify()

        return hook

    def _watch_store_for_waiters(self) -> None:
        """Forward the store's wake-ups (mail retried or released) to ``wait`` callers:
        one watch per facade, started by the first wait and shared by all (a PostgreSQL
        watch holds a LISTEN connection), ended by ``stop``, or when the facade is
        collected: one made for a request and dropped without a stop() (``worker=None``)
        left its watch behind for good (with SQLite a thread and a socket each)."""
        with self._store_watch_lock:
            if self._store_watch is None:
                unwatch = self.store.watch(self._results.notify)  # (holds no facade)
                self._store_watch = weakref.finalize(self, unwatch)
                self._store_watch.atexit = False  # the process's end ends it as before

    def _unwatch_store(self) -> None:
        with self._store_watch_lock:
            unwatch, self._store_watch = self._store_watch, None
        if unwatch is not None:
            unwatch()

    def _mode(
        self,
        worker: WorkerMode,
        *,
        store_url: str | None,
        custom: bool,
        reopened: bool = True,
        tls_lost: str | None = None,
    ) -> str | None:
        if worker is None or worker == self._LOCAL:
            return worker
        if worker == "auto":
            # A program without an interpreter to start (an empty sys.executable, a
            # frozen program) keeps delivery in this process, as for the memory store;
            # so does a store a child would open as another class (see reopens_as_itself).
            # A TLS context a child would not get whole too (its CRLs: tls_spec.py).
            child = store_url is not None and reopened and not custom and tls_lost is None
            return "process" if child and no_interpreter() is None else self._LOCAL
        if worker != "process":
            raise ConfigError(f"worker must be {self._LOCAL!r}, 'process', 'auto' or None")
        if store_url is None:
            raise WorkerError(
                "worker='process' needs a store another process can open (SQLite or "
                "PostgreSQL), not a store in this process's memory"
            )
        if custom:
            raise WorkerError(
                "a custom router, clock or rng cannot be passed to a worker process; "
                f"use worker={self._LOCAL!r}"
            )
        if tls_lost is not None:
            # Never a child accepting other certificates than a worker here would: it
            # accepted revoked ones, or refused those a capath directory's CAs sign.
            raise WorkerError(
                f"{tls_lost}: what it trusts cannot be read back from an ssl.SSLContext "
                f"for a worker process; use worker={self._LOCAL!r}"
            )
        return "process"

    def _hurry_stop(self, timeout: float | None) -> None:
        """Tell the worker a stop() under way (another thread's, or one a signal handler
        interrupted) is asked for again with ``timeout``: the shortest drain wins at
        once, where this stop() would reach the worker only after that one's bound."""
        worker = self.worker
        if isinstance(worker, WorkerProcess):
            worker.hurry(timeout)
        elif isinstance(worker, Worker):
            worker.request_stop(drain_timeout=timeout)

    @property
    def worker_status(self) -> WorkerStatus:
        """Whether the worker runs, what it did, and whether the store troubles it; a
        facade without a worker reports ``running=False``."""
        if self.worker is None:
            return WorkerStatus(running=False)
        return self.worker.status

    _queue_stats: QueueStatsCache | None = None

    def _metrics_snapshot(self) -> MetricsSnapshot:
        """The worker's status and counters with the queue's counts (read from the store
        at most every 5 seconds, shared by every caller)."""
        cache = self._queue_stats
        if cache is None:
            hook = self.config.hook is not None
            cache = self._queue_stats = QueueStatsCache(self.store, hook_backlog=hook)
        stats, read_at, workers = cache.reading()
        return MetricsSnapshot(
            worker=self.worker_status, queue=stats, queue_read_at=read_at, workers=workers
        )

    def wake(self) -> None:
        """Look for due work now (e.g. after advancing an injected clock)."""
        if self.worker is not None:
            self.worker.wake()

    def _suppressed(self, address: str) -> Suppression | None:
        """The entry that applies to ``address`` now (its own, else its domain's)."""
        target = normalize_target(address)
        found = self.store.suppressions_for(lookup_targets([target]), now=self._clock())
        return match(target, found)

    def _prepare_batch(self, batch: Sequence[MessageInput]) -> list[PreparedMessage]:
        """``send_emails``'s messages prepared. The error about one of them is noted with
        its place in the batch, which its own words do not give ("the encoded message is
        at least 5000 octets"), so a caller of many knows which to mend."""
        prepared = []
        for index, message in enumerate(batch):
            try:
                prepared.append(self._prepare(message, None, None))
            except InvalidMessage as exc:
                exc.add_note(
                    f"send_emails: message {index} of {len(batch)} (counting from 0); "
                    "none of the batch was queued"
                )
                raise
        return prepared

    def _prepare(
        self,
        message: MessageInput,
        envelope_from: str | None,
        envelope_to: Sequence[str] | None,
        dsn: DSN | None = None,
        **attributes: Any,
    ) -> PreparedMessage:
        return prepare_for(
            self.config,
            message,
            envelope_from=envelope_from,
            envelope_to=envelope_to,
            now=self._clock(),
            dsn=dsn,
            **attributes,
        )

    def _queue(
        self,
        message: MessageInput,
        envelope_from: str | None,
        envelope_to: Sequence[str] | None,
        dsn: DSN | None = None,
        *,
        begin: Callable[[], None] = lambda: None,
        **attributes: Any,
    ) -> str:
        """Prepare ``message`` and queue it durably: the whole of ``send_email``, which
        the async facade runs in a thread (``begin`` is called between the two: see
        :func:`~mailstrom.client.operations.write_unless_cancelled`)."""
        prepared = self._prepare(message, envelope_from, envelope_to, dsn, **attributes)
        begin()
        return self._store_for_new_mail().enqueue(prepared, now=self._clock())

    def _store_for_new_mail(self) -> Store:
        """The store, to queue new mail in; StoreError once a stop() is closing it, or
        in a fork's copy of a queue in memory: no worker delivers that copy (the
        parent's cannot see it, and none may start here), and mail queued in it stayed
        queued for good, its sender given an id as if it would go."""
        if self._store_closing:
            raise StoreError("the store is closed")
        if self._copied_queue:
            raise StoreError(
                "this process was forked from the one whose worker delivers this facade's"
                " queue in memory: mail queued in this process's copy would never be sent"
            )
        return self.store


def facade_config(config: object) -> Config:
    """A facade's ``config``: the defaults for None; ConfigError for anything but a
    :class:`Config`. Kept as it was, a store URL given first (``Mailstrom("mail.db")``)
    had the facade open the default queue, then fail in ``start()`` with a TypeError
    (or in ``send_email`` with an AttributeError)."""
    if config is None:
        return Config()
    if not isinstance(config, Config):
        hint = (
            " (a store URL or path goes in store=)" if isinstance(config, str | os.PathLike) else ""
        )
        raise ConfigError(
            f"config must be a mailstrom.Config or None, not {type(config).__name__}{hint}"
        )
    return config


def check_callables(*, clock: object, on_result: object) -> None:
    """ConfigError for a facade's ``clock`` or ``on_result`` (None: no callback) that
    cannot be called: such a clock failed each ``send_email`` with a TypeError, such a
    callback each result (logged, while the application heard of none)."""
    for name, value in (("clock", clock), ("on_result", on_result)):
        if not callable(value) and not (name == "on_result" and value is None):
            raise ConfigError(f"{name} must be callable, not {type(value).__name__}")
        if inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(
            getattr(value, "__call__", None)  # noqa: B004 - an object with an async __call__
        ):
            # Called, never awaited: each call made a coroutine that nobody ran, and the
            # application heard of nothing (a RuntimeWarning at most).
            raise ConfigError(
                f"{name} must not be a coroutine function (async def): it is called, not "
                "awaited; pass a plain function (it may hand the work to a loop itself)"
            )


def check_parts(*, router: object, rng: object) -> None:
    """ConfigError for a facade's ``router`` that is no :class:`~mailstrom.routing.Router`
    or ``rng`` that is no :class:`random.Random` (None: the defaults). Kept, such a router
    deferred every recipient with "internal error: AttributeError" until the retry
    policy's ``max_age`` failed it, while ``worker_status`` said running with no error;
    such an rng raised where a retry's delay was drawn."""
    parts = (
        ("router", router, Router, "mailstrom.routing.Router"),
        ("rng", rng, random.Random, "random.Random"),
    )
    for name, value, kind, kind_name in parts:
        if value is not None and not isinstance(value, kind):
            shown = (
                f"the class {value.__name__}" if isinstance(value, type) else type(value).__name__
            )
            raise ConfigError(f"{name} must be a {kind_name} or None, not {shown}")


def stop_timeout(timeout: object) -> float | None:
    """``stop()``'s timeout: None (as long as the deliveries take) or a finite number of
    seconds, at most 100 years (a negative one: none); InvalidArgument for anything else,
    before anything is stopped. Infinity made the wait for the worker raise OverflowError
    after the worker was asked to stop, and the store was closed under it; a string
    reached the worker's drain."""
    return None if timeout is None else check_timeout(timeout)


def batch_of(messages: object) -> list[MessageInput]:
    """The messages of a ``send_emails`` batch, listed (a generator is read once);
    InvalidMessageType for one message given alone (bytes would be read as a sequence
    of ints), a string, or anything that is no collection."""
    if isinstance(messages, Email | EmailMessage | bytes | bytearray | memoryview | str) or (
        not isinstance(messages, Iterable)
    ):
        raise InvalidMessageType(
            f"send_emails takes a list of messages, not {type(messages).__name__}"
        )
    return list(messages)


def suppression_entry(
    target: str,
    reply: str,
    *,
    source: SuppressionSource,
    expires_at: datetime | None,
    now: datetime,
) -> Suppression:
    """The entry a facade's ``suppress`` writes; InvalidSuppression for a bad target, a
    naive or past expiry, or a reply :func:`~mailstrom.suppression.check_reply` refuses."""
    if expires_at is not None:
        if not isinstance(expires_at, datetime) or expires_at.utcoffset() is None:
            raise InvalidSuppression("expires_at must be a timezone-aware datetime")
        if expires_at <= now:
            raise InvalidSuppression(f"expires_at {expires_at.isoformat()} is not in the future")
        check_entry_time(expires_at, what="expires_at")
    return Suppression(
        target=normalize_target(target),
        source=suppression_source(source),
        reply=check_reply(reply),
        created_at=now,
        expires_at=expires_at,
    )


def suppression_source(source: object) -> SuppressionSource:
    """``source`` as a :class:`SuppressionSource` (one, or its value);
    InvalidSuppression for anything else, where the enum raised a plain ValueError."""
    found = member_of(SuppressionSource, source)
    if found is not None:
        return found
    known = ", ".join(s.value for s in SuppressionSource)
    got = repr(source[:40]) if isinstance(source, str) else type(source).__name__
    raise InvalidSuppression(f"source must be a SuppressionSource ({known}), got {got}")


def prepare_for(
    config: Config,
    message: MessageInput,
    *,
    envelope_from: str | None,
    envelope_to: Sequence[str] | None,
    now: datetime,
    tags: Iterable[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    priority: str | None = None,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
    max_age: timedelta | None = None,
    idempotency_key: str | None = None,
    dsn: DSN | None = None,
) -> PreparedMessage:
    """Validate, encode and sign ``message`` under ``config`` (what send_email queues).

    ``tags``, ``metadata`` and ``priority`` replace the :class:`Email`'s own when given;
    with the schedule and the idempotency key they become the message's
    :class:`~mailstrom.message.attributes.QueueAttributes` (validated here, so bad values
    raise before anything is encoded). ``dsn`` (else an :class:`Email`'s own ``dsn``) is
    the delivery status notification request the message carries in its envelope.

    A message that DKIM is configured for but no key signed is logged (a WARNING on
    ``mailstrom.dkim``, ``event = "dkim_unsigned"``): it may fail DMARC at the receiver.
    """
    # A non-string is refused with InvalidAddress where the envelope is decided.
    if isinstance(envelope_from, str) and is_verp_template(envelope_from):
        check_verp_template(envelope_from)
    if isinstance(message, Email):
        tags = message.tags if tags is None else tags
        metadata = message.metadata if metadata is None else metadata
        priority = message.priority if priority is None else priority
    attributes = queue_attributes(
        tags=tags,
        metadata=metadata,
        priority=config.default_priority if priority is None else priority,
        lanes=config.lane_names,
        send_at=send_at,
        expires_at=expires_at,
        max_age=max_age,
        idempotency_key=idempotency_key,
        idempotency_window=config.idempotency_window,
        now=now,
    )
    prepared = prepare(
        message,
        envelope_from=envelope_from,
        envelope_to=envelope_to,
        max_size=config.max_message_size,
        max_recipients=config.max_recipients,
        now=now,
        id_domain=config.message_id_domain,
        fallback_id_domain=config.helo_name,
        dkim=config.dkim,
        send_at=attributes.send_at,
    )
    if is_verp_template(prepared.envelope_from):
        # Again as it is sent: prepare() unquotes a local part that needs no quotes and
        # puts a UTF-8 one in NFC, which can put a hex digit next to {token} (no bounce
        # would match), make a template of "\{token\}", or take it past 64 octets.
        check_verp_template(prepared.envelope_from)
    if config.dkim is not None and not prepared.dkim:
        log_unsigned(prepared)
    if dsn is None and isinstance(message, Email):
        dsn = message.dsn
    if dsn is not None and not isinstance(dsn, DSN):
        raise InvalidMessage(f"dsn must be a DSN, not {type(dsn).__name__}")
    return dataclasses.replace(prepared, attributes=attributes, dsn=dsn)


_dkim_log = logging.getLogger("mailstrom.dkim")


def log_unsigned(prepared: PreparedMessage) -> None:
    """One record saying that ``prepared`` goes out without a DKIM signature."""
    if _dkim_log.isEnabledFor(logging.WARNING):
        _dkim_log.warning(
            "not DKIM-signed: %s (Message-ID %s, envelope sender %s)",
            prepared.dkim_unsigned,
            prepared.header_message_id,
            prepared.envelope_from or "<>",
            extra={
                "event": "dkim_unsigned",
                "fields": {
                    "header_message_id": prepared.header_message_id,
                    "from": prepared.envelope_from,
                    "reason": prepared.dkim_unsigned,
                },
            },
        )


Clock = Callable[[], datetime]

"""What the command line does to the queue, as methods of both facades: short ids, hold and
release, bulk retry and cancel, purge, counts, the queue's shape, suspended destinations,
and waiting for a message's outcome.

:class:`QueueOperations` is mixed into :class:`~mailstrom.Mailstrom` (blocking calls) and
:class:`AsyncQueueOperations` into :class:`~mailstrom.AsyncMailstrom` (the same calls,
awaited; the store is called in a thread). Every method that takes message ids accepts
full ids or unique prefixes, one id or many, or a :class:`~mailstrom.stores.QueueFilter`
selecting the messages (at most its ``limit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from mailstrom.arguments import (
    check_age,
    check_key,
    check_limit,
    check_time,
    check_timeout,
    member_of,
    shown,
)
from mailstrom.bounds import EARLIEST_TIME, MAX_DURATION
from mailstrom.errors import InvalidArgument, StoreLocked, StoreUnreachable, WorkerError
from mailstrom.status import MessageStatus, QueueStats, RecipientState
from mailstrom.stores.base import QueueFilter, Store
from mailstrom.stores.operator import (
    AGE_EDGES,
    ID_LENGTH,
    ShapeRow,
    Suspension,
    normalize_domain,
    normalize_prefix,
    purge_candidates,
)
from mailstrom.stores.watchers import Watchers
from mailstrom.suppression import MAX_TARGET, page_after

Messages = str | Iterable[str] | QueueFilter
"""Which messages a bulk method acts on: one id, several ids (full or unique prefixes), or
a filter."""

WAIT_POLL = 0.25
"""Seconds between looks at the store while waiting when nothing can announce a result:
a worker in another process records results without telling this one. With the worker
in this process (``worker="thread"``/``"task"``) every result wakes the waiter at once."""


PASSING = (StoreUnreachable, StoreLocked)
"""The store errors a wait looks again after, until its time is up: the server could not
be reached (a restart, a failover) or a lock was held too long, which the worker it waits
for rides out too. Any other (a closed store, a damaged one) ends the wait at once."""


def settled(status: MessageStatus, deadline: datetime) -> bool:
    """Whether waiting for ``status`` until ``deadline`` is over: every recipient is final,
    or the message is held, or every pending recipient's next attempt falls after the
    deadline (nothing can change before then): a deferred recipient's retry, or a queued
    one's ``send_at`` (a lease leaves ``next_attempt_at`` alone, so one in flight is due).
    Mail retried or released meanwhile wakes the waiter through the store's watch."""
    if status.held:
        return True
    for r in status.recipients:
        if r.state.is_final:
            continue
        if r.next_attempt_at is None:
            return False
        if r.next_attempt_at <= deadline:
            return False
    return True


def resolve(store: Store, message_id: str) -> str:
    """``message_id`` as a full id: a full id lower-cased (no extra look-up; ids are
    stored in lower case and taken in any case), a prefix resolved. Anything but a string
    of hex digits is no id: :class:`~mailstrom.errors.UnknownMessage`, from the check a
    prefix gets. A 32-character string skipped that check, and one with a lone surrogate
    (or a NUL, on PostgreSQL) reached the store's query, which raised StoreRefusedData."""
    if isinstance(message_id, str) and len(message_id) == ID_LENGTH:
        text = normalize_prefix(message_id)
        if len(text) == ID_LENGTH:
            return text
    return store.resolve_id(message_id)


def checked_filter(where: object) -> QueueFilter | None:
    """``where`` when it is a :class:`QueueFilter` or None; InvalidArgument otherwise (a
    store would fail on it with an AttributeError of its own)."""
    if where is not None and not isinstance(where, QueueFilter):
        raise InvalidArgument(
            f"where: expected a QueueFilter or None, got {shown(where)}", argument="where"
        )
    return where


def checked_page(after: object, limit: object) -> tuple[str, int]:
    """The arguments of ``suppressions()``: ``after`` a target (or ""), taken as
    ``suppress`` takes one (:func:`~mailstrom.suppression.page_after`), ``limit`` a
    count; InvalidArgument for anything else (a negative limit, None, a lone surrogate
    SQLite could not compare)."""
    if isinstance(after, str):
        after = page_after(after)
    return check_key(after, "after", limit=MAX_TARGET), check_limit(limit, "limit")


def suspension_end(now: datetime, for_: object, until: object) -> datetime | None:
    """When a suspension asked for with ``for_`` or ``until`` (not both) ends; None for
    no end. InvalidArgument for a naive ``until`` (the memory store kept it, and each
    lease then failed comparing it with an aware time), an ``until`` more than 100
    years ahead or before 1900, or a ``for_`` that is no duration of 0 to 100 years:
    an end in year 9999 was kept, and SQLite and PostgreSQL, which read back no time
    from year 9000 on (:data:`~mailstrom.bounds.LATEST_TIME`), listed the suspension as
    one without an end while the memory store showed it."""
    if for_ is not None and until is not None:
        raise InvalidArgument("give for_ or until, not both", argument="for_")
    if for_ is not None:
        return now + check_age(for_, "for_")
    if until is not None:
        end = check_time(until, "until")
        if end < EARLIEST_TIME or end - now > MAX_DURATION:
            raise InvalidArgument(
                f"until: expected a time from {EARLIEST_TIME.year} to {MAX_DURATION.days} "
                f"days from now, got {end.isoformat()}",
                argument="until",
            )
        return end
    return None


FINISHED_STATES = (RecipientState.DELIVERED, RecipientState.FAILED)
"""The states ``purge(state=...)`` takes: only finished mail is deleted."""


def purge_state(state: object) -> RecipientState | None:
    """``state`` (None, a finished state or its value) as ``purge`` passes it to the
    store; InvalidArgument for anything else. SQLite read every state but DELIVERED as
    FAILED: ``state="delivered"`` (a string) or ``QUEUED`` deleted the failed messages."""
    if state is None:
        return None
    found = member_of(RecipientState, state)
    if found in FINISHED_STATES:
        return found
    raise InvalidArgument(
        f"state: expected None, RecipientState.DELIVERED or RecipientState.FAILED, got "
        f"{shown(state)}",
        argument="state",
    )


def select(store: Store, messages: Messages, now: datetime) -> list[str]:
    """Full ids of ``messages`` (ids resolved in order, without repeats; a filter queried).
    Each id is looked up, a full one too, as ``mailstrom hold`` does: UnknownMessage for
    one not stored, before anything changes. Taken as it was (:func:`resolve`), a full id
    purged meanwhile or mistyped was skipped in silence by the bulk write, which changed
    the others of the list."""
    if isinstance(messages, QueueFilter):
        return store.select_ids(now=now, where=messages)
    if isinstance(messages, str | bytes | bytearray) or not isinstance(messages, Iterable):
        messages = [messages]  # bytes are one (bad) id, not a sequence of ints
    return list(dict.fromkeys(store.resolve_id(m) for m in messages))


class _Base:
    """What the mixins expect of the facade they are mixed into."""

    store: Store
    _clock: Callable[[], datetime]
    _results: Watchers

    def _watch_store_for_waiters(self) -> None:
        raise NotImplementedError  # the facade's (FacadeBase)

    def _delivers_on_this_thread(self) -> bool:
        """Whether this thread is the one the facade's worker delivers on (in
        ``on_result``): nothing it waits for can happen before it returns."""
        return False


class QueueOperations(_Base):
    """The blocking operator methods of :class:`~mailstrom.Mailstrom`.

    >>> ms.hold("0190f3a2")                                  # doctest: +SKIP
    1
    >>> ms.retry_many(QueueFilter(domain="example.org"))     # doctest: +SKIP
    12
    >>> ms.suspend("example.org", for_=timedelta(hours=2))   # doctest: +SKIP
    """

    def resolve_id(self, prefix: str) -> str:
        """The full id of the one message whose id starts with ``prefix``; raises
        :class:`~mailstrom.errors.UnknownMessage` or (several match)
        :class:`~mailstrom.errors.AmbiguousMessageId` with the candidates."""
        return self.store.resolve_id(prefix)

    def hold(self, messages: Messages) -> int:
        """Keep messages from being delivered until released; returns how many changed."""
        return self.store.hold_many(select(self.store, messages, self._clock()), True)

    def release(self, messages: Messages) -> int:
        """Let held messages be delivered again; returns how many changed (one that
        finished while held is not held, and counts none)."""
        return self.store.hold_many(select(self.store, messages, self._clock()), False)

    def retry_many(self, messages: Messages) -> int:
        """Make the pending recipients of messages due now; returns how many."""
        now = self._clock()
        return self.store.retry_many(select(self.store, messages, now), now=now)

    def cancel_many(self, messages: Messages) -> int:
        """Fail the pending recipients of messages as "cancelled"; returns how many."""
        now = self._clock()
        return self.store.cancel_many(select(self.store, messages, now), now=now)

    def purge(
        self,
        older_than: timedelta,
        *,
        state: RecipientState | None = None,
        messages: Messages | None = None,
    ) -> int:
        """Delete finished messages whose last recipient finished more than ``older_than``
        ago: only delivered ones (``state=DELIVERED``), only failed ones (``FAILED``), or
        both; ``messages`` limits it to those (a filter's ``limit`` counts only messages
        it can delete: finished, queued before the cutoff). Pending mail is never
        deleted. Returns how many messages were deleted. ``older_than`` is at most 100
        years (a negative one takes in what finished up to that long from now)."""
        now = self._clock()
        age = check_age(older_than, "older_than", signed=True)
        cutoff = now - age
        state = purge_state(state)
        if messages is not None:
            if isinstance(messages, QueueFilter):
                messages = purge_candidates(messages, age, state)
            ids = select(self.store, messages, now)
            return self.store.purge_many(ids, finished_before=cutoff, state=state)
        if state is None:
            return self.store.purge(finished_before=cutoff)
        return self.store.purge_state(finished_before=cutoff, state=state)

    def query(self, where: QueueFilter | None = None) -> list[MessageStatus]:
        """Messages matching ``where`` (by default any message), newest first, without
        attempt history: at most ``where.limit``, which is 100 unless given
        (``QueueFilter(limit=10_000)``); :meth:`count` says how many match in all."""
        return self.store.query(now=self._clock(), where=checked_filter(where))

    def count(self, where: QueueFilter | None = None, *, cap: int = 1_000_000) -> int:
        """How many messages match ``where``, counting at most ``cap`` (0 to 2**63-1)."""
        where = checked_filter(where) or QueueFilter()
        return self.store.count(now=self._clock(), where=where, cap=check_limit(cap, "cap"))

    def stats(self) -> QueueStats:
        """Recipients by state, pending recipients by domain, messages and held ones."""
        return self.store.stats()

    def shape(self) -> list[ShapeRow]:
        """Pending recipients per destination domain and message age (0-5m, 5-10m, ...,
        160m+), largest domain first: ``mailstrom queue --shape``."""
        return self.store.shape(now=self._clock(), edges=AGE_EDGES)

    def message_data(self, message_id: str) -> bytes:
        """The message as stored, the bytes the worker sends."""
        return self.store.message_data(resolve(self.store, message_id))

    def suspend(
        self, domain: str, *, for_: timedelta | None = None, until: datetime | None = None
    ) -> None:
        """Stop delivery to ``domain`` for ``for_`` (up to 100 years), until ``until`` (a
        timezone-aware datetime, at most 100 years ahead), or until :meth:`resume`; its
        messages stay queued and no attempt is counted. Every worker of the store
        honours it at once: what it leased of the domain and has not started goes back
        unsent."""
        now = self._clock()
        self.store.suspend(
            normalize_domain(domain), now=now, until=suspension_end(now, for_, until)
        )

    def resume(self, domain: str) -> bool:
        """Restart delivery to ``domain``; False when it was not suspended (a timed
        suspension that has ended is none)."""
        return self.store.resume(normalize_domain(domain, stored=True), now=self._clock())

    def suspensions(self) -> list[Suspension]:
        """The destinations suspended now."""
        return self.store.suspensions(now=self._clock())

    def wait(self, message_id: str, timeout: float) -> MessageStatus:
        """Wait until every recipient of the message is final, or until nothing can change
        before ``timeout`` seconds have passed (every pending recipient's next attempt falls
        later, or the message is held), or for ``timeout`` seconds (a finite number of
        at most 100 years; 0 or less looks once); return its status.

        Woken by the store's watch (mail retried or released; one watch per facade,
        shared by every wait, until :meth:`stop`) and, with the worker in this process, by
        each result; otherwise it looks every :data:`WAIT_POLL` seconds. A look that
        fails for a passing trouble (:data:`PASSING`) is tried again every
        :data:`WAIT_POLL` seconds; the error is raised when the time is up. Called from
        ``on_result`` on a worker thread, which delivers nothing until the callback
        returns, it raises :class:`~mailstrom.errors.WorkerError`.
        """
        seconds = check_timeout(timeout)
        if self._delivers_on_this_thread():
            # It held every delivery of the worker for its whole timeout, and returned a
            # status that could not have changed meanwhile.
            raise WorkerError(
                "wait() from on_result: the worker thread it runs on delivers nothing "
                "until the callback returns"
            )
        mid = resolve(self.store, message_id)
        give_up = time.monotonic() + seconds
        deadline = self._clock() + timedelta(seconds=seconds)
        changed = threading.Event()
        self._watch_store_for_waiters()
        unlisten = self._results.add(changed.set)
        try:
            while True:
                changed.clear()
                try:
                    status: MessageStatus | None = self.store.status(mid)
                except PASSING:
                    if give_up - time.monotonic() <= 0:
                        raise
                    status = None
                left = give_up - time.monotonic()
                if status is not None and (settled(status, deadline) or left <= 0):
                    return status
                changed.wait(max(min(left, WAIT_POLL), 0))
        finally:
            unlisten()


_T = TypeVar("_T")


async def finish_in_thread(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """``asyncio.to_thread(func, ...)`` for work that must be done even when its caller
    is cancelled (closing the store a stop() opened): cancelled, it still waits for the
    thread (which cannot be stopped) before raising CancelledError."""
    future = asyncio.ensure_future(asyncio.to_thread(func, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await _outlast(future)
        raise


async def write_in_thread(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """``asyncio.to_thread(func, ...)`` for a store write (see
    :func:`write_unless_cancelled`): cancelled once the thread runs it, it waits for the
    write before raising CancelledError. Raised at once, it left the write going on
    behind the caller's back: a message held, purged or cancelled after the caller was
    told it was cancelled, and perhaps written into a store that ``stop()`` (the ``async
    with`` exit) had closed meanwhile. Cancelled while it still waits for a thread of
    the loop's executor (all busy), it raises at once, and the write never happens:
    waited for, it was made once a thread came free, behind the caller's back."""

    def write(start: WriteStart) -> _T:
        start.begin()
        return func(*args, **kwargs)

    return await write_unless_cancelled(write)


class _Abandoned(Exception):
    """The caller was cancelled before the write began: nothing was written."""


class WriteStart:
    """Where a thread's work reaches the store (:func:`write_unless_cancelled`): the
    write begins only if its caller still awaits it, so that a caller cancelled before
    then is told so at once, and nothing it asked for is written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._begun = False
        self._abandoned = False

    def begin(self) -> None:
        """Called in the thread just before the write: raises when it is not to be."""
        with self._lock:
            if self._abandoned:
                raise _Abandoned
            self._begun = True

    def abandon(self) -> bool:
        """The caller is cancelled: True when the write had not begun (and never will)."""
        with self._lock:
            self._abandoned = not self._begun
            return self._abandoned


async def write_unless_cancelled(func: Callable[[WriteStart], _T]) -> _T:
    """``func`` in a thread, which calls :meth:`WriteStart.begin` right before its store
    write (after the work that may take long: a large message's encoding and signing).
    Cancelled before then, it raises CancelledError at once and the write never happens;
    cancelled once the write has begun, it waits for it as :func:`finish_in_thread` does.
    Waiting for the whole thread queued a message whose caller had been told it was
    cancelled (a timeout around ``send_email``), and made that caller wait for it."""
    start = WriteStart()
    future = asyncio.ensure_future(asyncio.to_thread(func, start))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if start.abandon():
            future.add_done_callback(_retrieved)  # it ends on _Abandoned, or its own error
        else:
            await _outlast(future)
        raise


async def _outlast(future: asyncio.Future[Any]) -> None:
    """Wait for ``future`` (a thread's) to end, through further cancels; its outcome is
    dropped (the caller's is the cancellation)."""
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            continue  # a second cancel: still the same write to wait for
        except Exception:
            break
    _retrieved(future)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Read ``future``'s error so that asyncio does not log it as never retrieved."""
    if future.done() and not future.cancelled():
        future.exception()


class AsyncQueueOperations(_Base):
    """The operator methods of :class:`~mailstrom.AsyncMailstrom`: those of
    :class:`QueueOperations`, awaited (each store call runs in a thread)."""

    def _sync(self) -> QueueOperations:
        ops = QueueOperations()
        ops.store, ops._clock, ops._results = self.store, self._clock, self._results
        return ops

    async def resolve_id(self, prefix: str) -> str:
        """See :meth:`QueueOperations.resolve_id`."""
        return await asyncio.to_thread(self._sync().resolve_id, prefix)

    async def hold(self, messages: Messages) -> int:
        """See :meth:`QueueOperations.hold`."""
        return await write_in_thread(self._sync().hold, messages)

    async def release(self, messages: Messages) -> int:
        """See :meth:`QueueOperations.release`."""
        return await write_in_thread(self._sync().release, messages)

    async def retry_many(self, messages: Messages) -> int:
        """See :meth:`QueueOperations.retry_many`."""
        return await write_in_thread(self._sync().retry_many, messages)

    async def cancel_many(self, messages: Messages) -> int:
        """See :meth:`QueueOperations.cancel_many`."""
        return await write_in_thread(self._sync().cancel_many, messages)

    async def purge(
        self,
        older_than: timedelta,
        *,
        state: RecipientState | None = None,
        messages: Messages | None = None,
    ) -> int:
        """See :meth:`QueueOperations.purge`."""
        ops = self._sync()
        return await write_in_thread(lambda: ops.purge(older_than, state=state, messages=messages))

    async def query(self, where: QueueFilter | None = None) -> list[MessageStatus]:
        """See :meth:`QueueOperations.query`."""
        return await asyncio.to_thread(self._sync().query, where)

    async def count(self, where: QueueFilter | None = None, *, cap: int = 1_000_000) -> int:
        """See :meth:`QueueOperations.count`."""
        ops = self._sync()
        return await asyncio.to_thread(lambda: ops.count(where, cap=cap))

    async def stats(self) -> QueueStats:
        """See :meth:`QueueOperations.stats`."""
        return await asyncio.to_thread(self.store.stats)

    async def shape(self) -> list[ShapeRow]:
        """See :meth:`QueueOperations.shape`."""
        return await asyncio.to_thread(self._sync().shape)

    async def message_data(self, message_id: str) -> bytes:
        """See :meth:`QueueOperations.message_data`."""
        return await asyncio.to_thread(self._sync().message_data, message_id)

    async def suspend(
        self, domain: str, *, for_: timedelta | None = None, until: datetime | None = None
    ) -> None:
        """See :meth:`QueueOperations.suspend`."""
        ops = self._sync()
        await write_in_thread(lambda: ops.suspend(domain, for_=for_, until=until))

    async def resume(self, domain: str) -> bool:
        """See :meth:`QueueOperations.resume`."""
        return await write_in_thread(self._sync().resume, domain)

    async def suspensions(self) -> list[Suspension]:
        """See :meth:`QueueOperations.suspensions`."""
        return await asyncio.to_thread(self._sync().suspensions)

    async def wait(self, message_id: str, timeout: float) -> MessageStatus:
        """See :meth:`QueueOperations.wait`; waits on the running loop, woken from any
        thread, and can be cancelled."""
        loop = asyncio.get_running_loop()
        seconds = check_timeout(timeout)
        mid = await asyncio.to_thread(resolve, self.store, message_id)
        give_up = loop.time() + seconds
        deadline = self._clock() + timedelta(seconds=seconds)
        changed = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(changed.set)

        await asyncio.to_thread(self._watch_store_for_waiters)
        unlisten = self._results.add(wake)
        try:
            while True:
                changed.clear()
                try:
                    status: MessageStatus | None = await asyncio.to_thread(self.store.status, mid)
                except PASSING:
                    if give_up - loop.time() <= 0:
                        raise
                    status = None
                left = give_up - loop.time()
                if status is not None and (settled(status, deadline) or left <= 0):
                    return status
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), max(min(left, WAIT_POLL), 0))
        finally:
            unlisten()

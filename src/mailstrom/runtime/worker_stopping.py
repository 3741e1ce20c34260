"""How a worker stops: deliveries in flight drained, pending results written, the hook
sender finished, and what was leased and never attempted given back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from mailstrom.config import Config
from mailstrom.errors import StoreError
from mailstrom.runtime.dispatch import Dispatcher
from mailstrom.runtime.worker_store import WorkerStore
from mailstrom.stores.base import RecipientResult

if TYPE_CHECKING:
    from mailstrom.runtime.hooks import HookSender
    from mailstrom.runtime.worker import _LeaseState

log = logging.getLogger("mailstrom.worker")

_FINAL_RECORD = 30.0
"""Seconds a stopping worker keeps retrying a failing store, with no drain timeout set."""

_LAST_WRITE = 2.0
"""Seconds a stopping worker waits at least for the write of the results it holds,
whatever the drain timeout (0: stop at once):
a write under way (in a thread, for PostgreSQL) cut off there left delivered recipients
leased, to go out again when the lease expired. Bounded as the store's own waits on stop
are (PostgreSQL's ``STOP_WAIT``): a store that hangs does not hold the exit."""


class WorkerStopping(WorkerStore):
    """The steps of :meth:`Worker.run`'s clean-up; mixed into :class:`Worker`."""

    config: Config
    _wake: asyncio.Event | None
    _closing: bool
    _drain_timeout: float | None
    _drain_until: float | None
    _stop_asked: bool
    _stop_tightened: asyncio.Event
    _retry_until: float
    _pending: list[RecipientResult]
    _settle_cut_write: Callable[[float | None], Awaitable[None]]
    _hooks: HookSender | None
    _leases: dict[str, _LeaseState]
    _items: dict[tuple[str, str, str], int]
    _item_lanes: dict[tuple[str, str, str], str]
    _lane_load: dict[str, int]

    def _tighten_stop(self, drain_timeout: float | None) -> None:
        """Take in a stop's ``drain_timeout`` (from any thread; a signal handler's too, so
        no lock): the first sets the drain's end, a later one only brings it closer. The
        waits of the drain and of the last records under way see it at once
        (:meth:`_stop_now` on the loop sets ``_stop_tightened``)."""
        until = None if drain_timeout is None else time.monotonic() + max(0.0, drain_timeout)
        first = not self._stop_asked
        self._stop_asked = True
        if first or sooner_end(until, self._drain_until):
            self._drain_until = until
        if first or sooner_end(drain_timeout, self._drain_timeout):
            self._drain_timeout = drain_timeout

    async def _until_tightened(self, waits: set[asyncio.Future[Any]], left: float | None) -> None:
        """Wait ``left`` seconds at most for one of ``waits``, or for a stop that may have
        brought the end closer (the caller works out ``left`` again)."""
        self._stop_tightened.clear()
        tightened: asyncio.Future[Any] = asyncio.create_task(self._stop_tightened.wait())
        try:
            await asyncio.wait(
                {*waits, tightened}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            tightened.cancel()

    async def _drain(
        self, dispatcher: Dispatcher, store_loop: asyncio.Task[None], *, cut: bool = False
    ) -> None:
        """Let deliveries in flight finish, up to the soonest end a stop asked for (the
        store loop records their results meanwhile). ``cut``: the sessions were cancelled
        (see :meth:`_outlive_cancel`), what they had not sent never counted off: the
        drain ends with the last of them."""
        if dispatcher.idle.is_set():
            return
        idle = asyncio.create_task(dispatcher.idle.wait())
        try:
            while not (idle.done() or store_loop.done()):
                sessions = dispatcher.session_tasks() if cut else set()
                if cut and not sessions:
                    break
                until = self._drain_until
                left = None if until is None else until - time.monotonic()
                if left is not None and left <= 0:
                    break
                await self._until_tightened({idle, store_loop, *sessions}, left)
        finally:
            idle.cancel()

    async def _finish_recording(self, store_loop: asyncio.Task[None]) -> None:
        """Let the store loop write what is pending, retrying a failing store for as long
        as the drain timeout allows (a later, shorter stop shortens it at once); what
        still cannot be written is reported, not hidden.
        A write under way is waited for even past the drain timeout, up to
        ``_LAST_WRITE``: the results it holds were delivered."""
        loop = asyncio.get_running_loop()
        retry_for = self._drain_timeout if self._drain_timeout is not None else _FINAL_RECORD
        began = loop.time()
        self._retry_until = began + max(0.0, retry_for)
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        while not store_loop.done():
            left = max(self._retry_until, began + _LAST_WRITE) - loop.time()
            if left <= 0:
                break
            await self._until_tightened({store_loop}, left)
        store_loop.cancel()
        with contextlib.suppress(BaseException):
            await store_loop
        # A write it was cancelled in, still in its thread: counted below unless written.
        await self._settle_cut_write(0)
        if self._pending:
            log.error(
                "%d results could not be recorded before stopping; those recipients are "
                "tried again when their lease expires",
                len(self._pending),
            )

    async def _stop_hooks(self, task: asyncio.Task[None], *, flush: bool) -> None:
        """Let the hook sender finish the request in flight and, after a clean stop, send
        what the last records added (bounded by the hook timeout); what is left waits in
        the outbox for the next start."""
        sender, hook = self._hooks, self.config.hook
        assert sender is not None and hook is not None
        sender.stop(within=hook.timeout if flush else 0.0)
        if not task.done():  # (cancelled already by asyncio.run's end: shield raised that)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout=2 * hook.timeout + 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._hooks = None

    async def _release_unfinished(self) -> None:
        """Give back, due at once, what was leased and never attempted. A lease holding
        results that could not be recorded is kept: releasing it would resend at once
        what may have been delivered; it expires instead. Once a give-back fails the rest
        are left to expire too: each would fail as surely after as long a wait (a write
        lock held elsewhere costs the whole busy timeout), and the stop took that wait
        once per lease."""
        unrecorded = {result.lease_token for result in self._pending}
        left = [s for s in self._leases.values() if s.lease.token not in unrecorded]
        for done, state in enumerate(left):
            try:
                await self._store_call(self.store.release, state.lease)
            except StoreError as exc:
                log.warning(
                    "could not give back %d leases (%s); they are tried again when they expire",
                    len(left) - done,
                    exc,
                )
                break
        for state in self._leases.values():
            state.end()
        self._leases.clear()
        self._items.clear()
        self._item_lanes.clear()
        self._lane_load.clear()


def sooner_end(timeout: float | None, than: float | None) -> bool:
    """Whether a drain bound of ``timeout`` ends before one of ``than`` (None: no end)."""
    return timeout is not None and (than is None or timeout < than)

"""Suppression and bounces around the worker's writes: the suppression entries of a
lease the store did not read with it, the hard bounces just recorded put on the list,
and the bounce notices of final failures queued as mail."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from mailstrom.config import Config
from mailstrom.errors import StoreCorrupt, StoreError, StoreRefusedData
from mailstrom.runtime.suppressing import (
    hard_bounce_entries,
    lease_targets,
    screen,
)
from mailstrom.runtime.worker_store import WorkerStore
from mailstrom.status import RecipientState
from mailstrom.stores.base import Lease, RecipientResult
from mailstrom.suppression import Suppression, lookup_targets

if TYPE_CHECKING:
    from mailstrom.message.prepared import PreparedMessage
    from mailstrom.runtime.dispatch import Dispatcher
    from mailstrom.runtime.worker import _LeaseState

log = logging.getLogger("mailstrom.worker")


MAX_UNSENT_NOTICES = 10_000
"""Bounce messages a worker keeps in memory at most while the store takes none."""
RESCREEN_AFTER = timedelta(minutes=1)
"""How long leased work may wait in the worker (for a busy destination's connection, a
rate, a lane) before the suppression list is looked at again for it, as its next
transaction is about to start: one lookup per lease and minute at most."""


class WorkerScreening(WorkerStore):
    """Suppression lookups, hard bounces and bounce notices; mixed into :class:`Worker`."""

    config: Config
    _clock: Callable[[], datetime]
    _leases: dict[str, _LeaseState]
    _lease_wanted: bool
    _verp_key: bytes | None
    _unsent_notices: list[PreparedMessage]
    _dispatcher: Dispatcher | None
    _screenings: set[asyncio.Task[None]]

    async def _suppressed_in(self, lease: Lease) -> dict[str, Suppression] | None:
        """The suppression entries that apply to the lease's recipients (one store call
        per lease). None when the store failed: the caller asks again and delivers nothing
        of the lease until the list can be read, so a suppressed address is never sent to
        for want of a lookup."""
        try:
            return await self._store_call(
                self.store.suppressions_for, lease_targets(lease), now=self._clock()
            )
        except StoreCorrupt:
            raise
        except StoreError as exc:
            self._store_trouble("suppressions", exc)
            return None

    def _screen_again(self, state: _LeaseState) -> asyncio.Future[None]:
        """Look at the suppression list again for the work of the lease ``state`` still
        waiting in the dispatcher; the future is done once it has been looked at (or the
        store failed: the lease was screened when leased, and the next look comes
        :data:`RESCREEN_AFTER` later). Suppressed recipients fail then, unsent, as at the
        lease; one lookup for the lease however many sessions ask."""
        if state.screening is None:
            loop = asyncio.get_running_loop()
            done = state.screening = loop.create_future()
            task = loop.create_task(self._rescreen(state, done), name="mailstrom-rescreen")
            self._screenings.add(task)
            task.add_done_callback(self._screenings.discard)
        return state.screening

    async def _rescreen(self, state: _LeaseState, done: asyncio.Future[None]) -> None:
        try:
            dispatcher = self._dispatcher
            waiting = [] if dispatcher is None else dispatcher.queued(state.token)
            now = self._clock()
            targets = lookup_targets(r.address for item in waiting for r in item.recipients)
            found: dict[str, Suppression] = {}
            if targets:
                try:
                    found = await self._store_call(self.store.suppressions_for, targets, now=now)
                except StoreError as exc:
                    self._store_trouble("suppressions", exc)
            if found and dispatcher is not None:
                dispatcher.screen(state.token, lambda item: screen(item, found, now=now))
            state.screened_at = now
        finally:
            state.screening = None
            if not done.done():
                done.set_result(None)  # the sessions waiting for it ask again

    def _notices(self, recorded: list[RecipientResult]) -> list[PreparedMessage]:
        """Bounce messages for the final failures among ``recorded`` that ask for one."""
        wanted = self.config.delay_warning is not None
        failed = [
            r
            for r in recorded
            if r.state is RecipientState.FAILED or (wanted and r.state is RecipientState.DEFERRED)
        ]
        if not failed:
            return []
        items = {
            (item.message_id, item.domain): item
            for token in {r.lease_token for r in failed}
            if (state := self._leases.get(token)) is not None
            for held in state.messages.values()
            for item in held.items
        }
        # Loaded at the first failure: the notices' renderer and the message model.
        from mailstrom.runtime.notices import notices_for

        return notices_for(
            failed,
            items,
            config=self.config,
            now=self._clock(),
            # Read when the failed VERP message was leased.
            verp_key=self._verp_key or b"",
        )

    async def _send_notices(self, notices: list[PreparedMessage]) -> None:
        """Queue bounce messages like any other mail (they go out with the null sender,
        so they are never bounced themselves), with those a store failure left unqueued
        before. Those a store failure leaves unqueued now wait in memory, as results do,
        for the next write that works (the store loop asks again): dropped, the sender
        never heard that the mail failed, since nothing makes a notice again."""
        waiting = self._unsent_notices + notices
        if not waiting:
            return
        try:
            await self._store_call(self.store.enqueue_many, waiting, now=self._clock())
        except StoreCorrupt:
            raise
        except StoreRefusedData:
            # A value of one the store cannot hold: asked again with it, the store would
            # refuse them all for ever (and say it troubles the worker all that time).
            await self._send_notices_one_by_one(waiting)
        except StoreError as exc:
            self._store_trouble("bounce notices", exc)
            if not self._unsent_notices:
                log.warning("%d bounce messages not queued yet: %s", len(waiting), exc)
            self._keep_unsent(waiting)
        else:
            self._unsent_notices = []
            self._lease_wanted = True

    async def _send_notices_one_by_one(self, waiting: list[PreparedMessage]) -> None:
        """Queue each of ``waiting`` on its own; one the store refuses is dropped (logged),
        and on another store failure the rest wait for the next write."""
        for index, notice in enumerate(waiting):
            try:
                await self._store_call(self.store.enqueue_many, [notice], now=self._clock())
            except StoreCorrupt:
                raise
            except StoreRefusedData as exc:
                log.error("a bounce message to %s dropped: %s", ", ".join(notice.recipients), exc)
            except StoreError as exc:
                self._store_trouble("bounce notices", exc)
                self._keep_unsent(waiting[index:])
                return
            else:
                self._lease_wanted = True
        self._unsent_notices = []

    def _keep_unsent(self, waiting: list[PreparedMessage]) -> None:
        """Keep ``waiting`` for the next write, :data:`MAX_UNSENT_NOTICES` at most (the
        newest): a store that refuses for days must not take the worker's memory."""
        dropped = len(waiting) - MAX_UNSENT_NOTICES
        if dropped > 0:
            log.error("%d bounce messages dropped: the store has taken none for too long", dropped)
            waiting = waiting[dropped:]
        self._unsent_notices = waiting

    async def _suppress_hard_bounces(self, recorded: list[RecipientResult]) -> None:
        """Put the addresses of recorded hard bounces on the suppression list, but for
        those whose entry lasts as long already (``keep_longer``: an entry added while the
        message was on its way, a complaint's without end or an operator's, was replaced
        by the hard bounce's of ``suppress_for``, and the address got mail again when that
        ran out; decided in the write, as a complaint may be written at the same time).
        If the store fails here the entries are lost (logged): the next message to such
        an address is refused again and adds it then."""
        entries = hard_bounce_entries(recorded, expire_after=self.config.suppress_for)
        if not entries:
            return
        try:
            await self._store_call(self.store.suppress, entries, keep_longer=True)
        except StoreCorrupt:
            raise
        except StoreError as exc:
            self._store_trouble("suppress", exc)
            log.warning("%d hard-bounced addresses not suppressed: %s", len(entries), exc)

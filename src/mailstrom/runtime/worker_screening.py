"""Suppression and bounces around the worker's writes: the suppression entries of a
lease the store did not read with it, the hard bounces just recorded put on the list,
and the bounce notices of final failures queued as mail."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from mailstrom.config import Config
from mailstrom.errors import StoreCorrupt, StoreError
from mailstrom.runtime.suppressing import hard_bounce_entries, lease_targets
from mailstrom.runtime.worker_store import WorkerStore
from mailstrom.status import RecipientState
from mailstrom.stores.base import Lease, RecipientResult
from mailstrom.suppression import Suppression

if TYPE_CHECKING:
    from mailstrom.message.prepared import PreparedMessage
    from mailstrom.runtime.worker import _LeaseState

log = logging.getLogger("mailstrom.worker")


class WorkerScreening(WorkerStore):
    """Suppression lookups, hard bounces and bounce notices; mixed into :class:`Worker`."""

    config: Config
    _clock: Callable[[], datetime]
    _leases: dict[str, _LeaseState]
    _lease_wanted: bool
    _verp_key: bytes | None
    _unsent_notices: list[PreparedMessage]

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
            for item in state.lease.items
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
        except StoreError as exc:
            self._store_trouble("bounce notices", exc)
            if not self._unsent_notices:
                log.warning("%d bounce messages not queued yet: %s", len(waiting), exc)
            self._unsent_notices = waiting
        else:
            self._unsent_notices = []
            self._lease_wanted = True

    async def _suppress_hard_bounces(self, recorded: list[RecipientResult]) -> None:
        """Put the addresses of recorded hard bounces on the suppression list. If the store
        fails here the entries are lost (logged): the next message to such an address is
        refused again and adds it then."""
        entries = hard_bounce_entries(recorded, expire_after=self.config.suppress_for)
        if not entries:
            return
        try:
            await self._store_call(self.store.suppress, entries)
        except StoreCorrupt:
            raise
        except StoreError as exc:
            self._store_trouble("suppress", exc)
            log.warning("%d hard-bounced addresses not suppressed: %s", len(entries), exc)

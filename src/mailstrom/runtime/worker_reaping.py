"""A worker's look for workers that died holding leases, and what they held given back.

A ``mailstrom worker`` killed with SIGKILL, or that crashed, or whose host went down,
cannot give back what it leased; without this its recipients waited for
``Config.lease_for`` (15 minutes by default) although the next worker (systemd's restart,
a sibling on the host or on another host) could deliver them. A store that can tell which
lease holders died (:class:`~mailstrom.stores.dead_holders.DeadHolderReaper`: SQLite,
PostgreSQL) is asked at start, before the first lease when its calls run on the worker's
loop, and then every ``reap_every`` seconds (the store's: a minute for SQLite, 15 s for
PostgreSQL, whose looks also say that this worker lives); what it gives back is leased
again at once. The memory store is not asked.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from mailstrom.errors import StoreError
from mailstrom.runtime.worker_store import WorkerStore, _Backoff
from mailstrom.stores.dead_holders import DeadHolderReaper

log = logging.getLogger("mailstrom.worker")


class WorkerReaping(WorkerStore):
    """The reaping loop of :class:`~mailstrom.runtime.worker.Worker`, mixed in over its
    state: the flags the store loop reads to lease again."""

    holder: str
    _wake: asyncio.Event | None
    _lease_wanted: bool
    _due_stale: bool
    _look_failing = False

    async def _reap_loop(self) -> None:
        """Look at once (a task started before the store loop: on the worker's loop, an
        inline store's call ends before the first lease begins; nothing else is waited
        for), then every ``reap_every`` seconds of the store's."""
        store = self.store
        if not isinstance(store, DeadHolderReaper):
            return
        reap = functools.partial(store.release_dead_holders, self.holder)
        backoff = _Backoff()
        while True:
            if await self._reap(reap):
                backoff.reset()
                wait = store.reap_every
            else:
                # Soon, not after a whole interval: a PostgreSQL worker's look is also
                # its beat, and a dead worker's mail waits for the next look.
                wait = min(backoff.take(), store.reap_every)
            await asyncio.sleep(wait)  # a timer

    async def _reap(self, reap: Callable[[], int]) -> bool:
        """One look; False when the store failed it."""
        try:
            released = await self._store_call(reap)
        except StoreError as exc:
            # Counted as a store error, but said apart from the store loop's account
            # (worker_status.store_error): a look can fail while every lease and record
            # works (no grant on PostgreSQL's lease_holders after an upgrade, a lock on
            # it), and the two accounts would take turns saying "failing" and "working
            # again" for ever. Said once, until a look works again.
            self.metrics.store_errors += 1
            if not self._look_failing:
                self._look_failing = True
                log.warning(
                    "looking for dead workers failed: %s; trying again with backoff "
                    "(deliveries go on; a dead worker's leases wait meanwhile)",
                    exc,
                )
            return False
        if self._look_failing:
            self._look_failing = False
            log.warning("looking for dead workers works again")
        if released:
            # The store wakes its watchers too, but the store loop may have gone idle
            # after a lease that found nothing: what was given back is due now.
            self._lease_wanted = True
            self._due_stale = True
            if self._wake is not None:
                self._wake.set()
        return True

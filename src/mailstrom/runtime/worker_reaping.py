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

The other side of a look that is also a beat: a PostgreSQL worker that cannot reach the
server for the store URL's ``dead_after`` is taken for dead by the workers that can, and
they deliver what it leased. So a worker whose looks have failed for lack of a server
(:class:`~mailstrom.errors.StoreUnreachable`), or hung (under way for a quarter of
``dead_after``), for three quarters of ``dead_after`` counts itself cut off
(:meth:`WorkerReaping._cut_off_now`): it stops leasing, and the worker gives back the
work it leased and has not started (see the fencing in worker.py), which would otherwise
go out twice. A look that fails because the server refused it (no grant on
``lease_holders``) fails every worker's look alike, so nobody is taken for dead: it cuts
nothing off, and a look under way (which may yet be refused) is no hung one. The first
look that reaches the server, working or refused, ends it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from mailstrom.errors import StoreError, StoreUnreachable
from mailstrom.runtime.worker_store import WorkerStore, _Backoff
from mailstrom.stores.dead_holders import DeadHolderReaper

log = logging.getLogger("mailstrom.worker")


class WorkerReaping(WorkerStore):
    """The reaping loop of :class:`~mailstrom.runtime.worker.Worker`, mixed in over its
    state: the flags the store loop reads to lease again."""

    holder: str
    _clock: Callable[[], datetime]
    _wake: asyncio.Event | None
    _lease_wanted: bool
    _due_stale: bool
    _look_failing = False
    _beat_until: float | None = None
    """Loop time from which other workers may take this one for dead: the start of its
    last look that worked plus the store's ``dead_after``. None while that cannot happen
    (a store that does not judge by beats, or no look has worked yet: this
    worker has no row to be judged by)."""
    _beat_wall_until: datetime | None = None
    """The same by this worker's clock: the loop's stops while the host is suspended, and
    other workers' looks go on meanwhile."""
    _beat_unreachable = False
    """The last look failed because the store could not be reached."""
    _looking_since: float | None = None
    """Loop time at which the look under way began; None between looks."""
    _cut_off: str | None = None
    """Why this worker may be taken for dead (see the module docstring), while it may: it
    then leases nothing, and gives back what it has not started."""

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
        loop = asyncio.get_running_loop()
        started = self._looking_since = loop.time()
        started_wall = self._clock()
        try:
            released = await self._store_call(reap)
        except StoreError as exc:
            self._store_unusable(exc)
            self._beat_unreachable = isinstance(exc, StoreUnreachable)
            if not self._beat_unreachable:
                # The server answered: it refuses every worker's look alike, so nobody
                # is judged by beats meanwhile (see the module docstring).
                self._reached()
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
        finally:
            self._looking_since = None
        dead_after = self._dead_after
        self._beat_until = None if dead_after is None else started + dead_after
        self._beat_wall_until = (
            None if dead_after is None else started_wall + timedelta(seconds=dead_after)
        )
        self._beat_unreachable = False
        self._reached()
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

    def _reached(self) -> None:
        """A look reached the store: a worker cut off is no longer."""
        if self._cut_off:
            self._cut_off = None
            self._lease_wanted = True
            if self._wake is not None:
                self._wake.set()
            log.warning("this worker reaches its store again: leasing again")

    @property
    def _dead_after(self) -> float | None:
        """The store's ``dead_after``: None when a live worker of it is never taken for
        dead."""
        store = self.store
        return store.dead_after if isinstance(store, DeadHolderReaper) else None

    def _may_be_taken_for_dead(self, now: float, wall: datetime) -> bool:
        """Whether other workers may take this one for dead at loop time ``now`` (and
        ``wall`` by this worker's clock): its last beat is ``dead_after`` old (a stall:
        its process stopped, its loop blocked, its host suspended; or looks that failed),
        unless its looks since were refused by the server, which refuses every worker's
        alike (see the module docstring). Both clocks are asked: only the worker's own
        goes on while the host is suspended, and only the loop's is immune to a clock
        stepped back."""
        until, wall_until = self._beat_until, self._beat_wall_until
        if until is None or (self._look_failing and not self._beat_unreachable):
            return False
        return now >= until or (wall_until is not None and wall >= wall_until)

    def _cut_off_now(self, now: float) -> bool:
        """Whether this worker is cut off at loop time ``now`` (see the module docstring);
        says so once when it becomes so. Asked every sixteenth of ``dead_after``.

        Three quarters of ``dead_after`` after the last look that worked began: a healthy
        worker's began at most an eighth of it ago (the looks' interval) plus the look's
        own time, and the quarter left covers the next check and a late event loop before
        another worker's look may judge."""
        until = self._beat_until  # None unless the store has a dead_after
        if self._cut_off is not None or until is None:
            return self._cut_off is not None
        dead_after = self._dead_after
        if dead_after is None or now < until - dead_after / 4:
            return False
        # A look under way hangs once it has taken a quarter of dead_after; until then it
        # is just a look, and may yet land a beat (or be refused: no cut then either).
        looking = self._looking_since
        hung = looking is not None and now - looking >= dead_after / 4
        if self._beat_unreachable or hung:
            self._cut_off = (
                f"store: not reached for {now - (until - dead_after):.1f} s; other workers "
                f"may take this one for dead after {dead_after:g} s (the store's dead_after)"
            )
            log.warning(
                "%s and deliver what it leased: it gives back the work it has not started "
                "and leases nothing until the store answers",
                self._cut_off,
            )
        return self._cut_off is not None

"""What every worker of a store shares about destinations, and this worker's part in it:
the pauses of throttled destinations (read back, and the work the dispatcher postpones
given back until a pause ends) and the hosts whose TLS was found broken (noted, read back
every minute, and fed to the TLS decision)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from mailstrom.config import Config
from mailstrom.errors import StoreCorrupt, StoreError, TemporaryFailure
from mailstrom.runtime.shaper import Shaper
from mailstrom.runtime.worker_store import WorkerStore, _Backoff
from mailstrom.stores.base import WorkItem
from mailstrom.tls.decide import BrokenTLS, Destination, PolicySourceHook, TLSDecider

if TYPE_CHECKING:
    from mailstrom.runtime.dispatch import Dispatcher
    from mailstrom.runtime.worker import _LeaseState

log = logging.getLogger("mailstrom.worker")

_IDLE_LOOK = 1.0
"""Seconds between two looks for connections idle past ``connection_idle`` at most."""
_IDLE_LOOK_MIN = 0.05
"""... and at least, whatever a tiny ``connection_idle`` asks."""
_TLS_REFRESH = 60.0
"""Seconds between reads of the hosts other workers found with broken TLS."""


class WorkerDestinations(WorkerStore):
    """Destination pauses and the memory of broken TLS; mixed into :class:`Worker`."""

    config: Config
    _clock: Callable[[], datetime]
    _loop: asyncio.AbstractEventLoop | None
    _wake: asyncio.Event | None
    _stopping: bool
    _starved: bool
    _capped: bool
    _lease_wanted: bool
    _due_at: datetime | None
    _leases: dict[str, _LeaseState]
    _items: dict[tuple[str, str, str], int]
    _item_lanes: dict[tuple[str, str, str], str]
    _lane_load: dict[str, int]
    _postponing: set[asyncio.Task[None]]

    # --- destination pauses ------------------------------------------------------------

    async def _pauses_loop(self, shaper: Shaper) -> None:
        """Read the destination pauses that every worker of the store recorded, so that a
        throttle seen by one worker stops the others connecting too."""
        interval = self.config.shaping.refresh
        while True:
            try:
                await shaper.refresh()
            except StoreError as exc:  # a passing hiccup; the next read tries again
                self._store_trouble("throttles", exc)
            else:
                # Read again: no other call may come to say so before the next poll (an
                # idle worker) or write of results (one whose deliveries take long).
                self._store_fine("throttles")
            await asyncio.sleep(interval)  # a timer, not synchronisation

    def _on_postpone(self, items: list[WorkItem], until: datetime, destination: str | None) -> None:
        """Items the dispatcher gives back (their destination is paused): to the store,
        due at ``until``, without an attempt."""
        assert self._loop is not None
        # Out of delivery now (as the dispatcher counts them): their transactions and their
        # lanes' load end here, whether or not the store write below succeeds.
        for item in items:
            count = len(item.recipients)
            state = self._leases.get(item.lease_token)
            if state is not None:
                state.writing += count  # until the postponement below is written
            key = (item.lease_token, item.message_id, item.domain)
            left = self._items.get(key)
            if left is None:
                continue
            lane = self._item_lanes.get(key, "")
            self._lane_load[lane] = max(0, self._lane_load.get(lane, 0) - count)
            if left > count:
                self._items[key] = left - count
            else:
                del self._items[key]
                self._item_lanes.pop(key, None)
        task = self._loop.create_task(
            self._postpone(items, until, destination), name="mailstrom-postpone"
        )
        self._postponing.add(task)
        task.add_done_callback(self._postponing.discard)
        task.add_done_callback(self._loop_ended)  # a bug in it ends the worker

    async def _postpone(
        self, items: list[WorkItem], until: datetime, destination: str | None
    ) -> None:
        written = False
        try:
            written = await self._write_postponement(items, until, destination)
        finally:
            for item in items:
                state = self._leases.get(item.lease_token)
                if state is not None:
                    state.writing -= len(item.recipients)
                    if written:
                        state.unrecorded -= len(item.recipients)
                        state.let_go(item.message_id, len(item.recipients))
                        if state.unrecorded <= 0:
                            state.end()
                            del self._leases[item.lease_token]
        if not written:
            return
        self._store_fine("postpone")
        wake = False
        # Due at ``until``: earlier than the due time remembered (read before they were
        # given back, and kept while deliveries run), they would wait for the poll.
        if self._due_at is None or until < self._due_at:
            self._due_at = until
            wake = True  # a worker asleep till the old due time sleeps till this one
        if self._starved or self._capped:
            self._lease_wanted = True  # room for more work
            wake = True
        if wake and self._wake is not None:
            self._wake.set()

    async def _write_postponement(
        self, items: list[WorkItem], until: datetime, destination: str | None
    ) -> bool:
        """Write ``items`` back to the store, trying again with backoff while it fails;
        False when given up (a corrupt store, or the worker stopping)."""
        backoff = _Backoff()
        while True:
            try:
                await self._store_call(
                    self.store.postpone, items, until=until, destination=destination
                )
                return True
            except StoreCorrupt as exc:
                self._store_unusable(exc)  # the store loop stops the worker; leases expire
                return False
            except StoreError as exc:
                self._store_trouble("postpone", exc)
                if self._stopping:
                    return False  # released with the rest of the lease (due at once)
                await asyncio.sleep(backoff.take())

    # --- the TLS decision and its shared memory ------------------------------------------

    def _tls_decider(
        self,
        *,
        mta_sts: PolicySourceHook | None = None,
        dane_failed: Callable[[Destination, TemporaryFailure], None] | None = None,
    ) -> TLSDecider:
        """The per-destination TLS decision (see :mod:`mailstrom.tls.decide`), with the
        memory of broken TLS written to the store so that every worker shares it,
        ``mta_sts`` as a policy source when MTA-STS is on, and DANE (``dns.dnssec``)
        telling ``dane_failed`` of each host whose TLSA lookup failed or that ``dane-only``
        refused (TLS reports)."""
        broken = BrokenTLS(
            self.config.tls_remember_broken.total_seconds(), on_note=self._note_tls_broken
        )
        dane = None
        if self.config.dns.dnssec and dane_failed is not None:
            from mailstrom.tls.dane import DaneSource

            dane = DaneSource.for_config(self.config, on_failure=dane_failed)
        return TLSDecider.for_config(self.config, broken=broken, mta_sts=mta_sts, dane=dane)

    def _note_tls_broken(self, host: str, seconds: float, reason: str) -> None:
        if self._loop is None or not hasattr(self.store, "note_tls_broken"):
            return
        now = self._clock()
        task = self._loop.create_task(
            self._store_call(
                self.store.note_tls_broken,
                host,
                until=now + timedelta(seconds=seconds),
                reason=reason,
                now=now,
            )
        )
        task.add_done_callback(self._noted)

    def _noted(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, StoreError):
            self._store_trouble("note_tls_broken", exc)  # this worker still remembers
        elif exc is not None:
            log.error("remembering broken TLS failed: %r", exc)

    async def _idle_connections_loop(self, dispatcher: Dispatcher) -> None:
        """Close the connections kept idle past ``connection_idle``, looked for every
        second (or every ``connection_idle``, when shorter). Looked for only as work was
        leased, they stayed open once the queue was empty: a connection to each
        destination of the last burst, held for as long as nothing more came (the
        server's own timeout, minutes, closed it at its end)."""
        idle = self.config.connection_idle
        if idle <= 0:
            return  # none is kept: each is closed once its work is done
        while True:
            # A timer, not synchronisation; never more often than 20 times a second.
            await asyncio.sleep(max(_IDLE_LOOK_MIN, min(idle, _IDLE_LOOK)))
            dispatcher.prune()

    async def _tls_memory_loop(self, broken: BrokenTLS) -> None:
        """Read the hosts with broken TLS every worker noted, now and every minute."""
        read = getattr(self.store, "tls_broken", None)  # a store older than the protocol
        if broken.remember_for <= 0 or read is None:
            return
        while True:
            try:
                now = self._clock()
                known = await self._store_call(read, now=now)
                broken.load({h: (until - now).total_seconds() for h, until in known.items()})
            except StoreError as exc:
                self._store_trouble("tls_broken", exc)
            else:
                self._store_fine("tls_broken")  # as for the pauses (_pauses_loop)
            await asyncio.sleep(_TLS_REFRESH)  # a timer, not synchronisation

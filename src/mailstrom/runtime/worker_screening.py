"""Suppression and bounces around the worker's writes: the suppression entries of a
lease the store did not read with it, the hard bounces just recorded put on the list,
and the notices to senders (bounces, delay warnings, "relayed" notices) queued as mail:
one per message, sender and kind, from the marks "notice owed" the records of its
results left in the store (see :mod:`mailstrom.runtime.notices`), once the message is
done for this pass."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from mailstrom.config import Config
from mailstrom.errors import (
    StoreCorrupt,
    StoreError,
    StoreRefusedData,
    UnknownMessage,
    local_shortage,
)
from mailstrom.runtime import notices as sender_notices
from mailstrom.runtime.suppressing import (
    hard_bounce_entries,
    lease_targets,
    screen,
)
from mailstrom.runtime.worker_store import WorkerStore, _Backoff
from mailstrom.status import RecipientState
from mailstrom.stores.base import (
    MAX_OWED_MESSAGES,
    Lease,
    OwedNotice,
    RecipientResult,
    WorkItem,
    domain_of,
)
from mailstrom.stores.clock import ClockReading, ServerClock, store_now
from mailstrom.suppression import Suppression, SuppressionSource, lookup_targets

if TYPE_CHECKING:
    from mailstrom.message.prepared import PreparedMessage
    from mailstrom.runtime.dispatch import Dispatcher
    from mailstrom.runtime.worker import _LeaseState

log = logging.getLogger("mailstrom.worker")


MAX_OWING = 10_000
"""Messages a worker remembers it marked "notice owed" for, at most: it looks for their
notices after each write that records one of their recipients. Those it forgot (or
another worker marked) are found by the look every :data:`OWED_EVERY`."""
OWED_EVERY = 60.0
"""Seconds between a worker's looks for notices owed by messages it does not know of (a
worker that died between a record and its notice, a message whose last recipient another
worker recorded); the first look is at its start."""
RESCREEN_AFTER = timedelta(minutes=1)
"""How long leased work may wait in the worker (for a busy destination's connection, a
rate, a lane) before the suppression list is looked at again for it, as its next
transaction is about to start: one lookup per lease and minute at most."""
SUPPRESSION_KEPT = timedelta(days=30)
"""How long an expired suppression entry is kept (``mailstrom suppress list --all`` shows
it) before a worker deletes it."""
MTA_STS_KEPT = timedelta(days=1)
"""How long an expired MTA-STS policy is kept before a worker deletes it. An expired
policy is never applied (RFC 8461 §5.1): the day is only a margin for clocks that
disagree. Kept for ever, the cache held one policy per recipient domain ever seen."""
PRUNE_EVERY = 6 * 3600.0
"""Seconds between a worker's prunings of expired suppression entries and MTA-STS
policies; the first is at its start."""
PRUNE_BATCH = 1000
"""Entries (or policies) one write of a pruning deletes at most: a short write, between
which the worker's own leases and records (and other processes' writes) go on."""


def prune_before(now: datetime, reading: ClockReading | None = None) -> datetime:
    """Where a worker whose clock says ``now`` prunes expired entries (see
    :meth:`~mailstrom.stores.base.Store.prune_suppressions`): :data:`SUPPRESSION_KEPT`
    before the earlier of ``now`` and the latest time the store server's clock may say
    (``reading``, of a store whose workers may run on other hosts). Pruning deletes for
    every worker of the queue, so one whose clock is ahead by more than
    SUPPRESSION_KEPT (a host whose time synchronisation failed) must not judge alone:
    it deleted entries still in force. Memory and SQLite stores share the worker's
    host clock, and have no other.

    >>> from datetime import UTC
    >>> now = datetime(2026, 3, 1, tzinfo=UTC)
    >>> ahead = ClockReading(skew=60 * 86400.0, uncertainty=1.0, server="db")
    >>> prune_before(now, ahead).isoformat()
    '2025-12-01T00:00:01+00:00'
    """
    return store_now(now, reading) - SUPPRESSION_KEPT


class WorkerScreening(WorkerStore):
    """Suppression lookups, hard bounces and bounce notices; mixed into :class:`Worker`."""

    config: Config
    _clock: Callable[[], datetime]
    _leases: dict[str, _LeaseState]
    _lease_wanted: bool
    _verp_key: bytes | None
    _owing: dict[str, None]
    _owed_failed: asyncio.Event | None
    _dispatcher: Dispatcher | None
    _screenings: set[asyncio.Task[None]]
    _bypass: dict[str, frozenset[SuppressionSource]]

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
                dispatcher.screen(
                    state.token, lambda item: screen(item, found, now=now, bypass=self._bypass)
                )
            state.screened_at = now
        finally:
            state.screening = None
            if not done.done():
                done.set_result(None)  # the sessions waiting for it ask again

    def _may_owe_notice(self, result: RecipientResult) -> bool:
        """Whether ``result`` may owe its sender a notice (:func:`owed_notice` decides):
        a final failure, a deferral when delay warnings are on, a "relayed" delivery."""
        state = result.state
        return (
            state is RecipientState.FAILED
            or result.relayed
            or (state is RecipientState.DEFERRED and self.config.delay_warning is not None)
        )

    def _with_notices(self, results: list[RecipientResult]) -> list[RecipientResult]:
        """``results`` (of one work item) with what the notice each owes will say of it,
        for the store to keep with the record (the mark "notice owed")."""
        first = results[0]
        state = self._leases.get(first.lease_token)
        held = state.messages.get(first.message_id) if state is not None else None
        domain = domain_of(first.address)
        item: WorkItem | None = None
        if held is not None:
            item = next((i for i in held.items if i.domain == domain), None)
        if item is None:
            return results
        # sender_notices is imported with the worker, not here at the first result owing
        # a notice: out of file descriptors that import failed (EMFILE), and the result,
        # a server's answer, was lost. The notices' renderer (the message model) still
        # loads at the first notice made, which is made again later if that fails.
        marked = []
        for result in results:
            if result.notice is None and self._may_owe_notice(result):
                try:
                    notice = sender_notices.owed_notice(
                        result,
                        item,
                        config=self.config,
                        # Read when the VERP message was leased.
                        verp_key=self._verp_key or b"",
                    )
                except Exception:
                    # The result is what counts: a notice that cannot be made must not
                    # stop its delivery being recorded.
                    log.exception(
                        "no bounce message for %s of %s", result.address, first.message_id
                    )
                    notice = None
                if notice is not None:
                    result = dataclasses.replace(result, notice=notice)
            marked.append(result)
        return marked

    async def _queue_owed(self, recorded: list[RecipientResult]) -> None:
        """After a write: the notices of the messages among ``recorded`` this worker marked
        "notice owed" for, those done for this pass (the store tells)."""
        owing = self._owing
        for result in recorded:
            if result.notice is not None:
                owing[result.message_id] = None
        if not owing:
            return
        while len(owing) > MAX_OWING:
            del owing[next(iter(owing))]  # the oldest: the look every OWED_EVERY finds it
        wanted = list(dict.fromkeys(r.message_id for r in recorded if r.message_id in owing))
        if wanted:
            await self._send_owed(wanted)

    async def _owed_loop(self) -> None:
        """Look for every notice owed at once (a task started with the worker), then
        every :data:`OWED_EVERY` seconds: a worker that died between a record and its
        notice, or stopped before it, left the marks for this one. After a store failure
        (here or in the look after a write), again with backoff."""
        failed = self._owed_failed = asyncio.Event()
        backoff = _Backoff()
        while True:
            failed.clear()
            found = await self._send_owed(None)
            if found >= MAX_OWED_MESSAGES:
                continue  # more may wait
            if failed.is_set():
                await asyncio.sleep(min(backoff.take(), OWED_EVERY))
                continue
            backoff.reset()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(failed.wait(), OWED_EVERY)  # a timer, or a failure

    async def _prune_loop(self) -> None:
        """Delete the suppression entries that expired over :data:`SUPPRESSION_KEPT`
        ago, and the MTA-STS policies that expired over :data:`MTA_STS_KEPT` ago, at
        once (a task started with the worker) and then every :data:`PRUNE_EVERY`
        seconds."""
        prune = getattr(self.store, "prune_suppressions", None)  # a store older than it
        prune_sts = getattr(self.store, "prune_mta_sts_policies", None)
        if prune is None and prune_sts is None:
            return
        while True:
            try:
                reading = None
                if isinstance(self.store, ServerClock):
                    reading = await self._read_clock(self.store.measure_clock)
            except StoreError as exc:
                log.warning("nothing pruned (tried again in %g s): %s", PRUNE_EVERY, exc)
            else:
                # Both judged by the time prune_before explains (a host ahead is
                # bounded by the store server's clock), each with its own margin.
                if prune is not None:
                    before = prune_before(self._clock(), reading)
                    await self._prune_all(prune, before, "suppression entries")
                if prune_sts is not None:
                    before = store_now(self._clock(), reading) - MTA_STS_KEPT
                    await self._prune_all(prune_sts, before, "MTA-STS policies")
            await asyncio.sleep(PRUNE_EVERY)  # a timer, not synchronisation

    async def _prune_all(self, prune: Callable[..., int], before: datetime, what: str) -> None:
        """Call ``prune`` for what expired at or before ``before``, :data:`PRUNE_BATCH`
        rows a call, until a call deletes fewer, and log how many it deleted. A store
        failure is logged, and the next round tries again."""
        pruned = 0
        try:
            while True:
                count = await self._store_call(prune, expired_before=before, limit=PRUNE_BATCH)
                pruned += count
                if count < PRUNE_BATCH:
                    break
                # A SQLite store's calls run on this loop: let the rest of the
                # worker run between two writes.
                await asyncio.sleep(0)
        except StoreError as exc:
            log.warning("expired %s not pruned (tried again in %g s): %s", what, PRUNE_EVERY, exc)
        if pruned:
            log.info("pruned %d %s expired before %s", pruned, what, before)

    async def _send_owed(self, message_ids: list[str] | None) -> int:
        """Queue the notices owed by messages done for this pass (of ``message_ids``
        only, when given), clearing their marks in the same transaction; returns how many
        messages the store found owing. A store failure leaves the marks: the next look
        makes the notices again."""
        try:
            owed = await self._store_call(self.store.owed_notices, message_ids=message_ids)
            if not owed:
                return 0
            by_message: dict[str, list[OwedNotice]] = {}
            for entry in owed:
                by_message.setdefault(entry.message_id, []).append(entry)
            made: dict[str, list[PreparedMessage]] = {}
            for message_id, entries in by_message.items():
                try:
                    made |= await self._made_owed(message_id, entries)
                except StoreError:
                    raise  # below: the marks stay, looked for again soon
                except Exception as exc:
                    # The marks stay, to be tried again, and the worker goes on (the
                    # results are recorded). Out of descriptors, the renderer's first load
                    # fails (EMFILE): this host's shortage, not a bug to trace.
                    shortage = local_shortage(exc)
                    if shortage is not None:
                        log.warning(
                            "bounce messages could not be made now (%d messages): %s; "
                            "made again at the next look",
                            len(by_message),
                            shortage,
                        )
                    else:
                        log.exception(
                            "bounce messages could not be made (%d messages)", len(by_message)
                        )
                    return 0
            try:
                queued = await self._store_call(
                    self.store.queue_notices, owed, made, now=self._clock()
                )
            except StoreRefusedData:
                # A value of one the store cannot hold: asked again with it, the store would
                # refuse them all for ever.
                queued = await self._queue_one_by_one(by_message, made)
        except StoreCorrupt:
            raise
        except StoreError as exc:
            self._store_trouble("bounce notices", exc)
            if self._owed_failed is not None:
                self._owed_failed.set()  # the marks stay: looked for again soon
            return 0
        for message_id in by_message:
            self._owing.pop(message_id, None)
        if queued:
            self._lease_wanted = True
        return len(by_message)

    async def _made_owed(
        self, message_id: str, owed: list[OwedNotice]
    ) -> dict[str, list[PreparedMessage]]:
        """The notices of one message's marks ``owed``, made from its data read here and
        let go on return (none when it was purged, its marks with it). One message at a
        time: a look finds up to MAX_OWED_MESSAGES messages of up to ``max_message_size``
        each, and a notice keeps at most ``MAX_RETURNED`` octets of one."""
        try:
            data = await self._store_call(self.store.message_data, message_id)
        except UnknownMessage:
            return {}
        return sender_notices.notices_owed(
            owed, {message_id: data}, config=self.config, now=self._clock()
        )

    async def _queue_one_by_one(
        self, by_message: dict[str, list[OwedNotice]], made: dict[str, list[PreparedMessage]]
    ) -> list[str]:
        """Queue the notices of each message on its own; a message whose notice the store
        refuses has its marks cleared without one (logged): asked again it would be
        refused again. Another store failure is raised."""
        queued: list[str] = []
        for message_id, owed in by_message.items():
            notices = made.get(message_id, [])
            try:
                queued += await self._store_call(
                    self.store.queue_notices, owed, {message_id: notices}, now=self._clock()
                )
            except StoreRefusedData as exc:
                for notice in notices:
                    log.error(
                        "a bounce message to %s dropped: %s", ", ".join(notice.recipients), exc
                    )
                await self._store_call(self.store.queue_notices, owed, {}, now=self._clock())
        return queued

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

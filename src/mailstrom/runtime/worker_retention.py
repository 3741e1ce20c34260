"""Retention: a worker deletes finished messages older than ``Config.retention`` says,
at its start and every :data:`RETAIN_EVERY` seconds, a bounded batch per store call, as
``mailstrom purge`` would (a message owing its sender a notice, and pending or held
mail, stay). Every worker of a queue may do it: two deleting at once each delete what
the other has not, and count only their own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from mailstrom.config import Config, RetentionConfig
from mailstrom.errors import StoreError
from mailstrom.runtime.worker_store import WorkerStore
from mailstrom.status import RecipientState
from mailstrom.stores.base import QueueFilter, Store
from mailstrom.stores.clock import ServerClock, store_now
from mailstrom.stores.operator import ListingKey, purge_candidates

log = logging.getLogger("mailstrom.worker")

RETAIN_EVERY = 600.0
"""Seconds between a worker's deletions of finished mail past its retention; the first
is at its start."""
RETAIN_BATCH = 500
"""Messages one store call of a deletion looks at and deletes at most: a short write,
between which the worker's own leases and records (and other processes' writes) go on.
Deleting 100,000 messages at once held a SQLite store's write lock, and with it every
write of the worker, for many seconds."""
RETAIN_EXAMINE = 20 * RETAIN_BATCH
"""Messages one store call looks at at most for its batch (``Store.select_page``'s
``examine``): mail past its retention found sparse among many kept messages (a little
failed mail behind a million delivered ones kept) is looked for in steps this long.
Looked for in one step, on PostgreSQL a statement_timeout cancelled it at each round,
and the walk never went past it."""


def retained(retention: RetentionConfig) -> list[tuple[RecipientState, timedelta]]:
    """The finished states ``retention`` limits, each with its age: DELIVERED, and
    FAILED (failed or cancelled, as ``purge`` counts them).

    >>> retained(RetentionConfig(failed=timedelta(days=7)))
    [(<RecipientState.FAILED: 'failed'>, datetime.timedelta(days=7))]
    """
    ages = (
        (RecipientState.DELIVERED, retention.delivered),
        (RecipientState.FAILED, retention.failed),
    )
    return [(state, age) for state, age in ages if age is not None]


def purge_batch(
    store: Store,
    *,
    now: datetime,
    state: RecipientState,
    age: timedelta,
    after: ListingKey | None,
) -> tuple[int, ListingKey | None]:
    """Delete what the store's purge takes of the next :data:`RETAIN_BATCH` messages in
    ``state`` queued more than ``age`` before ``now`` (among the next
    :data:`RETAIN_EXAMINE` queued before then) (a message finished before the
    cutoff was queued before it), newest first from below ``after``: those whose last
    recipient finished more than ``age`` before ``now``. Returns how many it deleted,
    and where the next batch starts (None: none is left)."""
    where = purge_candidates(QueueFilter(limit=RETAIN_BATCH), age, state)
    page = store.select_page(now=now, where=where, after=after, examine=RETAIN_EXAMINE)
    deleted = 0
    if page.ids:
        deleted = store.purge_many(page.ids, finished_before=now - age, state=state)
    return deleted, page.last


class WorkerRetention(WorkerStore):
    """The deletion of finished mail past its retention; mixed into :class:`Worker`."""

    config: Config
    _clock: Callable[[], datetime]
    _checks_clock: bool

    async def _retention_loop(self) -> None:
        """Delete what ``config.retention`` no longer keeps, at once (a task started with
        the worker) and then every :data:`RETAIN_EVERY` seconds; nothing, and no task
        left, when it keeps everything. A store failure is logged and the next round
        tries again."""
        ages = retained(self.config.retention)
        if not ages:
            return
        while True:
            await self._retain_once(ages)
            await asyncio.sleep(RETAIN_EVERY)  # a timer, not synchronisation

    async def _retain_once(self, ages: list[tuple[RecipientState, timedelta]]) -> int:
        """One round over each limited state; returns how many messages it deleted."""
        deleted = 0
        try:
            reading = None
            # A clock passed in unchecked is a test's: its time is the point of it.
            if self._checks_clock and isinstance(self.store, ServerClock):
                reading = await self._read_clock(self.store.measure_clock)
        except StoreError as exc:
            _not_deleted("finished", exc)
            return 0
        now = store_now(self._clock(), reading)
        for state, age in ages:
            deleted += await self._retain_state(now, state, age)
        if deleted:
            log.info("deleted %d finished messages past their retention", deleted)
        return deleted

    async def _retain_state(self, now: datetime, state: RecipientState, age: timedelta) -> int:
        """Delete the messages in ``state`` past ``age``, batch after batch, each batch
        going on below the last message of the one before (a keyset walk of the
        candidates, newest first). The newest candidates are the messages queued just
        before the cutoff, and those of them that finished after it stay: walked past,
        not looked at again, they hide none of the older mail behind them, and the
        round looks at each candidate once."""
        deleted, after = 0, None
        while True:
            try:
                # In a thread even for a store called on the loop (memory, SQLite): a
                # batch's look for candidates walks every finished message older than
                # the cutoff that the round keeps, and on the loop it held the worker's
                # deliveries 0.3 s per 100,000 of them (failed mail under a delivered
                # retention, say), every round. The rest of the worker runs meanwhile,
                # and between two batches.
                count, after = await self._off_loop(
                    purge_batch, self.store, now=now, state=state, age=age, after=after
                )
            except StoreError as exc:
                # The end of this state's walk only: what it deleted counts, and the
                # next state's goes on. Ending the round, a walk that failed every
                # round (on PostgreSQL, one a statement_timeout cancelled as it read
                # past many kept messages) kept the states after it from ever going.
                _not_deleted(state.value, exc)
                return deleted
            deleted += count
            if after is None:
                return deleted  # every candidate seen


def _not_deleted(what: str, exc: StoreError) -> None:
    """Log that the ``what`` messages past their retention were not (all) deleted."""
    log.warning(
        "%s messages past their retention not deleted (tried again in %g s): %s",
        what,
        RETAIN_EVERY,
        exc,
    )

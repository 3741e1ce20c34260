"""A worker's check of its own clock against its store server's.

Workers on many hosts share a PostgreSQL queue, and every lease decision uses the
worker's own clock: a recipient is due, and another worker's lease expired, when this
worker's clock says so. A worker stamps its leases ``now + lease_for`` and its heartbeat
extends them every ``lease_for / 3``, so a lease in good health always has at least
``2/3 · lease_for`` left on its holder's clock. Two workers whose clocks differ by more
than that see each other's live leases as expired, take the recipients over while they
are being delivered, and the mail goes out twice. If every worker keeps within
``lease_for / 3`` of the server's clock, any two differ by less than ``2/3 · lease_for``:
that is the danger threshold. Beyond it the worker leases no new work (it finishes and
records what it holds, keeps running, checks again every ``poll_interval`` and resumes
by itself once its clock is a tenth inside the threshold: :data:`HYSTERESIS`);
from :data:`WARN_SKEW` it warns.

The check is one round trip (:meth:`ServerClock.measure_clock`) at start, before the first
lease, and then every :data:`CHECK_EVERY` seconds (at most ``lease_for / 3``): nothing per
message. A clock stepped between two checks (NTP, an operator, a VM resumed) is checked
again before the next lease and the next beat, once it parts by :data:`STEP` from the
event loop's monotonic clock (:meth:`WorkerClock._check_clock_if_stepped`). Stores that
share the worker's clock (memory, SQLite) are not asked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import Enum

from mailstrom.config import Config
from mailstrom.errors import StoreError
from mailstrom.runtime.worker_store import WorkerStore
from mailstrom.stores.clock import ClockReading, ServerClock

log = logging.getLogger("mailstrom.worker")

WARN_SKEW = 30.0
"""Seconds of skew from which a worker warns. NTP keeps clocks within milliseconds, so
30 s is a clock that is not synchronised at all, yet far below the 5 minutes from which
the default lease (15 minutes) is in danger: there is time to fix it. Scheduled mail
(``send_at``) and retries already go out that much early or late."""
CHECK_EVERY = 60.0
"""Seconds between two checks of a worker whose clock is fine (at most ``lease_for / 3``):
a clock that jumps (a VM resumed from suspend) is caught within a minute, at the cost of
one round trip a minute."""
STEP = 1.0
"""Seconds by which the worker's clock may part from the event loop's monotonic one since
the last check before it is checked again ahead of a lease or a beat. Left to the next
timed check, a clock stepped an hour ahead leased every live lease of the other workers
as expired (and one stepped back stamped its own leases expired) for up to a minute: the
mail went out twice. NTP slews a clock by half a millisecond a second at most, far
inside this between two checks; a step is not."""


class ClockVerdict(Enum):
    """What a clock reading means for a worker."""

    FINE = "fine"
    WARN = "warn"
    """Off by more than :data:`WARN_SKEW`: log it, show it, deliver as before."""
    STOP = "stop"
    """Off by more than ``lease_for / 3``: lease no new work (see the module docstring)."""


def danger_skew(lease_for: timedelta) -> float:
    """Seconds of skew from which a worker's leases and others' can overlap."""
    return lease_for.total_seconds() / 3


HYSTERESIS = 0.1
"""A verdict past a threshold holds until the skew is this fraction below it. A clock that
NTP slews back does so at half a millisecond a second, so it stays near a threshold for a
long time, where each reading's round trip moves it a little either way: without a
margin the verdict would flip at many checks, each flip a log line, and a pause and a
resume of leasing."""


def verdict_for(
    reading: ClockReading, lease_for: timedelta, previous: ClockVerdict = ClockVerdict.FINE
) -> ClockVerdict:
    """The verdict on ``reading`` for a worker leasing for ``lease_for`` whose last verdict
    was ``previous``: the skew the measurement cannot explain away
    (:attr:`ClockReading.certain_skew`) against the thresholds, the danger first (it may be
    the lower one, with a short lease). A threshold already passed is left only
    :data:`HYSTERESIS` below it."""
    skew = reading.certain_skew

    def beyond(threshold: float, passed: bool) -> bool:
        return skew > (threshold * (1 - HYSTERESIS) if passed else threshold)

    if beyond(danger_skew(lease_for), previous is ClockVerdict.STOP):
        return ClockVerdict.STOP
    if beyond(WARN_SKEW, previous is not ClockVerdict.FINE):
        return ClockVerdict.WARN
    return ClockVerdict.FINE


def lease_margin(reading: ClockReading | None) -> timedelta:
    """What a heartbeat adds to ``now + lease_for``: how far the worker's clock is behind
    the server's, so that the leases it still holds (also while paused) do not look
    expired early to workers whose clocks are right. A clock ahead needs nothing: its
    leases only last longer."""
    if reading is None or reading.skew >= 0:
        return timedelta(0)
    return timedelta(seconds=-reading.skew)


class WorkerClock(WorkerStore):
    """The clock check of :class:`Worker`, mixed in over its state; its result is what
    the store loop reads (:attr:`_clock_stops_leasing`) and what the heartbeat corrects by
    (:func:`lease_margin`)."""

    config: Config
    _clock: Callable[[], datetime]
    _checks_clock: bool
    _clock_reading: ClockReading | None
    _clock_verdict: ClockVerdict
    _clock_checked: asyncio.Event | None
    _clock_seen: tuple[datetime, float] | None = None
    """This worker's clock and the loop's when the last check began (None before one)."""
    _wake: asyncio.Event | None
    _lease_wanted: bool
    _due_stale: bool

    @property
    def _clock_stops_leasing(self) -> bool:
        return self._clock_verdict is ClockVerdict.STOP

    async def _clock_loop(self) -> None:
        """Check at start (the store loop waits for the first check before it leases),
        then every :data:`CHECK_EVERY` seconds, or every ``poll_interval`` while paused or
        not yet measured."""
        try:
            if not self._checks_clock or not isinstance(self.store, ServerClock):
                return
            measure = self.store.measure_clock
            while True:
                await self._check_clock(measure)
                if self._clock_checked is not None:
                    self._clock_checked.set()
                await asyncio.sleep(self._clock_check_interval())  # a timer
        finally:
            # Also when cancelled before the first check ended: a stopping worker's store
            # loop must not wait for it.
            if self._clock_checked is not None:
                self._clock_checked.set()

    def _clock_check_interval(self) -> float:
        if self._clock_reading is None or self._clock_stops_leasing:
            return self.config.poll_interval
        return min(CHECK_EVERY, danger_skew(self.config.lease_for))

    def _clock_stepped(self) -> bool:
        """Whether this worker's clock has moved :data:`STEP` apart from the loop's since
        the last check began: stepped, or the host was suspended."""
        seen = self._clock_seen
        if seen is None:
            return False
        wall, loop_time = seen
        moved = (self._clock() - wall).total_seconds()
        return abs(moved - (asyncio.get_running_loop().time() - loop_time)) > STEP

    def _clock_for_leases(self) -> datetime:
        """The time a beat extends leases from: this worker's clock, or while a step it
        has seen is not yet checked (the check failed), the later of that and the clock
        of the last check moved on by the loop's. Stepped back an hour, the clock alone
        extended leases to 45 minutes before the server's now, and another worker took
        them over; a later end only holds a lease longer."""
        now = self._clock()
        seen = self._clock_seen
        if seen is None or not self._clock_stepped():
            return now
        wall, at = seen
        return max(now, wall + timedelta(seconds=asyncio.get_running_loop().time() - at))

    async def _check_clock_if_stepped(self) -> bool:
        """Check the clock now when it was stepped since the last check: before a lease
        or a beat trusts it (see :data:`STEP`). False when that check failed: the step
        is still seen, until a check succeeds."""
        store = self.store
        if self._clock_stepped() and isinstance(store, ServerClock):
            return await self._check_clock(store.measure_clock)
        return True

    async def _check_clock(self, measure: Callable[[Callable[[], datetime]], ClockReading]) -> bool:
        """One check; False when the store did not answer."""
        began = (self._clock(), asyncio.get_running_loop().time())
        try:
            reading = await self._read_clock(measure)
        except StoreError:
            # Not a skew: a store that does not answer, handled like any other store call
            # (shown in store_error; the verdict stays what it was; asked again soon).
            # A step seen before stays seen: forgotten, the next lease trusted the clock
            # stepped an hour ahead, which a failed check had not measured. Before any
            # check answered, steps are looked for from this one (a database not up yet
            # at boot, and chrony stepping the clock meanwhile).
            if self._clock_seen is None:
                self._clock_seen = began
            return False
        # The clock as it was when the check that measured it began.
        self._clock_seen = began
        self._clock_reading = reading
        verdict = verdict_for(reading, self.config.lease_for, self._clock_verdict)
        previous, self._clock_verdict = self._clock_verdict, verdict
        self._counters.clock_skew = reading.skew
        self._counters.clock_warning = verdict is not ClockVerdict.FINE
        self._counters.paused = (
            self._pause_reason(reading) if verdict is ClockVerdict.STOP else None
        )
        if verdict is not previous:
            self._log_clock_change(previous, verdict, reading)
            if previous is ClockVerdict.STOP:
                self._resume_leasing()
        return True

    def _pause_reason(self, reading: ClockReading) -> str:
        limit = danger_skew(self.config.lease_for)
        return f"clock: {reading.describe()}, beyond {limit:g} s (a third of lease_for)"

    def _log_clock_change(
        self, previous: ClockVerdict, verdict: ClockVerdict, reading: ClockReading
    ) -> None:
        """One line per change of verdict, never one per check."""
        limit = danger_skew(self.config.lease_for)
        if verdict is ClockVerdict.STOP:
            log.error(
                "this worker's clock is %s: beyond %g s (a third of lease_for) its leases "
                "and other workers' overlap and mail would be sent twice, so it takes no "
                "new work (it finishes what it holds) until its clock is right; fix the "
                "time synchronisation (NTP, chrony) of this host or of the database server",
                reading.describe(),
                limit,
            )
        elif verdict is ClockVerdict.WARN:
            log.warning(
                "this worker's clock is %s; %s %g s (a third of lease_for)%s; fix the "
                "time synchronisation (NTP, chrony) of this host or of the database server",
                reading.describe(),
                "within" if previous is ClockVerdict.STOP else "delivery goes on, but past",
                limit,
                " again: leasing again" if previous is ClockVerdict.STOP else " it stops leasing",
            )
        else:
            log.warning(
                "this worker's clock is in step with the store again (%s)%s",
                reading.describe(),
                ": leasing again" if previous is ClockVerdict.STOP else "",
            )

    def _resume_leasing(self) -> None:
        self._lease_wanted = True
        self._due_stale = True
        if self._wake is not None:
            self._wake.set()

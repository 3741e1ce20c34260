"""How far a caller's clock is from its store's: the measurement a worker checks before
it trusts its own clock with leases.

Every lease decision uses the worker's clock (``now`` in :meth:`Store.lease`,
:meth:`Store.extend`): a recipient is due, and a lease expired, when the worker's clock
says so. Workers on one host (memory, SQLite) share that clock. Workers on many hosts
sharing a PostgreSQL store do not, and one whose clock is off by more than a third of
``lease_for`` takes over other workers' leases while they deliver (see
:mod:`mailstrom.runtime.worker_clock`). A store whose workers may run on other hosts can
say how far off a caller's clock is: it implements :class:`ServerClock`. The worker asks
with ``isinstance(store, ServerClock)``, so the :class:`~mailstrom.stores.base.Store`
protocol, which every store and every test double implements, does not grow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from mailstrom.bounds import EARLIEST_TIME, LATEST_TIME
from mailstrom.errors import ConfigError, InvalidArgument


@dataclass(frozen=True, slots=True, kw_only=True)
class ClockReading:
    """One comparison of the caller's clock with the store server's.

    ``skew``: seconds the caller's clock is ahead of the server's (negative: behind).
    ``uncertainty``: how far off ``skew`` may be, in seconds (half the round trip: the
    server read its clock at some moment between the caller's two readings).
    ``server``: which server was asked, for log lines (no password).
    """

    skew: float
    uncertainty: float
    server: str

    @property
    def certain_skew(self) -> float:
        """The part of ``|skew|`` the measurement cannot explain (never negative): what
        thresholds are compared with, so that a slow round trip alone never looks like
        a wrong clock."""
        return max(0.0, abs(self.skew) - self.uncertainty)

    def describe(self) -> str:
        """``"42.0 s ahead of PostgreSQL server db:5432 (± 0.001 s)"``."""
        side = "ahead of" if self.skew >= 0 else "behind"
        return f"{abs(self.skew):.1f} s {side} {self.server} (± {self.uncertainty:.3f} s)"


def reading_between(
    before: datetime, server_time: datetime, after: datetime, *, server: str
) -> ClockReading:
    """The reading when the caller's clock said ``before`` just before asking the server
    and ``after`` just after its answer ``server_time``.

    The server read its clock somewhere in between; taken at the midpoint, the round trip
    is not counted as skew, and half of it is the uncertainty.

    >>> from datetime import UTC, datetime, timedelta
    >>> t = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    >>> r = reading_between(t, t - timedelta(seconds=59), t + timedelta(seconds=2), server="db")
    >>> r.skew, r.uncertainty
    (60.0, 1.0)
    """
    half_trip = (after - before) / 2
    midpoint = before + half_trip
    return ClockReading(
        skew=(midpoint - server_time).total_seconds(),
        uncertainty=abs(half_trip.total_seconds()),
        server=server,
    )


@runtime_checkable
class ServerClock(Protocol):
    """A store that can compare a caller's clock with its server's (PostgreSQL)."""

    def measure_clock(self, clock: Callable[[], datetime]) -> ClockReading:
        """Read ``clock`` just before and just after asking the server for its time (one
        round trip); :class:`~mailstrom.errors.StoreError` when the server cannot be
        asked."""
        ...


def in_utc(clock: Callable[[], datetime]) -> Callable[[], datetime]:
    """``clock`` with its aware readings in UTC. The worker, the facades and the
    dashboard add and subtract ages on their clock's time (a backoff, a lease's end,
    purge's cutoff, a suspension's end), and Python does that on the wall clock of a
    ``ZoneInfo`` time: 01:50 CET plus two hours was 03:50 CEST, one hour on, and 03:10
    CEST less an hour was 02:10, which does not exist and reads as 01:10 UTC, now
    itself.

    A reading that is no timezone-aware datetime raises
    :class:`~mailstrom.errors.ConfigError` naming the clock: the clock is the caller's
    configuration, and what it returned was an AttributeError deep in a store ("'int'
    object has no attribute 'tzinfo'"), a None the memory store queued a message with,
    or a naive time refused as the ``now`` argument nobody gave."""

    def reading() -> datetime:
        now = clock()
        if not isinstance(now, datetime) or now.utcoffset() is None:
            kind = "a naive datetime" if isinstance(now, datetime) else type(now).__name__
            shown = repr(now) if len(repr(now)) <= 100 else repr(now)[:97] + "..."
            raise ConfigError(
                f"clock returned {shown} ({kind}): it must return a "
                "timezone-aware datetime, such as datetime.now(UTC)"
            )
        return now.astimezone(UTC)

    return reading


def before(now: datetime, age: timedelta) -> datetime:
    """The time ``age`` before ``now``, reckoned in UTC. Python subtracts a timedelta from
    a ``ZoneInfo`` time on its wall clock: the hour after a change to summer time, 03:10
    CEST less an hour was 02:10, which does not exist and reads as 01:10 UTC (now itself),
    so "older than an hour" took in mail queued minutes before."""
    return now.astimezone(UTC) - age


def after(now: datetime, span: timedelta, argument: str = "lease_for") -> datetime:
    """The time ``span`` after ``now``, reckoned in UTC (see :func:`in_utc`): a lease
    taken at 01:50 CET for two hours ended at 03:50 CEST, one hour on, when added on a
    ``ZoneInfo`` time's wall clock. InvalidArgument (naming ``argument``) when that is
    no time a store keeps (:func:`kept_time`): a lease for ``timedelta(days=10**8)``
    was a bare OverflowError, or StoreRefusedData, depending on the store."""
    try:
        end = now.astimezone(UTC) + span
    except OverflowError:
        end = None
    if end is None or not EARLIEST_TIME <= end < LATEST_TIME:
        raise InvalidArgument(
            f"{argument}: {span!r} after {now.isoformat()} is {_outside}",
            argument=argument,
        )
    return end


_outside = (
    f"outside the years {EARLIEST_TIME.year} to {LATEST_TIME.year - 1}, the times a store keeps"
)


def kept_time(when: datetime, argument: str) -> datetime:
    """``when`` in UTC (:func:`aware_utc`), as a store writes it: InvalidArgument when it
    lies outside :data:`~mailstrom.bounds.EARLIEST_TIME` to
    :data:`~mailstrom.bounds.LATEST_TIME`, the times every store reads back. SQLite
    wrote one past them into a row it could not read again (its status raised
    UnreadableRow, and its next lease failed the recipient as unreadable), where the
    memory store and PostgreSQL kept it."""
    utc = aware_utc(when, argument)
    if not EARLIEST_TIME <= utc < LATEST_TIME:
        raise InvalidArgument(f"{argument}: {when.isoformat()} is {_outside}", argument=argument)
    return utc


def aware_utc(when: datetime, argument: str) -> datetime:
    """``when`` in UTC; InvalidArgument (a ValueError) when it is naive, as SQLite's
    times refuse it: a store compares its times in UTC, and a naive one has none."""
    if when.utcoffset() is None:
        raise InvalidArgument(
            f"{argument}: naive datetime {when!r}: mailstrom needs timezone-aware times",
            argument=argument,
        )
    return when.astimezone(UTC)


def store_now(now: datetime, reading: ClockReading | None = None) -> datetime:
    """The earlier of ``now`` (the worker's clock) and the latest time the store server's
    clock may say (``reading``): a worker whose clock runs ahead (its time
    synchronisation failed) must not delete mail that is not yet old enough for the
    others, nor prune entries still in force. Memory and SQLite stores share the worker's
    host clock."""
    if reading is not None and reading.skew > 0:
        return now - timedelta(seconds=reading.certain_skew)
    return now

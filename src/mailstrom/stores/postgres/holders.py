"""Which lease holders of a PostgreSQL queue are alive: a row per holder, seen by the server.

Workers sharing a PostgreSQL queue may run on many hosts, so no lock file or process table
tells one of them that another died: a worker killed with SIGKILL, or whose host went
down, used to hold its leases until they expired (``Config.lease_for``, 15 minutes by
default). So each worker says it lives: at every look for dead holders
(:meth:`~mailstrom.stores.postgres.store.PostgresStore.release_dead_holders`, called by
the worker every :attr:`HolderBeats.beat_every` seconds) its row in ``lease_holders``
gets the server's clock as ``seen_at``, and the worker's own ``dead_after`` (the store
URL's parameter, 2 minutes by default: eight beats). A holder whose row was not moved for
that long, and for the judge's own ``dead_after`` if that is longer, is taken for dead by
the next look of another worker, which deletes the row and gives back every recipient the
holder still leases, due at once, in one statement. So workers whose URLs say different
``dead_after`` (one rolled out host by host, a short one in tests or in the web
application's URL) never take each other for dead before the holder's own time, by which
it has stopped itself (runtime/worker_reaping.py).

Only the server's clock is compared with itself, so the hosts' clocks do not matter.
And a worker judges only by a window its own looks covered without a break (each look
within :attr:`HolderBeats.break_after` of the one before): a holder is dead when it was
not seen for the last ``dead_after`` (the longer one), and the judge looked all
through that time. A
server restart, a failover or a network cut that stopped everyone's beats breaks every
judge's run as well, so nobody is taken for dead for the time the server could not be
reached: after one, a worker judges again once it has looked for ``dead_after``. So
does a step of the server's clock (seen as its time between two looks parting from the
judge's own), which made every live holder's last beat look that much older.

What it costs to be wrong: a worker that lives but could not reach the server alone for
``dead_after`` (or whose process was stopped that long) is taken for dead, and another
worker delivers what it still held; its results for those recipients are then ignored
when recorded. So a worker cut off for three quarters of ``dead_after`` starts none of
its leased work (runtime/worker_reaping.py): only what it had under way, or delivered
without recording, goes out twice. Its next beat finds its row gone, makes it again and
logs an error that says so. ``dead_after=0`` in the URL turns
this store's judging off: the leases of dead holders it alone would judge expire as
before. Its own holders still beat, and their rows promise two minutes (eight beats), by
which the other workers judge them and which their worker honours (it stops itself when
cut off, as any other).

A store that closes marks its holders stopped, and the next look of any worker (judging
or not: a ``mailstrom worker --once`` from cron, say) removes their rows, giving back
whatever they still leased, so the table holds the workers that run and the few that died.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta

log = logging.getLogger("mailstrom.stores.postgres")

QUIET_EVERY = 60.0
"""The eighth of ``dead_after`` when judging is off (``dead_after=0``): a look longer
than two of them after the last starts a new run. Such a worker still beats every
:data:`BEAT_AT_LEAST_EVERY` seconds, since the others judge it."""
BEAT_AT_LEAST_EVERY = 15.0
"""Seconds between two beats at most, whatever ``dead_after`` (an eighth of the default
two minutes), judging off included, so that a holder's row says it lives often (the
living :meth:`~mailstrom.stores.postgres.store.PostgresStore.live_holders` lists, a
judge's run that starts soon after its beat). Judges wait for the longer of their own
``dead_after`` and the holder's (its row's), so a longer beat is no danger to it."""
STOP_WAIT = 2.0
"""Seconds a closing store waits for a connection to mark its holders stopped."""
LIST_AT_MOST = 1000
"""Holders :meth:`~mailstrom.stores.postgres.store.PostgresStore.live_holders` lists at
most."""


class HolderBeats:
    """One store's side of the holders' beats: the run of unbroken looks it judges by,
    and the holders it has said live for (to notice when others took one for dead)."""

    def __init__(
        self, dead_after: float | None, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.dead_after = dead_after
        eighth = QUIET_EVERY if dead_after is None else dead_after / 8
        self.beat_every = min(eighth, BEAT_AT_LEAST_EVERY)
        """Seconds between two looks of a worker: an eighth of ``dead_after``, and at most
        :data:`BEAT_AT_LEAST_EVERY` (judging off too), so that a worker whose
        ``dead_after`` is shorter does not take this one for dead between two beats."""
        self.break_after = 2 * eighth
        """A look this long after the last one starts a new run: one missed beat (of an
        eighth of ``dead_after``)."""
        self.alive_within = dead_after if dead_after is not None else 4 * QUIET_EVERY
        """Seconds since its last beat within which a holder counts among the living (or
        its own :attr:`promise`, when longer)."""
        self.promise = dead_after if dead_after is not None else 8 * self.beat_every
        """The ``dead_after`` this store's holders record in their rows: seconds unseen
        after which other workers may take them for dead (the URL's; judging off, eight
        beats, as the default two minutes)."""
        self.host = socket.gethostname()[:255]
        self._monotonic = monotonic
        self._run_since: datetime | None = None
        self._last_look: float | None = None
        self._last_server: datetime | None = None
        self._beaten: set[str] = set()

    def identity(self, holder: str) -> dict[str, object]:
        """The parameters of ``beat_holder`` for ``holder``."""
        return {
            "holder": holder,
            "host": self.host,
            "pid": os.getpid(),
            "dead_after": self.promise,
        }

    def beaten(self, holder: str, *, made: bool) -> None:
        """Note a beat of ``holder``; ``made``: its row had to be made. Made again after
        an earlier beat, it had been taken for dead, which is logged."""
        if made and holder in self._beaten:
            log.error(
                "this worker (lease holder %s) was taken for dead by another worker, which "
                "had not seen it alive for its store URL's dead_after: what it leased was "
                "given back and may be delivered twice; its results for those recipients "
                "are ignored",
                holder,
            )
        self._beaten.add(holder)

    def own(self) -> list[str]:
        """The holders this store has said live for."""
        return sorted(self._beaten)

    def looked(self, server_now: datetime) -> datetime | None:
        """Note a look that reached the server when its clock read ``server_now``.

        Returns the time before which a holder not seen since is dead: ``dead_after``
        before ``server_now``, a window this store's unbroken run of looks covers whole
        (so the server could be reached all along). None while this store may not judge:
        judging is off, or its run is shorter than ``dead_after``. A holder whose own
        ``dead_after`` (its row's) is longer is dead only when unseen for that long, a
        window the run (:attr:`run_since`) covers whole too: the statement
        ``reap_holders`` judges each holder by its row.

        A look whose server clock moved more than :attr:`break_after` away from this
        process's monotonic one since the last look starts a new run too: the server's
        clock was stepped (NTP correcting it, a VM resumed). Stepped ahead, every live
        holder's last beat read as that much older, and all of them were taken for dead
        at once; stepped back, the run's start lay ahead of the clock, and nobody was
        judged until the clock got there again. After the step the run starts over, so
        every live holder has beaten by the new clock before anyone is judged by it."""
        now = self._monotonic()
        last_look, last_server = self._last_look, self._last_server
        if (
            last_look is None
            or last_server is None
            or now - last_look > self.break_after
            or abs((server_now - last_server).total_seconds() - (now - last_look))
            > self.break_after
        ):
            self._run_since = server_now
        self._last_look = now
        self._last_server = server_now
        if self.dead_after is None or self._run_since is None:
            return None
        threshold = server_now - timedelta(seconds=self.dead_after)
        return threshold if self._run_since <= threshold else None

    @property
    def run_since(self) -> datetime | None:
        """The server's clock at the first look of this store's unbroken run of looks
        (None before its first look)."""
        return self._run_since


def log_reaped(
    holder: str, host: str, pid: int, seen_at: datetime, *, stopped: bool, released: int
) -> None:
    """Say that a dead (or stopped) holder's leases were given back (nothing when it held
    none)."""
    if not released:
        return
    if stopped:
        why = "stopped without giving them back"
    else:
        why = f"was last seen at {seen_at.isoformat(timespec='seconds')}"
    log.warning(
        "gave back %d recipients leased by lease holder %s, whose worker (%s, pid %d) %s",
        released,
        holder,
        host,
        pid,
        why,
    )

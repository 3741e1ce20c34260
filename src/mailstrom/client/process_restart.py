"""What becomes of a worker child process that ends: its end judged (by the policy of
:mod:`mailstrom.client.supervision`), what it had leased given back to the store at
once, and another child started after the restart backoff, its counts going on from
the dead one's.

Mixed into :class:`~mailstrom.client.process.WorkerProcess`.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from dataclasses import replace
from typing import IO, TYPE_CHECKING

from mailstrom.client.process_watch import ChildWatch
from mailstrom.client.supervision import ChildExit, RestartBackoff, describe_exit, judge_exit
from mailstrom.errors import StoreError
from mailstrom.runtime.metrics import add_metrics
from mailstrom.status import WorkerStatus
from mailstrom.stores.base import Store

log = logging.getLogger("mailstrom.worker")

GIVE_BACK_WAIT = 2.0
"""Seconds ``stop()`` waits for the give-back of what a child it could not stop cleanly
had leased (a store call): one that takes longer (PostgreSQL down, its pool waiting for a
connection for the store's timeout) goes on in the background, and its leases come back
when they expire otherwise, as a dead worker's do."""


NOTHING_CARRIED = WorkerStatus(running=False)
"""What a worker process's first child carries over: nothing."""


class Restarting:
    """The end of a child and its restart; mixed into
    :class:`~mailstrom.client.process.WorkerProcess`."""

    _store: Store
    _lock: threading.Lock
    _proc: subprocess.Popen[bytes] | None
    _stdin: IO[bytes] | None
    _stopping: bool
    _supervised: bool
    _reported_error: bool
    _said_stopped: bool
    _stopped_by: str | None
    _error: str | None
    _holder: str | None
    _watch: ChildWatch | None
    _runs: tuple[WorkerStatus, WorkerStatus]
    _halt: threading.Event
    _supervisor: threading.Thread | None
    _backoff: RestartBackoff
    _restarts: int
    _death: str | None
    _coming_back: bool
    _start_timeout: float

    if TYPE_CHECKING:

        def _spawn(self, *, start_within: float | None = None) -> None: ...

    def restart_pending(self) -> bool:
        """Whether a child that died is to be started again (its backoff not over). Not
        once :meth:`stop` came: its thread starts nothing then, however long its
        give-back of the dead child's leases still waits for the store."""
        supervisor = self._supervisor
        return supervisor is not None and supervisor.is_alive() and not self._halt.is_set()

    def _judge(self, proc: subprocess.Popen[bytes] | None) -> None:
        """Act on the end of ``proc``, the current child (``_lock`` held)."""
        if proc is None or proc.returncode is None or not self._supervised:
            return  # start() is still waiting: it reports the failure itself
        verdict = judge_exit(
            proc.returncode,
            reported_error=self._reported_error,
            asked=self._stopping,
            said_stopped=self._said_stopped,
        )
        if verdict is ChildExit.DIED:
            watch = self._watch
            how = describe_exit(proc.returncode)
            if proc.returncode == 0:
                how = "gone without a word, its exit status unknown"
            death = f"worker process died ({how})"
            if watch is not None and watch.proc is proc and watch.killed_for is not None:
                death = f"worker process killed: {watch.killed_for}"
            self._schedule_restart(death, leased=self._holder)
        elif verdict is ChildExit.STOPPED_OUTSIDE:
            by = self._stopped_by
            if proc.returncode < 0:
                by = signal.Signals(-proc.returncode).name
            self._error = (
                f"worker process stopped by {by}, not by this program"
                if by
                else "worker process ended (status 0) without this program asking it to"
            )
            log.warning(
                "%s; mail is queued but not delivered until it is started again", self._error
            )

    def _schedule_restart(self, death: str, *, leased: str | None = None) -> None:
        """Start another child after the backoff, on a thread of its own (``_lock``
        held), first giving back what the dead child had leased under the holder
        ``leased``."""
        if self._stopping:
            return
        delay = self._backoff.next_delay(now=time.monotonic())
        self._death = death
        self._error = f"{death}; starting it again in {delay:g} s"
        # Its numbers go on in the next child's, as counters must within this process
        # (Prometheus scrapes them from it): what it counted after its last snapshot, half
        # a second at most, is lost with it.
        carried, last = self._runs
        self._runs = (added(carried, last), WorkerStatus(running=False))
        self._proc, self._stdin = None, None  # its reader closed its pipes
        supervisor = threading.Thread(
            target=self._restart_after,
            args=(delay, leased, self._halt),
            name="mailstrom-worker-supervisor",
            daemon=True,
        )
        try:
            supervisor.start()
        except RuntimeError as exc:
            # No thread left ("can't start new thread": a container's pids limit): no
            # restart is coming, which the status must not promise. The next start()
            # tries again; what the child leased comes back when its leases expire.
            self._supervisor = None
            self._error = f"{death}; not started again: no thread to start it ({exc})"
            log.error("%s", self._error)
            return
        self._supervisor = supervisor
        log.error("%s", self._error)

    def _restart_after(self, delay: float, leased: str | None, halt: threading.Event) -> None:
        """Start another child ``delay`` seconds from now unless ``halt`` (its run's:
        set by the stop() that ends that run, a later start() making a new one for its
        own) is set first."""
        if leased is not None:
            # Here, not under _lock nor on the reader thread: it waits for the store.
            self._give_back(leased)
        if halt.wait(delay):
            return  # stop() came first
        with self._lock:
            if self._stopping or halt.is_set():
                return
            try:
                self._spawn(start_within=self._start_timeout)
            except OSError as exc:  # no fork: out of memory, out of processes
                self._schedule_restart(f"worker process could not be started again ({exc})")
                return
            self._restarts += 1
            self._coming_back = True
            # Until it answers: a child that hangs at start must not read as a healthy
            # one on its way (running False and no error is no state a caller can act on).
            self._error = f"{self._death}; started again, not answering yet"

    def _give_back_briefly(self, holder: str) -> None:
        """:meth:`_give_back`, waited for :data:`GIVE_BACK_WAIT` seconds at most: stop()
        is bounded (``timeout + STOP_GRACE``), and a store that cannot be reached made it
        wait for the store's own timeout (30 s for PostgreSQL's pool) on top."""
        thread = threading.Thread(
            target=self._give_back, args=(holder,), name="mailstrom-give-back", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (pids.max): give back here
            self._give_back(holder)
            return
        thread.join(GIVE_BACK_WAIT)

    def _give_back(self, holder: str) -> None:
        """Give back what a dead child had leased under ``holder``: due again now, not
        once its leases expire (``Config.lease_for``, a quarter of an hour by default).
        The store's I/O: never called under ``_lock`` nor on the reader thread."""
        try:
            released = self._store.release_holder(holder)
        except StoreError as exc:
            log.warning(
                "leases of the dead worker process were not given back (%s); "
                "they are delivered once they expire",
                exc,
            )
            return
        except Exception:  # a store's bug must not cost the restart that follows
            log.exception(
                "leases of the dead worker process were not given back; "
                "they are delivered once they expire"
            )
            return
        if released:
            log.warning(
                "gave back %d recipients the dead worker process had leased: due again now",
                released,
            )
        else:
            log.info("the dead worker process had leased nothing")


def at_rest(status: WorkerStatus) -> WorkerStatus:
    """``status`` of a child that has ended: its counts, with nothing in its hands, and
    no longer stopping (a child killed as it drained last said it was)."""
    return replace(
        status,
        stopping=False,
        store_wait_since=None,
        in_flight=0,
        unrecorded=0,
        sessions=0,
        transactions=0,
        idle_connections=0,
        leased_bytes=0,
    )


def added(carried: WorkerStatus, current: WorkerStatus) -> WorkerStatus:
    """``current`` with the counts of ``carried`` (earlier children's) added to its own.
    What is "since the worker started" goes on from the first child's, as the counters do:
    the start time (exported beside them) and the peak of the bytes leased."""
    if carried is NOTHING_CARRIED:
        return current
    return replace(
        current,
        started_at=carried.started_at or current.started_at,
        leased_bytes_peak=max(carried.leased_bytes_peak, current.leased_bytes_peak),
        delivered=carried.delivered + current.delivered,
        deferred=carried.deferred + current.deferred,
        failed=carried.failed + current.failed,
        metrics=add_metrics(carried.metrics, current.metrics),
    )

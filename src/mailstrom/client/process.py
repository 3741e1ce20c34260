"""The parent's side of a worker in a child process (``Mailstrom(worker="process")``).

Delivery then has an interpreter, and a GIL, of its own: the application's ``send_email``
never waits behind the worker's protocol code, and the worker never waits behind the
application. The child opens the same store from its URL and is woken across the process
boundary by the store itself (a datagram socket for SQLite, NOTIFY for PostgreSQL). Its
results come back over a pipe, read by a reader thread of this process, and reach
``on_result`` on a second thread, in order (a slow callback does not hold the pipe);
its log records are re-emitted here at the levels the ``mailstrom`` loggers had when it
started. A child that dies without being asked or saying why is started again after a
backoff (:mod:`mailstrom.client.supervision`). See :mod:`mailstrom.runtime.child` for the
other end.

This module holds the lifecycle (start, stop) and what the facades ask; the parts with
a job of their own are beside it: how a child process is started
(:mod:`~mailstrom.client.process_start`), the reading of its frames
(:mod:`~mailstrom.client.process_frames`), the watch over a child that hangs or freezes
(:mod:`~mailstrom.client.process_watch`), what becomes of one that ends
(:mod:`~mailstrom.client.process_restart`) and what a fork of this process does with
them (:mod:`~mailstrom.client.process_fork`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import logging
import os
import pickle
import subprocess
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import IO, Any

from mailstrom.client.process_fork import LIVE, SPAWNING, ForkForgetting
from mailstrom.client.process_frames import FrameReading, Handoff
from mailstrom.client.process_restart import GIVE_BACK_WAIT as GIVE_BACK_WAIT
from mailstrom.client.process_restart import NOTHING_CARRIED, added
from mailstrom.client.process_start import no_interpreter as no_interpreter
from mailstrom.client.process_start import popen_child
from mailstrom.client.process_watch import ChildWatch, Watching
from mailstrom.client.supervision import RestartBackoff
from mailstrom.config import Config
from mailstrom.errors import WorkerError
from mailstrom.runtime.pipes import ChildSpec, write_frame
from mailstrom.status import RecipientState, WorkerStatus
from mailstrom.stores.base import RecipientResult, Store, new_holder
from mailstrom.tls_spec import TLSContextSpec

log = logging.getLogger("mailstrom.worker")

_FORWARDED_LOGGERS = ("mailstrom", "mailstrom.attempts", "mailstrom.worker", "mailstrom.delivery")
STOP_GRACE = 10.0
"""Seconds past the drain timeout that ``stop()`` waits for a worker to end: a child is
then killed, a worker thread or task left to end by itself."""
ORPHAN_DRAIN = 30.0
"""Seconds a worker process whose parent died (killed, or ended without ``stop()``) lets
its deliveries in flight finish, as ``stop()`` would have by default, before it gives
the rest back to the store and exits. It stopped at once, and a message whose content
the server had taken went out a second time once its lease expired."""
FROZEN_AFTER = 60.0
"""Seconds a worker process may leave the pings of its parent unanswered (every few
seconds; its event loop answers them) before it is taken for frozen (stopped by SIGSTOP
or its cgroup's freezer, its loop blocked by a call that does not return), killed and
started again after the restart backoff. Slow deliveries do not count (the loop answers
while they wait), nor the time this process spends on the child's frames (a slow
``on_result``, a logging handler that blocks: the child waits for us then), nor a wait
of its loop in a store call (a write lock another process holds, which an SQLite store
waits for up to its ``busy_timeout``, longer than this if so set): its control thread
answers meanwhile."""
RESULTS_WAITING = 10_000
"""How many results of a worker process wait here for a slow ``on_result`` at most (a
few megabytes). Past it the reader waits for the callback to take some: the child then
waits to write its next frames (a pipe holds a hundred results or so), and its
deliveries with it, until the callback catches up; nothing is dropped (each result is
recorded in the store before it is sent)."""


def _log_levels() -> dict[str, int]:
    """The effective level of each logger of mailstrom here, for the child to log at.

    Every one this process has, not only the main ones: the child's others (``mailstrom.tls``,
    ``mailstrom.shaping``...) took the level of ``mailstrom``, so one the application had
    silenced on its own spoke all the same (a forwarded record is handled here without a
    look at the level), and one it had let through on its own stayed silent."""
    known = list(logging.root.manager.loggerDict.items())  # a copy: others may add some
    names = {name for name, logger in known if isinstance(logger, logging.Logger)}
    names = {name for name in names if name.startswith("mailstrom.")}
    return {
        name: logging.getLogger(name).getEffectiveLevel()
        for name in sorted({*_FORWARDED_LOGGERS, *names})
    }


class WorkerProcess(FrameReading, Watching, ForkForgetting):
    """Start, wake, watch and stop one worker child process; start it again when it dies.

    It offers what the facades use of a :class:`~mailstrom.runtime.worker.Worker`:
    :meth:`wake`, :attr:`status` and :meth:`wait_stopped`.

    A child that ends without being asked and without saying why (killed by a signal
    other than SIGTERM or SIGINT, a non-zero exit with no ``error`` frame) is started
    again after a backoff (:mod:`mailstrom.client.supervision`); one that reported a
    permanent error, or that someone else stopped on purpose, stays dead and
    :attr:`status` says why. The restart waits on a thread of its own, which :meth:`stop`
    cancels at once.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        on_result: Callable[[RecipientResult], None] | None = None,
    ) -> None:
        self.config = config
        self._store = store
        self._on_result = on_result
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdin: IO[bytes] | None = None
        self._write_lock = threading.RLock()
        """Re-entrant: a signal handler's stop() may come while this thread's wake()
        holds it (the main thread's send_email), and must send its own frame."""
        self._reader: threading.Thread | None = None
        self._passer: threading.Thread | None = None
        """The current reader's thread that calls ``on_result`` (None without one)."""
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._runs = (NOTHING_CARRIED, WorkerStatus(running=False))
        """What the children before the current one counted (added up, at their deaths),
        and the current one's latest snapshot: one attribute, so that a reader on another
        thread never sees a dead child's numbers both carried and still current, or in
        neither place (counters that would jump, or fall)."""
        self._counts = {state: 0 for state in RecipientState}
        self._busy: tuple[float, float | None] = (0.0, None)
        """Seconds the readers have spent handling frames (passing results on to
        ``on_result``, log records to the application's handlers), and since when the
        current one is (None between frames): see :meth:`_wait_ended`."""
        self._error: str | None = None
        self._reported_error = False
        """Whether the current child sent an ``error`` frame (it ended for good)."""
        self._stopped_by: str | None = None
        """The signal the current child said it was stopped by, from its last frame."""
        self._said_stopped = False
        """Whether the current child sent its ``stopped`` frame (a clean end)."""
        self._cause: BaseException | None = None
        """The child's own exception when it could not open its store."""
        self._spec_sent = False
        """Whether the current child's spec is through the pipe: no other frame may go
        before it, and a child still without it has nothing to finish (:meth:`stop`)."""
        self._holder: str | None = None
        """The lease holder of the current child (fresh for each one): what it leased is
        given back at once if it dies or has to be killed."""
        self._lock = threading.Lock()
        """Orders spawning a child against :meth:`stop`: once ``_stopping`` is set under
        it, no child is spawned, and one spawned before is the one :meth:`stop` sees."""
        self._stopping = False
        self._supervised = False
        """True once :meth:`start` returned: a death before is start()'s failure."""
        self._halt = threading.Event()
        """Set by :meth:`stop`: ends a restart's backoff wait at once."""
        self._supervisor: threading.Thread | None = None
        self._backoff = RestartBackoff()
        self._restarts = 0
        self._death: str | None = None
        """How the last child that is to be started again died."""
        self._coming_back = False
        """A restarted child has not answered ``ready`` yet (its return is logged)."""
        self._start_timeout = 30.0
        """What :meth:`start` was given: a restarted child is killed (and started again
        after the backoff) when it has not answered ``ready`` within as long."""
        self._watch: ChildWatch | None = None
        """The watch over the current child (see :meth:`_watch_over`)."""

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the child; return when it delivers, or when it waits for a store that
        does not answer yet (:attr:`status` then says so in ``store_error``, and delivery
        begins by itself once the store opens). Raise :class:`WorkerError` when it cannot
        start: from the store's error when waiting cannot mend it
        (:class:`~mailstrom.errors.StoreCorrupt`,
        :class:`~mailstrom.errors.StoreAccessDenied`), from the ``OSError`` when no process
        can be started (no fork, no descriptor left). After such a failure, after
        :meth:`stop`, or once a child ended for good, it can be called again.

        A child started again after a death has as long (``timeout``) to answer: one that
        hangs at its start (its store's open blocked on a lock, a dead NFS mount) is
        killed then, and started again after the backoff."""
        with self._lock:
            if self.pid is not None or self.restart_pending():
                raise WorkerError("already started")
            last = self._reader
        if last is not None:
            if self.reading_on(threading.current_thread()):
                raise WorkerError(
                    "start() from on_result: this thread is still passing on the results "
                    "of the last worker process"
                )
            # Its child has exited and only what it left in the pipe remains: passed on
            # before the next child, whose state its end must not be judged against.
            last.join()
        with self._lock:
            if self._reader is not last or self.pid is not None or self.restart_pending():
                raise WorkerError("already started")  # another start() came first
            self._stopping = False
            self._supervised = False
            self._coming_back = False
            # A new one, not the last run's cleared: that run's restart thread may still
            # be giving back its dead child's leases (stop() bounds its wait for it), and
            # must start no child of its own once it has.
            self._halt = threading.Event()
            self._supervisor = None
            # A new worker, with fresh counters (a restart's child goes on with them):
            # the last one's reader, joined above, passes on nothing more.
            self._counts = {state: 0 for state in RecipientState}
            self._runs = (NOTHING_CARRIED, WorkerStatus(running=False))
            self._restarts = 0
            self._backoff = RestartBackoff()
            self._start_timeout = timeout
            try:
                self._spawn()
            except OSError as exc:  # no fork, no descriptor left, no interpreter file
                self._error = f"no process could be started ({exc})"
                raise WorkerError(f"worker process failed to start: {self._error}") from exc
            proc, reader = self._proc, self._reader
            assert proc is not None and reader is not None
        if not self._ready.wait(timeout) or self._error is not None:
            reason = self._error or f"no answer within {timeout:g} s"
            self._kill(proc)
            reader.join()  # the child is dead: the rest of its pipe, then its end
            with self._lock:
                # Nothing of it stays: pid is None and the next start() begins afresh.
                if self._proc is proc:
                    self._proc, self._stdin = None, None
                self._error = reason
            raise WorkerError(f"worker process failed to start: {reason}") from self._cause
        with self._lock:
            self._supervised = True
            if self._stopped.is_set() and not self._stopping:
                # It died between its "ready" and now, unsupervised: judge it here.
                self._judge(self._proc)

    def _spawn(self, *, start_within: float | None = None) -> None:
        """Start a child, whose reader hands it its spec; wait for neither (``_lock``
        held). With ``start_within``, a child that has not answered ``ready`` that many
        seconds later is killed (see :meth:`_watch_over`)."""
        config = self.config
        holder = new_holder()
        spec = ChildSpec(
            config=replace(config, tls_context=None),
            store=pickle.dumps(self._store, protocol=pickle.HIGHEST_PROTOCOL),
            tls=TLSContextSpec.of(config.tls_context) if config.tls_context else None,
            log_levels=_log_levels(),
            forward_results=self._on_result is not None,
            holder=holder,
            orphan_drain=ORPHAN_DRAIN,
        )
        # Pickled here, before any child exists: a failure is start()'s to raise.
        frame = io.BytesIO()
        write_frame(frame, "spec", spec)
        with SPAWNING:  # a fork waits until the pipes are where _forget finds them
            proc = popen_child()
            self._stopped.clear()
            self._ready.clear()
            self._error = None
            self._reported_error = False
            self._stopped_by = None
            self._said_stopped = False
            self._cause = None
            self._runs = (self._runs[0], WorkerStatus(running=False))  # not the last child's
            self._spec_sent = False  # before _stdin: a _send seeing the new pipe must wait
            self._proc, self._stdin = proc, proc.stdin
            LIVE.add(self)
        self._holder = holder
        watch = self._watch = ChildWatch(proc, start_within=start_within, frozen_after=FROZEN_AFTER)
        handoff = Handoff(RESULTS_WAITING) if self._on_result is not None else None
        self._reader = threading.Thread(
            target=self._read,
            args=(proc, frame.getvalue(), handoff, watch),
            name="mailstrom-worker-reader",
            daemon=True,
        )
        self._passer = None
        if handoff is not None:
            passer = threading.Thread(
                target=self._pass_results,
                args=(handoff,),
                name="mailstrom-worker-results",
                daemon=True,
            )
            try:
                passer.start()
            except RuntimeError:
                # No thread left: the reader passes the results on itself, as it did.
                handoff.end()
            else:
                self._passer = handoff.taker = passer
        try:
            self._reader.start()
        except RuntimeError as exc:
            if handoff is not None:
                handoff.close()  # its taker ends at once: nothing comes
            # No thread left ("can't start new thread": a container's pids limit, which
            # the fork just reached): nothing would send the child its spec nor read its
            # frames. It is not left waiting for them, and the failure is the OSError
            # that start() and a restart report as no process.
            self._reader = None
            self._kill(proc)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
            self._proc, self._stdin = None, None
            self._stopped.set()
            raise OSError(errno.EAGAIN, f"no thread to follow the worker process: {exc}") from exc
        watcher = threading.Thread(
            target=self._watch_over,
            args=(watch,),
            name="mailstrom-worker-watch",
            daemon=True,
        )
        # No thread left: the child goes unwatched, as every child went before.
        with contextlib.suppress(RuntimeError):
            watcher.start()
            watch.thread = watcher

    def wake(self) -> None:
        """Look for due work now (the store usually wakes the child by itself)."""
        self._send("wake")

    def stop(self, timeout: float | None = 30.0) -> None:
        """Let deliveries in flight finish within ``timeout`` seconds, give the rest back
        to the store, and wait for the child to exit (killed :data:`STOP_GRACE` seconds
        past ``timeout``, not counting the time ``on_result`` takes meanwhile: a child
        waiting for it to take its results is not stuck). A restart still waiting for its
        backoff is cancelled; no child is started after this began.

        It returns once every result the child sent has reached ``on_result``, however
        long the callback takes over them as long as it goes on taking them: none is
        passed on after stop() returned. One that takes none for ``timeout`` plus
        :data:`STOP_GRACE` seconds (it may be waiting for this stop(), awaited from it on
        an event loop) gets the rest after stop() returned, on its own thread.
        Called from ``on_result`` itself, it returns once the child has exited, and the
        results still in the pipe follow on that thread after the callback returns (a
        child with more to send than the pipe holds cannot exit meanwhile: it is killed
        past the grace)."""
        own = self.reading_on(threading.current_thread())  # called from on_result
        with self._lock:
            pending = self.restart_pending()  # before _halt, which ends it
            self._stopping = True
            self._halt.set()
            proc, supervisor, holder = self._proc, self._supervisor, self._holder
            reader = self._reader
            running = proc is not None and proc.returncode is None
            if pending and self._death is not None:
                self._error = f"{self._death}; not started again: stop() came first"
            elif self._coming_back and not self._reported_error:
                # Restarted, stopped before it answered: no trouble. One that said why
                # it cannot run (its error frame came first) keeps saying it.
                self._coming_back = False
                self._error = None
        if supervisor is not None and supervisor is not threading.current_thread():
            # Its wait ends at _halt, and a spawn under _lock is done; what may take long
            # is its give-back of the dead child's leases, a store call (a write lock held
            # elsewhere waits for busy_timeout): bounded as the rest of stop() is. It
            # starts no child after that (_stopping), whenever it returns.
            supervisor.join(None if timeout is None else timeout + STOP_GRACE)
        if proc is None:
            return
        given_back = False
        if not self._spec_sent:
            # Still waiting for its spec (a child that hangs at start, its spec larger
            # than the pipe): it cannot read a stop frame, and has opened no store.
            self._kill(proc)
            if holder is not None:
                self._give_back_briefly(holder)  # in case its spec went through just now
                given_back = True
        else:
            self._send("stop", timeout)
            try:
                self._wait_ended(proc, None if timeout is None else timeout + STOP_GRACE)
            except subprocess.TimeoutExpired:
                log.error("worker process %d did not stop; killing it", proc.pid)
                self._kill(proc)
                if holder is not None:
                    self._give_back_briefly(holder)  # it had no time to give them back itself
                    given_back = True
            finally:
                # Open until the child has ended: a second, shorter stop (hurry) is sent
                # on it meanwhile.
                with self._write_lock, contextlib.suppress(OSError):
                    assert proc.stdin is not None
                    proc.stdin.close()
        lingering = False
        if reader is not None and not own:
            # The child has exited, so only the frames it left in the pipe remain, and
            # each result among them reaches on_result before we return, unless the
            # callback takes none for as long as stop() is bounded (see _join_reader).
            lingering = not self._join_reader(
                reader, None if timeout is None else timeout + STOP_GRACE
            )
            if running and holder is not None and not given_back and not self._said_stopped:
                # It ended without its clean end, which gives back what it did not
                # deliver: killed by someone else as it drained (the OOM killer, a
                # kill -9 of a shutdown that seemed stuck). Due at once, as promised,
                # not once its leases expire.
                self._give_back_briefly(holder)
        with self._lock:
            if self._proc is proc and not own and not lingering:
                # Called from on_result (or leaving its reader to it), the child stays
                # the current one until its reader (this thread, or the one stop() left
                # to on_result, once the callback returns) reaches its end: that
                # end puts its last snapshot at rest, deliveries in flight and all, and
                # comes after the snapshots still in the pipe (a child killed past the
                # grace read as delivering for good).
                self._proc, self._stdin = None, None
            self._stopped.set()

    def hurry(self, timeout: float | None) -> None:
        """Tell the child stopping (a :meth:`stop` under way on another thread) a drain
        timeout asked for since: the shorter one wins at once, a longer one extends
        nothing (:meth:`Worker.request_stop <mailstrom.runtime.worker.Worker.request_stop>`)."""
        self._send("stop", timeout)

    def _wait_ended(self, proc: subprocess.Popen[bytes], limit: float | None) -> None:
        """Wait for ``proc`` to exit, ``limit`` seconds at most (``TimeoutExpired``), not
        counting the time the reader spends meanwhile on its frames (passing results to
        ``on_result``, log records to the application's handlers).

        A slow callback (a webhook) leaves the child's frames in the pipe, and once the
        pipe is full the child waits to write its next results: it cannot end before the
        callback has taken them. Counted against it, that wait had the child killed as if
        it hung, and the results it had recorded but not yet sent never reached
        ``on_result``. Called from ``on_result`` itself, nothing reads the pipe until it
        returns: the time counts."""
        if limit is None:
            proc.wait()
            return
        own = self.reading_on(threading.current_thread())
        busy = self._busy_for()
        while True:
            try:
                proc.wait(limit)
                return
            except subprocess.TimeoutExpired:
                now_busy = self._busy_for()
                limit, busy = now_busy - busy, now_busy
                if own or limit <= 0:
                    raise

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill ``proc`` and wait for it. Its pipes are its reader's to close, once it
        has passed on what the child left there; the spec it may still be writing fails
        at once."""
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs; None before, between restarts, and
        once it has exited (a failed start, a child that ended for good)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    # --- what the facade asks ----------------------------------------------------------------

    @property
    def status(self) -> WorkerStatus:
        """The child's latest snapshot (twice a second), its counts and metrics added to
        those of the children before it since :meth:`start` (they go on across restarts,
        as counters must); with ``on_result`` the counts are those of the results already
        passed on, so they agree with the callback. Between a child's death and its
        restart, ``running`` is False and ``error`` says how it died and when the next one
        starts."""
        running = self._ready.is_set() and not self._stopped.is_set()
        carried, current = self._runs
        status = dataclasses.replace(
            added(carried, current),
            running=running,
            error=self._error,
            restarts=self._restarts,
            holder=self._holder,  # known from the spawn on, before the child's first status
        )
        if self._on_result is None:
            return status
        counts = self._counts
        return dataclasses.replace(
            status,
            delivered=counts[RecipientState.DELIVERED],
            deferred=counts[RecipientState.DEFERRED],
            failed=counts[RecipientState.FAILED],
        )

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the child has exited; False on timeout."""
        return self._stopped.wait(timeout)

    # --- the pipes ---------------------------------------------------------------------------

    def _send(self, kind: str, payload: Any = None, *, wait: bool = True) -> None:
        """Send a frame to the current child; without ``wait``, not when another thread
        is writing one (a ping is moot then)."""
        stream = self._stdin
        if stream is None or not self._spec_sent:
            # Before its spec the child reads nothing else: a wake is moot (it looks for
            # work at once), and the application's send_email must not wait behind a
            # spec the child is slow to read. stop() sees to its stop itself.
            return
        frame = io.BytesIO()
        write_frame(frame, kind, payload)
        # One write, never waiting: the pipe is non-blocking once the spec went through
        # (see _read), and a frame this small goes in whole or not at all. A child that
        # reads nothing (stopped by SIGSTOP, frozen) had wake() block the application for
        # ever once the pipe was full, and stop() behind it, past every bound it has: a
        # wake it cannot read is moot, and stop() kills what does not end.
        if not self._write_lock.acquire(blocking=wait):
            return
        try:
            with contextlib.suppress(OSError, ValueError):
                os.write(stream.fileno(), frame.getvalue())
        finally:
            self._write_lock.release()

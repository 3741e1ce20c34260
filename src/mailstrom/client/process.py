"""The parent's side of a worker in a child process (``Mailstrom(worker="process")``).

Delivery then has an interpreter, and a GIL, of its own: the application's ``send_email``
never waits behind the worker's protocol code, and the worker never waits behind the
application. The child opens the same store from its URL and is woken across the process
boundary by the store itself (a datagram socket for SQLite, NOTIFY for PostgreSQL). Its
results come back over a pipe and reach ``on_result`` on a reader thread of this process;
its log records are re-emitted here at the levels the ``mailstrom`` loggers had when it
started. A child that dies without being asked or saying why is started again after a
backoff (:mod:`mailstrom.client.supervision`). See :mod:`mailstrom.runtime.child` for the
other end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import IO, Any

from mailstrom.client.supervision import ChildExit, RestartBackoff, describe_exit, judge_exit
from mailstrom.config import Config
from mailstrom.errors import StoreError, WorkerError
from mailstrom.runtime.pipes import (
    ChildSpec,
    TLSContextSpec,
    read_frame,
    result_from_wire,
    write_frame,
)
from mailstrom.status import RecipientState, WorkerStatus
from mailstrom.stores.base import RecipientResult, Store, new_holder

log = logging.getLogger("mailstrom.worker")

_FORWARDED_LOGGERS = ("mailstrom", "mailstrom.attempts", "mailstrom.worker", "mailstrom.delivery")
STOP_GRACE = 10.0
"""Seconds past the drain timeout that ``stop()`` waits for a worker to end: a child is
then killed, a worker thread or task left to end by itself."""


def _forget_after_fork() -> None:
    """In a process forked from this one (a pre-forking web server, say): let go of the
    parent's worker processes without touching them, so that each worker still sees its
    stdin close when its real parent dies."""
    for worker in list(_LIVE):
        worker._forget()


_LIVE: weakref.WeakSet[WorkerProcess] = weakref.WeakSet()
os.register_at_fork(after_in_child=_forget_after_fork)


class WorkerProcess:
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
        self._write_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._status = WorkerStatus(running=False)
        self._counts = {state: 0 for state in RecipientState}
        self._error: str | None = None
        self._reported_error = False
        """Whether the current child sent an ``error`` frame (it ended for good)."""
        self._stopped_by: str | None = None
        """The signal the current child said it was stopped by, from its last frame."""
        self._cause: BaseException | None = None
        """The child's own exception when it could not open its store."""
        self._fds: tuple[int, ...] = ()
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

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the child; return when it delivers, or when it waits for a store that
        does not answer yet (:attr:`status` then says so in ``store_error``, and delivery
        begins by itself once the store opens). Raise :class:`WorkerError` when it cannot
        start: from the store's error when waiting cannot mend it
        (:class:`~mailstrom.errors.StoreCorrupt`,
        :class:`~mailstrom.errors.StoreAccessDenied`)."""
        with self._lock:
            if self._proc is not None or self._restart_pending():
                raise WorkerError("already started")
            self._stopping = False
            self._supervised = False
            self._halt.clear()
            self._spawn()
        if not self._ready.wait(timeout) or self._error is not None:
            reason = self._error or f"no answer within {timeout:g} s"
            self._kill()
            raise WorkerError(f"worker process failed to start: {reason}") from self._cause
        with self._lock:
            self._supervised = True
            if self._stopped.is_set() and not self._stopping:
                # It died between its "ready" and now, unsupervised: judge it here.
                self._judge(self._proc)

    def _spawn(self) -> None:
        """Start a child and hand it its spec, without waiting for it (``_lock`` held)."""
        config = self.config
        holder = new_holder()
        spec = ChildSpec(
            config=replace(config, tls_context=None),
            store=pickle.dumps(self._store, protocol=pickle.HIGHEST_PROTOCOL),
            tls=TLSContextSpec.of(config.tls_context) if config.tls_context else None,
            log_levels={
                name: logging.getLogger(name).getEffectiveLevel() for name in _FORWARDED_LOGGERS
            },
            forward_results=self._on_result is not None,
            holder=holder,
        )
        env = dict(os.environ)
        # The child must import this very mailstrom, wherever it was imported from.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailstrom.runtime.child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # the application's Ctrl-C is for the application
            close_fds=True,
        )
        self._stopped.clear()
        self._ready.clear()
        self._error = None
        self._reported_error = False
        self._stopped_by = None
        self._cause = None
        self._status = WorkerStatus(running=False)  # not the last child's snapshot
        assert proc.stdin is not None and proc.stdout is not None
        self._proc, self._stdin = proc, proc.stdin
        self._holder = holder
        self._fds = (proc.stdin.fileno(), proc.stdout.fileno())
        _LIVE.add(self)
        self._reader = threading.Thread(
            target=self._read,
            args=(proc, proc.stdout),
            name="mailstrom-worker-reader",
            daemon=True,
        )
        self._reader.start()
        self._send("spec", spec)

    def wake(self) -> None:
        """Look for due work now (the store usually wakes the child by itself)."""
        self._send("wake")

    def stop(self, timeout: float | None = 30.0) -> None:
        """Let deliveries in flight finish within ``timeout`` seconds, give the rest back
        to the store, and wait for the child to exit. A restart still waiting for its
        backoff is cancelled; no child is started after this began."""
        with self._lock:
            self._stopping = True
            self._halt.set()
            proc, supervisor, holder = self._proc, self._supervisor, self._holder
            if self._restart_pending() and self._death is not None:
                self._error = f"{self._death}; not started again: stop() came first"
            elif self._coming_back:  # restarted, stopped before it answered: no trouble
                self._coming_back = False
                self._error = None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join()  # its wait ends at _halt; a spawn under _lock is done
        if proc is None:
            return
        self._send("stop", timeout)
        with contextlib.suppress(OSError):
            assert self._stdin is not None
            self._stdin.close()
        try:
            proc.wait(None if timeout is None else timeout + STOP_GRACE)
        except subprocess.TimeoutExpired:
            log.error("worker process %d did not stop; killing it", proc.pid)
            self._kill()
            if holder is not None:
                self._give_back(holder)  # it had no time to give them back itself
        if self._reader is not None:
            self._reader.join(5.0)
        self._proc = None

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._stopped.set()

    def _forget(self) -> None:
        # Only the descriptors are touched, never the file objects: the parent's reader
        # thread may have held a buffer's lock at the fork, and it does not exist here.
        # Pointing them at /dev/null releases this process's ends of the pipes while the
        # descriptor numbers stay valid for whatever later closes the objects. The same
        # goes for _lock, and no supervisor thread exists here to restart anything.
        self._lock = threading.Lock()
        self._stopping = True
        self._halt.set()
        self._supervisor = None
        self._proc, self._stdin = None, None
        if self._fds:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                for fd in self._fds:
                    with contextlib.suppress(OSError):
                        os.dup2(null, fd)
            finally:
                os.close(null)
            self._fds = ()
        self._ready.clear()
        self._stopped.set()

    # --- supervision ---------------------------------------------------------------------

    def _restart_pending(self) -> bool:
        supervisor = self._supervisor
        return supervisor is not None and supervisor.is_alive()

    def _judge(self, proc: subprocess.Popen[bytes] | None) -> None:
        """Act on the end of ``proc``, the current child (``_lock`` held)."""
        if proc is None or proc.returncode is None or not self._supervised:
            return  # start() is still waiting: it reports the failure itself
        verdict = judge_exit(
            proc.returncode, reported_error=self._reported_error, asked=self._stopping
        )
        if verdict is ChildExit.DIED:
            self._schedule_restart(
                f"worker process died ({describe_exit(proc.returncode)})", leased=self._holder
            )
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
        self._status = WorkerStatus(running=False)
        with self._write_lock, contextlib.suppress(OSError):
            if self._stdin is not None:
                self._stdin.close()  # the dead child's pipe; its stdout closed with it
        self._proc, self._stdin = None, None
        log.error("%s", self._error)
        self._supervisor = threading.Thread(
            target=self._restart_after,
            args=(delay, leased),
            name="mailstrom-worker-supervisor",
            daemon=True,
        )
        self._supervisor.start()

    def _restart_after(self, delay: float, leased: str | None) -> None:
        if leased is not None:
            # Here, not under _lock nor on the reader thread: it waits for the store.
            self._give_back(leased)
        if self._halt.wait(delay):
            return  # stop() came first
        with self._lock:
            if self._stopping:
                return
            try:
                self._spawn()
            except OSError as exc:  # no fork: out of memory, out of processes
                self._schedule_restart(f"worker process could not be started again ({exc})")
                return
            self._restarts += 1
            self._coming_back = True
            # Until it answers: a child that hangs at start must not read as a healthy
            # one on its way (running False and no error is no state a caller can act on).
            self._error = f"{self._death}; started again, not answering yet"

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

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # --- what the facade asks ----------------------------------------------------------------

    @property
    def status(self) -> WorkerStatus:
        """The child's latest snapshot (twice a second); with ``on_result`` the counts are
        those of the results already passed on, so they agree with the callback, and go
        on across restarts. Between a child's death and its restart, ``running`` is False
        and ``error`` says how it died and when the next one starts."""
        running = self._ready.is_set() and not self._stopped.is_set()
        status = dataclasses.replace(
            self._status,
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

    def _send(self, kind: str, payload: Any = None) -> None:
        stream = self._stdin
        if stream is None:
            return
        with self._write_lock, contextlib.suppress(OSError, ValueError):
            write_frame(stream, kind, payload)

    def _read(self, proc: subprocess.Popen[bytes], stream: IO[bytes]) -> None:
        try:
            while (frame := read_frame(stream)) is not None:
                self._handle(*frame)
        except Exception:
            log.exception("worker process: unreadable frame")
        finally:
            stream.close()
            proc.wait()
            with self._lock:
                try:
                    self._judge(proc)
                finally:
                    if proc.returncode and self._error is None:
                        self._error = f"worker process exited with status {proc.returncode}"
                    self._stopped.set()
                    self._ready.set()  # wake a start() still waiting: it sees the error

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "results":
            on_result = self._on_result
            for wire in payload:
                result = result_from_wire(wire)
                self._counts[result.state] += 1
                if on_result is not None:
                    try:
                        on_result(result)
                    except Exception:
                        log.exception("on_result callback failed")
        elif kind == "status":
            self._status = payload
        elif kind == "log":
            record = logging.makeLogRecord(payload)
            logging.getLogger(record.name).handle(record)
        elif kind == "ready":
            self._came_up()
        elif kind == "error":
            self._error = str(payload)
            self._reported_error = True
        elif kind == "cause":
            self._cause = payload
        elif kind == "stopped":
            # The end of the stream follows; a child stopped by a signal says which.
            self._stopped_by = payload if isinstance(payload, str) else None

    def _came_up(self) -> None:
        # Under _lock: a restart sets _coming_back and its error after the spawn, and
        # the new child's "ready" may arrive before that (the reader starts in _spawn).
        with self._lock:
            self._backoff.child_ready(now=time.monotonic())
            back, self._coming_back = self._coming_back, False
            if back:
                self._error = None
        if back:
            log.warning(
                "worker process started again (pid %s; %d restart%s so far)",
                self.pid,
                self._restarts,
                "" if self._restarts == 1 else "s",
            )
        self._ready.set()

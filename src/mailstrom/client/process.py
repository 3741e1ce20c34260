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
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import io
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import IO, Any

from mailstrom.client.supervision import ChildExit, RestartBackoff, describe_exit, judge_exit
from mailstrom.config import Config
from mailstrom.errors import StoreError, WorkerError
from mailstrom.runtime.metrics import add_metrics
from mailstrom.runtime.pipes import (
    ChildSpec,
    TLSContextSpec,
    read_frame,
    result_from_wire,
    write_frame,
)
from mailstrom.runtime.worker_reporting import ends_the_program
from mailstrom.status import RecipientState, WorkerStatus
from mailstrom.stores.base import RecipientResult, Store, new_holder

log = logging.getLogger("mailstrom.worker")

_FORWARDED_LOGGERS = ("mailstrom", "mailstrom.attempts", "mailstrom.worker", "mailstrom.delivery")
STOP_GRACE = 10.0
"""Seconds past the drain timeout that ``stop()`` waits for a worker to end: a child is
then killed, a worker thread or task left to end by itself."""
GIVE_BACK_WAIT = 2.0
"""Seconds ``stop()`` waits for the give-back of what a child it could not stop cleanly
had leased (a store call): one that takes longer (PostgreSQL down, its pool waiting for a
connection for the store's timeout) goes on in the background, and its leases come back
when they expire otherwise, as a dead worker's do."""
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
_PING_EVERY = 5.0
"""Seconds between pings at most (a quarter of :data:`FROZEN_AFTER` when that is less)."""
RESULTS_WAITING = 10_000
"""How many results of a worker process wait here for a slow ``on_result`` at most (a
few megabytes). Past it the reader waits for the callback to take some: the child then
waits to write its next frames (a pipe holds a hundred results or so), and its
deliveries with it, until the callback catches up; nothing is dropped (each result is
recorded in the store before it is sent)."""


def _forget_after_fork() -> None:
    """In a process forked from this one (a pre-forking web server, say): let go of the
    parent's worker processes without touching them, so that each worker still sees its
    control pipe close when its real parent dies."""
    _SPAWNING.release()
    for worker in list(_LIVE):
        worker._forget()


_LIVE: weakref.WeakSet[WorkerProcess] = weakref.WeakSet()
_SPAWNING = threading.Lock()
"""Held from the making of a child's pipes until they are where :meth:`WorkerProcess._forget`
finds them (the child's ends closed here, ours the current child's), and taken by every
fork (another thread's ``os.fork()``: multiprocessing, a pre-forking server), which thus
comes before or after. A fork in between held a copy of each pipe end: of the child's end
of its frames, which kept that pipe open past the child's end (the reader waited for the
fork to exit, and stop() for the reader), and of our end of its control pipe, whose close
the child then did not see when this process died. (A child is started by
``_posixsubprocess``, which runs no fork hook: no thread waits for itself.)"""
os.register_at_fork(
    before=_SPAWNING.acquire,
    after_in_parent=_SPAWNING.release,
    after_in_child=_forget_after_fork,
)


_CHILD = "mailstrom.runtime.child"
_BOOT = """\
import importlib.machinery, importlib.util, os, runpy, site, sys
module, root = sys.argv[1:3]
del sys.argv[1:3]
sites = {os.path.abspath(p) for p in (*site.getsitepackages(), site.getusersitepackages())}
at = next((i for i, p in enumerate(sys.path) if os.path.abspath(p) in sites), len(sys.path))
sys.path.insert(at, root)
spec = importlib.machinery.PathFinder.find_spec("mailstrom", [root])
package = importlib.util.module_from_spec(spec)
sys.modules["mailstrom"] = package
spec.loader.exec_module(package)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
"""How a child starts: ``python FLAGS -c _BOOT mailstrom.runtime.child ROOT IN OUT`` (the
flags of :func:`_interpreter_flags`) runs the module with ``IN OUT`` as its arguments,
once it imported the package ``mailstrom`` from
``ROOT``, where this one was imported from (this very mailstrom, whatever else the
child's path holds), and put ``ROOT`` on its path ahead of the site directories (for what
was installed beside it) but after the standard library.

Not ``ROOT`` first in PYTHONPATH, as it was: that put the application's site-packages
(where mailstrom is installed) before the standard library in the child, which imported
any module installed there under a standard library name (PyPI's ``asyncio`` 3.4.3,
which many requirements files list by mistake; ``enum34``; ``pathlib``) where the
application imports the standard library's, and failed to start or worse."""


def _popen_child() -> subprocess.Popen[bytes]:
    """Start a child running ``mailstrom.runtime.child`` (see :data:`_BOOT`), its frames
    on two pipes of their own, set as the returned ``Popen``'s ``stdin`` and ``stdout``
    (the ends that are ours).

    Not over its standard input and output: whatever else the child runs writes there
    and reads there too (a banner printed by a ``sitecustomize`` or a ``.pth`` file as
    the interpreter starts, a library's C code, a process it starts that inherits them),
    and one stray line was read as a frame's length, swallowing every later frame. Its
    standard output is this process's standard error (where its own diagnostics go), its
    standard input is empty."""
    executable = sys.executable
    missing = no_interpreter()
    if missing is not None:
        # An OSError is what start() and a restart report as no process.
        raise FileNotFoundError(f"no Python interpreter to start: {missing}")
    out: int = subprocess.DEVNULL
    with contextlib.suppress(OSError):
        os.fstat(2)  # before the pipes: one of them may take a closed standard descriptor
        out = 2
    fds: list[int] = []
    try:
        for _ in range(2):
            # Neither inheritable but by pass_fds; none of 0-2 (an application that
            # closed its standard descriptors), which the child's own would replace.
            fds.extend(_above_standard(fd) for fd in os.pipe())
        (to_child, ours_in), (ours_out, from_child) = fds[:2], fds[2:]
        theirs = (to_child, from_child)
        # The package's root: where this one was imported from.
        root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
        proc = subprocess.Popen(
            [executable, *_interpreter_flags(), "-c", _BOOT, _CHILD, root, *map(str, theirs)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            start_new_session=True,  # the application's Ctrl-C is for the application
            close_fds=True,
            pass_fds=theirs,
        )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in theirs:
        os.close(fd)
    proc.stdin = open(ours_in, "wb")  # noqa: SIM115 - closed by the reader, as Popen's
    proc.stdout = open(ours_out, "rb")  # noqa: SIM115
    return proc


def _interpreter_flags() -> list[str]:
    """The flags this interpreter was started with that decide where a child imports
    from and how it runs, for the child's command line (as :mod:`multiprocessing` passes
    them). Without them an application run with ``python -I`` or ``-E`` (a service's
    unit, a system script's shebang), which ignores PYTHONPATH and the user's
    site-packages, had a worker child that imported from them, ahead of the standard
    library, whatever they held.

    ``-P`` always: run with ``-c``, the child had the working directory first on its
    path, ahead of the standard library, where an application run as a script has the
    script's directory (a module in a service's or a shell's working directory under a
    standard library name was imported in its place). The child needs nothing there: it
    imports mailstrom from where this one came from, and what was installed beside it."""
    flags = sys.flags
    if flags.isolated:
        options = ["-I"]  # -E, -s and -P together
    else:
        options = [
            option
            for option, given in (("-E", flags.ignore_environment), ("-s", flags.no_user_site))
            if given
        ]
        options.append("-P")
    if flags.dont_write_bytecode:
        options.append("-B")
    if flags.optimize:
        options.append("-" + "O" * flags.optimize)
    return options


def no_interpreter() -> str | None:
    """Why this program has no Python interpreter to start a worker child with, or None
    when ``sys.executable`` is one.

    A program embedding Python may have no interpreter file (``sys.executable`` None or
    "", as Python's docs allow: Popen raised a TypeError for None, where start() promises
    a WorkerError); a frozen one (PyInstaller, cx_Freeze: ``sys.frozen``) has only
    itself, which ran the whole application again with the child's arguments. Under a
    server that embeds Python (uWSGI, mod_wsgi) it is the server's own program
    (``uwsgi``, ``httpd``, ``apache2``), which was started with the child's Python
    arguments: a program is taken for an interpreter by its name, as every Python's
    (CPython's ``python3.11``, a venv's ``python``, PyPy's, GraalPy's) begins."""
    if getattr(sys, "frozen", False):
        return f"sys.executable ({sys.executable}) is this frozen program's own"
    if not sys.executable:
        return f"sys.executable is {sys.executable!r}"
    name = os.path.basename(sys.executable).lower()
    if not name.startswith(_INTERPRETER_NAMES):
        return (
            f"sys.executable ({sys.executable}) is not named as a Python interpreter is "
            "(a server embedding Python, such as uWSGI or mod_wsgi, names its own program)"
        )
    return None


_INTERPRETER_NAMES = ("python", "pypy", "graalpy")


def _above_standard(fd: int) -> int:
    """``fd``, moved past the standard descriptors if it is one of them (not
    inheritable)."""
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


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


_NOTHING_CARRIED = WorkerStatus(running=False)
"""What a worker process's first child carries over: nothing."""


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
        self._write_lock = threading.RLock()
        """Re-entrant: a signal handler's stop() may come while this thread's wake()
        holds it (the main thread's send_email), and must send its own frame."""
        self._reader: threading.Thread | None = None
        self._passer: threading.Thread | None = None
        """The current reader's thread that calls ``on_result`` (None without one)."""
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._runs = (_NOTHING_CARRIED, WorkerStatus(running=False))
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
        self._watch: _Watch | None = None
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
            self._halt.clear()
            # A new worker, with fresh counters (a restart's child goes on with them):
            # the last one's reader, joined above, passes on nothing more.
            self._counts = {state: 0 for state in RecipientState}
            self._runs = (_NOTHING_CARRIED, WorkerStatus(running=False))
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
        with _SPAWNING:  # a fork waits until the pipes are where _forget finds them
            proc = _popen_child()
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
            _LIVE.add(self)
        self._holder = holder
        watch = self._watch = _Watch(proc, start_within=start_within)
        handoff = _Handoff(RESULTS_WAITING) if self._on_result is not None else None
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
        long the callback takes over them: none is passed on after stop() returned.
        Called from ``on_result`` itself, it returns once the child has exited, and the
        results still in the pipe follow on that thread after the callback returns (a
        child with more to send than the pipe holds cannot exit meanwhile: it is killed
        past the grace)."""
        own = self.reading_on(threading.current_thread())  # called from on_result
        with self._lock:
            self._stopping = True
            self._halt.set()
            proc, supervisor, holder = self._proc, self._supervisor, self._holder
            reader = self._reader
            running = proc is not None and proc.returncode is None
            if self.restart_pending() and self._death is not None:
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
            with self._write_lock, contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                self._wait_ended(proc, None if timeout is None else timeout + STOP_GRACE)
            except subprocess.TimeoutExpired:
                log.error("worker process %d did not stop; killing it", proc.pid)
                self._kill(proc)
                if holder is not None:
                    self._give_back_briefly(holder)  # it had no time to give them back itself
                    given_back = True
        if reader is not None and not own:
            # Unbounded: the child has exited, so only the frames it left in the pipe
            # remain, and each result among them reaches on_result before we return.
            reader.join()
            if running and holder is not None and not given_back and not self._said_stopped:
                # It ended without its clean end, which gives back what it did not
                # deliver: killed by someone else as it drained (the OOM killer, a
                # kill -9 of a shutdown that seemed stuck). Due at once, as promised,
                # not once its leases expire.
                self._give_back_briefly(holder)
        with self._lock:
            if self._proc is proc and not own:
                # Called from on_result, the child stays the current one until its
                # reader (this thread, once the callback returns) reaches its end: that
                # end puts its last snapshot at rest, deliveries in flight and all, and
                # comes after the snapshots still in the pipe (a child killed past the
                # grace read as delivering for good).
                self._proc, self._stdin = None, None
            self._stopped.set()

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

    def _busy_for(self) -> float:
        """Seconds the readers have spent handling frames so far (a full hand-off waits
        for ``on_result``), the current one's included."""
        total, since = self._busy
        return total if since is None else total + time.monotonic() - since

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill ``proc`` and wait for it. Its pipes are its reader's to close, once it
        has passed on what the child left there; the spec it may still be writing fails
        at once."""
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()

    def _forget(self) -> None:
        # Only the descriptors are touched, never reading or writing the file objects:
        # the parent's reader thread may have held a buffer's lock at the fork, and it
        # does not exist here (``closed`` and ``fileno()`` take no lock). Pointing them at
        # /dev/null releases this process's ends of the pipes while the descriptor
        # numbers stay valid for whatever later closes the objects. Only the current
        # child's streams still open count: the number of one closed before the fork may
        # be the application's file or pipe now (a stream reads as closed before its
        # number is freed). The same goes for _lock, and no supervisor thread exists here
        # to restart anything. So for _write_lock, which a wake() or stop() of another
        # thread may have held at the fork: this process's own stop() could not send its
        # child "stop" (nor any wake() reach it), and waited for ever.
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._stopping = True
        self._halt.set()
        self._supervisor = None
        proc, self._proc, self._stdin = self._proc, None, None
        streams = () if proc is None else (proc.stdin, proc.stdout)
        fds = [s.fileno() for s in streams if s is not None and not s.closed]
        if fds:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.dup2(null, fd)
            finally:
                os.close(null)
        self._ready.clear()
        self._stopped.set()

    # --- supervision ---------------------------------------------------------------------

    def restart_pending(self) -> bool:
        """Whether a child that died is to be started again (its backoff not over)."""
        supervisor = self._supervisor
        return supervisor is not None and supervisor.is_alive()

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
        self._runs = (_added(carried, last), WorkerStatus(running=False))
        self._proc, self._stdin = None, None  # its reader closed its pipes
        supervisor = threading.Thread(
            target=self._restart_after,
            args=(delay, leased),
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
                self._spawn(start_within=self._start_timeout)
            except OSError as exc:  # no fork: out of memory, out of processes
                self._schedule_restart(f"worker process could not be started again ({exc})")
                return
            self._restarts += 1
            self._coming_back = True
            # Until it answers: a child that hangs at start must not read as a healthy
            # one on its way (running False and no error is no state a caller can act on).
            self._error = f"{self._death}; started again, not answering yet"

    def _watch_over(self, watch: _Watch) -> None:
        """Kill the child of ``watch`` when it hangs at its start (no ``ready`` within
        ``start_within`` seconds), or later leaves its pings unanswered for
        :data:`FROZEN_AFTER` seconds: its death is then judged as any other, and it is
        started again after the backoff. Ends with the child's stream, or at stop()
        (which bounds the child's end itself)."""
        limit = watch.start_within
        if not watch.up.wait(limit):
            self._kill_hung(
                watch, f"no answer within {limit:g} s of its start", watch.hung_at_start
            )
            return
        every = min(_PING_EVERY, FROZEN_AFTER / 4)
        last = time.monotonic()
        watch.answered = (last, self._busy_for())

        def frozen() -> bool:
            at, busy = watch.answered
            return time.monotonic() - at - (self._busy_for() - busy) >= FROZEN_AFTER

        while not watch.done.wait(every) and not self._stopping:
            now = time.monotonic()
            if now - last > 2 * every:
                # This process did not run meanwhile (stopped, suspended, starved): no
                # ping went out, and the child's answers wait unread.
                watch.answered = (now, self._busy_for())
            last = now
            self._send("ping", wait=False)
            if frozen():
                why = f"no answer to its pings for {FROZEN_AFTER:g} s"
                self._kill_hung(
                    watch, f"{why} (frozen: stopped, or its event loop blocked)", frozen
                )
                return

    def _kill_hung(self, watch: _Watch, why: str, still: Callable[[], bool]) -> None:
        """Kill the child of ``watch`` for ``why``, if it is still the current one, no
        stop() came, and it ``still`` hangs (asked under ``_lock``)."""
        with self._lock:
            proc = watch.proc
            if proc is not self._proc or self._stopping or watch.done.is_set() or not still():
                return
            watch.killed_for = why  # for _judge, which names it as the death
            log.error("worker process %d: %s; killing it", proc.pid, why)
            with contextlib.suppress(OSError):
                proc.kill()  # its reader sees its end, and _judge starts another

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

    def reading_on(self, thread: threading.Thread) -> bool:
        """Whether ``thread`` is one passing on the current child's results: its reader,
        or the thread it hands them to (where ``on_result`` runs)."""
        return thread is self._reader or (thread is self._passer and thread is not None)

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
            _added(carried, current),
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

    def _read(
        self,
        proc: subprocess.Popen[bytes],
        spec: bytes,
        handoff: _Handoff | None,
        watch: _Watch,
    ) -> None:
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None
        followed = False
        try:
            try:
                # Here, not in _spawn under _lock: a spec larger than the pipe (a TLS
                # context's CA certificates) waits for the child to read it, which
                # start()'s timeout must bound; killing the child ends the write.
                stdin.write(spec)
                stdin.flush()
                os.set_blocking(stdin.fileno(), False)  # for _send's frames from now on
            except (OSError, ValueError):
                pass  # it is gone already: its end is read below
            else:
                if proc is self._proc:
                    self._spec_sent = True
            while (frame := read_frame(stdout)) is not None:
                kind, payload = frame
                started = time.monotonic()
                self._busy = (self._busy[0], started)
                try:
                    self._handle(kind, payload, handoff, watch)
                except Exception:
                    # A forwarded record the application's logging raises on (a filter,
                    # a handler): one frame is lost, not every later result and status.
                    log.exception("worker process: a %r frame could not be handled", kind)
                finally:
                    self._busy = (self._busy[0] + time.monotonic() - started, None)
            followed = True
        except Exception:
            log.exception("worker process: unreadable frame")
        finally:
            if not followed:
                # Nothing reads its pipe any more: left running, it would deliver
                # unseen while its status says running. Killed, its death is judged.
                log.error("worker process %d can no longer be followed; killing it", proc.pid)
                with contextlib.suppress(OSError):
                    proc.kill()
            stdout.close()
            proc.wait()
            watch.end()  # nothing more to watch
            # Of no use now; and a fork must not take its number for ours. Unless stop()
            # closed it first: from a signal handler, it closes it and waits for this
            # thread while the thread it interrupted holds the lock (in wake()).
            while not stdin.closed:
                if self._write_lock.acquire(timeout=0.1):
                    try:
                        with contextlib.suppress(OSError):
                            stdin.close()
                    finally:
                        self._write_lock.release()
            if handoff is not None:
                # Every result reaches on_result before the child's end is judged (and
                # stop(), which joins this thread, returns).
                handoff.close()
                self._pass_on(handoff.wait_taken())
            with self._lock:
                if proc is self._proc:  # not a child stop() or start() has let go of
                    self._end_of(proc)

    def _end_of(self, proc: subprocess.Popen[bytes]) -> None:
        """The current child's stream has ended and it has exited (``_lock`` held)."""
        try:
            self._judge(proc)
        finally:
            self._coming_back = False  # it came back, or its end is what status says now
            # Nothing is in its hands now: a child killed (by stop() past the grace, by
            # a signal) sent no last status, and its last snapshot showed deliveries,
            # sessions and leases in flight for good. Its counts stay.
            carried, last = self._runs
            self._runs = (carried, _at_rest(last))
            if proc.returncode and self._error is None and not self._stopping:
                # An intended stop that had to kill it is no death.
                self._error = f"worker process exited with status {proc.returncode}"
            elif self._error is None and not self._stopping and not self._ready.is_set():
                # Status 0 before its "ready", with start() still waiting (a restarted
                # one was judged above): no start either. It let start() return as if
                # it delivered, and such a child was started again and again.
                by = f", stopped by {self._stopped_by}" if self._stopped_by else ""
                self._error = f"worker process ended (status 0) before it was ready{by}"
            self._stopped.set()
            self._ready.set()  # wake a start() still waiting: it sees the error

    def _handle(self, kind: str, payload: Any, handoff: _Handoff | None, watch: _Watch) -> None:
        if kind == "results":
            batch = [result_from_wire(wire) for wire in payload]
            # Handed to the thread calling on_result: read here, a slow callback left
            # the frames in the pipe, and the child's loop (every delivery of it) waited
            # to write the next ones once a hundred or so piled up.
            if handoff is None or not handoff.put(batch):
                self._pass_on(batch)
        elif kind == "pong":
            watch.answered = (time.monotonic(), self._busy_for())
        elif kind == "status":
            self._runs = (self._runs[0], payload)
        elif kind == "log":
            if logging.root.manager.disable >= payload["levelno"]:
                # Silenced here by logging.disable(), which Logger.handle() does not heed
                # (every logging call does): the child only knows the loggers' levels.
                return
            record = logging.makeLogRecord({})
            handled_at = record.created
            record.__dict__.update(payload)
            # Since logging was loaded here, as every record of this process counts it,
            # from the child's time: not from when this frame came through the pipe.
            record.relativeCreated += (record.created - handled_at) * 1000
            logging.getLogger(record.name).handle(record)
        elif kind == "ready":
            watch.up.set()
            self._came_up()
        elif kind == "error":
            self._error = str(payload)
            self._reported_error = True
        elif kind == "cause":
            self._cause = payload
        elif kind == "stopped":
            # The end of the stream follows; a child stopped by a signal says which.
            self._stopped_by = payload if isinstance(payload, str) else None
            self._said_stopped = True

    def _pass_on(self, batch: list[RecipientResult]) -> None:
        """Count each result of ``batch`` and hand it to ``on_result``."""
        on_result = self._on_result
        for result in batch:
            self._counts[result.state] += 1
            if on_result is not None:
                try:
                    on_result(result)
                except BaseException as exc:  # on a thread of ours: see the function
                    if ends_the_program(exc):
                        raise
                    log.exception("on_result callback failed")

    def _pass_results(self, handoff: _Handoff) -> None:
        """The thread calling ``on_result`` with what the reader hands it, in order."""
        try:
            while (batch := handoff.take()) is not None:
                self._pass_on(batch)
        finally:
            handoff.end()

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


class _Watch:
    """What :meth:`WorkerProcess._watch_over` knows of one child."""

    def __init__(self, proc: subprocess.Popen[bytes], *, start_within: float | None) -> None:
        self.proc = proc
        self.start_within = start_within
        """Seconds it has to answer ``ready`` (None: start() bounds that itself)."""
        self.up = threading.Event()
        """Its ``ready`` came, or its stream ended: its start is over."""
        self.done = threading.Event()
        """Its stream ended: the watch is over."""
        self.killed_for: str | None = None
        """Why the watch killed it."""
        self.answered = (0.0, 0.0)
        """When it last answered a ping (a monotonic clock's time), and the readers'
        :meth:`WorkerProcess._busy_for` then."""
        self.thread: threading.Thread | None = None

    def hung_at_start(self) -> bool:
        return not self.up.is_set()

    def end(self) -> None:
        """The child's stream has ended: the watch ends too (waited for: no thread of
        ours outlives its reader)."""
        self.up.set()
        self.done.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class _Handoff:
    """Results from a reader to the thread that calls ``on_result``: at most ``bound``
    wait (a batch is never split), past which :meth:`put` waits for room."""

    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._changed = threading.Condition()
        self._batches: deque[list[RecipientResult]] = deque()
        self._waiting = 0
        self._closed = False
        """The reader has put its last batch."""
        self._ended = False
        """The taker is gone (or never came): nothing more is taken."""
        self._warned = False
        self.taker: threading.Thread | None = None

    def put(self, batch: list[RecipientResult]) -> bool:
        """Hand ``batch`` on, once there is room; False when nothing takes it any more
        (the caller passes it on itself)."""
        with self._changed:
            while self._waiting >= self._bound and not self._ended:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "on_result is %d results behind: the worker process waits for it"
                        " to take some before it delivers more",
                        self._waiting,
                    )
                self._changed.wait()
            if self._ended:
                return False
            self._batches.append(batch)
            self._waiting += len(batch)
            self._changed.notify_all()
            return True

    def take(self) -> list[RecipientResult] | None:
        """The next batch; None once the reader closed and all were taken."""
        with self._changed:
            while not self._batches and not self._closed:
                self._changed.wait()
            if not self._batches:
                return None
            batch = self._batches.popleft()
            self._waiting -= len(batch)
            self._changed.notify_all()
            return batch

    def close(self) -> None:
        """The reader has no more: the taker ends once it has taken every batch."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def end(self) -> None:
        """The taker has ended (or never started): nothing waits for it any more."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_taken(self) -> list[RecipientResult]:
        """Wait until the taker has ended (after :meth:`close`), every batch passed on;
        what it left, should it have ended early, is returned."""
        with self._changed:
            while not self._ended:
                self._changed.wait()
            left = [result for batch in self._batches for result in batch]
            self._batches.clear()
        taker = self.taker
        if taker is not None and taker is not threading.current_thread():
            taker.join()  # ending now: no thread of ours outlives its reader
        return left


def _at_rest(status: WorkerStatus) -> WorkerStatus:
    """``status`` of a child that has ended: its counts, with nothing in its hands, and
    no longer stopping (a child killed as it drained last said it was)."""
    return replace(
        status,
        stopping=False,
        in_flight=0,
        unrecorded=0,
        sessions=0,
        transactions=0,
        idle_connections=0,
        leased_bytes=0,
    )


def _added(carried: WorkerStatus, current: WorkerStatus) -> WorkerStatus:
    """``current`` with the counts of ``carried`` (earlier children's) added to its own."""
    if carried is _NOTHING_CARRIED:
        return current
    return replace(
        current,
        delivered=carried.delivered + current.delivered,
        deferred=carried.deferred + current.deferred,
        failed=carried.failed + current.failed,
        metrics=add_metrics(carried.metrics, current.metrics),
    )

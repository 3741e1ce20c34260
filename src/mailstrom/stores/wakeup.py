"""Waking workers in other processes when SQLite work becomes due: Unix datagram sockets.

SQLite cannot tell one process that another committed. So each store that watches a
queue binds a datagram socket in a directory next to the database (``queue.db-wake/``),
and whoever enqueues sends every socket there but its own one byte after its COMMIT: best
effort, non-blocking, a few microseconds. A worker in another process hears of new mail at once
instead of at its next poll (PostgreSQL keeps LISTEN/NOTIFY; polling stays as the
fallback for both).

Sockets of processes that died are removed by the next sender (``ECONNREFUSED``). The
directory and sockets get the database file's permissions, so whoever may write the queue
may wake its workers, and nobody else. Paths too long for a socket address (about 108
octets) are reached through ``/proc/self/fd`` on Linux.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
import threading
import time
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)

_MAX_PATH = 100
"""Longest socket path used as is (sun_path holds 108 octets with the NUL)."""
_STOP = b"stop"
CANCELLED = b"c"
"""The datagram that says leased recipients were cancelled (any other says work)."""
_TICK_NS = 1_000_000_000
"""Nanoseconds past a directory's modification time before a listing of it is kept for
as long as that time stays the same: a coarse clock stamps every change of its tick alike
(a jiffy, 1 to 10 ms, on Linux before 6.13; a second on ext3), so a socket bound in the
tick of a listing would leave the time as it was, and that listener unwoken."""
_GATHER = 0.002
"""Seconds a listener waits after answering a wake-up, so that the wake-ups of a burst of
enqueues (one per ``send_email``) are answered together: one callback per burst instead
of one per message. The first wake-up after a quiet spell is answered at once."""


class WakeupDirectory:
    """The wake-up sockets of one SQLite database."""

    def __init__(self, database: str) -> None:
        self.path = beside(database, "-wake")
        self._lock = threading.Lock()
        self._listing_mtime = -1
        self._listing: list[str] = []
        self._dir_fd: int | None = None
        self._own: set[str] = set()
        """The sockets this object listens on: their watchers are the store's own, called
        without a datagram. Every other socket is another listener, whatever its name:
        another store object of this process, or a process whose pid is ours in another
        pid namespace (a worker's container and the application's, both pid 1)."""
        self._sender: socket.socket | None = None
        """One unbound datagram socket for every wake-up this process sends (made on first
        use: a socket per call cost more than the send itself)."""
        self._closed = False

    def after_fork(self) -> None:
        """In a process forked from this one: the sockets the parent listens on are
        another process's now, woken with a datagram like any other."""
        self._lock = threading.Lock()
        self._own = set()
        self._listing_mtime = -1

    # --- the sending side --------------------------------------------------------------

    def notify(self, payload: bytes = b"!") -> None:
        """Send ``payload`` (one byte: work, or :data:`CANCELLED`) to every listening
        socket but this object's own; never raises."""
        try:
            targets = self._targets()
        except OSError:
            return  # no directory: nobody listens
        if not targets:
            return
        try:
            sock = self._sending_socket()
        except OSError as exc:
            # Out of descriptors or buffers: the message is committed already, and an
            # error here would make a caller that retries queue it twice. The worker
            # still finds it at its next poll.
            log.debug("no socket for wake-ups: %s", exc)
            return
        if sock is None:
            return  # closed
        for name in targets:
            try:
                sock.sendto(payload, self._address(name))
            except BlockingIOError:
                pass  # its queue is full of wake-ups already
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    # Nobody bound to it any more: its process died. Tidy up.
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.path, name))
                else:
                    log.debug("wake-up of %s failed: %s", name, exc)

    def _sending_socket(self) -> socket.socket | None:
        with self._lock:
            if self._sender is None and not self._closed:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sender = sock
                # A store dropped without close() must not leave it to the collector.
                weakref.finalize(self, sock.close)
            return self._sender

    def _targets(self) -> list[str]:
        mtime = os.stat(self.path).st_mtime_ns  # binding or removing a socket changes it
        with self._lock:
            if mtime != self._listing_mtime:
                # Our own sockets left out here, once per change of the directory, not on
                # every notify (one per enqueue); a change of _own forgets the listing.
                own = self._own
                self._listing = [
                    name
                    for name in os.listdir(self.path)
                    if name.endswith(".sock") and name not in own
                ]
                # A change in the same tick of the file system's clock as this listing
                # may leave the time as it is: kept only once that tick is surely over.
                settled = time.time_ns() - mtime >= _TICK_NS
                self._listing_mtime = mtime if settled else -1
            return self._listing

    def _address(self, name: str) -> str:
        full = os.path.join(self.path, name)
        if len(full) <= _MAX_PATH:
            return full
        with self._lock:
            if self._closed:
                return full  # too long to reach: that send fails, and no descriptor leaks
            if self._dir_fd is None:
                self._dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            return f"/proc/self/fd/{self._dir_fd}/{name}"

    # --- the listening side --------------------------------------------------------------

    def listen(
        self, callback: Callable[[], None], *, only: bytes | None = None
    ) -> Callable[[], None]:
        """Call ``callback`` (from a thread of its own) whenever another process sends a
        wake-up (with ``only``, one of that payload); returns a function that stops
        listening (idempotent; in a process forked since, it only closes that process's
        copy of the socket). Raises OSError when the socket or its thread cannot be
        had."""
        self._make_directory()
        name = f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        address = self._address(name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(address)
            os.chmod(os.path.join(self.path, name), self._mode() & 0o666)
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._own.add(name)
            self._listing_mtime = -1
        stopping = threading.Event()
        maker = os.getpid()

        def run() -> None:
            while True:
                try:
                    received = [sock.recv(64)]
                    # Several senders may have written at once: one call covers them all.
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            received.append(sock.recv(64, socket.MSG_DONTWAIT))
                except OSError:
                    return
                if stopping.is_set() and _STOP in received:
                    return
                if only is not None and only not in received:
                    continue
                try:
                    callback()
                except Exception:
                    log.exception("wake-up callback %r failed", callback)
                if not stopping.is_set():
                    time.sleep(_GATHER)

        def unbind() -> None:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.path, name))
            with self._lock:
                self._own.discard(name)
                self._listing_mtime = -1

        thread = threading.Thread(target=run, name="mailstrom-sqlite-wake", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:
            # "can't start new thread" (a container's pids.max, ulimit -u): like a socket
            # that cannot be made, no reason to fail the caller, whom polling serves. A
            # socket nobody reads would only fill up with others' wake-ups.
            unbind()
            raise OSError(f"cannot start the thread that hears them: {exc}") from exc

        def stop() -> None:
            if os.getpid() != maker:
                # A forked process's copy: the socket's file and the thread that reads it
                # are its maker's, who still listens (removed, nobody could reach it).
                sock.close()
                return
            if stopping.is_set():
                return
            stopping.set()
            # Sent from the listening socket itself: a socket made for it failed when the
            # process was out of descriptors (EMFILE), and the worker's stop ended there,
            # before it recorded the results it held.
            with contextlib.suppress(OSError):
                sock.sendto(_STOP, address)
            if threading.current_thread() is not thread:
                thread.join(5.0)
            unbind()

        return stop

    def _mode(self) -> int:
        return database_mode(self.path.removesuffix("-wake"))

    def _make_directory(self) -> None:
        make_directory_like(self.path, self._mode())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None
            if self._sender is not None:
                self._sender.close()
                self._sender = None


def beside(database: str, suffix: str) -> str:
    """The name of the file or directory ``suffix`` kept beside ``database``: beside the
    file SQLite opens, its symlinks resolved as SQLite resolves them for its ``-wal`` and
    ``-shm``. Named after the path given, one database opened through a symlink by one
    process and by its own name by another had two of each: the wake-ups of the one never
    reached the workers of the other, and their lock files were in two places."""
    return os.path.realpath(database) + suffix


def database_mode(database: str) -> int:
    """The permission bits of the database file (0o600 when it cannot be read): what the
    files a store keeps beside it get, so that whoever may write the queue may use them,
    and nobody else."""
    try:
        return stat.S_IMODE(os.stat(database).st_mode)
    except OSError:
        return 0o600


def make_directory_like(path: str, mode: int) -> None:
    """Create the directory ``path`` with the read and write bits of ``mode`` (a database
    file's), and search permission wherever there is read; an existing one is left as it
    is. Raises OSError when it cannot be made.

    The setgid bit it inherits from a setgid parent (the guide's shared spool directory)
    is kept, so that the files made in it belong to the queue's group, as the database's
    do: without it, a socket or lock file made by a member whose own group is another
    could not be reached by the rest."""
    mode &= 0o666
    mode |= (mode & 0o444) >> 2  # search permission wherever there is read
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    inherited = os.stat(path).st_mode & stat.S_ISGID
    os.chmod(path, mode | inherited)  # mkdir's mode is filtered by the umask

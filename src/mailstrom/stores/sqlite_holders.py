"""Which lease holders of a SQLite database are alive: a lock file per holder.

A worker killed with SIGKILL (or by the OOM killer, or a crash) cannot give back its
leases, and nobody knows it died: its recipients wait for ``Config.lease_for`` (15
minutes by default). So each store that leases for a holder keeps a file
``<holder>.lock`` in a directory beside the database (``queue.db-holders/``) and holds an
exclusive ``flock`` on it for as long as the store is open. The kernel lets go of the
lock when the process dies, however it dies; the file stays. Another worker that can take
the lock knows the holder is dead, gives back what it leased
(:meth:`~mailstrom.stores.sqlite.SQLiteStore.release_dead_holders`) and removes the file.

The file holds who made it (a line of JSON: host, pid, when), which ``mailstrom workers``
shows (:meth:`HolderLocks.live`). It is made under a temporary name, locked, then renamed
into place, so nobody ever sees the final name unlocked while its holder lives; a
temporary file left by a process that died in between is removed by a look once it is an
hour old (:data:`STRAY_AFTER`).
``flock`` (not ``fcntl`` record locks) because its lock belongs to the open file: another
process opening the file to try it, and closing it again, never drops the holder's lock.

None of this may cost a lease: a directory that cannot be made or written (a read-only
mount, a file in its place, permissions) is logged once and the lease goes on; that
holder's leases then expire as before if it dies. The directory and files get the
database file's permissions, as the wake-up sockets do (:mod:`~mailstrom.stores.wakeup`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import NamedTuple

from mailstrom.errors import InvalidArgument, StoreError
from mailstrom.stores.base import check_holder
from mailstrom.stores.wakeup import beside, database_mode, make_directory_like

log = logging.getLogger(__name__)

SUFFIX = ".lock"
LOOK_AT = 1000
"""Directory entries looked at per reaping at most: a directory filled with other files
costs a bounded listing, not one that grows with it."""
STRAY_AFTER = 3600.0
"""Seconds after which a temporary lock file (``.<holder>.<8 hex digits>.tmp``) is
removed by a look: a process lives through it for microseconds (made, locked, renamed),
so one this old was left by a process that died in between. The age keeps a reaper from
removing one that is being made right now."""
IDENTITY_MAX = 1024
"""Octets of a lock file read for who made it: any file may be put there."""
_TEMPORARY = re.compile(r"\.([0-9a-f]{8,32})\.[0-9a-f]{8}\.tmp")


class HolderLocks:
    """The holder lock files of one SQLite database: this store's own, and the look at
    everyone else's."""

    def __init__(self, database: str) -> None:
        self._database = os.path.abspath(database)
        self.path = beside(database, "-holders")
        self.held: set[str] = set()
        """Holders this store has locked (or tried to): the whole cost of a lease once a
        holder is in it is one look here."""
        self._files: dict[str, int] = {}
        """Descriptor of each of our lock files, by holder."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._warned: set[str] = set()
        self._closed = False

    def file(self, holder: str) -> str:
        """The lock file of ``holder``."""
        return os.path.join(self.path, holder + SUFFIX)

    # --- our own ---------------------------------------------------------------------

    def hold(self, holder: str | None) -> None:
        """Lock ``holder``'s file until :meth:`close` (the first time only; nothing for
        None); never raises: a file that cannot be made is logged once, and leasing goes
        on without it. Called before every lease: a holder already held costs one set
        lookup, without the lock."""
        if holder is None or holder in self.held:
            return
        with self._lock:
            if holder in self.held or self._closed:
                return
            try:
                self._files[holder] = self._create(holder)
            except OSError as exc:
                self._trouble("hold", f"cannot make the lock file {self.file(holder)}", exc)
            self.held.add(holder)

    def _create(self, holder: str) -> int:
        mode = database_mode(self._database) & 0o666
        make_directory_like(self.path, mode)
        temporary = os.path.join(self.path, f".{holder}.{secrets.token_hex(4)}.tmp")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(temporary, flags, mode)
        try:
            os.fchmod(fd, mode)  # the mode given to open is filtered by the umask
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, _identity())
            os.rename(temporary, self.file(holder))
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return fd

    def close(self, leaving: Collection[str] = ()) -> None:
        """Remove and let go of our lock files, but for those of the holders ``leaving``,
        which still lease: theirs are let go of and left, so that the next look gives
        back what they leased and removes them (:meth:`reap`)."""
        with self._lock:
            self._closed = True
            files, self._files = self._files, {}
        for holder, fd in files.items():
            # A process forked from ours shares the lock: only the one that made it removes
            # the file (closing a copy of the descriptor leaves the lock held).
            mine = os.getpid() == self._pid and holder not in leaving
            if mine and _still_named(fd, self.file(holder)):
                with contextlib.suppress(OSError):
                    os.unlink(self.file(holder))  # before the lock goes: never seen unlocked
            os.close(fd)

    def after_fork(self) -> None:
        """In a process forked from this one: the parent's holders are not ours. Our
        copies of their descriptors are closed (the files stay, and their locks with the
        parent), or a holder would look alive for as long as this process lives on."""
        self._lock = threading.Lock()
        files, self._files = self._files, {}
        self.held = set()
        self._warned = set()
        self._pid = os.getpid()
        for fd in files.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- everyone else's -----------------------------------------------------------------

    def reap(self, release: Callable[[str], int]) -> int:
        """Call ``release(holder)`` for each dead holder but our own, then remove its file;
        returns the sum of what ``release`` returned. Errors of ``release`` propagate (the
        file stays, for the next look); file-system trouble is logged."""
        total = 0
        for holder in self._others():
            fd = self._take_if_dead(holder)
            if fd is None:
                continue
            try:
                released = release(holder)
                self._remove(fd, holder)
            finally:
                os.close(fd)  # the file stays when release failed: the next look retries
            if released:
                log.warning(
                    "gave back %d recipients leased by lease holder %s, whose worker process"
                    " died (its lock file %s was no longer locked)",
                    released,
                    holder,
                    self.file(holder),
                )
            total += released
        return total

    def live(self) -> list[tuple[str, Made]]:
        """The holders whose lock file is locked (among the first :data:`LOOK_AT`
        entries), ours included, each with what its file says of who made it. A file
        found unlocked is left for the reapers. :class:`~mailstrom.errors.StoreError`
        when the directory or a file in it cannot be read: who runs is then unknown."""
        found = []
        try:
            names = self._names()
        except OSError as exc:
            raise _unknown(f"cannot list {self.path}", exc) from None
        for holder in filter(None, map(_holder_of, names)):
            path = self.file(holder)
            try:
                probe = _probe(path, fcntl.LOCK_SH)
            except OSError as exc:
                raise _unknown(f"cannot look at {path}", exc) from None
            if probe is None:
                continue  # removed meanwhile: its holder closed, or a worker reaped it
            fd, free = probe
            try:
                if not free:
                    found.append((holder, _read_identity(fd)))  # its holder lives
            finally:
                os.close(fd)  # lets go of a lock taken on a dead holder's file
        return found

    def _names(self) -> list[str]:
        """The first :data:`LOOK_AT` names in the directory; none when there is no
        directory (no holder ever locked here). OSError when it cannot be listed."""
        try:
            with os.scandir(self.path) as entries:
                return [entry.name for entry in itertools.islice(entries, LOOK_AT)]
        except FileNotFoundError:
            return []

    def _others(self) -> list[str]:
        """The holders with a lock file here (among the first :data:`LOOK_AT` entries),
        but for our own; other names are ignored."""
        try:
            names = self._names()
        except OSError as exc:
            self._trouble("list", f"cannot list lease holder lock files in {self.path}", exc)
            return []
        holders = []
        for name in names:
            holder = _holder_of(name)
            if holder is not None and holder not in self.held:
                holders.append(holder)
            elif holder is None and _TEMPORARY.fullmatch(name):
                self._remove_stray(name)
        return holders

    def _remove_stray(self, name: str) -> None:
        """Remove the temporary lock file ``name`` if a process died making it (see
        :data:`STRAY_AFTER`)."""
        path = os.path.join(self.path, name)
        try:
            found = os.stat(path, follow_symlinks=False)
            if stat.S_ISREG(found.st_mode) and time.time() - found.st_mtime > STRAY_AFTER:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._trouble("reap", f"cannot remove {path}", exc)

    def _take_if_dead(self, holder: str) -> int | None:
        """A descriptor locking ``holder``'s file when its holder is dead, else None."""
        path = self.file(holder)
        try:
            probe = _probe(path, fcntl.LOCK_EX)
        except OSError as exc:
            self._trouble("reap", f"cannot look at {path}", exc)
            return None
        if probe is None:
            return None  # removed meanwhile: its holder closed, or another worker reaped
        fd, free = probe
        # Locked, but maybe a file removed since we opened it (another worker reaped it,
        # and the holder may have locked a new one under the same name since).
        if not free or not _still_named(fd, path):
            os.close(fd)
            return None  # its holder lives, or the file is another's now
        return fd

    def _remove(self, fd: int, holder: str) -> None:
        """Remove the dead ``holder``'s file, open and locked as ``fd``, unless another
        file took its name meanwhile."""
        path = self.file(holder)
        if not _still_named(fd, path):
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._trouble("reap", f"cannot remove {path}", exc)

    def _trouble(self, doing: str, what: str, exc: OSError) -> None:
        """Log file-system trouble: a warning the first time for each kind of work, then
        only at debug level (a reaping runs every minute)."""
        text = f"{what}: {exc.strerror or exc}; leases of a worker that dies wait for lease_for"
        if doing in self._warned:
            log.debug("%s", text)
        else:
            self._warned.add(doing)
            log.warning("%s", text)


def _probe(path: str, how: int) -> tuple[int, bool] | None:
    """``path`` opened, and whether its lock could be taken (``how``: LOCK_SH or LOCK_EX)
    without waiting: ``(fd, True)`` holds that lock, ``(fd, False)`` none, its holder
    lives. None when the file is gone; OSError when it cannot be opened or locked. The
    caller closes ``fd``."""
    try:
        # O_NONBLOCK: a FIFO put there under that name must not hang the worker.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return fd, False
    except OSError:
        os.close(fd)
        raise
    return fd, True


def _unknown(what: str, exc: OSError) -> StoreError:
    return StoreError(f"which workers run is unknown: {what}: {exc.strerror or exc}")


def _identity() -> bytes:
    """What a lock file says of the process that made it."""
    made = {
        "host": socket.gethostname()[:255],
        "pid": os.getpid(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return json.dumps(made).encode() + b"\n"


class Made(NamedTuple):
    """What a lock file says of the process that made it; None for what it does not say
    readably (any file may be put there)."""

    host: str | None = None
    pid: int | None = None
    started_at: datetime | None = None


def _read_identity(fd: int) -> Made:
    """What the lock file open as ``fd`` says of who made it."""
    try:
        made = json.loads(os.pread(fd, IDENTITY_MAX, 0))
    except (OSError, ValueError):
        return Made()
    if not isinstance(made, dict):
        return Made()
    host, pid, started = made.get("host"), made.get("pid"), made.get("started_at")
    when = None
    if isinstance(started, str) and len(started) <= 40:
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(started)
    return Made(
        host=host if isinstance(host, str) and host.isprintable() and len(host) <= 255 else None,
        pid=pid if type(pid) is int and 0 < pid < 2**31 else None,
        started_at=when if when is not None and when.tzinfo is not None else None,
    )


def _holder_of(name: str) -> str | None:
    """The holder whose lock file ``name`` is, or None for any other name."""
    holder = name.removesuffix(SUFFIX)
    if holder == name:
        return None
    try:
        return check_holder(holder)
    except InvalidArgument:
        return None


def _still_named(fd: int, path: str) -> bool:
    """Whether ``path`` names the regular file open as ``fd`` (not one put in its place)."""
    try:
        opened = os.fstat(fd)
        named = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(opened.st_mode) and (opened.st_dev, opened.st_ino) == (
        named.st_dev,
        named.st_ino,
    )

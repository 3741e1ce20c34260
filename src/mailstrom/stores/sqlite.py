"""The embedded default store: one SQLite file, safe across threads and processes of a host.

Durability: WAL journal with ``synchronous=FULL``, so a transaction is on disk (WAL fsynced)
when its COMMIT returns, and ``enqueue`` returns only after its COMMIT. (``NORMAL`` would
only fsync at checkpoints: committed transactions could vanish on power loss.)

Concurrency: a small pool of connections, one per concurrently active thread. Reads run in
parallel (WAL readers never block). Writes take ``BEGIN IMMEDIATE`` so two writers never
deadlock upgrading a read lock, with a busy timeout for writers in other processes; inside
this process they also take one lock, so threads queue on it instead of in SQLite's
sleeping busy handler.

Group commit: concurrent ``enqueue`` calls are committed together, without a committer
thread. A caller adds its request to a pending list; if no other caller is committing, it
becomes the leader, takes *everything* pending and writes it in one transaction (one
fsync); callers that arrived meanwhile wait on a condition and either find their request
committed by the leader or lead the next batch. When other threads have been enqueueing
within the last few milliseconds, the leader first waits up to ``commit_delay`` (1 ms) for
their requests, as PostgreSQL's ``commit_delay``/``commit_siblings`` do, so that one fsync
serves them all. A lone caller pays nothing extra.
"Durable before return" holds: a request is marked done only after its COMMIT. If a
shared transaction fails, each request in it is retried on its own so the error reaches
the caller whose message caused it.

Times are stored as integer microseconds since the Unix epoch; the API uses aware UTC
datetimes. The schema is versioned with ``PRAGMA user_version`` and migrated on open from
``stores/sql/sqlite/NNNN_name.sql``.

Waiting: a write waits for the database's write lock (this process's mutex, the other
processes' ``flock``, SQLite's own lock) ``busy_timeout`` at most in all, then fails with
:class:`StoreLocked` and writes nothing. An enqueue waiting in a group commit counts from
its own call: it leaves the queue when its time is up, or rides in a commit whose leader,
having come first, gives up first. (How the ``flock`` is waited for:
:mod:`~mailstrom.stores.sqlite_lock`.)

Dead workers: a store that leases for a holder locks a file for it beside the database
while it is open, and :meth:`SQLiteStore.release_dead_holders` gives back the leases of
every holder whose lock is free (its process died: SIGKILL, a crash), so that the next
worker delivers them at once instead of after ``lease_for``
(:mod:`~mailstrom.stores.sqlite_holders`).

Errors: SQLite errors become :class:`StoreError` (try again later), except those that
retrying cannot fix, which become :class:`StoreCorrupt`: a damaged file or one that is no
database, a schema newer than this mailstrom knows (found at open, or by the worker's next
lease or record once a newer mailstrom migrated the database meanwhile, or by any
statement of this one that its migration broke, an enqueue's say: every call fails from
then on), a database file deleted or replaced while the store has it open, and its
``-shm`` file deleted meanwhile (found by the next write: the store then refuses every
call, and leaves the WAL to the next process that opens the database rather than write it
into the database by a stale index), or its ``-wal`` file (found by the next write too:
the store refuses every call, and first writes what the deleted file held into the
database); "database is locked" is :class:`StoreLocked`.

``read_only=True`` opens the file for reading only (``mode=ro``): no pragma that writes, no
migration, so views work on a read-only mount. A WAL database whose ``-wal`` file does not
exist (the last writer closed cleanly) cannot be opened ``mode=ro`` where SQLite may not
create its ``-shm`` file (a read-only mount, a directory the user may not write), nor
where a full disk has no room for it; it is then opened
``immutable=1``, which is exact because without a ``-wal`` file (or with an empty one) the
main file holds every committed transaction.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import resource
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from mailstrom.arguments import check_key, check_timeout, row_limit
from mailstrom.errors import (
    StoreAccessDenied,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreRefusedData,
    UnknownMessage,
    UnreadableRow,
    newer_schema_advice,
)
from mailstrom.policy.throttle import TokenBucket, TokenGrant
from mailstrom.status import (
    Attempt,
    DeliveryEvent,
    DestinationThrottle,
    MessageStatus,
    QueueStats,
    RecipientState,
)
from mailstrom.stores import (
    sqlite_events,
    sqlite_notices,
    sqlite_shaping,
    sqlite_suppressions,
)
from mailstrom.stores.base import (
    MAX_OWED_MESSAGES,
    MAX_TLS_BROKEN,
    EventBatch,
    Lease,
    OwedNotice,
    QueueFilter,
    RecipientResult,
    RecipientsFound,
    WorkItem,
    check_destination,
    check_pause_times,
    check_report_key,
    check_result_times,
    check_storable,
    check_suppressions,
    check_suspension,
    check_tls_host,
    named_recipients,
    pause_reply,
    storable_text,
    with_pauses,
    with_throttles,
)
from mailstrom.stores.clock import aware_utc, kept_time
from mailstrom.stores.dead_holders import HolderInfo, oldest_first
from mailstrom.stores.fairness import Fairness, fairness
from mailstrom.stores.forks import hold_when_idle, keep, renew_after_fork
from mailstrom.stores.operator import (
    IdPage,
    ListingKey,
    ShapeRow,
    Suspension,
    age_edges,
    check_examine,
    comparable,
    earliest,
    listed_ids,
    normalize_prefix,
    pick_one,
)
from mailstrom.stores.row_checks import counted_state, made_due, shown_text, stored_octets
from mailstrom.stores.side_rows import broken_until
from mailstrom.stores.sqlite_compact import Compaction, bytes_on_disk, checkpoint, no_room
from mailstrom.stores.sqlite_holders import HolderLocks
from mailstrom.stores.sqlite_lock import ProcessLock
from mailstrom.stores.sqlite_operator import (
    BULK_BATCH,
    PURGE_BATCH,
    active_suspensions,
    any_ended,
    cancel_seqs,
    count_matching,
    end_ended,
    hold_seqs,
    ids_of,
    ids_with_prefix,
    is_suspended,
    leased_pending,
    matching_seqs,
    place_of,
    purge_seqs,
    purgeable_seqs,
    retry_seqs,
    seqs_of,
    set_aside,
    shape_rows_sql,
    suspensions_at_lease,
)
from mailstrom.stores.sqlite_policy_prune import any_expired_policy, prune_policies
from mailstrom.stores.sqlite_queue import (
    HELD_WAITING_SQL,
    PENDING_SQL,
    SUSPENDED_SQL,
    chunks,
    date_undated,
    held_of_lease,
    insert_messages,
    lane_due,
    lease_rows,
    leased_by_holder,
    pending_lanes,
    qmarks,
    read_messages,
    record_rows,
    release_holder_rows,
    update_leased,
)
from mailstrom.stores.sqlite_schema import (
    decode_text,
    latest_version,
    migrate,
    opt_time_at,
    opt_us,
    schema_version,
    shown_time,
    to_us,
)
from mailstrom.stores.wakeup import CANCELLED, WakeupDirectory, beside
from mailstrom.stores.watchers import Watchers
from mailstrom.suppression import MAX_TARGET, Suppression

if TYPE_CHECKING:
    from mailstrom.message.prepared import PreparedMessage
    from mailstrom.mtasts.policy import CachedPolicy
    from mailstrom.tlsrpt.sessions import TLSSessions

log = logging.getLogger(__name__)

_BUSY_SLACK_MS = 5
"""A wait for the write lock shorter than this leaves SQLite's busy timeout as it is."""

_MAX_BUSY_MS = 2**31 - 1
"""SQLite's longest busy timeout (a C int of milliseconds, about 24.8 days): a longer one
wraps, to no wait at all."""

_SIBLING_WINDOW = 0.005
"""A thread that enqueued within this many seconds counts as enqueueing concurrently."""

_BATCH_PAUSE = 0.01
"""Seconds a purge or a bulk change leaves the write lock free between two batches:
twice the longest sleep of a process waiting for it (``sqlite_lock``), so that a waiter
gets in."""

_WAL_KEPT = 8 << 20
"""Bytes of its ``-wal`` file SQLite keeps when it starts writing it from the start again
(``journal_size_limit``): twice what it holds between two automatic checkpoints (1,000
pages of 4 KiB), so that steady work never shrinks and regrows it. Unlimited, the file
kept the length of the largest transaction since the store opened (a ``send_emails`` of
10 messages of 2 MB: 20 MB) for as long as any process had it open."""

# --- opening -------------------------------------------------------------------------------

_CORRUPT = frozenset([sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB])
"""Primary result codes that retrying cannot fix ("database disk image is malformed", "file
is not a database")."""


_LOW_SPACE = 1 << 20
"""Bytes free on a disk below which an I/O error there is taken for a full disk."""


def _store_error(
    exc: sqlite3.Error, path: str, busy_timeout: float, *, reading: bool = False
) -> StoreError:
    """The store error for a SQLite error on ``path``: StoreCorrupt when it is permanent,
    StoreLocked when SQLite's wait for a lock (``busy_timeout``) ran out (``reading``: in
    a store opened read-only, see :func:`_locked`)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _CORRUPT:
        return StoreCorrupt(f"{path} is damaged or is not a mailstrom database: {exc}")
    if isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_BUSY:
        return _locked(path, busy_timeout, sqlite_said=str(exc), reading=reading)
    if code == sqlite3.SQLITE_IOERR_SHORT_READ and _wal_deleted(path):
        return StoreCorrupt(
            f"the -wal file {path}-wal was deleted while the database was in use (SQLite:"
            f" {exc}): the transactions it held are not in {path} yet, and no new"
            f" connection can open it until they are. Stop every process that uses {path}"
            " (the last one to close it writes them into the database), then start again;"
            " never delete the -wal or -shm file of a database in use"
        )
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError):
        return StoreRefusedData(f"SQLite store {path} refused a value: {exc}")
    denied = _denied(code, path)
    if denied is not None:
        text = f"{denied} (SQLite: {exc}); its permissions decide who may use it"
        if _on_read_only_mount(path):
            return StoreError(text)  # a mount, which may be made writable again
        # Permanent: waiting does not change permissions (a starting worker exits, 78).
        return StoreAccessDenied(text)
    if _disk_full(code, path):
        # SQLite's own words ("database or disk is full", "disk I/O error") leave an
        # operator guessing which, and whether mail was lost: the failed transaction was
        # rolled back, and the store works again once there is room.
        return StoreError(
            f"the disk holding {path} is full (SQLite: {exc}); free space on it and try"
            " again (queued mail is kept)"
        )
    limit = _file_size_limit(code, path)
    if limit is not None:
        return StoreError(
            f"{path} or its -wal file reached this process's file size limit of {limit}"
            f" bytes (RLIMIT_FSIZE, `ulimit -f`; SQLite: {exc}); raise the limit and try"
            " again (queued mail is kept)"
        )
    return StoreError(f"SQLite error on {path}: {exc}")


def _locked(
    path: str, busy_timeout: float, *, sqlite_said: str = "", reading: bool = False
) -> StoreLocked:
    """What a write says when it waited ``busy_timeout`` for the write lock in vain; with
    ``reading``, what a read-only store says when it could not read for as long (WAL
    readers wait only for a connection holding the database exclusively, or for a
    writer of a database another program turned back to a rollback journal)."""
    said = f" (SQLite: {sqlite_said})" if sqlite_said else ""
    if reading:
        return StoreLocked(
            f"SQLite store {path}: waited {busy_timeout:g} s to read the database, locked"
            f" all that time by another process or connection{said}; try again"
        )
    return StoreLocked(
        f"SQLite store {path}: waited {busy_timeout:g} s for the database's write lock, held"
        f" all that time by another process or connection{said}; nothing was written, try"
        " again (the store's busy_timeout sets the wait)"
    )


def _left(deadline: float) -> float:
    """Seconds until ``deadline`` (``time.monotonic()``), none when it has passed."""
    return max(deadline - time.monotonic(), 0.0)


def _disk_full(code: object, path: str) -> bool:
    """Whether SQLite's error ``code`` on ``path`` means its disk is full: SQLITE_FULL
    (what a write that cannot grow the WAL or the file gets for ENOSPC), or an I/O error
    on a disk with next to no space left (the ``-shm`` file SQLite needs to open a WAL
    database cannot be made: SQLITE_IOERR_SHMSIZE, "disk I/O error")."""
    if not isinstance(code, int):
        return False
    if code & 0xFF == sqlite3.SQLITE_FULL:
        return True
    if code & 0xFF != sqlite3.SQLITE_IOERR:
        return False
    try:
        disk = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return disk.f_bavail * disk.f_frsize < _LOW_SPACE


def _file_size_limit(code: object, path: str) -> int | None:
    """This process's file size limit (``RLIMIT_FSIZE``) when SQLite's error ``code`` on
    ``path`` is a write refused for it: the kernel's EFBIG, which SQLite reports as any
    failed write (SQLITE_IOERR_WRITE, "disk I/O error"), and the database or its ``-wal``
    file at the limit (a write that crosses it stops there) or past it (the limit was
    lowered); else None."""
    if code != sqlite3.SQLITE_IOERR_WRITE:
        return None
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit == resource.RLIM_INFINITY:
        return None
    for name in (path, path + "-wal"):
        try:
            if os.path.getsize(name) >= limit:
                return limit
        except OSError:
            continue
    return None


def _denied(code: object, path: str) -> str | None:
    """What this user may not do for SQLite's error ``code`` on ``path``, when the error
    is for want of a permission; else None. SQLite's own words ("attempt to write a
    readonly database", "unable to open database file") name neither what is refused nor
    where: the directory, where SQLite makes the ``-wal`` and ``-shm`` files, or the file."""
    if not isinstance(code, int):
        return None
    if code == sqlite3.SQLITE_READONLY_DIRECTORY:
        folder = os.path.dirname(path)
        return (
            f"this user may not create files in {folder}, where SQLite keeps the -wal and"
            f" -shm files of {path}"
        )
    if code & 0xFF not in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY):
        return None
    return _not_allowed(path)


def _not_allowed(path: str) -> str | None:
    """What this user may not do to the existing file ``path`` ("this user may not write
    ..."), reading first; None when it may read and write it, or when that cannot be
    told (a missing file, an error of os.access())."""
    for access, what in ((os.R_OK, "read"), (os.W_OK, "write")):
        try:
            allowed = os.access(path, access)
        except OSError:
            return None
        if not allowed and os.path.exists(path):
            return f"this user may not {what} {path}"
    return None


def _on_read_only_mount(path: str) -> bool:
    """Whether the file system holding ``path`` is mounted read-only (os.access() then
    says no write for anyone: no permission of this user's)."""
    try:
        flags = os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag
    except OSError:
        return False
    return bool(flags & os.ST_RDONLY)


def _no_shm(exc: sqlite3.Error) -> bool:
    """Whether opening failed for want of the ``-shm`` file: it cannot be created (a
    read-only mount: SQLITE_CANTOPEN; a directory this user may not write:
    SQLITE_READONLY_DIRECTORY) or grown (a full disk: SQLITE_IOERR_SHMSIZE)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return False
    return code & 0xFF == sqlite3.SQLITE_CANTOPEN or code in (
        sqlite3.SQLITE_IOERR_SHMSIZE,
        sqlite3.SQLITE_READONLY_DIRECTORY,
    )


def _wal_deleted(path: str) -> bool:
    """Whether the ``-wal`` file of ``path`` looks deleted under processes that have the
    database open: their ``-shm`` file (the WAL's index) is there, the ``-wal`` file is
    gone or empty (a new opener makes an empty one), and SQLite read short from it."""
    return os.path.exists(path + "-shm") and not _wal_holds_frames(path)


def _wal_holds_frames(path: str) -> bool:
    """Whether the ``-wal`` file of ``path`` exists and is not empty: it may then hold
    committed transactions the main file does not have yet. (A failed open on a full
    disk leaves an empty one behind.)"""
    try:
        return os.path.getsize(path + "-wal") > 0
    except FileNotFoundError:
        return False


def _file_uri(path: str, query: str) -> str:
    """A ``file:`` URI for ``path`` (quoted: ``?`` and ``#`` in a path are not parameters).
    The octets of the name are quoted, as the file system holds them: a name that is not
    UTF-8 (a directory named in Latin-1; Python reads it with lone surrogates, as
    ``os.fsdecode`` does) failed the open with UnicodeEncodeError."""
    return f"file:{urllib.parse.quote(os.fsencode(os.path.abspath(path)))}?{query}"


def _identity(path: str) -> tuple[int, int]:
    """(device, inode) of the database file; StoreCorrupt when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StoreCorrupt(f"database file {path} was deleted while in use") from None
    except OSError as exc:
        raise StoreError(f"cannot stat {path}: {exc.strerror or exc}") from None
    return st.st_dev, st.st_ino


def _side_identity(side: str) -> tuple[int, int] | None:
    """(device, inode) of the ``-shm`` or ``-wal`` file ``side``, None when there is none;
    OSError when that cannot be told."""
    try:
        st = os.stat(side)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _check_regular(path: str) -> None:
    """StoreCorrupt when ``path`` (followed through symlinks) is there but no regular
    file: SQLite failed on a directory with "disk I/O error", which reads as worth
    retrying, and opening a FIFO for reading waited in ``open()`` for a writer, for
    ever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: opening it says what is wrong
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "a special file")
        raise StoreCorrupt(f"{path} is not a regular file ({kind}): not a mailstrom database")


def _check_not_emptied(path: str) -> None:
    """StoreCorrupt when the existing file ``path`` is empty but held a queue: its ``-lock``
    file is beside it (made only once the database was set up, which writes the file's
    first page) or its ``-wal`` file holds frames. SQLite takes an empty file for a new
    database (and deletes the ``-wal`` of one), so a queue file truncated to nothing
    opened as an empty queue, its mail gone without a word. An empty file without either
    is new: made beforehand, or by another process opening the new store meanwhile.
    (Looked at before the size: one that process sets up meanwhile has its first page
    written before either is made, so it is never found empty with one beside it.)"""
    if not (os.path.exists(beside(path, "-lock")) or _wal_holds_frames(path)):
        return
    try:
        size = os.stat(path).st_size
    except OSError:
        return  # missing or unreadable: opening it says what is wrong
    if size == 0:
        raise StoreCorrupt(
            f"{path} is empty (0 bytes) but held a mailstrom queue (its -lock or -wal file"
            " is beside it): the file was truncated and its queued mail is not in it;"
            " restore it from a backup, or delete it, its -lock and -wal files to start an"
            " empty queue"
        )


def _check_wal_has_database(path: str) -> None:
    """StoreCorrupt when ``path`` is missing but its ``-wal`` file holds frames: mail a
    crash left there, committed but not yet in the database file, which was moved or
    deleted since. Opened, a new empty queue was made in its place and SQLite deleted
    that ``-wal`` as one of no database. (The ``-wal`` is looked at first: a process
    making a new store creates its file before any ``-wal``, so one found meanwhile is
    never taken for left behind.)"""
    try:
        if not _wal_holds_frames(path) or os.path.exists(path):
            return
    except OSError:
        return  # a path through a file, say: opening it says what is wrong
    raise StoreCorrupt(
        f"the -wal file {path}-wal holds committed transactions but there is no database"
        f" file {path}: it was moved or deleted after a crash, and the mail in the -wal"
        " is only readable with it; put it back, or delete the -wal, -shm and -lock files"
        " to start an empty queue"
    )


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def newer_version_behind(exc: BaseException, conn: sqlite3.Connection, latest: int) -> int | None:
    """The schema version of ``conn``'s database when ``exc`` is SQLite refusing a
    statement (SQLITE_ERROR: "no such column", "table messages has no column named
    data", an ON CONFLICT target gone...) and that version is past ``latest``, which
    this mailstrom knows: a newer mailstrom migrated it since. None otherwise; read only
    on such an error."""
    if not isinstance(exc, sqlite3.OperationalError):
        return None
    if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_ERROR:
        return None
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    except sqlite3.Error:
        return None
    return version if isinstance(version, int) and version > latest else None


def _check_schema(version: int, path: str, latest: int) -> None:
    if version > latest:
        raise StoreCorrupt(_newer_schema(version, path, latest))


def _newer_schema(version: int, path: str, latest: int, *, while_open: bool = False) -> str:
    """Why a store refuses a database whose schema is newer than this mailstrom knows."""
    return (
        f"{path}: database schema version {version} is newer than this mailstrom "
        f"understands ({latest}){newer_schema_advice(while_open=while_open)}"
    )


_WAL_RETRY_PAUSE = 0.002
"""Seconds between two tries to make a new database WAL (see :func:`_make_wal`)."""


def _make_wal(conn: sqlite3.Connection, deadline: float) -> None:
    """``PRAGMA journal_mode=WAL``, tried again until ``deadline`` while it finds the
    database locked.

    A new file is in rollback mode until one of the processes opening it at once makes it
    WAL, which takes its write lock. Another process asking meanwhile holds the shared
    lock and wants the write lock too: SQLite answers "database is locked" at once rather
    than let two lock upgrades wait for each other, and never calls the busy handler, so
    ``busy_timeout`` did not apply and the open failed (StoreLocked after a few
    milliseconds, saying it had waited ``busy_timeout``). Tried again, it finds the file
    WAL already (a no-op) or makes it so."""
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if not isinstance(code, int) or code & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            if _left(deadline) <= 0:
                raise
        time.sleep(min(_WAL_RETRY_PAUSE, _left(deadline)))


def _insert(conn: sqlite3.Connection, request: _Enqueue) -> list[str]:
    return insert_messages(conn, request.messages, now=request.now, hold=request.hold)


# --- the store -----------------------------------------------------------------------------


@dataclass(eq=False, slots=True, kw_only=True)
class _Enqueue:
    """One caller's enqueue waiting for the group commit (private, mutable on purpose)."""

    messages: Sequence[PreparedMessage]
    now: int
    hold: bool
    deadline: float = 0.0
    """When its wait for the write lock runs out (``time.monotonic()``)."""
    gave_up: bool = False
    """Its caller's time ran out while a leader was committing it: if that commit finds
    the database locked, it fails rather than waits for another."""
    ids: list[str] = field(default_factory=list)
    done: bool = False
    error: Exception | None = None
    turn: threading.Lock | None = None
    """A follower's own lock, held until its request is done or it leads the next commit:
    the leader wakes exactly the callers it concerns, never every waiter."""
    led: bool = False
    """Its caller has the lead, taken or handed to it (set under the group's condition):
    one that leaves before its request is done hands it on (``SQLiteStore._abandon``)."""


def _committed(requests: Sequence[_Enqueue]) -> bool:
    """Whether every one of ``requests`` was committed: each has its ids (a rolled-back
    commit clears them, and no request is without messages)."""
    return all(request.ids and request.error is None for request in requests)


_HAND_ON_TRIES = 5
"""Tries to hand a group commit's lead on when signal handlers raise meanwhile: each
try is a few statements, so a second interruption is rare and a fifth one unheard of."""


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


class SQLiteStore:
    """A :class:`~mailstrom.stores.base.Store` in one SQLite file (created if missing).

    >>> store = SQLiteStore("mail.db")  # doctest: +SKIP
    >>> mid = store.enqueue(prepared, now=datetime.now(UTC))  # doctest: +SKIP

    ``busy_timeout`` is how many seconds a write waits for the write lock in all (held by
    other threads, other processes or other programs' connections), then fails with
    :class:`StoreLocked` (a finite number, else :class:`~mailstrom.errors.InvalidArgument`;
    SQLite's own wait stops at its longest, about 24.8 days);
    ``group_commit=False`` commits every ``enqueue`` on its own (for comparison).
    ``commit_delay`` is how long the leader of a group commit waits for the enqueues of
    other threads that have been enqueueing too (never when one thread enqueues alone):
    one fsync then carries them all (4 threads: 2,225 -> 2,938 msg/s end to end,
    benchmarks/README.md); 0 turns the wait off (a finite number of seconds, else
    :class:`~mailstrom.errors.InvalidArgument`).
    ``read_only=True`` opens an existing store for reading only (see the module docstring);
    its write methods then fail with StoreError.
    """

    in_process = True
    """Calls are local file I/O, short and without network waits: the worker makes them on
    its event loop instead of handing each to a thread (see ``Store.in_process``)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 30.0,
        group_commit: bool = True,
        commit_delay: float = 0.001,
        read_only: bool = False,
    ) -> None:
        given = os.fspath(path)
        if given == ":memory:" or given.startswith("file:"):
            raise ValueError("SQLiteStore needs a file path; use MemoryStore for memory")
        # Absolute once and for all: a relative path would name another file after the
        # process changes its working directory (a daemon's chdir("/")), and the store
        # would take its file for deleted, or a worker process open another queue.
        self._path = os.path.abspath(given)
        self._turns: dict[str, str] = {}
        busy_timeout = check_timeout(busy_timeout, "busy_timeout")
        self._busy_timeout = busy_timeout
        # Checked here, not where a group commit's leader first waits with it: there it
        # failed every concurrent enqueue that commit carried.
        self._commit_delay = check_timeout(commit_delay, "commit_delay")
        self._group_commit = group_commit
        self._read_only = read_only
        self._uri: str | None = None
        """What connections open once the file is known to exist (a ``file:`` URI)."""
        self._file: tuple[int, int] | None = None
        """(device, inode) of the database file opened, to notice it being replaced."""
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._out = 0
        """Connections checked out (under ``_pool_lock``): statements under way."""
        self._closed = False
        self._closed_why = "the store is closed"
        self._latest = latest_version()
        """The schema version this mailstrom knows, and the database's once opened."""
        self._newer: str | None = None
        """Why every call fails, once a newer mailstrom migrated the database under this
        store (see :meth:`_refuse_newer_schema`), or its ``-shm`` or ``-wal`` file was
        deleted or replaced under it (see :meth:`_check_shm`, :meth:`_wal_gone`)."""
        self._shm_path = ""
        self._wal_path = ""
        self._wal: tuple[int, int] | None = None
        """(device, inode) of the ``-wal`` file this process's connections write, once
        known (see :meth:`_wal_gone`)."""
        self._held_back = False
        """Whether this process holds back its checkpoint (:meth:`_keep_from_checkpointing`)."""
        self._shm: tuple[int, int] | None = None
        """(device, inode) of the ``-shm`` file this process's connections share, once
        known (see :meth:`_check_shm`)."""
        self._busy_ms = min(int(busy_timeout * 1000), _MAX_BUSY_MS)
        """``busy_timeout`` as SQLite takes it (what ``sqlite3.connect`` sets), within the
        range it takes: a longer wait is SQLite's longest, not none."""
        self._write_lock = threading.Lock()
        self._process_lock: ProcessLock | None = None
        self._pending: list[_Enqueue] = []
        self._group = threading.Condition()
        self._leader = False
        self._gathering = False
        self._seen: dict[int, float] = {}
        self._watchers = Watchers()
        self._cancel_watchers = Watchers()
        self._listen_lock = threading.Lock()
        self._listening: dict[int, Callable[[], None]] = {}
        """The stop function of every watcher not stopped yet, which close() calls."""
        self._listen_keys = itertools.count()
        self._verp_key: bytes | None = None
        self._wakeups = WakeupDirectory(self._path)
        self._holders = HolderLocks(self._path)
        self._events = False
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        renew_after_fork(self)

    def _open(self) -> None:
        latest = self._latest
        if self._read_only:
            self._open_read_only(latest)
            return
        _check_wal_has_database(self._path)
        if not self._create_private():
            _check_not_emptied(self._path)
        _check_regular(self._path)
        denied = _not_allowed(self._path)
        if denied is not None and not _on_read_only_mount(self._path):
            # SQLite opens a file it may not write read-only without a word (mode=rw),
            # and every write then failed, a worker retrying them for ever. Permanent,
            # as when SQLite refuses (_store_error); a read-only mount stays a StoreError
            # SQLite raises below (it may be made writable again).
            raise StoreAccessDenied(f"{denied}; its permissions decide who may use it")
        # The file exists now: SQLite must never create one (mode=rw), not in place of a
        # store deleted later, nor with its default 0644 at the end of a dangling symlink.
        self._uri = _file_uri(self._path, "mode=rw")
        with self._connection() as conn:
            version = schema_version(conn, self._path)
            _check_schema(version, self._path, latest)
            # Only takes effect on a new, empty file. Every commit writes each page it
            # touched to the WAL (an enqueue touches one of each table and index it adds
            # to), so the page size is the bytes behind each fsync: 4 KiB pages made a
            # durable enqueue 11-17 % faster than 8 KiB ones (benchmarks/page_size.py),
            # for a file 6 % (1 KB messages) to 38 % (2 KB) larger: a queue is transient,
            # and send_email's latency is the product.
            conn.execute("PRAGMA page_size=4096")
            # Persistent in the file; must run outside a transaction.
            _make_wal(conn, time.monotonic() + self._busy_timeout)
            if version != latest:
                # Only then: migrating takes the write lock, and opening a current store
                # must not wait for (nor fail behind) another process's long write.
                migrate(conn)
        self._file = _identity(self._path)  # checked on every checkout from now on
        # Named once: beside() resolves symlinks, a few system calls per write.
        self._shm_path = beside(self._path, "-shm")
        self._shm = _side_identity(self._shm_path)  # checked by every write (_check_shm)
        self._wal_path = beside(self._path, "-wal")
        self._wal = _side_identity(self._wal_path)  # and so is this one (_wal_gone)
        self._process_lock = self._open_lock_file()

    def _open_lock_file(self) -> ProcessLock | None:
        """The file every mailstrom writer of this database holds with ``flock`` while it
        writes. SQLite's own busy handler, when a write finds the database locked, sleeps
        1, 2, 5, 10... ms before it looks again; a writer waiting for the ``flock`` looks
        every 0.02 ms at first (and for ``busy_timeout`` at most: see
        :mod:`~mailstrom.stores.sqlite_lock`). With the worker of another process writing
        every few milliseconds, that is the difference for ``send_email``'s latency.

        It gets the database file's mode, as SQLite's ``-wal`` and ``-shm`` do, and is
        opened for reading only (``flock`` needs no more): whoever may write the queue
        may take it. Made before the database was opened to a group (0600 then), its
        owner gives it the database's mode at its next open. A store that still cannot
        open it writes without it, under SQLite's lock alone: the lock is a latency
        device, and a store that may write the database must not fail for want of it."""
        path = beside(self._path, "-lock")
        mode = stat.S_IMODE(os.stat(self._path).st_mode) & 0o666
        # O_NONBLOCK: a FIFO put there under that name must not hang the open.
        flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(path, flags, mode)
        except OSError as exc:
            log.warning(
                "cannot open %s (%s): this store's writes wait for other processes' in"
                " SQLite's busy handler, as other programs' do",
                path,
                exc.strerror or exc,
            )
            return None
        try:
            found = os.fstat(fd)
            if found.st_uid == os.geteuid() and stat.S_IMODE(found.st_mode) != mode:
                os.fchmod(fd, mode)  # the mode given to open is filtered by the umask
        except OSError:
            pass  # a mode that cannot be changed costs the others the flock, no more
        return ProcessLock(fd, path)

    @contextmanager
    def _exclusive(self, deadline: float) -> Iterator[None]:
        """Hold the write lock: this process's threads queue on a mutex, processes on
        ``flock`` (SQLite's BEGIN IMMEDIATE still guards against any other writer), both
        until ``deadline`` at most. Past it the mutex wait fails with StoreLocked; the
        ``flock`` wait goes on without it, leaving SQLite's lock to decide (see
        :meth:`_begin_immediate`): a holder stopped between its transactions delays the
        others, no more."""
        mutex = self._write_lock
        # (Trying first without a timeout is the cheaper call on the uncontended path.)
        if not mutex.acquire(blocking=False) and not mutex.acquire(timeout=_left(deadline)):
            raise _locked(self._path, self._busy_timeout)
        try:
            lock = self._process_lock
            held = lock is not None and lock.acquire(deadline)
            try:
                yield
            finally:
                if held:
                    assert lock is not None
                    lock.release()
        finally:
            mutex.release()

    def _begin_immediate(self, conn: sqlite3.Connection, deadline: float) -> None:
        """BEGIN IMMEDIATE, SQLite's busy handler waiting only what is left until
        ``deadline`` (past it: one look) when the wait for the write lock took some."""
        left = min(int(_left(deadline) * 1000), self._busy_ms)
        if left >= self._busy_ms - _BUSY_SLACK_MS:
            conn.execute("BEGIN IMMEDIATE")  # the uncontended path: no statement added
        else:
            conn.execute(f"PRAGMA busy_timeout={left}")
            try:
                conn.execute("BEGIN IMMEDIATE")
            finally:
                conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        try:
            self._check_shm()
            gone = self._wal_gone()
        except BaseException:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        if gone is not None:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._newer = gone
            self._write_back_wal(conn)
            raise StoreCorrupt(gone)

    def _create_private(self) -> bool:
        """Create a missing database file readable and writable by its owner only (0600);
        whether it was missing.

        Queued bodies are private mail. SQLite gives the -wal and -shm files it creates the
        main file's permissions, so they are 0600 too; an existing file keeps its mode (an
        administrator may have made it group-writable on purpose).
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(self._path, flags, 0o600)
        except FileExistsError:
            return False
        except PermissionError as exc:
            raise StoreAccessDenied(
                f"this user may not create {self._path} ({exc.strerror or exc}); the"
                " permissions of its directory decide who may"
            ) from None
        except OSError as exc:
            from mailstrom.stores.url import path_error

            raise path_error(f"cannot create {self._path}", exc) from None
        os.close(fd)
        return True

    def _open_read_only(self, latest: int) -> None:
        _check_wal_has_database(self._path)
        if not os.path.exists(self._path):
            raise StoreError(f"no mailstrom queue at {self._path}")
        _check_regular(self._path)
        _check_not_emptied(self._path)
        self._file = _identity(self._path)
        self._uri = _file_uri(self._path, "mode=ro")
        try:
            version = self._probe()
        except sqlite3.Error as exc:
            # A WAL database on read-only media whose -shm cannot be created, or on a full
            # disk with no room for it; without a -wal file (or with an empty one) every
            # committed transaction is in the main file, so reading it as immutable is exact.
            if not _no_shm(exc) or _wal_holds_frames(self._path):
                raise self._error(exc) from exc
            self._uri = _file_uri(self._path, "mode=ro&immutable=1")
            try:
                version = self._probe()
            except sqlite3.Error as again:
                raise self._error(again) from again
        _check_schema(version, self._path, latest)
        if version < latest:
            raise StoreError(
                f"{self._path}: database schema version {version} is older than this "
                f"mailstrom's ({latest}); run `mailstrom db migrate` (or start a worker)"
            )

    def _probe(self) -> int:
        """The schema version, read on a connection that is then pooled."""
        conn = self._connect()
        try:
            version = schema_version(conn, self._path)
        except BaseException:
            conn.close()
            raise
        with self._pool_lock:
            self._idle.append(conn)
        return int(version)

    def _error(self, exc: sqlite3.Error) -> StoreError:
        """The store error for ``exc``, said as this store waits: to write, or to read."""
        return _store_error(exc, self._path, self._busy_timeout, reading=self._read_only)

    @property
    def path(self) -> str:
        """The database file (its absolute path)."""
        return self._path

    @property
    def busy_timeout(self) -> float:
        """How many seconds a call waits for a lock another connection holds (see the
        class docstring); the dashboard's read model waits as long."""
        return self._busy_timeout

    @property
    def url(self) -> str:
        """A store URL naming this file."""
        return "sqlite:///" + os.path.abspath(self._path)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled, a store is the way to open it again (for a worker in another process):
        # the same file with the same options, never its connections.
        reopen = functools.partial(
            SQLiteStore,
            busy_timeout=self._busy_timeout,
            group_commit=self._group_commit,
            commit_delay=self._commit_delay,
            read_only=self._read_only,
        )
        return (reopen, (os.path.abspath(self._path),))

    # --- connections ------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._uri or self._path,
            timeout=self._busy_ms / 1000,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # pooled: used by one thread at a time, any thread
            uri=self._uri is not None,
        )
        conn.text_factory = decode_text
        try:
            if not self._read_only:  # connection settings; nothing is written
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                # SQLite built with SECURE_DELETE (Debian's, Ubuntu's) wrote every freed
                # page again, as zeros: a purge put each deleted body into the WAL (and
                # then the file), so a batch of 500 messages of 1 MB grew the WAL by
                # 500 MB, and a disk near full had no room to purge. FAST zeroes only
                # what costs no extra write: a deleted body stays in free pages until
                # the next messages take them, as with SQLite built without it.
                conn.execute("PRAGMA secure_delete=FAST")
                conn.execute(f"PRAGMA journal_size_limit={_WAL_KEPT:d}")
        except BaseException:
            # A file that is no database fails here already ("file is not a database"):
            # the caller never gets this connection to pool or close.
            conn.close()
            raise
        return conn

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            if self._closed:
                raise StoreError(self._closed_why)
            if self._newer is not None:
                raise StoreCorrupt(self._newer)
            conn = self._idle.pop() if self._idle else None
            self._out += 1
        try:
            # One stat per checkout: a deleted or replaced file is a permanent failure,
            # not one to retry on the old inode forever.
            if self._file is not None and _identity(self._path) != self._file:
                raise StoreCorrupt(f"database file {self._path} was replaced while in use")
            if conn is None:
                with self._pool_lock:
                    first = not self._idle and self._out == 1
                if first:
                    # No connection of this process is open: this one may make a new
                    # -shm and -wal file, rightly (the last process to close removed
                    # them).
                    self._shm = self._wal = None
                conn = self._connect()
            yield conn
        except sqlite3.Error as exc:
            newer = self._newer_schema_behind(exc, conn)
            raise newer or self._error(exc) from exc
        except (UnicodeEncodeError, OverflowError) as exc:
            # Raised by the driver while binding a value (a lone surrogate, an integer
            # past 64 bits): the value is refused, the database is fine.
            raise StoreRefusedData(f"SQLite store {self._path} refused a value: {exc}") from exc
        finally:
            # Still in a transaction: a COMMIT and its ROLLBACK failed. Never pooled (it
            # may also still commit without fsync, see _write): closing it rolls the
            # transaction back, and the next checkout makes a new one.
            pooled = False
            with self._pool_lock:
                self._out -= 1
                if conn is not None and not (self._closed or conn.in_transaction):
                    self._idle.append(conn)
                    pooled = True
            if conn is not None and not pooled:
                with suppress(sqlite3.Error):
                    conn.close()

    def _refuse_newer_schema(self, conn: sqlite3.Connection) -> None:
        """StoreCorrupt, and for every call from now on, when a newer mailstrom migrated
        the database since this store opened it. This mailstrom's statements are written
        for the schema it knows: a worker that went on leasing and recording with them
        could mis-record mail, where the schema a newer mailstrom finds at open stops it.

        Called at the start of the worker's lease and record transactions, not per
        message: the PRAGMA reads the header page the transaction has read already
        (about a microsecond)."""
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > self._latest:
            raise self._schema_moved_on(version)

    def _newer_schema_behind(
        self, exc: sqlite3.Error, conn: sqlite3.Connection | None
    ) -> StoreCorrupt | None:
        """StoreCorrupt when ``exc`` is SQLite refusing a statement of this mailstrom
        because a newer mailstrom changed the schema since this store opened it (see
        :func:`newer_version_behind`): a call other than a lease or record (an enqueue,
        the heartbeat's, a view's) finds it so, where it read as a passing trouble,
        retried for ever."""
        version = None if conn is None else newer_version_behind(exc, conn, self._latest)
        return None if version is None else self._schema_moved_on(version)

    def _check_shm(self) -> None:
        """StoreCorrupt, and for every call from now on, when the ``-shm`` file (SQLite's
        index of the WAL, shared by every process that has the database open) is no
        longer the one this process's connections use: it was deleted, and a process
        that opened the database since made a new one. Each side then wrote to the WAL
        by its own index, over the other's commits, and the last to close checkpointed
        its own view over the other's: mail acknowledged to ``send_email`` (in another
        process, or in this one) was lost without a word.

        Called at the start of every write transaction (one ``stat``), inside it
        (:meth:`_begin_immediate`): the ``-shm`` file exists while this process has the
        database open."""
        try:
            found = _side_identity(self._shm_path)
        except OSError:
            return  # cannot be told: the write decides
        if self._shm is None and found is not None:
            self._shm = found
            return
        if found == self._shm:
            return
        why = (
            f"the -shm file {self._shm_path} was deleted while the database was in use"
            " (SQLite's index of the -wal file, which every process using it shares): this"
            " process and"
            " those that opened the database since would write over each other's"
            f" transactions. Stop every process that uses {self._path}, then start them"
            " again; never delete the -wal or -shm file of a database in use"
        )
        self._newer = why
        self._keep_from_checkpointing()
        raise StoreCorrupt(why)

    def _wal_gone(self) -> str | None:
        """Why this store must not write any more when the ``-wal`` file is no longer the
        one its connections write (each holds it open): deleted (a clean-up of "stray"
        files, ``rm queue.db-wal``), or replaced. Its connections went on writing to the
        deleted file, which no other process can read: what ``send_email`` acknowledged
        was then kept only by this process's open files, and lost with everything the
        file held before when the process was killed before it closed the store. Else
        None.

        Called at the start of every write transaction (one ``stat``), inside it
        (:meth:`_begin_immediate`): the ``-wal`` file exists while a connection of this
        process has the database open in WAL mode."""
        if self._read_only:
            return None  # its writes are refused by SQLite (mode=ro)
        try:
            found = _side_identity(self._wal_path)
        except OSError:
            return None  # cannot be told: the write decides
        if found is not None and self._wal is None:
            self._wal = found
        if found is not None and found == self._wal:
            return None
        return (
            f"the -wal file {self._wal_path} was deleted (or replaced) while the database"
            " was in use (it holds the transactions not written into the database yet):"
            f" this process writes nothing more to {self._path}. Stop every process that"
            " uses it, then start them again; never delete the -wal or -shm file of a"
            " database in use"
        )

    def _write_back_wal(self, conn: sqlite3.Connection) -> None:
        """Write what the deleted ``-wal`` file holds (this process still has it open)
        into the database at once: the transactions it holds, acknowledged already, are
        no longer lost with this process. Once all of them are, nothing of this process
        writes the database again (:meth:`_keep_from_checkpointing`): its stale file
        would go over the transactions of a process that opened the database since.
        Else (another process reads an older snapshot) the rest is written when the
        store is closed, as before."""
        try:
            busy, frames, written = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.error("cannot write the deleted -wal file of %s back: %s", self._path, exc)
            return
        if busy == 0 and frames == written:
            self._keep_from_checkpointing()

    def _keep_from_checkpointing(self) -> None:
        """Keep this process from writing the WAL into the database by its stale index
        when its connections close (SQLite's checkpoint on close): that wrote older
        copies of pages over the transactions of the processes using the new ``-shm``.
        A connection held in a read transaction keeps the shared lock on the database
        file that the checkpoint on close must find free; it is never closed (not even
        by the interpreter's exit, which closed it last and checkpointed), so the WAL
        stays for the next process to open it, which reads it whole."""
        if self._held_back:
            return
        try:
            guard = self._connect()
            guard.execute("BEGIN")
            guard.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            log.error("cannot hold back the checkpoint of %s: %s", self._path, exc)
            return
        self._held_back = True
        import ctypes  # here only: a store that is never broken does without it

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(guard))  # never freed, so never closed

    def _schema_moved_on(self, version: int) -> StoreCorrupt:
        """The error of a store whose database a newer mailstrom migrated (``version``),
        remembered: nothing more is read or written with statements for the old schema,
        neither the leases a stopping worker would give back nor its results (they are
        delivered again once their leases expire: never lost, nor mis-recorded)."""
        why = _newer_schema(version, self._path, self._latest, while_open=True)
        self._newer = why
        return StoreCorrupt(why)

    @contextmanager
    def _write(self, *, fsync: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction: in-process lock, then BEGIN IMMEDIATE, COMMIT on success.

        ``fsync=False`` commits without waiting for the disk (``synchronous=NORMAL`` for
        this transaction): what the worker writes (leases, results) survives a crash of
        any process, and becomes power-safe with the next fsync of the WAL (any enqueue,
        or a checkpoint). Losing it to a power failure means a lease that expires again
        or a recipient delivered once more; never a lost message. Enqueues always fsync.
        """
        deadline = time.monotonic() + self._busy_timeout
        with self._exclusive(deadline), self._connection() as conn:
            if not fsync:
                conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._begin_immediate(conn, deadline)
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        # The first failure is the one to report; a connection whose
                        # ROLLBACK failed too is not pooled (_connection).
                        with suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
            finally:
                # Inside a transaction SQLite refuses to change the setting ("Safety
                # level may not be changed"), which hid the failure being raised.
                if not fsync and not conn.in_transaction:
                    conn.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every SELECT inside sees the same snapshot."""
        with self._connection() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def close(self) -> None:
        """Close every idle connection; connections in use close when returned. The lock
        file of a holder that still leases is left, unlocked, so that the next look for
        dead holders gives back what it leased (as the PostgreSQL store's does)."""
        leasing = self._still_leasing()
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        if idle and not self._read_only:
            # The last connection to close checkpoints: not by an index that is stale.
            with suppress(StoreCorrupt):
                self._check_shm()
        for conn in idle:
            conn.close()
        with self._listen_lock:
            listening, self._listening = list(self._listening.values()), {}
        for stop in listening:
            stop()
        self._wakeups.close()
        self._holders.close(leaving=leasing)
        with self._write_lock:
            lock, self._process_lock = self._process_lock, None
        if lock is not None:
            lock.close()

    def _still_leasing(self) -> set[str]:
        """This store's holders under whose tokens pending recipients are leased (a stop
        that ran out of time, a give-back that failed); all of them when that cannot be
        read (the next look finds out). Removing their lock files at close hid them from
        every look: their recipients waited for their leases to expire."""
        held = sorted(self._holders.held)
        if not held or self._closed:
            return set()
        try:
            with self._read() as conn:
                return set(leased_by_holder(conn, held))
        except Exception:
            return set(held)

    def _before_fork(self) -> None:
        """Before this process forks: wait for the statements under way to end (see
        :func:`~mailstrom.stores.forks.hold_when_idle`)."""
        hold_when_idle(self._pool_lock, lambda: self._out > 0 and not self._closed)

    def _after_fork_in_parent(self) -> None:
        self._pool_lock.release()

    def _after_fork(self) -> None:
        """In a process forked from this one: nothing of the parent's connections, locks
        or pending group commit is used here (see :mod:`~mailstrom.stores.forks`)."""
        busy, self._out = self._out, 0
        self._pool_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._group = threading.Condition()
        # Requests of the parent's threads: committed (or not) there, by them.
        self._pending, self._leader, self._gathering, self._seen = [], False, False, {}
        keep(self._idle)
        self._idle = []
        # Callbacks of the parent's workers, whose threads are not here: a worker of this
        # process is reached like any other process's (the wake-up sockets).
        self._watchers, self._cancel_watchers = Watchers(), Watchers()
        # Their stop functions would unbind the parent's sockets: never called here.
        keep(self._listening)
        self._listen_lock, self._listening = threading.Lock(), {}
        self._wakeups.after_fork()
        self._holders.after_fork()
        lock, self._process_lock = self._process_lock, None
        if lock is not None:
            # Its copy would share the parent's flock: taken here while the parent holds
            # it, released under the parent's feet, and held on after the parent's death.
            with suppress(OSError):
                lock.close()
        if busy and not self._closed:
            # Still in use by another thread at the fork (see _before_fork): SQLite's
            # state in this process names locks no connection here will ever release.
            self._closed = True
            self._closed_why = (
                f"this process was forked while another thread of its parent used the"
                f" SQLite store {self._path}: open the store again in this process"
            )
        if not self._closed:
            with suppress(OSError):
                self._process_lock = self._open_lock_file()

    # --- enqueue ----------------------------------------------------------------------

    def enqueue(self, message: PreparedMessage, *, now: datetime, hold: bool = False) -> str:
        """Store ``message`` durably (committed, WAL fsynced) and return its new id."""
        check_storable([message], now=now)
        (mid,) = self._submit(_Enqueue(messages=[message], now=to_us(now), hold=hold))
        return mid

    def enqueue_many(self, messages: Sequence[PreparedMessage], *, now: datetime) -> list[str]:
        """Store several messages in one transaction; ids in the same order."""
        if not messages:
            return []
        check_storable(messages, now=now)
        return self._submit(_Enqueue(messages=messages, now=to_us(now), hold=False))

    def _submit(self, request: _Enqueue) -> list[str]:
        if not self._group_commit:
            with self._write() as conn:
                request.ids.extend(
                    insert_messages(conn, request.messages, now=request.now, hold=request.hold)
                )
        else:
            try:
                with self._group:
                    me, now = threading.get_ident(), time.monotonic()
                    request.deadline = now + self._busy_timeout
                    self._seen[me] = now
                    if self._leader:
                        # Another caller leads: ours goes into its commit or the next one.
                        request.turn = _held_lock()
                        if self._gathering:
                            self._group.notify()  # only the gathering leader waits here
                    else:
                        self._leader = request.led = True
                    self._pending.append(request)  # last: in line only with its turn set
                if request.turn is not None:
                    self._await_turn(request)  # our request is done, or we lead the next
                if not request.done:
                    self._lead(request, me, now)
            except BaseException:
                self._abandon(request)  # a signal's handler raised: the lead is not lost
                raise
            if request.error is not None:
                raise request.error
        if not request.hold:
            self._notify()
        return request.ids

    def _await_turn(self, request: _Enqueue) -> None:
        """Wait until ``request`` is done or its caller leads the next commit, until its
        deadline. Then a request no leader has taken yet leaves the queue with
        StoreLocked; one being committed waits for its leader, who came first and so
        stops waiting for the lock first."""
        assert request.turn is not None
        if request.turn.acquire(timeout=_left(request.deadline)):
            return
        with self._group:
            if request.turn.acquire(blocking=False):
                return  # handed the lead just now (that happens under _group)
            if request in self._pending:
                self._pending.remove(request)
                request.error = _locked(self._path, self._busy_timeout)
                request.done = True
                return
            request.gave_up = True
        request.turn.acquire()

    def _abandon(self, request: _Enqueue) -> None:
        """Its caller leaves before its request is done (a signal's handler raised while
        it waited its turn). A request no leader has taken yet leaves the queue (nothing
        of it is written); one being committed is not handed back to the queue should
        that commit find the database locked; and the lead, if this caller has it but
        has not led with it, goes on to the next in line. Left with the caller, it led
        nobody's commit: every later enqueue of the process waited ``busy_timeout`` for
        its turn and failed with StoreLocked."""
        with self._group:
            if request in self._pending:
                self._pending.remove(request)
            request.gave_up = True
            if request.led and not request.done:
                self._hand_on()

    def _hand_on(self) -> None:
        """Give the lead to the first caller waiting, or leave it free. Called with
        ``self._group`` held, where a caller whose time is up looks (_await_turn)."""
        successor = self._pending[0] if self._pending else None
        if successor is None:
            self._leader = False
        elif not successor.led:  # (not handed it already: by an interrupted _pass_lead)
            assert successor.turn is not None  # it came while another led
            successor.led = True
            successor.turn.release()

    def _lead(self, mine: _Enqueue, me: int, now: float) -> None:
        """Commit everything pending (ours first in line) after a moment for the other
        threads' enqueues; then wake the callers that were carried, and hand the lead to
        the first caller that came too late for this commit."""
        batch: list[_Enqueue] = []
        try:
            with self._group:
                try:
                    self._gather(me, now)
                finally:  # even when interrupted: what is pending now leaves with us
                    batch, self._pending = self._pending, []
            with self._exclusive(mine.deadline):
                self._commit_batch(batch, mine.deadline)
        except StoreLocked as exc:
            self._requeue_or_fail(batch, mine, exc)
        except BaseException as exc:
            for request in batch:
                if not request.done:  # interrupted before the commit: nothing was written
                    request.error = StoreError(f"enqueue not committed: {exc!r}")
                    request.error.__cause__ = exc
                    request.done = True
            if not isinstance(exc, Exception) or _committed([mine]):
                # KeyboardInterrupt and the like reach the caller as they are, and so
                # does what a signal's handler raised once our message was committed:
                # raised a moment later, it would have met enqueue() returning.
                raise
        finally:
            # Both, whatever a signal's handler raises meanwhile: a caller whose request
            # is done but whose turn never comes waits for ever (a program Ctrl-C'd hung
            # at exit, joining its thread), and a lead left with nobody had every later
            # enqueue wait busy_timeout and fail StoreLocked.
            try:
                self._pass_lead()
            finally:
                for request in batch:
                    if request.done and request.turn is not None:
                        request.turn.release()

    def _pass_lead(self) -> None:
        """:meth:`_hand_on` under ``self._group``, done even when a signal's handler
        raises meanwhile (tried again, up to :data:`_HAND_ON_TRIES` times in all); what it
        raised is raised then. Bounded: a fault of ``_hand_on`` itself, raised on every
        try, must reach the caller, not spin for ever under the group's lock."""
        interrupted: BaseException | None = None
        for _ in range(_HAND_ON_TRIES):
            try:
                with self._group:
                    self._hand_on()
                break
            except BaseException as exc:
                interrupted = exc
        if interrupted is not None:
            raise interrupted

    def _requeue_or_fail(self, batch: list[_Enqueue], mine: _Enqueue, exc: StoreLocked) -> None:
        """The lock stayed held until our deadline, nothing written: our request fails, and
        so does every one whose time is up too; the others go back to the head of the
        queue for the next leader, each still bounded by its own deadline."""
        with self._group:
            now = time.monotonic()
            waiting = [r for r in batch if r is not mine and not r.gave_up and r.deadline > now]
            for request in batch:
                if request not in waiting:  # by identity: _Enqueue has eq=False
                    request.error = StoreLocked(str(exc))  # its own: callers raise it in turn
                    request.error.__cause__ = exc.__cause__
                    request.done = True
            self._pending[:0] = waiting

    def _gather(self, me: int, now: float) -> bool:
        """Wait up to ``commit_delay`` for the enqueues of the other threads that have
        been enqueueing lately (PostgreSQL's commit_delay/commit_siblings): one fsync
        then carries them all. Called as the leader, with ``self._group`` held. True when
        it waited; a thread enqueueing alone never does."""
        siblings = 0
        for thread, at in list(self._seen.items()):
            if now - at > _SIBLING_WINDOW:
                if len(self._seen) > 64:
                    del self._seen[thread]  # threads come and go
            elif thread != me:
                siblings += 1
        if not siblings:
            return False
        self._gathering = True
        deadline = now + self._commit_delay
        while len(self._pending) <= siblings and (left := deadline - time.monotonic()) > 0:
            self._group.wait(left)
        self._gathering = False
        return True

    def _commit_batch(self, batch: list[_Enqueue], deadline: float) -> None:
        # Called with the write lock held; every request leaves done, with ids or an error,
        # but for StoreLocked (SQLite's lock held past the deadline, nothing written),
        # which the leader hands on (_requeue_or_fail).
        locked = False
        try:
            self._commit_requests(batch, deadline)
        except StoreLocked:
            locked = True  # not one by one: each would wait for the lock again
            raise
        except Exception as exc:
            if _committed(batch):
                # Raised as the COMMIT returned, by a signal's handler of the application
                # (a SIGALRM timeout): the batch is queued. Taken for a failed commit,
                # each message was inserted again one by one (queued twice), or a batch
                # of one's caller told of a failure with its message queued.
                raise
            if len(batch) == 1:
                batch[0].error = exc
            else:
                # Retry one by one so only the caller whose message fails gets the error.
                for request in batch:
                    try:
                        self._commit_requests([request], deadline)
                    except Exception as single:
                        if _committed([request]):
                            raise  # queued, then a signal's handler raised (as above)
                        request.error = single
        finally:
            if not locked:
                for request in batch:
                    # Neither ids nor an error: interrupted (a signal's handler raised)
                    # before its commit, whether in the shared one or in the one-by-one
                    # retry after it (where it left the others done with nothing).
                    if not request.ids and request.error is None:
                        request.error = StoreError("enqueue interrupted before it was committed")
                    request.done = True

    def _commit_requests(self, batch: list[_Enqueue], deadline: float) -> None:
        with self._connection() as conn:
            self._begin_immediate(conn, deadline)
            committing = False
            try:
                for request in batch:
                    request.ids.clear()
                    request.ids.extend(
                        insert_messages(conn, request.messages, now=request.now, hold=request.hold)
                    )
                committing = True
                conn.execute("COMMIT")
            except BaseException as exc:
                if committing and not conn.in_transaction and not isinstance(exc, sqlite3.Error):
                    # The COMMIT returned, then a signal's handler raised (Ctrl-C during
                    # its fsync: CPython runs the handler as the call returns). The
                    # messages are queued: their callers get their ids, not an error
                    # that a retry answers with a second copy.
                    raise
                if conn.in_transaction:  # as in _write
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                for request in batch:
                    request.ids.clear()  # rolled back: these ids do not exist
                raise

    # --- leasing ----------------------------------------------------------------------

    def lease(
        self,
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        lanes: Sequence[tuple[str, int]] | None = None,
        holder: str | None = None,
        max_bytes: int | None = None,
        busy: Collection[str] = (),
        per_destination: int | None = None,
    ) -> Lease | None:
        """Lease up to ``limit`` due recipients, oldest due first (per lane, highest lane
        first, with ``lanes``), grouped per (message, domain), up to ``max_bytes`` of
        message data; one transaction, walking the due index (a lane's range of it) with
        LIMIT."""
        if row_limit(limit) == 0:
            return None
        self._holders.hold(holder)
        with self._write(fsync=False) as conn:
            self._refuse_newer_schema(conn)
            return _lease_in(
                conn,
                now=now,
                limit=limit,
                lease_for=lease_for,
                lanes=lanes,
                events=self._events,
                holder=holder,
                max_bytes=max_bytes,
                fair=fairness(self._turns, busy, per_destination, limit),
            )

    def record_and_lease(
        self,
        results: Sequence[RecipientResult],
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        lanes: Sequence[tuple[str, int]] | None = None,
        holder: str | None = None,
        max_bytes: int | None = None,
        busy: Collection[str] = (),
        per_destination: int | None = None,
    ) -> tuple[list[RecipientResult], Lease | None]:
        """:meth:`record` and :meth:`lease` in one transaction: one fsync for both."""
        row_limit(limit)  # refused before anything is recorded
        check_result_times(results)
        self._holders.hold(holder)
        recorded: list[RecipientResult] = []
        with self._write(fsync=False) as conn:
            self._refuse_newer_schema(conn)
            recorded = record_rows(conn, results)
            if self._events and recorded:
                sqlite_events.append_events(conn, recorded)
            lease = None
            if limit > 0:
                lease = _lease_in(
                    conn,
                    now=now,
                    limit=limit,
                    lease_for=lease_for,
                    lanes=lanes,
                    events=self._events,
                    holder=holder,
                    max_bytes=max_bytes,
                    fair=fairness(self._turns, busy, per_destination, limit),
                )
        return recorded, lease

    def record(self, results: Sequence[RecipientResult]) -> list[RecipientResult]:
        """Record results of any leases in one transaction: one UPDATE for a whole chunk
        of results, each row found by the id it was leased with and changed only while its
        lease token still matches (nothing is read back first), then one INSERT of their
        history. Returns the results recorded."""
        if not results:
            return []
        check_result_times(results)
        recorded: list[RecipientResult] = []
        with self._write(fsync=False) as conn:
            self._refuse_newer_schema(conn)
            recorded = record_rows(conn, results)
            if self._events and recorded:
                sqlite_events.append_events(conn, recorded)
        return recorded

    def owed_notices(
        self, *, message_ids: Sequence[str] | None = None, limit: int = MAX_OWED_MESSAGES
    ) -> list[OwedNotice]:
        """The marked recipients of messages done for this pass (see :class:`Store`):
        one read, on the partial index of the marks."""
        limit = row_limit(limit)  # a negative one is 0, as everywhere
        with self._read() as conn:
            return sqlite_notices.owed_notices(conn, message_ids, limit)

    def queue_notices(
        self,
        owed: Sequence[OwedNotice],
        notices: Mapping[str, Sequence[PreparedMessage]],
        *,
        now: datetime,
    ) -> list[str]:
        """Clear the marks of ``owed`` and queue the notices of the messages whose marks
        were all still there, in one transaction (committed, WAL fsynced, as
        :meth:`enqueue`)."""
        check_storable([n for listed in notices.values() for n in listed], now=now)
        with self._write() as conn:
            self._refuse_newer_schema(conn)
            gone = sqlite_notices.clear_marks(conn, owed)
            wanted = [n for mid, listed in notices.items() if mid not in gone for n in listed]
            ids = insert_messages(conn, wanted, now=to_us(now), hold=False) if wanted else []
        if ids:
            self._notify()
        return ids

    def extend(self, lease: Lease, *, until: datetime) -> int:
        """Move the expiry of the lease's unrecorded recipients to ``until``; how many,
        those of held messages and suspended destinations left out (see
        :meth:`Store.extend`)."""
        until = kept_time(until, "until")
        with self._write(fsync=False) as conn:
            extended = update_leased(conn, lease, [to_us(until)], "lease_expires_at = ?")
            return extended - held_of_lease(conn, lease) if extended else 0

    def release(self, lease: Lease) -> None:
        """Give back every unrecorded recipient of ``lease``, due at once (they were due
        when leased, so clearing the lease is enough)."""
        with self._write(fsync=False) as conn:
            released = update_leased(conn, lease, [], "lease_token = NULL, lease_expires_at = NULL")
        if released:
            self._notify()

    def release_holder(self, holder: str) -> int:
        """Give back every recipient leased under a token of ``holder``, due at once
        (durable as :meth:`release`: they are due again after a crash anyway)."""
        with self._write(fsync=False) as conn:
            released = release_holder_rows(conn, holder)
        if released:
            self._notify()
        return released

    reap_every = 60.0
    """Seconds between a worker's looks for dead holders: a directory listing a minute."""
    dead_after = None
    """A holder whose process lives holds its lock file: it is never taken for dead."""

    def release_dead_holders(self, alive: str | None = None) -> int:
        """Give back what every lease holder whose process died still leases, due at once
        (:class:`~mailstrom.stores.dead_holders.DeadHolderReaper`): a holder is dead when
        its lock file (``<database>-holders/<holder>.lock``, held by the store that leased
        for it: :mod:`~mailstrom.stores.sqlite_holders`) can be locked. Each dead holder
        is given back in a write transaction of its own, then its file is removed; this
        store's own holders, ``alive`` among them from here on, are never looked at.
        Returns how many recipients."""
        self._holders.hold(alive)  # from its first look on, it shows among the living
        return self._holders.reap(self.release_holder)

    def live_holders(self, *, leases: bool = True) -> list[HolderInfo]:
        """The holders whose lock file is locked, with what the file says of the process
        that made it, and how many recipients each leases (one walk of the pending
        recipients), oldest first (see
        :meth:`~mailstrom.stores.dead_holders.DeadHolderReaper.live_holders`)."""
        live = self._holders.live()
        leased: dict[str, int] = {}
        if leases and live:
            with self._read() as conn:
                leased = leased_by_holder(conn, [holder for holder, _ in live])
        found = [
            HolderInfo(
                holder=holder,
                host=made.host,
                pid=made.pid,
                started_at=made.started_at,
                seen_at=None,
                leased=leased.get(holder, 0),
            )
            for holder, made in live
        ]
        return sorted(found, key=oldest_first)

    # --- administration ---------------------------------------------------------------

    def retry(self, message_id: str, *, now: datetime) -> int:
        """Make the message's pending recipients due at ``now``; returns how many."""
        with self._write() as conn:
            seq = self._seq(conn, message_id)
            changed = conn.execute(
                f"UPDATE recipients SET next_attempt_at = ? WHERE message_seq = ?"
                f" AND {PENDING_SQL}",
                (to_us(now), seq),
            ).rowcount
        if changed:
            self._notify()
        return changed

    def retry_deferred(self, *, now: datetime) -> int:
        """Make every DEFERRED recipient due at ``now``; returns how many."""
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE recipients SET next_attempt_at = ? WHERE state = 'deferred'",
                (to_us(now),),
            ).rowcount
        if changed:
            self._notify()
        return changed

    def cancel(self, message_id: str, *, now: datetime) -> int:
        """Fail the pending recipients (leased ones too) with the reason "cancelled"."""
        with self._write() as conn:
            seq = self._seq(conn, message_id)
            leased = leased_pending(conn, [seq])
            changed = self._cancel_in(conn, [seq], now)
        if leased:
            self._notify_cancelled()
        return changed

    def _cancel_in(self, conn: sqlite3.Connection, seqs: Sequence[int], now: datetime) -> int:
        """Cancel the listed messages' pending recipients in the caller's transaction, with
        an event for each when events are on (a listener's end of them); how many."""
        cancelled = cancel_seqs(conn, seqs, now)
        if self._events and cancelled:
            sqlite_events.append_cancel_events(conn, cancelled)
        return len(cancelled)

    def set_held(self, message_id: str, held: bool) -> None:
        """Hold (never leased) or release a message; a worker that leased it is told."""
        with self._write() as conn:
            seq = self._seq(conn, message_id)
            changed = hold_seqs(conn, [seq], held)
            leased = held and leased_pending(conn, [seq])
        if changed and not held:  # mail waited for this release (not one that finished)
            self._notify()
        if leased:
            self._notify_cancelled()  # it gives back what it has not started

    def purge(self, *, finished_before: datetime) -> int:
        """Delete messages whose recipients all became final before ``finished_before``."""
        return self._purge_in_batches(finished_before, None)

    def _purge_in_batches(self, before: datetime, state: RecipientState | None) -> int:
        """Delete what :meth:`purge` or :meth:`purge_state` deletes, :data:`PURGE_BATCH`
        messages per write transaction: one transaction for a large queue held the write
        lock for many seconds, and every enqueue and worker write waited behind it or
        failed with StoreLocked. Each batch is found without the write lock and checked
        again as it is deleted; between batches the lock is left free long enough for a
        waiter (another process looks every 5 ms at most) to take it."""
        deleted, after = 0, -(2**63)
        while True:
            with self._read() as conn:
                seqs = purgeable_seqs(conn, after, before, state)
            if not seqs:
                return deleted
            with self._write() as conn:
                deleted += purge_seqs(conn, seqs, before, state)
            if len(seqs) < PURGE_BATCH:
                return deleted
            after = seqs[-1]
            time.sleep(_BATCH_PAUSE)

    @staticmethod
    def _seq(conn: sqlite3.Connection, message_id: str) -> int:
        if not comparable(message_id):
            raise UnknownMessage(message_id)
        row = conn.execute("SELECT seq FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise UnknownMessage(message_id)
        return int(row[0])

    # --- reading ----------------------------------------------------------------------

    def status(self, message_id: str) -> MessageStatus:
        """The message's status with every recipient's history."""
        if not comparable(message_id):
            raise UnknownMessage(message_id)
        with self._read() as conn:
            found = read_messages(conn, "m.id = ?", [message_id], 1, history=True, strict=True)
            paused = sqlite_shaping.paused_recipients(conn, message_id, now=datetime.now(UTC))
        if not found:
            raise UnknownMessage(message_id)
        return with_throttles(found[0], paused)

    def query(self, *, now: datetime, where: QueueFilter | None = None) -> list[MessageStatus]:
        """Messages matching ``where``, newest first, without history; walks the
        newest-first index and stops at the limit."""
        where = where or QueueFilter()
        now = aware_utc(now, "now")  # ages are reckoned from it: a naive one has none
        with self._read() as conn:
            # Newest first, in chunks that keep the bound parameters few.
            listed = [
                message
                for chunk in chunks(matching_seqs(conn, now, where))
                for message in read_messages(
                    conn,
                    f"m.seq IN ({qmarks(len(chunk))})",
                    list(chunk),
                    len(chunk),
                    history=False,
                )
            ]
            return self._with_pauses(conn, listed)

    def select_ids(self, *, now: datetime, where: QueueFilter) -> list[str]:
        """The ids :meth:`query` lists for ``where``, in its order, from the indexes and
        the start of each message's row (see
        :func:`~mailstrom.stores.sqlite_operator.matching_seqs`)."""
        return self.select_page(now=now, where=where).ids

    def select_page(
        self,
        *,
        now: datetime,
        where: QueueFilter,
        after: ListingKey | None = None,
        examine: int | None = None,
    ) -> IdPage:
        """The ids :meth:`select_ids` lists for ``where`` after ``after`` on, with where the
        last of them stands (its ``created_at`` as stored, and its row number). With
        ``examine``, a page that is not full ends the walk: this store fills its pages,
        looking at as many messages as it takes (no statement time limit cuts it)."""
        if examine is not None:
            check_examine(examine)
        now = aware_utc(now, "now")
        with self._read() as conn:
            seqs = matching_seqs(conn, now, where, after=after)
            last = place_of(conn, seqs[-1]) if seqs else None
            if examine is not None and len(seqs) < where.limit:
                last = None
            return IdPage(ids=ids_of(conn, seqs), last=last)

    def recent(self, limit: int = 20) -> list[MessageStatus]:
        """The ``limit`` most recently enqueued messages, newest first."""
        with self._read() as conn:
            # A negative limit is none, as in every store (SQLite's LIMIT -1 is no limit).
            listed = read_messages(conn, "1", [], row_limit(limit), history=False)
            return self._with_pauses(conn, listed)

    @staticmethod
    def _with_pauses(conn: sqlite3.Connection, listed: list[MessageStatus]) -> list[MessageStatus]:
        """``listed`` with the destination pauses their status shows (the clock's now, as
        :meth:`status` reads them)."""
        ids = [m.id for m in listed if any(not r.state.is_final for r in m.recipients)]
        paused = sqlite_shaping.paused_in(conn, ids, now=datetime.now(UTC))
        return with_pauses(listed, paused)

    def next_due(self, *, now: datetime) -> datetime | None:
        """When the earliest pending, unheld recipient becomes due (from the due index).
        Recipients without a due time (a row changed by hand) are made due now, and
        those of a timed suspension that has ended are brought back into the due index."""
        with self._connection() as conn:
            ended = any_ended(conn, now)
        if ended:
            with self._write(fsync=False) as conn:
                end_ended(conn, now)
        with self._connection() as conn:
            suspended = active_suspensions(conn, now)
            where = f" AND {SUSPENDED_SQL}" if suspended else ""
            skip: list[object] = [to_us(now)] if suspended else []
            # Each lane's earliest, from the front of its range of the due index. A due
            # time that is text (a hand-made UPDATE; such a row is never leased) is
            # passed over.
            dues: list[int] = []
            undated: list[str] = []
            for lane in pending_lanes(conn):
                due, has_undated = lane_due(conn, lane, where, skip)
                if type(due) is int:
                    dues.append(due)
                if has_undated:
                    undated.append(lane)
        if undated and self._date_undated(undated, now=now):
            return now
        # A timed suspension's end may make its domain's work due.
        return earliest(_due_time(min(dues, default=None)), *(s.until for s in suspended))

    def _date_undated(self, lanes: Sequence[str], *, now: datetime) -> bool:
        """Make the pending recipients of ``lanes`` without a due time due at ``now``
        (:func:`date_undated`, :func:`~mailstrom.stores.row_checks.made_due`)."""

        def update() -> int:
            with self._write(fsync=False) as conn:
                return date_undated(conn, lanes, now=to_us(now))

        return made_due(update, log)

    def compact(self) -> Compaction:
        """Give back the space the file keeps from its largest backlog (see
        :mod:`~mailstrom.stores.sqlite_compact`): checkpoint the WAL, VACUUM, checkpoint
        again. Holds the write lock all the while: other writers (workers, enqueues) wait,
        each for its own busy timeout. The lock is waited for ``busy_timeout`` at most,
        then :class:`StoreLocked` (nothing changed); a disk without room for the copy is a
        StoreError that says so, the store as it was."""
        if self._read_only:
            raise StoreError(f"SQLite store {self._path} is open read-only: nothing compacted")
        deadline = time.monotonic() + self._busy_timeout
        with self._exclusive(deadline), self._connection() as conn:
            # As a write transaction's start checks (_begin_immediate): a VACUUM through a
            # stale index, or into a deleted -wal file, would lose what others committed.
            self._check_shm()
            gone = self._wal_gone()
            if gone is not None:
                self._newer = gone
                raise StoreCorrupt(gone)
            before = bytes_on_disk(self._path)
            conn.execute(f"PRAGMA busy_timeout={min(int(_left(deadline) * 1000), self._busy_ms)}")
            try:
                # The WAL written back and emptied first: VACUUM's copy then fills it
                # from its start, not after what it held.
                checkpoint(conn)
                conn.execute("VACUUM")
                done = checkpoint(conn)
            except sqlite3.Error as exc:
                raise no_room(exc, self._error(exc)) from exc
            finally:
                conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        return Compaction(before=before, after=bytes_on_disk(self._path), checkpointed=done)

    def stats(self) -> QueueStats:
        """Counts of recipients by state and of pending recipients by domain."""
        by_state = dict.fromkeys(RecipientState, 0)
        by_domain: dict[str, int] = {}
        with self._read() as conn:
            for state, domain, n in conn.execute(
                "SELECT state, domain, count(*) FROM recipients GROUP BY state, domain"
            ):
                known = counted_state(state, n, log)
                if known is None:
                    continue
                by_state[known] += n
                if state in ("queued", "deferred"):
                    # Shown (a metric label, a table): octets that are not UTF-8 as U+FFFD,
                    # not as lone surrogates that failed every scrape of the metrics.
                    name = shown_text(domain, "domain") or ""
                    by_domain[name] = by_domain.get(name, 0) + n
            (messages,) = conn.execute("SELECT count(*) FROM messages").fetchone()
            (held,) = conn.execute(HELD_WAITING_SQL).fetchone()
        return QueueStats(
            by_state=by_state, pending_by_domain=by_domain, messages=messages, held=held
        )

    # --- the event outbox -------------------------------------------------------------

    def enable_events(self) -> None:
        """Record results into the outbox too, from now on (same transaction)."""
        self._events = True

    def lease_events(self, *, now: datetime, limit: int, lease_for: timedelta) -> EventBatch | None:
        """Lease up to ``limit`` unacknowledged, unleased events, oldest first."""
        if row_limit(limit) == 0:
            return None
        with self._write(fsync=False) as conn:
            return sqlite_events.lease_event_rows(conn, now=now, limit=limit, lease_for=lease_for)

    def ack_events(self, batch: EventBatch, *, now: datetime) -> int:
        """Mark the batch's events sent (those it still holds). Not fsynced: a power
        failure can make a batch be sent once more, never lost."""
        with self._write(fsync=False) as conn:
            return sqlite_events.ack_event_rows(conn, batch, now=now)

    def release_events(self, batch: EventBatch) -> None:
        """Give the batch's unacknowledged events back at once."""
        with self._write(fsync=False) as conn:
            sqlite_events.release_event_rows(conn, batch)

    def read_events(self, *, after: int = 0, limit: int = 100) -> list[DeliveryEvent]:
        """Events with an id above ``after``, oldest first."""
        with self._read() as conn:
            return sqlite_events.read_event_rows(conn, after=after, limit=limit)

    def last_event_id(self) -> int:
        """The highest event id so far (0 when none)."""
        with self._read() as conn:
            (last,) = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()
        return int(last)

    def unsent_events(self) -> int:
        """How many events are not acknowledged yet (a scan of the events_unsent index)."""
        with self._read() as conn:
            (count,) = conn.execute("SELECT count(*) FROM events WHERE sent_at IS NULL").fetchone()
        return int(count)

    def prune_events(self, *, sent_before: datetime, unsent_before: datetime | None = None) -> int:
        """Delete events acknowledged before ``sent_before`` (and, given ``unsent_before``,
        unacknowledged ones attempted before it)."""
        with self._write(fsync=False) as conn:
            return sqlite_events.prune_event_rows(
                conn, sent_before=sent_before, unsent_before=unsent_before
            )

    # --- remembered broken TLS ----------------------------------------------------------

    def note_tls_broken(self, host: str, *, until: datetime, reason: str, now: datetime) -> None:
        """Remember ``host``'s broken TLS until ``until`` (the later of two is kept)."""
        check_tls_host(host)
        until = kept_time(until, "until")
        with self._write(fsync=False) as conn:
            conn.execute(
                "INSERT INTO tls_broken (host, until, reason, noted_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (host) DO UPDATE SET until = max(until, excluded.until),"
                " reason = excluded.reason, noted_at = excluded.noted_at",
                (host, to_us(until), storable_text(reason), to_us(now)),
            )

    def tls_broken(self, *, now: datetime, limit: int = MAX_TLS_BROKEN) -> dict[str, datetime]:
        """Hosts whose TLS is remembered broken at ``now``; expired entries are dropped."""
        at = to_us(now)
        with self._write(fsync=False) as conn:
            conn.execute("DELETE FROM tls_broken WHERE until <= ?", (at,))
            rows = conn.execute(
                "SELECT host, until FROM tls_broken WHERE until > ? ORDER BY until DESC LIMIT ?",
                (at, row_limit(limit)),  # SQLite's LIMIT -1 is no limit at all
            ).fetchall()
            known = {host: broken_until(host, shown_time(until)) for host, until in rows}
            # An end that is no time (text and numbers past any time sort after every
            # end) would never expire: forgotten (see side_rows.broken_until).
            conn.executemany(
                "DELETE FROM tls_broken WHERE host = ?",
                [(host,) for host, until in known.items() if until is None],
            )
        return {host: until for host, until in known.items() if until is not None}

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when mail is enqueued, retried or released, through this
        object or by another process (a datagram socket in ``<database>-wake/``, see
        :mod:`mailstrom.stores.wakeup`), until the returned function is called or the
        store is closed. StoreError once the store is closed."""
        return self._listen(callback, self._watchers, None)

    def _listen(
        self, callback: Callable[[], None], watchers: Watchers, only: bytes | None
    ) -> Callable[[], None]:
        """``callback`` among ``watchers`` and heard from other processes (``only``: one
        wake-up payload); the function that stops both, which :meth:`close` calls too: a
        listener left running kept its thread and socket, and called a closed store's
        callbacks on every other process's enqueue."""
        with self._listen_lock:
            if self._closed:
                raise StoreError(self._closed_why)
            unwatch = watchers.add(callback)
            try:
                unlisten = self._wakeups.listen(callback, only=only)
            except OSError as exc:
                # Polling still finds the work; say why the wake-ups are missing.
                what = "cancel wake-ups" if only == CANCELLED else "wake-ups"
                log.warning("no %s from other processes for %s: %s", what, self._path, exc)
                unlisten = None
            key = next(self._listen_keys)

            def stop() -> None:
                with self._listen_lock:
                    self._listening.pop(key, None)
                unwatch()
                if unlisten is not None:
                    unlisten()

            self._listening[key] = stop
        return stop

    def _notify(self) -> None:
        """Work may be due: tell watchers here and in other processes (after COMMIT)."""
        self._watchers.notify()
        self._wakeups.notify()

    def watch_cancels(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when leased recipients are cancelled, through this object or
        by another process (a :data:`~mailstrom.stores.wakeup.CANCELLED` datagram), until
        the returned function is called or the store is closed."""
        return self._listen(callback, self._cancel_watchers, CANCELLED)

    def _notify_cancelled(self) -> None:
        """Leased recipients were cancelled: tell watchers here and in other processes."""
        self._cancel_watchers.notify()
        self._wakeups.notify(CANCELLED)

    # --- operator tools (schema version 10) -------------------------------------------

    def resolve_id(self, prefix: str) -> str:
        """The one message id starting with ``prefix`` (a range on the id index)."""
        text = normalize_prefix(prefix)
        with self._read() as conn:
            found = ids_with_prefix(conn, text)
        if text in found:
            return text
        return pick_one(prefix, found)

    def count(self, *, now: datetime, where: QueueFilter, cap: int) -> int:
        """How many messages match ``where``, reading at most ``cap``."""
        now = aware_utc(now, "now")  # ages are reckoned from it: a naive one has none
        cap = row_limit(cap, "cap")  # past a bigint: InvalidArgument, not StoreRefusedData
        with self._read() as conn:
            return count_matching(conn, now, where, cap)

    def _in_batches(
        self, message_ids: Sequence[str], change: Callable[[sqlite3.Connection, list[int]], None]
    ) -> None:
        """Call ``change`` with the row numbers of the listed messages that exist,
        :data:`BULK_BATCH` listed ids (each once) per write transaction, leaving the lock
        free for :data:`_BATCH_PAUSE` between two: an enqueue or a worker's write waits
        for one batch, not for the whole list (as :meth:`_purge_in_batches`). Each
        message is changed whole in one transaction; a failure leaves the batches
        before it changed, and the same call again changes the rest."""
        unique = listed_ids(message_ids)
        for start in range(0, len(unique), BULK_BATCH):
            if start:
                time.sleep(_BATCH_PAUSE)
            with self._write() as conn:
                change(conn, seqs_of(conn, unique[start : start + BULK_BATCH]))

    def retry_many(self, message_ids: Sequence[str], *, now: datetime) -> int:
        """Make the listed messages' pending recipients due at ``now`` (in batches:
        :meth:`_in_batches`)."""
        changed = 0

        def batch(conn: sqlite3.Connection, seqs: list[int]) -> None:
            nonlocal changed
            changed += retry_seqs(conn, seqs, now)

        try:
            self._in_batches(message_ids, batch)
        finally:
            if changed:
                self._notify()
        return changed

    def cancel_many(self, message_ids: Sequence[str], *, now: datetime) -> int:
        """Fail the listed messages' pending recipients as "cancelled" (in batches:
        :meth:`_in_batches`)."""
        changed, leased = 0, False

        def batch(conn: sqlite3.Connection, seqs: list[int]) -> None:
            nonlocal changed, leased
            leased = leased_pending(conn, seqs) or leased
            changed += self._cancel_in(conn, seqs, now)

        try:
            self._in_batches(message_ids, batch)
        finally:
            if leased:
                self._notify_cancelled()
        return changed

    def hold_many(self, message_ids: Sequence[str], held: bool) -> int:
        """Hold or release the listed messages (in batches: :meth:`_in_batches`);
        returns how many changed."""
        changed, leased = 0, False

        def batch(conn: sqlite3.Connection, seqs: list[int]) -> None:
            nonlocal changed, leased
            now_changed = hold_seqs(conn, seqs, held)
            changed += now_changed
            leased = leased or (held and now_changed > 0 and leased_pending(conn, seqs))

        try:
            self._in_batches(message_ids, batch)
        finally:
            if changed and not held:
                self._notify()
            if leased:
                self._notify_cancelled()  # a worker gives back what it has not started
        return changed

    def purge_many(
        self,
        message_ids: Sequence[str],
        *,
        finished_before: datetime | None = None,
        state: RecipientState | None = None,
    ) -> int:
        """Delete the listed messages that are final (finished before the cutoff, in
        ``state``), in batches (:meth:`_in_batches`)."""
        deleted = 0

        def batch(conn: sqlite3.Connection, seqs: list[int]) -> None:
            nonlocal deleted
            deleted += purge_seqs(conn, seqs, finished_before, state)

        self._in_batches(message_ids, batch)
        return deleted

    def purge_state(self, *, finished_before: datetime, state: RecipientState) -> int:
        """Delete finished messages in ``state`` finished before the cutoff."""
        return self._purge_in_batches(finished_before, state)

    def shape(self, *, now: datetime, edges: Sequence[timedelta]) -> list[ShapeRow]:
        """Pending recipients per domain and message age (see
        :func:`~mailstrom.stores.sqlite_operator.shape_rows_sql`)."""
        now = aware_utc(now, "now")
        edges = age_edges(edges)
        with self._read() as conn:
            return shape_rows_sql(conn, now, edges)

    def message_data(self, message_id: str) -> bytes:
        """The message as stored."""
        if not comparable(message_id):
            raise UnknownMessage(message_id)
        with self._read() as conn:
            row = conn.execute(
                "SELECT d.data FROM messages m LEFT JOIN message_data d ON d.seq = m.seq"
                " WHERE m.id = ?",
                (message_id,),
            ).fetchone()
        if row is None:
            raise UnknownMessage(message_id)
        return stored_octets(row[0])

    def suspend(self, domain: str, *, now: datetime, until: datetime | None = None) -> None:
        """Stop delivery to ``domain`` until ``until`` or resume; a worker that leased
        some of its recipients is told, as of a cancel."""
        until = check_suspension(domain, now, until)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO suspensions (domain, suspended_at, until) VALUES (?, ?, ?)"
                " ON CONFLICT (domain) DO UPDATE SET suspended_at = excluded.suspended_at,"
                " until = excluded.until",
                (domain, to_us(now), opt_us(until)),
            )
            leased = set_aside(conn, domain, True)
        if leased:
            self._notify_cancelled()  # it gives back what it has not started

    def resume(self, domain: str, *, now: datetime) -> bool:
        """End the suspension of ``domain``; False when none was in force at ``now``;
        wakes workers."""
        if not comparable(domain):
            return False
        with self._write() as conn:
            found = is_suspended(conn, domain, now)
            conn.execute("DELETE FROM suspensions WHERE domain = ?", (domain,))
            set_aside(conn, domain, False)
        if found:
            self._notify()
        return found

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        """The suspensions in force at ``now``, by domain."""
        with self._read() as conn:
            return active_suspensions(conn, now)

    # --- traffic shaping --------------------------------------------------------------

    def throttle(
        self,
        destination: str,
        *,
        now: datetime,
        reply: str,
        first: timedelta,
        maximum: timedelta,
        recipients: Sequence[tuple[str, str]] = (),
    ) -> DestinationThrottle:
        """Pause ``destination`` (see :class:`Store`); one write transaction."""
        now = check_pause_times(destination, now, first, maximum)
        reply = pause_reply(reply)
        recipients = named_recipients(recipients)
        with self._write(fsync=False) as conn:
            sqlite_shaping.mark(conn, recipients, destination)
            return sqlite_shaping.throttle(
                conn, destination, now=now, reply=reply, first=first, maximum=maximum
            )

    def throttles(self, *, now: datetime) -> list[DestinationThrottle]:
        """The destinations paused at ``now``, soonest end first."""
        with self._read() as conn:
            return sqlite_shaping.throttles(conn, now=now)

    def postpone(
        self, items: Sequence[WorkItem], *, until: datetime, destination: str | None = None
    ) -> int:
        """Give back the items' still-held recipients, due at ``until``, no attempt counted."""
        if not items:
            return 0
        until = kept_time(until, "until")
        check_destination(destination)
        with self._write(fsync=False) as conn:
            return sqlite_shaping.postpone(conn, items, until=until, destination=destination)

    def take_tokens(
        self, buckets: Sequence[TokenBucket], *, want: int, now: datetime
    ) -> TokenGrant:
        """Take up to ``want`` tokens from every bucket at once, shared by every process
        of this database (the write lock serialises them)."""
        # A naive one less a bucket's time was a TypeError; one past the times a store
        # keeps stamped the bucket then, and it never refilled at the real time.
        now = kept_time(now, "now")
        with self._write(fsync=False) as conn:
            return sqlite_shaping.take(conn, buckets, want=want, now=now)

    # --- MTA-STS policies and TLS session counters (schema version 9) -------------------
    # sqlite_tls (and the MTA-STS and TLS-RPT types it builds) is imported by each method:
    # a worker without those features never loads it.

    def mta_sts_policy(self, domain: str) -> CachedPolicy | None:
        """The cached MTA-STS policy of ``domain`` (expired or not), or None."""
        from mailstrom.stores import sqlite_tls

        if not comparable(domain):
            return None
        with self._read() as conn:
            return sqlite_tls.read_policy(conn, domain)

    def save_mta_sts_policy(self, cached: CachedPolicy) -> None:
        """Cache ``cached`` for its domain, replacing what was there (not fsynced: a
        policy lost to a power failure is fetched again)."""
        from mailstrom.stores import sqlite_tls

        with self._write(fsync=False) as conn:
            sqlite_tls.write_policy(conn, cached)

    def prune_mta_sts_policies(self, *, expired_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` policies expired at or before ``expired_before`` in one
        write (not fsynced: a policy back after a crash is pruned again); how many. A read
        on the index first, as for suppressions: with nothing expired, no write."""
        cutoff = to_us(aware_utc(expired_before, "expired_before"))
        limit = row_limit(limit)
        with self._read() as conn:
            if not any_expired_policy(conn, cutoff):
                return 0
        with self._write(fsync=False) as conn:
            return prune_policies(conn, cutoff, limit)

    def add_tls_sessions(self, sessions: Sequence[TLSSessions]) -> None:
        """Add ``sessions`` to the day's counters, in one transaction."""
        if not sessions:
            return
        from mailstrom.stores import sqlite_tls

        with self._write(fsync=False) as conn:
            sqlite_tls.add_sessions(conn, sessions)

    def tls_sessions(self, day: date) -> list[TLSSessions]:
        """Every counter of ``day``."""
        from mailstrom.stores import sqlite_tls

        with self._read() as conn:
            return sqlite_tls.read_sessions(conn, day)

    def prune_tls_sessions(self, *, before: date) -> int:
        """Delete the counters of days before ``before``; returns how many."""
        from mailstrom.stores import sqlite_tls

        with self._write(fsync=False) as conn:
            return sqlite_tls.prune_sessions(conn, before)

    def claim_tls_report(self, key: str, *, now: datetime, until: datetime) -> bool:
        """Take ``key`` until ``until`` unless another run holds it past ``now`` (schema
        version 17; fsynced: a claim lost to a power failure posts a report twice)."""
        from mailstrom.stores import sqlite_tls

        check_report_key(key)
        now, until = aware_utc(now, "now"), kept_time(until, "until")
        with self._write() as conn:
            return sqlite_tls.claim_report(conn, key, to_us(now), to_us(until))

    def hold_tls_report(self, key: str, *, until: datetime) -> None:
        """Hold ``key`` until ``until`` (fsynced, as a claim)."""
        from mailstrom.stores import sqlite_tls

        check_report_key(key)
        until = kept_time(until, "until")
        with self._write() as conn:
            sqlite_tls.hold_report(conn, key, to_us(until))

    # --- the suppression list -----------------------------------------------------------

    def suppress(self, entries: Sequence[Suppression], *, keep_longer: bool = False) -> int:
        """Add or replace entries in one transaction (fsynced: an operator's or a
        bounce's entry must not vanish; with ``keep_longer``, not over one that lasts as
        long: see Store.suppress); returns how many were given."""
        if not entries:
            return 0
        check_suppressions(entries)
        with self._write() as conn:
            return sqlite_suppressions.insert_suppressions(conn, entries, keep_longer=keep_longer)

    def unsuppress(self, targets: Sequence[str]) -> int:
        """Remove the entries of ``targets``; returns how many existed."""
        targets = [t for t in targets if comparable(t)]
        if not targets:
            return 0
        with self._write() as conn:
            return sqlite_suppressions.delete_suppressions(conn, targets)

    def suppressions_for(self, targets: Sequence[str], *, now: datetime) -> dict[str, Suppression]:
        """The entries of ``targets`` that apply at ``now`` (primary-key lookups)."""
        targets = [t for t in targets if comparable(t)]
        if not targets:
            return {}
        with self._read() as conn:
            return sqlite_suppressions.find_suppressions(conn, targets, now=now)

    def list_suppressions(
        self, *, now: datetime | None = None, after: str = "", limit: int = 100
    ) -> list[Suppression]:
        """Entries after ``after`` in target order (only active ones with ``now``)."""
        check_key(after, "after", limit=MAX_TARGET)
        with self._read() as conn:
            return sqlite_suppressions.page_suppressions(conn, now=now, after=after, limit=limit)

    def prune_suppressions(self, *, expired_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` entries expired at or before ``expired_before`` in one
        write (not fsynced, as pruning events: an entry back after a crash applies to
        nobody); returns how many. A read on the index first: with nothing to delete, the
        usual case, no write waits for the lock or takes it from others. ``limit`` is
        checked before it, so that it is refused whether or not anything has expired."""
        limit = row_limit(limit)
        with self._read() as conn:
            if not sqlite_suppressions.any_expired(conn, expired_before=expired_before):
                return 0
        with self._write(fsync=False) as conn:
            return sqlite_suppressions.prune_expired(
                conn, expired_before=expired_before, limit=limit
            )

    def fail_late(self, message_id: str, address: str, attempt: Attempt) -> bool:
        """Mark a recipient FAILED after the fact (see Store.fail_late); one transaction.
        A time outside kept_time is refused first: written, its history row could not be
        read again (the message's status raised UnreadableRow)."""
        kept_time(attempt.at, "attempt.at")
        with self._write() as conn:
            seq = self._seq(conn, message_id)
            if not comparable(address):
                return False
            rid = sqlite_suppressions.fail_recipient(conn, seq, address, attempt)
            if rid is not None and self._events:
                sqlite_events.append_events(conn, [_late_result(message_id, address, attempt, rid)])
        return rid is not None

    def verp_key(self) -> bytes:
        """The store's VERP key (see Store.verp_key), made on first use; kept once read,
        since it never changes."""
        if self._verp_key is None:
            with self._read() as conn:
                key = sqlite_suppressions.read_verp_key(conn)
            if key is None:
                with self._write() as conn:
                    key = sqlite_suppressions.make_verp_key(conn)
            self._verp_key = key
        return self._verp_key

    def recipients_by_address(
        self, message_id: str, addresses: Sequence[str] | None
    ) -> RecipientsFound:
        """The recipients of ``message_id`` named by ``addresses`` (see
        Store.recipients_by_address), without history; one read transaction."""
        with self._read() as conn:
            return sqlite_suppressions.recipients_by_address(conn, message_id, addresses)

    def message_ids_for_header(self, header_message_id: str, *, limit: int = 10) -> list[str]:
        """Ids of the messages with this Message-ID header, newest first (indexed)."""
        if not comparable(header_message_id):
            return []
        with self._read() as conn:
            return [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM messages WHERE header_message_id = ?"
                    " ORDER BY created_at DESC, seq DESC LIMIT ?",
                    (header_message_id, row_limit(limit)),
                )
            ]


def _lease_in(
    conn: sqlite3.Connection,
    *,
    now: datetime,
    limit: int,
    lease_for: timedelta,
    lanes: Sequence[tuple[str, int]] | None,
    events: bool,
    holder: str | None = None,
    max_bytes: int | None = None,
    fair: Fairness | None = None,
) -> Lease | None:
    """Lease inside the caller's write transaction: suspended destinations skipped, and
    the suppression entries of what was leased read in the same snapshot (one store
    call per lease, not two). With ``events``, the outbox events of the recipients the
    lease set aside (:attr:`Lease.failed`), in the same transaction."""
    lease = lease_rows(
        conn,
        now=now,
        limit=limit,
        lease_for=lease_for,
        lanes=lanes,
        skip_suspended=suspensions_at_lease(conn, now),
        holder=holder,
        max_bytes=max_bytes,
        fair=fair,
    )
    if lease is None:
        return None
    if events and lease.failed:
        sqlite_events.append_events(conn, lease.failed)
    return sqlite_suppressions.with_suppressions(conn, lease, now=now)


def _due_time(us: int | None) -> datetime | None:
    """The due time ``us``; None for none, or for one past any time (never due)."""
    try:
        return opt_time_at(us, "next_attempt_at")
    except UnreadableRow:
        return None


def _late_result(message_id: str, address: str, attempt: Attempt, rid: int) -> RecipientResult:
    """A result standing for a late failure, for the event outbox (which reads the row)."""
    return RecipientResult(
        message_id=message_id,
        address=address,
        state=RecipientState.FAILED,
        attempt=attempt,
        lease_token="",
        ref=rid,
    )

"""How the SQLite store lays out its data: the versioned schema and value encodings.

Migrations live in ``stores/sql/sqlite/NNNN_name.sql`` (package data, read through
importlib.resources) and are applied in order on open; ``PRAGMA user_version`` records the
last one applied. Times are integer microseconds since the Unix epoch, so they round-trip
exactly; the API uses aware UTC datetimes.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from mailstrom.arguments import shown
from mailstrom.bounds import EARLIEST_TIME, LATEST_TIME
from mailstrom.errors import (
    InvalidArgument,
    StoreCorrupt,
    StoreError,
    UnreadableRow,
    newer_schema_advice,
)
from mailstrom.status import (
    Attempt,
    AttemptOutcome,
    RecipientState,
    RecipientStatus,
    SMTPReply,
)
from mailstrom.stores.base import reason_class_of
from mailstrom.stores.row_checks import shown_text

decode_text = functools.partial(str, encoding="utf-8", errors="surrogateescape")
"""How every SQLite connection of mailstrom reads TEXT (its ``text_factory``): UTF-8, and
an octet that is not (a value written by another tool or version, bit rot) as a lone
surrogate, as ``os.fsdecode`` keeps it. The default decoder raised for one such value and
failed the whole statement: one bad row stopped every lease, listing and view of its
table. Nothing mailstrom writes holds a lone surrogate (the driver refuses to bind one),
so a row holding one is known for unreadable (:func:`~mailstrom.stores.row_checks.checked_text`)
and written back as it is it is refused, never stored changed."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def to_us(when: datetime) -> int:
    """Microseconds since the epoch; exact (no float rounding)."""
    if when.tzinfo is None:
        raise InvalidArgument(
            f"naive datetime {when!r}: mailstrom needs timezone-aware times", argument="time"
        )
    return (when - _EPOCH) // _US


def from_us(us: int) -> datetime:
    """The aware UTC datetime ``us`` microseconds after the epoch."""
    return _EPOCH + timedelta(microseconds=us)


READABLE_FROM = to_us(EARLIEST_TIME)
READABLE_UNTIL = to_us(LATEST_TIME)
"""The times a queue row is read back with (:data:`mailstrom.bounds.LATEST_TIME`)."""


def time_at(us: object, column: str) -> datetime:
    """:func:`from_us` of a time read back from a queue row (see
    :mod:`mailstrom.stores.row_checks`); UnreadableRow for what is no such time."""
    if type(us) is not int or not READABLE_FROM <= us < READABLE_UNTIL:
        raise UnreadableRow(f"{column} is {shown(us)}, not a time in microseconds")
    return _EPOCH + timedelta(microseconds=us)


def opt_time_at(us: object, column: str) -> datetime | None:
    """:func:`time_at`, passing None through."""
    return None if us is None else time_at(us, column)


def shown_time(us: object) -> datetime | None:
    """A time an operator's view shows: :func:`time_at`, or None (unknown) for a value that
    is no such time (a row changed by hand), so that one row does not fail the whole view."""
    try:
        return time_at(us, "")
    except UnreadableRow:
        return None


def opt_dt(us: int | None) -> datetime | None:
    """:func:`from_us`, passing None through."""
    return None if us is None else from_us(us)


def opt_us(when: datetime | None) -> int | None:
    """:func:`to_us`, passing None through."""
    return None if when is None else to_us(when)


def reply_from(code: object, enhanced: str | None, text: str | None) -> SMTPReply | None:
    """The reply stored in three columns, or None when there was none, or when its code
    is no number (a row changed by hand: a text, a blob), which is only shown and would
    be shown as the code (a lone surrogate of one not UTF-8 failed every page)."""
    if type(code) is not int:
        return None
    return SMTPReply(code=code, enhanced=enhanced, text=text or "")


# --- migrations --------------------------------------------------------------------------------

_MIGRATION_NAME = re.compile(r"^(\d{4})_[\w-]+\.sql$")


def migrations() -> list[tuple[int, str]]:
    """The packaged migrations as (version, SQL text), in order."""
    folder = resources.files("mailstrom.stores").joinpath("sql", "sqlite")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    return sorted(found)


def _statements(script: str) -> Iterator[str]:
    # executescript() would COMMIT our transaction first, so run the statements one by one;
    # complete_statement() knows where one ends (semicolons in comments, triggers...).
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if buffer.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()
    ):
        raise StoreError(f"incomplete SQL statement in migration: {buffer[:80]!r}")


@functools.cache
def latest_version() -> int:
    """The schema version this mailstrom's migrations bring a database to (read once: each
    open asks, and reading the packaged files is not free)."""
    available = migrations()
    return available[-1][0] if available else 0


_FIRST_TABLE_NAMES = ("messages", "recipients", "attempts")
"""The tables of the first migration, which no later one drops or renames."""
_FIRST_TABLES = (
    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN"
    f" ({', '.join(repr(name) for name in _FIRST_TABLE_NAMES)})"
)


def schema_version(conn: sqlite3.Connection, path: str) -> int:
    """The schema version of the database on ``conn`` (which must be outside a
    transaction); StoreCorrupt when it is another program's database.

    A mailstrom database never holds anything at version 0: each migration commits its
    tables with its version. So a file at version 0 that holds tables, indexes or views
    is another program's (a store URL naming an application's own SQLite file):
    migrating it would add mailstrom's tables to it and make it WAL. At any other version
    it holds the tables of the first migration: many programs number their own schema
    with ``user_version`` too, and such a file was made WAL and then failed to migrate
    ("no such table"), or opened at mailstrom's own number as a queue whose every call
    failed. Both are read in one snapshot, so a new file another process migrates
    meanwhile is not taken for one.
    """
    conn.execute("BEGIN")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == 0:
            foreign = conn.execute("SELECT 1 FROM sqlite_master").fetchone() is not None
        elif version <= latest_version():  # a newer mailstrom's tables are its own affair
            (ours,) = conn.execute(_FIRST_TABLES).fetchone()
            foreign = ours != len(_FIRST_TABLE_NAMES)
        else:
            foreign = False
    except BaseException:
        # The failure is what the caller must see (a -shm that cannot be made, say), not
        # a COMMIT of a transaction SQLite may have rolled back already.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    if foreign:
        raise StoreCorrupt(
            f"{path} holds another program's tables and no mailstrom schema version:"
            " not a mailstrom database"
            if version == 0
            else f"{path} is at schema version {version} but lacks mailstrom's tables"
            " (another program's own version number): not a mailstrom database"
        )
    return int(version)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date under a write lock; returns the resulting version.

    Several processes may open the same new file at once: the version is read again after
    ``BEGIN IMMEDIATE``, so only the first applies each migration.
    """
    available = migrations()
    latest = available[-1][0] if available else 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > latest:
            # Another process migrated past us since the caller read the version (a newer
            # mailstrom starting beside this one): as permanent as when read at open.
            (_, _, path) = conn.execute("PRAGMA database_list").fetchone()
            raise StoreCorrupt(
                f"{path}: database schema version {version} is newer than this mailstrom "
                f"understands ({latest}){newer_schema_advice()}"
            )
        for number, script in available:
            if number > version:
                for statement in _statements(script):
                    conn.execute(statement)
                # PRAGMA takes no bound parameters; number is an int from a file name.
                conn.execute(f"PRAGMA user_version = {number:d}")
                version = number
        conn.execute("COMMIT")
    except BaseException:
        # The failure is what the caller must see: a COMMIT that found no room for the
        # WAL was rolled back by SQLite already, and the ROLLBACK's "no transaction is
        # active" hid the full disk.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return int(version)


# --- rows ---------------------------------------------------------------------------------


def attempt_from_row(row: Any) -> Attempt:
    """An attempt from (recipient_id, at, outcome, duration, mx_host, ip, port,
    tls_version, tls_cipher, reply_code, reply_enhanced, reply_text, error, uncertain,
    reason_class[, tls_policy])."""
    (_, at, outcome, duration, mx_host, ip, port, tls_version, tls_cipher) = row[:9]
    code, enhanced, text, error, uncertain, reason_class = row[9:15]
    tls_policy = row[15] if len(row) > 15 else None
    return Attempt(
        at=time_at(at, "attempts.at"),
        outcome=AttemptOutcome(outcome),
        duration=_seconds(duration),
        # Only shown, and a blob there (SQLite keeps one in a TEXT column as it is, from
        # another tool) failed the history's printout: see row_checks.shown_text.
        mx_host=shown_text(mx_host, "attempts.mx_host"),
        ip=shown_text(ip, "attempts.ip"),
        port=port,
        tls_version=shown_text(tls_version, "attempts.tls_version"),
        tls_cipher=shown_text(tls_cipher, "attempts.tls_cipher"),
        reply=reply_from(code, shown_text(enhanced, "reply_enhanced"), shown_text(text, "reply")),
        error=shown_text(error, "error"),
        uncertain=bool(uncertain),
        reason_class=reason_class_of(reason_class),
        tls_policy=shown_text(tls_policy, "attempts.tls_policy"),
    )


def _seconds(value: object) -> float:
    """An attempt's duration read back: UnreadableRow for what is no number (a text, a
    blob put there by hand), which a printout formatting it as seconds failed on, an
    internal error instead of the row named."""
    if type(value) is not float and type(value) is not int:
        raise UnreadableRow(f"attempts.duration is {shown(value)}, not a number of seconds")
    return float(value)


def recipient_from_row(row: Any, history: tuple[Attempt, ...]) -> RecipientStatus:
    """A recipient status from (message_seq, id, address, state, attempts, reply_code,
    reply_enhanced, reply_text, error, mx_host, ip, tls, uncertain, first_attempt_at,
    last_attempt_at, next_attempt_at, reason_class[, finished_at[, leased]])."""
    return RecipientStatus(
        # Shown too: an address that is not UTF-8 is set aside when leased, not sent, but
        # its status still lists it (a lone surrogate failed the dashboard's queue page).
        address=shown_text(row[2], "address") or "",
        state=RecipientState(row[3]),
        attempts=row[4],
        # Replies and errors are only shown: see row_checks.shown_text.
        reply=reply_from(row[5], shown_text(row[6], "reply_enhanced"), shown_text(row[7], "reply")),
        error=shown_text(row[8], "error"),
        mx_host=shown_text(row[9], "mx_host"),
        ip=shown_text(row[10], "ip"),
        tls=bool(row[11]),
        uncertain=bool(row[12]),
        reason_class=reason_class_of(row[16]),
        first_attempt_at=opt_time_at(row[13], "first_attempt_at"),
        last_attempt_at=opt_time_at(row[14], "last_attempt_at"),
        next_attempt_at=opt_time_at(row[15], "next_attempt_at"),
        finished_at=opt_time_at(row[17], "finished_at") if len(row) > 17 else None,
        history=history,
        leased=bool(row[18]) if len(row) > 18 else False,
    )

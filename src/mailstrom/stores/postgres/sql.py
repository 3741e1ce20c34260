"""The SQL text of the PostgreSQL store, kept in ``stores/sql/postgres/*.sql``.

Migrations are the files named ``NNNN_name.sql`` (applied in order of ``NNNN``); every
query is a ``-- name: <name>`` section of ``queries.sql``. A line ``-- include: <name>``
stands for that section's text: a part several queries share (named with a leading
underscore, not a query of its own).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any

import psycopg
from psycopg_pool import PoolClosed

from mailstrom.errors import (
    StoreAccessDenied,
    StoreError,
    StoreLocked,
    StoreRefusedData,
    StoreUnreachable,
)
from mailstrom.stores.postgres.locks import LockWait, lock_wait_message

_MIGRATION_NAME = re.compile(r"^(\d{4})_[\w-]+\.sql$")
_QUERY_MARKER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_INCLUDE_MARKER = re.compile(r"^-- include: (\w+)[ \t]*$", re.MULTILINE)

CHANNEL = "mailstrom_work"
"""The NOTIFY channel on which work that may have become due is announced, for a queue in
the schema ``public``; one in another schema has a channel of its own (:func:`channel_of`)."""
CANCELLED = "cancelled"
"""The payload of a NOTIFY on the work channel that says leased recipients were cancelled."""


def channel_of(conn: psycopg.Connection[Any]) -> str:
    """The NOTIFY channel of the queue ``conn`` sees through its search_path: channels are
    shared by the whole database, so each schema's queue has its own (``_channel`` in
    ``queries.sql``, which the statements that NOTIFY use too)."""
    for (channel,) in conn.execute(queries()["channel"]):
        return str(channel)
    raise psycopg.ProgrammingError("the query of the NOTIFY channel returned no row")


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """One schema migration: it brings the schema to ``version``."""

    version: int
    name: str
    sql: str


def _sql_dir() -> Traversable:
    return files("mailstrom.stores").joinpath("sql", "postgres")


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """Every migration shipped with mailstrom, oldest first."""
    found = []
    for entry in _sql_dir().iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(
                Migration(version=int(match.group(1)), name=entry.name, sql=entry.read_text())
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    # Numbers only grow; a gap is allowed (features developed apart take numbers ahead).
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise StoreError(
            f"PostgreSQL migrations must have distinct numbers from 1; found {versions}"
        )
    return tuple(found)


@functools.cache
def queries() -> dict[str, str]:
    """Every named query of ``queries.sql``."""
    text = _sql_dir().joinpath("queries.sql").read_text()
    parts = _QUERY_MARKER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    sections = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}

    def expanded(body: str) -> str:
        # A fragment may include another (_queue_filter includes _held_filter).
        return _INCLUDE_MARKER.sub(lambda m: expanded(sections[m.group(1)]), body)

    return {name: expanded(body) for name, body in sections.items() if not name.startswith("_")}


_UNREACHABLE_STATES = ("08", "57P01", "57P02", "57P03", "57P05", "25P03", "53300")
"""SQLSTATEs (or their class) of a server that cannot be reached or is going away:
connection exceptions, an administrator's or a crash's shutdown, a server starting up,
a session the server ended for idling (``idle_session_timeout``,
``idle_in_transaction_session_timeout``), too many connections."""


_GRANTS = (
    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO the role, and"
    " USAGE ON ALL SEQUENCES IN SCHEMA public"
)
"""What a role needs on a current schema (docs/guide.md, "PostgreSQL: roles and statistics")."""


def unreachable(exc: psycopg.Error) -> bool:
    """Whether ``exc`` says the server could not be reached or went away mid-call: the
    driver's own errors (no SQLSTATE: refused, lost, timed out, the pool's wait for a
    connection) and the server's :data:`_UNREACHABLE_STATES`. Not a statement the server
    refused (a grant, a lock, a resource), which other clients would meet too."""
    state = exc.sqlstate
    return state is None or state.startswith(_UNREACHABLE_STATES)


@contextmanager
def translate_errors(
    doing: str, *, diagnose: Callable[[], LockWait | None] | None = None
) -> Iterator[None]:
    """Turn driver errors (psycopg and psycopg_pool's, which subclass them) into StoreError:
    StoreRefusedData for a value the server or the driver refused (SQLSTATE classes 22 and
    23, text UTF-8 cannot encode), which trying again as it is cannot mend; StoreLocked
    for a wait for a lock that outlasted ``lock_timeout`` (55P03), saying who holds it
    when ``diagnose`` can tell (see :mod:`~mailstrom.stores.postgres.locks`);
    StoreUnreachable when the server could not be reached or went away
    (:func:`unreachable`); StoreAccessDenied when this role lacks a privilege on the
    tables (42501), which no retry mends until an operator grants it; a plain StoreError
    saying so for a closed store's pool, as the SQLite store says it."""
    try:
        yield
    except psycopg.errors.LockNotAvailable as exc:
        wait = diagnose() if diagnose is not None else None
        raise StoreLocked(lock_wait_message(doing, exc, wait)) from exc
    except psycopg.errors.InsufficientPrivilege as exc:
        # A role granted nothing failed its very first read (schema_version) with a plain
        # StoreError, and a starting worker waited for a grant for ever.
        raise StoreAccessDenied(
            f"PostgreSQL store: {doing} failed: {exc}; this database role lacks a"
            f" privilege on mailstrom's tables ({_GRANTS})"
        ) from exc
    except (psycopg.DataError, psycopg.IntegrityError, UnicodeEncodeError) as exc:
        raise StoreRefusedData(f"PostgreSQL store: {doing} refused a value: {exc}") from exc
    except PoolClosed as exc:
        # Closed by its own close(): no server to wait for (it read as StoreUnreachable, a
        # passing trouble, and a wait looked again for its whole timeout).
        raise StoreError(f"PostgreSQL store: {doing} failed: the store is closed") from exc
    except (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout) as exc:
        # The latter is class 25 (an InternalError to psycopg), though it ends the session.
        kind = StoreUnreachable if unreachable(exc) else StoreError
        raise kind(f"PostgreSQL store: {doing} failed: {exc}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"PostgreSQL store: {doing} failed: {exc}") from exc

"""Schema migrations, applied by mailstrom itself when a store opens.

Every migration runs in one transaction together with the version bump, under a
transaction-level advisory lock, so processes opening the store at the same time apply
each migration exactly once and never see a half-built schema.

A schema that is already current is only read: no lock, no DDL. So a role that may only
read and write the tables (granted SELECT, INSERT, UPDATE, DELETE and the sequences'
USAGE) opens the store once the tables' owner has run ``mailstrom db migrate``. An
upgrade that adds tables grants on each what every role holds on ``messages``, in the
same transaction: the roles the operator granted the tables keep working (a worker's
beats in ``lease_holders`` failed with "permission denied" after the upgrade that added
it), and a role granted nothing on the queue gets nothing.

Each transaction waits for a lock (the migration lock another process holds, a table
another session locked) at most the store URL's ``lock_timeout`` (see
:mod:`~mailstrom.stores.postgres.locks`), then fails with StoreLocked: a migration that
waited in line for a table's ACCESS EXCLUSIVE lock would hold every enqueue and lease
of that table behind it.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from mailstrom.errors import StoreAccessDenied, StoreCorrupt, newer_schema_advice
from mailstrom.stores.postgres.connect import connect, split_url
from mailstrom.stores.postgres.locks import DEFAULT_LOCK_BOUND, LockBound
from mailstrom.stores.postgres.sql import Migration, migrations, translate_errors

log = logging.getLogger("mailstrom.stores.postgres")

# An arbitrary constant naming mailstrom's migration lock (pg_advisory_xact_lock takes a
# bigint); it only has to differ from the application's other advisory locks.
_LOCK_KEY = 0x6D61696C7374726D  # "mailstrm"

_CREATE_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def _bound(conn: psycopg.Connection[Any], lock_bound: LockBound | None) -> None:
    """Bound the lock waits of the transaction just begun on ``conn``."""
    if lock_bound is not None:
        conn.execute(lock_bound.local())


def _applied(conn: psycopg.Connection[Any], lock_bound: LockBound | None) -> set[int] | None:
    """The versions recorded, or None before the first migration."""
    with conn.transaction():
        _bound(conn, lock_bound)
        found = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        if not (found and found[0]):
            return None
        _check_ours(conn)
        return {int(v) for (v,) in conn.execute("SELECT version FROM schema_version")}


_VERSION_COLUMNS = """
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = to_regclass('schema_version') AND attnum > 0 AND NOT attisdropped
"""


def _check_ours(conn: psycopg.Connection[Any]) -> None:
    """StoreCorrupt when the ``schema_version`` table the search_path finds is not
    mailstrom's (Flyway before version 5 keeps its history under that name, its versions
    text): its "1.1" failed the open with a ValueError, and versions "1", "2" were taken
    for mailstrom's, the migrations after them failing for ever in a passing StoreError."""
    columns = dict(conn.execute(_VERSION_COLUMNS).fetchall())
    if columns.get("version") == "integer" and columns.get("name") == "text":
        return
    raise StoreCorrupt(
        "the schema_version table in this database's search_path is another program's"
        f" (its columns: {', '.join(columns) or 'none'}), not mailstrom's: give mailstrom"
        " a schema of its own (CREATE SCHEMA mailstrom, and"
        " ?options=-c%20search_path%3Dmailstrom in the store URL)"
    )


def _check_not_newer(current: int, latest: int) -> None:
    if current > latest:
        # StoreCorrupt as for SQLite: no retry makes this mailstrom understand it.
        raise StoreCorrupt(newer_schema(current, latest))


def newer_schema(current: int, latest: int, *, while_open: bool = False) -> str:
    """Why a store refuses a database whose schema is newer than this mailstrom knows."""
    return (
        f"the database schema is at version {current}, newer than this mailstrom "
        f"knows ({latest}){newer_schema_advice(while_open=while_open)}"
    )


def latest_known() -> int:
    """The schema version this mailstrom's migrations bring a database to."""
    known = migrations()
    return known[-1].version if known else 0


SCHEMA_MISSES = (
    psycopg.errors.UndefinedColumn,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
)
"""What a statement of this mailstrom gets when the schema it was written for changed
under it (a column renamed or dropped by a newer mailstrom's migration)."""

CURRENT_VERSION = "SELECT max(version) FROM schema_version"


def newer_version_behind(exc: BaseException, pool: ConnectionPool, known: int) -> int | None:
    """The schema's version when ``exc`` (a StoreError) is a statement missing a table
    or column (:data:`SCHEMA_MISSES`) because a newer mailstrom migrated the database
    past ``known`` since; None otherwise. Read only on such an error, on a connection of
    ``pool``'s own (the failed one may be in an aborted transaction)."""
    if not isinstance(exc.__cause__, SCHEMA_MISSES):
        return None
    try:
        with pool.connection() as conn:
            row = conn.execute(CURRENT_VERSION.encode()).fetchone()
    except (psycopg.Error, PoolTimeout):
        return None
    version = row[0] if row is not None else None
    return version if isinstance(version, int) and version > known else None


def apply_migrations(
    conn: psycopg.Connection[Any], *, lock_bound: LockBound | None = DEFAULT_LOCK_BOUND
) -> int:
    """Bring the schema on ``conn`` up to date; returns the schema version.

    ``conn`` must not be inside a transaction; the work is committed before returning.
    """
    known = migrations()
    latest = known[-1].version if known else 0
    applied = _applied(conn, lock_bound)
    if applied is not None and all(m.version in applied for m in known):
        current = max(applied, default=0)
        _check_not_newer(current, latest)
        return current
    try:
        return _migrate_locked(conn, known, lock_bound)
    except psycopg.errors.InsufficientPrivilege as exc:
        have = max(applied or (), default=0)
        # Until the owner migrates, this mailstrom cannot use the tables: not worth waiting
        # for, like any other refusal of this role (see StoreAccessDenied).
        raise StoreAccessDenied(
            f"the database schema is at version {have} and needs version {latest}, which "
            f"this database role may not create ({exc.diag.message_primary or exc}): run "
            "`mailstrom db migrate` as the role that owns mailstrom's tables"
        ) from exc
    except (psycopg.errors.DuplicateTable, psycopg.errors.DuplicateObject) as exc:
        # A name a migration creates is taken by another program's table, index or type
        # in the same schema (an application's own "messages"): migrations run under the
        # lock, so it is no other mailstrom's, and no retry makes room for it.
        raise StoreCorrupt(
            f"cannot create mailstrom's tables: {exc.diag.message_primary or exc}, made by"
            " another program (or by hand), not by mailstrom's migrations: give mailstrom a"
            " schema of its own (CREATE SCHEMA mailstrom, and"
            " ?options=-c%20search_path%3Dmailstrom in the store URL)"
        ) from exc
    except psycopg.errors.InvalidSchemaName as exc:
        # No schema of the search_path exists (a typo in the URL's options, one not made
        # yet): as permanent as a database that does not exist, not worth waiting for.
        raise StoreAccessDenied(
            f"no schema to create mailstrom's tables in: none of the search_path"
            f" ({_search_path(conn)}) exists ({exc.diag.message_primary or exc}); CREATE"
            " SCHEMA it, or fix the search_path in the store URL's options"
        ) from exc


def _search_path(conn: psycopg.Connection[Any]) -> str:
    """The session's search_path, for a message; "unknown" when it cannot be read."""
    try:
        row = conn.execute("SHOW search_path").fetchone()
    except psycopg.Error:
        return "unknown"
    return str(row[0]) if row else "unknown"


def _migrate_locked(
    conn: psycopg.Connection[Any], known: tuple[Migration, ...], lock_bound: LockBound | None
) -> int:
    with conn.transaction():
        _bound(conn, lock_bound)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(_CREATE_VERSION_TABLE)
        _check_ours(conn)  # as in _applied: another program may have made it since
        applied = {int(v) for (v,) in conn.execute("SELECT version FROM schema_version")}
        current = max(applied, default=0)
        _check_not_newer(current, known[-1].version if known else 0)
        tables_before = _tables(conn)
        # Every version not yet recorded, in order: one numbered below an applied one (a
        # feature merged after a later-numbered one was deployed) is applied too.
        for migration in known:
            if migration.version in applied:
                continue
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            current = max(current, migration.version)
        if tables_before:
            _grant_as_on_messages(conn, sorted(_tables(conn) - tables_before))
    return current


_TABLES = """
SELECT c.relname FROM pg_class c
 WHERE c.relkind IN ('r', 'p')
   AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = to_regclass('messages'))
"""
_GRANTS_ON_MESSAGES = """
SELECT r.rolname, a.privilege_type, a.is_grantable
  FROM pg_class c
 CROSS JOIN LATERAL aclexplode(c.relacl) a
  LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE c.oid = to_regclass('messages') AND a.grantee <> c.relowner
 ORDER BY 1, 2
"""
_TABLE_PRIVILEGES = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}
)


def _tables(conn: psycopg.Connection[Any]) -> set[str]:
    """The tables beside ``messages`` (none before the first migration)."""
    return {name for (name,) in conn.execute(_TABLES)}


def _grant_as_on_messages(conn: psycopg.Connection[Any], tables: list[str]) -> None:
    """Grant on ``tables`` what each role (PUBLIC too) holds on ``messages``, grant option
    included, so that whoever the operator granted the queue may use what an upgrade
    added; the owner needs none."""
    grants: dict[tuple[str | None, bool], list[str]] = {}
    for role, privilege, grantable in conn.execute(_GRANTS_ON_MESSAGES):
        if privilege in _TABLE_PRIVILEGES:  # a newer server's may need more than a copy
            grants.setdefault((role, bool(grantable)), []).append(privilege)
    for table in tables:
        for (role, grantable), privileges in grants.items():
            conn.execute(
                sql.SQL("GRANT {privileges} ON {table} TO {role}{option}").format(
                    privileges=sql.SQL(", ").join(map(sql.SQL, privileges)),
                    table=sql.Identifier(table),
                    role=sql.SQL("PUBLIC") if role is None else sql.Identifier(role),
                    option=sql.SQL(" WITH GRANT OPTION" if grantable else ""),
                )
            )
            log.info(
                "granted %s on the new table %s to %s, as on messages",
                ", ".join(privileges),
                table,
                role or "PUBLIC",
            )


def migrate(url: str, *, connect_timeout: float = 10.0) -> int:
    """Create or upgrade mailstrom's tables in the database at ``url``; returns the version.

    >>> migrate("postgresql://mail@127.0.0.1/mail")  # doctest: +SKIP
    1
    """
    conninfo, params = split_url(url)
    with (
        translate_errors("migrating the schema"),
        connect(conninfo, connect_timeout=connect_timeout) as conn,
    ):
        return apply_migrations(conn, lock_bound=params.lock_bound)

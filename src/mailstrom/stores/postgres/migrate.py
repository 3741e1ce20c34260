"""Schema migrations, applied by mailstrom itself when a store opens.

Every migration runs in one transaction together with the version bump, under a
transaction-level advisory lock, so processes opening the store at the same time apply
each migration exactly once and never see a half-built schema.
"""

from __future__ import annotations

from typing import Any

import psycopg

from mailstrom.errors import StoreError
from mailstrom.stores.postgres.sql import migrations, translate_errors

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


def apply_migrations(conn: psycopg.Connection[Any]) -> int:
    """Bring the schema on ``conn`` up to date; returns the schema version.

    ``conn`` must not be inside a transaction; the work is committed before returning.
    """
    known = migrations()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(_CREATE_VERSION_TABLE)
        applied = {int(v) for (v,) in conn.execute("SELECT version FROM schema_version")}
        current = max(applied, default=0)
        latest = known[-1].version if known else 0
        if current > latest:
            raise StoreError(
                f"the database schema is at version {current}, newer than this mailstrom "
                f"knows ({latest}); upgrade mailstrom"
            )
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
    return current


def migrate(url: str, *, connect_timeout: float = 10.0) -> int:
    """Create or upgrade mailstrom's tables in the database at ``url``; returns the version.

    >>> migrate("postgresql://mail@127.0.0.1/mail")  # doctest: +SKIP
    1
    """
    with (
        translate_errors("migrating the schema"),
        psycopg.connect(url, connect_timeout=max(1, round(connect_timeout))) as conn,
    ):
        return apply_migrations(conn)

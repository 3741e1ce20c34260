"""Helpers of the PostgreSQL store tests: messages to queue, and what a test needs to see and
steer of PostgreSQL's statistics on the queue's tables."""

from __future__ import annotations

import psycopg

from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores.postgres.sql import migrations

QUEUE_TABLES = ("recipients", "messages")


def without_autovacuum(url: str) -> None:
    """Keep autovacuum off the queue's tables, so that only the store analyses them."""
    with psycopg.connect(url, autocommit=True) as conn:
        for table in QUEUE_TABLES:
            conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")


def analysed(url: str) -> dict[str, bool]:
    """Whether each queue table was analysed by hand (``ANALYZE``, the store's included)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT relname, last_analyze IS NOT NULL FROM pg_stat_user_tables"
            " WHERE relname = ANY(%s)",
            (list(QUEUE_TABLES),),
        ).fetchall()
    return dict(rows)


def small_message(*recipients: str, body: bytes = b"hello") -> PreparedMessage:
    """A prepared message the PostgreSQL store tests queue (no worker sends it)."""
    return PreparedMessage(
        data=b"From: a@example.com\r\nSubject: hi\r\n\r\n" + body + b"\r\n",
        envelope_from="a@example.com",
        recipients=recipients,
        subject="hi",
    )


def schema_at(url: str, version: int) -> None:
    """Make the empty database at ``url`` what the migrations up to ``version`` made it,
    as an older mailstrom left it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in migrations():
            if migration.version <= version:
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )

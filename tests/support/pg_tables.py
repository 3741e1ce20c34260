"""Helpers of the PostgreSQL store tests: messages to queue, and what a test needs to see and
steer of PostgreSQL's statistics on the queue's tables."""

from __future__ import annotations

from datetime import datetime

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


def messages_in_bulk(url: str, count: int, *, at: datetime, delivered: bool = False) -> None:
    """``count`` messages of one recipient each at the migrated database ``url``, written by
    SQL (the store's API takes minutes for a queue this size): queued and due at ``at``,
    or delivered then. Their ids are ``md5`` of 1 to ``count``, their seqs 1 to ``count``."""
    from mailstrom.stores.postgres import migrate

    migrate(url)
    state = "delivered" if delivered else "queued"
    done = at if delivered else None
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO messages (id, data, envelope_from, created_at, size)"
            " SELECT md5(i::text), 'x', 's@example.org', %s, 1"
            " FROM generate_series(1, %s) i",
            (at, count),
        )
        conn.execute(
            "INSERT INTO recipients (message_id, address, seq, position, domain, state,"
            " attempts, next_attempt_at, last_attempt_at, finished_at)"
            " SELECT md5(i::text), 'r@example.org', i, 0, 'example.org', %s, %s, %s, %s, %s"
            " FROM generate_series(1, %s) i",
            (state, int(delivered), None if delivered else at, done, done, count),
        )

"""Pruning expired MTA-STS policies from an SQLite store: plain SQL, apart from
``sqlite_tls`` so that a worker's prune, which runs whether or not MTA-STS is on, loads
none of MTA-STS's modules (tests/unit/test_lean_imports.py). Imported with the store,
not when a prune runs: a worker out of file descriptors could not import it then, and
its pruning task died of the OSError."""

from __future__ import annotations

import sqlite3


def any_expired_policy(conn: sqlite3.Connection, expired_before: int) -> bool:
    """Whether a policy expired at or before ``expired_before`` (microseconds): one probe
    of ``mta_sts_policies_expiry`` (schema version 23)."""
    row = conn.execute(
        "SELECT 1 FROM mta_sts_policies WHERE expires_at <= ? LIMIT 1", (expired_before,)
    ).fetchone()
    return row is not None


PRUNE_POLICIES_SQL = (
    "DELETE FROM mta_sts_policies WHERE domain IN (SELECT domain FROM mta_sts_policies"
    " WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)"
)
"""Policies expired at or before the first parameter (microseconds), soonest first, at
most the second: a range of ``mta_sts_policies_expiry`` (schema version 23). An expiry
that is no number (a damaged row) sorts after every number and stays: the fetch that
follows its unreadable read writes over it."""


def prune_policies(conn: sqlite3.Connection, expired_before: int, limit: int) -> int:
    """Delete what :data:`PRUNE_POLICIES_SQL` finds; how many."""
    return int(conn.execute(PRUNE_POLICIES_SQL, (expired_before, limit)).rowcount)

"""The SQLite store's MTA-STS policy cache and TLS session counters (schema version 9),
and its TLS report claims (version 17)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import date

from mailstrom.mtasts.policy import CachedPolicy
from mailstrom.stores.sqlite_schema import to_us
from mailstrom.stores.tls_rows import (
    policy_from_row,
    policy_params,
    session_from_row,
    session_params,
)
from mailstrom.tlsrpt.sessions import TLSSessions

_SESSION_COLUMNS = (
    "day, policy_domain, policy_type, policy_hash, policy_string, result_type, sending_ip, "
    "receiving_mx, receiving_ip, failure_code, count"
)


def read_policy(conn: sqlite3.Connection, domain: str) -> CachedPolicy | None:
    row = conn.execute(
        "SELECT domain, policy_id, mode, mx, max_age, policy_text, fetched_at, expires_at "
        "FROM mta_sts_policies WHERE domain = ?",
        (domain.lower(),),
    ).fetchone()
    return None if row is None else policy_from_row(row)


def write_policy(conn: sqlite3.Connection, cached: CachedPolicy) -> None:
    conn.execute(
        "INSERT INTO mta_sts_policies (domain, policy_id, mode, mx, max_age, policy_text, "
        "fetched_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (domain) DO UPDATE SET policy_id = excluded.policy_id, "
        "mode = excluded.mode, mx = excluded.mx, max_age = excluded.max_age, "
        "policy_text = excluded.policy_text, fetched_at = excluded.fetched_at, "
        "expires_at = excluded.expires_at",
        (*policy_params(cached), to_us(cached.fetched_at), to_us(cached.expires_at)),
    )


def add_sessions(conn: sqlite3.Connection, sessions: Sequence[TLSSessions]) -> None:
    conn.executemany(
        f"INSERT INTO tls_sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (day, policy_domain, policy_type, policy_hash, result_type, sending_ip, "
        "receiving_mx, receiving_ip, failure_code) DO UPDATE SET count = count + excluded.count",
        [session_params(s) for s in sessions],
    )


def read_sessions(conn: sqlite3.Connection, day: date) -> list[TLSSessions]:
    rows = conn.execute(
        f"SELECT {_SESSION_COLUMNS} FROM tls_sessions WHERE day = ? "
        "ORDER BY policy_domain, result_type, receiving_mx",
        (day.isoformat(),),
    ).fetchall()
    return [sessions for row in rows if (sessions := session_from_row(row)) is not None]


def prune_sessions(conn: sqlite3.Connection, before: date) -> int:
    return conn.execute("DELETE FROM tls_sessions WHERE day < ?", (before.isoformat(),)).rowcount


def claim_report(conn: sqlite3.Connection, key: str, now: int, until: int) -> bool:
    """:meth:`~mailstrom.stores.base.Store.claim_tls_report`, times in microseconds."""
    conn.execute("DELETE FROM tls_report_claims WHERE until_us <= ? AND key <> ?", (now, key))
    taken = conn.execute(
        "INSERT INTO tls_report_claims (key, until_us) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET until_us = excluded.until_us "
        "WHERE tls_report_claims.until_us <= ?",
        (key, until, now),
    ).rowcount
    return taken == 1


def hold_report(conn: sqlite3.Connection, key: str, until: int) -> None:
    conn.execute(
        "INSERT INTO tls_report_claims (key, until_us) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET until_us = excluded.until_us",
        (key, until),
    )

"""A server whose DBA ends idle sessions (``idle_session_timeout``, set for the database,
a role, or by a managed service) must not end the store's LISTEN connection, which is
idle by design between two NOTIFYs: each end cost a warning, a reconnect, a wake-up of
every worker of the store and a check of all their leases, and lost the NOTIFYs sent
while it was down."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest
from psycopg import sql

from mailstrom.stores.postgres import PostgresStore

pytestmark = pytest.mark.postgres

# The setting holds for every session of the database, the store's pool and the first
# statements of its listener too: long enough that a loaded machine's stall between two
# statements does not end those, and a quarter of the idle spell under test, which the
# listener's session outlived only when it turned the setting off.
TIMEOUT_MS = 1000
IDLE_S = 4 * TIMEOUT_MS / 1000


def listening(url: str) -> set[int]:
    """The server processes whose last statement was a LISTEN: the store's listener."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
        ).fetchall()
    return {pid for (pid,) in rows}


def test_the_listen_connection_outlives_the_servers_idle_session_timeout(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    with PostgresStore(postgres_url):  # the schema made before sessions are timed
        pass
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET idle_session_timeout = {}").format(
                sql.Identifier(database), sql.Literal(f"{TIMEOUT_MS}ms")
            )
        )
    calls: list[None] = []
    lock = threading.Lock()

    def woken() -> None:
        with lock:
            calls.append(None)

    caplog.set_level(logging.WARNING, logger="mailstrom")
    with PostgresStore(postgres_url) as store:
        stop = store.watch(woken)
        first = listening(postgres_url)
        time.sleep(IDLE_S)  # the idle spell under test, not synchronisation
        then = listening(postgres_url)
        stop()
    assert len(first) == 1
    assert then == first
    assert calls == []
    assert "LISTEN connection lost" not in caplog.text

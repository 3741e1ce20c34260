"""A newer mailstrom migrates the queue under a running worker of this one (issue #8): the
worker stops leasing and recording with statements written for the old schema, ends as on
a newer schema found at open (StoreCorrupt), and ``worker_status`` says why: on SQLite at
its next lease or record, on PostgreSQL at its next beat or at a statement the new schema
broke. The command's worker: tests/cli/test_store_errors.py."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mailstrom import Mailstrom
from mailstrom.errors import StoreCorrupt
from mailstrom.stores import SQLiteStore
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_worker_modes import _wait_until, config, hello, mx
from tests.support.delivery import Results

__all__ = ["mx"]  # the fixture, found by pytest under this name

NEWER = 9999
"""A schema version no mailstrom knows yet: what a newer one's migration leaves."""


def migrate_to_newer(path: Path) -> None:
    """What a newer mailstrom's migration does to the file, from another connection."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"PRAGMA user_version = {NEWER}")


def pending_unleased(path: Path) -> list[tuple[str, str, str | None]]:
    """(address, state, lease token) of every recipient not delivered, read past the store
    (which now refuses the file, as any store of this mailstrom does)."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            "SELECT address, state, lease_token FROM recipients"
            " WHERE state != 'delivered' ORDER BY id"
        ).fetchall()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_worker_stops_when_a_newer_mailstrom_migrates_its_store(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, mode: str
) -> None:
    """It went on leasing and delivering with this mailstrom's statements, for ever; a
    schema change that broke them made every lease a passing store error, retried for
    ever, while worker_status said it ran."""
    path = tmp_path / "q.db"
    results = Results()
    store = SQLiteStore(path)
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results, worker=mode)
    ms.start()
    try:
        ms.send_email(hello("before@example.org"))
        results.wait_count(1)
        migrate_to_newer(path)
        ms.send_email(hello("after@example.org", 1))  # woken: the worker leases at once
        assert _wait_until(lambda: not ms.worker_status.running, 30), ms.worker_status
        status = ms.worker_status
        assert status.error is not None
        assert "StoreCorrupt: " in status.error
        assert f"schema version {NEWER} is newer than this mailstrom" in status.error
        assert "upgrade mailstrom" in status.error
        if mode == "process":
            # Ended for good, as a worker process reporting a newer schema at open does.
            assert status.dead and status.restarts == 0
        else:  # the facade shares the worker's store: nor is mail queued with the old SQL
            with pytest.raises(StoreCorrupt, match="newer"):
                ms.send_email(hello("later@example.org", 2))
    finally:
        ms.stop()
        store.close()
    assert [list(m.rcpt_tos) for m in mx.messages] == [["before@example.org"]]
    # Left queued and unleased for the newer mailstrom's worker.
    assert pending_unleased(path) == [("after@example.org", "queued", None)]


# --- PostgreSQL ------------------------------------------------------------------------------


def newer_row(url: str, *statements: str) -> None:
    """A newer mailstrom's migration on PostgreSQL: ``statements``, then its version row."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        for statement in statements:
            conn.execute(statement.encode())
        conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, 'newer')", (NEWER,))


def queued_on(url: str) -> list[tuple[str, str, str | None]]:
    """(address, state, lease token) of every recipient not delivered, read past the store."""
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT address, state, lease_token FROM recipients"
            " WHERE state <> 'delivered' ORDER BY address"
        )
        return [(a, s, t) for a, s, t in found]


@pytest.mark.postgres
def test_a_postgres_worker_stops_within_a_beat_once_a_newer_mailstrom_migrated(
    mx: Any, dns_server: LoopbackDNS, postgres_url: str
) -> None:
    """A newer schema version alone (a migration that only adds): the worker's beat reads
    the version, at no round trip of its own, and the worker stops."""
    results = Results()
    store = PostgresStore(f"{postgres_url}?dead_after=4s")  # a beat every half second
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results, worker="thread")
    ms.start()
    try:
        ms.send_email(hello("before@example.org"))
        results.wait_count(1)
        newer_row(postgres_url)
        assert _wait_until(lambda: not ms.worker_status.running, 30), ms.worker_status
        error = ms.worker_status.error
        assert error is not None and "StoreCorrupt: " in error
        assert f"at version {NEWER}, newer than this mailstrom knows" in error
        with pytest.raises(StoreCorrupt, match="newer"):
            ms.send_email(hello("after@example.org", 1))
    finally:
        ms.stop()
        store.close()
    assert [list(m.rcpt_tos) for m in mx.messages] == [["before@example.org"]]


@pytest.mark.postgres
def test_a_postgres_lease_the_new_schema_breaks_stops_the_worker(
    mx: Any, dns_server: LoopbackDNS, postgres_url: str
) -> None:
    """A migration that renames a column the lease reads: every lease failed with "column
    ... does not exist", a passing store error retried for ever (no beat in between here:
    dead_after=0 beats once a minute)."""
    results = Results()
    store = PostgresStore(f"{postgres_url}?dead_after=0")
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results, worker="thread")
    ms.start()
    try:
        ms.send_email(hello("before@example.org"))
        results.wait_count(1)
        newer_row(postgres_url, "ALTER TABLE suspensions RENAME COLUMN until TO ends_at")
        ms.send_email(hello("after@example.org", 1))  # woken: the worker leases at once
        assert _wait_until(lambda: not ms.worker_status.running, 30), ms.worker_status
        error = ms.worker_status.error
        assert error is not None and "StoreCorrupt: " in error
        assert f"at version {NEWER}, newer than this mailstrom knows" in error
    finally:
        ms.stop()
        store.close()
    assert [list(m.rcpt_tos) for m in mx.messages] == [["before@example.org"]]
    assert queued_on(postgres_url) == [("after@example.org", "queued", None)]

"""A time in a queue row that is no time (a row changed by hand, a restore from another
version, bit rot: text, a year past 9999, infinity) among good rows: the dashboard's
overview and destinations, and the operator's list of suspensions, show every row with
that one time unknown, instead of failing as a whole.

The queue's own leases set such rows aside (tests/integration/test_poison_rows.py); these
views read the rows as they are, and what they show is what the lease does with them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.readmodel import open_read_model
from mailstrom.stores import SQLiteStore
from mailstrom.stores.base import Store
from mailstrom.stores.postgres import PostgresStore

VICTIM_DOMAIN = "victim.example"
GOOD_DOMAIN = "good.example"

# Times that are no time, as each database can hold them.
SQLITE_TIMES = ["'2026-01-05 12:00:00'", "X'00'", "9000000000000000000", "-9000000000000000000"]
POSTGRES_TIMES = ["infinity", "-infinity", "10000-01-01 00:00+00"]


def message(to: str) -> PreparedMessage:
    return PreparedMessage(
        envelope_from="app@sender.example",
        recipients=(to,),
        data=b"From: app@sender.example\r\nTo: " + to.encode() + b"\r\nSubject: x\r\n\r\nx\r\n",
    )


def fill(store: Store) -> tuple[str, str]:
    """The victim first (the oldest pending message), then a good message; one deferred
    recipient at each domain, and each domain suspended."""
    now = datetime.now(UTC)
    victim = store.enqueue(message(f"v@{VICTIM_DOMAIN}"), now=now - timedelta(hours=1))
    good = store.enqueue(message(f"g@{GOOD_DOMAIN}"), now=now)
    for domain in (VICTIM_DOMAIN, GOOD_DOMAIN):
        store.suspend(domain, now=now, until=now + timedelta(days=1))  # type: ignore[attr-defined]
    return victim, good


# --- SQLite -------------------------------------------------------------------------------


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "queue.db")
    try:
        yield store
    finally:
        store.close()


def damage_sqlite(store: SQLiteStore, *statements: str) -> None:
    # The sqlite3 shell's defaults: CHECK constraints off, as in a restore from a dump.
    conn = sqlite3.connect(store.path, isolation_level=None)
    try:
        conn.execute("PRAGMA ignore_check_constraints = ON")
        conn.execute("UPDATE recipients SET state = 'deferred', last_attempt_at = 0")
        for sql in statements:
            conn.execute(sql)
    finally:
        conn.close()


@pytest.mark.parametrize("bad", SQLITE_TIMES)
def test_sqlite_overview_shows_the_oldest_pending_message_with_its_age_unknown(
    sqlite_store: SQLiteStore, bad: str
) -> None:
    victim, _ = fill(sqlite_store)
    damage_sqlite(sqlite_store, f"UPDATE messages SET created_at = {bad} WHERE id = '{victim}'")
    model = open_read_model(sqlite_store, cache_seconds=0)
    try:
        overview = model.overview(now=datetime.now(UTC))
    finally:
        model.close()
    assert overview.oldest_pending is not None
    assert overview.oldest_pending.id == victim
    assert overview.oldest_pending.created_at is None
    assert {d.domain for d in overview.top_deferred} == {VICTIM_DOMAIN, GOOD_DOMAIN}


@pytest.mark.parametrize("bad", SQLITE_TIMES)
def test_sqlite_destinations_show_a_last_attempt_that_is_no_time_as_unknown(
    sqlite_store: SQLiteStore, bad: str
) -> None:
    fill(sqlite_store)
    damage_sqlite(
        sqlite_store,
        f"UPDATE recipients SET last_attempt_at = {bad} WHERE domain = '{VICTIM_DOMAIN}'",
    )
    model = open_read_model(sqlite_store, cache_seconds=0)
    try:
        now = datetime.now(UTC)
        found = {d.domain: d for d in model.destinations(now=now)}
        overview = model.overview(now=now)
    finally:
        model.close()
    assert set(found) == {VICTIM_DOMAIN, GOOD_DOMAIN}
    assert found[VICTIM_DOMAIN].last_attempt_at is None
    assert found[GOOD_DOMAIN].last_attempt_at is not None
    assert {d.domain: d.last_attempt_at for d in overview.top_deferred}[VICTIM_DOMAIN] is None


@pytest.mark.parametrize("bad", SQLITE_TIMES)
def test_sqlite_suspensions_list_one_whose_times_are_no_time(
    sqlite_store: SQLiteStore, bad: str
) -> None:
    """Its start shows as unknown, and an end that is no time as "until resumed": the
    lease compares the stored value and holds the domain back (text and numbers past the
    clock sort after it), so the suspension is in force and must stay listed."""
    fill(sqlite_store)
    damage_sqlite(
        sqlite_store,
        f"UPDATE suspensions SET suspended_at = {bad} WHERE domain = '{VICTIM_DOMAIN}'",
    )
    now = datetime.now(UTC)
    model = open_read_model(sqlite_store, cache_seconds=0)
    try:
        views = [model.suspensions(now=now), list(model.overview(now=now).suspended)]
    finally:
        model.close()
    for found in [*views, sqlite_store.suspensions(now=now)]:
        by_domain = {s.domain: s for s in found}
        assert set(by_domain) == {VICTIM_DOMAIN, GOOD_DOMAIN}
        assert by_domain[VICTIM_DOMAIN].suspended_at is None
        assert by_domain[GOOD_DOMAIN].suspended_at is not None


@pytest.mark.parametrize("bad", ["'2026-01-05 12:00:00'", "X'00'", "9000000000000000000"])
def test_sqlite_a_suspension_whose_end_is_no_time_is_in_force_until_resumed(
    sqlite_store: SQLiteStore, bad: str
) -> None:
    victim, _ = fill(sqlite_store)
    damage_sqlite(
        sqlite_store, f"UPDATE suspensions SET until = {bad} WHERE domain = '{VICTIM_DOMAIN}'"
    )
    now = datetime.now(UTC)
    by_domain = {s.domain: s for s in sqlite_store.suspensions(now=now)}
    assert by_domain[VICTIM_DOMAIN].until is None
    assert by_domain[GOOD_DOMAIN].until is not None
    # What the list says is what the lease does: the victim's domain is held back.
    sqlite_store.resume(GOOD_DOMAIN, now=now)
    lease = sqlite_store.lease(now=now, limit=10, lease_for=timedelta(minutes=5))
    assert lease is not None
    assert [item.message_id for item in lease.items] != [victim]
    assert all(item.domain == GOOD_DOMAIN for item in lease.items)


def test_sqlite_dashboard_pages_and_the_cli_show_rows_whose_times_are_no_time(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    """The overview and destinations pages answered 500 (a TypeError in the read model)."""
    from starlette.testclient import TestClient

    from mailstrom.web import create_app
    from tests.cli.conftest import CLI, clean_env

    victim, _ = fill(sqlite_store)
    bad = "'2026-01-05 12:00:00'"
    damage_sqlite(
        sqlite_store,
        f"UPDATE messages SET created_at = {bad} WHERE id = '{victim}'",
        f"UPDATE recipients SET last_attempt_at = {bad} WHERE domain = '{VICTIM_DOMAIN}'",
        f"UPDATE suspensions SET suspended_at = {bad}, until = {bad}"
        f" WHERE domain = '{VICTIM_DOMAIN}'",
    )
    with TestClient(create_app(sqlite_store), base_url="http://127.0.0.1:8025") as client:
        overview = client.get("/")
        destinations = client.get("/destinations")
    assert overview.status_code == 200
    assert victim in overview.text and "queued at a time that cannot be read" in overview.text
    assert destinations.status_code == 200
    assert VICTIM_DOMAIN in destinations.text and GOOD_DOMAIN in destinations.text

    env = clean_env(tmp_path)
    env["MAILSTROM_STORE"] = f"sqlite:///{sqlite_store.path}"
    listed = CLI(cwd=tmp_path, env=env).ok("queue", "--suspended").out.splitlines()
    assert listed[1].split()[0] == GOOD_DOMAIN
    assert listed[2].split() == [VICTIM_DOMAIN, "-", "until", "resumed"]


# --- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url, max_size=4) as store:
        yield store


def damage_postgres(url: str, *statements: tuple[str, tuple[object, ...]]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE recipients SET state = 'deferred', last_attempt_at = now()")
        for sql, params in statements:
            conn.execute(sql.encode(), params)


@pytest.mark.postgres
@pytest.mark.parametrize("bad", POSTGRES_TIMES)
def test_postgres_overview_and_destinations_show_times_the_driver_cannot_hold_as_unknown(
    postgres_url: str, pg_store: PostgresStore, bad: str
) -> None:
    """The overview and destinations failed as a whole (StoreRefusedData: psycopg cannot
    make a datetime of infinity or a year past 9999)."""
    victim, _ = fill(pg_store)
    damage_postgres(
        postgres_url,
        ("UPDATE messages SET created_at = %s::timestamptz WHERE id = %s", (bad, victim)),
        (
            "UPDATE recipients SET last_attempt_at = %s::timestamptz WHERE domain = %s",
            (bad, VICTIM_DOMAIN),
        ),
    )
    model = open_read_model(pg_store, cache_seconds=0)
    try:
        now = datetime.now(UTC)
        overview = model.overview(now=now)
        found = {d.domain: d for d in model.destinations(now=now)}
    finally:
        model.close()
    assert overview.oldest_pending is not None
    assert overview.oldest_pending.id == victim
    assert overview.oldest_pending.created_at is None
    assert {d.domain: d.last_attempt_at for d in overview.top_deferred}[VICTIM_DOMAIN] is None
    assert set(found) == {VICTIM_DOMAIN, GOOD_DOMAIN}
    assert found[VICTIM_DOMAIN].last_attempt_at is None
    assert found[GOOD_DOMAIN].last_attempt_at is not None


@pytest.mark.postgres
@pytest.mark.parametrize("bad", ["infinity", "10000-01-01 00:00+00"])
def test_postgres_suspensions_list_one_whose_times_the_driver_cannot_hold(
    postgres_url: str, pg_store: PostgresStore, bad: str
) -> None:
    """Its start unknown; an end at infinity (or past 9999) is "until resumed", which is
    what the lease's ``until > now`` makes of it."""
    fill(pg_store)
    damage_postgres(
        postgres_url,
        (
            "UPDATE suspensions SET suspended_at = %s::timestamptz, until = %s::timestamptz"
            " WHERE domain = %s",
            (bad, bad, VICTIM_DOMAIN),
        ),
    )
    now = datetime.now(UTC)
    model = open_read_model(pg_store, cache_seconds=0)
    try:
        views = [model.suspensions(now=now), list(model.overview(now=now).suspended)]
        destinations = {d.domain: d for d in model.destinations(now=now)}
    finally:
        model.close()
    for found in [*views, pg_store.suspensions(now=now)]:
        by_domain = {s.domain: s for s in found}
        assert set(by_domain) == {VICTIM_DOMAIN, GOOD_DOMAIN}
        assert by_domain[VICTIM_DOMAIN].suspended_at is None
        assert by_domain[VICTIM_DOMAIN].until is None
        assert by_domain[GOOD_DOMAIN].until is not None
    suspension = destinations[VICTIM_DOMAIN].suspension
    assert suspension is not None and suspension.until is None


def test_sqlite_dashboard_message_page_says_an_unreadable_message_cannot_be_shown(
    sqlite_store: SQLiteStore,
) -> None:
    """It answered 503, "The queue cannot be read right now", which tells the operator to
    try again later; the row stays as it is, so the page now says what is wrong (500) and
    how to cancel the message, which works."""
    from starlette.testclient import TestClient

    from mailstrom.web import create_app

    victim, good = fill(sqlite_store)
    damage_sqlite(sqlite_store, f"UPDATE messages SET created_at = 'junk' WHERE id = '{victim}'")
    with TestClient(create_app(sqlite_store), base_url="http://127.0.0.1:8025") as client:
        page = client.get(f"/message/{victim}")
        fine = client.get(f"/message/{good}")
    assert page.status_code == 500
    assert "cannot be shown" in page.text and "right now" not in page.text
    assert "queue row unreadable: created_at" in page.text
    assert f"mailstrom cancel {victim}" in page.text
    assert fine.status_code == 200

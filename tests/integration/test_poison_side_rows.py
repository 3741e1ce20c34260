"""One bad row in a side table (SQLite, PostgreSQL) among good ones: the suppression list,
destination pauses, rate buckets, hosts remembered with broken TLS, the MTA-STS cache,
TLS session counters and the event outbox. The worker neither crashes nor stalls on it
and makes the safe decision (stores/side_rows.py: a suppression still suppresses, a pause
is over, a bucket is full, broken TLS is forgotten, a cached policy is fetched again, an
event is skipped), and the operator's lists show the row or leave it out, never fail.

The rows are damaged as in tests/integration/test_poison_rows.py: a hand-made ``UPDATE``
with SQLite's CHECK constraints off (a dump restored from another version), times that
are no time (text, a blob, numbers past any time; infinity, a year past 9999), values no
version here knows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _pytest.mark import ParameterSet

from mailstrom.errors import StoreError, UnreadableRow
from mailstrom.message.prepared import PreparedMessage
from mailstrom.mtasts.policy import CachedPolicy, Mode, Policy
from mailstrom.policy.throttle import TokenBucket
from mailstrom.runtime.worker import Worker
from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, RecipientState
from mailstrom.stores import SQLiteStore, side_rows
from mailstrom.stores.base import RecipientResult, Store
from mailstrom.stores.postgres import PostgresStore
from mailstrom.suppression import Suppression, SuppressionSource
from mailstrom.tlsrpt.sessions import PolicyType, TLSSessions
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import loopback_config

GOOD = 4
VICTIM = "v@victim.example"

# Times that are no time, as SQL literals each database holds.
SQLITE_TIMES = ["'2026-01-05 12:00:00'", "X'00'", "9000000000000000000", "-9000000000000000000"]
POSTGRES_TIMES = ["'infinity'", "'-infinity'", "'10000-01-01 00:00+00'"]
UNKNOWN = "'no-such-value'"


@dataclass(frozen=True, slots=True)
class Side:
    """A store and a way to damage its database behind its back."""

    kind: str
    store: Any  # SQLiteStore | PostgresStore: the methods beyond the Store protocol
    run: Callable[[str], None]
    scalar: Callable[[str], Any]


def cases(sqlite: list[str], postgres: list[str]) -> list[ParameterSet]:
    """(store kind, bad value) parameters; PostgreSQL's marked to need a server."""
    found = [pytest.param("sqlite", bad, id=f"sqlite-{bad}") for bad in sqlite]
    found += [
        pytest.param("postgres", bad, id=f"postgres-{bad}", marks=pytest.mark.postgres)
        for bad in postgres
    ]
    return found


@pytest.fixture(autouse=True)
def _warn_again() -> Iterator[None]:
    side_rows.forget_warnings()  # each test hears its own warnings
    yield
    side_rows.forget_warnings()


@pytest.fixture
def side(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Side]:
    if request.param == "sqlite":
        path = tmp_path / "queue.db"

        def run_sqlite(sql: str) -> None:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                # The sqlite3 shell's defaults, CHECK constraints off too: a dump restored.
                conn.execute("PRAGMA ignore_check_constraints = ON")
                conn.execute(sql)
            finally:
                conn.close()

        def scalar_sqlite(sql: str) -> Any:
            conn = sqlite3.connect(path)
            try:
                return conn.execute(sql).fetchone()[0]
            finally:
                conn.close()

        sqlite_store = SQLiteStore(path)
        try:
            yield Side("sqlite", sqlite_store, run_sqlite, scalar_sqlite)
        finally:
            sqlite_store.close()
        return
    url: str = request.getfixturevalue("postgres_url")

    def run_postgres(sql: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.encode())

    def scalar_postgres(sql: str) -> Any:
        with psycopg.connect(url) as conn:
            row = conn.execute(sql.encode()).fetchone()
        assert row is not None
        return row[0]

    with PostgresStore(url, max_size=4) as pg_store:
        yield Side("postgres", pg_store, run_postgres, scalar_postgres)


def message(to: str) -> PreparedMessage:
    return PreparedMessage(
        data=f"From: a@sender.test\r\nTo: {to}\r\nSubject: hi\r\n\r\nhello {to}\r\n".encode(),
        envelope_from="a@sender.test",
        recipients=(to,),
    )


def entry(target: str, now: datetime) -> Suppression:
    return Suppression(
        target=target,
        source=SuppressionSource.HARD_BOUNCE,
        reply="550 5.1.1 no such user",
        created_at=now - timedelta(days=1),
        expires_at=now + timedelta(days=30),
    )


def damage_entry(side: Side, target: str, column: str, bad: str) -> None:
    if column == "source" and side.kind == "postgres":
        # A newer mailstrom with one more source widened the CHECK.
        side.run("ALTER TABLE suppressions DROP CONSTRAINT suppressions_source_check")
    side.run(f"UPDATE suppressions SET {column} = {bad} WHERE target = '{target}'")


def said(caplog: pytest.LogCaptureFixture, table: str, key: str) -> bool:
    return any(
        r.levelno == logging.WARNING and f"{table} row {key} unreadable" in r.getMessage()
        for r in caplog.records
    )


# --- the suppression list ------------------------------------------------------------------

SUPPRESSION_DAMAGES = [
    *cases(
        [f"created_at = {t}" for t in SQLITE_TIMES] + [f"expires_at = {t}" for t in SQLITE_TIMES],
        [f"created_at = {t}" for t in POSTGRES_TIMES]
        + [f"expires_at = {t}" for t in POSTGRES_TIMES]
        + ["expires_at = '1850-01-01 00:00+00'"],
    ),
    *cases([f"source = {UNKNOWN}"], [f"source = {UNKNOWN}"]),
]


def deliver_once(store: Store, dns: LoopbackDNS, port: int) -> None:
    """Run a worker until nothing is due; a crash fails the test, and so does a stall
    (a lease failing again and again) instead of hanging it."""

    async def run() -> None:
        worker = Worker(loopback_config(dns, port), store)
        await asyncio.wait_for(worker.run(once=True), timeout=15)

    asyncio.run(run())


@pytest.mark.parametrize("target", [VICTIM, "victim.example"])
@pytest.mark.parametrize(("side", "damage"), SUPPRESSION_DAMAGES, indirect=["side"])
def test_a_suppression_that_cannot_be_read_still_suppresses(
    side: Side,
    damage: str,
    target: str,
    smtp_server: Any,
    dns_server: LoopbackDNS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lease reads the entries of its recipients: one bad entry crashed the worker
    (SQLite: TypeError, ValueError) or failed every lease that held its recipient, and
    the rest of the lease with it (a store error, retried for ever). Now the good mail
    goes, and the victim is still refused, for good, as suppressed."""
    mx = smtp_server()
    for domain in ("example.org", "victim.example"):
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    now = datetime.now(UTC)
    side.store.suppress([entry(target, now), entry("other@example.org", now)])
    column, bad = damage.split(" = ")
    damage_entry(side, target, column, bad)
    ids = [side.store.enqueue(message(f"good{i}@example.org"), now=now) for i in range(GOOD)]
    victim = side.store.enqueue(message(VICTIM), now=now)
    deliver_once(side.store, dns_server, mx.port)
    got = sorted(r for m in mx.received for r in m.rcpt_tos)
    assert got == sorted(f"good{i}@example.org" for i in range(GOOD))
    for message_id in ids:
        assert side.store.status(message_id).recipients[0].state is RecipientState.DELIVERED
    refused = side.store.status(victim).recipients[0]
    assert refused.state is RecipientState.FAILED
    assert refused.reason_class is ReasonClass.SUPPRESSED
    assert (refused.error or "").startswith("suppressed since ")
    if column != "expires_at" or side.kind == "sqlite":  # PostgreSQL: infinity is no error
        assert said(caplog, "suppressions", target)


@pytest.mark.parametrize(("side", "damage"), SUPPRESSION_DAMAGES, indirect=["side"])
def test_the_suppression_lists_show_an_entry_that_cannot_be_read(side: Side, damage: str) -> None:
    """``suppress list`` / ``export`` and the library's lookups failed as a whole on one
    bad entry; they show it, with what cannot be read unknown (an expiry that is no
    time: it does not expire, as the lease holds it)."""
    now = datetime.now(UTC)
    side.store.suppress([entry(t, now) for t in ("a@example.org", VICTIM, "z@example.org")])
    column, bad = damage.split(" = ")
    damage_entry(side, VICTIM, column, bad)
    for listed in (
        side.store.list_suppressions(now=now),
        side.store.list_suppressions(),
        list(
            side.store.suppressions_for(
                ["a@example.org", VICTIM, "z@example.org"], now=now
            ).values()
        ),
    ):
        by_target = {e.target: e for e in listed}
        assert set(by_target) == {"a@example.org", VICTIM, "z@example.org"}
        shown = by_target[VICTIM]
        assert shown.active(now)
        unknown = {"created_at": shown.created_at, "expires_at": shown.expires_at}
        unknown["source"] = shown.source
        assert unknown[column] is None
        assert by_target["a@example.org"] == entry("a@example.org", now)
    # Pruned once expired, but for an expiry that is no time: that does not expire.
    side.store.prune_suppressions(expired_before=now + timedelta(days=60), limit=9)
    kept = [e.target for e in side.store.list_suppressions()]
    assert kept == ([VICTIM] if column == "expires_at" else [])


# --- destination pauses ----------------------------------------------------------------------

ENDED = "until = since"
"""A pause that has just ended: the next throttle counts one more strike."""


@pytest.mark.parametrize(
    ("side", "damage"),
    cases(
        [f"until = {t}" for t in SQLITE_TIMES[:3]]
        + [f"since = {t}" for t in SQLITE_TIMES]
        + [f"strikes = 'x', {ENDED}"],
        [f"until = {t}" for t in POSTGRES_TIMES if t != "'-infinity'"]
        + [f"since = {t}" for t in POSTGRES_TIMES]
        + [f"strikes = 2147483647, {ENDED}"],
    ),
    indirect=["side"],
)
def test_a_pause_that_cannot_be_read_is_over(
    side: Side, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every worker reads the pauses every second (shaping.refresh) and the status of a
    held recipient shows its pause: one bad row failed them all (a crash of the reading
    task, or a store error for ever), and the next throttle of its destination too (a
    strike count it cannot add one to). Now the pause is over, said once, and the next
    throttle starts a new one over it."""
    now = datetime.now(UTC)
    victim = side.store.enqueue(message(VICTIM), now=now)
    pause = {"now": now, "reply": "421 slow down", "first": timedelta(minutes=5)}
    side.store.throttle("good.example", maximum=timedelta(hours=1), **pause)
    side.store.throttle(
        "victim.example", maximum=timedelta(hours=1), recipients=[(victim, VICTIM)], **pause
    )
    side.run(f"UPDATE destination_throttles SET {damage} WHERE destination = 'victim.example'")
    for _ in range(3):
        assert [p.destination for p in side.store.throttles(now=now)] == ["good.example"]
    assert side.store.status(victim).recipients[0].throttle is None
    again = side.store.throttle("victim.example", maximum=timedelta(hours=1), **pause)
    assert again.strikes == 1 and again.until == now + timedelta(minutes=5)
    warned = [r for r in caplog.records if "destination_throttles row" in r.getMessage()]
    assert len(warned) == 1 and "victim.example" in warned[0].getMessage()
    assert {p.destination for p in side.store.throttles(now=now)} == {
        "good.example",
        "victim.example",
    }


@pytest.mark.parametrize(
    ("side", "damage"),
    cases(["reply = CAST(X'ff' AS TEXT)", "reply = X'ff'"], []),
    indirect=["side"],
)
def test_a_pause_whose_reply_cannot_be_read_holds_with_the_reply_shown(
    side: Side, damage: str
) -> None:
    """A pause's reply is only shown (the status of each recipient it holds back, the
    list of paused destinations). Read as it was, octets that are not UTF-8 came back as
    lone surrogates, which no serialiser of a status can encode, and a blob as bytes. The
    pause holds all the same, its reply shown as the status read shows a recipient's
    (U+FFFD for such octets)."""
    now = datetime.now(UTC)
    victim = side.store.enqueue(message(VICTIM), now=now)
    side.store.throttle(
        "victim.example",
        now=now,
        reply="421 slow down",
        first=timedelta(minutes=5),
        maximum=timedelta(hours=1),
        recipients=[(victim, VICTIM)],
    )
    side.run(f"UPDATE destination_throttles SET {damage} WHERE destination = 'victim.example'")
    (pause,) = side.store.throttles(now=now)
    assert pause.until == now + timedelta(minutes=5)
    assert pause.reply == "\ufffd"
    assert side.store.status(victim).recipients[0].throttle == pause


# --- rate buckets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "damage"),
    cases(
        [f"at = {t}" for t in SQLITE_TIMES] + ["tokens = 'x'"],
        [f"at = {t}" for t in POSTGRES_TIMES] + ["tokens = '-Infinity'"],
    ),
    indirect=["side"],
)
def test_a_rate_bucket_that_cannot_be_read_is_full(
    side: Side, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker sending under a rate takes tokens from the store: one bad bucket failed
    every take of its rate (a TypeError on the worker's loop, or a store error: no token,
    for ever). Now it is a full bucket (one burst, its capacity) written anew."""
    now = datetime.now(UTC)
    bucket = TokenBucket(key="victim.example messages/minute", rate=1.0, capacity=3.0)
    assert side.store.take_tokens([bucket], want=3, now=now).granted == 3
    side.run(f"UPDATE shaping_buckets SET {damage}")
    grant = side.store.take_tokens([bucket], want=5, now=now)
    assert grant.granted == 3
    assert said(caplog, "shaping_buckets", bucket.key)
    # Written anew: empty now, and readable.
    assert side.store.take_tokens([bucket], want=1, now=now).granted == 0


@pytest.mark.parametrize(
    ("side", "damage"),
    cases(["tokens = -1e300"], ["tokens = -1e300"]),
    indirect=["side"],
)
def test_a_rate_bucket_read_back_below_empty_refills_from_empty(side: Side, damage: str) -> None:
    """No take leaves a bucket below empty: one read back far below it (a dump restored,
    a hand edit) gave its rate no token again, ever, and every message to the
    destination waited in the queue until it expired (-inf reads as a full bucket)."""
    now = datetime.now(UTC)
    bucket = TokenBucket(key="victim.example messages/minute", rate=1.0, capacity=3.0)
    assert side.store.take_tokens([bucket], want=3, now=now).granted == 3
    side.run(f"UPDATE shaping_buckets SET {damage}")
    later = now + timedelta(seconds=2)
    assert side.store.take_tokens([bucket], want=5, now=later).granted == 2


# --- hosts remembered with broken TLS ----------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "bad"),
    cases(SQLITE_TIMES[:3], ["'infinity'", "'10000-01-01 00:00+00'"]),
    indirect=["side"],
)
def test_broken_tls_whose_end_cannot_be_read_is_forgotten(
    side: Side, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every worker reads the hosts with broken TLS every minute: one bad end failed the
    read (the task reading them died, or a store error every minute) and would never
    expire. Now it is forgotten, said once: TLS is tried with that host again."""
    now = datetime.now(UTC)
    for host in ("mx.good.example", "mx.victim.example"):
        side.store.note_tls_broken(host, until=now + timedelta(hours=1), reason="x", now=now)
    side.run(f"UPDATE tls_broken SET until = {bad} WHERE host = 'mx.victim.example'")
    assert list(side.store.tls_broken(now=now)) == ["mx.good.example"]
    assert said(caplog, "tls_broken", "mx.victim.example")
    assert side.scalar("SELECT count(*) FROM tls_broken") == 1
    assert list(side.store.tls_broken(now=now)) == ["mx.good.example"]


# --- the MTA-STS cache and TLS session counters ----------------------------------------------


@pytest.mark.parametrize(
    ("side", "damage"),
    # A time out of range was already a StoreError (refused by the driver), which the
    # MTA-STS source takes for "not cached"; these were not.
    cases(
        ["fetched_at = 'x'", "expires_at = X'00'", f"mode = {UNKNOWN}", "max_age = 'x'"],
        [f"mode = {UNKNOWN}"],
    ),
    indirect=["side"],
)
def test_a_cached_mtasts_policy_that_cannot_be_read_is_not_cached(side: Side, damage: str) -> None:
    """The MTA-STS source reads the cache before each fetch and takes a store error for
    "not cached"; a bad row raised a ValueError or TypeError instead, out of the TLS
    decision of every delivery to the domain. Now it is UnreadableRow (not cached: the
    policy is fetched again) and the fetched one is written over it."""
    now = datetime.now(UTC).replace(microsecond=0)
    policy = Policy(mode=Mode.ENFORCE, mx=("mx.victim.example",), max_age=86400, text="t")
    cached = CachedPolicy(
        domain="victim.example",
        policy_id="1",
        policy=policy,
        fetched_at=now,
        expires_at=now + timedelta(days=1),
    )
    side.store.save_mta_sts_policy(cached)
    side.run(f"UPDATE mta_sts_policies SET {damage}")
    with pytest.raises(UnreadableRow, match=r"MTA-STS policy of 'victim\.example'"):
        side.store.mta_sts_policy("victim.example")
    side.store.save_mta_sts_policy(cached)
    assert side.store.mta_sts_policy("victim.example") == cached


@pytest.mark.parametrize(
    ("side", "damage"),
    cases([f"policy_type = {UNKNOWN}", "count = 'x'"], [f"policy_type = {UNKNOWN}"]),
    indirect=["side"],
)
def test_a_tls_session_counter_that_cannot_be_read_is_left_out(
    side: Side, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``mailstrom tlsrpt`` reads a day's counters: one bad row failed the report."""
    day = date(2026, 1, 5)
    side.store.add_tls_sessions(
        [
            TLSSessions(day=day, policy_domain=d, policy_type=PolicyType.STS, count=2)
            for d in ("good.example", "victim.example")
        ]
    )
    side.run(f"UPDATE tls_sessions SET {damage} WHERE policy_domain = 'victim.example'")
    assert [s.policy_domain for s in side.store.tls_sessions(day)] == ["good.example"]
    assert said(caplog, "tls_sessions", "2026-01-05 victim.example")


# --- the event outbox --------------------------------------------------------------------------


def fill_outbox(store: Any) -> list[str]:
    """Four messages deferred once, in order: an outbox event each (ids 1 to 4)."""
    store.enable_events()
    now = datetime.now(UTC)
    addresses = ["good0@example.org", VICTIM, "good1@example.org", "good2@example.org"]
    for address in addresses:
        store.enqueue(message(address), now=now)
    lease = store.lease(now=now, limit=10, lease_for=timedelta(minutes=5))
    assert lease is not None
    attempt = Attempt(at=now, outcome=AttemptOutcome.TEMPORARY, error="try later")
    store.record(
        [
            RecipientResult(
                message_id=item.message_id,
                address=r.address,
                state=RecipientState.DEFERRED,
                attempt=attempt,
                lease_token=item.lease_token,
                ref=r.ref,
                next_attempt_at=now + timedelta(minutes=10),
            )
            for item in lease.items
            for r in item.recipients
        ]
    )
    events = store.read_events()
    assert [e.address for e in events] == addresses
    return addresses


# Values of another type than the column's (SQLite keeps what it is given): a blob in a
# text column made the hook body unwritable (TypeError), so the sender retried that batch
# forever and no later event was sent; a text in a count column reached receivers as a
# string where the payload has a number.
SQLITE_EVENT_TYPES = [
    "message_id = X'00'",
    "address = X'00'",
    "error = X'00'",
    "mx_host = X'00'",
    "attempt = 'two'",
    "reply_code = 'x'",
]
EVENT_DAMAGES = cases(
    [f"at = {t}" for t in SQLITE_TIMES] + [f"state = {UNKNOWN}", *SQLITE_EVENT_TYPES],
    [f"at = {t}" for t in POSTGRES_TIMES] + [f"state = {UNKNOWN}"],
)


@pytest.mark.parametrize(("side", "damage"), EVENT_DAMAGES, indirect=["side"])
def test_an_event_that_cannot_be_read_is_skipped_and_the_rest_flow(
    side: Side, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The webhook sender leases the outbox in order: one bad event failed every lease
    (and, on PostgreSQL, stayed leased with its batch), so no later event was ever sent.
    Now it is marked sent with a warning, and the sender gets the events after it, even
    from a batch that held it alone."""
    addresses = fill_outbox(side.store)
    side.run(f"UPDATE events SET {damage} WHERE address = '{VICTIM}'")
    now = datetime.now(UTC)
    sent: list[str] = []
    for _ in range(len(addresses)):  # batches of one: the victim's batch holds it alone
        batch = side.store.lease_events(now=now, limit=1, lease_for=timedelta(minutes=1))
        if batch is None:
            break
        sent += [e.address for e in batch.events]
        assert side.store.ack_events(batch, now=now) == len(batch.events)
    assert sent == [a for a in addresses if a != VICTIM]
    assert said(caplog, "events", "2")
    assert side.store.lease_events(now=now, limit=10, lease_for=timedelta(minutes=1)) is None
    # ``mailstrom events`` leaves it out too.
    assert [e.address for e in side.store.read_events()] == sent


@pytest.mark.parametrize(("side", "damage"), EVENT_DAMAGES, indirect=["side"])
def test_a_page_of_events_is_made_up_past_one_that_cannot_be_read(side: Side, damage: str) -> None:
    """A reader pages through the outbox with the last id it got (``mailstrom events
    --after``): a page that held only the bad event came back empty, which reads as the
    end of the outbox although events follow it."""
    addresses = fill_outbox(side.store)
    side.run(f"UPDATE events SET {damage} WHERE address = '{VICTIM}'")
    first = side.store.read_events(after=0, limit=1)
    assert [e.address for e in first] == addresses[:1]
    # The next page of one starts at the bad event: the one after it stands in.
    [after_bad] = side.store.read_events(after=first[0].id, limit=1)
    assert after_bad.address == addresses[2]
    assert [e.address for e in side.store.read_events(after=0, limit=3)] == [
        addresses[0],
        *addresses[2:],
    ]
    assert side.store.read_events(after=after_bad.id + 1, limit=5) == []


@pytest.mark.parametrize(("side", "bad"), cases(SQLITE_TIMES, POSTGRES_TIMES), indirect=["side"])
def test_an_event_whose_next_attempt_cannot_be_read_goes_with_it_unknown(
    side: Side, bad: str
) -> None:
    addresses = fill_outbox(side.store)
    side.run(f"UPDATE events SET next_attempt_at = {bad} WHERE address = '{VICTIM}'")
    now = datetime.now(UTC)
    batch = side.store.lease_events(now=now, limit=10, lease_for=timedelta(minutes=1))
    assert batch is not None
    assert [e.address for e in batch.events] == addresses
    assert [e.next_attempt_at is None for e in batch.events] == [False, True, False, False]


# --- the command line ----------------------------------------------------------------------------


def test_the_cli_lists_suppressions_and_events_past_rows_that_cannot_be_read(
    tmp_path: Path,
) -> None:
    """``mailstrom suppress list`` / ``export`` and ``mailstrom events`` failed (a
    TypeError, exit 70) on one bad row."""
    from tests.cli.conftest import CLI, clean_env

    path = tmp_path / "queue.db"
    store = SQLiteStore(path)
    try:
        now = datetime.now(UTC)
        store.suppress([entry(t, now) for t in ("a@example.org", VICTIM)])
        addresses = fill_outbox(store)
    finally:
        store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    conn.execute(f"UPDATE suppressions SET created_at = 'x', source = {UNKNOWN}")
    conn.execute(f"UPDATE suppressions SET expires_at = X'00' WHERE target = '{VICTIM}'")
    conn.execute(f"UPDATE events SET at = 'x' WHERE address = '{VICTIM}'")
    conn.close()
    env = clean_env(tmp_path)
    env["MAILSTROM_STORE"] = f"sqlite:///{path}"
    cli = CLI(cwd=tmp_path, env=env)
    listed = [line.split()[:4] for line in cli.ok("suppress", "list").out.splitlines()[1:]]
    assert listed[0][:3] == ["a@example.org", "-", "-"]
    assert listed[1] == [VICTIM, "-", "-", "never"]
    rows = cli.ok("suppress", "list", "--json").json()
    assert [(r["target"], r["source"], r["created_at"]) for r in rows] == [
        ("a@example.org", None, None),
        (VICTIM, None, None),
    ]
    exported = cli.ok("suppress", "export").out.splitlines()
    assert exported[2].startswith(f"{VICTIM},,550 5.1.1 no such user,,,")
    shown = [line.split()[3] for line in cli.ok("events", "--limit", "10").out.splitlines()]
    assert shown == [a for a in addresses if a != VICTIM]


def test_an_entry_read_back_unknown_is_refused_as_written_back(tmp_path: Path) -> None:
    """Writing an entry read with an unknown source or time back as it is: refused (the
    store makes up neither), as a StoreError, not a crash."""
    store = SQLiteStore(tmp_path / "queue.db")
    try:
        unknown = Suppression(target=VICTIM, source=None, reply="", created_at=None)
        with pytest.raises(StoreError):
            store.suppress([unknown])
    finally:
        store.close()


@pytest.mark.parametrize("side", ["sqlite"], indirect=True)
def test_a_suspension_whose_domain_is_not_utf8_stops_no_lease(side: Side) -> None:
    """The lease and the next due time bound every suspended domain back into their
    statements, and a suspension row whose domain is not UTF-8 (changed by hand) could
    not be bound: every lease and next_due failed with StoreRefusedData, and the worker
    delivered nothing. The statements read the suspensions themselves now: the row still
    suspends what it names (nothing here), and the rest is leased."""
    now = datetime.now(UTC)
    store = side.store
    mid = store.enqueue(message("g@good.example"), now=now)
    store.suspend("paused.example", now=now)
    store.enqueue(message("p@paused.example"), now=now)
    side.run("INSERT INTO suspensions VALUES (CAST(X'ff' AS TEXT), 0, NULL)")
    assert store.next_due(now=now) == now
    lease = store.lease(now=now, limit=10, lease_for=timedelta(minutes=5))
    assert lease is not None
    assert [(item.message_id, item.domain) for item in lease.items] == [(mid, "good.example")]


@pytest.mark.parametrize(
    ("side", "damage"),
    cases(["-9000000000000000000"], ["'1850-01-01 00:00+00'"]),
    indirect=["side"],
)
def test_an_operators_entry_whose_expiry_is_no_time_stays_against_a_bounce(
    side: Side, damage: str
) -> None:
    """An operator's entry whose expiry was changed by hand to before any time a store
    keeps reads back as in force without end, in both stores; a bounce's entry written
    over it (``keep_longer``) replaced it in SQLite, which judged that expiry past,
    while PostgreSQL kept it."""
    now = datetime.now(UTC)
    manual = Suppression(
        target=VICTIM, source=SuppressionSource.MANUAL, reply="unsubscribed", created_at=now
    )
    side.store.suppress([manual])
    damage_entry(side, VICTIM, "expires_at", damage)
    bounce = dataclasses.replace(entry(VICTIM, now), created_at=now)
    side.store.suppress([bounce], keep_longer=True)
    found = side.store.suppressions_for([VICTIM], now=now)[VICTIM]
    assert (found.source, found.reply) == (SuppressionSource.MANUAL, "unsubscribed")

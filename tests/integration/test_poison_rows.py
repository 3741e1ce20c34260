"""One bad row in a real queue (SQLite, PostgreSQL) among good mail: the worker delivers
the good mail, sets the bad row aside (failed as "queue row unreadable: ..." when it can
still be written) without crashing or leasing it again in a loop, and the operator's views
keep working.

Each case damages the row of one message ("victim") the way a hand-made ``UPDATE``, an
older or newer mailstrom sharing the database, a partial restore or bit rot could; the
loopback server answers the victim's RCPT with 451, so the retry arithmetic (attempts,
age) runs on the damaged values too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mailstrom.errors import UnknownMessage, UnreadableRow
from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.dsn import DSN, Notify
from mailstrom.message.prepared import PreparedMessage
from mailstrom.readmodel import QueueQuery, QueueView, SortOrder, open_read_model
from mailstrom.runtime.worker import Worker
from mailstrom.status import Attempt, AttemptOutcome, MessageStatus, RecipientState
from mailstrom.stores import SQLiteStore
from mailstrom.stores.base import QueueFilter, RecipientResult, Store
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import loopback_config

GOOD = 5
VICTIM = "victim@example.org"
UNREADABLE = "queue row unreadable"

# What becomes of the victim's recipient.
SET_ASIDE = "set aside"  # failed for good with the reason "queue row unreadable: ..."
ATTEMPTED = "attempted"  # readable: handed to the server as it is
REFUSED = "refused"  # failed by the delivery path's own checks (an address SMTP cannot carry)
LEFT = "left"  # never due, so never leased: stays as it is
# Without a due time: made due by the next next_due (the worker asks it when idle while
# deliveries run, else the views below do), then attempted like any other.
DATED = "dated"


@dataclass(frozen=True, slots=True)
class Damage:
    """One way to damage the victim: SQL run on the store's database with the victim's
    message id as its only parameter (``?`` for SQLite, ``%s`` for PostgreSQL)."""

    sql: str
    then: str


SEQ = "(SELECT seq FROM messages WHERE id = ?)"
NOT_UTF8 = "CAST(X'ff' AS TEXT)"
DEEP = "replace(hex(zeroblob(5000)), '00', '[') || replace(hex(zeroblob(5000)), '00', ']')"

SQLITE: dict[str, Damage] = {
    "metadata not JSON": Damage("UPDATE messages SET metadata = '{oops' WHERE id = ?", ATTEMPTED),
    "metadata a list": Damage("UPDATE messages SET metadata = '[1, 2]' WHERE id = ?", ATTEMPTED),
    "tags an object": Damage("UPDATE messages SET tags = '{\"a\": 1}' WHERE id = ?", ATTEMPTED),
    # JSON nested deeper than Python's parser recurses (RecursionError, no ValueError).
    "tags nested too deep": Damage(f"UPDATE messages SET tags = {DEEP} WHERE id = ?", ATTEMPTED),
    "metadata nested too deep": Damage(
        f"UPDATE messages SET metadata = {DEEP} WHERE id = ?", ATTEMPTED
    ),
    "dkim nested too deep": Damage(f"INSERT INTO message_dkim VALUES ({SEQ}, {DEEP})", ATTEMPTED),
    "dkim not JSON": Damage(f"INSERT INTO message_dkim VALUES ({SEQ}, '{{oops')", ATTEMPTED),
    "dsn unknown notify": Damage(
        "UPDATE messages SET dsn = 'notify=BOGUS' WHERE id = ?", SET_ASIDE
    ),
    # TEXT affinity: stored as '42', which reads as a DSN request without parameters.
    "dsn a number": Damage("UPDATE messages SET dsn = 42 WHERE id = ?", ATTEMPTED),
    "created_at text": Damage(
        "UPDATE messages SET created_at = '2026-01-05 12:00:00' WHERE id = ?", SET_ASIDE
    ),
    "created_at year 9999": Damage(
        "UPDATE messages SET created_at = 253402214400000000 WHERE id = ?", SET_ASIDE
    ),
    "created_at past year 9999": Damage(
        "UPDATE messages SET created_at = 9000000000000000000 WHERE id = ?", SET_ASIDE
    ),
    "created_at before year 1": Damage(
        "UPDATE messages SET created_at = -9000000000000000000 WHERE id = ?", SET_ASIDE
    ),
    "created_at negative epoch": Damage(
        "UPDATE messages SET created_at = -1 WHERE id = ?", ATTEMPTED
    ),
    "expires_at text": Damage("UPDATE messages SET expires_at = 'soon' WHERE id = ?", SET_ASIDE),
    "first_attempt_at text": Damage(
        f"UPDATE recipients SET first_attempt_at = 'x' WHERE message_seq = {SEQ}", SET_ASIDE
    ),
    "last_attempt_at past year 9999": Damage(
        f"UPDATE recipients SET last_attempt_at = 9000000000000000000 WHERE message_seq = {SEQ}",
        SET_ASIDE,
    ),
    "next_attempt_at NULL": Damage(
        f"UPDATE recipients SET next_attempt_at = NULL WHERE message_seq = {SEQ}", DATED
    ),
    "attempts negative": Damage(
        f"UPDATE recipients SET attempts = -5 WHERE message_seq = {SEQ}", SET_ASIDE
    ),
    "attempts huge": Damage(
        f"UPDATE recipients SET attempts = 9223372036854775807 WHERE message_seq = {SEQ}",
        SET_ASIDE,
    ),
    "attempts text": Damage(
        f"UPDATE recipients SET attempts = 'many' WHERE message_seq = {SEQ}", SET_ASIDE
    ),
    "state unknown": Damage(
        f"UPDATE recipients SET state = 'bounced' WHERE message_seq = {SEQ}", LEFT
    ),
    "lane unknown": Damage("UPDATE messages SET priority = 'no-such-lane' WHERE id = ?", ATTEMPTED),
    "priority a number": Damage("UPDATE messages SET priority = 7 WHERE id = ?", ATTEMPTED),
    "address without @": Damage(
        f"UPDATE recipients SET address = 'victim' WHERE message_seq = {SEQ}", ATTEMPTED
    ),
    "address with CRLF": Damage(
        "UPDATE recipients SET address = 'victim@example.org' || char(13, 10) || 'RSET'"
        f" WHERE message_seq = {SEQ}",
        REFUSED,
    ),
    # TEXT affinity: stored as '42', an address (without a domain) like any other.
    "address a number": Damage(
        f"UPDATE recipients SET address = 42 WHERE message_seq = {SEQ}", ATTEMPTED
    ),
    "envelope_from a number": Damage(
        "UPDATE messages SET envelope_from = 42 WHERE id = ?", ATTEMPTED
    ),
    "data empty": Damage(f"UPDATE message_data SET data = X'' WHERE seq = {SEQ}", SET_ASIDE),
    "data text": Damage(
        f"UPDATE message_data SET data = CAST(data AS TEXT) WHERE seq = {SEQ}", SET_ASIDE
    ),
    "data truncated": Damage(
        f"UPDATE message_data SET data = substr(data, 1, 20) WHERE seq = {SEQ}", SET_ASIDE
    ),
    "data a number": Damage(f"UPDATE message_data SET data = 5 WHERE seq = {SEQ}", SET_ASIDE),
    "data row missing": Damage(f"DELETE FROM message_data WHERE seq = {SEQ}", SET_ASIDE),
    "message row missing": Damage("DELETE FROM messages WHERE id = ?", SET_ASIDE),
    # Text that is not UTF-8 (another tool, an older version, bit rot): SQLite stores the
    # octets as they are; reading one such value failed every read of its table.
    "address not UTF-8": Damage(
        f"UPDATE recipients SET address = {NOT_UTF8} || address WHERE message_seq = {SEQ}",
        SET_ASIDE,
    ),
    "domain not UTF-8": Damage(
        f"UPDATE recipients SET domain = {NOT_UTF8} || domain WHERE message_seq = {SEQ}",
        SET_ASIDE,
    ),
    "lane not UTF-8": Damage(
        f"UPDATE recipients SET lane = {NOT_UTF8} WHERE message_seq = {SEQ}", ATTEMPTED
    ),
    "error not UTF-8": Damage(
        f"UPDATE recipients SET error = {NOT_UTF8} WHERE message_seq = {SEQ}", ATTEMPTED
    ),
    "envelope_from not UTF-8": Damage(
        f"UPDATE messages SET envelope_from = {NOT_UTF8} || envelope_from WHERE id = ?", SET_ASIDE
    ),
    "subject not UTF-8": Damage(
        f"UPDATE messages SET subject = {NOT_UTF8} WHERE id = ?", ATTEMPTED
    ),
    "priority not UTF-8": Damage(
        f"UPDATE messages SET priority = {NOT_UTF8} WHERE id = ?", ATTEMPTED
    ),
    "tags not UTF-8": Damage(
        f"UPDATE messages SET tags = '[\"' || {NOT_UTF8} || '\"]' WHERE id = ?", ATTEMPTED
    ),
    "dsn not UTF-8": Damage(
        f"UPDATE messages SET dsn = 'notify=failure;envid=' || {NOT_UTF8} WHERE id = ?",
        SET_ASIDE,
    ),
    "data text not UTF-8": Damage(
        "UPDATE message_data SET data = CAST(substr(data, 1, length(data) - 1) || X'ff' AS TEXT)"
        f" WHERE seq = {SEQ}",
        SET_ASIDE,
    ),
}

POSTGRES: dict[str, Damage] = {
    "metadata a list": Damage(
        "UPDATE messages SET metadata = '[1, 2]'::jsonb WHERE id = %s", ATTEMPTED
    ),
    "tags with NULL": Damage(
        "UPDATE messages SET tags = ARRAY[NULL, 'a']::text[] WHERE id = %s", ATTEMPTED
    ),
    "dkim not JSON": Damage("UPDATE messages SET dkim = '{oops' WHERE id = %s", ATTEMPTED),
    "dsn unknown notify": Damage(
        "UPDATE messages SET dsn = 'notify=BOGUS' WHERE id = %s", SET_ASIDE
    ),
    "created_at infinity": Damage(
        "UPDATE messages SET created_at = 'infinity' WHERE id = %s", SET_ASIDE
    ),
    "created_at year 10000": Damage(
        "UPDATE messages SET created_at = '10000-01-01 00:00+00' WHERE id = %s", SET_ASIDE
    ),
    "created_at year 9999": Damage(
        "UPDATE messages SET created_at = '9999-12-31 00:00+00' WHERE id = %s", SET_ASIDE
    ),
    "expires_at -infinity": Damage(
        "UPDATE messages SET expires_at = '-infinity' WHERE id = %s", SET_ASIDE
    ),
    "first_attempt_at infinity": Damage(
        "UPDATE recipients SET first_attempt_at = 'infinity' WHERE message_id = %s", SET_ASIDE
    ),
    "next_attempt_at NULL": Damage(
        "UPDATE recipients SET next_attempt_at = NULL WHERE message_id = %s", DATED
    ),
    "attempts negative": Damage(
        "UPDATE recipients SET attempts = -5 WHERE message_id = %s", SET_ASIDE
    ),
    "attempts at the integer limit": Damage(
        "UPDATE recipients SET attempts = 2147483647 WHERE message_id = %s", SET_ASIDE
    ),
    "lane unknown": Damage(
        "UPDATE messages SET priority = 'no-such-lane' WHERE id = %s", ATTEMPTED
    ),
    "address with CRLF": Damage(
        "UPDATE recipients SET address = address || E'\\r\\nRSET' WHERE message_id = %s",
        REFUSED,
    ),
    "data empty": Damage("UPDATE messages SET data = ''::bytea WHERE id = %s", SET_ASIDE),
    "data truncated": Damage(
        "UPDATE messages SET data = substring(data FROM 1 FOR 20) WHERE id = %s", SET_ASIDE
    ),
}


def message(to: str, *, dsn: DSN | None = None) -> PreparedMessage:
    return PreparedMessage(
        data=f"From: a@sender.test\r\nTo: {to}\r\nSubject: hi\r\n\r\nhello {to}\r\n".encode(),
        envelope_from="a@sender.test",
        recipients=(to,),
        subject="hi",
        dsn=dsn,
    )


@pytest.fixture
def mx(smtp_server: Any, dns_server: LoopbackDNS) -> Any:
    server = smtp_server()
    server.rcpt_replies[VICTIM] = "451 4.2.1 try again later"
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


def fill(store: Store) -> str:
    """GOOD good messages with the victim's in their midst (one lease takes them all);
    the victim's message id."""
    now = datetime.now(UTC)
    ids = [store.enqueue(message(f"good{i}@example.org"), now=now) for i in range(GOOD // 2)]
    victim = store.enqueue(message(VICTIM, dsn=DSN(notify=(Notify.FAILURE,))), now=now)
    ids += [store.enqueue(message(f"good{i}@example.org"), now=now) for i in range(GOOD // 2, GOOD)]
    return victim


def deliver_once(store: Store, dns: LoopbackDNS, mx: Any) -> list[RecipientResult]:
    """Run a worker until nothing is due; a stall fails the test instead of hanging it.
    The results its ``on_result`` heard of."""
    heard: list[RecipientResult] = []

    async def run() -> None:
        worker = Worker(loopback_config(dns, mx.port), store, on_result=heard.append)
        await asyncio.wait_for(worker.run(once=True), timeout=20)

    store.enable_events()
    asyncio.run(run())
    return heard


def check_reported(
    store: Store, victim: str, kind: str, then: str, heard: list[RecipientResult], status: Any
) -> None:
    """A recipient set aside is reported like any other final failure: once to
    on_result, once in the event outbox (webhooks), and as an attempt in its history
    (when its status can be read) - unless its message row is gone, with its id."""
    mine = [r for r in heard if not r.address.startswith("good")]
    events = [e for e in store.read_events(limit=100) if e.message_id == victim]
    if then != SET_ASIDE:
        assert all(not (r.attempt.error or "").startswith(UNREADABLE) for r in mine)
        return
    if kind == "message row missing":  # nothing left to name the recipient by
        assert mine == events == []
        return
    assert [(r.message_id, r.state) for r in mine] == [(victim, RecipientState.FAILED)]
    assert (mine[0].attempt.error or "").startswith(f"{UNREADABLE}: ")
    assert [(e.state, e.error) for e in events] == [(RecipientState.FAILED, mine[0].attempt.error)]
    if status is not None:
        history = status.recipients[0].history
        assert history and history[-1].error == mine[0].attempt.error


def check_views(store: Store, victim: str) -> MessageStatus | None:
    """Every view of the queue answers: with the good messages, and with the victim or a
    typed error about it. The victim's status when it can be read."""
    now = datetime.now(UTC)
    for listed in (store.recent(50), store.query(now=now, where=QueueFilter(limit=50))):
        good = [m for m in listed if m.recipients and m.recipients[0].address.startswith("good")]
        assert len(good) == GOOD
    store.stats()
    store.next_due(now=now)
    model = open_read_model(store)  # the dashboard's front page
    try:
        model.overview(now=now)
    finally:
        model.close()
    try:
        return store.status(victim)
    except (UnreadableRow, UnknownMessage):
        return None


def check_delivery(mx: Any, then: str) -> None:
    good = sorted(r for m in mx.messages for r in m.rcpt_tos if r.startswith("good"))
    assert good == sorted(f"good{i}@example.org" for i in range(GOOD))
    assert all(m.content.startswith(b"From: a@sender.test") for m in mx.messages)
    tried = [r for m in mx.received for r in m.rcpt_tos if not r.startswith("good")]
    assert tried == [] or then in (ATTEMPTED, DATED)


# --- SQLite ---------------------------------------------------------------------------


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


def damage_sqlite(path: Path, damage: Damage, victim: str) -> None:
    # The sqlite3 shell's defaults: no foreign keys; CHECK constraints off too, as in a
    # restore from a dump made by another version.
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    conn.execute(damage.sql, (victim,))
    conn.close()


def victim_row_sqlite(path: Path) -> tuple[Any, ...]:
    conn = sqlite3.connect(path)
    try:
        return tuple(
            conn.execute(
                "SELECT state, error, lease_token FROM recipients WHERE address NOT LIKE 'good%'"
            ).fetchone()
        )
    finally:
        conn.close()


@pytest.mark.parametrize("kind", list(SQLITE))
def test_sqlite_poison_row(kind: str, sqlite_path: Path, dns_server: LoopbackDNS, mx: Any) -> None:
    damage = SQLITE[kind]
    store = SQLiteStore(sqlite_path)
    try:
        victim = fill(store)
        damage_sqlite(sqlite_path, damage, victim)
        heard = deliver_once(store, dns_server, mx)
        check_delivery(mx, damage.then)
        state, error, lease = victim_row_sqlite(sqlite_path)
        check_outcome(damage.then, state, error, lease)
        status = check_views(store, victim)
        check_reported(store, victim, kind, damage.then, heard, status)
    finally:
        store.close()


# --- PostgreSQL -----------------------------------------------------------------------


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url, max_size=4) as store:
        yield store


def victim_row_postgres(url: str) -> tuple[Any, ...]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT state, error, lease_token FROM recipients WHERE address NOT LIKE 'good%'"
        ).fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.postgres
@pytest.mark.parametrize("kind", list(POSTGRES))
def test_postgres_poison_row(
    kind: str,
    postgres_url: str,
    pg_store: PostgresStore,
    dns_server: LoopbackDNS,
    mx: Any,
) -> None:
    damage = POSTGRES[kind]
    victim = fill(pg_store)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(damage.sql.encode(), (victim,))
    heard = deliver_once(pg_store, dns_server, mx)
    check_delivery(mx, damage.then)
    state, error, lease = victim_row_postgres(postgres_url)
    check_outcome(damage.then, state, error, lease)
    status = check_views(pg_store, victim)
    check_reported(pg_store, victim, kind, damage.then, heard, status)


@pytest.mark.postgres
def test_postgres_queue_counts_leave_out_a_state_no_version_here_knows(
    postgres_url: str, pg_store: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    """``stats()`` read each state's count as a RecipientState: one row in a state it
    does not know (a newer mailstrom's, which widened the CHECK, or a hand-made one)
    failed ``mailstrom queue``, ``Mailstrom.stats()``, every scrape of the worker's
    metrics and the dashboard's front page. As with SQLite, the row is left out of the
    counts, with a warning."""
    now = datetime.now(UTC)
    pg_store.enqueue(message("good0@example.org"), now=now)
    victim = pg_store.enqueue(message(VICTIM), now=now)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE recipients DROP CONSTRAINT recipients_state_check")
        conn.execute("UPDATE recipients SET state = 'bounced' WHERE message_id = %s", (victim,))
    model = open_read_model(pg_store)
    try:
        with caplog.at_level(logging.WARNING, logger="mailstrom"):
            stats = pg_store.stats()
            overview = model.overview(now=now)
    finally:
        model.close()
    assert stats.by_state[RecipientState.QUEUED] == 1
    assert sum(stats.by_state.values()) == 1
    assert stats.pending_by_domain == {"example.org": 1} and stats.messages == 2
    assert overview.by_state == stats.by_state
    left_out = "1 recipients in the unknown state 'bounced' left out"
    assert [r.getMessage() for r in caplog.records] == [left_out, left_out]


def check_outcome(then: str, state: str, error: str | None, lease: str | None) -> None:
    if then == SET_ASIDE:
        assert (state, lease) == ("failed", None)
        assert error is not None and error.startswith(f"{UNREADABLE}: ")
    elif then == ATTEMPTED:
        # Deferred by the 451, failed as too old (a creation time in 1969), delivered to
        # an address the 451 was not for.
        assert state in ("deferred", "failed", "delivered")
        assert error is None or not error.startswith(UNREADABLE)
    elif then == DATED:
        assert state == "deferred"  # made due, attempted: the 451
        assert error is None or not error.startswith(UNREADABLE)
    elif then == REFUSED:
        assert state == "failed"
        assert error is not None and "cannot be sent" in error
    else:
        assert state in ("queued", "bounced")


def test_sqlite_next_due_passes_over_a_due_time_that_is_none(sqlite_path: Path) -> None:
    """A pending row without a due time (never leased) beside a lane with one: the
    worker's idle wait read them together and failed with a TypeError."""
    store = SQLiteStore(sqlite_path)
    try:
        now = datetime.now(UTC)
        store.enqueue(message("good0@example.org"), now=now)
        victim = store.enqueue(message(VICTIM), now=now)
        damage_sqlite(
            sqlite_path,
            Damage(
                "UPDATE recipients SET next_attempt_at = NULL, lane = 'zzz'"
                f" WHERE message_seq = {SEQ}",
                LEFT,
            ),
            victim,
        )
        assert store.next_due(now=now) is not None
    finally:
        store.close()


def test_sqlite_dashboard_page_lists_a_message_with_unreadable_recipient_columns(
    sqlite_path: Path,
) -> None:
    """The dashboard's queue page looked each listed id up among the statuses read, and an
    unreadable message's missing status raised KeyError. The page reads no recipient's
    attempt count or times (only a summary per message): the message is listed, and its
    own page says it cannot be shown and how to cancel it."""
    store = SQLiteStore(sqlite_path)
    try:
        now = datetime.now(UTC)
        good = store.enqueue(message("good0@example.org"), now=now)
        victim = store.enqueue(message(VICTIM), now=now)
        damage_sqlite(sqlite_path, SQLITE["attempts text"], victim)
        damage_sqlite(sqlite_path, SQLITE["first_attempt_at text"], victim)
        page = open_read_model(store, cache_seconds=0).queue_page(
            QueueQuery(view=QueueView.ALL), now=now
        )
        assert [m.id for m in page.messages] == [victim, good]
        with pytest.raises(UnreadableRow):
            store.status(victim)
    finally:
        store.close()


# Columns the worker checks as it leases (the sender must be UTF-8 text, the size the
# octet count of the data): a row failing them is set aside, so its status is unreadable.
UNREADABLE_HEAD = {
    "envelope_from not UTF-8": SQLITE["envelope_from not UTF-8"],
    "size text": Damage("UPDATE messages SET size = 'big' WHERE id = ?", SET_ASIDE),
    "size negative": Damage("UPDATE messages SET size = -5 WHERE id = ?", SET_ASIDE),
    "size a fraction": Damage("UPDATE messages SET size = 1.5 WHERE id = ?", SET_ASIDE),
}


@pytest.mark.parametrize("kind", list(UNREADABLE_HEAD))
def test_sqlite_status_of_a_message_the_worker_sets_aside_is_unreadable(
    kind: str, sqlite_path: Path
) -> None:
    """The guide: status of a message whose own row is unreadable raises UnreadableRow, and
    the queue's lists and the dashboard leave it out. Such a sender or size came back in
    MessageStatus as it was (a str size, a sender with a lone surrogate): the dashboard's
    queue page then failed as a whole (UnicodeEncodeError) and its message page too."""
    store = SQLiteStore(sqlite_path)
    try:
        now = datetime.now(UTC)
        good = store.enqueue(message("good0@example.org"), now=now)
        victim = store.enqueue(message(VICTIM), now=now)
        damage_sqlite(sqlite_path, UNREADABLE_HEAD[kind], victim)
        with pytest.raises(UnreadableRow):
            store.status(victim)
        assert [m.id for m in store.query(now=now, where=QueueFilter())] == [good]
        page = open_read_model(store, cache_seconds=0).queue_page(
            QueueQuery(view=QueueView.ALL), now=now
        )
        assert [m.id for m in page.messages] == [good]
    finally:
        store.close()


def test_sqlite_an_unreadable_message_can_still_be_cancelled_from_the_dashboard(
    sqlite_path: Path,
) -> None:
    """Its page says to cancel it: the confirmation looks the message up, and an
    unreadable one is there to cancel, not missing (404) nor a store failing (503)."""
    from starlette.testclient import TestClient

    from mailstrom.web import create_app

    store = SQLiteStore(sqlite_path)
    try:
        victim = store.enqueue(message(VICTIM), now=datetime.now(UTC))
        damage_sqlite(sqlite_path, UNREADABLE_HEAD["size text"], victim)
        with TestClient(create_app(store), base_url="http://127.0.0.1:8025") as client:
            page = client.get(f"/action/cancel/{victim}")
            assert page.status_code == 200, page.text[:300]
            assert f"Cancel message {victim}?" in page.text
    finally:
        store.close()


# Columns only shown, each with where its value is found in the message's status.
SHOWN_COLUMNS: dict[str, tuple[str, Callable[[MessageStatus], object]]] = {
    "subject": ("UPDATE messages SET subject = {} WHERE id = ?", lambda s: s.subject),
    "Message-ID": (
        "UPDATE messages SET header_message_id = {} WHERE id = ?",
        lambda s: s.header_message_id,
    ),
    "error": (
        f"UPDATE recipients SET error = {{}} WHERE message_seq = {SEQ}",
        lambda s: s.recipients[0].error,
    ),
    "reply text": (
        f"UPDATE recipients SET reply_code = 451, reply_text = {{}} WHERE message_seq = {SEQ}",
        lambda s: s.recipients[0].reply and s.recipients[0].reply.text,
    ),
    # Set aside by the worker (SQLITE["address not UTF-8"]), but shown until then and
    # after: the queue page lists a message of one recipient by its address.
    "recipient address": (
        f"UPDATE recipients SET address = {{}} || address WHERE message_seq = {SEQ}",
        lambda s: s.recipients[0].address.removesuffix(VICTIM),
    ),
}


@pytest.mark.parametrize("column", list(SHOWN_COLUMNS))
def test_sqlite_a_shown_column_not_utf8_is_shown_with_a_replacement_character(
    column: str, sqlite_path: Path
) -> None:
    """A Subject, Message-ID, error or reply holding octets that are not UTF-8 does not
    stop delivery (each is only shown), but it came back in the status as a lone
    surrogate, which nothing can encode: the dashboard's queue page (for a Subject) or the
    message's page answered 500 for that one row. Such octets read as U+FFFD now, as
    `mailstrom show` shows them."""
    from starlette.testclient import TestClient

    from mailstrom.web import create_app

    sql, read = SHOWN_COLUMNS[column]
    store = SQLiteStore(sqlite_path)
    try:
        now = datetime.now(UTC)
        store.enqueue(message("good0@example.org"), now=now)
        victim = store.enqueue(message(VICTIM), now=now)
        damage_sqlite(sqlite_path, Damage(sql.format(NOT_UTF8), ATTEMPTED), victim)
        assert read(store.status(victim)) == "\ufffd"
        with TestClient(create_app(store), base_url="http://127.0.0.1:8025") as client:
            assert client.get("/queue").status_code == 200
            assert client.get(f"/message/{victim}").status_code == 200
    finally:
        store.close()


# A deferred recipient's columns the dashboard's destinations show as the last reply.
DEFERRED_REPLY: dict[str, str] = {
    "error": f"UPDATE recipients SET error = {NOT_UTF8} WHERE message_seq = {SEQ}",
    "reply text": (
        f"UPDATE recipients SET reply_code = 451, reply_text = {NOT_UTF8} WHERE message_seq = {SEQ}"
    ),
    "reply enhanced": (
        f"UPDATE recipients SET reply_code = 451, reply_enhanced = {NOT_UTF8},"
        f" reply_text = 'later' WHERE message_seq = {SEQ}"
    ),
}


@pytest.mark.parametrize("column", list(DEFERRED_REPLY))
def test_sqlite_a_deferred_reply_not_utf8_is_shown_with_a_replacement_character(
    column: str, sqlite_path: Path
) -> None:
    """The dashboard's overview and destinations show the last reply of each destination
    with deferred mail, read by the SQLite read model from the newest deferred recipient's
    row without the status read's check (:func:`shown_text`): an error or reply holding
    octets that are not UTF-8 came back as lone surrogates, and the overview and the
    destinations page answered 500 for that one row."""
    from starlette.testclient import TestClient

    from mailstrom.web import create_app

    store = SQLiteStore(sqlite_path)
    try:
        now = datetime.now(UTC)
        store.enqueue(message("good0@example.org"), now=now)
        victim = store.enqueue(message(VICTIM), now=now)
        lease = store.lease(now=now, limit=10, lease_for=timedelta(minutes=5))
        assert lease is not None
        store.record(
            [
                RecipientResult(
                    message_id=item.message_id,
                    address=r.address,
                    lease_token=lease.token,
                    ref=r.ref,
                    state=RecipientState.DEFERRED,
                    attempt=Attempt(at=now, outcome=AttemptOutcome.TEMPORARY, error="later"),
                    next_attempt_at=now + timedelta(hours=1),
                )
                for item in lease.items
                for r in item.recipients
                if r.address == VICTIM
            ]
        )
        damage_sqlite(sqlite_path, Damage(DEFERRED_REPLY[column], ATTEMPTED), victim)
        model = open_read_model(store, cache_seconds=0)
        try:
            (shown,) = model.destinations(domain="example.org")
            overview = model.overview(now=now)
        finally:
            model.close()
        assert shown.last_reply is not None and "\ufffd" in shown.last_reply
        assert overview.top_deferred == (shown,)
        with TestClient(create_app(store), base_url="http://127.0.0.1:8025") as client:
            assert client.get("/").status_code == 200
            assert client.get("/destinations").status_code == 200
    finally:
        store.close()


@pytest.mark.parametrize(
    "code", [NOT_UTF8, "'soon'", "X'ff'", "4.5"], ids=["not-utf8", "text", "blob", "real"]
)
def test_sqlite_a_reply_code_that_is_no_number_leaves_the_reply_out(
    code: str, sqlite_path: Path
) -> None:
    """A reply's code is read back as the SMTPReply's number: one changed by hand to text
    holding octets that are not UTF-8 came back as a lone surrogate, and the overview,
    the queue, the destinations and the message's page all answered 500 (a text or a
    blob was shown as the code). The reply is left out, as a summary leaves out a reply
    column that is no text; the recipient's error still shows."""
    from starlette.testclient import TestClient

    from mailstrom.web import create_app

    store = SQLiteStore(sqlite_path)
    try:
        now = datetime.now(UTC)
        victim = store.enqueue(message(VICTIM), now=now)
        lease = store.lease(now=now, limit=10, lease_for=timedelta(minutes=5))
        assert lease is not None
        store.record(
            [
                RecipientResult(
                    message_id=victim,
                    address=VICTIM,
                    lease_token=lease.token,
                    state=RecipientState.DEFERRED,
                    attempt=Attempt(at=now, outcome=AttemptOutcome.TEMPORARY, error="later"),
                    next_attempt_at=now + timedelta(hours=1),
                )
            ]
        )
        damage_sqlite(
            sqlite_path,
            Damage(
                f"UPDATE recipients SET reply_code = {code}, reply_text = 'try later'"
                f" WHERE message_seq = {SEQ}",
                ATTEMPTED,
            ),
            victim,
        )
        (recipient,) = store.status(victim).recipients
        assert (recipient.reply, recipient.error) == (None, "later")
        model = open_read_model(store, cache_seconds=0)
        try:
            (shown,) = model.destinations()
            (page,) = model.queue_page(QueueQuery(view=QueueView.ALL), now=now).messages
        finally:
            model.close()
        assert shown.last_reply == "later"
        assert page.reason == "later"
        with TestClient(create_app(store), base_url="http://127.0.0.1:8025") as client:
            for path in ("/", "/queue", "/destinations", f"/message/{victim}"):
                assert client.get(path).status_code == 200, path
    finally:
        store.close()


@pytest.mark.parametrize(
    ("data", "octets"),
    [
        ("5", None),
        ("-1", None),
        ("4.5", None),
        ("'caf\u00e9'", "café".encode()),
        (NOT_UTF8, b"\xff"),
    ],
    ids=["five", "negative", "real", "text", "text-not-utf8"],
)
def test_sqlite_message_data_that_is_no_octets_is_unreadable(
    data: str, octets: bytes | None, sqlite_path: Path
) -> None:
    """A message's data changed by hand to a number was read as ``bytes(n)``: five NULs
    for 5, a bare ValueError for -1 and a TypeError for 4.5 (``mailstrom show``), and the
    message's page said the queue could not be read right now (503, the blob handle
    refusing the value). Text was a TypeError without a limit, and read with one as only
    its first octets. A number is an unreadable row now, and text its octets."""
    from starlette.testclient import TestClient

    from mailstrom.web import create_app

    store = SQLiteStore(sqlite_path)
    try:
        victim = store.enqueue(message(VICTIM), now=datetime.now(UTC))
        damage_sqlite(
            sqlite_path,
            Damage(f"UPDATE message_data SET data = {data} WHERE seq = {SEQ}", SET_ASIDE),
            victim,
        )
        model = open_read_model(store, cache_seconds=0)
        try:
            reads = [
                lambda: store.message_data(victim),
                lambda: model.message_data(victim),
                lambda: model.message_data(victim, limit=100),
                lambda: model.message_data(victim, limit=2),
            ]
            if octets is None:
                for read in reads:
                    with pytest.raises(UnreadableRow):
                        read()
            else:
                assert [read() for read in reads] == [octets, octets, octets, octets[:2]]
        finally:
            model.close()
        with TestClient(create_app(store), base_url="http://127.0.0.1:8025") as client:
            page = client.get(f"/message/{victim}")
        if octets is None:
            assert (page.status_code, "cannot be shown" in page.text) == (500, True)
        else:
            assert page.status_code == 200
    finally:
        store.close()


def test_sqlite_a_count_not_utf8_is_shown_escaped_on_the_message_page(sqlite_path: Path) -> None:
    """A column the status read passes on as it is (a recipient's attempts: a text
    there is set aside by the next lease, SQLITE["attempts text"], but shown until then)
    holding octets that are not UTF-8 came back as a lone surrogate, which no page can
    encode: the message's page answered 500. A page shows one as a ``\\uXXXX`` escape."""
    from starlette.testclient import TestClient

    from mailstrom.web import create_app

    store = SQLiteStore(sqlite_path)
    try:
        victim = store.enqueue(message(VICTIM), now=datetime.now(UTC))
        damage_sqlite(
            sqlite_path,
            Damage(
                f"UPDATE recipients SET attempts = {NOT_UTF8} WHERE message_seq = {SEQ}", SET_ASIDE
            ),
            victim,
        )
        with TestClient(create_app(store), base_url="http://127.0.0.1:8025") as client:
            page = client.get(f"/message/{victim}")
            assert page.status_code == 200
            assert "\\udcff" in page.text
    finally:
        store.close()


@pytest.mark.parametrize(
    "damaged",
    [f"{NOT_UTF8} || domain", f"CAST({NOT_UTF8} || domain AS BLOB)"],
    ids=["text", "blob"],
)
def test_sqlite_a_destination_not_utf8_is_shown_with_a_replacement_character(
    sqlite_path: Path, damaged: str
) -> None:
    """The dashboard's destinations page lists the domains of pending recipients as the
    SQLite read model reads them from their rows. A domain holding octets that are not
    UTF-8 (set aside by the next lease, SQLITE["domain not UTF-8"], but listed until then)
    came back as lone surrogates: the page answered 500 as a whole for that one row. One
    written as a BLOB (``X'...'`` in the sqlite3 shell) came back as bytes, and the
    overview and the destinations page answered 500 (an AttributeError)."""
    from starlette.testclient import TestClient

    from mailstrom.web import create_app

    store = SQLiteStore(sqlite_path)
    try:
        now = datetime.now(UTC)
        store.enqueue(message("good0@example.org"), now=now)
        victim = store.enqueue(message(VICTIM), now=now)
        lease = store.lease(now=now, limit=10, lease_for=timedelta(minutes=5))
        assert lease is not None
        store.record(
            [
                RecipientResult(
                    message_id=victim,
                    address=VICTIM,
                    lease_token=lease.token,
                    state=RecipientState.DEFERRED,
                    attempt=Attempt(at=now, outcome=AttemptOutcome.TEMPORARY, error="later"),
                    next_attempt_at=now + timedelta(hours=1),
                )
            ]
        )
        damage_sqlite(
            sqlite_path,
            Damage(
                f"UPDATE recipients SET domain = {damaged} WHERE message_seq = {SEQ}",
                SET_ASIDE,
            ),
            victim,
        )
        model = open_read_model(store, cache_seconds=0)
        try:
            found = {(d.domain, d.pending, d.last_reply) for d in model.destinations()}
            (deferred,) = model.overview(now=now).top_deferred
        finally:
            model.close()
        assert found == {("example.org", 1, None), ("\ufffdexample.org", 1, "later")}
        assert (deferred.domain, deferred.pending, deferred.last_reply) == (
            "\ufffdexample.org",
            1,
            "later",
        )
        with TestClient(create_app(store), base_url="http://127.0.0.1:8025") as client:
            assert client.get("/destinations").status_code == 200
            assert client.get("/").status_code == 200
    finally:
        store.close()


def test_sqlite_a_suspension_not_utf8_leaves_the_pages_that_link_it_up(
    sqlite_path: Path,
) -> None:
    """The overview and the destinations page link each suspended destination by its
    domain as read from its row. One holding octets that are not UTF-8 came back as a
    lone surrogate, which Jinja's ``urlencode`` cannot encode: both pages answered 500
    as a whole for that one row. The link carries the octets as stored."""
    from starlette.testclient import TestClient

    from mailstrom.web import create_app

    store = SQLiteStore(sqlite_path)
    try:
        store.suspend("example.org", now=datetime.now(UTC))
        conn = sqlite3.connect(sqlite_path, isolation_level=None)
        conn.execute(f"UPDATE suspensions SET domain = {NOT_UTF8} || domain")
        conn.close()
        with TestClient(create_app(store), base_url="http://127.0.0.1:8025") as client:
            for path in ("/", "/destinations"):
                page = client.get(path)
                assert page.status_code == 200, path
                assert "%FFexample.org" in page.text, path
    finally:
        store.close()


def test_sqlite_a_position_that_is_no_number_is_an_unreadable_row_to_the_actions(
    sqlite_path: Path,
) -> None:
    """A page of a message's recipients ends with the position the next page starts
    after. One changed by hand to text was read with a bare int() outside the checks of
    the rest of the row: a ValueError, so each action's page on the message (which reads
    one recipient of it) answered 500, where the message's own page says that it cannot
    be read and that cancelling it is what to do. It is an unreadable row now, and the
    action's confirmation is shown."""
    from starlette.testclient import TestClient

    from mailstrom.web import create_app

    store = SQLiteStore(sqlite_path)
    try:
        two = dataclasses.replace(message(VICTIM), recipients=(VICTIM, "good0@example.org"))
        victim = store.enqueue(two, now=datetime.now(UTC))
        damage_sqlite(
            sqlite_path,
            Damage(f"UPDATE recipients SET position = 'zz' WHERE message_seq = {SEQ}", LEFT),
            victim,
        )
        model = open_read_model(store, cache_seconds=0)
        try:
            with pytest.raises(UnreadableRow):
                model.message_status(victim, attempts=0, recipients=1)
        finally:
            model.close()
        with TestClient(create_app(store), base_url="http://127.0.0.1:8025") as client:
            assert client.get(f"/action/cancel/{victim}").status_code == 200
    finally:
        store.close()


def test_sqlite_queue_counts_show_a_domain_not_utf8_with_a_replacement_character(
    sqlite_path: Path,
) -> None:
    """``stats()`` counts pending recipients by domain as read from their rows, for
    ``mailstrom queue --counts``, ``Mailstrom.stats()`` and the Prometheus gauge of the
    busiest domains. A domain holding octets that are not UTF-8 (listed until the next
    lease sets its recipient aside) came back as lone surrogates: as a metric label it
    failed every scrape of the worker's metrics, ``/healthz`` aside."""
    from prometheus_client import CollectorRegistry, generate_latest

    from mailstrom.ops.exporter import MailstromCollector
    from mailstrom.status import MetricsSnapshot, WorkerStatus

    store = SQLiteStore(sqlite_path)
    try:
        now = datetime.now(UTC)
        store.enqueue(message("good0@example.org"), now=now)
        victim = store.enqueue(message(VICTIM), now=now)
        damage_sqlite(
            sqlite_path,
            Damage(
                f"UPDATE recipients SET domain = {NOT_UTF8} || domain WHERE message_seq = {SEQ}",
                SET_ASIDE,
            ),
            victim,
        )
        stats = store.stats()
        assert stats.pending_by_domain == {"example.org": 1, "\ufffdexample.org": 1}
        registry = CollectorRegistry()
        registry.register(
            MailstromCollector(
                lambda: MetricsSnapshot(worker=WorkerStatus(running=True), queue=stats)
            )
        )
        assert "\ufffdexample.org" in generate_latest(registry).decode()
    finally:
        store.close()


def walk_pages(store: Store, order: SortOrder) -> list[str]:
    """Every message id of the dashboard's queue pages, one message a page (a bounded
    walk: a cursor that does not move on fails the test instead of hanging it)."""
    model = open_read_model(store, cache_seconds=0)
    now = datetime.now(UTC)
    seen: list[str] = []
    after = None
    try:
        for _ in range(4 * GOOD):
            page = model.queue_page(
                QueueQuery(view=QueueView.ALL, order=order, limit=1, after=after), now=now
            )
            seen += [m.id for m in page.messages]
            if page.next is None:
                return seen
            after = page.next
    finally:
        model.close()
    raise AssertionError(f"the pages never end: {seen}")


def fill_for_pages(store: Store) -> tuple[list[str], str]:
    now = datetime.now(UTC)
    good = [store.enqueue(message(f"good{i}@example.org"), now=now) for i in range(2)]
    victim = store.enqueue(message(VICTIM), now=now)
    good.append(store.enqueue(message("good2@example.org"), now=now))
    return good, victim


@pytest.mark.parametrize("order", list(SortOrder))
@pytest.mark.parametrize(
    "created_at", ["'2026-01-05 12:00:00'", "X'00'", "9000000000000000000", "-9000000000000000000"]
)
def test_sqlite_dashboard_pages_past_a_creation_time_that_is_no_time(
    sqlite_path: Path, order: SortOrder, created_at: str
) -> None:
    """A page ending on a message whose creation time is text (or a number past any time)
    raised building the next page's cursor; the walk now skips such messages (left out
    as unreadable) and still lists every other one, once."""
    store = SQLiteStore(sqlite_path)
    try:
        good, victim = fill_for_pages(store)
        damage = Damage(f"UPDATE messages SET created_at = {created_at} WHERE id = ?", SET_ASIDE)
        damage_sqlite(sqlite_path, damage, victim)
        assert sorted(walk_pages(store, order)) == sorted(good)
    finally:
        store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("order", list(SortOrder))
@pytest.mark.parametrize("created_at", ["infinity", "-infinity", "10000-01-01 00:00+00"])
def test_postgres_dashboard_leaves_out_a_creation_time_the_driver_cannot_hold(
    postgres_url: str, pg_store: PostgresStore, order: SortOrder, created_at: str
) -> None:
    """The dashboard's queue page failed as a whole (StoreRefusedData) on one message whose
    creation time is infinity or past year 9999; it now leaves that message out with a
    warning, as the store's own lists do, and pages past it."""
    good, victim = fill_for_pages(pg_store)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE messages SET created_at = %s::timestamptz WHERE id = %s", (created_at, victim)
        )
    assert sorted(walk_pages(pg_store, order)) == sorted(good)


def check_undated_made_due(store: Store, good: str, victim: str) -> None:
    """The victim has no due time, the good message is due in an hour: next_due answers
    now (it answered the hour, or on SQLite nothing at all, and the victim was never
    leased), and the next lease takes the victim, whose recipient is valid otherwise."""
    now = datetime.now(UTC)
    assert store.next_due(now=now) == now
    lease = store.lease(now=now, limit=10, lease_for=timedelta(minutes=5))
    assert lease is not None
    assert [r.address for item in lease.items for r in item.recipients] == [VICTIM]
    # Now the victim's lease: its expiry comes before the good message's hour.
    assert store.next_due(now=now) == lease.expires_at


def test_sqlite_next_due_makes_a_recipient_without_a_due_time_due(sqlite_path: Path) -> None:
    store = SQLiteStore(sqlite_path)
    try:
        now = datetime.now(UTC)
        good = store.enqueue(message("good0@example.org"), now=now)
        victim = store.enqueue(message(VICTIM), now=now)
        damage_sqlite(sqlite_path, SQLITE["next_attempt_at NULL"], victim)
        later = (
            "UPDATE recipients SET next_attempt_at = next_attempt_at + 3600000000"
            f" WHERE message_seq = {SEQ}"
        )
        damage_sqlite(sqlite_path, Damage(later, LEFT), good)
        check_undated_made_due(store, good, victim)
    finally:
        store.close()


def test_a_read_only_store_leaves_the_undated_recipient_and_still_sees_later_dues(
    sqlite_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that cannot write (``mailstrom status`` and the dashboard open it
    read-only) cannot make the recipient due: it says so, and its next_due is still the
    good message's hour (on SQLite the undated row sorts first in its lane)."""
    store = SQLiteStore(sqlite_path)
    try:
        now = datetime.now(UTC)
        good = store.enqueue(message("good0@example.org"), now=now)
        victim = store.enqueue(message(VICTIM), now=now)
    finally:
        store.close()
    damage_sqlite(sqlite_path, SQLITE["next_attempt_at NULL"], victim)
    later = (
        "UPDATE recipients SET next_attempt_at = next_attempt_at + 3600000000"
        f" WHERE message_seq = {SEQ}"
    )
    damage_sqlite(sqlite_path, Damage(later, LEFT), good)
    reader = SQLiteStore(sqlite_path, read_only=True)
    try:
        due = reader.next_due(now=now)
        assert due is not None and timedelta(minutes=59) < due - now <= timedelta(hours=1)
        assert "pending recipients without a due time not made due" in caplog.text
        assert reader.status(victim).recipients[0].next_attempt_at is None
    finally:
        reader.close()


@pytest.mark.postgres
def test_postgres_next_due_makes_a_recipient_without_a_due_time_due(
    postgres_url: str, pg_store: PostgresStore
) -> None:
    now = datetime.now(UTC)
    good = pg_store.enqueue(message("good0@example.org"), now=now)
    victim = pg_store.enqueue(message(VICTIM), now=now)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE recipients SET next_attempt_at = NULL WHERE message_id = %s", (victim,)
        )
        conn.execute(
            "UPDATE recipients SET next_attempt_at = next_attempt_at + interval '1 hour'"
            " WHERE message_id = %s",
            (good,),
        )
    check_undated_made_due(pg_store, good, victim)


def check_once_delivers_the_undated_alone(store: Store, dns: LoopbackDNS, mx: Any) -> None:
    """A ``once`` run that finds only a recipient without a due time: its first lease
    finds nothing due and nothing is in flight, so it ended without asking next_due, and
    the recipient stayed queued at every ``mailstrom worker --once``. It is now made due
    and attempted (the server's 451 defers it)."""
    heard = deliver_once(store, dns, mx)
    assert mx.commands.count("RCPT") == 1  # the victim's, answered 451
    assert [(r.address, r.state) for r in heard] == [(VICTIM, RecipientState.DEFERRED)]


def test_sqlite_a_once_run_delivers_a_recipient_without_a_due_time(
    sqlite_path: Path, dns_server: LoopbackDNS, mx: Any
) -> None:
    store = SQLiteStore(sqlite_path)
    try:
        victim = store.enqueue(message(VICTIM), now=datetime.now(UTC))
        damage_sqlite(sqlite_path, SQLITE["next_attempt_at NULL"], victim)
        check_once_delivers_the_undated_alone(store, dns_server, mx)
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_a_once_run_delivers_a_recipient_without_a_due_time(
    postgres_url: str, pg_store: PostgresStore, dns_server: LoopbackDNS, mx: Any
) -> None:
    victim = pg_store.enqueue(message(VICTIM), now=datetime.now(UTC))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE recipients SET next_attempt_at = NULL WHERE message_id = %s", (victim,)
        )
    check_once_delivers_the_undated_alone(pg_store, dns_server, mx)


def test_a_lease_of_set_aside_recipients_alone_is_reported(
    sqlite_path: Path, dns_server: LoopbackDNS, mx: Any
) -> None:
    """A lease whose every recipient is set aside holds no work, only Lease.failed: the
    worker reports them and carries on (the store returned no lease, and the worker
    heard nothing of them)."""
    store = SQLiteStore(sqlite_path)
    try:
        victim = store.enqueue(message(VICTIM), now=datetime.now(UTC))
        damage_sqlite(sqlite_path, SQLITE["data truncated"], victim)
        heard = deliver_once(store, dns_server, mx)
        assert [(r.message_id, r.state) for r in heard] == [(victim, RecipientState.FAILED)]
        assert store.status(victim).recipients[0].state is RecipientState.FAILED
        assert mx.received == []
    finally:
        store.close()


@pytest.mark.parametrize("tags", ["'[\"t\",'", '\'{"a": "t"}\'', "X'5b2274225d'"])
def test_sqlite_a_tag_filter_passes_over_tags_that_are_no_json_list(
    tags: str, sqlite_path: Path
) -> None:
    """Tags that are no JSON list (a row changed by hand) read as no tags in the message's
    status, but a filter by tag failed the whole listing and its count ("malformed JSON",
    a StoreError retried for ever), or matched an object's values: the row is passed
    over now, as it has no tags."""
    store = SQLiteStore(sqlite_path)
    try:
        now = datetime.now(UTC)
        tagged = dataclasses.replace(
            message("good0@example.org"), attributes=QueueAttributes(tags=("t",))
        )
        good = store.enqueue(tagged, now=now)
        victim = store.enqueue(tagged, now=now + timedelta(seconds=1))
        damage_sqlite(
            sqlite_path,
            Damage(f"UPDATE messages SET tags = {tags} WHERE id = ?", ATTEMPTED),
            victim,
        )
        assert store.status(victim).tags == ()
        for where in (QueueFilter(tag="t"), QueueFilter(tag="t", state=RecipientState.QUEUED)):
            assert [m.id for m in store.query(now=now, where=where)] == [good]
            assert store.count(now=now, where=where, cap=100) == 1
    finally:
        store.close()

"""What only the SQLite store promises: schema versioning, query plans, group commit."""

from __future__ import annotations

import pickle
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import mailstrom.stores.sqlite as sqlite_module
from mailstrom.errors import StoreCorrupt, StoreError
from mailstrom.message.attributes import QueueAttributes
from mailstrom.stores import QueueFilter, SQLiteStore
from mailstrom.stores import base as stores_base
from mailstrom.stores.sqlite import _Enqueue
from mailstrom.stores.sqlite_policy_prune import PRUNE_POLICIES_SQL
from mailstrom.stores.sqlite_queue import (
    PENDING_LANES_SQL,
    SUSPENDED_SQL,
    lanes_walk_sql,
    next_due_sql,
)
from mailstrom.stores.sqlite_schema import from_us, migrations, to_us
from mailstrom.stores.sqlite_shaping import FORGET_SQL, THROTTLES_SQL
from tests.support.deadline import hang_guard

from .support import LEASE_FOR, NOW, lease_all, message
from .test_held_finished import FINISHES


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


def test_schema_version_is_recorded_and_migrations_run_once(db: Path) -> None:
    latest = migrations()[-1][0]
    SQLiteStore(db).close()
    with closing(sqlite3.connect(db)) as conn, conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (latest,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA page_size").fetchone() == (4096,)
    store = SQLiteStore(db)  # a second open must not try to create the tables again
    store.enqueue(message(), now=NOW)
    store.close()


def test_a_newer_schema_is_refused(db: Path) -> None:
    SQLiteStore(db).close()
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("PRAGMA user_version = 9999")
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(db)


def migrated_by_a_newer_mailstrom(db: Path, *statements: str) -> None:
    """What a newer mailstrom's migration does, from another connection: ``statements``,
    then a schema version this one does not know."""
    with closing(sqlite3.connect(db)) as conn, conn:
        for statement in statements:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 9999")


def test_a_lease_refuses_a_schema_a_newer_mailstrom_migrated_to_meanwhile(db: Path) -> None:
    """A store open before the migration leased (and recorded) on with statements written
    for the schema it knows; now its lease fails for good, leasing nothing, and so does
    every later call: the leases a stopping worker would give back are left to expire."""
    store = SQLiteStore(db)
    try:
        store.enqueue(message("a@example.org"), now=NOW)
        held = lease_all(store)
        store.enqueue(message("b@example.org"), now=NOW)
        migrated_by_a_newer_mailstrom(db)
        with pytest.raises(StoreCorrupt, match="newer than this mailstrom understands"):
            store.record_and_lease([], now=NOW, limit=10, lease_for=LEASE_FOR)
        with pytest.raises(StoreCorrupt, match="migrated it while this one had it open"):
            store.release(held)
        with pytest.raises(StoreCorrupt, match="newer"):
            store.enqueue(message("c@example.org"), now=NOW)
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as conn:
        leases = conn.execute("SELECT address, lease_token IS NOT NULL FROM recipients")
        assert sorted(leases) == [("a@example.org", 1), ("b@example.org", 0)]


def test_a_schema_changed_under_the_store_is_no_passing_trouble(db: Path) -> None:
    """A call other than a lease (a view, the heartbeat's) whose statement a newer
    mailstrom's change of the schema broke failed with StoreError "no such column", a
    passing trouble retried for ever; it is StoreCorrupt, as the newer schema is."""
    store = SQLiteStore(db)
    try:
        store.enqueue(message("a@example.org"), now=NOW)
        migrated_by_a_newer_mailstrom(
            db, "ALTER TABLE recipients RENAME COLUMN next_attempt_at TO due_at"
        )
        with pytest.raises(StoreCorrupt, match="schema version 9999 is newer"):
            store.next_due(now=NOW)
        with pytest.raises(StoreCorrupt, match="newer"):
            store.stats()
    finally:
        store.close()


def test_a_broken_statement_on_a_known_schema_stays_a_passing_trouble(db: Path) -> None:
    """Only a newer schema makes "no such column" permanent (a column an operator renamed
    by hand fails as before)."""
    store = SQLiteStore(db)
    try:
        store.enqueue(message("a@example.org"), now=NOW)
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("ALTER TABLE recipients RENAME COLUMN next_attempt_at TO due_at")
        with pytest.raises(StoreError, match="no such column") as raised:
            store.next_due(now=NOW)
        assert not isinstance(raised.value, StoreCorrupt)
    finally:
        store.close()


def test_migrations_are_packaged_and_numbered_from_one() -> None:
    numbers = [n for n, _ in migrations()]
    # Distinct and growing from 1; a gap is allowed (branches take numbers ahead).
    assert numbers[:3] == [1, 2, 3] and numbers == sorted(set(numbers))


@pytest.mark.parametrize(
    ("query", "binds"),
    [
        (lanes_walk_sql(1), ["bulk", 1, 10]),
        (lanes_walk_sql(1, f"{SUSPENDED_SQL} AND "), [1, "bulk", 1, 10]),
        (next_due_sql(""), ["bulk"]),
    ],
)
def test_lease_walks_the_due_index_without_sorting(
    db: Path, query: str, binds: list[object]
) -> None:
    SQLiteStore(db).close()
    with closing(sqlite3.connect(db)) as conn, conn:
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query, binds))
    assert "USING INDEX recipients_lane_due (lane=?" in plan
    assert "TEMP B-TREE" not in plan


def test_several_lanes_merge_their_walks_and_sort_only_what_they_read(db: Path) -> None:
    SQLiteStore(db).close()
    with closing(sqlite3.connect(db)) as conn, conn:
        plan = [
            row[3]
            for row in conn.execute(
                "EXPLAIN QUERY PLAN " + lanes_walk_sql(2), ["a", 1, 10, "b", 1, 10, 10]
            )
        ]
    searches = [p for p in plan if p.startswith("SEARCH recipients USING INDEX")]
    assert len(searches) == 2 and all("recipients_lane_due (lane=?" in p for p in searches)
    assert not any(p.startswith("SCAN recipients") for p in plan)


@pytest.mark.parametrize(
    ("query", "binds", "seek"),
    [(FORGET_SQL, [1], "(until<?)"), (THROTTLES_SQL, [1, 2], "(until>?)")],
)
def test_pauses_are_found_by_their_end_not_by_reading_them_all(
    db: Path, query: str, binds: list[object], seek: str
) -> None:
    """Was: each throttle's cleanup and each worker's refresh read every pause kept (a
    day after it ended), so recording 20,000 pauses of distinct destinations cost
    O(N^2). Both now seek the pauses ending before, or after, a time."""
    SQLiteStore(db).close()
    with closing(sqlite3.connect(db)) as conn, conn:
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query, binds))
    assert f"SEARCH destination_throttles USING INDEX destination_throttles_until {seek}" in plan
    assert "SCAN destination_throttles" not in plan


def test_expired_mta_sts_policies_are_found_by_their_expiry(db: Path) -> None:
    """A batch of the pruning of expired MTA-STS policies seeks the oldest expiries: it
    does not read every policy cached (one per recipient domain) for each batch."""
    SQLiteStore(db).close()
    with closing(sqlite3.connect(db)) as conn, conn:
        query = "EXPLAIN QUERY PLAN " + PRUNE_POLICIES_SQL
        plan = " ".join(row[3] for row in conn.execute(query, [1, 10]))
    assert "USING INDEX mta_sts_policies_expiry (expires_at<?)" in plan, plan
    assert "SCAN mta_sts_policies" not in plan, plan


def test_pending_lanes_seek_from_lane_to_lane(db: Path) -> None:
    store = SQLiteStore(db)
    for lane in ("transactional", "bulk", "bulk", "", "zeta"):
        store.enqueue(
            replace(message("a@example.org"), attributes=QueueAttributes(priority=lane or None)),
            now=NOW,
        )
    store.close()
    with closing(sqlite3.connect(db)) as conn, conn:
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + PENDING_LANES_SQL))
        assert "SEARCH r USING INDEX recipients_lane_due (lane>?)" in plan
        assert [lane for (lane,) in conn.execute(PENDING_LANES_SQL)] == [
            "",
            "bulk",
            "transactional",
            "zeta",
        ]


def test_times_round_trip_exactly_and_naive_times_are_refused() -> None:
    assert from_us(to_us(NOW)) == NOW
    with pytest.raises(ValueError, match="naive"):
        to_us(datetime(2030, 1, 1))


def test_group_commit_reports_a_failure_only_to_its_caller(db: Path) -> None:
    store = SQLiteStore(db)
    # A recipient listed twice breaks the (message, address) key: a fault to inject.
    good1 = _Enqueue(messages=[message("a@example.org")], now=to_us(NOW), hold=False)
    bad = _Enqueue(messages=[message("x@example.org", "x@example.org")], now=to_us(NOW), hold=False)
    good2 = _Enqueue(messages=[message("b@example.org")], now=to_us(NOW), hold=False)
    with store._write_lock:
        store._commit_batch([good1, bad, good2], time.monotonic() + 30)

    assert all(r.done for r in (good1, bad, good2))
    assert isinstance(bad.error, StoreError)
    assert bad.ids == []
    assert good1.error is None
    assert good2.error is None
    assert [store.status(i).recipients[0].address for i in good1.ids + good2.ids] == [
        "a@example.org",
        "b@example.org",
    ]
    assert store.stats().messages == 2
    store.close()


def _write_unwritable_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a recipient no driver can encode through to the write, as a message failing
    at its row: every store refuses one before writing now (stores.base._check_texts)."""
    monkeypatch.setattr(stores_base, "_check_texts", lambda message: None)


def test_enqueue_raises_store_error_and_stores_nothing(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_unwritable_texts(monkeypatch)
    store = SQLiteStore(db)
    with pytest.raises(StoreError):
        # Refused at the second recipient's row, after the message's (a duplicate
        # recipient did so until every store refused it before writing).
        store.enqueue(message("x@example.org", "y\udc80@example.org"), now=NOW)
    assert store.stats().messages == 0
    store.close()


@pytest.mark.parametrize("group_commit", [True, False])
def test_concurrent_enqueues_are_all_durable(db: Path, group_commit: bool) -> None:
    store = SQLiteStore(db, group_commit=group_commit)
    ids: list[list[str]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def run(n: int) -> None:
        start.wait()
        for i in range(25):
            ids[n].append(store.enqueue(message(f"t{n}-{i}@example.org"), now=NOW))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    store.close()

    reopened = SQLiteStore(db)
    all_ids = [i for per_thread in ids for i in per_thread]
    assert len(set(all_ids)) == 100
    assert reopened.stats().messages == 100
    assert len(lease_all(reopened).items) == 100
    for n, per_thread in enumerate(ids):
        assert [reopened.status(i).recipients[0].address for i in per_thread] == [
            f"t{n}-{i}@example.org" for i in range(25)
        ]
    reopened.close()


def test_closed_store_refuses_work(db: Path) -> None:
    store = SQLiteStore(db)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.enqueue(message(), now=NOW)


def test_a_relative_path_keeps_naming_its_file_after_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store opened by a relative path, then the process changes directory (a daemon's
    chdir("/")): the store took its file for deleted (StoreCorrupt, a worker's exit 74),
    and a worker process it was handed to (pickled) opened a new, empty queue there."""
    (tmp_path / "app").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "app")
    store = SQLiteStore("queue.db")
    try:
        first = store.enqueue(message("a@example.org"), now=NOW)
        monkeypatch.chdir(tmp_path / "elsewhere")
        second = store.enqueue(message("b@example.org"), now=NOW)
        assert store.path == str(tmp_path / "app" / "queue.db")
        reopened = pickle.loads(pickle.dumps(store))
        try:
            assert {m.id for m in reopened.recent(10)} == {first, second}
        finally:
            reopened.close()
        assert not (tmp_path / "elsewhere" / "queue.db").exists()
    finally:
        store.close()


def test_memory_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="file path"):
        SQLiteStore(":memory:")


class CommitCounting(SQLiteStore):
    """Counts the transactions that commit enqueues (one fsync each), and the leaders
    that waited for other threads' enqueues before committing."""

    commits = 0
    waits = 0

    def _commit_requests(self, batch: list[Any], deadline: float) -> None:
        self.commits += 1
        super()._commit_requests(batch, deadline)

    def _gather(self, me: int, now: float) -> bool:
        waited = super()._gather(me, now)
        self.waits += waited
        return waited


def test_concurrent_enqueues_share_fsyncs_and_a_lone_one_never_waits(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine v2 #2: four threads enqueueing at once share commits (the leader waits up
    to commit_delay for the others, as PostgreSQL's commit_delay); a thread enqueueing
    alone is committed at once, never delayed."""
    # A thread counts as enqueueing concurrently for 5 ms after its last enqueue; on a
    # loaded machine a thread may wait longer than that for a CPU and drop out of the
    # others' count, and fewer commits are shared. A wider window keeps the count to
    # what the threads do, not to how the machine schedules them.
    monkeypatch.setattr(sqlite_module, "_SIBLING_WINDOW", 0.05)
    store = CommitCounting(db, commit_delay=0.05)
    for i in range(5):
        store.enqueue(message(f"alone{i}@example.org"), now=NOW)
    # Each committed at once: no wait for siblings (counted, not timed, so that a loaded
    # machine cannot fail it).
    assert (store.commits, store.waits) == (5, 0)
    time.sleep(0.1)  # the lone thread is no longer "recent" for the others
    start = threading.Barrier(4)

    def run(n: int) -> None:
        start.wait()
        for i in range(20):
            store.enqueue(message(f"t{n}-{i}@example.org"), now=NOW)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    together = store.commits - 5
    store.close()
    assert store.waits > 0
    # Without the wait about 37 commits carry the 80 enqueues; with it about 21.
    assert together <= 30, together


@pytest.mark.parametrize("change", ["leased_pending", "retry_seqs", "cancel_seqs"])
def test_a_bulk_change_reads_the_listed_messages_recipients_by_message(
    db: Path, change: str
) -> None:
    """The statement a bulk change runs per batch of listed messages, explained: it finds
    their pending recipients by message on recipients_pending_message, and does not walk
    every pending recipient on the state index (12 s for ``hold --all`` on 100,000)."""
    from mailstrom.stores import sqlite_operator

    SQLiteStore(db).close()
    seqs = list(range(1, sqlite_operator.BULK_BATCH + 1))
    statements: list[str] = []
    with closing(sqlite3.connect(db, isolation_level=None)) as conn, conn:
        conn.set_trace_callback(statements.append)
        conn.execute("BEGIN IMMEDIATE")
        if change == "leased_pending":
            sqlite_operator.leased_pending(conn, seqs)
        else:
            getattr(sqlite_operator, change)(conn, seqs, NOW)
        conn.execute("ROLLBACK")
        conn.set_trace_callback(None)
        # A cancel also clears the flag of the held ones that finished (none here).
        assert 1 <= len(statements[1:-1]) <= (2 if change == "cancel_seqs" else 1), statements
        plans = [
            " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement))
            for statement in statements[1:-1]
        ]
    # A cancel's UPDATE ... RETURNING id reads the ids off the index alone (covering).
    assert re.search(
        r"USING (COVERING )?INDEX recipients_pending_message \(message_seq=\?\)", plans[0]
    ), plans
    for plan in plans:
        assert "INDEX recipients_pending_message (message_seq=?)" in plan, plan
        assert "recipients_state_domain" not in plan, plan


def test_the_delivered_mail_of_a_domain_is_read_from_its_delivered_recipients(db: Path) -> None:
    """``queue --state delivered --domain d`` (query, select_ids, count), explained: the
    messages come from the domain's delivered recipients on recipients_state_domain,
    where the queue was walked newest first and each message probed (250 ms at 200,000
    messages for a domain with little delivered mail)."""
    from mailstrom.status import RecipientState
    from mailstrom.stores import QueueFilter
    from mailstrom.stores.sqlite_operator import count_matching, matching_seqs

    store = SQLiteStore(db)
    for _ in range(3):
        store.enqueue(message("a@example.org", "b@example.net"), now=NOW)
    store.close()
    where = QueueFilter(states=frozenset({RecipientState.DELIVERED}), domain="Example.ORG")
    statements: list[str] = []
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "UPDATE recipients SET state = 'delivered', finished_at = 1, next_attempt_at = NULL"
            " WHERE message_seq = 1"
        )
        conn.set_trace_callback(statements.append)
        assert matching_seqs(conn, NOW, where) == [1]
        assert count_matching(conn, NOW, where, 100) == 1
        conn.set_trace_callback(None)
        reads = [s for s in statements if s.startswith("SELECT") and "FROM messages m" in s]
        plans = [
            " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement))
            for statement in reads
        ]
    assert len(plans) == 2, statements
    for plan in plans:
        assert "recipients_state_domain (state=? AND domain=?)" in plan, plan
        assert "SCAN m" not in plan, plan


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ({"failed"}, [1]),
        ({"deferred"}, [3]),
        ({"queued"}, [2]),
        ({"queued", "deferred"}, [3, 2]),
        ({"delivered", "failed"}, [4, 1]),
        (None, [4, 3, 2, 1]),
    ],
)
def test_the_mail_of_a_domain_in_any_state_is_read_from_its_recipients(
    db: Path, states: set[str] | None, expected: list[int]
) -> None:
    """``queue --domain d`` in the failed, pending (queued, deferred) or any state
    (query, select_ids, count), explained: the messages come from the domain's ranges of
    recipients_state_domain in the states a recipient there may be in (any, for a pending
    message), where the queue was walked newest first and each message probed."""
    from mailstrom.stores import QueueFilter
    from mailstrom.stores.sqlite_operator import count_matching, matching_seqs

    store = SQLiteStore(db)
    for _ in range(4):
        store.enqueue(message("a@example.org", "b@example.net"), now=NOW)
    for _ in range(10):  # more queued and deferred recipients than the domain holds
        store.enqueue(message("c@example.com"), now=NOW)
    store.close()
    where = QueueFilter(
        states=None if states is None else frozenset(states),  # type: ignore[arg-type]
        domain="Example.ORG",
    )
    statements: list[str] = []
    with closing(sqlite3.connect(db)) as conn, conn:
        # 1 failed (delivered here), 2 queued, 3 deferred (delivered here), 4 delivered.
        for seq, address, state in [
            (1, "a@example.org", "delivered"),
            (1, "b@example.net", "failed"),
            (3, "a@example.org", "delivered"),
            (3, "b@example.net", "deferred"),
            (4, "a@example.org", "delivered"),
            (4, "b@example.net", "delivered"),
        ]:
            final = state in ("delivered", "failed")
            conn.execute(
                "UPDATE recipients SET state = ?, finished_at = ?,"
                " next_attempt_at = CASE WHEN ? THEN NULL ELSE next_attempt_at END"
                " WHERE message_seq = ? AND address = ?",
                (state, 1 if final else None, final, seq, address),
            )
        conn.execute("UPDATE recipients SET state = 'deferred' WHERE message_seq > 9")
        conn.set_trace_callback(statements.append)
        assert matching_seqs(conn, NOW, where) == expected
        assert count_matching(conn, NOW, where, 100) == len(expected)
        conn.set_trace_callback(None)
        reads = [s for s in statements if s.startswith("SELECT") and "FROM messages" in s]
        reads = [s for s in reads if "max(seq)" not in s]  # the span, by the primary key
        plans = [
            " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement))
            for statement in reads
        ]
    assert len(plans) == 2, statements
    for plan in plans:
        assert "recipients_state_domain (state=? AND domain=?)" in plan, plan
        assert "SCAN m" not in plan and "SCAN n" not in plan, plan


def test_a_count_of_a_domains_deferred_mail_walks_the_few_deferred_recipients(
    db: Path,
) -> None:
    """A count of the deferred mail at a domain with more recipients than the queue has
    deferred ones walks the pending index (it probes the deferred recipients alone), not
    the domain's recipients in every state (300 ms for 100,000 delivered where the walk
    takes 10 ms)."""
    from mailstrom.status import RecipientState
    from mailstrom.stores import QueueFilter
    from mailstrom.stores.sqlite_operator import count_matching

    store = SQLiteStore(db)
    for _ in range(5):
        store.enqueue(message("a@example.org", "b@example.net"), now=NOW)
    store.close()
    where = QueueFilter(state=RecipientState.DEFERRED, domain="example.org")
    statements: list[str] = []
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE recipients SET state = 'deferred' WHERE message_seq = 1")
        conn.execute(
            "UPDATE recipients SET state = 'delivered', finished_at = 1,"
            " next_attempt_at = NULL WHERE message_seq > 1"
        )
        conn.set_trace_callback(statements.append)
        assert count_matching(conn, NOW, where, 100) == 1
        conn.set_trace_callback(None)
    assert not [s for s in statements if "FROM messages m" in s], statements
    assert "recipients_pending_message" in statements[-1], statements


def test_a_lane_lease_walks_its_lane_of_the_due_index_without_sorting(db: Path) -> None:
    """The statements a lease by lanes really runs, each explained: the named lanes read
    their range of recipients_lane_due, and so does the one lane not named (found by
    seeking from lane to lane); no sort."""
    import dataclasses

    from mailstrom.message.attributes import QueueAttributes
    from mailstrom.stores.sqlite_queue import lease_rows

    store = SQLiteStore(db)
    for lane in ("transactional", "bulk", ""):
        prepared = message("a@example.org")
        store.enqueue(
            dataclasses.replace(prepared, attributes=QueueAttributes(priority=lane or None)),
            now=NOW,
        )
    store.close()
    statements: list[str] = []
    with closing(sqlite3.connect(db, isolation_level=None)) as conn, conn:
        conn.set_trace_callback(statements.append)
        conn.execute("BEGIN IMMEDIATE")
        lease = lease_rows(
            conn,
            now=NOW,
            limit=10,
            lease_for=timedelta(minutes=5),
            lanes=[("transactional", 5), ("bulk", 5)],
        )
        conn.execute("ROLLBACK")
        conn.set_trace_callback(None)
        assert lease is not None and len(lease.items) == 3
        walks = [s for s in statements if s.startswith("SELECT id, due FROM")]
        marks = [s for s in statements if s.startswith("UPDATE recipients SET lease_token")]
        assert len(walks) == len(marks) == 3  # two lanes, then the lanes not named

        def plan(statement: str) -> str:
            return " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement))

        walk_plans = [plan(statement) for statement in walks]
        mark_plans = [plan(statement) for statement in marks]
    assert all("recipients_lane_due (lane=?" in p for p in walk_plans), walk_plans
    assert not any("TEMP B-TREE" in p for p in walk_plans), walk_plans
    # What a walk found is stamped by row id.
    assert all("INTEGER PRIMARY KEY (rowid=?)" in p for p in mark_plans), mark_plans


class LockFailingOnce(SQLiteStore):
    """The first commit cannot take the write lock (after a moment, so that other callers
    queue behind it)."""

    failed = False

    @contextmanager
    def _exclusive(self, deadline: float) -> Iterator[None]:
        if not self.failed:
            self.failed = True
            time.sleep(0.05)
            raise OSError("flock failed")
        with super()._exclusive(deadline):
            yield


def test_a_failed_group_commit_fails_its_callers_and_the_lead_passes_on(db: Path) -> None:
    """The callers carried by a commit that could not start get a StoreError; those that
    came too late for it are committed by the next leader; nobody waits forever."""
    store = LockFailingOnce(db, commit_delay=0.01)
    start = threading.Barrier(4)
    outcomes: list[str | Exception] = [""] * 4

    def run(n: int) -> None:
        start.wait()
        time.sleep(0.005 * n)  # one leads; the others arrive while it gathers or fails
        try:
            outcomes[n] = store.enqueue(message(f"t{n}@example.org"), now=NOW)
        except StoreError as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    failed = [o for o in outcomes if isinstance(o, StoreError)]
    queued = [o for o in outcomes if isinstance(o, str)]
    assert failed, outcomes
    assert all("not committed" in str(e) for e in failed)
    assert store.stats().messages == len(queued)
    assert {store.status(i).recipients[0].address for i in queued} <= {
        f"t{n}@example.org" for n in range(4)
    }
    # The store goes on: the next enqueue leads and commits at once.
    store.enqueue(message("after@example.org"), now=NOW)
    assert store.stats().messages == len(queued) + 1
    store.close()


def test_a_lease_of_many_lanes_binds_no_value_per_suspended_domain(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every lane walked by a lease bound each suspended domain again: with enough lanes
    and suspensions a lease passed SQLite's limit on bound values (999 before SQLite
    3.32, 32,766 since: 100 lanes and 330 suspended domains) and failed, "too many SQL
    variables", every time: nothing was delivered any more. The limit is lowered here
    to the old default to show it on a small queue."""
    connect = SQLiteStore._connect

    def limited(store: SQLiteStore) -> sqlite3.Connection:
        conn = connect(store)
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        return conn

    monkeypatch.setattr(SQLiteStore, "_connect", limited)
    store = SQLiteStore(db)
    try:
        for i in range(10):
            store.enqueue(
                replace(
                    message(f"u{i}@example.org"), attributes=QueueAttributes(priority=f"lane{i}")
                ),
                now=NOW,
            )
        for i in range(100):
            store.suspend(f"paused{i}.example", now=NOW)
        store.enqueue(message("p@paused7.example"), now=NOW)
        assert store.next_due(now=NOW) == NOW
        lease = store.lease(now=NOW, limit=100, lease_for=LEASE_FOR)
        assert lease is not None
        assert sorted(r.address for item in lease.items for r in item.recipients) == [
            f"u{i}@example.org" for i in range(10)
        ]
    finally:
        store.close()


class _GatheringTwo(SQLiteStore):
    """A leader that gathers until a second caller's enqueue is pending: one commit then
    carries a follower for sure."""

    def _gather(self, me: int, now: float) -> bool:
        while len(self._pending) < 2:
            self._group.wait(0.01)
        return True


class _InterruptedAfterCommit(sqlite3.Connection):
    """What Ctrl-C during a COMMIT's fsync does: CPython runs the signal handler as soon
    as the call returns, so the KeyboardInterrupt comes with the transaction written."""

    armed = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        cursor = super().execute(sql, *args)
        if sql == "COMMIT" and _InterruptedAfterCommit.armed:
            _InterruptedAfterCommit.armed = False
            raise KeyboardInterrupt
        return cursor


def test_a_leader_interrupted_after_its_commit_gives_its_followers_their_ids(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's thread is interrupted (Ctrl-C on the main thread) right after the
    COMMIT that carried a follower's message returned. The follower was told "enqueue
    interrupted before it was committed" (its ids thrown away as rolled back) while its
    message was queued: a caller that retries sends it twice."""
    connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite3, "connect", lambda *a, **k: connect(*a, **k, factory=_InterruptedAfterCommit)
    )
    store = _GatheringTwo(db)
    outcome: list[str | Exception] = []

    def follow() -> None:
        while not store._leader:
            time.sleep(0.001)
        try:
            outcome.append(store.enqueue(message("follower@example.org"), now=NOW))
        except Exception as exc:
            outcome.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        with hang_guard(20):
            _InterruptedAfterCommit.armed = True
            with pytest.raises(KeyboardInterrupt):
                store.enqueue(message("leader@example.org"), now=NOW)
            follower.join()
        assert store.stats().messages == 2  # both were committed
        assert len(outcome) == 1 and isinstance(outcome[0], str), outcome
        assert store.status(outcome[0]).recipients[0].address == "follower@example.org"
    finally:
        _InterruptedAfterCommit.armed = False
        follower.join(10)
        store.close()


class _Interrupt(Exception):
    """What a signal handler of the application raises (as Ctrl-C raises
    KeyboardInterrupt)."""


class _SignalledAfterCommit(sqlite3.Connection):
    """A signal's handler of the application that raises an Exception (a SIGALRM
    request timeout, say) as the COMMIT's call returns, the transaction written."""

    armed = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        cursor = super().execute(sql, *args)
        if sql == "COMMIT" and _SignalledAfterCommit.armed:
            _SignalledAfterCommit.armed = False
            raise _Interrupt("request timed out")
        return cursor


def test_a_leader_interrupted_by_an_exception_after_its_commit_queues_nothing_twice(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with Ctrl-C, but the handler raises an Exception: taken for a failed shared
    commit, it had every message of the batch inserted again one by one (each queued
    twice) and the leader told of the handler's exception; with a batch of one, its
    caller was told of it while its message was queued. The commit stands: the
    followers get their ids, and the leader's caller the handler's exception."""
    connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite3, "connect", lambda *a, **k: connect(*a, **k, factory=_SignalledAfterCommit)
    )
    store = _GatheringTwo(db)
    outcome: list[str | Exception] = []

    def follow() -> None:
        while not store._leader:
            time.sleep(0.001)
        try:
            outcome.append(store.enqueue(message("follower@example.org"), now=NOW))
        except Exception as exc:
            outcome.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        with hang_guard(20):
            _SignalledAfterCommit.armed = True
            with pytest.raises(_Interrupt):
                store.enqueue(message("leader@example.org"), now=NOW)
            follower.join()
        assert store.stats().messages == 2  # both were committed, once
        assert len(outcome) == 1 and isinstance(outcome[0], str), outcome
        assert store.status(outcome[0]).recipients[0].address == "follower@example.org"
    finally:
        _SignalledAfterCommit.armed = False
        follower.join(10)
        store.close()


class _InterruptedHandingOn(SQLiteStore):
    """A leader interrupted (Ctrl-C on the main thread) as it hands the lead on, after
    the commit that carried a follower (the first commit gathers two for sure)."""

    armed = True

    def _gather(self, me: int, now: float) -> bool:
        while self.armed and len(self._pending) < 2:
            self._group.wait(0.01)
        return True

    def _hand_on(self) -> None:
        if self.armed and threading.current_thread() is threading.main_thread():
            self.armed = False
            raise KeyboardInterrupt
        super()._hand_on()


def test_a_leader_interrupted_as_it_hands_on_leaves_nobody_waiting(db: Path) -> None:
    """The leader's turn releases came after its hand-on in the same ``finally``: a
    KeyboardInterrupt there left the follower its commit carried waiting for its turn
    for ever (a program Ctrl-C'd then hung at exit, joining that thread), and the lead
    with nobody: every later enqueue waited ``busy_timeout`` and failed StoreLocked."""
    store = _InterruptedHandingOn(db, busy_timeout=2)
    outcome: list[str | Exception] = []

    def follow() -> None:
        while not store._leader:
            time.sleep(0.001)
        try:
            outcome.append(store.enqueue(message("follower@example.org"), now=NOW))
        except Exception as exc:
            outcome.append(exc)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        with hang_guard(20):
            with pytest.raises(KeyboardInterrupt):
                store.enqueue(message("leader@example.org"), now=NOW)
            follower.join(10)
            assert not follower.is_alive(), "the follower still waits for its turn"
            assert len(outcome) == 1 and isinstance(outcome[0], str), outcome
            later: list[str | Exception] = []

            def enqueue_later() -> None:
                try:
                    later.append(store.enqueue(message("later@example.org"), now=NOW))
                except Exception as exc:
                    later.append(exc)

            other = threading.Thread(target=enqueue_later)
            other.start()
            other.join(10)
            assert len(later) == 1 and isinstance(later[0], str), later
        assert store.stats().messages == 3
    finally:
        store.close()


class _BrokenHandOn(SQLiteStore):
    """A store whose hand-on of the group commit's lead fails every time (a fault of
    its own, not a signal's handler): the caller must hear of it."""

    def _hand_on(self) -> None:
        raise RuntimeError("hand-on is broken")


def test_a_hand_on_that_fails_every_time_reaches_the_caller(db: Path) -> None:
    """The hand-on is tried again when a signal's handler interrupts it, but only a few
    times: tried until done, a fault of its own spun for ever under the group's lock (a
    Hang raised there was caught as one more interruption)."""
    store = _BrokenHandOn(db, busy_timeout=2)
    try:
        with hang_guard(20), pytest.raises(RuntimeError, match="hand-on is broken"):
            store.enqueue(message("a@example.org"), now=NOW)
    finally:
        store._hand_on = lambda: None  # type: ignore[method-assign]
        store.close()


class _PausedCommit(SQLiteStore):
    """A leader that waits in its commit until told to go on."""

    committing = threading.Event()
    go = threading.Event()

    def _commit_batch(self, batch: list[Any], deadline: float) -> None:
        self.committing.set()
        self.go.wait(20)
        super()._commit_batch(batch, deadline)


def test_a_follower_interrupted_while_it_waits_leaves_the_group_commit_working(
    db: Path,
) -> None:
    """The main thread waits in a group commit as a follower; a signal's handler raises
    there. The leader then handed the lead to that caller, gone: the store led for
    nobody, and every later enqueue of the process waited busy_timeout for its turn and
    failed with StoreLocked."""
    store = _PausedCommit(db)
    store.committing, store.go = threading.Event(), threading.Event()
    main = threading.get_ident()

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupt

    def lead() -> None:
        store.enqueue(message("leader@example.org"), now=NOW)

    def poke() -> None:
        while not store._pending:  # the main thread's request waits its turn
            time.sleep(0.001)
        signal.pthread_kill(main, signal.SIGUSR1)

    leader = threading.Thread(target=lead)
    poker = threading.Thread(target=poke)
    before = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with hang_guard(10):
            leader.start()
            assert store.committing.wait(10)
            poker.start()
            with pytest.raises(_Interrupt):
                store.enqueue(message("interrupted@example.org"), now=NOW)
            store.go.set()
            leader.join()
            after = store.enqueue(message("after@example.org"), now=NOW)
        assert store.status(after).recipients[0].address == "after@example.org"
        # The interrupted caller's message was not taken by a commit: nothing written.
        assert store.stats().messages == 2
    finally:
        signal.signal(signal.SIGUSR1, before)
        store.go.set()
        leader.join(10)
        poker.join(10)
        store.close()


class _InterruptedAtThirdBegin(sqlite3.Connection):
    """Ctrl-C while a transaction waits to begin: the third BEGIN IMMEDIATE of the test
    (the first two: a shared commit that fails, then its first caller's own) raises."""

    begun = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "BEGIN IMMEDIATE":
            _InterruptedAtThirdBegin.begun += 1
            if _InterruptedAtThirdBegin.begun == 3:
                raise KeyboardInterrupt
        return super().execute(sql, *args)


def test_an_interrupt_while_a_failed_commit_is_retried_one_by_one_fails_the_rest(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared commit fails (one caller's message breaks a key) and is retried one
    request at a time; the leader is interrupted before it reaches a follower's. That
    follower was marked done without ids or an error: enqueue raised ValueError ("not
    enough values to unpack") and enqueue_many returned [], nothing queued."""
    _write_unwritable_texts(monkeypatch)
    connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite3, "connect", lambda *a, **k: connect(*a, **k, factory=_InterruptedAtThirdBegin)
    )
    store = _GatheringTwo(db)
    _InterruptedAtThirdBegin.begun = 0
    outcome: list[object] = []

    def follow() -> None:
        while not store._leader:
            time.sleep(0.001)
        try:
            outcome.append(store.enqueue(message("follower@example.org"), now=NOW))
        except Exception as exc:
            outcome.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        with hang_guard(20):
            with pytest.raises(KeyboardInterrupt):
                # A recipient the driver cannot encode fails its batch at its row.
                store.enqueue(message("x@example.org", "y\udc80@example.org"), now=NOW)
            follower.join()
        assert store.stats().messages == 0
        assert len(outcome) == 1 and type(outcome[0]) is StoreError, outcome
        assert "interrupted before it was committed" in str(outcome[0])
    finally:
        follower.join(10)
        store.close()


def _held_rows(db: Path) -> tuple[list[tuple[int]], list[tuple[int]]]:
    """The messages in the held index, and the recipients whose held bit says their
    message is held (bit 1), read past the store."""
    with closing(sqlite3.connect(db)) as conn:
        messages = conn.execute(
            "SELECT seq FROM messages INDEXED BY messages_held WHERE held = 1"
        ).fetchall()
        recipients = conn.execute("SELECT id FROM recipients WHERE held & 1").fetchall()
    return messages, recipients


def _cancelled_in_bulk(store: SQLiteStore, mid: str) -> None:
    store.set_held(mid, True)
    assert store.cancel_many([mid], now=NOW + timedelta(seconds=1)) == 2


@pytest.mark.parametrize(
    "finish",
    [*FINISHES.values(), _cancelled_in_bulk],
    ids=[*FINISHES.keys(), "cancelled in bulk"],
)
def test_a_message_that_finished_while_held_leaves_the_held_index(
    db: Path, finish: Callable[[SQLiteStore, str], None]
) -> None:
    """A message held while its delivery was in flight, or held and then cancelled, kept
    its flag once every recipient was final, and with it its entry in messages_held
    until it was purged: every held listing and count (the dashboard's Held view,
    stats().held, list --held) read and stepped over it, as many of them as an operator
    had held and cancelled. Its flag (and its recipients' copy of it) goes as it
    finishes; a held message still pending keeps both."""
    store = SQLiteStore(db)
    try:
        mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
        waiting = store.enqueue(message("c@example.org"), now=NOW, hold=True)
        finish(store, mid)
        assert store.status(mid).state.is_final
        assert store.status(waiting).held
        assert store.stats().held == 1
    finally:
        store.close()
    messages, recipients = _held_rows(db)
    assert len(messages) == 1 and len(recipients) == 1  # the waiting one's alone


def test_an_upgrade_takes_the_messages_that_finished_while_held_out_of_the_held_index(
    db: Path,
) -> None:
    """Schema version 21: those that finished while held before this mailstrom (their
    flag, and their recipients' copy, left set) lose them; a held message still pending
    keeps them, and a set-aside bit (2) stays."""
    store = SQLiteStore(db)
    try:
        done = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
        waiting = store.enqueue(message("c@example.org"), now=NOW, hold=True)
        assert store.cancel(done, now=NOW) == 2
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as conn, conn:
        # As an older mailstrom left it, version 20.
        conn.execute("UPDATE messages SET held = 1")
        conn.execute("UPDATE recipients SET held = 3")
        conn.execute("PRAGMA user_version = 20")
    messages, recipients = _held_rows(db)
    assert len(messages) == 2 and len(recipients) == 3
    SQLiteStore(db).close()
    messages, recipients = _held_rows(db)
    assert len(messages) == 1 and len(recipients) == 1
    with closing(sqlite3.connect(db)) as conn:
        bits = conn.execute("SELECT DISTINCT held FROM recipients ORDER BY held").fetchall()
    assert bits == [(2,), (3,)]
    store = SQLiteStore(db)
    try:
        assert [m.id for m in store.query(now=NOW, where=QueueFilter(held=True))] == [waiting]
    finally:
        store.close()

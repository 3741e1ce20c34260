"""PostgreSQL: the leases of a worker that stopped saying it lives are given back by the
others' looks (``PostgresStore.release_dead_holders``), judged by the server's clock.

The store URLs give ``dead_after=2s`` (a look every 0.25 s), so that a test waits
seconds, not the default two minutes. The killed holder is a real process: it beats,
leases and sleeps until the test SIGKILLs it.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from mailstrom.status import RecipientState
from mailstrom.stores.dead_holders import DeadHolderReaper
from mailstrom.stores.postgres import PostgresStore
from mailstrom.stores.postgres.connect import DEFAULT_DEAD_AFTER
from mailstrom.stores.postgres.holders import BEAT_AT_LEAST_EVERY, STOP_WAIT
from tests.support.pg_tables import schema_at

from .children import lease_in_child
from .support import LEASE_FOR, NOW, leased_addresses, message, results_for

X = "0123abcd0123abcd"
Y = "89abcdef89abcdef"
Z = "fedcba98fedcba98"
DEAD_AFTER = 2.0


@pytest.fixture
def url(postgres_url: str) -> str:
    return f"{postgres_url}?dead_after={DEAD_AFTER:g}s"


@pytest.fixture
def stores(url: str) -> Iterator[list[PostgresStore]]:
    opened: list[PostgresStore] = []
    yield opened
    for store in opened:
        store.close()


def _open(stores: list[PostgresStore], url: str) -> PostgresStore:
    store = PostgresStore(url, max_size=2)
    stores.append(store)
    return store


def _look_until_released(store: PostgresStore, alive: str, *, within: float) -> tuple[int, float]:
    """Look as a worker does (every ``reap_every``) until a look gives something back;
    returns what it gave back and the seconds from the first look to that one."""
    start = time.monotonic()
    while True:
        released = store.release_dead_holders(alive)
        elapsed = time.monotonic() - start
        if released or elapsed > within:
            return released, elapsed
        time.sleep(store.reap_every)


def _holders(postgres_url: str) -> list[str]:
    with psycopg.connect(postgres_url) as conn:
        return [h for (h,) in conn.execute("SELECT holder FROM lease_holders ORDER BY holder")]


def test_what_a_killed_worker_leased_is_given_back_once_it_went_unseen(
    url: str,
    postgres_url: str,
    stores: list[PostgresStore],
    children: list[subprocess.Popen[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = _open(stores, url)
    assert isinstance(store, DeadHolderReaper)
    assert store.reap_every == DEAD_AFTER / 8
    mid = store.enqueue(message("a@example.org", "b@example.org", "c@example.org"), now=NOW)
    child = lease_in_child(children, url, X, 2, beat=True)
    child.send_signal(signal.SIGKILL)
    child.wait(10)

    with caplog.at_level(logging.WARNING):
        released, after = _look_until_released(store, Y, within=4 * DEAD_AFTER)
    assert released == 2
    # Not before this store itself had looked, unbroken, for dead_after.
    assert after >= DEAD_AFTER

    # Due at once (the child's lease ran for 10 minutes), no attempt counted.
    again = store.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=Y)
    assert sorted(leased_addresses(again)) == ["a@example.org", "b@example.org", "c@example.org"]
    assert [r.attempts for r in store.status(mid).recipients] == [0, 0, 0]
    assert _holders(postgres_url) == [Y]  # the dead one's row went with its leases
    [said] = [r.getMessage() for r in caplog.records if X in r.getMessage()]
    assert said.startswith(f"gave back 2 recipients leased by lease holder {X}, whose worker (")
    assert f"pid {child.pid}) was last seen at " in said
    assert store.release_dead_holders(Y) == 0  # once


def test_a_holder_that_keeps_beating_is_never_taken_for_dead(
    url: str, stores: list[PostgresStore]
) -> None:
    alive, judge = _open(stores, url), _open(stores, url)
    alive.enqueue(message("a@example.org"), now=NOW)
    alive.release_dead_holders(X)
    assert alive.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=X) is not None
    end = time.monotonic() + 2 * DEAD_AFTER
    while time.monotonic() < end:
        assert judge.release_dead_holders(Y) == 0
        assert alive.release_dead_holders(X) == 0
        time.sleep(judge.reap_every)
    assert judge.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=Y) is None


def test_a_break_in_the_judges_looks_starts_its_count_again(
    url: str, stores: list[PostgresStore]
) -> None:
    """A server that nobody reached for a while (a restart, a network cut) stopped every
    holder's beats: no holder is judged by that time."""
    judge, gone = _open(stores, url), _open(stores, url)
    gone.enqueue(message("a@example.org"), now=NOW)
    gone.release_dead_holders(X)
    assert gone.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=X) is not None
    assert judge.release_dead_holders(Y) == 0
    time.sleep(DEAD_AFTER + 0.5)  # no look at all: longer than dead_after since X's beat

    assert judge.release_dead_holders(Y) == 0  # a new run: X is not judged yet
    released, after = _look_until_released(judge, Y, within=4 * DEAD_AFTER)
    assert released == 1
    assert after >= DEAD_AFTER - judge.reap_every  # the run began at the look above


def test_a_holder_taken_for_dead_that_comes_back_says_so_and_its_results_are_ignored(
    url: str,
    postgres_url: str,
    stores: list[PostgresStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    judge, stalled = _open(stores, url), _open(stores, url)
    judge.enqueue(message("a@example.org"), now=NOW)
    stalled.release_dead_holders(X)
    lease = stalled.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=X)
    assert lease is not None
    released, _ = _look_until_released(judge, Y, within=4 * DEAD_AFTER)
    assert released == 1
    again = judge.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=Y)
    assert leased_addresses(again) == ["a@example.org"]

    with caplog.at_level(logging.ERROR):
        assert stalled.release_dead_holders(X) == 0
    [said] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"this worker (lease holder {X}) was taken for dead by another worker" in said
    assert "may be delivered twice" in said
    assert _holders(postgres_url) == [X, Y]  # its row made again
    # What it delivered meanwhile is not recorded: the recipient is another's now.
    assert stalled.record(results_for(lease, RecipientState.DELIVERED)) == []


def test_dead_after_0_judges_nobody(postgres_url: str, stores: list[PostgresStore]) -> None:
    judge = _open(stores, f"{postgres_url}?dead_after=0")
    assert judge.reap_every == BEAT_AT_LEAST_EVERY  # the others judge it
    gone = _open(stores, f"{postgres_url}?dead_after=1s")
    gone.enqueue(message("a@example.org"), now=NOW)
    gone.release_dead_holders(X)
    assert gone.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=X) is not None
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        assert judge.release_dead_holders(Y) == 0
        time.sleep(0.1)
    assert _holders(postgres_url) == [X, Y]


def test_live_holders_are_those_seen_within_dead_after(
    url: str, stores: list[PostgresStore], children: list[subprocess.Popen[str]]
) -> None:
    store = _open(stores, url)
    store.enqueue(message("a@example.org", "b@example.org", "c@example.org"), now=NOW)
    assert store.live_holders() == []
    child = lease_in_child(children, url, X, 2, beat=True)
    store.release_dead_holders(Y)

    [x, y] = store.live_holders()  # oldest first
    assert (x.holder, x.pid, x.host, x.leased) == (X, child.pid, socket.gethostname(), 2)
    assert x.started_at is not None and x.seen_at is not None and x.started_at <= x.seen_at
    assert (y.holder, y.pid, y.leased) == (Y, os.getpid(), 0)
    assert [h.leased for h in store.live_holders(leases=False)] == [0, 0]

    child.send_signal(signal.SIGKILL)
    child.wait(10)
    time.sleep(DEAD_AFTER)  # X's last beat is now older than dead_after, and Y's
    assert store.live_holders() == []
    store.release_dead_holders(Y)  # Y beats again; X stays unseen
    assert [h.holder for h in store.live_holders()] == [Y]


def test_a_closed_stores_holders_go_at_the_next_look_without_judging(
    url: str,
    postgres_url: str,
    stores: list[PostgresStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that stops says so: its row goes at once (a cron `--once` worker leaves
    none behind), and what a stop that ran out of time left leased comes back with it."""
    leaving = PostgresStore(url, max_size=2)
    leaving.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    leaving.release_dead_holders(X)
    assert leaving.lease(now=NOW, limit=1, lease_for=LEASE_FOR, holder=X) is not None
    leaving.close()

    store = _open(stores, url)
    assert store.live_holders() == []  # stopped: not among the living
    with caplog.at_level(logging.WARNING):
        assert store.release_dead_holders(Y) == 1  # its first look: no run needed for this
    assert _holders(postgres_url) == [Y]
    [said] = [r.getMessage() for r in caplog.records if X in r.getMessage()]
    assert said.endswith("stopped without giving them back")
    assert len(leased_addresses(store.lease(now=NOW, limit=10, lease_for=LEASE_FOR))) == 2


def test_a_closing_store_waits_briefly_for_a_lock_on_the_holders_table(
    postgres_url: str,
) -> None:
    """Closing marks the store's holders stopped "best effort and briefly" (STOP_WAIT
    for a connection), but the UPDATE then waited for a lock on ``lease_holders`` as
    long as ``lock_timeout`` says: 30 s by default, and for ever with ``lock_timeout=0``
    (a migration's ALTER TABLE, an operator's LOCK TABLE left open): a worker asked to
    stop hung in close(). The holders are then judged dead after ``dead_after``."""
    leaving = PostgresStore(f"{postgres_url}?dead_after={DEAD_AFTER:g}s&lock_timeout=0")
    leaving.release_dead_holders(X)
    with psycopg.connect(postgres_url) as locker:
        locker.execute("LOCK TABLE lease_holders IN ACCESS EXCLUSIVE MODE")
        closing = threading.Thread(target=leaving.close, daemon=True)
        closing.start()
        closing.join(15 * STOP_WAIT)  # a hang detector, not a timing: the wait is STOP_WAIT
        hung = closing.is_alive()
    closing.join()
    assert not hung
    assert _holders(postgres_url) == [X]  # not marked stopped: judged by dead_after instead


def test_a_worker_that_dies_while_the_judge_has_long_been_looking_is_found(
    url: str, stores: list[PostgresStore], children: list[subprocess.Popen[str]]
) -> None:
    """The usual case: a sibling that has run for hours, and a worker that dies now. The
    judge looks from a thread of its own, without a break, as a worker does."""
    judge = _open(stores, url)
    judge.enqueue(message("a@example.org"), now=NOW)
    released: list[tuple[float, int]] = []
    done = threading.Event()

    def look() -> None:
        while not done.is_set():
            released.append((time.monotonic(), judge.release_dead_holders(Y)))
            done.wait(judge.reap_every)

    looking = threading.Thread(target=look)
    looking.start()
    try:
        time.sleep(DEAD_AFTER + 0.5)  # the judge's run is longer than dead_after
        child = lease_in_child(children, url, X, 1, beat=True)  # beats after it began
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        killed = time.monotonic()
        deadline = killed + 4 * DEAD_AFTER
        while not any(n for _, n in released) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        done.set()
        looking.join(10)
    [(when, n)] = [(t, n) for t, n in released if n]
    assert n == 1
    assert when - killed < 2 * DEAD_AFTER  # once unseen for dead_after, not its lease_for
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(released)]
    assert max(gaps) < judge.reap_every * 2  # never a break: one run all along


def test_a_judge_with_a_shorter_dead_after_waits_for_the_holders_own(
    postgres_url: str, stores: list[PostgresStore]
) -> None:
    """Workers of one store with different ``dead_after``: each judged the others by its
    own, and a worker with ``dead_after=1s`` took one with 16 s (a beat every 2 s) for
    dead a second after any of its beats, while it delivered. A holder is now judged by
    the longer of the judge's ``dead_after`` and its own, which its row records."""
    judge = _open(stores, f"{postgres_url}?dead_after=1s")
    slow = _open(stores, f"{postgres_url}?dead_after=16s")
    assert slow.reap_every == 2.0
    slow.enqueue(message("a@example.org"), now=NOW)
    slow.release_dead_holders(X)
    assert slow.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=X) is not None
    next_beat = time.monotonic() + slow.reap_every
    end = time.monotonic() + 5.0
    while time.monotonic() < end:
        assert judge.release_dead_holders(Y) == 0
        if time.monotonic() >= next_beat:
            assert slow.release_dead_holders(X) == 0
            next_beat += slow.reap_every
        time.sleep(judge.reap_every)
    assert judge.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=Y) is None


def test_a_holder_that_stops_beating_is_judged_by_its_own_dead_after(
    postgres_url: str, stores: list[PostgresStore]
) -> None:
    """A holder whose ``dead_after`` is longer than the judge's is taken for dead once
    unseen for its own (it fences itself by that one), not before and not much later."""
    judge = _open(stores, f"{postgres_url}?dead_after=1s")
    gone = _open(stores, f"{postgres_url}?dead_after=3s")
    gone.enqueue(message("a@example.org"), now=NOW)
    gone.release_dead_holders(X)
    assert gone.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=X) is not None
    released, after = _look_until_released(judge, Y, within=4 * 3.0)
    assert released == 1
    assert 3.0 <= after < 3 * 3.0


def test_holder_rows_of_an_older_schema_get_the_default_dead_after(postgres_url: str) -> None:
    """An older mailstrom's ``lease_holders`` has no ``dead_after``: the upgrade gives its
    rows the default two minutes, which a judge with a shorter one then waits for."""
    schema_at(postgres_url, 14)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO lease_holders (holder, host, pid, started_at, seen_at)"
            " VALUES (%s, 'old', 1, now() - interval '1 minute', now() - interval '5 s')",
            (X,),
        )
    with PostgresStore(f"{postgres_url}?dead_after=1s") as store:
        with psycopg.connect(postgres_url) as conn:
            rows = conn.execute("SELECT holder, dead_after FROM lease_holders").fetchall()
        assert rows == [(X, DEFAULT_DEAD_AFTER)]
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            assert store.release_dead_holders(Y) == 0
            time.sleep(store.reap_every)
        assert [h.holder for h in store.live_holders(leases=False)] == [X, Y]
        store.release_dead_holders(Y)
        assert sorted(_holders(postgres_url)) == [X, Y]


@pytest.mark.parametrize("dead_after", ["0", "1s", "2m"])
def test_a_holder_honours_the_dead_after_its_row_promises(
    postgres_url: str, stores: list[PostgresStore], dead_after: str
) -> None:
    """The other workers take a holder for dead once unseen for what its row says; the
    worker stops itself by what its store's ``dead_after`` says (runtime/worker_reaping.py).
    With ``dead_after=0`` the row said two minutes while the worker, told None, never
    stopped itself when cut off, and what it leased went out twice."""
    store = _open(stores, f"{postgres_url}?dead_after={dead_after}")
    store.release_dead_holders(X)
    with psycopg.connect(postgres_url) as conn:
        [(promised,)] = conn.execute("SELECT dead_after FROM lease_holders WHERE holder = %s", [X])
    assert store.dead_after == promised
